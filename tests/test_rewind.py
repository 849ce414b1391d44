"""A rewind below the stored offset: what was handled before is skipped, not loaded or rejected again.

README: ``read = loaded + rejected + duplicates``, duplicates being messages below the stored offset met
again after ``--from-beginning`` or ``--from-timestamp``. The metrics table's primary key would hide a
good message loaded twice, so the tests look where a broken skip shows: old rejects counted as new
ones, and statements the database runs for messages that were already handled.
"""

from __future__ import annotations

import json

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
