"""A killed run's row does not say `running` forever: the next run, or `status`, closes it as abandoned
with the time it was last seen."""

from __future__ import annotations

import json
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from etl.db import runs as db_runs
from etl.db import schema
from etl.run import run_batch
from tests.exactly_once import Job, assert_exactly_once, committed_cycles, kafka_ends, wait_for
from tests.support import cli_env, good_message, produce, rows, run_cli, settings_for


def test_a_run_killed_mid_drain_is_closed_as_abandoned_by_the_next_run(
    stack, make_topic, pg_schema, admin_engine, tmp_path
) -> None:
    topic = make_topic(partitions=1)
    produce(stack, topic, [good_message(i) for i in range(3000)])
    env = cli_env(stack, topic, pg_schema, METRIC_ETL_MAX_POLL_RECORDS="100")
    job = Job(env, ["--sleep", "0.2"], tmp_path, "killed")
    run_id = job.run_id(admin_engine, pg_schema)
    wait_for("two committed cycles", lambda: committed_cycles(admin_engine, pg_schema, run_id) >= 2)
    job.kill()
    (seen,) = rows(
        admin_engine, f'SELECT heartbeat_at FROM "{pg_schema}".etl_runs WHERE run_id = :r', r=run_id
    )
    assert seen.heartbeat_at is not None

    again = run_cli(["run", "--output", "json"], env)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["status"] == "ok"
    (killed,) = rows(
        admin_engine,
        f'SELECT status, finished_at, error FROM "{pg_schema}".etl_runs WHERE run_id = :r',
        r=run_id,
    )
    assert killed.status == "abandoned"
    assert killed.finished_at == seen.heartbeat_at  # the time it was last seen
    assert "last seen" in killed.error and f"pid {job.pid}" in killed.error
    assert rows(admin_engine, f"SELECT run_id FROM \"{pg_schema}\".etl_runs WHERE status = 'running'") == []

    status = run_cli(["status", "--output", "json"], env)
    runs = json.loads(status.stdout)["runs"]
    assert [r["status"] for r in runs if r["run_id"] == run_id] == ["abandoned"]
    assert all(r["status"] != "running" for r in runs)
    assert_exactly_once(admin_engine, pg_schema, topic, f"g-{topic}", kafka_ends(stack, topic))


def test_status_closes_a_killed_run_and_says_when_it_was_last_seen(
    stack, make_topic, pg_schema, admin_engine, tmp_path
) -> None:
    topic = make_topic(partitions=1)
    produce(stack, topic, [good_message(i) for i in range(3000)])
    env = cli_env(stack, topic, pg_schema, METRIC_ETL_MAX_POLL_RECORDS="100")
    job = Job(env, ["--sleep", "0.2"], tmp_path, "killed")
    run_id = job.run_id(admin_engine, pg_schema)
    wait_for("a committed cycle", lambda: committed_cycles(admin_engine, pg_schema, run_id) >= 1)
    job.kill()

    status = run_cli(["status"], env)
    assert "abandoned" in status.stdout and "last seen" in status.stdout
    assert " running " not in status.stdout
    assert status.returncode == 6  # the last finished run did not end ok: a monitor hears of it


def test_rows_of_other_hosts_are_closed_only_when_their_heartbeat_is_stale(
    stack, make_topic, pg_schema, admin_engine
) -> None:
    """A run on another host cannot be asked whether its process lives: its heartbeat decides, against a
    bound tied to the settings (db_runs.abandoned_after)."""
    topic = make_topic(partitions=1)
    s = settings_for(stack, topic, pg_schema)
    run_batch(s)  # makes the tables
    bound = timedelta(seconds=db_runs.abandoned_after(s))
    now = datetime.now(UTC)
    runs = schema.tables_for(s).runs
    with admin_engine.begin() as conn:
        for run_id, seen in (("stale", now - bound - timedelta(minutes=1)), ("fresh", now - bound / 2)):
            conn.execute(
                sa.insert(runs).values(
                    run_id=run_id,
                    group_id=s.group_id,
                    topic=topic,
                    host=f"not-{socket.gethostname()}",
                    pid=1,
                    started_at=seen - timedelta(minutes=5),
                    heartbeat_at=seen,
                    status="running",
                )
            )
    run_batch(s)
    got = dict(rows(admin_engine, f'SELECT run_id, status FROM "{pg_schema}".etl_runs WHERE pid = 1'))
    assert got == {"stale": "abandoned", "fresh": "running"}


def test_a_runs_table_of_an_older_version_gets_the_heartbeat_and_its_running_rows_closed(
    stack, make_topic, pg_schema, admin_engine
) -> None:
    """A table made before the heartbeat, with a row left `running` by a killed run of this host: the next
    run adds the column and closes the row (its process is gone), with its start as the last time seen."""
    topic = make_topic(partitions=1)
    produce(stack, topic, [good_message(i) for i in range(10)])
    s = settings_for(stack, topic, pg_schema)
    run_batch(s)
    gone = Job(cli_env(stack, topic, pg_schema), ["--help"], Path("/tmp"), f"help-{topic}")
    gone.proc.wait(30)  # a pid that was a process of this host and is no more
    started = datetime.now(UTC) - timedelta(hours=1)
    with admin_engine.begin() as conn:
        conn.exec_driver_sql(f'ALTER TABLE "{pg_schema}".etl_runs DROP COLUMN heartbeat_at')
        conn.exec_driver_sql(
            f'INSERT INTO "{pg_schema}".etl_runs (run_id, group_id, topic, host, pid, started_at, status) '
            "VALUES ('killed', %s, %s, %s, %s, %s, 'running')",
            (s.group_id, topic, socket.gethostname(), gone.pid, started),
        )
    after = run_batch(s)
    assert after.status == "ok"
    (row,) = rows(
        admin_engine, f"SELECT status, finished_at FROM \"{pg_schema}\".etl_runs WHERE run_id = 'killed'"
    )
    assert (row.status, row.finished_at) == ("abandoned", started)
    heartbeats = rows(
        admin_engine, f'SELECT run_id FROM "{pg_schema}".etl_runs WHERE heartbeat_at IS NOT NULL'
    )
    assert heartbeats == [(after.run_id,)]
