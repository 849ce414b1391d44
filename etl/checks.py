"""The value checks validation's rules are made of (pure): URL heads, time zones and ISO times,
numbers, NUL escapes, JSON structure. Each works on a whole column where that pays (numpy ufuncs,
one scan of the values joined) and says nothing of rules or rows: :mod:`etl.validate` does.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from operator import methodcaller
from typing import Any, Final

import numpy as np
import orjson
import pandas as pd

from etl.contract import FIELDS
from etl.normalise import MAX_DEPTH, MISSING, problem

str_len = np.frompyfunc(len, 1, 1)
count_quotes = methodcaller("count", b'"')
NUL_ESCAPE: Final = b"\\u0000"
strip_text = np.frompyfunc(str.strip, 1, 1)
printable = np.frompyfunc(str.isprintable, 1, 1)
has_space = np.frompyfunc(methodcaller("__contains__", " "), 1, 1)
HTTP_SCHEME = re.compile(r"(?i:https?)://")
# scheme, optional user info, host (a name or an [IPv6] literal), optional port, then the path
URL_HEAD = re.compile(
    r"(?i:https?)://(?:[^/?#@]*@)?(?:\[[0-9A-Fa-f:.]+\]|[^/?#@:\[\]]+)(?::[0-9]*)?(?=[/?#]|\Z)"
)
# a zone after a time: only checked for strings that do not simply end in Z or +00:00
ZONE = re.compile(r"[Tt ]\d\d(?::?\d\d(?::?\d\d(?:[.,]\d+)?)?)?(?:[Zz]|[+-]\d\d(?::?\d\d)?)\Z")
ends_utc = methodcaller("endswith", ("Z", "z", "+00:00"))
NAIVE_ISO = re.compile(r"[+-]?\d{4,}-\d\d-\d\d(?:[Tt ]\d\d(?::?\d\d(?::?\d\d(?:[.,]\d+)?)?)?)?")
BIG_NUMBER = re.compile(rb"\d[eE]\+?(?:1[89]|[2-9]\d|\d{3,})")  # a float of 1e18 or more
URL_GROUP: Final = 64
YEAR = re.compile(r"\s*([+-]?\d+)-")


def url_head_ok(urls: np.ndarray) -> np.ndarray:
    """Scheme http(s), a host and an optional numeric port, for each URL.

    Groups of plain URLs are cleared by a few scans of the group joined (see :func:`all_plain`);
    the URLs of any other group go through the regex one by one.
    """
    ok = np.zeros(len(urls), dtype=bool)
    for start in range(0, len(urls), URL_GROUP):
        group = urls[start : start + URL_GROUP]
        if all_plain(group):
            ok[start : start + URL_GROUP] = True
        else:
            ok[start : start + URL_GROUP] = [URL_HEAD.match(u) is not None for u in group]
    return ok


def all_plain(urls: np.ndarray) -> bool:
    """True when every URL has the simplest valid head, so ``URL_HEAD`` matches each of them.

    Each starts with a lower-case ``http(s)://``, holds no other ``:`` and no ``@ [ ]`` (so no
    port, user info or IPv6 literal), and no ``://`` is followed by ``/ ? #`` or the end (an
    empty host). A newline inside a URL would confuse the count, so it disqualifies the group.
    """
    joined = "\n" + "\n".join(urls) + "\n"
    n = len(urls)
    return (
        joined.count("\n") == n + 1
        and joined.count("\nhttps://") + joined.count("\nhttp://") == n
        and joined.count(":") == n
        and not any(c in joined for c in "@[]")
        and not any(empty_host in joined for empty_host in (":///", "://?", "://#", "://\n"))
    )


def iso_to_us(texts: np.ndarray) -> np.ndarray:
    """ISO-8601 strings (with a zone) -> UTC epoch microseconds; unparseable -> the NaT integer."""
    if not len(texts):
        return np.empty(0, dtype=np.int64)
    stamps = pd.to_datetime(pd.Series(texts, dtype=object), format="ISO8601", utc=True, errors="coerce")
    return np.asarray(stamps.dt.as_unit("us").array.asi8)


def floats(values: np.ndarray) -> np.ndarray:
    """Python ints and floats as float64; ints too large for a double become infinity."""
    try:
        return values.astype(np.float64)
    except OverflowError:  # only from a lenient parse of a huge integer literal
        return np.array([float_or_inf(v) for v in values], dtype=np.float64)


def float_or_inf(value: Any) -> float:
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def absurd_year(text: str) -> bool:
    """True for an ISO-like timestamp whose year pandas cannot hold (year 0, 10000, -1...)."""
    m = YEAR.match(text)
    if m is None:
        return False
    digits = m.group(1).lstrip("+-")
    # int() of thousands of digits raises (and is slow): a year that long is absurd anyway
    return len(digits) > 5 or not 2000 <= int(m.group(1)) <= 9999


def dumps_or_none(value: Any) -> bytes | None:
    try:
        return orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError):
        return None


def exact_extra(text: str) -> str | None:
    """``extra`` as JSON text with integers exact (json keeps big integers; orjson cannot)."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    extra = {k: v for k, v in obj.items() if k not in FIELDS} if type(obj) is dict else {}
    return json.dumps(extra, ensure_ascii=False, separators=(",", ":")) if extra else None


def holds_nul(value: Any) -> bool:
    """True when a NUL character is anywhere in the value (strings, keys, nested containers)."""
    stack = [value]
    while stack:
        node = stack.pop()
        if type(node) is str:
            if "\x00" in node:
                return True
        elif type(node) is dict:
            stack.extend(node.keys())
            stack.extend(node.values())
        elif type(node) is list:
            stack.extend(node)
    return False


def depth(values: list[Any], limit: int) -> int:
    """Nesting depth of a message whose top-level values are ``values`` (the object is level 1)."""
    deepest = 1
    stack = [(v, 2) for v in values if type(v) in (dict, list)]
    while stack:
        node, depth = stack.pop()
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                break
        children = node.values() if type(node) is dict else node
        stack.extend((c, depth + 1) for c in children if type(c) in (dict, list))
    return deepest


def structure_problems(fields: list[Any], extra: dict[str, Any] | None, text: str) -> list[dict[str, Any]]:
    """The exact checks: nesting depth, then duplicate keys at any depth (json with a pairs hook)."""
    values = [v for v in fields if v is not MISSING] + list((extra or {}).values())
    if depth(values, MAX_DEPTH) > MAX_DEPTH:
        return [problem(None, "too_deep", f"nested more than {MAX_DEPTH} levels")]
    duplicates: Counter[str] = Counter()

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(pairs)
        if len(result) != len(pairs):
            counts = Counter(k for k, _ in pairs)
            duplicates.update({k: c for k, c in counts.items() if c > 1})
        return result

    try:
        json.loads(text, object_pairs_hook=pairs_hook)
    except (ValueError, RecursionError) as exc:  # orjson read it; json may refuse (its digits limit)
        return [problem(None, "invalid_json", str(exc))]
    return [problem(k, "duplicate_key", f"{c} times") for k, c in duplicates.items()]


def unique(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Errors without repeats of the same (field, rule), in the order found."""
    seen: set[tuple[Any, str]] = set()
    out = []
    for err in errors:
        key = (err["field"], err["rule"])
        if key not in seen:
            seen.add(key)
            out.append(err)
    return out
