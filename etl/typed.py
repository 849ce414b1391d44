"""Raw Kafka messages -> good rows and rejects, the usual message on a typed lane (pure: no I/O).

:func:`split` is what a cycle calls. Most messages of a batch are the contract's plain form: a JSON
object of the contract fields only, each of its right type, nothing escaped or repeated. Those are
decoded by msgspec straight into typed values (a ``Struct`` checks the types while it parses, in C),
and the rules are checked column by column on the values alone; no row of Python objects per
message, no ``errors`` or ``payload_text`` columns that a good row never needs.

A message the typed lane cannot clear goes, unchanged, through :func:`etl.normalise.normalise` and
:func:`etl.validate.validate`, the exact path that names every rule a message breaks. The typed lane
only ever says "good": it clears a message when every rule that could reject it is checked and
passed, and it sends on anything else (an unknown key, a value of another type, a time with a zone
other than UTC, an escaped quote, a ``\\u0000``, a value out of range...). So the rows and the rejects
are the ones the exact path alone gives (tests/test_reference.py holds both to a plain reference).
"""

from __future__ import annotations

import functools
import time
from datetime import UTC, datetime
from itertools import compress
from operator import attrgetter, itemgetter
from typing import TYPE_CHECKING, Any, Final

import msgspec
import numpy as np
from msgspec import UNSET, UnsetType

from etl import checks
from etl.contract import RawMessage
from etl.normalise import kafka_times, map_marking, normalise, paused_gc
from etl.validate import (
    CHECKED_AT_MIN,
    FUTURE_SLACK_US,
    RESPONSE_TIME_MAX_MS,
    STATUS_MAX,
    STATUS_MIN,
    epoch_us,
    url_faults,
    validate,
)

if TYPE_CHECKING:
    import pandas as pd


class _Check(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A message the typed lane can take: the contract fields only, each of its JSON type.

    ``url`` and ``checked_at`` are required and never null; the rest may be null or absent (UNSET
    tells absent from null: the quote count below needs the keys present). msgspec refuses
    anything else (an unknown key, a bool for a number, a float for an integer, NaN, invalid
    UTF-8, a lone surrogate), and the message takes the exact path.
    """

    url: str
    checked_at: str | float
    status_code: int | UnsetType | None = UNSET
    response_time_ms: float | UnsetType | None = UNSET
    regex_pattern: str | UnsetType | None = UNSET
    regex_matched: bool | UnsetType | None = UNSET
    error: str | UnsetType | None = UNSET


_decode: Final = msgspec.json.Decoder(_Check).decode
_GETTERS: Final = tuple((name, attrgetter(name)) for name in _Check.__struct_fields__)
_TOPIC, _PARTITION, _OFFSET, _TIMESTAMP, _VALUE = (
    itemgetter(RawMessage._fields.index(f)) for f in ("topic", "partition", "offset", "timestamp_ms", "value")
)
_NAT: Final = -(2**63)
_LOW_US: Final = int(CHECKED_AT_MIN.timestamp()) * 1_000_000


def split(
    messages: list[RawMessage], *, now: datetime | None = None, seconds: dict[str, float] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(good, rejects)`` of a batch, as :func:`~etl.validate.validate` of
    :func:`~etl.normalise.normalise` gives them: the same columns, rows and reasons; index labels
    are positions in ``messages``, the good rows in order.

    ``seconds``, when given, gets the time spent decoding (``"normalise"``) and checking
    (``"validate"``) added to it, the two stages of a run's report.
    """
    import pandas as pd

    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    clock = _Clock(seconds)
    with paused_gc():
        cleared, good = _typed(messages, now, clock)
        clock.lap("validate")
        rest = np.flatnonzero(~cleared).tolist() if len(good) < len(messages) else []
        if not rest:
            return good, _empty()[1].copy()
        frame = normalise([messages[i] for i in rest])
        frame.index = pd.Index(rest)
        clock.lap("normalise")
    slow_good, rejects = validate(frame, now=now)
    if len(slow_good):
        good = pd.concat([good, slow_good]).sort_index(kind="stable") if len(good) else slow_good
    clock.lap("validate")
    return good, rejects


class _Clock:
    """Adds the monotonic time since the last lap to ``seconds[stage]`` (nothing when None)."""

    def __init__(self, seconds: dict[str, float] | None) -> None:
        self.seconds = seconds
        self.last = time.monotonic()

    def lap(self, stage: str) -> None:
        if self.seconds is not None:
            now = time.monotonic()
            self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self.last
            self.last = now


def _typed(messages: list[RawMessage], now: datetime, clock: _Clock) -> tuple[np.ndarray, pd.DataFrame]:
    """Which messages the typed lane clears (a mask), and their good rows."""
    import numpy as np

    n = len(messages)
    payloads = list(map(_VALUE, messages))
    failed: list[int] = []
    decoded = map_marking(_decode, payloads, failed)  # TypeError: a tombstone; ValueError: msgspec's
    ok = np.ones(n, dtype=bool)
    if failed:
        ok[failed] = False
        at = np.flatnonzero(ok)
        chosen = ok.tolist()
        decoded = list(compress(decoded, chosen))
        payloads = list(compress(payloads, chosen))
    else:
        at = np.arange(n)
    if not len(at):
        return ok, _good(messages, ok, {})

    cols = {name: np.fromiter(map(get, decoded), dtype=object, count=len(decoded)) for name, get in _GETTERS}
    clock.lap("normalise")
    keep = _cleared(cols, payloads, now)  # adds the masks and times it found to cols
    ok[at[~keep]] = False
    if not keep.all():
        cols = {name: values[keep] for name, values in cols.items()}
    return ok, _good(messages, ok, cols)


def _cleared(cols: dict[str, np.ndarray], payloads: list[Any], now: datetime) -> np.ndarray:
    """Rows every rule passes, their values' types already checked by msgspec (False: the exact path
    decides). Adds to ``cols`` what the good frame is built from: ``checked_us`` (UTC microseconds)
    and the masks ``status_absent``, ``timing_absent``, ``pattern_unset``, ``matched_absent`` and
    ``error_unset``."""
    import numpy as np
    import pandas as pd

    n = len(payloads)
    keep = np.ones(n, dtype=bool)

    # The values as arrays; an absent key is UNSET, null is None
    status, timing, pattern = cols["status_code"], cols["response_time_ms"], cols["regex_pattern"]
    matched, error = cols["regex_matched"], cols["error"]
    unset = {
        name: values == UNSET
        for name, values in (("s", status), ("t", timing), ("p", pattern), ("m", matched), ("e", error))
    }
    s_absent = unset["s"] | (status == None)  # noqa: E711 (elementwise)
    t_absent = unset["t"] | (timing == None)  # noqa: E711
    e_absent = unset["e"] | (error == None)  # noqa: E711

    # A status_code or an error; with a status, a response time or an error
    keep &= ~(s_absent & e_absent)
    keep &= ~(~s_absent & t_absent & e_absent)
    # Numbers in range (msgspec's are finite; an integer beyond 64 bits is out of range anyway)
    if not s_absent.all():
        pos = np.flatnonzero(~s_absent)
        x = checks.floats(status[pos])
        keep[pos[(x < STATUS_MIN) | (x > STATUS_MAX)]] = False
    if not t_absent.all():
        pos = np.flatnonzero(~t_absent)
        x = checks.floats(timing[pos])
        keep[pos[~((x >= 0.0) & (x <= RESPONSE_TIME_MAX_MS))]] = False
    # An error is not blank
    if not e_absent.all():
        pos = np.flatnonzero(~e_absent)
        blank = checks.str_len(checks.strip_text(error[pos])).astype(np.int64) == 0
        keep[pos[blank]] = False

    # URLs: each distinct one checked once (a batch repeats a few)
    codes, urls = pd.factorize(cols["url"])
    faults = url_faults(np.asarray(urls, dtype=object))
    keep &= ~np.logical_or.reduce([bad for _, bad in faults])[codes]

    # checked_at: a UTC time in range (other zones and formats: the exact path)
    times = cols["checked_at"]
    time_is_text = np.fromiter(map(str.__instancecheck__, times), dtype=bool, count=n)
    checked = _checked_at_us(times, time_is_text, now)
    keep &= checked != _NAT

    # No key twice and nothing escaped: two quotes per key and per string value, counted over the
    # whole batch first (a row never has fewer, so equal totals clear every row)
    strings = 1 + time_is_text + _is_text(pattern) + _is_text(error)
    keys = 7 - (unset["s"].astype(np.int64) + unset["t"] + unset["p"] + unset["m"] + unset["e"])
    expected = 2 * (keys + strings)
    joined = b"".join(payloads)
    if np.count_nonzero(np.frombuffer(joined, dtype=np.uint8) == ord('"')) != int(expected.sum()):
        quotes = np.fromiter(map(checks.count_quotes, payloads), dtype=np.int64, count=n)
        keep &= quotes == expected
    # NUL characters (only escaped, in valid JSON): a batch without a backslash has none
    if b"\\" in joined and checks.NUL_ESCAPE in joined:
        keep &= [checks.NUL_ESCAPE not in p for p in payloads]
    cols["checked_us"] = checked
    cols["status_absent"], cols["timing_absent"] = s_absent, t_absent
    cols["pattern_unset"], cols["error_unset"] = unset["p"], unset["e"]
    cols["matched_absent"] = unset["m"] | (matched == None)  # noqa: E711 (elementwise)
    return keep


def _checked_at_us(texts: np.ndarray, is_str: np.ndarray, now: datetime) -> np.ndarray:
    """Each ``checked_at`` as UTC microseconds when the typed lane can clear it, else the NaT integer:
    a string ending in ``Z`` or ``+00:00``, or epoch seconds or milliseconds, within the bounds."""
    import numpy as np

    n = len(texts)
    out = np.full(n, _NAT, dtype=np.int64)
    hi = int(now.timestamp() * 1_000_000) + FUTURE_SLACK_US
    if is_str.any():
        pos = np.flatnonzero(is_str)
        if not _all_end_in_z(texts[pos]):
            pos = pos[np.fromiter(map(checks.ends_utc, texts[pos]), dtype=bool, count=len(pos))]
        us = checks.iso_to_us(texts[pos])
        fine = (us != _NAT) & (us >= _LOW_US) & (us <= hi)
        out[pos[fine]] = us[fine]
    if not is_str.all():
        pos = np.flatnonzero(~is_str)
        x = checks.floats(texts[pos])
        us_f = epoch_us(x)
        fine = (us_f >= _LOW_US) & (us_f <= hi)
        out[pos[fine]] = np.round(us_f[fine]).astype(np.int64)
    return out


def _is_text(values: np.ndarray) -> np.ndarray:
    """1 where a value is a string, else 0 (msgspec gives a text field a str, None or UNSET)."""
    import numpy as np

    return np.fromiter(map(str.__instancecheck__, values), dtype=np.int64, count=len(values))


def _all_end_in_z(texts: np.ndarray) -> bool:
    """True when every text ends in ``Z`` (one scan of them joined: no text holds a newline)."""
    joined = "\n".join(texts) + "\n"
    return joined.count("\n") == len(texts) == joined.count("Z\n")


def _good(messages: list[RawMessage], ok: np.ndarray, cols: dict[str, np.ndarray]) -> pd.DataFrame:
    """The cleared rows (``ok``, a mask over ``messages``) as validation's good frame (the same columns
    and dtypes), labelled by their positions; ``cols`` as :func:`_cleared` left it."""
    import numpy as np
    import pandas as pd

    at = np.flatnonzero(ok)
    rows = messages if len(at) == len(messages) else list(compress(messages, ok.tolist()))
    n = len(rows)
    index = pd.Index(at)
    if not n:
        return _empty()[0].copy()

    def text(values: np.ndarray, unset: np.ndarray) -> pd.Series:
        if unset.any():
            values = values.copy()
            values[unset] = None
        return pd.Series(values, index=index, dtype=object, copy=False)

    present = ~cols["status_absent"]
    codes = np.zeros(n, dtype=np.int16)
    codes[present] = cols["status_code"][present].astype(np.int64)
    t_present = ~cols["timing_absent"]
    response = np.full(n, np.nan)
    response[t_present] = cols["response_time_ms"][t_present].astype(np.float64)
    is_bool = ~cols["matched_absent"]
    flags = np.zeros(n, dtype=bool)
    flags[is_bool] = cols["regex_matched"][is_bool].astype(bool)
    checked = cols["checked_us"]
    columns = {
        "topic": pd.Series(
            np.array(list(map(_TOPIC, rows)), dtype=object), index=index, dtype=object, copy=False
        ),
        "partition": np.fromiter(map(_PARTITION, rows), dtype=np.int64, count=n),
        "offset": np.fromiter(map(_OFFSET, rows), dtype=np.int64, count=n),
        "kafka_timestamp": kafka_times(list(map(_TIMESTAMP, rows))).array,
        "url": pd.Series(cols["url"], index=index, dtype=object, copy=False),
        "status_code": pd.arrays.IntegerArray(codes, ~present),
        "response_time_ms": response,
        "regex_pattern": text(cols["regex_pattern"], cols["pattern_unset"]),
        "regex_matched": pd.arrays.BooleanArray(flags, ~is_bool),
        "checked_at": pd.DatetimeIndex(checked.view("datetime64[us]")).tz_localize("UTC").array,
        "error": text(cols["error"], cols["error_unset"]),
        "extra": pd.Series(np.full(n, None, dtype=object), index=index, dtype=object, copy=False),
    }
    return pd.DataFrame(columns, index=index, copy=False)


@functools.cache
def _empty() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Validation's good and rejects frames of no messages (their columns and dtypes): copy them."""
    return validate(normalise([]))
