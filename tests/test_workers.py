"""--workers N: N group members in parallel processes, against the real broker and database.

What a user relies on: every message ends in exactly one table once, the one report adds up the
workers, each worker's run is recorded, a stop request reaches every worker, no process is left
behind, and --lock still makes a second run exit 75.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest

from etl.report import PartitionReport, RunReport
from etl.run.workers import merge, share
from tests.exactly_once import Job, assert_consistent, assert_exactly_once, kafka_ends, wait_for
from tests.support import REPO, cli_env, count, good_message, produce, rows, run_cli

pytestmark = pytest.mark.usefixtures("stack")


def test_share_splits_a_message_cap_evenly() -> None:
    assert [share(1001, 2, i) for i in range(2)] == [501, 500]
    assert [share(5, 3, i) for i in range(3)] == [2, 2, 1]
    assert [share(1, 3, i) for i in range(3)] == [1, 0, 0]
    assert share(None, 4, 2) is None


def _report(run_id: str, read: int, partitions: dict[int, tuple[int, int]], reason: str) -> RunReport:
    r = RunReport(run_id, "t", "g", datetime.now(UTC), read=read, loaded=read - 1, rejected=1)
    r.committed_cycles, r.stop_reason, r.status = 1, reason, "ok"
    r.rejects_by_rule = {"type": 1}
    r.timings = {"load": 1.0}
    for p, (start, end) in partitions.items():
        r.partitions[p] = PartitionReport(p, start=start, end=end, end_offset=end, read=end - start)
    return r


def test_merged_report_adds_up_the_workers(tmp_path: object) -> None:
    from etl.config import load_settings

    settings = load_settings(env={}, overrides={"workers": 2})
    a = _report("a", 10, {0: (0, 10)}, "caught_up")
    b = _report("b", 7, {1: (3, 10)}, "caught_up")
    idle = _report("c", 0, {}, "no_partitions")
    idle.loaded = idle.rejected = 0
    idle.rejects_by_rule, idle.timings = {}, {}
    merged = merge(
        settings,
        datetime.now(UTC),
        [{"kind": "ok", "report": a}, {"kind": "ok", "report": b}, {"kind": "ok", "report": idle}],
    )
    assert (merged.read, merged.loaded, merged.rejected) == (17, 15, 2)
    assert merged.rejects_by_rule == {"type": 2}
    assert merged.timings == {"load": 2.0}
    assert merged.stop_reason == "caught_up"  # the worker without partitions says nothing of the run
    assert merged.status == "ok" and merged.workers == ["a", "b", "c"]
    assert {p: (r.start, r.end, r.read) for p, r in merged.partitions.items()} == {
        0: (0, 10, 10),
        1: (3, 10, 7),
    }


def _backlog(stack: object, topic: str, n: int) -> int:
    values = [good_message(i) if i % 50 else b"{not json" for i in range(n)]
    return produce(stack, topic, values, partitions=6)  # type: ignore[arg-type]


def test_two_workers_drain_every_message_once(stack, make_topic, pg_schema, admin_engine) -> None:  # type: ignore[no-untyped-def]
    topic = make_topic(partitions=6)
    n = _backlog(stack, topic, 3_000)
    env = cli_env(stack, topic, pg_schema)
    done = run_cli(["run", "--workers", "2", "--output", "json"], env, timeout=180)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["read"] == n and report["loaded"] + report["rejected"] == n
    assert report["rejected"] == 60 and report["status"] == "ok"
    assert count(admin_engine, pg_schema, "website_metrics") == n - 60
    assert count(admin_engine, pg_schema, "website_metrics_rejects") == 60
    assert len(report["workers"]) == 2
    recorded = rows(admin_engine, f'SELECT run_id, status, read FROM "{pg_schema}".etl_runs')
    assert sorted(r.run_id for r in recorded) == sorted(report["workers"])
    assert all(r.status == "ok" for r in recorded) and sum(r.read for r in recorded) == n
    assert sorted(report["partitions"]) == [str(p) for p in range(6)]
    assert all(p["lag"] == 0 for p in report["partitions"].values())
    # each worker's log lines say which worker wrote them
    assert "worker 1: " in done.stderr and "worker 2: " in done.stderr

    again = run_cli(["run", "--workers", "2", "--output", "json"], env, timeout=180)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["read"] == 0
    assert count(admin_engine, pg_schema, "website_metrics") == n - 60


def test_message_cap_is_shared_between_workers(stack, make_topic, pg_schema, admin_engine) -> None:  # type: ignore[no-untyped-def]
    topic = make_topic(partitions=6)
    _backlog(stack, topic, 3_000)
    env = cli_env(stack, topic, pg_schema)
    done = run_cli(["run", "--workers", "2", "--max-messages", "1001", "--output", "json"], env, timeout=180)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["read"] == 1001
    stored = count(admin_engine, pg_schema, "website_metrics") + count(
        admin_engine, pg_schema, "website_metrics_rejects"
    )
    assert stored == 1001


def test_sigterm_stops_every_worker_and_leaves_none(stack, make_topic, pg_schema, admin_engine) -> None:  # type: ignore[no-untyped-def]
    topic = make_topic(partitions=6)
    env = cli_env(stack, topic, pg_schema)
    proc = _spawn(env, "--output", "json")
    try:
        n = _backlog(stack, topic, 1_200)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            stored = (
                count(admin_engine, pg_schema, "website_metrics")
                if _has_tables(admin_engine, pg_schema)
                else 0
            )
            if stored == n - 24:
                break
            time.sleep(0.5)
        children = _children(proc.pid)
        assert len(children) == 2
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert report["stop_reason"] == "signal" and report["read"] == n
    assert count(admin_engine, pg_schema, "website_metrics") == n - 24
    assert not [pid for pid in children if _alive(pid)]


def test_lock_is_held_for_all_workers(stack, make_topic, pg_schema) -> None:  # type: ignore[no-untyped-def]
    topic = make_topic(partitions=2)
    produce(stack, topic, [good_message(i) for i in range(10)], partitions=2)
    env = cli_env(stack, topic, pg_schema)
    first = _spawn(env, "--lock")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(_children(first.pid)) < 2:
            time.sleep(0.2)
        time.sleep(1)
        second = run_cli(["run", "--lock"], env, timeout=60)
        assert second.returncode == 75, second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        try:
            first.communicate(timeout=60)
        finally:
            if first.poll() is None:
                first.kill()
    assert first.returncode == 0


def test_workers_out_of_range_is_a_configuration_error(stack, unique_name, pg_schema) -> None:  # type: ignore[no-untyped-def]
    env = cli_env(stack, unique_name, pg_schema, METRIC_ETL_WORKERS="0")
    done = run_cli(["run"], env, timeout=60)
    assert done.returncode == 3
    assert "workers: must be between 1 and 64, got 0" in done.stderr


def _spawn(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    """``metric-etl run --workers 2 --follow ARGS`` in the background."""
    return subprocess.Popen(
        [sys.executable, "-m", "etl", "run", "--workers", "2", "--follow", *args],
        env=env,
        cwd=str(REPO),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _has_tables(engine: object, schema: str) -> bool:
    found = rows(
        engine, "SELECT 1 FROM pg_tables WHERE schemaname = :s AND tablename = 'website_metrics'", s=schema
    )
    return bool(found)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_a_killed_worker_fails_the_run_and_loses_nothing(  # type: ignore[no-untyped-def]
    stack, make_topic, pg_schema, admin_engine, tmp_path
) -> None:
    """SIGKILL one worker mid-run (the OOM killer, say): the run says so and exits 1, what the
    workers committed is consistent, and the next run loads the rest exactly once."""
    topic = make_topic(partitions=6)
    _backlog(stack, topic, 4_000)
    env = cli_env(stack, topic, pg_schema, METRIC_ETL_MAX_POLL_RECORDS="50")
    job = Job(env, ["--workers", "2", "--output", "json"], tmp_path)
    wait_for("two workers", lambda: len(_children(job.pid)) == 2, 30)
    victim = _children(job.pid)[0]
    wait_for(
        "a committed cycle",
        lambda: (
            _has_tables(admin_engine, pg_schema) and count(admin_engine, pg_schema, "website_metrics") > 0
        ),
        60,
    )
    os.kill(victim, signal.SIGKILL)
    assert job.wait(120) == 1, job.stderr[-3000:]
    assert "died" in job.stderr
    assert_consistent(admin_engine, pg_schema, topic, f"g-{topic}")
    again = run_cli(["run", "--workers", "2"], env, timeout=180)
    assert again.returncode == 0, again.stderr
    assert_exactly_once(admin_engine, pg_schema, topic, f"g-{topic}", kafka_ends(stack, topic))


def test_ctrl_c_twice_interrupts_every_worker(  # type: ignore[no-untyped-def]
    stack, make_topic, pg_schema, admin_engine, tmp_path
) -> None:
    """The first Ctrl-C asks every worker to finish its cycle, the second interrupts them: the run
    ends at once with 0 or 130 (130 when a cycle was cut short), no worker is left and nothing is
    half written."""
    topic = make_topic(partitions=6)
    _backlog(stack, topic, 20_000)
    env = cli_env(stack, topic, pg_schema, METRIC_ETL_MAX_POLL_RECORDS="500")
    job = Job(env, ["--workers", "2", "--output", "json"], tmp_path)
    wait_for("two workers", lambda: len(_children(job.pid)) == 2, 30)
    children = _children(job.pid)
    wait_for(
        "a committed cycle",
        lambda: (
            _has_tables(admin_engine, pg_schema) and count(admin_engine, pg_schema, "website_metrics") > 0
        ),
        60,
    )
    job.send(signal.SIGINT)
    wait_for("the first SIGINT", lambda: "SIGINT received" in job.stderr, 10, every=0.01)
    job.send(signal.SIGINT)
    assert job.wait(60) in (0, 130), job.stderr[-3000:]
    assert not [pid for pid in children if _alive(pid)]
    assert_consistent(admin_engine, pg_schema, topic, f"g-{topic}")
    assert run_cli(["run", "--workers", "2"], env, timeout=180).returncode == 0
    assert_exactly_once(admin_engine, pg_schema, topic, f"g-{topic}", kafka_ends(stack, topic))
