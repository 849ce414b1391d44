"""Operating the job as a scheduler and an on-call person see it: a lock skip is a skip, a stop is a
stop, every command names its config file, errors send a scheduler the right way, waits are bounded."""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.support import cli_env, good_message, produce, rows, run_cli

pytestmark = pytest.mark.services


def _hold_run_lock(admin_engine, topic: str):
    """A connection holding the advisory lock of the test's group and topic (as another run would)."""
    from sqlalchemy import text

    holder = admin_engine.connect()
    key = f"metric-etl:g-{topic}:{topic}"
    assert holder.execute(text("SELECT pg_try_advisory_lock(hashtext(:k))"), {"k": key}).scalar()
    holder.commit()
    return holder


def _samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value of a Prometheus text file (labels left in the key)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[re.sub(r"\{.*\}", "", name) + (re.search(r"\{.*\}", name) or [""])[0]] = float(value)
    return out


def _names(text: str) -> set[str]:
    return {re.sub(r"\{.*", "", line.split(" ")[0]) for line in text.splitlines() if not line.startswith("#")}


# -- 4: a run that finds the lock held is a skip --------------------------------------------------


def test_lock_held_is_a_skip_in_report_log_runs_table_and_metrics_file(
    stack, make_topic, pg_schema, admin_engine, tmp_path
) -> None:
    topic = make_topic(partitions=2)
    produce(stack, topic, [good_message(i) for i in range(10)], partitions=2)
    env = cli_env(stack, topic, pg_schema)
    prom = tmp_path / "metric_etl.prom"
    first = run_cli(["run", "--lock", "--metrics-file", str(prom)], env)
    assert first.returncode == 0, first.stderr
    before = _samples(prom.read_text())
    assert before[f'metric_etl_last_run_success{{topic="{topic}",group_id="g-{topic}"}}'] == 1
    lag_names = {"metric_etl_lag_messages", "metric_etl_partition_lag_messages"}
    assert lag_names <= _names(prom.read_text())

    holder = _hold_run_lock(admin_engine, topic)
    try:
        as_json = run_cli(["run", "--lock", "--output", "json", "--metrics-file", str(prom)], env)
        as_text = run_cli(["run", "--lock", "--metrics-file", str(prom)], env)
    finally:
        holder.close()

    for proc in (as_json, as_text):
        assert proc.returncode == 75, proc.stderr
        assert " ERROR " not in proc.stderr, proc.stderr
        assert re.search(r" WARNING run \w+ skipped \(lock_held\)", proc.stderr), proc.stderr
        assert "another run holds the lock" in proc.stderr
    report = json.loads(as_json.stdout)
    assert (report["status"], report["stop_reason"]) == ("skipped", "lock_held")
    assert report["finished_at"] is not None and report["exit_code"] == 75
    assert "skipped (another run holds the lock (--lock); nothing was done)" in as_text.stdout

    statuses = [r[0] for r in rows(admin_engine, f'SELECT status FROM "{pg_schema}".etl_runs')]
    assert statuses == ["ok"], statuses  # the skips left no row, least of all one "running"

    after = prom.read_text()
    samples = _samples(after)
    labels = f'{{topic="{topic}",group_id="g-{topic}"}}'
    # The last real run's outcome stands: its success time, its success and its lag.
    for name in (
        "metric_etl_last_success_timestamp_seconds",
        "metric_etl_last_run_success",
        "metric_etl_lag_messages",
    ):
        assert samples[name + labels] == before[name + labels], name
    assert lag_names <= _names(after)
    assert samples["metric_etl_skipped_runs" + labels] == 2
    assert samples["metric_etl_last_skip_timestamp_seconds" + labels] >= time.time() - 120
