"""The conditional offset advance where it matters: a partition that already HAS a stored offset.

The other conflict tests start from partitions with no stored offset (the INSERT ... ON CONFLICT
path). Here a first run stores an offset, a second run reads from it, and while its load waits (a
trigger holds the UPDATE of ``etl_offsets`` on an advisory lock the test owns) another run loads the
same messages and advances the partition further. The second run's ``UPDATE ... WHERE next_offset =
<where it started>`` must then find no row: the cycle rolls back, the run re-reads from the winner's
offset, and no message is loaded twice. Without the condition (issue 14's mutant) the run would
overwrite the winner's offset with a lower one, report no conflict and re-load what the winner had.
"""

from __future__ import annotations

import dataclasses
import threading

import pytest
import sqlalchemy as sa

from etl.db import offsets as db_offsets
from etl.db.schema import ensure_tables, tables_for
from etl.db.store import make_engine
from etl.run import run_batch
from tests.exactly_once import assert_exactly_once, stored_offsets, wait_for
from tests.support import good_message, produce, rows, settings_for

pytestmark = pytest.mark.services

GATE = 7_300_014  # the advisory lock the test holds while the run's offset UPDATE waits on it


def _gate_updates(admin: sa.Engine, schema: str) -> None:
    """A statement trigger: a run's UPDATE of etl_offsets first waits for the test's advisory lock."""
    with admin.begin() as conn:
        conn.execute(
            sa.text(
                f"""CREATE FUNCTION "{schema}".gate() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                  IF current_setting('application_name') LIKE 'metric-etl run %' THEN
                    PERFORM pg_advisory_lock({GATE}); PERFORM pg_advisory_unlock({GATE});
                  END IF;
                  RETURN NULL;
                END $$"""
            )
        )
        conn.execute(
            sa.text(
                f'CREATE TRIGGER gate BEFORE UPDATE ON "{schema}".etl_offsets '
                f'FOR EACH STATEMENT EXECUTE FUNCTION "{schema}".gate()'
            )
        )


def _other_run_loads(admin: sa.Engine, schema: str, topic: str, group: str, lo: int, hi: int) -> None:
    """What a second run would commit: offsets lo..hi-1 loaded and the partition advanced to hi."""
    with admin.begin() as conn:
        conn.execute(
            sa.text(
                f'INSERT INTO "{schema}".website_metrics '
                '(url, checked_at, topic, partition, "offset", run_id) '
                "SELECT 'https://other.example/' || o, now(), :t, 0, o, 'other' "
                "FROM generate_series(:lo, :hi) o"
            ),
            {"t": topic, "lo": lo, "hi": hi - 1},
        )
        done = conn.execute(
            sa.text(
                f"UPDATE \"{schema}\".etl_offsets SET next_offset = :hi, run_id = 'other' "
                "WHERE group_id = :g AND topic = :t AND partition = 0 AND next_offset = :lo"
            ),
            {"g": group, "t": topic, "lo": lo, "hi": hi},
        ).rowcount
        assert done == 1


def test_a_run_overtaken_on_a_stored_offset_rolls_back_and_loads_nothing_twice(
    stack, make_topic, pg_schema, admin_engine
) -> None:
    topic = make_topic(partitions=1)
    produce(stack, topic, [good_message(i) for i in range(30)])
    first = run_batch(settings_for(stack, topic, pg_schema, max_poll_records=10, cycles=1))
    assert first.loaded == 10
    group = f"g-{topic}"
    assert stored_offsets(admin_engine, pg_schema, topic, group) == {0: 10}

    _gate_updates(admin_engine, pg_schema)
    holder = admin_engine.connect()
    holder.execute(sa.text(f"SELECT pg_advisory_lock({GATE})"))
    reports: list = []
    errors: list[BaseException] = []
    settings = settings_for(stack, topic, pg_schema, max_poll_records=10)

    def second_run() -> None:
        try:
            reports.append(run_batch(settings))
        except BaseException as exc:  # asserted in the test's thread
            errors.append(exc)

    run = threading.Thread(target=second_run)
    run.start()
    try:
        waiting = (
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'metric-etl run %' "
            "AND wait_event_type = 'Lock' AND wait_event = 'advisory'"
        )
        wait_for("the second run's offset update to wait", lambda: rows(admin_engine, waiting)[0][0] == 1)
        # Its UPDATE is in flight, from offset 10: another run commits 10..24 and advances to 25.
        _other_run_loads(admin_engine, pg_schema, topic, group, 10, 25)
    finally:
        holder.execute(sa.text(f"SELECT pg_advisory_unlock({GATE})"))
        holder.close()
        run.join(120)
    assert not run.is_alive()
    assert not errors, errors
    (report,) = reports
    assert report.conflicts == 1, "the conditional advance did not see the other run's offset"
    assert report.status == "ok"
    # It loaded only what the other run had not: 25..29; no message counted twice, none as duplicate.
    assert (report.loaded, report.duplicates, report.rejected) == (5, 0, 0)
    mine = rows(
        admin_engine,
        f'SELECT min("offset"), max("offset"), count(*) FROM "{pg_schema}".website_metrics WHERE run_id = :r',
        r=report.run_id,
    )
    assert tuple(mine[0]) == (25, 29, 5)
    assert_exactly_once(admin_engine, pg_schema, topic, group, {0: 30})
    assert stored_offsets(admin_engine, pg_schema, topic, group) == {0: 30}


def test_the_offset_update_itself_refuses_a_partition_moved_since_it_was_read(
    stack, make_topic, pg_schema, admin_engine
) -> None:
    """Two real connections, no pipeline: run A read next_offset 10 and holds its transaction open;
    run B advances 10 -> 25 and commits; A's advance from 10 raises OffsetConflict and moves nothing."""
    topic = make_topic(partitions=1)
    settings = settings_for(stack, topic, pg_schema)
    tables = tables_for(settings)
    engine = make_engine(settings)
    try:
        with engine.begin() as conn:
            ensure_tables(conn, tables)
            db_offsets.advance_offsets(
                conn, tables, settings.group_id, topic, "first", [db_offsets.OffsetAdvance(0, None, 10)]
            )
        with engine.connect() as a, engine.connect() as b, a.begin():
            assert db_offsets.read_offsets(a, tables, settings.group_id, topic) == {0: 10}
            with b.begin():
                db_offsets.advance_offsets(
                    b, tables, settings.group_id, topic, "b", [db_offsets.OffsetAdvance(0, 10, 25)]
                )
            with pytest.raises(db_offsets.OffsetConflict) as lost:
                db_offsets.advance_offsets(
                    a, tables, settings.group_id, topic, "a", [db_offsets.OffsetAdvance(0, 10, 20)]
                )
            assert lost.value.partitions == [0]
    finally:
        engine.dispose()
    stored = rows(admin_engine, f'SELECT next_offset, run_id FROM "{pg_schema}".etl_offsets')
    assert [tuple(r) for r in stored] == [(25, "b")]


def test_each_stored_offset_names_the_run_that_stored_it(stack, make_topic, pg_schema, admin_engine) -> None:
    """The run id beside each stored offset is how a run whose connection was lost during COMMIT
    recognises its own commit on the retry (else it would take it for another run's and re-read):
    it is written on the first advance of a partition (INSERT) and on every later one (UPDATE)."""
    topic = make_topic(partitions=2)
    produce(stack, topic, [good_message(i) for i in range(10)], partitions=2)
    settings = settings_for(stack, topic, pg_schema)
    tables = tables_for(settings)
    engine = make_engine(settings)
    try:
        first = run_batch(settings)
        with engine.connect() as conn:
            assert db_offsets.read_offset_owners(conn, tables, settings.group_id, topic) == {
                0: (5, first.run_id),
                1: (5, first.run_id),
            }
        when = f'SELECT partition, updated_at FROM "{pg_schema}".etl_offsets ORDER BY 1'
        before = dict(rows(admin_engine, when))
        produce(stack, topic, [good_message(i) for i in range(2)], partitions=1)
        second = run_batch(settings)
        with engine.connect() as conn:
            assert db_offsets.read_offset_owners(conn, tables, settings.group_id, topic) == {
                0: (7, second.run_id),
                1: (5, first.run_id),
            }
        after = dict(rows(admin_engine, when))
        assert after[0] > before[0] and after[1] == before[1]  # updated_at: when it last moved
    finally:
        engine.dispose()


@pytest.mark.parametrize("other", ["group", "topic"])
def test_a_run_moves_only_its_own_offsets(stack, make_topic, pg_schema, admin_engine, other) -> None:
    """Offsets of another consumer group on the same topic (a replay group), or of the same group on
    another topic, stored in one schema, at the same partition and offset: a run moves its own row
    only, and does not take the other row for a conflict."""
    topic = make_topic(partitions=1)
    other_topic = make_topic(partitions=1) if other == "topic" else topic
    for t in {topic, other_topic}:
        produce(stack, t, [good_message(i) for i in range(6)])
    mine = settings_for(stack, topic, pg_schema, group_id=f"a-{topic}")
    theirs = settings_for(
        stack, other_topic, pg_schema, group_id=f"b-{topic}" if other == "group" else mine.group_id
    )
    assert run_batch(mine).loaded == 6
    assert run_batch(theirs).read == 6
    produce(stack, topic, [good_message(10 + i) for i in range(4)])
    # Bounded even if it kept meeting a conflict: a few cycles, a few seconds.
    report = run_batch(dataclasses.replace(mine, cycles=5, max_seconds=20))
    assert (report.read, report.loaded, report.conflicts) == (4, 4, 0)
    assert stored_offsets(admin_engine, pg_schema, topic, mine.group_id) == {0: 10}
    assert stored_offsets(admin_engine, pg_schema, other_topic, theirs.group_id) == {0: 6}
