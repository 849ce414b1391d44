"""A rewind below the stored offset: what was handled before is skipped, not loaded or rejected again.

README: ``read = loaded + rejected + duplicates``, duplicates being messages below the stored offset met
again after ``--from-beginning`` or ``--from-timestamp``. The metrics table's primary key would hide a
good message loaded twice, so the tests look where a broken skip shows: old rejects counted as new
ones, and statements the database runs for messages that were already handled.
"""

from __future__ import annotations

import json
import re

import pytest
import sqlalchemy as sa

from tests.support import cli_env, good_message, produce, rows, run_cli

pytestmark = pytest.mark.services


def _count_inserts(admin: sa.Engine, schema: str) -> None:
    """A statement trigger on both tables that counts the run's INSERT and COPY statements."""
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SEQUENCE "{schema}".inserts'))
        conn.execute(sa.text(f'GRANT USAGE ON SEQUENCE "{schema}".inserts TO PUBLIC'))
        conn.execute(
            sa.text(
                f"""CREATE FUNCTION "{schema}".count_insert() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN PERFORM nextval('"{schema}".inserts'); RETURN NULL; END $$"""
            )
        )
        for table in ("website_metrics", "website_metrics_rejects"):
            conn.execute(
                sa.text(
                    f'CREATE TRIGGER count_insert BEFORE INSERT ON "{schema}".{table} '
                    f'FOR EACH STATEMENT EXECUTE FUNCTION "{schema}".count_insert()'
                )
            )


def _inserts(admin: sa.Engine, schema: str) -> int:
    (row,) = rows(admin, f'SELECT last_value, is_called FROM "{schema}".inserts')
    return int(row.last_value) if row.is_called else 0


def test_from_beginning_reports_old_rejects_as_duplicates_and_writes_nothing(
    stack, make_topic, pg_schema, admin_engine
) -> None:
    """Issue 14's case: 200 good and 2 bad messages handled, then a --from-beginning run. Without the
    skip the 2 old rejects were reported as new and the load bisected down to single rows."""
    topic = make_topic(partitions=1)
    values = [good_message(i) for i in range(200)]
    values[50], values[150] = b"{not json", b'{"url": "ftp://x", "checked_at": "2026-11-28T10:00:00Z"}'
    produce(stack, topic, [*values, good_message(200), good_message(201)])
    env = cli_env(stack, topic, pg_schema)
    first = run_cli(["run", "--output", "json"], env)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["rejected"] == 2

    _count_inserts(admin_engine, pg_schema)
    again = run_cli(["run", "--from-beginning", "--output", "json"], env)
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    # A rebalance during the run rewinds again (re-read messages count as duplicates): read >= 202.
    assert (report["loaded"], report["rejected"]) == (0, 0)
    assert report["read"] == report["duplicates"] >= 202
    assert report["rejects_by_rule"] == {}
    assert _inserts(admin_engine, pg_schema) == 0, "the rewind wrote (or tried to write) handled messages"
    stored = rows(admin_engine, f'SELECT run_id FROM "{pg_schema}".website_metrics_rejects')
    assert [r.run_id for r in stored] == [json.loads(first.stdout)["run_id"]] * 2
    (run,) = rows(
        admin_engine,
        f'SELECT read, loaded, rejected, duplicates FROM "{pg_schema}".etl_runs WHERE run_id = :r',
        r=report["run_id"],
    )
    assert tuple(run) == (report["read"], 0, 0, report["duplicates"])


def test_a_rewind_into_the_middle_loads_only_what_is_new(stack, make_topic, pg_schema, admin_engine) -> None:
    """Stored offset 100 on a 2-partition topic; 20 more messages arrive; --from-beginning reads all
    120 and writes only the 20 new ones, in one statement per table at most per cycle."""
    topic = make_topic(partitions=2)
    produce(stack, topic, [good_message(i) for i in range(99)] + [b"\xff"], partitions=2)
    env = cli_env(stack, topic, pg_schema)
    assert run_cli(["run"], env).returncode == 0
    produce(stack, topic, [good_message(1000 + i) for i in range(19)] + [b"[]"], partitions=2)
    _count_inserts(admin_engine, pg_schema)
    again = run_cli(["run", "--from-beginning", "--output", "json"], env)
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert (report["loaded"], report["rejected"]) == (19, 1)
    assert report["read"] == 20 + report["duplicates"] and report["duplicates"] >= 100
    assert report["rejects_by_rule"] == {"not_object": 1}
    assert _inserts(admin_engine, pg_schema) <= 2 * report["cycles"]


def _uneven_topic(stack, make_topic) -> str:
    """A 2-partition topic whose stored offsets will differ: partition 0 gets 40 messages (3 bad),
    partition 1 gets 10."""
    topic = make_topic(partitions=2)
    first = [good_message(i) for i in range(30)]
    first[7], first[21] = b"{not json", b"[]"
    produce(stack, topic, first, partitions=1)  # all on partition 0
    rest = [good_message(100 + i) for i in range(20)]
    rest[4] = b"\xff"  # partition 0 again
    produce(stack, topic, rest, partitions=2)
    return topic


def test_a_rewind_over_partitions_stored_at_different_offsets_loads_every_new_message(
    stack, make_topic, pg_schema, admin_engine
) -> None:
    """Stored offsets 40 and 10: each partition's own offset decides what is old. A skip that let one
    partition's offset judge the other's messages would drop partition 1's new messages (offsets 10
    to 14 are below 40) while moving its offset past them. Several cycles (10 messages a poll): the
    report counts every cycle, each partition's own, and the time of each stage."""
    topic = _uneven_topic(stack, make_topic)
    env = cli_env(stack, topic, pg_schema, METRIC_ETL_MAX_POLL_RECORDS="10")
    first = run_cli(["run", "--output", "json"], env)
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert (report["read"], report["loaded"], report["rejected"], report["duplicates"]) == (50, 47, 3, 0)
    assert {p: (r["start"], r["read"], r["end"]) for p, r in report["partitions"].items()} == {
        "0": (0, 40, 40),
        "1": (0, 10, 10),
    }
    for stage in ("normalise", "validate"):  # seconds spent, within the run's own duration
        assert 0 <= report["timings"][stage] <= report["duration_s"], report["timings"]

    produce(stack, topic, [good_message(1000 + i) for i in range(10)], partitions=2)
    again = run_cli(["run", "--from-beginning", "--output", "json"], env)
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert (report["loaded"], report["rejected"]) == (10, 0)
    assert report["read"] == 10 + report["duplicates"] and report["duplicates"] >= 50
    assert report["cycles"] >= 6
    parts = report["partitions"]
    assert (parts["0"]["start"], parts["1"]["start"]) == (0, 0)
    assert (parts["0"]["end"], parts["1"]["end"]) == (45, 15)
    assert parts["0"]["read"] >= 45 and parts["1"]["read"] >= 15
    assert parts["0"]["read"] + parts["1"]["read"] == report["read"]
    new = rows(
        admin_engine,
        f'SELECT "partition", "offset" FROM "{pg_schema}".website_metrics WHERE url LIKE :u ORDER BY 1, 2',
        u="https://example.com/10__",
    )
    assert [tuple(r) for r in new] == [(0, o) for o in range(40, 45)] + [(1, o) for o in range(10, 15)]


def test_a_dry_run_rewind_counts_handled_messages_as_duplicates(stack, make_topic, pg_schema) -> None:
    """A dry run reads and validates but asks the database nothing about the messages: only the skip
    below the stored offsets keeps it from reporting, as would-be loads and rejects, what an earlier
    run handled. Several cycles, so each cycle's offsets carry to the next; each has its log line."""
    topic = _uneven_topic(stack, make_topic)
    env = cli_env(stack, topic, pg_schema, METRIC_ETL_MAX_POLL_RECORDS="10")
    assert run_cli(["run"], env).returncode == 0
    produce(stack, topic, [good_message(1000 + i) for i in range(9)] + [b"[]"], partitions=2)
    dry = run_cli(["run", "--dry-run", "--from-beginning", "--output", "json"], env)
    assert dry.returncode == 0, dry.stderr
    report = json.loads(dry.stdout)
    assert (report["loaded"], report["rejected"]) == (9, 1), report
    assert report["read"] == 10 + report["duplicates"] and report["duplicates"] >= 50
    assert report["rejects_by_rule"] == {"not_object": 1}
    assert report["cycles"] >= 6
    # Each cycle's log line says what it would have done; together they make the report.
    lines = re.findall(
        r"cycle (\d+): read (\d+), would load (\d+), rejected (\d+), duplicates (\d+)", dry.stderr
    )
    assert [int(c[0]) for c in lines] == list(range(1, report["cycles"] + 1)), dry.stderr
    totals = [sum(int(c[i]) for c in lines) for i in (1, 2, 3, 4)]
    assert totals == [report["read"], 9, 1, report["duplicates"]]


def test_a_rewind_over_old_rejects_does_not_trip_the_reject_ratio(stack, make_topic, pg_schema) -> None:
    """8 of 10 messages rejected by a run that allowed it; a rewind with --max-reject-ratio 0.5 reads
    them again with 4 new good ones (8 of 14 would be 57%): the old rejects were handled before and
    are not this run's."""
    topic = make_topic(partitions=1)
    produce(stack, topic, [b"{not json"] * 8 + [good_message(i) for i in range(2)])
    env = cli_env(stack, topic, pg_schema)
    first = run_cli(["run", "--output", "json"], env)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["rejected"] == 8
    produce(stack, topic, [good_message(100 + i) for i in range(4)])
    again = run_cli(["run", "--from-beginning", "--max-reject-ratio", "0.5", "--output", "json"], env)
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert (report["loaded"], report["rejected"], report["stop_reason"]) == (4, 0, "caught_up")
    assert report["read"] == 4 + report["duplicates"] and report["duplicates"] >= 10
