"""The COPY fast path loads every value exactly: NULL versus empty text, escapes, floats, timestamps."""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime

import numpy as np
import orjson
import pandas as pd
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from etl.contract import RawMessage
from etl.db import copy, schema, text_copy, write
from etl.normalise import normalise
from etl.validate import validate

# Text that breaks naive COPY writers: the NULL marker and its look-alikes, every delimiter and escape
# of the text and CSV formats, quotes, empty and blank values, non-ASCII.
NASTY = [
    "\\N",
    "\\\\N",
    "N",
    "NULL",
    "null",
    "",
    " ",
    "\\",
    "a\\b",
    "ends with a backslash\\",
    "tab\there",
    "new\nline",
    "carriage\rreturn",
    "crlf\r\n",
    "\\n is not a newline",
    '"double" quotes',
    "'single' quotes",
    "comma, separated",
    "semi;colon|pipe",
    "\\.",
    "\\.\n",
    "ünïcödé ✓ 😀",
    "\u2028line separator",
    "\x7f delete \x01 control",
]


# A URL may not hold whitespace or control characters; the rest of the nasty text it may.
URL_SAFE = {c: "_" for c in range(0x21)} | {0x7F: "_", 0x2028: "_"}


def copy_lines(frame: pd.DataFrame) -> list[str]:
    return text_copy.copy_text(frame).decode().split("\n")


# -- the text written, without a database ---------------------------------------------------------


def test_text_fields_are_escaped_and_null_is_distinct_from_text() -> None:
    frame = pd.DataFrame({"t": pd.Series(["\\N", None, "", "a\tb\nc\rd\\e", np.nan], dtype=object)})
    assert copy_lines(frame) == ["\\\\N", "\\N", "", "a\\tb\\nc\\rd\\\\e", "\\N", ""]


def test_each_dtype_as_copy_text() -> None:
    frame = pd.DataFrame(
        {
            "i": pd.array([200, None], dtype="Int16"),
            "f": [0.1, np.nan],
            "b": pd.array([True, None], dtype="boolean"),
            "plain_bool": [False, True],
            "ts": pd.to_datetime(["2026-11-28T10:00:00.123456Z", None], utc=True),
            "naive": pd.to_datetime(["2026-11-28T10:00:00", "1970-01-01T00:00:00"]),
            "big": np.array([2**62, -1], dtype=np.int64),
            "s": pd.Series(["x", pd.NA], dtype="string"),
        }
    )
    assert copy_lines(frame) == [
        "200\t0.1\tt\tf\t2026-11-28T10:00:00.123456Z\t2026-11-28T10:00:00.000000\t4611686018427387904\tx",
        "\\N\t\\N\t\\N\tt\t\\N\t1970-01-01T00:00:00.000000\t-1\t\\N",
        "",
    ]


def test_a_zone_other_than_utc_is_written_as_utc() -> None:
    ts = pd.Series(pd.to_datetime(["2026-11-28T10:00:00+01:00"], utc=True)).dt.tz_convert("Europe/Paris")
    assert copy_lines(pd.DataFrame({"ts": ts})) == ["2026-11-28T09:00:00.000000Z", ""]


def test_an_empty_frame_writes_nothing() -> None:
    assert text_copy.copy_text(pd.DataFrame({"a": pd.Series([], dtype=object)})) == b""


# -- through PostgreSQL ---------------------------------------------------------------------------


@pytest.fixture
def metrics_db(stack, pg_schema: str) -> Iterator[tuple[sa.Engine, schema.Tables]]:
    engine = sa.create_engine(stack.app_db_url(), poolclass=sa.NullPool)
    tables = schema.build_tables(pg_schema)
    with engine.begin() as conn:
        schema.create_all(conn, tables)
    yield engine, tables
    engine.dispose()


def good_frame(values: list[dict[str, object]]) -> pd.DataFrame:
    messages = [
        RawMessage("website-metrics", 0, i, 1_795_860_000_000 + i, None, orjson.dumps(v))
        for i, v in enumerate(values)
    ]
    frame = normalise(messages)
    good, rejects = validate(frame, now=datetime(2026, 11, 28, 12, tzinfo=UTC))
    assert rejects.empty, rejects["errors"].tolist()
    return good


def load_and_read(engine: sa.Engine, tables: schema.Tables, good: pd.DataFrame) -> list[sa.Row]:
    with engine.begin() as conn:
        loaded, refused = write.insert_good(conn, tables, good, None, "run-1")
    assert (loaded, refused) == (len(good), [])
    m = tables.metrics
    with engine.connect() as conn:
        return list(conn.execute(sa.select(m).order_by(m.c.offset)))


def message(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "url": "https://example.com/health",
        "status_code": 200,
        "response_time_ms": 12.5,
        "regex_pattern": "ok",
        "regex_matched": True,
        "checked_at": "2026-11-28T10:00:00Z",
        "error": None,
    }
    return {**base, **fields}


def test_nasty_text_survives_the_round_trip(metrics_db) -> None:
    engine, tables = metrics_db
    values = [
        message(
            url=f"https://example.com/{i}?q=" + text.translate(URL_SAFE),
            regex_pattern=text,
            error=text if text.strip() else None,  # the contract refuses a blank error
            note=text,  # unknown field: kept in extra (JSONB)
        )
        for i, text in enumerate(NASTY)
    ]
    rows = load_and_read(engine, tables, good_frame(values))
    for row, text in zip(rows, NASTY, strict=True):
        assert row.regex_pattern == text
        assert row.error == (text if text.strip() else None)
        assert row.url.endswith("?q=" + text.translate(URL_SAFE))
        assert row.extra == {"note": text}


def test_null_empty_and_missing_stay_apart(metrics_db) -> None:
    engine, tables = metrics_db
    values = [
        message(regex_pattern="", error="\\N"),
        message(regex_pattern=None, error=None, regex_matched=None),
        {"url": "https://a.example/", "checked_at": "2026-11-28T10:00:00Z", "error": "timed out"},
    ]
    rows = load_and_read(engine, tables, good_frame(values))
    assert [(r.regex_pattern, r.error, r.regex_matched) for r in rows] == [
        ("", "\\N", True),
        (None, None, None),
        (None, "timed out", None),
    ]
    assert [(r.status_code, r.response_time_ms) for r in rows] == [(200, 12.5), (200, 12.5), (None, None)]
    assert all(r.extra is None for r in rows)


def test_numbers_and_timestamps_are_exact(metrics_db) -> None:
    engine, tables = metrics_db
    times = [0.1, 1e-300, 1234567.1234567891, 2.0**26 + 2.0**-26, 86_399_999.999999985, 0.0, 5e-324]
    stamps = ["2026-11-28T10:00:00.123456Z", "2026-11-28T23:59:59.999999+05:30", "2000-01-01T00:00:00Z"]
    values = [message(response_time_ms=t, status_code=100 + i) for i, t in enumerate(times)]
    values += [message(checked_at=s, status_code=599) for s in stamps]
    values.append(message(checked_at=1_795_860_000_123))  # epoch milliseconds
    good = good_frame(values)
    rows = load_and_read(engine, tables, good)
    assert [r.response_time_ms for r in rows[: len(times)]] == times
    assert [r.status_code for r in rows] == good["status_code"].tolist()
    expected = [ts.to_pydatetime() for ts in good["checked_at"]]
    assert [r.checked_at for r in rows] == expected
    assert [r.kafka_timestamp for r in rows] == [ts.to_pydatetime() for ts in good["kafka_timestamp"]]
    assert [(r.topic, r.partition, r.offset, r.run_id) for r in rows] == [
        ("website-metrics", 0, i, "run-1") for i in range(len(values))
    ]


def test_a_refused_row_is_isolated_on_the_copy_path(metrics_db) -> None:
    """A value the column refuses (smallint overflow from a hand-built frame) fails one row only."""
    engine, tables = metrics_db
    good = good_frame([message(), message(), message()])
    good["status_code"] = good["status_code"].astype("Int32")
    good.loc[good.index[1], "status_code"] = 70_000
    with engine.begin() as conn:
        loaded, refused = write.insert_good(conn, tables, good, None, "run-1")
    assert loaded == 2
    assert [(r["offset"], r["errors"][0]["rule"]) for r in refused] == [(1, "database:22003")]


texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(
            st.one_of(st.none(), texts),
            st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False, width=64)),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_any_text_and_float_round_trip(metrics_db, values: list[tuple[str | None, float | None]]) -> None:
    engine, tables = metrics_db
    n = len(values)
    frame = pd.DataFrame(
        {
            "url": pd.Series(["https://x"] * n, dtype=object),
            "response_time_ms": [math.nan if f is None else f for _, f in values],
            "error": pd.Series([t for t, _ in values], dtype=object),
            "checked_at": pd.to_datetime(["2026-11-28T10:00:00Z"] * n, utc=True),
            "topic": pd.Series(["t"] * n, dtype=object),
            "partition": np.zeros(n, dtype=np.int64),
            "offset": np.arange(n, dtype=np.int64),
            "run_id": pd.Series(["r"] * n, dtype=object),
        }
    )
    m = tables.metrics
    with engine.begin() as conn:
        conn.execute(m.delete())
        copy.to_sql(conn, m, frame)
        rows = list(conn.execute(sa.select(m.c.error, m.c.response_time_ms).order_by(m.c.offset)))
    assert [(r.error, r.response_time_ms) for r in rows] == values


def test_rows_sent_in_slices_all_arrive_once_in_order(metrics_db) -> None:
    """More rows than one COPY slice: every row arrives once, each value on its own row."""
    engine, tables = metrics_db
    n = 12_345
    frame = pd.DataFrame(
        {
            "url": pd.Series([f"https://x/{i}" for i in range(n)], dtype=object),
            "checked_at": pd.to_datetime(np.arange(n) * 1_000_000, unit="us", utc=True),
            "topic": pd.Series(["t"] * n, dtype=object),
            "partition": np.zeros(n, dtype=np.int64),
            "offset": np.arange(n, dtype=np.int64),
            "run_id": pd.Series(["r"] * n, dtype=object),
        }
    )
    m = tables.metrics
    with engine.begin() as conn:
        copy.to_sql(conn, m, frame)
        rows = list(
            conn.execute(sa.select(m.c.offset, m.c.url, m.c.checked_at).order_by(sa.literal_column("ctid")))
        )
    assert [r.offset for r in rows] == list(range(n))
    assert all(r.url == f"https://x/{r.offset}" for r in rows)
    assert rows[-1].checked_at == datetime.fromtimestamp(n - 1, tz=UTC)
