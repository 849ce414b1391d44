"""A topic deleted and created again, or truncated upstream, as an operator meets it.

Recreated: the run stops with exit 3 and names the partitions, offsets and the fix; `offsets reset`
(dry run first) moves the offsets, and the new messages load as a new incarnation next to the old
rows that share their (topic, partition, offset). Truncated by a real DeleteRecords: the run warns,
counts the messages it never saw (report, etl_runs, metrics file, status) and goes on. Tables made by
5cc9f5c upgrade with `init-db`, keeping every row.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from kafka import TopicPartition
from kafka.errors import KafkaError

from tests.support import cli_env, count, good_message, produce, rows, run_cli

OLD_DDL = Path(__file__).parent / "schemas" / "schema_5cc9f5c.sql"


def recreate(kafka_admin, topic: str, partitions: int) -> None:
    """Delete ``topic`` and create it again with the same name, waiting for each step to take."""
    kafka_admin.delete_topics([topic], timeout_ms=10_000)
    deadline = time.monotonic() + 60
    while True:  # a deleted topic's name is free once the controller has removed it
        try:
            kafka_admin.create_topics(
                {topic: {"num_partitions": partitions, "replication_factor": 1}},
                timeout_ms=10_000,
                wait_for_metadata=True,
            )
            return
        except KafkaError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def messages(n: int, tag: str) -> list[bytes]:
    return [good_message(i, url=f"https://{tag}.example/{i}") for i in range(n)]


def run_json(env: dict[str, str], *args: str) -> tuple[int, dict, str]:
    done = run_cli(["run", "--output", "json", *args], env)
    report = json.loads(done.stdout) if done.stdout.strip() else {}
    return done.returncode, report, done.stderr


def offsets_rows(engine: sa.Engine, schema: str, topic: str) -> dict[int, tuple[int, int, str | None]]:
    found = rows(
        engine,
        f'SELECT partition, next_offset, incarnation, topic_id FROM "{schema}".etl_offsets WHERE topic = :t',
        t=topic,
    )
    return {r.partition: (r.next_offset, r.incarnation, r.topic_id) for r in found}


def test_a_recreated_topic_stops_the_run_and_a_reset_loads_its_new_messages(
    stack, make_topic, kafka_admin, pg_schema, admin_engine
) -> None:
    topic = make_topic(partitions=2)
    env = cli_env(stack, topic, pg_schema)
    produce(stack, topic, messages(1000, "old"), partitions=2)
    code, first, err = run_json(env)
    assert (code, first["loaded"]) == (0, 1000), err
    old_id = offsets_rows(admin_engine, pg_schema, topic)[0][2]
    assert old_id  # the topic id is remembered with the offsets

    recreate(kafka_admin, topic, 2)
    produce(stack, topic, messages(300, "new"), partitions=2)

    code, report, err = run_json(env)
    assert code == 3, err
    assert f"topic '{topic}' was deleted and created again" in err
    assert "partition 0: stored offset 500, end offset 150" in err
    assert "partition 1: stored offset 500, end offset 150" in err
    assert f"offsets reset --topic {topic}" in err and "--to earliest --dry-run" in err
    assert (report["status"], report["stop_reason"], report["read"]) == ("failed", "topic_changed", 0)
    assert count(admin_engine, pg_schema, "website_metrics") == 1000

    dry = run_cli(["offsets", "reset", "--to", "earliest", "--dry-run"], env)
    assert dry.returncode == 0, dry.stderr
    assert "dry run: nothing changed" in dry.stdout and "would move 2 of 2 partitions" in dry.stdout
    assert "0->1" in dry.stdout  # the new incarnation it would give
    assert {p: o for p, (o, _, _) in offsets_rows(admin_engine, pg_schema, topic).items()} == {0: 500, 1: 500}

    done = run_cli(["offsets", "reset", "--to", "earliest", "--output", "json"], env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["changed"] == 2 and result["topic_id"] != old_id
    after = offsets_rows(admin_engine, pg_schema, topic)
    assert after == {0: (0, 1, result["topic_id"]), 1: (0, 1, result["topic_id"])}
    recorded = rows(
        admin_engine,
        f'SELECT status, stop_reason, start_offsets, end_offsets FROM "{pg_schema}".etl_runs '
        "WHERE run_id = :r",
        r=result["run_id"],
    )
    assert [(r.status, r.stop_reason, r.start_offsets, r.end_offsets) for r in recorded] == [
        ("reset", "offsets_reset", {"0": 500, "1": 500}, {"0": 0, "1": 0})
    ]

    code, report, err = run_json(env)
    assert code == 0, err
    assert (report["read"], report["loaded"], report["duplicates"]) == (300, 300, 0)
    by_incarnation = rows(
        admin_engine,
        f"SELECT incarnation, count(*) AS n, count(*) FILTER (WHERE url LIKE 'https://new.%') AS new "
        f'FROM "{pg_schema}".website_metrics GROUP BY incarnation ORDER BY incarnation',
    )
    assert [(r.incarnation, r.n, r.new) for r in by_incarnation] == [(0, 1000, 0), (1, 300, 300)]


def test_a_recreated_topic_with_more_messages_than_before_is_known_by_its_id(
    stack, make_topic, kafka_admin, pg_schema, admin_engine
) -> None:
    """No stored offset is beyond the end here: only the topic id tells."""
    topic = make_topic(partitions=1)
    env = cli_env(stack, topic, pg_schema)
    produce(stack, topic, messages(100, "old"))
    assert run_json(env)[0] == 0
    recreate(kafka_admin, topic, 1)
    produce(stack, topic, messages(250, "new"))
    code, report, err = run_json(env)
    assert code == 3, err
    assert "partition 0: stored offset 100, end offset 250 (topic id " in err
    assert count(admin_engine, pg_schema, "website_metrics") == 100
    assert run_cli(["offsets", "reset", "--to", "earliest"], env).returncode == 0
    code, report, err = run_json(env)
    assert (code, report["loaded"], report["duplicates"]) == (0, 250, 0), err
    assert count(admin_engine, pg_schema, "website_metrics", "WHERE incarnation = 1") == 250


def test_messages_deleted_upstream_before_they_were_read_are_counted_everywhere(
    stack, make_topic, kafka_admin, pg_schema, admin_engine, tmp_path
) -> None:
    topic = make_topic(partitions=2)
    env = cli_env(stack, topic, pg_schema)
    produce(stack, topic, messages(200, "a"), partitions=2)  # offsets 0..99 in each partition
    assert run_json(env)[0] == 0
    produce(stack, topic, messages(300, "b"), partitions=2)  # offsets 100..249
    kafka_admin.delete_records(
        {TopicPartition(topic, 0): 180, TopicPartition(topic, 1): 150}, timeout_ms=10_000
    )

    prom = tmp_path / "metric_etl.prom"
    code, report, err = run_json(env, "--metrics-file", str(prom))
    assert code == 0, err
    assert "WARNING" in err
    assert "partition 0: messages 100 to 179 (80) were deleted from the topic" in err
    assert "partition 1: messages 100 to 149 (50) were deleted from the topic" in err
    assert (report["lost_to_retention"], report["loaded"], report["read"]) == (130, 170, 170)
    assert (report["partitions"]["0"]["lost"], report["partitions"]["1"]["lost"]) == (80, 50)
    recorded = rows(
        admin_engine,
        f'SELECT lost_to_retention FROM "{pg_schema}".etl_runs WHERE run_id = :r',
        r=report["run_id"],
    )
    assert [r.lost_to_retention for r in recorded] == [130]
    assert any(
        line.startswith("metric_etl_last_run_lost_messages{") and line.endswith(" 130")
        for line in prom.read_text().splitlines()
    )

    text = run_cli(["run"], env)  # the next run finds nothing new lost
    assert text.returncode == 0 and "lost to retention" not in text.stdout, text.stderr

    status = run_cli(["status"], env)
    assert status.returncode == 0 and "lost to retention in the last 24h: 130" in status.stdout
    alarmed = run_cli(["status", "--max-lost", "0", "--output", "json"], env)
    assert alarmed.returncode == 9, alarmed.stderr
    assert json.loads(alarmed.stdout)["lost_to_retention_24h"] == 130


def test_tables_made_by_5cc9f5c_upgrade_with_init_db_keeping_every_row(
    stack, make_topic, pg_schema, admin_engine
) -> None:
    topic = make_topic(partitions=2)
    env = cli_env(stack, topic, pg_schema, METRIC_ETL_GROUP_ID="g")
    produce(stack, topic, messages(40, "x"), partitions=2)
    owner = sa.make_url(stack["METRIC_ETL_DB_URL"]).username
    q = f'"{pg_schema}"'
    with admin_engine.begin() as conn:
        conn.exec_driver_sql(f'SET LOCAL ROLE "{owner}"')
        conn.exec_driver_sql(OLD_DDL.read_text().replace("{schema}", q))
        # What 5cc9f5c left: the topic's 40 messages handled (34 loaded, 6 rejected), the offsets
        # stored, a finished run and two killed ones still marked running.
        conn.execute(
            sa.text(
                f'INSERT INTO {q}.website_metrics (url, checked_at, topic, partition, "offset", run_id) '
                f"SELECT 'https://x.example/' || o, now(), '{topic}', p, o, 'old' "
                "FROM generate_series(0, 1) p, generate_series(0, 19) o WHERE NOT (o % 7 = 3)"
            )
        )
        conn.execute(
            sa.text(
                f"INSERT INTO {q}.website_metrics_rejects "
                '(topic, partition, "offset", stage, errors, run_id) '
                f"SELECT '{topic}', p, o, 'json', '[]', 'old' "
                "FROM generate_series(0, 1) p, generate_series(0, 19) o WHERE o % 7 = 3"
            )
        )
        conn.exec_driver_sql(
            f"INSERT INTO {q}.etl_offsets (group_id, topic, partition, next_offset, run_id) "
            f"VALUES ('g', '{topic}', 0, 20, 'old'), ('g', '{topic}', 1, 20, 'old')"
        )
        conn.exec_driver_sql(
            f"INSERT INTO {q}.etl_runs (run_id, group_id, topic, host, pid, started_at, status, read) "
            f"VALUES ('old', 'g', '{topic}', 'h', 1, now(), 'ok', 40), "
            f"('k1', 'g', '{topic}', 'h', 2, now(), 'running', 0), "
            f"('k2', 'g', '{topic}', 'h', 3, now(), 'running', 0)"
        )

    def snapshot() -> list:
        return [
            rows(
                admin_engine,
                f'SELECT topic, partition, "offset", url FROM {q}.website_metrics ORDER BY 1, 2, 3',
            ),
            rows(admin_engine, f'SELECT id, partition, "offset" FROM {q}.website_metrics_rejects ORDER BY 1'),
            rows(admin_engine, f"SELECT group_id, partition, next_offset FROM {q}.etl_offsets ORDER BY 1, 2"),
            rows(admin_engine, f"SELECT run_id, status FROM {q}.etl_runs ORDER BY 1"),
        ]

    before = snapshot()
    stale = run_cli(["run"], env)  # the new code on old tables: told to upgrade, nothing touched
    assert stale.returncode == 3, stale.stderr
    assert "from an older version of metric-etl" in stale.stderr and "metric-etl init-db" in stale.stderr

    up = run_cli(["init-db"], env)
    assert up.returncode == 0, up.stderr
    assert "added column website_metrics.incarnation" in up.stdout
    assert "replaced website_metrics's key website_metrics_pkey" in up.stdout
    assert "replaced website_metrics_rejects's key website_metrics_rejects_message_uq" in up.stdout
    assert snapshot() == before  # nothing lost, nothing doubled, killed runs kept as they were
    assert count(admin_engine, pg_schema, "website_metrics", "WHERE incarnation = 0") == 34
    keys = rows(
        admin_engine,
        "SELECT conrelid::regclass::text AS tbl, pg_get_constraintdef(oid) AS d FROM pg_constraint "
        "WHERE connamespace = CAST(:s AS regnamespace) AND contype IN ('p', 'u') ORDER BY 1, 2",
        s=pg_schema,
    )
    old_tables = {"etl_offsets", "etl_runs", "website_metrics", "website_metrics_rejects"}
    assert [(r.tbl.split(".")[-1], r.d) for r in keys if r.tbl.split(".")[-1] in old_tables] == [
        ("etl_offsets", "PRIMARY KEY (group_id, topic, partition)"),
        ("etl_runs", "PRIMARY KEY (run_id)"),
        # partitioned on checked_at, which the key must hold (the rows are partition _legacy)
        ("website_metrics", 'PRIMARY KEY (topic, partition, incarnation, "offset", checked_at)'),
        ("website_metrics_rejects", "PRIMARY KEY (id)"),
        ("website_metrics_rejects", 'UNIQUE (topic, partition, incarnation, "offset")'),
    ]
    indexes = rows(admin_engine, "SELECT indexname FROM pg_indexes WHERE schemaname = :s", s=pg_schema)
    assert not [r.indexname for r in indexes if r.indexname.endswith("_incarnation")]  # renamed by the swap
    assert run_cli(["init-db"], env).stdout.strip().endswith("all tables already up to date")

    # The messages the old code handled are known after the upgrade: caught up, and met again they
    # are duplicates, never loaded twice.
    code, report, err = run_json(env)
    assert (code, report["read"], report["loaded"]) == (0, 0, 0), err
    code, report, err = run_json(env, "--from-beginning")
    assert (code, report["read"], report["loaded"], report["duplicates"]) == (0, 40, 0, 40), err
    assert count(admin_engine, pg_schema, "website_metrics") == 34


@pytest.mark.parametrize("to", ["nowhere", "2026-11-28T10:00:00", "-5"])
def test_a_reset_target_that_is_not_one_is_a_configuration_error(stack, make_topic, pg_schema, to) -> None:
    topic = make_topic(partitions=1)
    done = run_cli(["offsets", "reset", "--to", to, "--dry-run"], cli_env(stack, topic, pg_schema))
    assert done.returncode in (2, 3) and "--to" in done.stderr, done.stderr


def test_an_upgrade_stopped_half_way_is_finished_by_the_next_init_db(
    stack, make_topic, pg_schema, admin_engine
) -> None:
    """The new key's index is built concurrently: a build that failed leaves an invalid index, which the
    next init-db drops and builds again; the keys then swap and no index is left over."""
    topic = make_topic(partitions=1)
    env = cli_env(stack, topic, pg_schema)
    owner = sa.make_url(stack["METRIC_ETL_DB_URL"]).username
    q = f'"{pg_schema}"'
    with admin_engine.begin() as conn:
        conn.exec_driver_sql(f'SET LOCAL ROLE "{owner}"')
        conn.exec_driver_sql(OLD_DDL.read_text().replace("{schema}", q))
        conn.execute(
            sa.text(
                f'INSERT INTO {q}.website_metrics (url, checked_at, topic, partition, "offset", run_id) '
                "SELECT 'https://x.example/', now(), 't', 0, o, 'old' FROM generate_series(0, 9) o"
            )
        )
    # A failed concurrent build under the name init-db uses: unique on topic alone cannot hold.
    with admin_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        # The session's role would outlive this block in the shared admin pool: reset it.
        conn.exec_driver_sql(f'SET ROLE "{owner}"')
        try:
            with pytest.raises(sa.exc.IntegrityError):
                conn.exec_driver_sql(
                    "CREATE UNIQUE INDEX CONCURRENTLY website_metrics_pkey_incarnation "
                    f"ON {q}.website_metrics (topic)"
                )
        finally:
            conn.exec_driver_sql("RESET ROLE")
    invalid = rows(
        admin_engine,
        "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:n)",
        n=f"{q}.website_metrics_pkey_incarnation",
    )
    assert [r.indisvalid for r in invalid] == [False]

    up = run_cli(["init-db"], env)
    assert up.returncode == 0, up.stderr
    key = rows(
        admin_engine,
        "SELECT pg_get_constraintdef(oid) AS d FROM pg_constraint WHERE conname = 'website_metrics_pkey' "
        "AND connamespace = CAST(:s AS regnamespace)",
        s=pg_schema,
    )
    assert [r.d for r in key] == ['PRIMARY KEY (topic, partition, incarnation, "offset", checked_at)']
    indexes = rows(admin_engine, "SELECT indexname FROM pg_indexes WHERE schemaname = :s", s=pg_schema)
    assert not [r.indexname for r in indexes if r.indexname.endswith("_incarnation")]
    assert count(admin_engine, pg_schema, "website_metrics") == 10
