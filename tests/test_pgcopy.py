"""Binary COPY: the bytes follow PostgreSQL's format, and rows loaded with it equal rows loaded as text."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.dialects.postgresql import JSONB

from etl.contract import METRIC_COLUMNS
from etl.db import copy, schema, text_copy, write

PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)

TYPES = {
    "t": sa.Text(),
    "i2": sa.SmallInteger(),
    "i4": sa.Integer(),
    "i8": sa.BigInteger(),
    "f8": sa.Double(),
    "b": sa.Boolean(),
    "ts": sa.DateTime(timezone=True),
    "j": JSONB(),
}


def read_rows(body: bytes, kinds: list[str]) -> list[tuple[object, ...]]:
    """Decode binary COPY rows the slow, obvious way (a reader independent of the encoder)."""
    rows, at = [], 0
    while at < len(body):
        (count,) = struct.unpack_from(">h", body, at)
        at += 2
        assert count == len(kinds)
        row: list[object] = []
        for kind in kinds:
            (size,) = struct.unpack_from(">i", body, at)
            at += 4
            if size == -1:
                row.append(None)
                continue
            raw = body[at : at + size]
            at += size
            if kind == "t":
                row.append(raw.decode())
            elif kind == "j":
                assert raw[:1] == b"\x01"
                row.append(raw[1:].decode())
            elif kind == "b":
                row.append(raw == b"\x01")
            elif kind == "f8":
                row.append(struct.unpack(">d", raw)[0])
            elif kind == "ts":
                row.append(PG_EPOCH + timedelta(microseconds=struct.unpack(">q", raw)[0]))
            else:
                assert len(raw) == int(kind[1])
                row.append(int.from_bytes(raw, "big", signed=True))
        rows.append(tuple(row))
    return rows


def encode(frame: pd.DataFrame) -> bytes:
    rows_of = copy.encoder(frame, [TYPES[c] for c in frame.columns])
    assert rows_of is not None
    return rows_of(frame)


# -- the bytes, without a database ----------------------------------------------------------------


def test_one_row_is_laid_out_as_postgresql_documents() -> None:
    frame = pd.DataFrame(
        {
            "t": pd.Series(["ab"], dtype=object),
            "i2": pd.Series([7], dtype="Int16"),
            "f8": [math.nan],
            "b": pd.Series([True], dtype="boolean"),
            "ts": pd.to_datetime(["2000-01-01T00:00:01Z"]),
            "j": pd.Series(['{"a":1}'], dtype=object),
        }
    )
    assert encode(frame) == (
        b"\x00\x06"  # six fields
        + b"\x00\x00\x00\x02ab"
        + b"\x00\x00\x00\x02\x00\x07"
        + b"\xff\xff\xff\xff"  # NaN: NULL
        + b"\x00\x00\x00\x01\x01"
        + b"\x00\x00\x00\x08"
        + (1_000_000).to_bytes(8, "big")  # one second after PostgreSQL's epoch
        + b'\x00\x00\x00\x08\x01{"a":1}'  # jsonb: version 1, then the text
    )
    assert copy.HEADER == b"PGCOPY\n\xff\r\n\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    assert copy.TRAILER == b"\xff\xff"


def test_bytea_is_the_bytes_as_they_are_and_none_is_null() -> None:
    frame = pd.DataFrame({"c": pd.Series([b"\x00\xff", None, b"", bytearray(b"\t")], dtype=object)})
    rows_of = copy.encoder(frame, [sa.LargeBinary()])
    assert rows_of is not None
    one = b"\x00\x01"  # one field per row
    assert rows_of(frame) == (
        one
        + b"\x00\x00\x00\x02\x00\xff"
        + one
        + b"\xff\xff\xff\xff"
        + one
        + b"\x00\x00\x00\x00"
        + one
        + b"\x00\x00\x00\x01\t"
    )
    with pytest.raises(TypeError):  # text is not bytes: no exact bytea form
        rows_of(pd.DataFrame({"c": pd.Series(["x"], dtype=object)}))


def test_stream_wraps_the_rows_in_header_and_trailer_and_slices_them() -> None:
    frame = pd.DataFrame({"i4": np.arange(7, dtype=np.int64)})
    pieces = copy.stream(frame, [TYPES["i4"]], rows=3)
    assert pieces is not None
    pieces = list(pieces)
    assert pieces[0] == copy.HEADER and pieces[-1] == copy.TRAILER
    assert len(pieces) == 2 + 3  # 3 + 3 + 1 rows
    assert read_rows(b"".join(pieces[1:-1]), ["i4"]) == [(i,) for i in range(7)]


@pytest.mark.parametrize(
    ("series", "sql_type"),
    [
        (pd.Series([1, 40_000], dtype=np.int64), sa.SmallInteger()),  # out of range: let the server say
        (pd.Series([2**31], dtype=np.int64), sa.Integer()),
        (pd.Series([-(2**15) - 1], dtype="Int32"), sa.SmallInteger()),
        (pd.Series([1], dtype=np.uint64), sa.BigInteger()),
        (pd.Series(["1"], dtype=object), sa.Integer()),
        (pd.Series([1.5], dtype=np.float64), sa.REAL()),
        (pd.Series([1.5], dtype=np.float64), sa.Float(precision=10)),
        (pd.Series(pd.to_datetime(["2026-11-28T10:00:00"])), sa.DateTime(timezone=True)),  # naive
        (pd.Series(["{}"], dtype=object), sa.JSON()),
        (pd.Series([1], dtype=np.int64), sa.LargeBinary()),
        (pd.Series([1], dtype=np.int64), sa.Text()),
    ],
)
def test_columns_without_an_exact_binary_form_leave_the_frame_to_text(series: pd.Series, sql_type) -> None:
    frame = pd.DataFrame({"c": series})
    assert copy.encoder(frame, [sql_type]) is None
    assert copy.stream(frame, [sql_type]) is None


def test_integers_at_the_edges_of_each_width_are_exact() -> None:
    edges = {w: [-(2 ** (8 * w - 1)), -1, 0, 2 ** (8 * w - 1) - 1] for w in (2, 4, 8)}
    frame = pd.DataFrame({f"i{w}": pd.Series(v, dtype=np.int64) for w, v in edges.items()})
    assert read_rows(encode(frame), ["i2", "i4", "i8"]) == list(zip(*edges.values(), strict=True))


def test_times_as_micros_write_the_same_bytes_as_the_times() -> None:
    frame = pd.DataFrame(
        {
            "ts": pd.to_datetime(
                ["2026-11-28T10:00:00.123456Z", None, "1970-01-01T00:00:00Z"], format="ISO8601", utc=True
            ),
            "t": pd.Series(["a", "b", "c"], dtype=object),
        }
    )
    micros = copy.times_as_micros(frame)
    assert micros["ts"].dtype == np.int64
    assert encode(micros) == encode(frame)
    assert read_rows(encode(frame), ["ts", "t"])[1] == (None, "b")
    assert copy.times_as_micros(frame[["t"]]) is not None


def test_a_timestamp_without_zone_takes_the_utc_wall_time() -> None:
    frame = pd.DataFrame({"ts": pd.to_datetime(["2026-11-28T10:00:00+05:00"], utc=True)})
    (row,) = read_rows(encode(frame), ["ts"])
    naive = copy.encoder(frame, [sa.DateTime(timezone=False)])
    assert naive is not None and naive(frame) == encode(frame)
    assert row == (datetime(2026, 11, 28, 5, tzinfo=UTC),)


texts = st.one_of(st.none(), st.text(st.characters(blacklist_categories=("Cs",)), max_size=12))
rows = st.tuples(
    texts,
    st.one_of(st.none(), st.integers(-(2**15), 2**15 - 1)),
    st.integers(-(2**63), 2**63 - 1),
    st.one_of(st.none(), st.floats(allow_nan=False, width=64)),
    st.one_of(st.none(), st.booleans()),
    st.one_of(st.none(), st.datetimes(datetime(1900, 1, 1), datetime(2200, 1, 1), timezones=st.just(UTC))),
    texts,
)


def frame_of(values: list[tuple[Any, ...]]) -> pd.DataFrame:
    """A frame of one column of each kind from ``rows``' tuples (None: missing)."""
    t, i2, i8, f8, b, ts, j = zip(*values, strict=True)
    return pd.DataFrame(
        {
            "t": pd.Series(t, dtype=object),
            "i2": pd.Series(i2, dtype="Int16"),
            "i8": pd.Series(i8, dtype=np.int64),
            "f8": pd.Series([math.nan if v is None else v for v in f8], dtype=np.float64),
            "b": pd.Series(b, dtype="boolean"),
            "ts": pd.Series(pd.to_datetime(list(ts), utc=True)).dt.as_unit("us"),
            "j": pd.Series(j, dtype=object),
        }
    )


@settings(max_examples=200, deadline=None)
@given(st.lists(rows, min_size=1, max_size=30))
def test_any_frame_reads_back_as_its_values(values: list[tuple[object, ...]]) -> None:
    frame = frame_of(values)
    assert read_rows(encode(frame), list(frame.columns)) == values


# Few distinct values: columns of one value or one length throughout a piece, written as one block
few_texts = st.one_of(st.none(), st.sampled_from(["", "a", "bc", "de", "\u00e9", "\U0001f600"]))
few_rows = st.tuples(
    few_texts,
    st.one_of(st.none(), st.sampled_from([-(2**15), 0, 7])),
    st.sampled_from([-(2**63), 0, 2**63 - 1]),
    st.one_of(st.none(), st.sampled_from([-0.0, 1.5])),
    st.one_of(st.none(), st.booleans()),
    st.one_of(st.none(), st.sampled_from([datetime(1999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)])),
    few_texts,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(rows, few_rows), min_size=1, max_size=30), st.integers(1, 8))
def test_a_frame_in_pieces_reads_back_as_its_values(values: list[tuple[Any, ...]], size: int) -> None:
    frame = frame_of(values)
    pieces = copy.stream(frame, [TYPES[c] for c in frame.columns], rows=size)
    assert pieces is not None
    body = list(pieces)
    assert body[0] == copy.HEADER and body[-1] == copy.TRAILER and len(body) == 2 + -(-len(values) // size)
    assert b"".join(body[1:-1]) == encode(frame)
    assert read_rows(b"".join(body[1:-1]), list(frame.columns)) == values


def test_text_with_other_missing_values_than_none_is_null() -> None:
    frame = pd.DataFrame({"t": pd.Series(["x", math.nan, None, pd.NA, "x"], dtype=object)})
    assert read_rows(encode(frame), ["t"]) == [("x",), (None,), (None,), (None,), ("x",)]
    frame = pd.DataFrame({"t": pd.Series(["x", 5, "x"], dtype=object)})  # not text: its str, as text COPY
    assert read_rows(encode(frame), ["t"]) == [("x",), ("5",), ("x",)]
    frame = pd.DataFrame({"t": pd.Series(["x", None, "yz"], dtype="str")})  # pandas' string dtype
    assert read_rows(encode(frame), ["t"]) == [("x",), (None,), ("yz",)]


# -- through PostgreSQL ---------------------------------------------------------------------------


@pytest.fixture
def two_tables(stack, pg_schema: str) -> Iterator[tuple[sa.Engine, schema.Tables, sa.Table]]:
    """The job's tables, whose metrics table is loaded with binary COPY, and a copy of it for text COPY."""
    engine = sa.create_engine(stack.app_db_url(), poolclass=sa.NullPool)
    tables = schema.build_tables(pg_schema)
    text = schema.build_tables(pg_schema, metrics="text_metrics").metrics
    with engine.begin() as conn:
        schema.create_all(conn, tables)
        text.create(conn)
        conn.exec_driver_sql(
            f'CREATE TABLE "{pg_schema}".text_metrics_all PARTITION OF "{pg_schema}".text_metrics DEFAULT'
        )
    yield engine, tables, text
    engine.dispose()


def metrics_frame(values: list[tuple[object, ...]]) -> pd.DataFrame:
    url, status, took, matched, checked, extra, kafka_ts = zip(*values, strict=True)
    n = len(values)
    return pd.DataFrame(
        {
            "url": pd.Series(url, dtype=object),
            "status_code": pd.Series(status, dtype="Int16"),
            "response_time_ms": pd.Series([math.nan if v is None else v for v in took], dtype=np.float64),
            "regex_pattern": pd.Series(url, dtype=object),
            "regex_matched": pd.Series(matched, dtype="boolean"),
            "checked_at": pd.Series(pd.to_datetime(list(checked), utc=True)).dt.as_unit("us"),
            "error": pd.Series([None] * n, dtype=object),
            "extra": pd.Series(extra, dtype=object),
            "topic": pd.Series(["t"] * n, dtype=object),
            "partition": np.zeros(n, dtype=np.int64),
            "offset": np.arange(n, dtype=np.int64),
            "kafka_timestamp": pd.Series(pd.to_datetime(list(kafka_ts), utc=True)).dt.as_unit("us"),
            "run_id": pd.Series(["r"] * n, dtype="str"),
        }
    )


def copy_both(engine: sa.Engine, binary: sa.Table, text: sa.Table, frame: pd.DataFrame) -> tuple[list, list]:
    with engine.begin() as conn:
        for table in (binary, text):
            conn.execute(table.delete())
        copy.to_sql(conn, binary, frame)
        copy.copy_frame(conn, text, text_copy.times_as_text(frame))
        read = [
            list(conn.execute(sa.select(*(t.c[c] for c in METRIC_COLUMNS)).order_by(t.c.offset)))
            for t in (binary, text)
        ]
    return read[0], read[1]


stored_texts = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=20
)
json_values = st.one_of(
    st.integers(-(2**70), 2**70), stored_texts, st.floats(allow_nan=False, allow_infinity=False)
)
json_texts = st.one_of(st.none(), st.dictionaries(stored_texts, json_values, max_size=3).map(json.dumps))
times = st.datetimes(datetime(1, 1, 2), datetime(9999, 12, 30), timezones=st.just(UTC))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(
            stored_texts,
            st.one_of(st.none(), st.integers(-(2**15), 2**15 - 1)),
            st.one_of(st.none(), st.floats(allow_nan=False, width=64)),
            st.one_of(st.none(), st.booleans()),
            times,
            json_texts,
            st.one_of(st.none(), times),
        ),
        min_size=1,
        max_size=25,
    )
)
def test_binary_and_text_copy_store_the_same_rows(two_tables, values: list[tuple[object, ...]]) -> None:
    engine, tables, text = two_tables
    binary = tables.metrics
    frame = metrics_frame(values)
    assert copy.encoder(frame, [binary.c[c].type for c in frame.columns]) is not None
    from_binary, from_text = copy_both(engine, binary, text, frame)
    assert from_binary == from_text
    assert [r.url for r in from_binary] == [v[0] for v in values]
    assert [r.response_time_ms for r in from_binary] == [v[2] for v in values]  # inf included
    assert [r.checked_at for r in from_binary] == [v[4] for v in values]


@pytest.mark.parametrize(
    ("column", "value", "sqlstate"),
    [
        ("url", "nul\x00inside", "22021"),  # PostgreSQL text holds no NUL
        ("url", "lone \ud800 surrogate", "22021"),
        ("extra", '{"a": "\\u0000"}', "22P05"),  # nor does JSONB
        ("extra", "{not json", "22P02"),
    ],
)
def test_a_value_the_server_refuses_is_isolated_on_the_binary_path(
    two_tables, column: str, value: object, sqlstate: str
) -> None:
    engine, tables, _ = two_tables
    binary = tables.metrics
    base = ("https://x", 200, 1.0, True, datetime(2026, 11, 28, tzinfo=UTC), None, None)
    frame = metrics_frame([base, base, base])
    frame.loc[1, column] = value
    assert copy.encoder(frame, [binary.c[c].type for c in frame.columns]) is not None
    with engine.begin() as conn:
        loaded, refused = write.insert_good(conn, tables, frame, None, "run-1")
        stored = [r.offset for r in conn.execute(sa.select(binary.c.offset).order_by(binary.c.offset))]
    assert loaded == 2 and stored == [0, 2]
    assert [(r["offset"], r["errors"][0]["rule"]) for r in refused] == [(1, f"database:{sqlstate}")]
