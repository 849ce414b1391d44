"""Messages already stored (by another consumer group, a rewind, a replay) are found in bulk and counted
as duplicates: in the cycle line, the report and etl_runs alike, whichever table holds them."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import sqlalchemy as sa

from etl.contract import METRIC_COLUMNS
from etl.db import schema, store, write
from etl.run import run_batch
from tests.exactly_once import assert_exactly_once, kafka_ends
from tests.support import count, good_message, produce, rows, settings_for


def backlog(n: int, bad_every: int) -> list[bytes]:
    return [b"not json %d" % i if i % bad_every == 0 else good_message(i) for i in range(n)]


def test_a_second_group_finds_what_the_first_loaded_in_one_cycle(
    stack, make_topic, pg_schema, admin_engine, caplog
) -> None:
    """5,000 messages already loaded by one group, read by another in one cycle: all duplicates (the
    bad ones too, already in the rejects table), nothing stored twice. Bisection under one savepoint
    per split exhausted PostgreSQL's lock table here ('out of shared memory', exit 4 forever)."""
    topic = make_topic(partitions=1)
    produce(stack, topic, backlog(5000, bad_every=50))
    first = run_batch(settings_for(stack, topic, pg_schema, group_id=f"a-{topic}"))
    assert (first.status, first.loaded, first.rejected) == ("ok", 4900, 100)

    caplog.set_level(logging.INFO, logger="etl.run")
    second = run_batch(settings_for(stack, topic, pg_schema, group_id=f"b-{topic}"))
    assert (second.status, second.read, second.loaded, second.rejected) == ("ok", 5000, 0, 0)
    assert second.duplicates == 5000
    cycles = [r for r in caplog.records if getattr(r, "event", None) == "cycle"]
    assert sum(r.duplicates for r in cycles) == 5000 and sum(r.loaded + r.rejected for r in cycles) == 0
    assert rows(
        admin_engine,
        f'SELECT read, loaded, rejected, duplicates FROM "{pg_schema}".etl_runs WHERE run_id = :r',
        r=second.run_id,
    ) == [(5000, 0, 0, 5000)]
    assert count(admin_engine, pg_schema, "website_metrics") == 4900
    assert count(admin_engine, pg_schema, "website_metrics_rejects") == 100
    assert_exactly_once(admin_engine, pg_schema, topic, f"b-{topic}", kafka_ends(stack, topic))


def test_a_cycle_partly_stored_loads_the_rest_and_counts_the_others(
    stack, make_topic, pg_schema, admin_engine
) -> None:
    """A second group that starts while the first is half way: the stored half are duplicates, the rest
    loads under the second group, and the summary and etl_runs agree."""
    topic = make_topic(partitions=2)
    produce(stack, topic, backlog(400, bad_every=20), partitions=2)
    first = run_batch(settings_for(stack, topic, pg_schema, group_id=f"a-{topic}", max_messages=200))
    assert first.read == 200
    second = run_batch(settings_for(stack, topic, pg_schema, group_id=f"b-{topic}"))
    assert (second.read, second.duplicates, second.loaded + second.rejected) == (400, 200, 200)
    assert rows(
        admin_engine,
        f'SELECT duplicates, loaded + rejected FROM "{pg_schema}".etl_runs WHERE run_id = :r',
        r=second.run_id,
    ) == [(200, 200)]
    assert_exactly_once(admin_engine, pg_schema, topic, f"b-{topic}", kafka_ends(stack, topic))


def test_rows_stored_meanwhile_are_found_by_one_lookup_not_by_bisection(
    stack, make_topic, pg_schema, admin_engine
) -> None:
    """The COPY meets rows another run stored since the cycle looked: one lookup finds them all, the rest
    goes in by one more COPY; a savepoint per split (thousands here) would exhaust the lock table."""
    topic = make_topic(partitions=1)
    produce(stack, topic, [good_message(i) for i in range(4000)])
    s = settings_for(stack, topic, pg_schema)
    run_batch(s)
    tables = schema.tables_for(s)
    engine = store.make_engine(s)
    try:
        with engine.begin() as conn:
            frame = load_frame(conn, tables)
            conn.execute(sa.text(f'DELETE FROM "{pg_schema}".website_metrics WHERE "offset" % 2 = 0'))
        savepoints: list[str] = []
        with engine.begin() as conn:
            sa.event.listen(conn, "savepoint", lambda _conn, name: savepoints.append(name))
            already: list[int] = []
            loaded, refused = write.insert_good(conn, tables, frame, None, "again", already_loaded=already)
    finally:
        engine.dispose()
    assert (loaded, len(already), refused) == (2000, 2000, [])
    assert len(savepoints) <= 3
    assert count(admin_engine, pg_schema, "website_metrics") == 4000


def load_frame(conn: sa.Connection, tables: schema.Tables) -> pd.DataFrame:
    """The stored rows back as the frame a cycle loads (its columns, in offset order)."""
    m = tables.metrics
    columns = [c for c in METRIC_COLUMNS if c != "run_id"]
    result = conn.execute(sa.select(*(m.c[c] for c in columns)).order_by(m.c["offset"]))
    frame = pd.DataFrame(result.all(), columns=columns)
    frame["extra"] = [json.dumps(v) if v is not None else None for v in frame["extra"]]
    return frame


def test_stored_messages_are_found_exactly_whether_asked_for_close_together_or_far_apart(
    stack, make_topic, pg_schema
) -> None:
    """The one "already loaded?" lookup (a cycle, a COPY that met a stored message, a rejects replay):
    offsets close together are read as a range, offsets far apart (a replay's rejects) one by one;
    either way exactly the stored messages asked for are found, and nothing of another topic."""
    topic = make_topic(partitions=1)
    produce(stack, topic, [good_message(i) for i in range(3000)])
    s = settings_for(stack, topic, pg_schema)
    run_batch(s)
    tables = schema.tables_for(s)

    def ask(offsets: list[int], of: str = topic) -> list[bool]:
        keys = {
            "topic": np.array([of] * len(offsets), dtype=object),
            "partition": np.zeros(len(offsets), dtype=np.int64),
            "incarnation": np.zeros(len(offsets), dtype=np.int64),
            "offset": np.array(offsets, dtype=np.int64),
        }
        with engine.connect() as conn:
            return write.find_stored(conn, [tables.metrics, tables.rejects], keys).tolist()

    engine = store.make_engine(s)
    try:
        far_apart = [0, 1, 1500, 2999, 3000, 100_000]
        assert ask(far_apart) == [True, True, True, True, False, False]
        assert ask(list(range(2990, 3010))) == [True] * 10 + [False] * 10
        assert ask(far_apart, of=f"{topic}-other") == [False] * 6
    finally:
        engine.dispose()
