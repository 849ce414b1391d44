"""The load stage's faster paths write exactly what the plain ones did.

Rejects go in a few ``INSERT ... SELECT`` statements fed by one JSON parameter each, not one
statement per row; timestamp columns reach ``to_sql`` as their COPY text on PostgreSQL; a column's
COPY escapes are applied in one pass. Each is checked against the straightforward way.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from etl.contract import METRIC_COLUMNS
from etl.db import copy, reject_rows, schema, text_copy, write
from etl.db import runs as db_runs

ALL_BYTES = bytes(range(256))
ODD_ZONE = timezone(timedelta(minutes=9, seconds=21))  # an offset with seconds (local mean time)

# -- COPY text, without a database ----------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(st.characters(blacklist_categories=("Cs",)), max_size=12), max_size=30))
def test_escaping_a_column_in_one_pass_matches_escaping_each_value(texts: list[str]) -> None:
    assert text_copy.escaped(texts) == [v.translate(text_copy.COPY_ESCAPES) for v in texts]


def test_a_value_holding_the_separator_is_still_escaped_alone() -> None:
    texts = ["a\x00b\\", "c\td", "\x00", ""]
    assert text_copy.escaped(texts) == ["a\x00b\\\\", "c\\td", "\x00", ""]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=40)
    | st.lists(st.integers(-3, 600), max_size=200)
    | st.lists(st.sampled_from([2**63 - 1, -(2**63), 0]), max_size=40)
)
def test_integer_texts_match_str(values: list[int]) -> None:
    array = np.array(values, dtype=np.int64)
    assert text_copy.int_texts(array).tolist() == list(map(str, values))


def time_frame() -> pd.DataFrame:
    """Datetime columns of every kind the COPY path meets, with NaT and the extremes of the range."""
    stamps = [
        "2026-11-28T10:00:00.123456Z",
        None,
        "0001-01-01T00:00:00Z",
        "9999-12-31T23:59:59.999999Z",
        "1969-12-31T23:59:59.999999Z",
        "2000-02-29T12:00:00.000001+05:30",
    ]
    utc = pd.to_datetime(stamps, utc=True, format="ISO8601").as_unit("us")
    return pd.DataFrame(
        {
            "utc": utc,
            "paris": utc.tz_convert("Europe/Paris"),
            "naive": utc.tz_localize(None),
            "ns": pd.Series(  # nanoseconds: written to the microsecond, as before
                pd.to_datetime(["2026-11-28T10:00:00.123456789Z"] * 6, utc=True).as_unit("ns")
            ),
            "text": pd.Series(["x", None, "a\\b", "tab\t", "", "\\N"], dtype=object),
            "n": np.arange(6, dtype=np.int64),
        }
    )


def test_time_columns_as_text_write_the_same_copy_text() -> None:
    frame = time_frame()
    as_text = text_copy.times_as_text(frame)
    assert text_copy.copy_text(as_text) == text_copy.copy_text(frame)
    assert [str(d) for d in as_text.dtypes] == ["object"] * 5 + ["int64"]
    assert as_text["utc"].tolist()[:2] == ["2026-11-28T10:00:00.123456Z", None]
    assert as_text["naive"].tolist()[0] == "2026-11-28T10:00:00.123456"
    assert as_text["text"].equals(frame["text"]) and as_text["n"].equals(frame["n"])
    assert list(as_text.index) == list(frame.index)


def test_a_frame_without_time_columns_goes_as_it_is() -> None:
    frame = pd.DataFrame({"a": [1, 2], "b": ["x", None]})
    assert text_copy.times_as_text(frame) is frame


def test_time_columns_as_text_keep_a_sliced_index() -> None:
    frame = time_frame().iloc[2:]
    as_text = text_copy.times_as_text(frame)
    assert list(as_text.index) == [2, 3, 4, 5]
    assert text_copy.copy_text(as_text) == text_copy.copy_text(frame)


def test_elsewhere_to_sql_gets_the_typed_frame() -> None:
    """On a database other than PostgreSQL the frame goes to plain to_sql with its own types."""
    engine = sa.create_engine("sqlite://")
    table = sa.Table("m", sa.MetaData(), sa.Column("t", sa.DateTime), sa.Column("n", sa.Integer))
    frame = pd.DataFrame({"t": pd.to_datetime(["2026-11-28T10:00:00.5", None]), "n": [1, 2]})
    with engine.begin() as conn:
        table.create(conn)
        copy.to_sql(conn, table, frame)
        rows = list(conn.execute(sa.select(table.c.t, table.c.n).order_by(table.c.n)))
    assert rows == [(datetime(2026, 11, 28, 10, 0, 0, 500000), 1), (None, 2)]


# -- rejects as JSON, without a database ----------------------------------------------------------


def test_json_pages_keep_every_row_in_order_within_the_limit() -> None:
    rows = [orjson.dumps([i, "x" * (i % 7)]) for i in range(100)]
    pages = list(reject_rows.json_pages(iter(rows), 60))
    assert [r for page in pages for r in json.loads(page)] == [json.loads(r) for r in rows]
    assert all(len(page) <= 60 for page in pages)
    assert len(list(reject_rows.json_pages(iter([b'"' + b"y" * 500 + b'"']), 60))) == 1  # one big row alone
    assert list(reject_rows.json_pages(iter([]), 60)) == []


def test_a_reject_as_json() -> None:
    reject = {
        "topic": "t",
        "partition": np.int64(2),
        "offset": np.int64(2**62),
        "key": b"\x00\xff",
        "headers": '[["h", "v\\u0000"]]',
        "kafka_timestamp": pd.Timestamp("2026-11-28T10:00:00.000001Z"),
        "payload": b'{"a": "\\u0000"}\x00',
        "payload_text": '{"a": "\\u0000"}\x00',
        "stage": "json",
        "errors": [{"field": "a\x00", "rule": "nul_character", "value": "\x00"}],
    }
    assert json.loads(next(reject_rows.reject_rows([reject], "run"))) == [
        "t",
        2,
        2**62,
        "AP8=",
        [["h", "v\\u0000"]],
        "2026-11-28T10:00:00.000001+00:00",
        base64.b64encode(b'{"a": "\\u0000"}\x00').decode(),
        None,
        "json",
        [{"field": "a\\u0000", "rule": "nul_character", "value": "\\u0000"}],
        "run",
        0,  # the incarnation: 0 when the reject has none
    ]


@pytest.mark.parametrize(
    ("stamp", "text"),
    [
        (None, None),
        (pd.NaT, None),
        (datetime(2026, 11, 28, 10, tzinfo=UTC), "2026-11-28T10:00:00+00:00"),
        (datetime(1890, 1, 1, tzinfo=ODD_ZONE), "1890-01-01T00:00:00+00:09:21"),
        (datetime(2026, 11, 28, 10), "2026-11-28T10:00:00"),
        ("not a time", None),
    ],
)
def test_a_reject_time_is_written_as_isoformat_writes_it(stamp: Any, text: str | None) -> None:
    reject = {"topic": "t", "partition": 0, "offset": 0, "stage": "decode", "errors": []}
    assert json.loads(next(reject_rows.reject_rows([{**reject, "kafka_timestamp": stamp}], "r")))[5] == text


# -- through PostgreSQL ---------------------------------------------------------------------------


@pytest.fixture
def db(stack, pg_schema: str) -> Iterator[tuple[sa.Engine, schema.Tables]]:
    engine = sa.create_engine(stack.app_db_url(), poolclass=sa.NullPool)
    tables = schema.build_tables(pg_schema)
    with engine.begin() as conn:
        schema.create_all(conn, tables)
    yield engine, tables
    engine.dispose()


def hostile_rejects() -> list[dict[str, Any]]:
    """Rejects holding what a message can: any bytes, NUL characters, escapes, odd zones, missing parts."""
    texts = ["plain", "back\\slash \\N \\u0000", "tab\tnew\nline\rcr", "'quote\" ünï 😀 \u2028", ""]
    out: list[dict[str, Any]] = []
    for i, text in enumerate(texts):
        out.append(
            {
                "topic": "website-metrics",
                "partition": i % 3,
                "offset": 2**62 + i,
                "key": ALL_BYTES[i:] if i % 2 else None,
                "headers": orjson.dumps([["h\x00", text], ["b", "AAE=", "base64"]]).decode() if i else None,
                "kafka_timestamp": pd.Timestamp("2026-11-28T10:00:00.000001Z") + pd.Timedelta(seconds=i),
                "payload": text.encode() + ALL_BYTES,
                "payload_text": text,
                "stage": "schema",
                "errors": [{"field": f"f{i}\x00", "rule": "r", "value": text + "\x00"}, {"field": None}],
            }
        )
    out.append(
        {
            "topic": "website-metrics",
            "partition": 0,
            "offset": 7,
            "kafka_timestamp": pd.NaT,
            "payload": b"nul \x00 inside",
            "payload_text": "nul \x00 inside",  # PostgreSQL text cannot hold it: NULL, the bytes keep it
            "stage": "decode",
            "errors": ({"field": None, "rule": "tombstone", "value": None},),
        }
    )
    out.append(
        {
            "topic": "website-metrics",
            "partition": 1,
            "offset": 8,
            "key": b"",
            "headers": [["x", None]],
            "kafka_timestamp": datetime(1890, 1, 1, tzinfo=ODD_ZONE),
            "payload": None,
            "payload_text": None,
            "stage": "database",
            "errors": [{"field": "status_code", "rule": "database:22003", "value": "out of range"}],
        }
    )
    return out


def reference_insert(
    conn: sa.Connection, tables: schema.Tables, rejects: list[dict[str, Any]], run: str
) -> None:
    """The plain way: one bound row per reject through SQLAlchemy (an executemany)."""
    from sqlalchemy.dialects.postgresql import insert

    def scrub(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace("\x00", "\\u0000")
        if isinstance(value, list | tuple):
            return [scrub(v) for v in value]
        if isinstance(value, dict):
            return {scrub(k): scrub(v) for k, v in value.items()}
        return value

    rows = []
    for r in rejects:
        headers = r.get("headers")
        text = r.get("payload_text")
        stamp = r.get("kafka_timestamp")
        rows.append(
            {
                "topic": r["topic"],
                "partition": int(r["partition"]),
                "offset": int(r["offset"]),
                "key": r.get("key"),
                "headers": scrub(orjson.loads(headers) if isinstance(headers, str) else headers),
                "kafka_timestamp": None
                if stamp is None or pd.isna(stamp)
                else pd.Timestamp(stamp).to_pydatetime(),
                "payload": r.get("payload"),
                "payload_text": None if text is None or "\x00" in text else text,
                "stage": r["stage"],
                "errors": scrub(list(r["errors"])),
                "run_id": run,
            }
        )
    conn.execute(insert(tables.rejects).on_conflict_do_nothing(), rows)


def stored(engine: sa.Engine, tables: schema.Tables) -> list[tuple[Any, ...]]:
    r = tables.rejects
    columns = [c for c in r.c if c.name not in ("id", "rejected_at")]
    with engine.connect() as conn:
        return [
            tuple(row)
            for row in conn.execute(
                sa.select(*columns, sa.func.jsonb_typeof(r.c.headers)).order_by(r.c.partition, r.c.offset)
            )
        ]


@pytest.mark.parametrize(
    "insert", [write.insert_rejects, write.insert_reject_pages], ids=["copy", "json-pages"]
)
def test_rejects_are_stored_as_the_plain_insert_stores_them(db, insert) -> None:
    engine, tables = db
    rejects = hostile_rejects()
    with engine.begin() as conn:
        insert(conn, tables, rejects, "run-1")
    fast = stored(engine, tables)
    with engine.begin() as conn:
        conn.execute(tables.rejects.delete())
        reference_insert(conn, tables, rejects, "run-1")
    assert fast == stored(engine, tables)
    by_offset = {row["offset"]: row for row in (dict(zip(_names(tables), t, strict=True)) for t in fast)}
    assert len(fast) == len(rejects)
    assert by_offset[2**62 + 1]["key"] == ALL_BYTES[1:]
    assert by_offset[2**62 + 2]["payload"] == b"tab\tnew\nline\rcr" + ALL_BYTES
    assert by_offset[2**62 + 3]["payload_text"] == "'quote\" ünï 😀 \u2028"
    assert by_offset[7]["payload_text"] is None and by_offset[7]["payload"] == b"nul \x00 inside"
    assert by_offset[7]["kafka_timestamp"] is None
    assert by_offset[2**62]["headers"] is None and by_offset[2**62]["headers_type"] == "null"
    assert by_offset[2**62 + 1]["headers"][0] == ["h\\u0000", "back\\slash \\N \\u0000"]
    assert by_offset[2**62 + 1]["errors"][0]["value"] == "back\\slash \\N \\u0000\\u0000"
    assert by_offset[8]["kafka_timestamp"] == datetime(1890, 1, 1, tzinfo=ODD_ZONE)
    assert by_offset[8]["key"] == b""


def _names(tables: schema.Tables) -> list[str]:
    return [c.name for c in tables.rejects.c if c.name not in ("id", "rejected_at")] + ["headers_type"]


def test_a_replayed_reject_stays_once_and_the_count_is_the_cycles(db) -> None:
    engine, tables = db
    rejects = hostile_rejects()
    with engine.begin() as conn:
        write.insert_rejects(conn, tables, rejects[:3], "run-1")
    with engine.begin() as conn:
        write.insert_rejects(conn, tables, rejects + rejects[-1:], "run-2")  # a repeat inside one call too
    r = tables.rejects
    with engine.connect() as conn:
        runs = dict(conn.execute(sa.select(r.c.offset, r.c.run_id)).all())
    assert len(runs) == len(rejects)
    assert [runs[int(x["offset"])] for x in rejects] == ["run-1"] * 3 + ["run-2"] * (len(rejects) - 3)


def test_load_cycle_counts_every_reject_of_the_cycle_once(db) -> None:
    """Rejects stored already (a replayed backlog, another group) are duplicates, the others rejects."""
    from etl.config import Settings

    engine, tables = db
    rejects = hostile_rejects()
    settings = Settings(group_id="g", topic="website-metrics")
    with engine.begin() as conn:
        db_runs.start_run(conn, tables, "run-1", settings, "running")
        write.insert_rejects(conn, tables, rejects[:2], "run-0")
        empty = pd.DataFrame(columns=list(METRIC_COLUMNS))
        result = write.load_cycle(conn, tables, settings, write.CycleLoad("run-1", empty, rejects, []))
    assert (result.rejected, result.already_loaded) == (len(rejects) - 2, 2)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(tables.rejects)).scalar() == len(rejects)


def test_new_rejects_go_by_one_copy(db) -> None:
    engine, tables = db
    rejects = hostile_rejects()
    statements: list[str] = []
    with engine.begin() as conn:
        sa.event.listen(conn, "before_cursor_execute", lambda *a: statements.append(a[2]))
        write.insert_rejects(conn, tables, rejects, "run-1")
    assert not [s for s in statements if "INSERT" in s]  # only the savepoint's statements
    assert len(stored(engine, tables)) == len(rejects)


def test_many_rejects_take_few_statements_without_copy(db, monkeypatch) -> None:
    engine, tables = db
    base = hostile_rejects()
    rejects = [{**base[i % len(base)], "partition": 5, "offset": i} for i in range(3000)]
    statements: list[str] = []
    monkeypatch.setattr(write, "REJECTS_PAGE_BYTES", 200_000)
    monkeypatch.setattr(write, "copy_rejects", lambda *a, **k: False)
    with engine.begin() as conn:
        sa.event.listen(conn, "before_cursor_execute", lambda *a: statements.append(a[2]))
        write.insert_rejects(conn, tables, rejects, "run-1")
    assert 2 <= len([s for s in statements if "INSERT" in s]) <= 20
    r = tables.rejects
    with engine.connect() as conn:
        offsets = [o for (o,) in conn.execute(sa.select(r.c.offset).order_by(r.c.offset))]
    assert offsets == list(range(3000))


def test_timestamps_reach_postgresql_exactly_through_to_sql(db) -> None:
    """The time columns go to to_sql as COPY text: each value, NaT and a sliced frame read back exactly."""
    engine, tables = db
    n = 6
    utc = pd.to_datetime(
        ["2026-11-28T10:00:00.123456Z", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z"] * 2,
        utc=True,
        format="ISO8601",
    ).as_unit("us")
    frame = pd.DataFrame(
        {
            "url": pd.Series(["https://x"] * n, dtype=object),
            "checked_at": utc,
            "topic": pd.Series(["t"] * n, dtype=object),
            "partition": np.zeros(n, dtype=np.int64),
            "offset": np.arange(n, dtype=np.int64),
            "kafka_timestamp": pd.Series([utc[0], pd.NaT] * 3, dtype="datetime64[us, UTC]"),
            "run_id": pd.Series(["r"] * n, dtype=object),
        }
    ).iloc[1:]
    m = tables.metrics
    with engine.begin() as conn:
        copy.to_sql(conn, m, frame)
        rows = list(conn.execute(sa.select(m.c.checked_at, m.c.kafka_timestamp).order_by(m.c.offset)))
    expected = [
        (c.to_pydatetime(), None if pd.isna(k) else k.to_pydatetime())
        for c, k in zip(frame["checked_at"], frame["kafka_timestamp"], strict=True)
    ]
    assert [tuple(r) for r in rows] == expected


def _sample_good(n: int, partition: int) -> tuple[list[Any], pd.DataFrame]:
    from etl.contract import RawMessage
    from etl.sample import messages
    from etl.typed import split

    values = messages(n, corrupt_ratio=0.0, start=datetime(2026, 11, 28, 10, tzinfo=UTC))
    raw = [RawMessage("website-metrics", partition, i, None, None, v) for i, v in enumerate(values)]
    return raw, split(raw)[0]


def test_a_cycle_made_ahead_stores_what_the_load_would_make(db) -> None:
    """A run makes a cycle's COPY body and rollups while the cycle before loads (write.made_ahead):
    the rows stored are those the load makes itself, value for value."""
    from etl.config import Settings

    engine, tables = db
    settings = Settings(group_id="g", topic="website-metrics")
    m = tables.metrics
    with engine.begin() as conn:
        db_runs.start_run(conn, tables, "run-1", settings, "running")
        for partition, ahead in ((0, True), (1, False)):
            raw, good = _sample_good(120, partition)
            made = write.made_ahead(tables, good, "run-1") if ahead else None
            cycle = write.CycleLoad("run-1", good, [], [], source=raw, made=made)
            assert write.load_cycle(conn, tables, settings, cycle).loaded == 120
        rows = conn.execute(sa.select(m).order_by(m.c.partition, m.c.offset)).mappings().all()
    values = [{k: v for k, v in row.items() if k != "partition"} for row in rows]
    assert values[:120] == values[120:]
    assert values[0]["checked_at"] == datetime(2026, 11, 28, 10, tzinfo=UTC)


def test_rejects_made_ahead_are_stored_as_the_load_would_store_them(db) -> None:
    """A cycle's rejects' COPY made while the cycle before loads (write.made_ahead with the rejects)
    stores the rows the load makes itself: every reason, the raw bytes, the run."""
    from etl.config import Settings
    from etl.contract import RawMessage
    from etl.sample import messages
    from etl.typed import split

    engine, tables = db
    settings = Settings(group_id="g", topic="website-metrics")
    r = tables.rejects
    start = datetime(2026, 11, 28, 10, tzinfo=UTC)
    with engine.begin() as conn:
        db_runs.start_run(conn, tables, "run-1", settings, "running")
        for partition, ahead in ((0, True), (1, False)):
            values = messages(400, corrupt_ratio=0.3, start=start)
            raw = [RawMessage("website-metrics", partition, i, b"k", None, v) for i, v in enumerate(values)]
            good, rejects = split(raw)
            made = write.made_ahead(tables, good, "run-1", rejects) if ahead else None
            assert not ahead or (made is not None and made.rejects_body is not None)
            cycle = write.CycleLoad("run-1", good, rejects, [], source=raw, made=made)
            assert write.load_cycle(conn, tables, settings, cycle).rejected == len(rejects) > 50
        columns = [c for c in r.c if c.name not in ("id", "partition", "rejected_at")]
        rows = conn.execute(sa.select(*columns).order_by(r.c.partition, r.c.offset)).all()
    assert rows[: len(rows) // 2] == rows[len(rows) // 2 :]


@pytest.mark.parametrize("when", ["before the look", "after the look"])
def test_a_cycle_made_ahead_loads_once_what_another_run_stored_meanwhile(db, monkeypatch, when: str) -> None:
    """Messages another run stored while the cycle was made ready are duplicates, whether the cycle's
    look for stored messages finds them or its COPY meets them; the rest load once and the rollups
    count each stored check once."""
    from etl.config import Settings
    from etl.db import rollups

    engine, tables = db
    if when == "after the look":  # the other run commits between the look and the COPY
        monkeypatch.setattr(write, "without_stored", lambda conn, tables, good, rejects: (good, rejects, 0))
    settings = Settings(group_id="g", topic="website-metrics")
    raw, good = _sample_good(300, 0)
    made = write.made_ahead(tables, good, "run-1")
    with engine.begin() as conn:
        db_runs.start_run(conn, tables, "run-1", settings, "running")
        write.insert_good(conn, tables, good.iloc[:40], raw, "run-0")
        cycle = write.CycleLoad("run-1", good, [], [], source=raw, made=made)
        result = write.load_cycle(conn, tables, settings, cycle)
        assert (result.loaded, result.already_loaded) == (260, 40)
        m = tables.metrics
        by_run = dict(conn.execute(sa.select(m.c.run_id, sa.func.count()).group_by(m.c.run_id)).all())
        assert by_run == {"run-0": 40, "run-1": 260}
        assert rollups.check(conn, tables).ok
        hourly = conn.execute(sa.select(sa.func.sum(tables.hourly.c.checks))).scalar()
    assert hourly == 300
