"""etl._native, the C loops, gives what the Python loops give: the same COPY bytes from the same
columns, the same records from the same batch bytes, and for bytes that are not a well-formed batch
no records of its own (the Python reader then raises as before)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka.errors import CorruptRecordError
from kafka.record.default_records import DefaultRecordBatch

from etl.contract import RawMessage
from etl.db import copy
from etl.kafka import fast_records
from tests.test_records import HEADER, TS, build

try:
    from etl import _native
except ImportError:  # pragma: no cover - the message says what to do
    pytest.fail(
        "etl._native was not built: install a C compiler (apt-get install gcc python3-dev) and run "
        "`make venv` again (the package still works without it, more slowly)",
        pytrace=False,
    )


def test_the_job_uses_the_c_loops_where_they_were_built() -> None:
    assert copy._native is _native
    assert fast_records._native is _native


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
    assert _native.encode_rows(cols) == copy.encode_rows_numpy(cols)


def test_encode_rows_of_a_frame_is_the_body_postgresql_reads() -> None:
    """A row as the binary format lays it out: field count, then each field's length and bytes."""
    ints = (np.array([8, -1], dtype=np.int64), np.arange(16, dtype=np.uint8).reshape(2, 8))
    texts = (np.array([2, 0], dtype=np.int64), np.frombuffer(b"ab", dtype=np.uint8))
    assert _native.encode_rows([ints, texts]) == (
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
        _native.encode_rows(cols)


def test_encode_rows_refuses_lengths_of_another_type() -> None:
    with pytest.raises(TypeError, match="int64"):
        _native.encode_rows([(np.array([1], dtype=np.int32), np.zeros(1, dtype=np.uint8))])


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
    native = _native.read_records(*args, RawMessage)
    try:
        python: object = fast_records.read_records_in_python(*args)
    except CorruptRecordError:
        python = CorruptRecordError
    return native, python


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records, st.integers(0, 2**40), st.booleans())
def test_records_read_in_c_are_those_read_in_python(recs: list, base_offset: int, log_append: bool) -> None:
    native, python = both(batch_of(recs, base_offset, log_append))
    assert native == python
    assert all(type(m) is RawMessage for m in native[0])  # type: ignore[index]


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
    native, python = both(bytes(raw))
    assert native is None or native == python
    if python is CorruptRecordError:
        assert native is None


def test_a_record_count_beyond_the_bytes_reads_nothing() -> None:
    data = batch_of([(0, 0, None, b"{}", [])], 0, False)
    assert _native.read_records(data, HEADER, 2, "t", 3, 0, TS, None, RawMessage) is None
    assert _native.read_records(data, len(data) + 1, 0, "t", 3, 0, TS, None, RawMessage) is None
