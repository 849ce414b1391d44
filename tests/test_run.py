"""`metric-etl run` against the real broker and database: counts, stop conditions, offsets, rejects."""

from __future__ import annotations

import json
import sys
import threading
import time

import pytest

from etl.run import run_batch
from tests.support import cli_env, count, good_message, produce, rows, run_cli, settings_for

pytestmark = pytest.mark.services

CORRUPTED = [
    b"\xff\xfe\x00garbage",  # invalid UTF-8
    b'{"url": "https://example.com/x", "status_code": 200',  # truncated JSON
    b"[1, 2, 3]",  # not an object
    b'{"url": "ftp://example.com/", "status_code": "200", "checked_at": "2026-11-28T10:00:00"}',
    None,  # tombstone
    b"",  # empty
]


def backlog(n_good: int) -> list[bytes | None]:
    values: list[bytes | None] = [good_message(i) for i in range(n_good)]
    for j, bad in enumerate(CORRUPTED):
        values.insert(7 * j + 3, bad)
    return values


def test_backlog_lands_once_rejects_keep_raw_bytes_and_reasons(
    stack, make_topic, pg_schema, admin_engine
) -> None:
    topic = make_topic(partitions=3)
    values = backlog(300)
    produce(stack, topic, values, partitions=3, keys=[f"k{i}".encode() for i in range(len(values))])
    s = settings_for(stack, topic, pg_schema)

    report = run_batch(s)

    assert report.status == "ok" and report.stop_reason == "caught_up"
    assert (report.read, report.loaded, report.rejected) == (306, 300, 6)
    assert count(admin_engine, pg_schema, "website_metrics") == 300
    stored = rows(
        admin_engine,
        f'SELECT payload, stage, errors, key FROM "{pg_schema}".website_metrics_rejects ORDER BY id',
    )

    def order(v: bytes | None) -> tuple[bool, bytes]:
        return (v is not None, v or b"")

    stored_payloads = [bytes(r.payload) if r.payload is not None else None for r in stored]
    assert sorted(stored_payloads, key=order) == sorted(CORRUPTED, key=order)
    for r in stored:
        assert r.errors and all(e["rule"] for e in r.errors)
        assert r.key is not None and bytes(r.key).startswith(b"k")
    by_stage = {r.stage for r in stored}
    assert {"decode", "json", "schema"} <= by_stage
    offsets = rows(admin_engine, f'SELECT partition, next_offset FROM "{pg_schema}".etl_offsets ORDER BY 1')
    assert sum(o.next_offset for o in offsets) == 306
    assert {p: r.end for p, r in report.partitions.items()} == {o.partition: o.next_offset for o in offsets}
    assert report.lag == 0

    again = run_batch(s)
    assert again.status == "ok" and again.stop_reason == "caught_up"
    assert (again.read, again.loaded, again.rejected) == (0, 0, 0)
    assert count(admin_engine, pg_schema, "website_metrics") == 300
    runs = rows(
        admin_engine, f'SELECT status, read, loaded, rejected FROM "{pg_schema}".etl_runs ORDER BY started_at'
    )
    assert [(r.status, r.read, r.loaded, r.rejected) for r in runs] == [("ok", 306, 300, 6), ("ok", 0, 0, 0)]


def test_json_report_and_exit_0_from_the_command(stack, make_topic, pg_schema) -> None:
    topic = make_topic(partitions=2)
    produce(stack, topic, backlog(50), partitions=2)
    proc = run_cli(["run", "--output", "json"], cli_env(stack, topic, pg_schema))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["status"] == "ok"
    assert report["stop_reason"] == "caught_up"
    assert report["read"] == report["loaded"] + report["rejected"] == 56
    assert set(report["partitions"]) == {"0", "1"}
    assert report["lag"] == 0
    assert "cycle 1: read 56" in proc.stderr  # one log line per cycle

    second = run_cli(["run"], cli_env(stack, topic, pg_schema))
    assert second.returncode == 0
    assert "caught up" in second.stdout and "read 0" in second.stdout


def test_stop_after_cycles_and_max_messages(stack, make_topic, pg_schema, admin_engine) -> None:
    topic = make_topic(partitions=1)
    produce(stack, topic, [good_message(i) for i in range(100)])

    by_messages = run_batch(settings_for(stack, topic, pg_schema, max_messages=30, max_poll_records=20))
    assert by_messages.stop_reason == "max_messages"
    assert by_messages.read == 30
    assert count(admin_engine, pg_schema, "website_metrics") == 30

    by_cycles = run_batch(settings_for(stack, topic, pg_schema, cycles=2, max_poll_records=10))
    assert by_cycles.stop_reason == "cycles" and by_cycles.cycles == 2
    assert by_cycles.read == 20
    assert count(admin_engine, pg_schema, "website_metrics") == 50  # resumed where the first run stopped

    rest = run_batch(settings_for(stack, topic, pg_schema))
    assert rest.read == 50 and rest.stop_reason == "caught_up"
    assert count(admin_engine, pg_schema, "website_metrics") == 100


@pytest.mark.parametrize("host_interval", [0.005, 0.0002])
def test_a_library_run_gives_the_host_process_its_gil_switch_interval_back(
    stack, make_topic, pg_schema, host_interval: float
) -> None:
    topic = make_topic(partitions=1)
    produce(stack, topic, [good_message(i) for i in range(10)])
    seen: list[float] = []
    before = sys.getswitchinterval()
    sys.setswitchinterval(host_interval)
    try:
        report = run_batch(
            settings_for(stack, topic, pg_schema), on_cycle=lambda r: seen.append(sys.getswitchinterval())
        )
        after = sys.getswitchinterval()
    finally:
        sys.setswitchinterval(before)
    assert report.loaded == 10
    during = min(host_interval, 0.001)  # 1 ms, or the host's own when lower (kept to the microsecond)
    assert seen and all(abs(v - during) < 2e-6 for v in seen)
    assert abs(after - host_interval) < 2e-6


def test_run_ends_while_producers_keep_writing(stack, make_topic, pg_schema) -> None:
    topic = make_topic(partitions=1)
    produce(stack, topic, [good_message(i) for i in range(200)])
    stop = threading.Event()

    def keep_writing() -> None:
        i = 0
        while not stop.is_set():
            produce(stack, topic, [good_message(10_000 + i)])
            i += 1

    writer = threading.Thread(target=keep_writing, daemon=True)
    writer.start()
    try:
        report = run_batch(settings_for(stack, topic, pg_schema, max_poll_records=50))
    finally:
        stop.set()
        writer.join(10)
    assert report.stop_reason == "caught_up"
    assert report.read >= 200


def test_max_seconds_caps_a_follow_free_run(stack, make_topic, pg_schema) -> None:
    topic = make_topic(partitions=1)
    produce(stack, topic, [good_message(i) for i in range(20)])
    start = time.monotonic()
    report = run_batch(
        settings_for(stack, topic, pg_schema, max_seconds=2, follow=False, sleep=0.5, max_poll_records=5)
    )
    assert report.stop_reason in ("max_seconds", "caught_up")
    assert time.monotonic() - start < 30


def test_follow_stops_on_request_after_the_cycle(stack, make_topic, pg_schema, admin_engine) -> None:
    topic = make_topic(partitions=1)
    produce(stack, topic, [good_message(i) for i in range(10)])
    stop = threading.Event()
    cycles: list[int] = []

    def on_cycle(report) -> None:
        cycles.append(report.loaded)
        if report.loaded >= 10:
            stop.set()

    report = run_batch(settings_for(stack, topic, pg_schema, follow=True), stop=stop, on_cycle=on_cycle)
    assert report.stop_reason == "signal" and report.status == "ok"
    assert count(admin_engine, pg_schema, "website_metrics") == 10


def test_dry_run_writes_nothing_and_moves_no_offset(stack, make_topic, pg_schema, admin_engine) -> None:
    topic = make_topic(partitions=2)
    produce(stack, topic, backlog(40), partitions=2)
    env = cli_env(stack, topic, pg_schema)
    proc = run_cli(["run", "--dry-run"], env)
    assert proc.returncode == 0, proc.stderr
    assert "would load 40" in proc.stdout and "rejected 6" in proc.stdout
    assert (
        rows(
            admin_engine,
            "SELECT table_name FROM information_schema.tables WHERE table_schema = :s",
            s=pg_schema,
        )
        == []
    )

    real = run_batch(settings_for(stack, topic, pg_schema))
    assert (real.loaded, real.rejected) == (40, 6)  # the dry run consumed nothing for real
    dry_again = run_cli(["run", "--dry-run", "--output", "json"], env)
    assert json.loads(dry_again.stdout)["read"] == 0
    before = rows(admin_engine, f'SELECT partition, next_offset FROM "{pg_schema}".etl_offsets ORDER BY 1')
    run_cli(["run", "--dry-run", "--from-beginning"], env)
    after = rows(admin_engine, f'SELECT partition, next_offset FROM "{pg_schema}".etl_offsets ORDER BY 1')
    assert before == after
    assert count(admin_engine, pg_schema, "website_metrics") == 40


def test_from_timestamp_and_from_beginning_reload_nothing_twice(
    stack, make_topic, pg_schema, admin_engine
) -> None:
    topic = make_topic(partitions=2)
    produce(stack, topic, [good_message(i) for i in range(60)], partitions=2)
    first = run_batch(settings_for(stack, topic, pg_schema))
    assert first.loaded == 60

    rewind = run_batch(settings_for(stack, topic, pg_schema, from_timestamp="2000-01-01T00:00:00Z"))
    assert rewind.read == 60 and rewind.duplicates == 60 and rewind.loaded == 0
    produce(stack, topic, [good_message(100 + i) for i in range(10)], partitions=2)
    again = run_batch(settings_for(stack, topic, pg_schema, from_beginning=True))
    assert again.read == 70 and again.duplicates == 60 and again.loaded == 10
    assert count(admin_engine, pg_schema, "website_metrics") == 70


def test_from_timestamp_starts_a_new_group_at_that_time(stack, make_topic, pg_schema, admin_engine) -> None:
    topic = make_topic(partitions=1)
    produce(stack, topic, [good_message(i) for i in range(5)])
    time.sleep(1.5)
    cut = time.time()
    time.sleep(0.2)
    produce(stack, topic, [good_message(100 + i) for i in range(7)])
    from datetime import UTC, datetime

    iso = datetime.fromtimestamp(cut, UTC).isoformat()
    report = run_batch(settings_for(stack, topic, pg_schema, from_timestamp=iso))
    assert report.loaded == 7
    assert count(admin_engine, pg_schema, "website_metrics") == 7


def test_value_refused_by_the_database_is_isolated(stack, make_topic, pg_schema, admin_engine) -> None:
    topic = make_topic(partitions=1)
    s = settings_for(stack, topic, pg_schema)
    run_batch(s)  # creates the tables (empty topic)
    from sqlalchemy import text

    with admin_engine.begin() as conn:  # a rule only the database knows
        table = f'"{pg_schema}".website_metrics'
        conn.execute(text(f"ALTER TABLE {table} ADD CONSTRAINT no_teapots CHECK (status_code <> 418)"))
    values = [good_message(i) for i in range(50)]
    values[17] = good_message(17, status_code=418)
    values[33] = good_message(33, status_code=418)
    produce(stack, topic, values)

    report = run_batch(s)

    assert (report.loaded, report.rejected) == (48, 2)
    refused = rows(
        admin_engine,
        f'SELECT "offset", stage, errors, payload FROM "{pg_schema}".website_metrics_rejects ORDER BY 1',
    )
    assert [(r.offset, r.stage) for r in refused] == [(17, "database"), (33, "database")]
    assert "no_teapots" in refused[0].errors[0]["value"]
    assert json.loads(bytes(refused[0].payload))["status_code"] == 418


def test_rejects_of_a_replayed_range_are_not_stored_twice(stack, make_topic, pg_schema, admin_engine) -> None:
    topic = make_topic(partitions=1)
    produce(stack, topic, backlog(10))
    run_batch(settings_for(stack, topic, pg_schema))
    run_batch(settings_for(stack, topic, pg_schema, from_beginning=True))
    assert count(admin_engine, pg_schema, "website_metrics_rejects") == 6


def test_cycles_in_the_report_are_the_cycles_in_etl_runs(stack, make_topic, pg_schema, admin_engine) -> None:
    """A cycle is a poll that read messages, loaded in one transaction: the report and etl_runs count
    the same ones; empty polls are counted apart (an outage once showed 165 cycles against 12)."""
    topic = make_topic(partitions=2)
    produce(stack, topic, [good_message(i) for i in range(300)], partitions=2)
    stop = threading.Event()
    polls = []

    def on_cycle(report) -> None:
        polls.append(report.loaded)
        if report.loaded == 300 and len(polls) >= 6:  # a few empty polls after the backlog
            stop.set()

    s = settings_for(stack, topic, pg_schema, follow=True, max_poll_records=100, poll_timeout_ms=100)
    report = run_batch(s, stop=stop, on_cycle=on_cycle)
    (cycles,) = rows(
        admin_engine, f'SELECT cycles FROM "{pg_schema}".etl_runs WHERE run_id = :r', r=report.run_id
    )[0]
    assert report.loaded == 300 and report.stop_reason == "signal"
    assert report.cycles == cycles == report.committed_cycles >= 3
    assert report.empty_polls >= 1 and report.cycles + report.empty_polls == len(polls)
    assert report.as_dict()["empty_polls"] == report.empty_polls
    assert f"{report.cycles} cycles ({report.empty_polls} empty poll" in report.to_text()
