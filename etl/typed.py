"""Raw Kafka messages -> good rows and rejects, the usual message on a typed lane (pure: no I/O).

:func:`split` is what a cycle calls. Most messages of a batch are the contract's plain form: a JSON
object of the contract fields only, each of its right type, nothing escaped or repeated. Those are
parsed straight into typed columns by etl.native's ``plain`` (C); what it leaves, and every message
where the extension was not built, msgspec decodes into the same columns (a ``Struct`` checks the
types while it parses). The rules are checked column by column on the values alone; no row of
Python objects per message, no ``errors`` or ``payload_text`` columns that a good row never needs.

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
from etl.normalise import kafka_times, kafka_times_of_ms, map_marking, normalise, paused_gc
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

try:
    import etl.native as native
except ImportError:  # built without a C compiler: msgspec decodes every message
    native = None  # type: ignore[assignment]

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


decode_check: Final = msgspec.json.Decoder(_Check).decode  # a payload to a _Check, or ValueError
_GETTERS: Final = tuple((name, attrgetter(name)) for name in _Check.__struct_fields__)
_TOPIC, _PARTITION, _OFFSET, _TIMESTAMP, _VALUE = (
    itemgetter(RawMessage._fields.index(f)) for f in ("topic", "partition", "offset", "timestamp_ms", "value")
)
_MAY_BE_UNSET: Final = ("status_code", "response_time_ms", "regex_pattern", "regex_matched", "error")
# etl.native.plain's flags (etl/native.c)
_STATUS_PRESENT, _TIMING_PRESENT, _MATCHED_PRESENT, _MATCHED_TRUE, _ERROR_PRESENT = 1, 2, 4, 8, 16
_CHECKED_AT_TEXT: Final = 32
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

    payloads = list(map(_VALUE, messages))
    cols, ok = _parsed(payloads)
    rest = np.flatnonzero(~ok)
    if len(rest):
        ok[rest] = _decode_rest(payloads, rest, cols)
    clock.lap("normalise")
    at = np.flatnonzero(ok)
    if not len(at):
        return ok, _good(messages, ok, {})
    if len(at) < len(ok):
        cols = {name: values[at] for name, values in cols.items()}
    ok[at[~_cleared(cols, now)]] = False
    if not ok.all():
        cols = {name: values[ok[at]] for name, values in cols.items()}
    return ok, _good(messages, ok, cols)


def _parsed(payloads: list[Any]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The typed columns of a batch, and which messages etl.native parsed into them: the contract's
    plain form with nothing escaped, no key twice, each value of its JSON type (none without it).

    The columns: ``url``, ``checked_text`` (a ``checked_at`` string, else None), ``checked_number``
    (a numeric ``checked_at``, else NaN), ``time_is_text``, ``status`` (int64), ``timing``
    (float64, NaN when absent), ``pattern`` and ``error`` (None when absent), ``matched``; and the
    masks ``s_absent``, ``t_absent``, ``m_absent``, ``e_absent`` (absent or null).
    """
    import numpy as np

    n = len(payloads)
    if native is None:
        none = np.full(n, None, dtype=object)
        cols = {
            "url": none,
            "checked_text": none.copy(),
            "checked_number": np.full(n, np.nan),
            "checked_micros": np.full(n, _NAT, dtype=np.int64),
            "status": np.zeros(n, dtype=np.int64),
            "timing": np.full(n, np.nan),
            "pattern": none.copy(),
            "error": none.copy(),
        }
        flags = np.zeros(n, dtype=np.uint8)
        parsed = np.zeros(n, dtype=bool)
    else:
        cleared, urls, texts, numbers, statuses, timings, bits, patterns, errors, micros = native.plain(
            payloads
        )
        parsed = np.frombuffer(cleared, dtype=bool).copy()
        flags = np.frombuffer(bits, dtype=np.uint8)
        cols = {
            "url": _objects(urls),
            "checked_text": _objects(texts),
            "checked_number": np.frombuffer(numbers, dtype=np.float64).copy(),
            "checked_micros": np.frombuffer(micros, dtype=np.int64),
            "status": np.frombuffer(statuses, dtype=np.int64).copy(),
            "timing": np.frombuffer(timings, dtype=np.float64).copy(),
            "pattern": _objects(patterns),
            "error": _objects(errors),
        }
    cols["time_is_text"] = (flags & _CHECKED_AT_TEXT) != 0
    cols["s_absent"] = (flags & _STATUS_PRESENT) == 0
    cols["t_absent"] = (flags & _TIMING_PRESENT) == 0
    cols["m_absent"] = (flags & _MATCHED_PRESENT) == 0
    cols["matched"] = (flags & _MATCHED_TRUE) != 0
    cols["e_absent"] = (flags & _ERROR_PRESENT) == 0
    return cols, parsed


def _objects(values: list[Any]) -> np.ndarray:
    import numpy as np

    return np.fromiter(values, dtype=object, count=len(values))


def _decode_rest(payloads: list[Any], rest: np.ndarray, cols: dict[str, np.ndarray]) -> np.ndarray:
    """msgspec's decoding of the messages at ``rest`` (those etl.native did not parse, or all of
    them without it) into ``cols``; which of them the typed lane may go on with (a mask over
    ``rest``): decoded, no key twice, nothing escaped that could hide a quote or a NUL, and numbers
    that fit their columns."""
    import numpy as np

    chosen = [payloads[i] for i in rest.tolist()]
    failed: list[int] = []
    decoded = map_marking(decode_check, chosen, failed)  # TypeError: a tombstone; ValueError: msgspec's
    fine = np.ones(len(rest), dtype=bool)
    if failed:
        fine[failed] = False
        mask = fine.tolist()
        chosen = list(compress(chosen, mask))
        decoded = list(compress(decoded, mask))
    if not decoded:
        return fine
    at = rest[fine]
    values = {
        name: np.fromiter(map(get, decoded), dtype=object, count=len(decoded)) for name, get in _GETTERS
    }
    unset = {name: values[name] == UNSET for name in _MAY_BE_UNSET}
    absent = {name: unset[name] | (values[name] == None) for name in _MAY_BE_UNSET}  # noqa: E711
    keep = np.ones(len(at), dtype=bool)

    cols["url"][at] = values["url"]
    times = values["checked_at"]
    is_text = np.fromiter(map(str.__instancecheck__, times), dtype=bool, count=len(times))
    cols["time_is_text"][at] = is_text
    cols["checked_text"][at[is_text]] = times[is_text]
    cols["checked_number"][at[~is_text]] = checks.floats(times[~is_text])
    cols["s_absent"][at], cols["t_absent"][at] = absent["status_code"], absent["response_time_ms"]
    pos = np.flatnonzero(~absent["status_code"])
    x = checks.floats(values["status_code"][pos])
    fits = (x >= STATUS_MIN) & (x <= STATUS_MAX)  # else the exact path names the rule (no overflow)
    keep[pos[~fits]] = False
    cols["status"][at[pos[fits]]] = x[fits].astype(np.int64)
    pos = np.flatnonzero(~absent["response_time_ms"])
    cols["timing"][at[pos]] = checks.floats(values["response_time_ms"][pos])
    cols["m_absent"][at] = absent["regex_matched"]
    cols["matched"][at] = values["regex_matched"] == True  # noqa: E712 (elementwise)
    cols["e_absent"][at] = absent["error"]
    for name, column in (("regex_pattern", "pattern"), ("error", "error")):
        texts = values[name].copy()
        texts[absent[name]] = None
        cols[column][at] = texts

    # No key twice and nothing escaped: two quotes per key and per string value, counted over the
    # whole of them first (a row never has fewer, so equal totals clear every row)
    strings = 1 + is_text + _is_text(values["regex_pattern"]) + _is_text(values["error"])
    keys = 7 - sum(u.astype(np.int64) for u in unset.values())
    expected = 2 * (keys + strings)
    joined = b"".join(chosen)
    if np.count_nonzero(np.frombuffer(joined, dtype=np.uint8) == ord('"')) != int(expected.sum()):
        quotes = np.fromiter(map(checks.count_quotes, chosen), dtype=np.int64, count=len(chosen))
        keep &= quotes == expected
    # NUL characters (only escaped, in valid JSON): none without a backslash
    if b"\\" in joined and checks.NUL_ESCAPE in joined:
        keep &= [checks.NUL_ESCAPE not in p for p in chosen]
    fine[fine] = keep
    return fine


def _cleared(cols: dict[str, np.ndarray], now: datetime) -> np.ndarray:
    """Rows every rule passes (False: the exact path decides), their values' types already
    checked in parsing. Adds ``checked_us`` (UTC microseconds) to ``cols``."""
    import numpy as np
    import pandas as pd

    n = len(cols["url"])
    keep = np.ones(n, dtype=bool)
    s_absent, t_absent, e_absent = cols["s_absent"], cols["t_absent"], cols["e_absent"]

    # A status_code or an error; with a status, a response time or an error
    keep &= ~(s_absent & e_absent)
    keep &= ~(~s_absent & t_absent & e_absent)
    # Numbers in range (msgspec's and etl.native's are finite)
    status, timing = cols["status"], cols["timing"]
    keep &= s_absent | ((status >= STATUS_MIN) & (status <= STATUS_MAX))
    keep &= t_absent | ((timing >= 0.0) & (timing <= RESPONSE_TIME_MAX_MS))
    # An error is not blank
    if not e_absent.all():
        pos = np.flatnonzero(~e_absent)
        blank = checks.str_len(checks.strip_text(cols["error"][pos])).astype(np.int64) == 0
        keep[pos[blank]] = False

    # URLs: each distinct one checked once (a batch repeats a few)
    codes, urls = pd.factorize(cols["url"])
    faults = url_faults(np.asarray(urls, dtype=object))
    keep &= ~np.logical_or.reduce([bad for _, bad in faults])[codes]

    # checked_at: a UTC time in range (other zones and formats: the exact path)
    checked = _checked_at_us(cols, now)
    keep &= checked != _NAT
    cols["checked_us"] = checked
    return keep


def _checked_at_us(cols: dict[str, np.ndarray], now: datetime) -> np.ndarray:
    """Each ``checked_at`` as UTC microseconds when the typed lane can clear it, else the NaT integer:
    a string ending in ``Z`` or ``+00:00`` (etl.native reads the usual form, pandas the others), or
    epoch seconds or milliseconds, within the bounds."""
    import numpy as np

    is_str = cols["time_is_text"]
    read = cols["checked_micros"]  # what etl.native read of the usual form (else NaT's integer)
    hi = int(now.timestamp() * 1_000_000) + FUTURE_SLACK_US
    out = np.where((read >= _LOW_US) & (read <= hi), read, _NAT)
    unread = is_str & (read == _NAT)
    if unread.any():
        pos = np.flatnonzero(unread)
        texts = cols["checked_text"][pos]
        if not _all_end_in_z(texts):
            pos = pos[np.fromiter(map(checks.ends_utc, texts), dtype=bool, count=len(pos))]
            texts = cols["checked_text"][pos]
        us = checks.iso_to_us(texts)
        fine = (us != _NAT) & (us >= _LOW_US) & (us <= hi)
        out[pos[fine]] = us[fine]
    if not is_str.all():
        pos = np.flatnonzero(~is_str)
        us_f = epoch_us(cols["checked_number"][pos])
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

    def text(values: np.ndarray) -> pd.Series:
        return pd.Series(values, index=index, dtype=object, copy=False)

    s_present = ~cols["s_absent"]
    codes = np.where(s_present, cols["status"], 0).astype(np.int16)
    t_present = ~cols["t_absent"]
    response = np.where(t_present, cols["timing"], np.nan)
    is_bool = ~cols["m_absent"]
    flags = cols["matched"] & is_bool
    checked = cols["checked_us"]
    parts, offs, ms, topic, odd = native.fields(rows) if native is not None else (b"", b"", b"", None, True)
    if not odd:  # every timestamp None or an int64
        partitions, offsets = np.frombuffer(parts, dtype=np.int64), np.frombuffer(offs, dtype=np.int64)
        stamps = kafka_times_of_ms(np.frombuffer(ms, dtype=np.int64))
    else:
        partitions = np.fromiter(map(_PARTITION, rows), dtype=np.int64, count=n)
        offsets = np.fromiter(map(_OFFSET, rows), dtype=np.int64, count=n)
        stamps = kafka_times(list(map(_TIMESTAMP, rows)))
    if topic is not None:  # one topic throughout: the usual batch
        topics = np.full(n, topic, dtype=object)
    else:
        topics = np.array(list(map(_TOPIC, rows)), dtype=object)
    columns = {
        "topic": pd.Series(topics, index=index, dtype=object, copy=False),
        "partition": partitions,
        "offset": offsets,
        "kafka_timestamp": stamps.array,
        "url": pd.Series(cols["url"], index=index, dtype=object, copy=False),
        "status_code": pd.arrays.IntegerArray(codes, ~s_present),
        "response_time_ms": response,
        "regex_pattern": text(cols["pattern"]),
        "regex_matched": pd.arrays.BooleanArray(flags, ~is_bool),
        "checked_at": pd.DatetimeIndex(checked.view("datetime64[us]")).tz_localize("UTC").array,
        "error": text(cols["error"]),
        "extra": pd.Series(np.full(n, None, dtype=object), index=index, dtype=object, copy=False),
    }
    return pd.DataFrame(columns, index=index, copy=False)


@functools.cache
def _empty() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Validation's good and rejects frames of no messages (their columns and dtypes): copy them."""
    return validate(normalise([]))
