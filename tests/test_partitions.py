"""The partitioned metrics table as a DBA meets it: checks in their day's partition, the default
partition counted and emptied, retention dropping whole partitions (never a DELETE) while the rollups
stay, and an upgrade from 2ad411b's single table that keeps every row.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.exactly_once import assert_exactly_once, kafka_ends
from tests.support import cli_env, count, good_message, produce, rows, run_cli

pytestmark = pytest.mark.services


def _midnight() -> datetime:
    return datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


TODAY = _midnight()


@pytest.fixture(autouse=True)
def _today() -> None:
    """Each test counts its days from the UTC midnight before it starts, as the job counts from its own
    clock: a suite that runs across midnight does not leave them a day apart."""
    global TODAY
    TODAY = _midnight()


DDL_2AD411B = Path(__file__).parent / "schemas" / "schema_2ad411b.sql"


def at(days_ago: float, i: int = 0) -> bytes:
    when = TODAY - timedelta(days=days_ago) + timedelta(hours=12, seconds=i)
    return good_message(i, url=f"https://d{int(days_ago)}.example/", checked_at=when.isoformat())


def run_json(env: dict[str, str], *args: str) -> dict:
    done = run_cli(["run", "--output", "json", *args], env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def partition_rows(engine: sa.Engine, schema: str) -> dict[str, int]:
    found = rows(
        engine,
        f'SELECT tableoid::regclass::text AS p, count(*) AS n FROM "{schema}".website_metrics GROUP BY 1',
    )
    return {r.p.split(".")[-1]: r.n for r in found}


def test_checks_land_in_their_days_partition_and_the_default_partition_is_counted(
    stack, make_topic, pg_schema, admin_engine
) -> None:
    topic = make_topic(partitions=2)
    env = cli_env(stack, topic, pg_schema, METRIC_ETL_RETENTION_RAW_DAYS="30")
    produce(stack, topic, [at(d, i) for d in (0, 1, 3) for i in range(5)] + [at(40, 99)], partitions=2)
    done = run_cli(["run"], env)
    assert done.returncode == 0, done.stderr
    # Older than retention_raw_days: no partition is made for it; the default partition takes it.
    assert "default partition 1 (checks whose partition could not be made" in done.stdout
    assert "went to the default partition" in done.stderr
    day = lambda d: f"website_metrics_p{TODAY - timedelta(days=d):%Y%m%d}"  # noqa: E731
    assert partition_rows(admin_engine, pg_schema) == {
        day(0): 5,
        day(1): 5,
        day(3): 5,
        "website_metrics_default": 1,
    }
    status = run_cli(["status", "--output", "json"], env)
    assert json.loads(status.stdout)["default_partition_rows"] == 1

    # With a longer horizon, retention makes its partition and moves the check out of the default.
    kept = run_cli(["retention", "--output", "json"], {**env, "METRIC_ETL_RETENTION_RAW_DAYS": "60"})
    assert kept.returncode == 0, kept.stderr
    result = json.loads(kept.stdout)
    assert result["moved_from_default"] == 1 and day(40) in result["made"] and result["default_rows"] == 0
    assert partition_rows(admin_engine, pg_schema)[day(40)] == 1
    assert_exactly_once(admin_engine, pg_schema, topic, f"g-{topic}", kafka_ends(stack, topic))


def test_a_message_read_again_is_a_duplicate_in_any_partition(
    stack, make_topic, pg_schema, admin_engine
) -> None:
    topic = make_topic(partitions=2)
    env = cli_env(stack, topic, pg_schema)
    produce(stack, topic, [at(d, i) for d in (0, 2, 5) for i in range(4)], partitions=2)
    assert run_json(env)["loaded"] == 12
    again = run_json(env, "--from-beginning")
    assert (again["loaded"], again["duplicates"]) == (0, 12)
    other = run_json({**env, "METRIC_ETL_GROUP_ID": f"second-{topic}"})
    assert (other["loaded"], other["duplicates"]) == (0, 12)
    assert count(admin_engine, pg_schema, "website_metrics") == 12


def test_retention_drops_whole_partitions_and_keeps_the_rollups(
    stack, make_topic, pg_schema, admin_engine
) -> None:
    topic = make_topic(partitions=1)
    env = cli_env(stack, topic, pg_schema)
    produce(stack, topic, [at(d, i) for d in range(10) for i in range(3)])
    assert run_json(env)["loaded"] == 30
    env["METRIC_ETL_RETENTION_RAW_DAYS"] = "5"  # the DBA shortens it
    q = f'"{pg_schema}"'
    daily_before = rows(
        admin_engine, f"SELECT count(*) AS n, sum(checks) AS c FROM {q}.website_metrics_daily"
    )

    dry = run_cli(["retention", "--dry-run", "--output", "json"], env)
    assert dry.returncode == 0, dry.stderr
    planned = json.loads(dry.stdout)
    names = [d["name"] for d in planned["dropped"]]
    # A partition goes once all of its day is past the horizon: day 5 still holds checks within it.
    assert names == [f"website_metrics_p{TODAY - timedelta(days=d):%Y%m%d}" for d in range(9, 5, -1)]
    assert count(admin_engine, pg_schema, "website_metrics") == 30  # a dry run changes nothing

    done = run_cli(["retention", "--output", "json"], env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert [d["name"] for d in result["dropped"]] == names and result["bytes_freed"] > 0
    assert count(admin_engine, pg_schema, "website_metrics") == 18  # days 0-5 stay
    # The rollups outlive the raw rows: the daily rows of the dropped days are all still there.
    assert (
        rows(admin_engine, f"SELECT count(*) AS n, sum(checks) AS c FROM {q}.website_metrics_daily")
        == daily_before
    )
    # ... and still agree with the raw checks that are kept.
    assert run_cli(["rollups", "check"], env).returncode == 0
    nothing = json.loads(run_cli(["retention", "--output", "json"], env).stdout)
    assert nothing["dropped"] == []


def test_retention_beside_a_running_load_neither_fails_nor_stalls_it(
    stack, make_topic, pg_schema, admin_engine
) -> None:
    topic = make_topic(partitions=1)
    env = cli_env(stack, topic, pg_schema, METRIC_ETL_MAX_POLL_RECORDS="50")
    produce(stack, topic, [at(d, i) for d in range(40) for i in range(10)])
    assert run_json(env)["loaded"] == 400
    env["METRIC_ETL_RETENTION_RAW_DAYS"] = "20"
    produce(stack, topic, [at(0, 1000 + i) for i in range(3000)])  # the load beside retention
    load: dict = {}
    runner = threading.Thread(target=lambda: load.update(run_json(env)))
    runner.start()
    time.sleep(0.5)
    t = time.monotonic()
    done = run_cli(["retention", "--output", "json"], env)
    took = time.monotonic() - t
    runner.join(120)
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["dropped"]) == 19 and took < 10  # days 21 to 39
    assert load["status"] == "ok" and load["loaded"] == 3000
    assert count(admin_engine, pg_schema, "website_metrics") == 210 + 3000


def test_tables_made_by_2ad411b_upgrade_keeping_every_row(stack, make_topic, pg_schema, admin_engine) -> None:
    topic = make_topic(partitions=2)
    env = cli_env(stack, topic, pg_schema, METRIC_ETL_GROUP_ID="g")
    produce(stack, topic, [at(d % 3, i) for i, d in enumerate(range(40))], partitions=2)
    owner = sa.make_url(stack["METRIC_ETL_DB_URL"]).username
    q = f'"{pg_schema}"'
    with admin_engine.begin() as conn:
        conn.exec_driver_sql(f'SET LOCAL ROLE "{owner}"')
        conn.exec_driver_sql(DDL_2AD411B.read_text().replace("{schema}", q))
        # What 2ad411b left: the topic's first 30 messages loaded (15 a partition), the offsets stored.
        conn.execute(
            sa.text(
                f"INSERT INTO {q}.website_metrics (url, status_code, response_time_ms, checked_at, topic, "
                'partition, "offset", run_id) '
                f"SELECT 'https://u' || (o % 4) || '.example/', "
                "CASE WHEN o % 5 = 0 THEN 500 ELSE 200 END, "
                "10 + o, now() - interval '1 day' * (o % 3) - interval '1 minute' * o, "
                f"'{topic}', p, o, 'old' "
                "FROM generate_series(0, 1) p, generate_series(0, 14) o"
            )
        )
        conn.exec_driver_sql(
            f"INSERT INTO {q}.etl_offsets (group_id, topic, partition, next_offset, run_id) "
            f"VALUES ('g', '{topic}', 0, 15, 'old'), ('g', '{topic}', 1, 15, 'old')"
        )
    before = rows(
        admin_engine,
        f'SELECT topic, partition, "offset", url, checked_at FROM {q}.website_metrics ORDER BY 1, 2, 3',
    )

    stale = run_cli(["run"], env)  # the new code on old tables: told to upgrade, nothing touched
    assert stale.returncode == 3 and "metric-etl init-db" in stale.stderr, stale.stderr
    up = run_cli(["init-db"], env)
    assert up.returncode == 0, up.stderr
    assert "partitioned website_metrics by checked_at (day)" in up.stdout and "loads waited for" in up.stdout
    assert "built the rollups from the rows: " in up.stdout
    after = rows(
        admin_engine,
        f'SELECT topic, partition, "offset", url, checked_at FROM {q}.website_metrics ORDER BY 1, 2, 3',
    )
    assert after == before  # nothing lost, nothing doubled
    assert set(partition_rows(admin_engine, pg_schema)) == {"website_metrics_legacy"}
    assert run_cli(["rollups", "check"], env).returncode == 0  # built from the rows already there
    assert rows(admin_engine, f"SELECT sum(checks) AS n FROM {q}.website_metrics_daily")[0].n == 30
    assert run_cli(["init-db"], env).stdout.strip().endswith("all tables already up to date")

    # The run goes on where 2ad411b stopped: the 10 new messages load into today's partitions.
    report = run_json(env)
    assert (report["loaded"], report["duplicates"]) == (10, 0)
    assert count(admin_engine, pg_schema, "website_metrics") == 40
    assert run_cli(["rollups", "check"], env).returncode == 0
