"""A plain, slow reference of decoding and validation, kept only for tests/test_reference.py.

One message at a time, in the order the README's message contract states the rules, with the standard
library's ``json`` instead of orjson and no numpy, no column tricks, no shortcuts: what the fast path
(:func:`etl.normalise.normalise` then :func:`etl.validate.validate`) must agree with, row for row.
It renders an error's value with the package's :func:`etl.normalise.show` (presentation, not a rule)
and takes the URL head and time-zone patterns from :mod:`etl.checks` (the patterns are the contract;
what is tested is everything around them: which rows they are applied to, and the shortcuts that
clear a batch without them).

Its scope is what the standard library parses as orjson does: no integers beyond 64 bits, no lone
surrogate escapes, no numbers that overflow a double, no nesting beyond 64 levels. The strategies in
the test stay inside it.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from etl import checks
from etl.contract import FIELDS, RawMessage
from etl.normalise import show

_ABSENT = object()  # a key not in the object
URL_MAX_CHARS = 2048
CHECKED_AT_MIN_US = int(datetime(2000, 1, 1, tzinfo=UTC).timestamp()) * 1_000_000
DAY_US = 86_400 * 1_000_000
ISO = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)T(\d\d)(?::?(\d\d)(?::?(\d\d)(?:\.(\d+))?)?)?"
    r"(?:(Z)|([+-])(\d\d)(?::?(\d\d))?)"
)
YEAR = re.compile(r"\s*([+-]?\d+)-")
# Described problems (the value is words, not the field's value): compared by rule only.
DESCRIBED = {"invalid_utf8", "invalid_json", "too_deep"}


@dataclass
class Outcome:
    """One message's fate: a good row (its contract fields as stored) or a reject."""

    stage: str | None = None  # None: good
    errors: list[tuple[str | None, str, str | None]] = field(default_factory=list)
    row: dict[str, Any] = field(default_factory=dict)

    def add(
        self,
        name: str | None,
        rule: str,
        value: Any = _ABSENT,
        stage: str = "schema",
        words: str | None = None,
    ) -> None:
        shown = words if words is not None else None if value is _ABSENT else show(value)
        if all((f, r) != (name, rule) for f, r, _ in self.errors):
            self.errors.append((name, rule, None if rule in DESCRIBED else shown))
        if self.stage is None or (stage == "json" and self.stage == "schema"):
            self.stage = stage


def reference(message: RawMessage, now: datetime) -> Outcome:
    out = Outcome()
    raw = message.value
    if raw is None:
        out.add(None, "tombstone", stage="decode")
        return out
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        out.add(None, "invalid_utf8", stage="decode")
        return out
    duplicates: Counter[str] = Counter()

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        counts = Counter(k for k, _ in items)
        duplicates.update({k: c for k, c in counts.items() if c > 1})
        return dict(items)

    non_finite = False

    def constant(name: str) -> float:
        nonlocal non_finite
        non_finite = True
        return float(name.replace("Infinity", "inf"))

    try:
        obj = json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except ValueError:
        out.add(None, "empty" if not text.strip() else "invalid_json", stage="json")
        return out
    if non_finite:
        named = [k for k, v in obj.items() if _holds_non_finite(v)] if type(obj) is dict else []
        if not named:
            out.add(None, "invalid_json", stage="json")
            return out
        for k in named:
            out.add(k, "not_finite", obj[k], stage="json")
    if type(obj) is not dict:
        out.add(None, "not_object", obj, stage="json")
        return out
    for key, count in duplicates.items():
        out.add(key, "duplicate_key", stage="json", words=f"{count} times")
    fields = {f: obj.get(f, _ABSENT) for f in FIELDS}
    extra = {k: v for k, v in obj.items() if k not in FIELDS}
    _check_fields(out, fields, now)
    for name in FIELDS:
        if _holds_nul(fields[name]):
            out.add(name, "nul_character", fields[name])
    for key, value in extra.items():
        if _holds_nul(key) or _holds_nul(value):
            out.add(key.replace("\x00", "\\u0000"), "nul_character", value)
    if out.stage is None:
        out.row = _row(fields, extra)
    return out


def _present(value: Any) -> bool:
    return value is not _ABSENT and value is not None


def _check_fields(out: Outcome, f: dict[str, Any], now: datetime) -> None:
    url = f["url"]
    if not _present(url):
        out.add("url", "required", url)
    elif type(url) is not str:
        out.add("url", "type", url)
    elif url == "":
        out.add("url", "empty", url)
    else:
        if len(url) > URL_MAX_CHARS:
            out.add("url", "url_length", url)
        if not url.isprintable() or " " in url:
            out.add("url", "url_chars", url)
        if checks.URL_HEAD.match(url) is None:
            scheme = checks.HTTP_SCHEME.match(url) is not None
            out.add("url", "url_host" if scheme else "url_scheme", url)

    _check_checked_at(out, f["checked_at"], now)

    status = f["status_code"]
    if _present(status):
        if type(status) is not int:
            out.add("status_code", "type", status)
        if type(status) in (int, float):
            _number(out, "status_code", status, 100, 599)
    timing = f["response_time_ms"]
    if _present(timing):
        if type(timing) not in (int, float):
            out.add("response_time_ms", "type", timing)
        else:
            _number(out, "response_time_ms", timing, 0.0, 86_400_000.0)
    error = f["error"]
    if _present(error):
        if type(error) is not str:
            out.add("error", "type", error)
        elif not error.strip():
            out.add("error", "empty", error)
    if not _present(status) and not _present(error):
        out.add(None, "status_or_error")
    if _present(status) and not _present(timing) and not _present(error):
        out.add("response_time_ms", "required")
    if _present(f["regex_pattern"]) and type(f["regex_pattern"]) is not str:
        out.add("regex_pattern", "type", f["regex_pattern"])
    if _present(f["regex_matched"]) and type(f["regex_matched"]) is not bool:
        out.add("regex_matched", "type", f["regex_matched"])


def _number(out: Outcome, name: str, value: float, low: float, high: float) -> None:
    x = float(value)
    if not math.isfinite(x):
        out.add(name, "not_finite", value)
    elif not low <= x <= high:
        out.add(name, "range", value)


def _check_checked_at(out: Outcome, value: Any, now: datetime) -> None:
    hi = int(now.timestamp() * 1_000_000) + DAY_US
    if not _present(value):
        out.add("checked_at", "required", value)
        return
    if type(value) in (int, float):
        x = float(value)
        if not math.isfinite(x):
            out.add("checked_at", "not_finite", value)
            return
        us = x * 1e6 if abs(x) < 1e11 else x * 1e3
        if not CHECKED_AT_MIN_US <= us <= hi:
            out.add("checked_at", "timestamp_range", value)
        return
    if type(value) is not str:
        out.add("checked_at", "type", value)
        return
    us = _iso_us(value)
    if us is None:
        zoned = value.endswith(("Z", "z", "+00:00")) or checks.ZONE.search(value) is not None
        year = YEAR.match(value)
        if not zoned and checks.NAIVE_ISO.fullmatch(value):
            out.add("checked_at", "timezone", value)
        elif zoned and year and not (len(year[1].lstrip("+-")) <= 5 and 2000 <= int(year[1]) <= 9999):
            out.add("checked_at", "timestamp_range", value)  # a year no timestamp can hold
        else:
            out.add("checked_at", "timestamp_format", value)
    elif not CHECKED_AT_MIN_US <= us <= hi:
        out.add("checked_at", "timestamp_range", value)


def _iso_us(text: str) -> int | None:
    """The tests' ISO-8601 forms with a zone -> UTC epoch microseconds (None: not one of them).

    ISO 8601's zone designator is an upper-case ``Z``: a lower-case one (RFC 3339 allows it) is read
    as a zone but refused as a format, as pandas' ISO-8601 parser refuses it; so is a decimal comma
    before the fraction of a second."""
    m = ISO.fullmatch(text)
    if m is None:
        return None
    year, month, day, hour, minute, second, fraction, z, sign, zh, zm = m.groups()
    try:
        stamp = datetime(int(year), int(month), int(day), int(hour), int(minute or 0), int(second or 0))
    except ValueError:
        return None
    micros = int((fraction or "0")[:6].ljust(6, "0"))
    offset = 0 if z else (1 if sign == "+" else -1) * (int(zh) * 60 + int(zm or 0))
    epoch = int((stamp - datetime(1970, 1, 1)).total_seconds()) * 1_000_000 + micros
    return epoch - offset * 60_000_000


def _row(f: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    def plain(v: Any) -> Any:
        return None if v is _ABSENT else v

    checked = f["checked_at"]
    if type(checked) is str:
        us = _iso_us(checked)
    else:
        x = float(checked)
        us = round(x * 1e6 if abs(x) < 1e11 else x * 1e3)
    timing = f["response_time_ms"]
    return {
        "url": f["url"],
        "status_code": plain(f["status_code"]),
        "response_time_ms": None if not _present(timing) else float(timing),
        "regex_pattern": plain(f["regex_pattern"]),
        "regex_matched": plain(f["regex_matched"]),
        "checked_at_us": us,
        "error": plain(f["error"]),
        "extra": extra or None,
    }


def _holds_non_finite(value: Any) -> bool:
    if type(value) is float:
        return not math.isfinite(value)
    if type(value) is dict:
        return any(_holds_non_finite(v) for v in value.values())
    if type(value) is list:
        return any(_holds_non_finite(v) for v in value)
    return False


def _holds_nul(value: Any) -> bool:
    if type(value) is str:
        return "\x00" in value
    if type(value) is dict:
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if type(value) is list:
        return any(_holds_nul(v) for v in value)
    return False
