"""Raw Kafka messages -> one DataFrame row per message (pure: no I/O).

:func:`normalise` decodes each value as UTF-8, parses it with orjson and splits the object into the
contract fields and ``extra``. Undecodable bytes, text that is not a JSON object, ``NaN``/``Infinity``
and nesting beyond orjson's limit are recorded as data (``errors`` and ``stage``), never raised.
:func:`etl.validate.validate` then checks the fields, duplicate keys and nesting depth for the whole
batch at once, and splits good rows from rejects.

Columns of the returned frame, one row per message in input order:

``topic`` (str), ``partition``, ``offset`` (int64), ``kafka_timestamp`` (datetime64[us, UTC], NaT when
absent or outside years 1-9999), ``key`` (bytes or None), ``headers`` (JSON text, see below, or None
when there are none), ``payload`` (the value, byte for byte, or None for a tombstone), ``payload_text``
(the value decoded as UTF-8, or None when it is not UTF-8), the contract fields ``url``,
``status_code``, ``response_time_ms``, ``regex_pattern``, ``regex_matched``, ``checked_at``, ``error``
as parsed Python values (:data:`MISSING` when the key is absent, ``None`` for JSON null), ``extra``
(dict of the unknown top-level keys, or None), ``errors`` (the ``{"field", "rule", "value"}`` found
while decoding and parsing: a list, or one shared empty tuple when there are none), ``stage``
(``"decode"``, ``"json"`` or None) and ``parsed`` (bool: the value is a JSON object, so its fields can
be checked).

Headers are stored as a JSON array of ``[name, value]`` pairs in Kafka order. A value that is UTF-8
text without NUL characters is a JSON string; a header without a value is ``null``; any other value
is base64 and the pair gets a third element: ``[name, "AAEC", "base64"]``. Nothing is lost and the
common case stays readable.
"""

from __future__ import annotations

import base64
import gc
import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Final

import orjson

from etl.contract import FIELDS, RawMessage

if TYPE_CHECKING:  # imported where used: a run with nothing to read never needs them (0.2 s of CPU)
    import numpy as np
    import pandas as pd

MAX_DEPTH: Final = 64  # nesting levels (the object itself is level 1); orjson stops at 1024 anyway
VALUE_CHARS: Final = 100  # error values are cut to this many characters

_FIELD_SET = frozenset(FIELDS)
_ALL_FIELDS = itemgetter(*FIELDS)
# Kafka timestamps outside years 1-9999 cannot become a Python datetime (the to_sql path): NaT.
_MIN_MS = -62_135_596_800_000
_MAX_MS = 253_402_300_799_999


class _Missing:
    """The type of :data:`MISSING`."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False

    def __reduce__(self) -> str:
        return "MISSING"  # pickles as the module-level singleton


MISSING: Final = _Missing()
"""Marks a contract field whose key is absent (JSON ``null`` is ``None``)."""

_ABSENT_FIELDS: Final = (MISSING,) * len(FIELDS)


def show(value: Any, limit: int = VALUE_CHARS) -> str | None:
    """A short readable rendering of a value for an error entry: JSON where possible, cut to ``limit``.

    ``MISSING`` renders as None (there is no value); JSON null renders as ``"null"``.
    """
    if value is MISSING:
        return None
    if type(value) is float and not math.isfinite(value):
        text = "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
    elif type(value) is str and len(value) > limit:
        text = _dumps_text(value[:limit]) + "…"
    else:
        text = _dumps_text(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _dumps_text(value: Any) -> str:
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    except (TypeError, orjson.JSONEncodeError):
        # lone surrogates, bytes, huge ints: ascii() is always encodable
        return ascii(value)


def error(field: str | None, rule: str, value: Any = MISSING) -> dict[str, Any]:
    """One error entry for an offending value: ``{"field", "rule", "value": show(value)}``."""
    return {"field": _storable(field), "rule": rule, "value": show(value)}


def problem(field: str | None, rule: str, description: str) -> dict[str, Any]:
    """One error entry whose value describes the problem in words (no value to show)."""
    if len(description) > VALUE_CHARS:
        description = description[:VALUE_CHARS] + "…"
    return {"field": _storable(field), "rule": rule, "value": description}


def _storable(name: str | None) -> str | None:
    """A field name as valid UTF-8: a key read leniently may hold a lone surrogate."""
    if name is None:
        return None
    try:
        name.encode()
    except UnicodeEncodeError:
        return name.encode("utf-8", "backslashreplace").decode()
    return name


def normalise(messages: Sequence[RawMessage]) -> pd.DataFrame:
    """One row per message, in input order (see the module docstring for the columns)."""
    with paused_gc():
        return _normalise(messages)


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many containers.

    The batch creates a few objects per message that stay alive; CPython's collector would walk
    them again and again as they accumulate, which doubles the cost of a batch. Nothing here makes
    reference cycles, so pausing it is safe; the previous state is restored.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _normalise(messages: Sequence[RawMessage]) -> pd.DataFrame:
    import numpy as np
    import pandas as pd

    n = len(messages)
    # one comprehension per attribute: cheaper than building and transposing a tuple per message
    payloads = [m.value for m in messages]
    rows = _Rows(n)
    for start in range(0, n, _CHUNK):
        rows.parse(payloads, start, min(n, start + _CHUNK))

    columns: dict[str, Any] = {
        "topic": objects([m.topic for m in messages]),
        "partition": np.array([m.partition for m in messages], dtype=np.int64),
        "offset": np.array([m.offset for m in messages], dtype=np.int64),
        "kafka_timestamp": kafka_times([m.timestamp_ms for m in messages]),
        "key": objects([m.key for m in messages]),
        "headers": objects([headers_json(m.headers) if m.headers else None for m in messages]),
        "payload": objects(payloads),
        "payload_text": objects(rows.texts),
    }
    by_field = zip(*rows.fields, strict=True) if n else ((),) * len(FIELDS)
    for name, column in zip(FIELDS, by_field, strict=True):
        columns[name] = objects(column)
    columns["extra"] = objects(rows.extras)
    columns["errors"] = objects(rows.errors)
    columns["stage"] = objects(rows.stages)
    columns["parsed"] = np.array(rows.parsed, dtype=bool)
    return pd.DataFrame(columns, copy=False)


_CHUNK: Final = 128  # messages parsed by one pass of C-level maps
_FAILED: Final = object()  # stands for a message a map failed on; every later map fails on it too
_NO_OBJECT: Final[dict[str, Any]] = {}
_NO_ERRORS: Final[tuple[dict[str, Any], ...]] = ()
_PARSE_ERRORS: Final = (TypeError, ValueError, KeyError)  # UnicodeDecodeError, JSONDecodeError: ValueError


def map_marking(func: Any, items: list[Any], failed: list[int]) -> list[Any]:
    """``list(map(func, items))``, but an item ``func`` raises on gives :data:`_FAILED` and its index
    goes into ``failed``.

    The map runs at C speed: ``list.extend`` keeps what it got before ``func`` raised, the shared
    iterator has moved past the faulty item, and the map resumes after it. A fault costs one
    exception, not a slower path for its neighbours.
    """
    out: list[Any] = []
    extend, mark = out.extend, out.append
    it = iter(items)
    while True:
        try:
            extend(map(func, it))
            return out
        except _PARSE_ERRORS:
            failed.append(len(out))
            mark(_FAILED)


class _Rows:
    """Per-message results, filled chunk by chunk."""

    def __init__(self, n: int) -> None:
        self.texts: list[str | None] = [None] * n
        self.fields: list[tuple[Any, ...]] = [_ABSENT_FIELDS] * n
        self.extras: list[dict[str, Any] | None] = [None] * n
        # A message without errors shares one empty tuple: a list each would be 56 bytes a message.
        self.errors: list[Sequence[dict[str, Any]]] = [_NO_ERRORS] * n
        self.stages: list[str | None] = [None] * n
        self.parsed = [False] * n

    def parse(self, payloads: list[Any], start: int, end: int) -> None:
        """Parse a chunk with C-level maps; the messages a map fails on are parsed again one by one.

        A Python loop costs about as much per message as orjson itself, so the usual message, UTF-8
        text of a JSON object holding every contract field, never meets one.
        """
        ignored: list[int] = []
        texts = map_marking(bytes.decode, payloads[start:end], ignored)  # TypeError: None, not bytes
        objs = map_marking(orjson.loads, texts, ignored)
        failed: list[int] = []  # KeyError: a field missing; TypeError: not an object, or failed before
        fields = map_marking(_ALL_FIELDS, objs, failed)
        parsed = [True] * (end - start)
        for i in failed:
            texts[i], fields[i], objs[i], parsed[i] = None, _ABSENT_FIELDS, _NO_OBJECT, False
        self.texts[start:end] = texts
        self.fields[start:end] = fields
        self.parsed[start:end] = parsed
        if max(map(len, objs)) > len(FIELDS):
            for i, obj in enumerate(objs, start):
                if len(obj) > len(FIELDS):
                    self.extras[i] = {k: v for k, v in obj.items() if k not in _FIELD_SET}
        if failed:
            self.parse_each(payloads, [start + i for i in failed])

    def parse_each(self, payloads: list[Any], where: list[int]) -> None:
        """Parse the messages at ``where`` one by one, recording every decode and JSON failure."""
        loads = orjson.loads
        errors, stages = self.errors, self.stages
        for i in where:
            found: list[dict[str, Any]] = []
            errors[i] = found
            value = payloads[i]
            if type(value) is not bytes:
                if value is None:
                    found.append(error(None, "tombstone"))
                    stages[i] = "decode"
                    continue
                value = payloads[i] = _as_bytes(value)
            try:
                text = self.texts[i] = value.decode()
            except UnicodeDecodeError as exc:
                found.append(problem(None, "invalid_utf8", _utf8_problem(value, exc)))
                stages[i] = "decode"
                continue
            try:
                obj = loads(text)
            except orjson.JSONDecodeError as exc:
                obj = _json_failure(text, exc, found)
                stages[i] = "json"
                if obj is None:
                    continue
            if type(obj) is not dict:
                found.append(error(None, "not_object", obj))
                stages[i] = "json"
                continue
            self.parsed[i] = True
            try:
                self.fields[i] = _ALL_FIELDS(obj)
            except KeyError:  # some contract fields absent
                get = obj.get
                self.fields[i] = tuple([get(f, MISSING) for f in FIELDS])
                if not obj.keys() <= _FIELD_SET:
                    self.extras[i] = {k: v for k, v in obj.items() if k not in _FIELD_SET}
            else:
                if len(obj) != len(FIELDS):
                    self.extras[i] = {k: v for k, v in obj.items() if k not in _FIELD_SET}


def headers_json(headers: Sequence[tuple[str, bytes | None]]) -> str:
    """Kafka headers as JSON text: ``[[name, text-or-null], [name, base64, "base64"], ...]``."""
    out: list[list[Any]] = []
    for name, raw in headers:
        label = name if type(name) is str else show(name)
        if raw is None:
            out.append([label, None])
            continue
        data = raw if type(raw) is bytes else _as_bytes(raw)
        try:
            text = data.decode()
        except UnicodeDecodeError:
            text = None
        if text is not None and "\x00" not in text:
            out.append([label, text])
        else:  # not text, or text PostgreSQL JSONB cannot hold: keep the exact bytes
            out.append([label, base64.b64encode(data).decode("ascii"), "base64"])
    return orjson.dumps(out).decode()


def _as_bytes(value: Any) -> bytes:
    """Real bytes from a bytes-like value (bytearray, memoryview) or, defensively, from text."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    return bytes(value)


def objects(values: Sequence[Any]) -> pd.Series:
    """An object column holding the values as they are.

    ``np.fromiter`` keeps lists and tuples as single elements, and the explicit ``object`` dtype
    stops pandas from inferring its ``str`` dtype (which would turn None into NaN).
    """
    import numpy as np
    import pandas as pd

    return pd.Series(np.fromiter(values, dtype=object, count=len(values)), dtype=object, copy=False)


def kafka_times(values: Sequence[int | None]) -> pd.Series:
    """Epoch milliseconds -> datetime64[us, UTC]; None, non-integers and absurd values -> NaT."""
    import numpy as np
    import pandas as pd

    ms = np.array(values)  # int64 for the usual batch, where every record has its timestamp
    if ms.dtype != np.int64:
        numbers = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce")
        ms = numbers.to_numpy(dtype=np.float64, na_value=np.nan)
    return kafka_times_of_ms(ms)


def kafka_times_of_ms(ms: np.ndarray) -> pd.Series:
    """Epoch milliseconds (int64, or float64 with NaN) -> datetime64[us, UTC]; absurd values -> NaT."""
    import numpy as np
    import pandas as pd

    ok = (ms >= _MIN_MS) & (ms <= _MAX_MS)
    us = np.where(ok, ms, 0).astype(np.int64) * 1000
    stamps = us.view("datetime64[us]")
    stamps[~ok] = np.datetime64("NaT")
    return pd.Series(stamps).dt.tz_localize("UTC")


def _utf8_problem(value: bytes, exc: UnicodeDecodeError) -> str:
    bad = value[exc.start : exc.end][:8].hex(" ")
    return f"{exc.reason} at byte {exc.start}: {bad}"


def _json_failure(text: str, exc: orjson.JSONDecodeError, errors: list[dict[str, Any]]) -> Any:
    """Classify text orjson refused; returns a dict when the only problem is NaN/Infinity.

    NaN, Infinity and overflowing numbers are not JSON, but the rest of such an object is readable,
    so it is parsed leniently to name the fields that hold them and to check the other fields.
    """
    reason = str(exc)
    if not text.strip():
        errors.append(error(None, "empty"))
        return None
    if "depth" in reason or "recursion" in reason:
        errors.append(problem(None, "too_deep", f"nested more than {MAX_DEPTH} levels"))
        return None
    if any(word in text for word in ("NaN", "Infinity")) or "infinity" in reason:
        obj = _lenient(text)
        if type(obj) is dict:
            bad = [k for k, v in obj.items() if _has_non_finite(v)]
            if bad:
                errors.extend(error(k, "not_finite", obj[k]) for k in bad)
                return obj
    errors.append(problem(None, "invalid_json", reason))
    return None


def _lenient(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _has_non_finite(value: Any) -> bool:
    stack = [value]
    while stack:
        node = stack.pop()
        kind = type(node)
        if kind is float and not math.isfinite(node):
            return True
        if kind is dict:
            stack.extend(node.values())
        elif kind is list:
            stack.extend(node)
    return False
