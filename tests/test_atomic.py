"""`metric-etl run --atomic`: the whole bounded run commits in one transaction at its end, or nothing of
it is kept: a SIGKILL, a SIGTERM or a reject ratio over the bound in a later cycle leave no row, no
reject and no offset of the run, the run's row says it was rolled back and why, and the next run
loads every message exactly once. An ordinary run overlapping an atomic one stops at once."""

from __future__ import annotations

import json
import random
import signal
import time

import pytest

from etl.config import load_settings
from etl.errors import ConfigError
from tests.exactly_once import Job, assert_exactly_once, backends, kafka_ends, terminate, wait_for
from tests.support import cli_env, count, good_message, produce, rows, run_cli

BAD = b'{"url": "not a url", "checked_at": "yesterday"}'


def _nothing_of_the_run(engine, schema: str, group: str) -> None:
    """No metrics row, no reject and no stored offset of the group."""
    assert count(engine, schema, "website_metrics") == 0
    assert count(engine, schema, "website_metrics_rejects") == 0
    offsets = rows(engine, f'SELECT partition FROM "{schema}".etl_offsets WHERE group_id = :g', g=group)
    assert offsets == []


def _ledger(engine, schema: str, run_id: str):
    (row,) = rows(
        engine,
        f'SELECT status, stop_reason, cycles, read, loaded, rejected, error FROM "{schema}".etl_runs '
        "WHERE run_id = :r",
        r=run_id,
    )
    return row


def _cycles(engine, schema: str, run_id: str) -> int:
    return int(rows(engine, f'SELECT cycles FROM "{schema}".etl_runs WHERE run_id = :r', r=run_id)[0][0])


def test_atomic_with_follow_or_workers_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError) as follow:
        load_settings(env={"METRIC_ETL_ATOMIC": "true"}, overrides={"follow": True})
    assert "atomic and follow" in str(follow.value)
    with pytest.raises(ConfigError) as workers:
        load_settings(env={}, overrides={"atomic": True, "workers": 2})
    assert "atomic and workers" in str(workers.value)
    assert load_settings(env={}, overrides={"atomic": True, "dry_run": True}).atomic


def test_atomic_follow_exits_3_before_connecting(stack, unique_name) -> None:
    env = cli_env(stack, unique_name, unique_name, METRIC_ETL_BOOTSTRAP_SERVERS="127.0.0.1:1")
    proc = run_cli(["run", "--atomic", "--follow"], env, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert (
        "Error: invalid configuration: atomic and follow: an atomic run commits when it ends, "
        "and --follow never ends; choose one" in proc.stderr
    )


def test_an_atomic_backfill_commits_every_cycle_at_once(stack, make_topic, pg_schema, admin_engine) -> None:
    topic = make_topic(partitions=2)
    produce(stack, topic, [good_message(i) if i % 7 else BAD for i in range(600)], partitions=2)
    env = cli_env(stack, topic, pg_schema, METRIC_ETL_MAX_POLL_RECORDS="50")
    proc = run_cli(["run", "--atomic", "--cycles", "4", "--output", "json"], env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["status"], report["stop_reason"], report["atomic"]) == ("ok", "cycles", True)
    assert report["committed_cycles"] == report["cycles"] == 4
    assert report["loaded"] + report["rejected"] == report["read"] == 200
    assert count(admin_engine, pg_schema, "website_metrics") == report["loaded"]
    assert count(admin_engine, pg_schema, "website_metrics_rejects") == report["rejected"] > 0
    row = _ledger(admin_engine, pg_schema, report["run_id"])
    assert (row.status, row.stop_reason, row.cycles, row.read) == ("ok", "cycles", 4, 200)
    assert (row.loaded, row.rejected) == (report["loaded"], report["rejected"])

    rest = run_cli(["run", "--atomic", "--output", "json"], env)
    assert rest.returncode == 0, rest.stderr
    assert_exactly_once(admin_engine, pg_schema, topic, f"g-{topic}", kafka_ends(stack, topic))


def test_a_sigkilled_atomic_backfill_leaves_nothing_and_the_rerun_loads_all_once(
    stack, make_topic, pg_schema, admin_engine, tmp_path
) -> None:
    topic, group = make_topic(partitions=2), None
    produce(stack, topic, [good_message(i) if i % 25 else BAD for i in range(1000)], partitions=2)
    group = f"g-{topic}"
    env = cli_env(stack, topic, pg_schema, METRIC_ETL_MAX_POLL_RECORDS="40")
    # At least three cycles of 0.5 s left after cycle `at`: a slow test process must not see the run
    # commit its tenth cycle before it looks (0.3 s and `at` up to 9 left one, and failed once in CI).
    job = Job(env, ["--atomic", "--cycles", "10", "--sleep", "0.5"], tmp_path, "killed")
    run_id = job.run_id(admin_engine, pg_schema)
    at = random.randint(2, 7)
    wait_for(f"cycle {at} staged", lambda: _cycles(admin_engine, pg_schema, run_id) >= at, timeout=90)
    # The cycles are written, uncommitted: no other session sees any of them.
    _nothing_of_the_run(admin_engine, pg_schema, group)
    job.kill()
    _nothing_of_the_run(admin_engine, pg_schema, group)

    again = run_cli(["run", "--atomic", "--output", "json"], env)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["loaded"] + json.loads(again.stdout)["rejected"] == 1000
    assert_exactly_once(admin_engine, pg_schema, topic, group, kafka_ends(stack, topic))
    killed = _ledger(admin_engine, pg_schema, run_id)
    assert (killed.status, killed.stop_reason, killed.loaded, killed.rejected) == (
        "rolled_back",
        "abandoned",
        0,
        0,
    )
    assert killed.cycles >= at and "nothing of it was kept" in killed.error


def test_a_reject_ratio_over_the_bound_in_a_later_cycle_rolls_back_every_cycle(
    stack, make_topic, pg_schema, admin_engine
) -> None:
    topic = make_topic(partitions=1)
    produce(stack, topic, [good_message(i) for i in range(300)] + [BAD] * 200)
    env = cli_env(stack, topic, pg_schema, METRIC_ETL_MAX_POLL_RECORDS="100")
    proc = run_cli(["run", "--atomic", "--max-reject-ratio", "0.5", "--output", "json"], env)
    assert proc.returncode == 5, proc.stderr
    assert "the atomic run rolled back its 3 cycles: nothing of it was kept" in proc.stderr
    report = json.loads(proc.stdout)
    assert (report["status"], report["stop_reason"]) == ("rolled_back", "reject_ratio")
    assert (report["loaded"], report["rejected"], report["rolled_back"]) == (0, 0, 300)
    _nothing_of_the_run(admin_engine, pg_schema, f"g-{topic}")
    row = _ledger(admin_engine, pg_schema, report["run_id"])
    assert (row.status, row.stop_reason, row.loaded, row.rejected) == ("rolled_back", "reject_ratio", 0, 0)

    rest = run_cli(["run", "--atomic", "--output", "json"], env)  # no bound: the rejects are data
    assert rest.returncode == 0, rest.stderr
    assert_exactly_once(admin_engine, pg_schema, topic, f"g-{topic}", kafka_ends(stack, topic))
    assert count(admin_engine, pg_schema, "website_metrics_rejects") == 200


def test_sigterm_rolls_an_atomic_run_back_and_exits_130(
    stack, make_topic, pg_schema, admin_engine, tmp_path
) -> None:
    topic = make_topic(partitions=1)
    produce(stack, topic, [good_message(i) for i in range(2000)])
    env = cli_env(stack, topic, pg_schema, METRIC_ETL_MAX_POLL_RECORDS="50")
    job = Job(env, ["--atomic", "--sleep", "0.3", "--output", "json"], tmp_path, "stopped")
    run_id = job.run_id(admin_engine, pg_schema)
    wait_for("two staged cycles", lambda: _cycles(admin_engine, pg_schema, run_id) >= 2, timeout=90)
    job.send(signal.SIGTERM)
    assert job.wait(60) == 130, job.stderr
    assert "SIGTERM received: finishing the current cycle, then rolling the whole atomic run back" in (
        job.stderr
    )
    assert "stopped by SIGTERM before the atomic run ended" in job.stderr
    report = json.loads(job.stdout)
    assert (report["status"], report["stop_reason"], report["loaded"]) == ("rolled_back", "signal", 0)
    assert report["rolled_back"] >= 100
    _nothing_of_the_run(admin_engine, pg_schema, f"g-{topic}")
    row = _ledger(admin_engine, pg_schema, run_id)
    assert (row.status, row.stop_reason, row.loaded) == ("rolled_back", "signal", 0)


def test_a_lost_connection_fails_an_atomic_run_at_once_with_exit_4_keeping_nothing(
    stack, make_topic, pg_schema, admin_engine, tmp_path
) -> None:
    """A retry cannot bring back the cycles of a lost transaction: no retry, exit 4, nothing kept."""
    topic = make_topic(partitions=1)
    produce(stack, topic, [good_message(i) for i in range(2000)])
    env = cli_env(stack, topic, pg_schema, METRIC_ETL_MAX_POLL_RECORDS="50", METRIC_ETL_RETRY_DEADLINE="60")
    job = Job(env, ["--atomic", "--sleep", "0.3", "--output", "json"], tmp_path, "lost")
    run_id = job.run_id(admin_engine, pg_schema)
    wait_for("two staged cycles", lambda: _cycles(admin_engine, pg_schema, run_id) >= 2, timeout=90)
    t = time.monotonic()
    assert terminate(admin_engine, backends(admin_engine, run_id, writing=True)) >= 1
    assert job.wait(60) == 4, job.stderr
    assert time.monotonic() - t < 30  # well inside the retry deadline: nothing to retry
    assert "an atomic run cannot retry one cycle inside its one transaction" in job.stderr
    report = json.loads(job.stdout)
    assert (report["status"], report["stop_reason"], report["loaded"]) == ("rolled_back", "error", 0)
    _nothing_of_the_run(admin_engine, pg_schema, f"g-{topic}")
    row = _ledger(admin_engine, pg_schema, run_id)
    assert (row.status, row.stop_reason, row.loaded) == ("rolled_back", "error", 0)

    again = run_cli(["run", "--atomic", "--output", "json"], env)
    assert again.returncode == 0, again.stderr
    assert_exactly_once(admin_engine, pg_schema, topic, f"g-{topic}", kafka_ends(stack, topic))


def test_a_run_overlapping_an_atomic_run_stops_within_the_lock_bound_loading_nothing(
    stack, make_topic, pg_schema, admin_engine, tmp_path
) -> None:
    """While an atomic run holds its transaction open, an ordinary run and a second atomic run of the
    same group end at once with exit 75, nothing done; the atomic run commits; nothing is loaded twice."""
    topic = make_topic(partitions=2)
    produce(stack, topic, [good_message(i) for i in range(2000)], partitions=2)
    bound = 5.0
    env = cli_env(stack, topic, pg_schema, METRIC_ETL_MAX_POLL_RECORDS="20", METRIC_ETL_DB_LOCK_TIMEOUT="5")
    atomic = Job(env, ["--atomic", "--cycles", "12", "--sleep", "0.5", "--output", "json"], tmp_path, "a")
    run_id = atomic.run_id(admin_engine, pg_schema)
    wait_for("two staged cycles", lambda: _cycles(admin_engine, pg_schema, run_id) >= 2, timeout=90)
    for args in (["run"], ["run", "--atomic"]):
        t = time.monotonic()
        other = run_cli([*args, "--output", "json"], env, timeout=60)
        took = time.monotonic() - t
        assert other.returncode == 75, other.stderr
        assert "Skipped: an atomic run (`metric-etl run --atomic`) is loading group" in other.stderr
        assert took < bound + 15  # the start of a Python process included; no lock wait at all
        assert atomic.alive()  # it did not disturb the atomic run (it never joined the group)
    assert rows(admin_engine, f'SELECT run_id FROM "{pg_schema}".etl_runs WHERE run_id <> :r', r=run_id) == []
    assert atomic.wait(120) == 0, atomic.stderr
    report = json.loads(atomic.stdout)
    assert (report["status"], report["loaded"], report["read"]) == ("ok", 240, 240)

    rest = run_cli(["run", "--output", "json"], env)
    assert rest.returncode == 0, rest.stderr
    assert_exactly_once(admin_engine, pg_schema, topic, f"g-{topic}", kafka_ends(stack, topic))


def test_an_atomic_run_started_during_an_ordinary_run_stops_it_at_its_next_cycle(
    stack, make_topic, pg_schema, admin_engine, tmp_path
) -> None:
    topic = make_topic(partitions=1)
    produce(stack, topic, [good_message(i) for i in range(3000)])
    env = cli_env(stack, topic, pg_schema, METRIC_ETL_MAX_POLL_RECORDS="20", METRIC_ETL_DB_LOCK_TIMEOUT="5")
    ordinary = Job(env, ["--sleep", "0.3", "--output", "json"], tmp_path, "ordinary")
    run_id = ordinary.run_id(admin_engine, pg_schema)
    wait_for("two committed cycles", lambda: _cycles(admin_engine, pg_schema, run_id) >= 2, timeout=90)
    atomic = Job(env, ["--atomic", "--cycles", "5", "--output", "json"], tmp_path, "atomic")
    assert ordinary.wait(60) == 75, ordinary.stderr
    assert "this run stopped; this cycle was rolled back" in ordinary.stderr
    stopped = json.loads(ordinary.stdout)
    assert (stopped["status"], stopped["stop_reason"]) == ("skipped", "atomic_run")
    assert atomic.wait(120) == 0, atomic.stderr
    rest = run_cli(["run", "--output", "json"], env)
    assert rest.returncode == 0, rest.stderr
    assert_exactly_once(admin_engine, pg_schema, topic, f"g-{topic}", kafka_ends(stack, topic))
