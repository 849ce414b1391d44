"""Runs at once: the overlapping cron run, and scaling out through Kafka's own consumer groups.

Two or three real processes in one group on a 6-partition topic share the work through rebalances;
the conditional offset advance makes a run that lost a partition roll back instead of loading it
twice. ``--lock`` is for those who want strictly one run at a time.
"""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from etl.db import write
from etl.run import run_batch
from etl.run.pipeline import Pipeline
from tests.exactly_once import Job, assert_exactly_once, committed_cycles, kafka_ends, wait_for
from tests.support import cli_env, good_message, produce, rows, settings_for
from tests.test_faults import backlog

pytestmark = pytest.mark.services


def _finish(jobs: list[Job]) -> list[dict]:
    reports = []
    for job in jobs:
        code = job.wait(180)
        assert code == 0, f"run {job.out_path.stem} exited {code}:\n{job.stderr[-3000:]}"
        reports.append(json.loads(job.stdout))
    return reports


def _check(stack, admin_engine, schema: str, topic: str, reports: list[dict], produced: int) -> None:
    # Each message counted once over all runs: a cycle that lost its partitions was rolled back.
    assert sum(r["loaded"] + r["rejected"] for r in reports) == produced, reports
    assert all(r["status"] == "ok" for r in reports)
    assert sum(r["read"] > 0 for r in reports) >= 2, "the work was not shared"
    assert_exactly_once(admin_engine, schema, topic, f"g-{topic}", kafka_ends(stack, topic))


def test_two_runs_started_together_share_the_partitions(
    stack, make_topic, pg_schema, admin_engine, tmp_path
) -> None:
    topic = make_topic(partitions=6)
    produce(stack, topic, backlog(3000, bad_every=40), partitions=6)
    env = cli_env(stack, topic, pg_schema, METRIC_ETL_MAX_POLL_RECORDS="20")
    jobs = [Job(env, ["--sleep", "0.02", "--output", "json"], tmp_path, f"run{i}") for i in range(2)]
    reports = _finish(jobs)
    _check(stack, admin_engine, pg_schema, topic, reports, 3000)


def test_three_runs_joining_one_by_one_rebalance_without_loss_or_doubles(
    stack, make_topic, pg_schema, admin_engine, tmp_path
) -> None:
    """Each new run joins while the others are mid-cycle: every member's partitions are revoked and
    reassigned, in-flight batches of moved partitions meet the conditional advance."""
    topic = make_topic(partitions=6)
    produce(stack, topic, backlog(3000, bad_every=40), partitions=6)
    env = cli_env(stack, topic, pg_schema, METRIC_ETL_MAX_POLL_RECORDS="20")
    jobs: list[Job] = []
    for i in range(3):
        job = Job(env, ["--sleep", "0.03", "--output", "json"], tmp_path, f"run{i}")
        jobs.append(job)
        if i < 2:
            run_id = job.run_id(admin_engine, pg_schema)
            wait_for("its first cycles", lambda r=run_id: committed_cycles(admin_engine, pg_schema, r) >= 3)
    reports = _finish(jobs)
    _check(stack, admin_engine, pg_schema, topic, reports, 3000)
    assert sum("assigned partitions" in job.stderr for job in jobs) == 3


def test_lock_makes_a_second_run_exit_75_at_once_doing_nothing(
    stack, make_topic, pg_schema, admin_engine, tmp_path
) -> None:
    topic = make_topic(partitions=2)
    produce(stack, topic, backlog(400, bad_every=20), partitions=2)
    env = cli_env(stack, topic, pg_schema, METRIC_ETL_MAX_POLL_RECORDS="10")
    first = Job(env, ["--lock", "--sleep", "0.05", "--output", "json"], tmp_path, "first")
    run_id = first.run_id(admin_engine, pg_schema)
    wait_for("a committed cycle", lambda: committed_cycles(admin_engine, pg_schema, run_id) >= 1)
    second = Job(env, ["--lock", "--output", "json"], tmp_path, "second")
    assert second.wait(60) == 75, second.stderr
    assert "another run holds the lock" in second.stderr
    # "At once": it did not wait for the lock, the first run is still going.
    assert first.alive(), "the first run should still be going"
    runs = rows(admin_engine, f'SELECT run_id FROM "{pg_schema}".etl_runs')
    assert [r.run_id for r in runs] == [run_id]  # the second run did not even record itself
    assert first.wait(120) == 0, first.stderr[-3000:]
    assert_exactly_once(admin_engine, pg_schema, topic, f"g-{topic}", kafka_ends(stack, topic))


def _steal(admin_engine: sa.Engine, schema: str, topic: str, group: str, partition: int, upto: int) -> None:
    """Do what another run would: load a partition up to ``upto`` and advance its stored offset."""
    key = {"g": group, "t": topic, "p": partition}
    offsets, metrics = f'"{schema}".etl_offsets', f'"{schema}".website_metrics'
    with admin_engine.begin() as conn:
        start = conn.execute(
            sa.text(
                f"SELECT next_offset FROM {offsets} WHERE group_id = :g AND topic = :t AND partition = :p"
            ),
            key,
        ).scalar()
        conn.execute(
            sa.text(
                f'INSERT INTO {metrics} (url, checked_at, topic, partition, "offset", run_id) '
                "SELECT 'https://example.com/other', now(), :t, :p, o, 'other-run' "
                "FROM generate_series(:lo, :hi) o"
            ),
            {**key, "lo": start or 0, "hi": upto - 1},
        )
        conn.execute(
            sa.text(
                f"INSERT INTO {offsets} (group_id, topic, partition, next_offset, run_id) "
                "VALUES (:g, :t, :p, :n, 'other-run') ON CONFLICT (group_id, topic, partition) "
                "DO UPDATE SET next_offset = excluded.next_offset, run_id = excluded.run_id"
            ),
            {**key, "n": upto},
        )


def test_a_run_that_lost_the_race_rolls_back_and_resumes_from_the_winner(
    stack, make_topic, pg_schema, admin_engine, monkeypatch
) -> None:
    """Deterministic: while a run holds a batch, another run advances one of its partitions. The
    run's conditional advance fails, the whole cycle rolls back (the other partition's rows too),
    and it re-reads from the stored offsets, including a partition that had no stored offset yet."""
    topic = make_topic(partitions=2)
    produce(stack, topic, [good_message(i) for i in range(100)], partitions=2)
    s = settings_for(stack, topic, pg_schema, max_poll_records=100)
    real = write.load_cycle
    calls: list[int] = []

    def racing(conn, tables, settings, batch):
        calls.append(len(batch.good))
        if len(calls) == 1:
            # Both partitions in the batch, neither stored yet; the other run wins partition 1.
            assert {a.partition for a in batch.advances} == {0, 1}
            _steal(admin_engine, pg_schema, topic, s.group_id, partition=1, upto=20)
        return real(conn, tables, settings, batch)

    monkeypatch.setattr(write, "load_cycle", racing)
    report = run_batch(s)
    assert report.conflicts == 1 and report.status == "ok"
    assert report.loaded == 80  # 50 of partition 0 (read again after the rollback), 30 of partition 1
    assert_exactly_once(admin_engine, pg_schema, topic, s.group_id, {0: 50, 1: 50})
    other = rows(
        admin_engine, f"SELECT count(*) AS n FROM \"{pg_schema}\".website_metrics WHERE run_id = 'other-run'"
    )
    assert other[0].n == 20


def test_a_batch_read_while_the_load_before_it_is_overtaken_is_read_again(
    stack, make_topic, pg_schema, admin_engine, caplog
) -> None:
    """The next batch is read while a load is in flight. When that load meets another run's offset
    advance, the batch read meanwhile started from the wrong place: it is put back, and the run goes
    on from the other run's offset with every message stored once."""
    import logging
    import threading

    from tests.test_faults import create_tables

    topic = make_topic(partitions=1)
    produce(stack, topic, [good_message(i) for i in range(30)])
    create_tables(stack, pg_schema)
    gate = 7_300_001  # an advisory lock the test holds: the run's first offset advance waits on it
    with admin_engine.begin() as conn:
        conn.execute(
            sa.text(
                f"""CREATE FUNCTION "{pg_schema}".gate() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                  IF current_setting('application_name') LIKE 'metric-etl run %' THEN
                    PERFORM pg_advisory_lock({gate}); PERFORM pg_advisory_unlock({gate});
                  END IF;
                  RETURN NULL;
                END $$"""
            )
        )
        conn.execute(
            sa.text(
                f'CREATE TRIGGER gate BEFORE INSERT OR UPDATE ON "{pg_schema}".etl_offsets '
                f'FOR EACH STATEMENT EXECUTE FUNCTION "{pg_schema}".gate()'
            )
        )
    holder = admin_engine.connect()
    holder.execute(sa.text(f"SELECT pg_advisory_lock({gate})"))
    reports: list = []
    settings = settings_for(stack, topic, pg_schema, max_poll_records=10)
    pipeline = Pipeline(settings)
    with caplog.at_level(logging.INFO, logger="etl"):
        run = threading.Thread(target=lambda: reports.append(pipeline.run()))
        run.start()
        try:
            waiting = (
                "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'metric-etl run %' "
                "AND wait_event_type = 'Lock' AND wait_event = 'advisory'"
            )
            wait_for("the first load to wait", lambda: rows(admin_engine, waiting)[0][0] == 1)
            # The run reads and prepares its second batch meanwhile (counted as read when prepared).
            wait_for("the second batch read", lambda: pipeline.report.read >= 20)
            # Another run loads offsets 0-9 and advances the partition first.
            with admin_engine.begin() as conn:
                for offset in range(10):
                    conn.execute(
                        sa.text(
                            f'INSERT INTO "{pg_schema}".website_metrics (url, checked_at, topic, '
                            "partition, \"offset\", run_id) VALUES (:u, now(), :t, 0, :o, 'other')"
                        ),
                        {"u": f"https://other.example/{offset}", "t": topic, "o": offset},
                    )
                conn.execute(
                    sa.text(
                        f'INSERT INTO "{pg_schema}".etl_offsets (group_id, topic, partition, next_offset, '
                        "run_id) VALUES (:g, :t, 0, 10, 'other')"
                    ),
                    {"g": settings.group_id, "t": topic},
                )
        finally:
            holder.execute(sa.text(f"SELECT pg_advisory_unlock({gate})"))
            holder.close()
            run.join(120)
    (report,) = reports
    assert "its 10 messages will be read again" in caplog.text
    assert (report.read, report.loaded, report.conflicts) == (20, 20, 1)
    assert_exactly_once(admin_engine, pg_schema, topic, settings.group_id, {0: 30})
    theirs = rows(
        admin_engine,
        f'SELECT count(*) FROM "{pg_schema}".website_metrics WHERE run_id = :r',
        r=report.run_id,
    )
    assert theirs[0][0] == 20
