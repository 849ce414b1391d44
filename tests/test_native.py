"""etl.native, the C loops, gives what the Python loops give: the same COPY bytes from the same
columns, the same records from the same batch bytes, and for bytes that are not a well-formed batch
no records of its own (the Python reader then raises as before)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka.errors import CorruptRecordError
from kafka.record.default_records import DefaultRecordBatch
from msgspec import UNSET

from etl import typed
from etl.checks import iso_to_us
from etl.contract import RawMessage
from etl.db import copy
from etl.kafka import fast_records
from etl.kafka.records import read_records_in_python
from etl.normalise import kafka_times, kafka_times_of_ms
from tests.test_records import HEADER, TS, build

try:
    from etl import native
except ImportError:  # pragma: no cover - the message says what to do
    pytest.fail(
        "etl.native was not built: install a C compiler (apt-get install gcc python3-dev) and run "
        "`make venv` again (the package still works without it, more slowly)",
        pytrace=False,
    )


def test_the_job_uses_the_c_loops_where_they_were_built() -> None:
    assert copy.native is native
    assert fast_records.native is native


# -- encode_rows -------------------------------------------------------------------------------------


@st.composite
def columns(draw: st.DrawFn) -> list[tuple[np.ndarray, np.ndarray]]:
    """Columns as the codecs make them: fixed-width matrices and text blobs, with NULLs or without,
    one length throughout (a topic) or many."""
    n = draw(st.integers(0, 40))
    out = []
    for _ in range(draw(st.integers(1, 6))):
        missing = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
        if draw(st.booleans()):
            width = draw(st.sampled_from([1, 2, 4, 8]))
            data = np.frombuffer(draw(st.binary(min_size=n * width, max_size=n * width)), dtype=np.uint8)
            lengths = np.where(missing, -1, width).astype(np.int64)
            out.append((lengths, data.reshape(n, width)))
        else:
            texts = draw(st.lists(st.binary(max_size=12), min_size=n, max_size=n))
            if draw(st.booleans()) and n:
                texts = [texts[0]] * n
            sizes = [-1 if m else len(t) for m, t in zip(missing, texts, strict=True)]
            lengths = np.array(sizes, dtype=np.int64)
            blob = b"".join(t for m, t in zip(missing, texts, strict=True) if not m)
            out.append((lengths, np.frombuffer(blob, dtype=np.uint8)))
    return out


@settings(max_examples=300, deadline=None)
@given(columns())
def test_encode_rows_gives_the_bytes_numpy_gives(cols: list[tuple[np.ndarray, np.ndarray]]) -> None:
    assert native.encode_rows(cols) == copy.encode_rows_numpy(cols)


def test_encode_rows_of_a_frame_is_the_body_postgresql_reads() -> None:
    """A row as the binary format lays it out: field count, then each field's length and bytes."""
    ints = (np.array([8, -1], dtype=np.int64), np.arange(16, dtype=np.uint8).reshape(2, 8))
    texts = (np.array([2, 0], dtype=np.int64), np.frombuffer(b"ab", dtype=np.uint8))
    assert native.encode_rows([ints, texts]) == (
        b"\x00\x02" + b"\x00\x00\x00\x08" + bytes(range(8)) + b"\x00\x00\x00\x02ab"
        b"\x00\x02" + b"\xff\xff\xff\xff" + b"\x00\x00\x00\x00"
    )


@pytest.mark.parametrize(
    ("cols", "message"),
    [
        ([(np.array([3], dtype=np.int64), np.frombuffer(b"ab", dtype=np.uint8))], "add up to 3 bytes"),
        ([(np.array([4], dtype=np.int64), np.zeros((1, 8), dtype=np.uint8))], "does not fit"),
        ([(np.array([-2], dtype=np.int64), np.zeros(0, dtype=np.uint8))], "does not fit"),
        (
            [
                (np.array([1, 1], dtype=np.int64), np.zeros(2, dtype=np.uint8)),
                (np.array([1], dtype=np.int64), np.zeros(1, dtype=np.uint8)),
            ],
            "another number of rows",
        ),
    ],
)
def test_encode_rows_refuses_lengths_its_data_does_not_hold(cols: list, message: str) -> None:
    """Never a read past a column's bytes: a mismatch is an error, not a body."""
    with pytest.raises(ValueError, match=message):
        native.encode_rows(cols)


def test_encode_rows_refuses_lengths_of_another_type() -> None:
    with pytest.raises(TypeError, match="int64"):
        native.encode_rows([(np.array([1], dtype=np.int32), np.zeros(1, dtype=np.uint8))])


# -- read_records ------------------------------------------------------------------------------------

headers = st.lists(st.tuples(st.text(max_size=8), st.none() | st.binary(max_size=8)), max_size=3)
records = st.lists(
    st.tuples(
        st.integers(0, 3),  # the gap to the offset before
        st.none() | st.integers(-(2**40), 2**40),  # the timestamp's distance from the first
        st.none() | st.binary(max_size=200),  # keys and values past 63 bytes have two-byte lengths
        st.none() | st.binary(max_size=300),
        headers,
    ),
    max_size=25,
)


def batch_of(recs: list, base_offset: int, log_append: bool) -> bytes:
    offset, out = 0, []
    for gap, delta, key, value, hdrs in recs:
        offset += gap
        out.append((offset, None if delta is None else TS + delta, key, value, hdrs))
        offset += 1
    return build(out, base_offset=base_offset, log_append=log_append)


def both(data: bytes, pos: int = HEADER) -> tuple[object, object]:
    """What the C reader and the Python reader make of ``data``'s records (an error as its type)."""
    batch = DefaultRecordBatch(data)
    log_append = batch.max_timestamp if batch.timestamp_type == batch.LOG_APPEND_TIME else None
    args = (data, pos, batch.records_count, "t", 3, batch.base_offset, batch.first_timestamp, log_append)
    in_c = native.read_records(*args, RawMessage)
    try:
        python: object = read_records_in_python(*args)
    except CorruptRecordError:
        python = CorruptRecordError
    return in_c, python


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records, st.integers(0, 2**40), st.booleans())
def test_records_read_in_c_are_those_read_in_python(recs: list, base_offset: int, log_append: bool) -> None:
    in_c, python = both(batch_of(recs, base_offset, log_append))
    assert in_c == python
    assert all(type(m) is RawMessage for m in in_c[0])  # type: ignore[index]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records, st.data())
def test_broken_bytes_are_left_to_the_python_reader(recs: list, data: st.DataObject) -> None:
    """A byte changed or the batch cut short: C reads the same records as Python, or none (None),
    and never any where Python finds the bytes malformed."""
    raw = bytearray(batch_of(recs, 0, False))
    if len(raw) > HEADER and data.draw(st.booleans()):
        at = data.draw(st.integers(HEADER, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    else:
        del raw[data.draw(st.integers(HEADER, len(raw))) :]
    in_c, python = both(bytes(raw))
    assert in_c is None or in_c == python
    if python is CorruptRecordError:
        assert in_c is None


def test_a_record_count_beyond_the_bytes_reads_nothing() -> None:
    data = batch_of([(0, 0, None, b"{}", [])], 0, False)
    assert native.read_records(data, HEADER, 2, "t", 3, 0, TS, None, RawMessage) is None
    assert native.read_records(data, len(data) + 1, 0, "t", 3, 0, TS, None, RawMessage) is None


# -- plain -------------------------------------------------------------------------------------------

FIELDS = ("url", "checked_at", "status_code", "response_time_ms", "regex_pattern", "regex_matched", "error")
ISO = st.builds(
    "{:04d}-{:02d}-{:02d}T{:02d}:{:02d}:{:02d}{}{}".format,
    st.integers(1990, 2040),
    st.integers(0, 13),
    st.integers(0, 32),
    st.integers(0, 24),
    st.integers(0, 60),
    st.integers(0, 60),
    st.sampled_from(["", ".", ".5", ".123456", ".1234567", ".000001"]),
    st.sampled_from(["Z", "+00:00", "z", "+01:00", "", "Z "]),
)
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.integers(-5, 700),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, -0.0, 12.5, 1e300, 1764331200.5, 1_764_331_200_000]),
    st.text(max_size=10),
    st.sampled_from(["https://a.example/x", "timeout", "é\u2028", "a\\b", 'q"q', "nul\x00"]),
    ISO,
    st.lists(st.integers(), max_size=2),
)

PRINTABLE = st.text(st.characters(min_codepoint=0x20, exclude_characters='"\\'), max_size=10)
TEXTS = st.one_of(
    PRINTABLE,
    PRINTABLE,
    PRINTABLE,
    st.text(max_size=10),
    st.sampled_from(["é\u2028", "a\\b", 'q"q', "nul\x00", "  "]),
)
NUMBERS = st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
TYPED = {
    "url": st.sampled_from(["https://a.example/x", "http://b.example"]) | TEXTS,
    "checked_at": ISO | NUMBERS | st.sampled_from([1764331200, 1764331200.25, 1_764_331_200_000, -0.0]),
    "status_code": st.one_of(st.integers(-5, 700), st.integers(-5, 700), st.integers(-(2**70), 2**70)),
    "response_time_ms": NUMBERS | st.sampled_from([0, -0, -0.0, 0.1, 12.5, 86_400_000]),
    "regex_pattern": TEXTS,
    "regex_matched": st.booleans(),
    "error": TEXTS,
}


@st.composite
def message_text(draw: st.DrawFn) -> bytes:
    """A JSON object of the contract's fields (and others), written as producers write them."""
    body = {}
    for name in FIELDS:
        how = draw(st.sampled_from(["typed"] * 12 + ["absent", "absent", "null", "any"]))
        if how == "typed":
            body[name] = draw(TYPED[name])
        elif how == "null":
            body[name] = None
        elif how == "any":
            body[name] = draw(VALUES)
    if draw(st.integers(0, 9)) == 0:  # a key it does not know
        body["region"] = draw(VALUES)
    text = json.dumps(
        body,
        ensure_ascii=draw(st.integers(0, 3)) == 0,
        separators=draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,\n", " :\t")])),
    )
    if body and draw(st.integers(0, 7)) == 0:  # a key twice
        key = draw(st.sampled_from(sorted(body)))
        text = text[:-1] + f", {json.dumps(key)}: {json.dumps(body[key])}}}"
    before = draw(st.sampled_from(["", " ", "\n"]))
    after = draw(st.sampled_from(["", "", " ", "\n", "x", "}"]))
    return (before + text + after).encode("utf-8", "surrogatepass")  # a lone surrogate: invalid UTF-8


def same_float(a: float, b: float) -> bool:
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


def plain_rows(payloads: list) -> list[dict | None]:
    """What plain() made of each payload: its values, or None where it left it to msgspec."""
    got = native.plain(payloads)
    cleared = np.frombuffer(got[0], dtype=bool)
    numbers, statuses, timings = (
        np.frombuffer(got[k], dtype=d) for k, d in ((3, "f8"), (4, "i8"), (5, "f8"))
    )
    micros = np.frombuffer(got[9], dtype="i8")
    out: list[dict | None] = []
    for i in range(len(payloads)):
        f = got[6][i]
        out.append(
            None
            if not cleared[i]
            else {
                "url": got[1][i],
                "checked_at": ("us", int(micros[i]))
                if f & 64
                else got[2][i]
                if f & 32
                else ("number", float(numbers[i])),
                "status_code": int(statuses[i]) if f & 1 else None,
                "response_time_ms": float(timings[i]) if f & 2 else None,
                "regex_pattern": got[7][i],
                "regex_matched": bool(f & 8) if f & 4 else None,
                "error": got[8][i] if f & 16 else None,
            }
        )
    return out


def assert_as_msgspec(payload: bytes, row: dict) -> None:
    """A payload plain() parsed is one msgspec decodes to the same values, and one that hides nothing
    from the typed lane's checks: no backslash (no escape), no key twice."""
    assert b"\\" not in payload
    pairs = json.loads(payload, object_pairs_hook=lambda p: p)
    assert len({k for k, _ in pairs}) == len(pairs)
    d = typed.decode_check(payload)
    given = {name: (None if getattr(d, name) is UNSET else getattr(d, name)) for name in FIELDS}
    assert row["url"] == given["url"]
    kind = row["checked_at"]
    if isinstance(kind, tuple) and kind[0] == "us":
        assert kind[1] == int(iso_to_us(np.array([given["checked_at"]], dtype=object))[0])
    elif isinstance(kind, tuple):
        assert not isinstance(given["checked_at"], str)
        assert same_float(kind[1], float(given["checked_at"]))
    else:
        assert kind == given["checked_at"]
    assert row["status_code"] == given["status_code"]
    if row["response_time_ms"] is None:
        assert given["response_time_ms"] is None
    else:
        assert same_float(row["response_time_ms"], float(given["response_time_ms"]))
    for name in ("regex_pattern", "regex_matched", "error"):
        assert row[name] == given[name], name


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(message_text(), min_size=1, max_size=10))
def test_plain_parses_only_what_msgspec_decodes_and_the_same_values(payloads: list[bytes]) -> None:
    for payload, row in zip(payloads, plain_rows(payloads), strict=True):
        if row is not None:
            assert_as_msgspec(payload, row)


@settings(max_examples=300, deadline=None)
@given(ISO)
def test_plain_reads_a_time_as_pandas_reads_it(text: str) -> None:
    payload = json.dumps({"url": "https://a.example", "checked_at": text, "status_code": 200}).encode()
    (row,) = plain_rows([payload])
    assert row is not None  # a string is a string: pandas reads the ones plain() does not
    assert_as_msgspec(payload, row)


@pytest.mark.parametrize(
    "payload",
    [
        b'{"url": "https://a.example/x", "checked_at": "2026-11-28T10:00:00Z", "status_code": 200,'
        b' "response_time_ms": 12.5, "regex_pattern": "ok", "regex_matched": true, "error": null}',
        b'{"url":"https://a.example","checked_at":1764331200,"error":"timeout"}',
        '{"url": "https://\u00e9.example", "checked_at": "2026-11-28T10:00:00.5+00:00", "status_code": 503,'
        ' "response_time_ms": -0}'.encode(),
    ],
)
def test_plain_parses_the_usual_messages(payload: bytes) -> None:
    (row,) = plain_rows([payload])
    assert row is not None
    assert_as_msgspec(payload, row)


@pytest.mark.parametrize(
    "payload",
    [
        b'{"url": "https://a.example", "checked_at": "2026-11-28T10:00:00Z", "url": "https://b.example"}',
        b'{"url": "https:\\/\\/a.example", "checked_at": "2026-11-28T10:00:00Z"}',
        b'{"url": "https://a.example", "checked_at": "2026-11-28T10:00:00Z", "status_code": 200.0}',
        b'{"url": "https://a.example", "checked_at": "2026-11-28T10:00:00Z", "region": "eu"}',
        b'{"url": "https://a.example", "checked_at": "2026-11-28T10:00:00Z"} x',
        b'{"url": "https://a.example"}',
        b'{"url": "\xff", "checked_at": "2026-11-28T10:00:00Z"}',
        b'{"url": null, "checked_at": "2026-11-28T10:00:00Z"}',
        b'{"url": "https://a.example", "checked_at": "2026-11-28T10:00:00Z",'
        b' "status_code": 1234567890123456789}',
        b'{"url": "https://a.example", "checked_at": NaN}',
        b"[]",
        b"",
    ],
)
def test_plain_leaves_the_rest_to_msgspec(payload: bytes) -> None:
    """A key twice, an escape, a float status, an unknown key, trailing text, a missing field,
    invalid UTF-8, a null url, a status beyond 18 digits, NaN, not an object: not parsed here."""
    assert plain_rows([payload, None]) == [None, None]


# -- fields ------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["t", "u"]),
            st.integers(0, 2**31 - 1),
            st.integers(0, 2**63 - 1),
            st.none() | st.integers(-(2**63), 2**63 - 1) | st.integers(2**63, 2**70) | st.just(1.5),
        ),
        max_size=20,
    )
)
def test_fields_are_the_columns_python_reads(rows: list) -> None:
    """Partitions, offsets, the shared topic and the timestamps as etl.typed's good frame takes them;
    a timestamp that is neither None nor an int64 says so (the Python reading takes over)."""
    messages = [RawMessage(t, p, o, ts, None, b"{}") for t, p, o, ts in rows]
    parts, offsets, stamps, topic, odd = native.fields(messages)
    assert np.frombuffer(parts, dtype=np.int64).tolist() == [m.partition for m in messages]
    assert np.frombuffer(offsets, dtype=np.int64).tolist() == [m.offset for m in messages]
    assert topic == (messages[0].topic if len({m.topic for m in messages}) == 1 else None)
    stamps_given = [m.timestamp_ms for m in messages]
    usual = all(ts is None or (type(ts) is int and ts < 2**63) for ts in stamps_given)
    assert odd is not usual
    if usual:
        got = kafka_times_of_ms(np.frombuffer(stamps, dtype=np.int64))
        pd.testing.assert_series_equal(got, kafka_times(stamps_given))
