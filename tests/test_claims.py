"""README claims that had no test able to catch a regression (issue 14): each through the real command."""

from __future__ import annotations

import json

import pytest

from tests.exactly_once import assert_consistent, stored_offsets
from tests.support import cli_env, good_message, produce, rows, run_cli

pytestmark = pytest.mark.services


def test_max_seconds_stops_a_run_whose_backlog_it_cannot_finish(stack, make_topic, pg_schema, admin_engine):
    """The cron and Airflow cap: 3000 messages at 10 a cycle with 0.1 s between cycles need 30 s and
    more; --max-seconds 2 stops the run after the cycle in progress, with stop reason max_seconds."""
    topic = make_topic(partitions=1)
    produce(stack, topic, [good_message(i) for i in range(3000)])
    env = cli_env(stack, topic, pg_schema, METRIC_ETL_MAX_POLL_RECORDS="10")
    proc = run_cli(["run", "--max-seconds", "2", "--sleep", "0.1", "--output", "json"], env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["status"], report["stop_reason"]) == ("ok", "max_seconds")
    assert 0 < report["loaded"] == report["read"] < 3000
    assert report["duration_s"] < 20  # the run's own clock: the cap, one cycle and the set-up
    offsets = assert_consistent(admin_engine, pg_schema, topic, f"g-{topic}")
    assert offsets == {0: report["loaded"]}, "the stored offset is where the run stopped"


def test_json_log_lines_carry_the_documented_fields(stack, make_topic, pg_schema) -> None:
    topic = make_topic(partitions=1)
    produce(stack, topic, [good_message(i) for i in range(20)] + [b"{bad"])
    env = cli_env(stack, topic, pg_schema, METRIC_ETL_MAX_POLL_RECORDS="15")
    proc = run_cli(["run", "--log-format", "json", "--output", "json"], env)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stderr.splitlines()]  # every line is one JSON object
    assert lines
    for line in lines:
        assert {"ts", "level", "logger", "message"} <= line.keys(), line
        assert line["level"] in {"debug", "info", "warning", "error", "critical"}
        assert line["ts"].endswith("+00:00")
    report = json.loads(proc.stdout)
    cycles = [line for line in lines if line.get("event") == "cycle"]
    (summary,) = [line for line in lines if line.get("event") == "summary"]
    common = {"run_id", "read", "loaded", "rejected", "duplicates"}
    assert len(cycles) == report["cycles"] >= 2
    for line in cycles:
        assert common | {"cycle"} <= line.keys(), line
        assert line["run_id"] == report["run_id"]
    assert [c["cycle"] for c in cycles] == list(range(1, len(cycles) + 1))
    assert sum(c["read"] for c in cycles) == 21
    assert sum(c["rejected"] for c in cycles) == 1
    assert common | {"cycles", "lag", "status", "stop_reason", "duration_s"} <= summary.keys(), summary
    assert (summary["read"], summary["loaded"], summary["rejected"], summary["duplicates"]) == (21, 20, 1, 0)
    assert (summary["status"], summary["stop_reason"], summary["cycles"]) == (
        "ok",
        "caught_up",
        report["cycles"],
    )
    assert summary["level"] == "info" and summary["run_id"] == report["run_id"]


def test_auto_offset_reset_latest_skips_the_backlog_of_a_new_group(
    stack, make_topic, pg_schema, admin_engine
):
    """A group with no stored offset and ``latest`` starts at the end: the 40 messages of the backlog
    are not read, nothing is loaded, no offset is stored. (The default, earliest, reads them: the
    other tests.)"""
    topic = make_topic(partitions=2)
    produce(stack, topic, [good_message(i) for i in range(40)], partitions=2)
    env = cli_env(stack, topic, pg_schema, METRIC_ETL_AUTO_OFFSET_RESET="latest")
    first = run_cli(["run", "--output", "json"], env)
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert (report["read"], report["loaded"], report["status"], report["stop_reason"]) == (
        0,
        0,
        "ok",
        "caught_up",
    )
    assert rows(admin_engine, f'SELECT count(*) FROM "{pg_schema}".website_metrics')[0][0] == 0
    assert stored_offsets(admin_engine, pg_schema, topic, f"g-{topic}") == {}
    earliest = run_cli(["run", "--output", "json"], {**env, "METRIC_ETL_AUTO_OFFSET_RESET": "earliest"})
    assert json.loads(earliest.stdout)["loaded"] == 40, earliest.stderr
