"""Check normalised messages against the message contract; split good rows from rejects (pure).

Every rule is a vectorised check over a whole column (numpy masks built from C-level calls); Python
runs per row only to write the errors of rows that failed, and for the few rows a cheap check
cannot clear (duplicate keys hidden by escaped quotes, nested values, NUL characters).

Message contract and leniency policy
------------------------------------
The policy is strict: a value of the wrong JSON type is a ``type`` reject, never coerced.

- ``url`` (required): a string of at most 2048 characters, scheme ``http`` or ``https`` (any case),
  a non-empty host (and a numeric port if any), no whitespace and no control or invisible
  characters (Python's ``str.isprintable``, space excluded). Unicode (IDN hosts,
  emoji in the path) and SQL-looking text are accepted as they are.
- ``checked_at`` (required): an ISO-8601 date and time with a zone (``Z``, ``±hh:mm``, ``±hhmm``
  or ``±hh``; read by pandas' ISO-8601 parser), or epoch seconds or milliseconds as a JSON number
  (fractions allowed): below ``1e11`` it is seconds (up to the year 5138), from ``1e11`` on
  milliseconds (from March 1973). Stored as UTC. It must lie between 2000-01-01T00:00:00Z and
  one day after the validation time. A string without a zone is rejected (``timezone``): its
  instant is unknown.
- A successful check has ``status_code`` (a JSON integer 100-599) and ``response_time_ms`` (a
  finite number, 0 to 86 400 000, i.e. one day). A failed check has ``error`` (a non-empty
  string) and may lack both. With neither ``status_code`` nor ``error`` the message is rejected
  (``status_or_error``); with a status but neither a response time nor an error, ``required``.
  A status of the wrong type still counts as a status here (it is reported as ``type``).
- ``regex_pattern``: string or null; ``regex_matched``: true, false or null.
- JSON null and an absent key mean the same (absent). A null ``url`` or ``checked_at`` is
  ``required`` like a missing one; the error's value is ``"null"`` instead of none.
- Numbers as strings (``"200"``), booleans as strings (``"true"``), numbers as booleans
  (``1``), floats as status codes (``200.0``) and empty strings as errors are rejected.
- Unknown top-level keys do not reject a message; they are kept in ``extra`` (JSON text for JSONB),
  exactly: integers beyond 64 bits too. In the contract fields such an integer is out of range
  anyway (orjson reads it as a float, so a huge ``status_code`` is both ``type`` and ``range``).
- Rejected whatever the field: NUL characters (PostgreSQL text cannot hold them), duplicate keys
  at any depth (which one counts is ambiguous), nesting deeper than 64 levels, ``NaN`` and
  ``Infinity`` (not JSON; named by field), invalid UTF-8, a UTF-8 byte-order mark, empty
  messages and tombstones. JSON whitespace anywhere (pretty-printed messages) is fine.

Rejects carry every rule the message failed, as ``{"field", "rule", "value"}`` with the value
shortened to about 100 characters; the rule names are the keys of :data:`RULES`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from itertools import repeat
from typing import Any, Final

import numpy as np
import orjson
import pandas as pd

from etl import checks
from etl.contract import FIELDS, REJECT_COLUMNS
from etl.normalise import MAX_DEPTH, MISSING, error, paused_gc, problem

RULES: Final[dict[str, str]] = {
    # stage "decode": the bytes
    "tombstone": "The message has no value (a Kafka tombstone).",
    "invalid_utf8": "The value is not valid UTF-8 text.",
    # stage "json": the text ("empty" and "not_finite" also name a field)
    "empty": "The message, or a text field, is empty or only whitespace.",
    "invalid_json": "The text is not valid JSON.",
    "not_object": "The JSON value is not an object.",
    "duplicate_key": "A key appears more than once in the same object (which one counts is ambiguous).",
    "too_deep": f"Objects or arrays are nested more than {MAX_DEPTH} levels deep.",
    "not_finite": "A number is NaN or infinite (NaN and Infinity are not JSON).",
    # stage "schema": the fields
    "required": "A required field is missing or null.",
    "type": "The field has the wrong JSON type (strings are not numbers, numbers are not booleans).",
    "range": "The number is outside its allowed range.",
    "url_length": "The URL is longer than 2048 characters.",
    "url_chars": "The URL contains whitespace, control or invisible characters.",
    "url_scheme": "The URL's scheme is not http or https.",
    "url_host": "The URL has no host (or its port is not a number).",
    "timezone": "The timestamp has no time zone.",
    "timestamp_format": "The timestamp is neither ISO-8601 text nor epoch seconds or milliseconds.",
    "timestamp_range": "The timestamp is before 2000-01-01 or more than one day in the future.",
    "nul_character": "Text contains a NUL character, which PostgreSQL cannot store.",
    "status_or_error": "The message has neither a status_code (success) nor an error (failure).",
}

URL_MAX_CHARS: Final = 2048
STATUS_MIN, STATUS_MAX = 100, 599
RESPONSE_TIME_MAX_MS: Final = 86_400_000.0  # one day: anything longer is a broken clock, not a check
EPOCH_MS_FROM: Final = 1e11  # epoch numbers below this are seconds, from it on milliseconds
CHECKED_AT_MIN: Final = datetime(2000, 1, 1, tzinfo=UTC)
FUTURE_SLACK_US: Final = 86_400 * 1_000_000  # checked_at may be at most one day ahead of `now`

_NAT: Final = np.iinfo(np.int64).min
_NONE = type(None)
_MISSING = type(MISSING)
# Python type of a parsed value -> a small code, so type rules are integer comparisons
_KIND: Final[dict[type, int]] = {_MISSING: 0, _NONE: 1, str: 2, int: 3, float: 4, bool: 5, dict: 6, list: 7}
_OTHER_KIND: Final = 8


def validate(frame: pd.DataFrame, *, now: datetime | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split a :func:`etl.normalise.normalise` frame into ``(good, rejects)``.

    Every input row lands in exactly one of them; both keep the input's index labels. ``now``
    (timezone-aware, default: the current time) bounds ``checked_at`` in the future. Duplicate
    keys, nesting and NUL characters are found from the raw ``payload`` column, so the frame must
    come from ``normalise`` (a subset of its rows is fine).
    """
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    with paused_gc():
        return _Validation(frame, now).run()


class _Validation:
    """The checks for one frame. Each ``_check_*`` records failing rows as boolean masks."""

    def __init__(self, frame: pd.DataFrame, now: datetime) -> None:
        self.frame = frame
        self.n = len(frame)
        self.now_us = int(now.timestamp() * 1_000_000)
        self.parsed = frame["parsed"].to_numpy(dtype=bool)
        self.col = {f: np.asarray(frame[f].to_numpy(), dtype=object) for f in FIELDS}
        self.kinds = {f: _kinds(self.col[f]) for f in FIELDS}
        self.payloads = np.asarray(frame["payload"].to_numpy(), dtype=object)
        # (field, rule, rows mask, values shown in the error, stage)
        self.failures: list[tuple[str | None, str, np.ndarray, np.ndarray | None, str]] = []
        # per-row errors found by the exact slow paths: position -> errors, with their stage
        self.row_errors: dict[int, list[tuple[dict[str, Any], str]]] = {}
        self.extra_json = np.full(self.n, None, dtype=object)
        self.checked_us = np.full(self.n, _NAT, dtype=np.int64)
        self.response_ms = np.full(self.n, np.nan)

    # -- helpers ----------------------------------------------------------------------------------

    def fail(
        self, field: str | None, rule: str, mask: np.ndarray, values: np.ndarray | None, stage: str = "schema"
    ) -> None:
        mask = mask & self.parsed
        if mask.any():
            self.failures.append((field, rule, mask, values, stage))

    def fail_row(self, pos: int, err: dict[str, Any], stage: str = "schema") -> None:
        self.row_errors.setdefault(pos, []).append((err, stage))

    def kind(self, field: str, *kinds: type) -> np.ndarray:
        """Rows whose ``field`` holds a value of one of these Python types."""
        codes = self.kinds[field]
        mask = codes == _KIND[kinds[0]]
        for k in kinds[1:]:
            mask |= codes == _KIND[k]
        return mask

    def absent(self, field: str) -> np.ndarray:
        return self.kind(field, _MISSING, _NONE)

    def scattered(self, positions: np.ndarray, values: np.ndarray, fill: Any = False) -> np.ndarray:
        """A full-length array with ``values`` at ``positions`` (rules computed on a subset)."""
        out = np.full(self.n, fill, dtype=np.asarray(values).dtype if len(values) else bool)
        out[positions] = values
        return out

    # -- the rules --------------------------------------------------------------------------------

    def check_url(self) -> None:
        values = self.col["url"]
        absent = self.absent("url")
        is_str = self.kind("url", str)
        self.fail("url", "required", absent, values)
        self.fail("url", "type", ~absent & ~is_str, values)
        pos = np.flatnonzero(is_str & self.parsed)
        if not len(pos):
            return
        # A batch repeats the same few URLs: check each distinct one once, then spread the result.
        codes, urls = pd.factorize(values[pos])
        for rule, bad in url_faults(np.asarray(urls, dtype=object)):
            if bad.any():
                self.fail("url", rule, self.scattered(pos, bad[codes]), values)

    def check_checked_at(self) -> None:
        values = self.col["checked_at"]
        absent = self.absent("checked_at")
        is_str = self.kind("checked_at", str)
        is_num = self.kind("checked_at", int, float)
        self.fail("checked_at", "required", absent, values)
        self.fail("checked_at", "type", ~absent & ~is_str & ~is_num, values)
        lo = int(CHECKED_AT_MIN.timestamp()) * 1_000_000
        hi = self.now_us + FUTURE_SLACK_US

        pos = np.flatnonzero(is_str & self.parsed)
        if len(pos):
            texts = values[pos]
            zoned = np.fromiter(map(checks.ends_utc, texts), dtype=bool, count=len(texts))
            other = np.flatnonzero(~zoned)
            if len(other):
                zoned[other] = [checks.ZONE.search(t) is not None for t in texts[other]]
            if not zoned.all():  # a date-time without a zone, or not a date-time at all
                naive = np.flatnonzero(~zoned)
                looks_iso = np.array(
                    [checks.NAIVE_ISO.fullmatch(t) is not None for t in texts[naive]], dtype=bool
                )
                self.fail("checked_at", "timezone", self.scattered(pos[naive], looks_iso), values)
                self.fail("checked_at", "timestamp_format", self.scattered(pos[naive], ~looks_iso), values)
            zpos = pos[zoned]
            us = checks.iso_to_us(values[zpos])
            unparsed = us == _NAT
            in_range = (us >= lo) & (us <= hi)
            self.checked_us[zpos[in_range]] = us[in_range]
            self.fail("checked_at", "timestamp_range", self.scattered(zpos, ~unparsed & ~in_range), values)
            if unparsed.any():  # name absurd years as range problems, the rest as format problems
                bad = zpos[unparsed]
                absurd = np.array([checks.absurd_year(t) for t in values[bad]], dtype=bool)
                self.fail("checked_at", "timestamp_range", self.scattered(bad, absurd), values)
                self.fail("checked_at", "timestamp_format", self.scattered(bad, ~absurd), values)

        pos = np.flatnonzero(is_num & self.parsed)
        if len(pos):
            x = checks.floats(values[pos])
            finite = np.isfinite(x)
            self.fail("checked_at", "not_finite", self.scattered(pos, ~finite), values)
            with np.errstate(invalid="ignore", over="ignore"):
                us = epoch_us(x)
                in_range = finite & (us >= lo) & (us <= hi)
            self.fail("checked_at", "timestamp_range", self.scattered(pos, finite & ~in_range), values)
            self.checked_us[pos[in_range]] = np.round(us[in_range]).astype(np.int64)

    def check_status_and_timing(self) -> None:
        status = self.col["status_code"]
        s_absent = self.absent("status_code")
        s_int = self.kind("status_code", int)
        s_float = self.kind("status_code", float)
        self.fail("status_code", "type", ~s_absent & ~s_int, status)
        self._number_rules("status_code", s_int | s_float, STATUS_MIN, STATUS_MAX)

        timing = self.col["response_time_ms"]
        t_absent = self.absent("response_time_ms")
        t_num = self.kind("response_time_ms", int, float)
        self.fail("response_time_ms", "type", ~t_absent & ~t_num, timing)
        x = self._number_rules("response_time_ms", t_num, 0.0, RESPONSE_TIME_MAX_MS)
        self.response_ms = x

        err = self.col["error"]
        e_absent = self.absent("error")
        e_str = self.kind("error", str)
        self.fail("error", "type", ~e_absent & ~e_str, err)
        pos = np.flatnonzero(e_str & self.parsed)
        if len(pos):
            blank = checks.str_len(checks.strip_text(err[pos])).astype(np.int64) == 0
            self.fail("error", "empty", self.scattered(pos, blank), err)

        self.fail(None, "status_or_error", s_absent & e_absent, None)
        self.fail("response_time_ms", "required", ~s_absent & t_absent & e_absent, None)

    def _number_rules(self, field: str, numeric: np.ndarray, low: float, high: float) -> np.ndarray:
        """``not_finite`` and ``range`` on the numeric rows; returns them as float64 (NaN elsewhere)."""
        values = self.col[field]
        out = np.full(self.n, np.nan)
        pos = np.flatnonzero(numeric & self.parsed)
        if len(pos):
            x = checks.floats(values[pos])
            finite = np.isfinite(x)
            self.fail(field, "not_finite", self.scattered(pos, ~finite), values)
            self.fail(field, "range", self.scattered(pos, finite & ((x < low) | (x > high))), values)
            out[pos] = x
        return out

    def check_regex(self) -> None:
        for field, allowed in (("regex_pattern", str), ("regex_matched", bool)):
            absent = self.absent(field)
            self.fail(field, "type", ~absent & ~self.kind(field, allowed), self.col[field])

    def check_nul(self) -> None:
        """NUL characters in any field or in ``extra`` (keys included).

        A raw NUL byte is not valid JSON, so a parsed string can only hold NUL through the escape
        ``\\u0000``: one scan of the batch's raw bytes clears the usual batch, and only rows
        holding the escape are looked at value by value.
        """
        pos = np.flatnonzero(self.parsed)
        chunks = self.payloads[pos].tolist()
        joined = b"".join(chunks)
        hits = []
        at = joined.find(checks.NUL_ESCAPE)
        while at >= 0:
            hits.append(at)
            at = joined.find(checks.NUL_ESCAPE, at + 1)
        if not hits:
            return
        ends = np.cumsum(np.fromiter(map(len, chunks), dtype=np.int64, count=len(chunks)))
        extras = self.frame["extra"].to_numpy(dtype=object)
        for p in np.unique(pos[np.searchsorted(ends, hits, side="right")]).tolist():
            for field in FIELDS:
                if checks.holds_nul(self.col[field][p]):
                    self.fail_row(p, error(field, "nul_character", self.col[field][p]))
            for key, value in (extras[p] or {}).items():
                if checks.holds_nul(key) or checks.holds_nul(value):  # name the key storably, NUL spelt out
                    self.fail_row(p, error(key.replace("\x00", "\\u0000"), "nul_character", value))

    def check_extra(self) -> None:
        """Serialise ``extra`` to JSON text (for a JSONB column)."""
        extras = self.frame["extra"].to_numpy(dtype=object)
        pos = np.flatnonzero(extras.astype(bool) & self.parsed)
        if not len(pos):
            return
        texts: list[bytes | None]
        try:
            texts = list(map(orjson.dumps, extras[pos]))
        except (TypeError, orjson.JSONEncodeError):
            texts = [checks.dumps_or_none(e) for e in extras[pos]]
        for p, t in zip(pos.tolist(), texts, strict=True):
            if t is None:  # only after a lenient NaN parse, already rejected: say why it cannot load
                self.fail_row(p, problem("extra", "invalid_json", "cannot be written as JSON"), "json")
        out = [None if t is None else t.decode() for t in texts]
        # orjson reads integers beyond 64 bits as floats; such a float prints with a big exponent.
        # Those few rows are read again with json, which keeps integers exact.
        if checks.BIG_NUMBER.search(b"\n".join(t for t in texts if t is not None)):
            payload_texts = self.frame["payload_text"].to_numpy(dtype=object)
            for j, (p, t) in enumerate(zip(pos.tolist(), texts, strict=True)):
                if t is not None and checks.BIG_NUMBER.search(t):
                    out[j] = checks.exact_extra(payload_texts[p]) or out[j]
        self.extra_json[pos] = out

    def check_structure(self) -> None:
        """Duplicate keys and nesting depth, exactly, for the rows a quote count cannot clear.

        In JSON text a ``"`` byte only delimits a string or is escaped inside one. So if the raw
        value holds exactly two quotes per parsed key and per parsed string value, and no value is
        an object or array, no key was seen twice (a repeated key adds two more quotes) and
        nothing is nested. The other rows (escaped quotes, nested values) take the slow path.
        """
        pos = np.flatnonzero(self.parsed)
        if not len(pos):
            return
        payloads = self.payloads[pos]
        quotes = np.fromiter(map(checks.count_quotes, payloads), dtype=np.int64, count=len(pos))
        keys = np.zeros(self.n, dtype=np.int64)
        strings = np.zeros(self.n, dtype=np.int64)
        nested = np.zeros(self.n, dtype=bool)
        for field in FIELDS:
            keys += ~self.kind(field, _MISSING)
            strings += self.kind(field, str)
            nested |= self.kind(field, dict, list)
        extras = self.frame["extra"].to_numpy(dtype=object)
        for p in np.flatnonzero(extras.astype(bool) & self.parsed):
            kinds = list(map(type, extras[p].values()))
            keys[p] += len(kinds)
            strings[p] += kinds.count(str)
            nested[p] |= dict in kinds or list in kinds
        clear = (quotes == 2 * (keys[pos] + strings[pos])) & ~nested[pos]
        texts = self.frame["payload_text"].to_numpy(dtype=object)
        for p in pos[~clear]:
            fields = [self.col[f][p] for f in FIELDS]
            for err in checks.structure_problems(fields, extras[p], texts[p]):
                self.fail_row(int(p), err, "json")

    # -- the result -------------------------------------------------------------------------------

    def run(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        self.check_structure()
        self.check_url()
        self.check_checked_at()
        self.check_status_and_timing()
        self.check_regex()
        self.check_nul()
        self.check_extra()

        stages_in = self.frame["stage"].to_numpy(dtype=object)
        rejected = ~self.parsed | stages_in.astype(bool)
        for _, _, mask, _, _ in self.failures:
            rejected |= mask
        if self.row_errors:
            rejected[list(self.row_errors)] = True
        bad = np.flatnonzero(rejected)
        good = np.flatnonzero(~rejected)
        return self._good(good), self._rejects(bad, stages_in)

    def _rejects(self, bad: np.ndarray, stages_in: np.ndarray) -> pd.DataFrame:
        errors_in = self.frame["errors"].to_numpy(dtype=object)
        collected: dict[int, list[dict[str, Any]]] = {int(p): list(errors_in[p]) for p in bad}
        stage = {int(p): stages_in[p] for p in bad}
        for field, rule, mask, values, rule_stage in self.failures:
            for p in np.flatnonzero(mask).tolist():
                collected[p].append(error(field, rule, values[p] if values is not None else MISSING))
                if stage[p] is None or (rule_stage == "json" and stage[p] == "schema"):
                    stage[p] = rule_stage
        for p, errs in self.row_errors.items():
            for err, rule_stage in errs:
                collected[p].append(err)
                if stage[p] is None or (rule_stage == "json" and stage[p] == "schema"):
                    stage[p] = rule_stage
        rejects = self.frame.take(bad)[[c for c in REJECT_COLUMNS if c not in ("stage", "errors")]].copy()
        rejects.insert(
            8,
            "stage",
            pd.Series([stage[p] or "schema" for p in bad.tolist()], index=rejects.index, dtype=object),
        )
        rejects.insert(
            9,
            "errors",
            pd.Series([checks.unique(collected[p]) for p in bad.tolist()], index=rejects.index, dtype=object),
        )
        return rejects

    def _good(self, good: np.ndarray) -> pd.DataFrame:
        """The good rows, typed for ``to_sql`` / COPY (arrays are fresh: built without copies)."""
        frame = self.frame

        def plain(field: str) -> np.ndarray:
            values = self.col[field][good]
            values[self.kind(field, _MISSING)[good]] = None
            return values

        status = self.col["status_code"][good]
        present = self.kind("status_code", int)[good]
        codes = np.zeros(len(good), dtype=np.int16)
        codes[present] = status[present].astype(np.int64)
        matched = self.col["regex_matched"][good]
        is_bool = self.kind("regex_matched", bool)[good]
        flags = np.zeros(len(good), dtype=bool)
        flags[is_bool] = matched[is_bool].astype(bool)
        checked = pd.DatetimeIndex(self.checked_us[good].view("datetime64[us]")).tz_localize("UTC")
        index = frame.index[good]
        columns = {
            "topic": _text(np.asarray(frame["topic"].to_numpy(), dtype=object)[good], index),
            "partition": frame["partition"].to_numpy(dtype=np.int64)[good],
            "offset": frame["offset"].to_numpy(dtype=np.int64)[good],
            "kafka_timestamp": frame["kafka_timestamp"].array.take(good),
            "url": _text(self.col["url"][good], index),
            "status_code": pd.arrays.IntegerArray(codes, ~present),
            "response_time_ms": self.response_ms[good],
            "regex_pattern": _text(plain("regex_pattern"), index),
            "regex_matched": pd.arrays.BooleanArray(flags, ~is_bool),
            "checked_at": checked.array,
            "error": _text(plain("error"), index),
            "extra": _text(self.extra_json[good], index),
        }
        return pd.DataFrame(columns, index=index, copy=False)


def url_faults(urls: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Each URL rule (a string URL's) and the URLs of ``urls`` that break it, as boolean masks."""
    lengths = checks.str_len(urls).astype(np.int64)
    bad_chars = np.zeros(len(urls), dtype=bool)
    joined = "".join(urls)  # one C pass clears the usual batch
    if not joined.isprintable() or " " in joined:
        bad_chars = ~checks.printable(urls).astype(bool) | checks.has_space(urls).astype(bool)
    head_ok = checks.url_head_ok(urls) | (lengths == 0)
    scheme_ok = head_ok.copy()
    if not head_ok.all():
        wrong = np.flatnonzero(~head_ok)
        scheme_ok[wrong] = [checks.HTTP_SCHEME.match(u) is not None for u in urls[wrong]]
    return [
        ("empty", lengths == 0),
        ("url_length", lengths > URL_MAX_CHARS),
        ("url_chars", bad_chars),
        ("url_scheme", ~scheme_ok),
        ("url_host", scheme_ok & ~head_ok),
    ]


def epoch_us(x: np.ndarray) -> np.ndarray:
    """Epoch numbers as microseconds: below :data:`EPOCH_MS_FROM` seconds, from it milliseconds."""
    return np.where(np.abs(x) < EPOCH_MS_FROM, x * 1e6, x * 1e3)


def records(rejected: pd.DataFrame) -> list[dict[str, Any]]:
    """The rejects frame as one dict per row: the values as ``DataFrame.to_dict("records")`` gives
    them (Python ints, the objects as they are), except that a UTC time is a ``datetime`` and a
    missing one None, in a fraction of its time (a ``Timestamp`` per value costs ~10 us)."""
    columns = [str(c) for c in rejected.columns]
    values = (_python_values(rejected.iloc[:, i]) for i in range(len(columns)))
    return [dict(zip(columns, row, strict=True)) for row in zip(*values, strict=True)]


def _python_values(column: pd.Series) -> list[Any]:
    """A column's values as Python objects; a UTC microsecond time as ``datetime`` (None when missing)."""
    if column.dtype != _UTC_MICROS:
        return column.tolist()
    times = column.dt.to_pydatetime().tolist()  # datetimes with tzinfo UTC, NaT where missing
    if column.hasnans:
        times = [None if t is pd.NaT else t for t in times]
    return times


_UTC_MICROS: Final = pd.DatetimeTZDtype("us", "UTC")


def _text(values: np.ndarray, index: pd.Index) -> pd.Series:
    """Keep a text column as Python objects (str or None): pandas would infer its NaN-based str dtype."""
    return pd.Series(values, index=index, dtype=object, copy=False)


def _kinds(values: np.ndarray) -> np.ndarray:
    """The :data:`_KIND` code of every value (C-level ``map``, no Python per row)."""
    try:  # JSON parsers only make these types
        return np.fromiter(map(_KIND.__getitem__, map(type, values)), dtype=np.int8, count=len(values))
    except KeyError:  # a frame built by hand
        return np.fromiter(
            map(_KIND.get, map(type, values), repeat(_OTHER_KIND)), dtype=np.int8, count=len(values)
        )
