"""`metric-etl status`, `check` and `init-db` against the real broker and database, and their exit
codes."""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner, Result

from etl.cli import main
from etl.errors import StatusCode
from etl.run import run_batch
from tests.exactly_once import wait_for
from tests.support import (
    cli_env,
    count,
    create_old_metrics_table,
    good_message,
    produce,
    rows,
    run_cli,
    settings_for,
)


def invoke(args: list[str], env: dict[str, str]) -> Result:
    """The command in-process (fast); restores the log handlers the command replaced."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        return CliRunner().invoke(main, args, env=env, catch_exceptions=False)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


def test_status_exit_codes_are_stable() -> None:
    # Monitors key on these numbers (documented in `metric-etl status --help` and the README).
    assert {c.name: int(c) for c in StatusCode} == {
        "OK": 0,
        "CONFIG": 3,
        "UNREACHABLE": 4,
        "LAST_RUN_FAILED": 6,
        "STALE": 7,
        "LAG": 8,
        "LOST": 9,
        "ROLLUPS_DIFFER": 10,  # `rollups check`
    }
    help_text = CliRunner().invoke(main, ["status", "--help"]).output
    for code, meaning in [(3, "configuration"), (4, "unreachable"), (6, "last finished run failed"),
                          (7, "--max-age"), (8, "--max-lag")]:  # fmt: skip
        assert any(
            line.strip().startswith(f"{code}  ") and meaning in line for line in help_text.splitlines()
        )


def test_status_shows_offsets_lag_and_runs_and_judges_lag(stack, make_topic, pg_schema) -> None:
    topic = make_topic(partitions=2)
    produce(stack, topic, [good_message(i) for i in range(10)], partitions=2)
    run_batch(settings_for(stack, topic, pg_schema))
    env = cli_env(stack, topic, pg_schema)

    ok = invoke(["status"], env)
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.startswith("metric-etl status: OK\n")
    table = ok.stdout.splitlines()
    assert [line.split() for line in table if line.strip().startswith(("0 ", "1 "))] == [
        ["0", "5", "5", "0"],
        ["1", "5", "5", "0"],
    ]
    assert any(" ok " in line and "caught_up" in line and " 10 " in line for line in table)

    produce(stack, topic, [good_message(i) for i in range(7)], partitions=2)
    behind = invoke(["status", "--max-lag", "5", "--output", "json"], env)
    assert behind.exit_code == StatusCode.LAG == 8
    data = json.loads(behind.stdout)
    assert data["lag"] == 7 and data["ok"] is False and data["exit_code"] == 8
    assert data["problems"] == ["lag 7 is above --max-lag 5"]
    assert {p["partition"]: (p["stored"], p["end"], p["lag"]) for p in data["partitions"]} == {
        0: (5, 9, 4),
        1: (5, 8, 3),
    }
    assert data["runs"][0]["status"] == "ok" and data["runs"][0]["loaded"] == 10
    assert invoke(["status", "--max-lag", "7"], env).exit_code == 0
    assert invoke(["status", "--max-age", "1h"], env).exit_code == 0


def test_status_exit_6_after_a_failed_run_7_when_stale(stack, make_topic, pg_schema, admin_engine) -> None:
    topic = make_topic(partitions=1)
    env = cli_env(stack, topic, pg_schema)
    produce(stack, topic, [b"not json"] * 4 + [good_message(i) for i in range(4)])
    failed = run_cli(["run", "--max-reject-ratio", "0.1"], env)
    assert failed.returncode == 5, failed.stderr

    after = run_cli(["status"], env)  # a real process: the exit code a monitor sees
    assert after.returncode == StatusCode.LAST_RUN_FAILED == 6, after.stderr
    assert "ended reject_ratio: 4 of 8 messages in cycle 1 were rejected" in after.stdout
    assert "metric-etl status: PROBLEM (exit 6)" in after.stdout
    # Both apply: the lower code wins.
    assert invoke(["status", "--max-lag", "0"], env).exit_code == 6
    stale = invoke(["status", "--max-age", "1h", "--output", "json"], env)
    assert stale.exit_code == 6
    assert "no run ended ok within the last 1h (there is none)" in json.loads(stale.stdout)["problems"]

    ok = run_cli(["run"], env)
    assert ok.returncode == 0, ok.stderr
    assert invoke(["status", "--max-age", "1h"], env).exit_code == 0
    wait_for(
        "the last run to be over 1 s old",
        lambda: rows(
            admin_engine,
            f"SELECT now() - max(finished_at) > interval '1.2 s' FROM \"{pg_schema}\".etl_runs",
        )[0][0],
    )
    late = invoke(["status", "--max-age", "1s"], env)
    assert late.exit_code == StatusCode.STALE == 7
    assert "no run ended ok within the last 1s (the last one finished " in late.stdout


def test_status_without_runs_or_tables_or_services(stack, make_topic, pg_schema) -> None:
    topic = make_topic(partitions=1)
    env = cli_env(stack, topic, pg_schema)

    no_tables = invoke(["status"], env)
    assert no_tables.exit_code == 3
    assert "the tables are missing" in no_tables.stderr and "metric-etl init-db" in no_tables.stderr

    assert invoke(["init-db"], env).exit_code == 0
    fresh = invoke(["status", "--output", "json"], env)
    assert fresh.exit_code == 0, fresh.output
    assert json.loads(fresh.stdout)["runs"] == []
    assert "no runs recorded yet" in invoke(["status"], env).stdout
    assert invoke(["status", "--max-age", "1h"], env).exit_code == StatusCode.STALE

    no_topic = invoke(["status", "--topic", "t_no_such_topic"], env)
    assert no_topic.exit_code == 3
    assert "topic 't_no_such_topic' does not exist" in no_topic.stdout

    produce(stack, topic, [good_message(i) for i in range(3)])
    run_batch(settings_for(stack, topic, pg_schema))
    no_kafka = invoke(["status", "--bootstrap-servers", "127.0.0.1:1", "--output", "json"], env)
    assert no_kafka.exit_code == StatusCode.UNREACHABLE == 4
    data = json.loads(no_kafka.stdout)
    assert data["partitions"] == [{"partition": 0, "stored": 3, "end": None, "lag": None}]
    assert "cannot connect to Kafka (127.0.0.1:1: Connection refused)" in data["problems"][0]

    no_db = invoke(
        ["status", "--db-url", "postgresql://etl@127.0.0.1:1/metrics"],
        {**env, "METRIC_ETL_RETRY_DEADLINE": "1"},
    )
    assert no_db.exit_code == 4
    assert "Error: status: PostgreSQL at 127.0.0.1:1/metrics" in no_db.stderr
    assert stack["METRIC_ETL_DB_PASSWORD"] not in no_db.output


# -- check ----------------------------------------------------------------------------------------


def states(result: Result) -> dict[str, str]:
    return {c["name"]: c["state"] for c in json.loads(result.stdout)["checks"]}


def test_check_passes_on_a_working_set_up(stack, make_topic, pg_schema) -> None:
    topic = make_topic(partitions=2)
    env = cli_env(stack, topic, pg_schema)
    assert invoke(["init-db"], env).exit_code == 0
    result = invoke(["check"], env)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == "all checks passed"
    assert result.stdout.splitlines()[0].startswith("settings: config file ")
    assert [line.split()[0] for line in result.stdout.splitlines()[1:-1]] == ["OK"] * 8
    assert f"'{topic}': 2 partitions" in result.stdout
    assert stack["METRIC_ETL_DB_PASSWORD"] not in result.output


@pytest.mark.parametrize(
    ("settings", "name", "detail", "fix"),
    [
        (
            {"METRIC_ETL_BOOTSTRAP_SERVERS": "STACK_KAFKA_SSL", "METRIC_ETL_SECURITY_PROTOCOL": "SSL",
             "METRIC_ETL_SSL_CAFILE": "STACK_WRONG_CA_FILE"},
            "kafka: connect",
            "the broker certificate is not trusted",
            "set ssl_cafile to the CA bundle that signed the broker certificate",
        ),
        (
            {"METRIC_ETL_SECURITY_PROTOCOL": "SSL", "METRIC_ETL_SSL_CAFILE": "STACK_CA_FILE"},
            "kafka: connect",
            "the port does not speak TLS",
            "use the broker's TLS listener",
        ),
        (
            {"METRIC_ETL_BOOTSTRAP_SERVERS": "STACK_KAFKA_SSL"},
            "kafka: connect",
            "the port speaks TLS, but security_protocol is PLAINTEXT",
            "set security_protocol to SSL or SASL_SSL",
        ),
        (
            {"METRIC_ETL_TOPIC": "t_no_such_topic"},
            "kafka: topic",
            "topic 't_no_such_topic' does not exist on the broker",
            "create it, or set topic",
        ),
        (
            {"METRIC_ETL_DB_PASSWORD": "not-the-password"},
            "database: connect",
            "authentication failed",
            "check METRIC_ETL_DB_PASSWORD",
        ),
        (
            {"METRIC_ETL_DB_SCHEMA": "t_no_such_schema"},
            "database: tables",
            "table t_no_such_schema.etl_offsets is missing",
            "run `metric-etl init-db`",
        ),
    ],
    ids=["wrong-ca", "tls-to-plain-port", "plain-to-tls-port", "no-topic", "db-password", "no-tables"],
)  # fmt: skip
def test_check_says_what_to_fix_and_exits_3(
    stack, make_topic, pg_schema, settings, name, detail, fix
) -> None:
    topic = make_topic(partitions=1)
    env = cli_env(stack, topic, pg_schema, METRIC_ETL_RETRY_DEADLINE="3")
    assert invoke(["init-db"], env).exit_code == 0
    env.update({k: stack.get(v, v) if v.startswith("STACK_") else v for k, v in settings.items()})
    start = time.monotonic()
    result = invoke(["check"], env)
    assert result.exit_code == 3, result.output
    assert time.monotonic() - start < 15
    lines = result.stdout.splitlines()
    failed = next(i for i, line in enumerate(lines) if line.startswith("FAIL") and name in line)
    assert detail in lines[failed]
    assert lines[failed + 1].strip().startswith("fix: ") and fix in lines[failed + 1]
    assert "not-the-password" not in result.output
    assert stack["METRIC_ETL_DB_PASSWORD"] not in result.output


def test_check_over_sasl_ssl_and_an_unreachable_broker(stack, make_topic, pg_schema) -> None:
    topic = make_topic(partitions=1)
    env = cli_env(stack, topic, pg_schema, METRIC_ETL_RETRY_DEADLINE="3")
    assert invoke(["init-db"], env).exit_code == 0
    sasl = {
        **env,
        "METRIC_ETL_BOOTSTRAP_SERVERS": stack["STACK_KAFKA_SASL_SSL"],
        "METRIC_ETL_SECURITY_PROTOCOL": "SASL_SSL",
        "METRIC_ETL_SSL_CAFILE": stack["STACK_CA_FILE"],
        "METRIC_ETL_SASL_MECHANISM": "SCRAM-SHA-256",
        "METRIC_ETL_SASL_USERNAME": stack["STACK_SASL_USER"],
        "METRIC_ETL_SASL_PASSWORD": stack["STACK_SASL_PASSWORD"],
    }
    good = invoke(["check", "--output", "json"], sasl)
    assert good.exit_code == 0, good.output
    assert "SASL SCRAM-SHA-256 as" in json.loads(good.stdout)["checks"][0]["detail"]
    assert stack["STACK_SASL_PASSWORD"] not in good.output

    down = invoke(["check", "--output", "json", "--bootstrap-servers", "127.0.0.1:1"], env)
    assert down.exit_code == 4, down.output  # only unreachable: retry later
    assert states(down) == {
        "kafka: connect": "fail",
        "kafka: topic": "skip",
        "kafka: consumer group": "skip",
        "database: connect": "ok",
        "database: tables": "ok",
        "database: privileges": "ok",
        "database: run set-up": "ok",
        "database: rejects commands": "ok",
    }


@pytest.fixture
def job_role(admin_engine, pg_schema) -> Iterator[dict[str, str]]:
    """A login role with only what a least-privilege run role would be granted on the test schema."""
    from sqlalchemy import text

    name, password = f"r_{secrets.token_hex(4)}", secrets.token_hex(12)
    with admin_engine.begin() as conn:
        conn.execute(text(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'"))
    yield {"name": name, "password": password}
    with admin_engine.begin() as conn:
        conn.execute(text(f"DROP OWNED BY {name}"))
        conn.execute(text(f"DROP ROLE {name}"))


@pytest.mark.parametrize("layout", ["new", "old"])
def test_check_lists_missing_grants_as_statements(
    stack, make_topic, pg_schema, admin_engine, job_role, layout
) -> None:
    from sqlalchemy import text

    topic = make_topic(partitions=1)
    env = cli_env(stack, topic, pg_schema)
    if layout == "old":  # a metrics table from before the message key: its id draws from a sequence
        create_old_metrics_table(admin_engine, stack, pg_schema)
    assert invoke(["init-db"], env).exit_code == 0
    role = job_role["name"]
    with admin_engine.begin() as conn:
        conn.execute(text(f'GRANT USAGE ON SCHEMA "{pg_schema}" TO {role}'))
        conn.execute(text(f'GRANT SELECT, INSERT ON "{pg_schema}".website_metrics TO {role}'))
        conn.execute(text(f'GRANT SELECT, INSERT ON "{pg_schema}".website_metrics_rejects TO {role}'))
        conn.execute(text(f'GRANT SELECT, INSERT, UPDATE ON "{pg_schema}".etl_runs TO {role}'))
        conn.execute(text(f'GRANT SELECT ON "{pg_schema}".etl_offsets TO {role}'))
    url = stack["METRIC_ETL_DB_URL"].replace("//etl@", f"//{role}@")
    env.update(METRIC_ETL_DB_URL=url, METRIC_ETL_DB_PASSWORD=job_role["password"])

    result = invoke(["check"], env)
    assert result.exit_code == 3, result.output
    out = result.stdout
    assert f"INSERT, UPDATE on {pg_schema}.etl_offsets" in out
    assert f"GRANT INSERT, UPDATE ON {pg_schema}.etl_offsets TO {role};" in out
    rejects_seq = f"{pg_schema}.website_metrics_rejects_id_seq"
    metrics_seq = f"{pg_schema}.website_metrics_id_seq"
    assert f"USAGE on sequence {rejects_seq}" in out
    assert f"GRANT USAGE ON SEQUENCE {rejects_seq} TO {role};" in out
    # A metrics table has no sequence: its key is the message (init-db dropped an old table's id).
    assert f"USAGE on sequence {metrics_seq}" not in out
    assert f"SELECT, INSERT, UPDATE on {pg_schema}.website_metrics_hourly" in out  # the rollups
    assert f"GRANT SELECT, INSERT, UPDATE ON {pg_schema}.website_metrics_latest TO {role};" in out
    # The tables exist, so a run needs no CREATE privilege: set-up is not among the failures.
    assert "FAIL  database: run set-up" not in out and "GRANT CREATE ON DATABASE" not in out
    assert "WARN  database: rejects commands" in out and "UPDATE, DELETE on" in out
    assert job_role["password"] not in result.output


# -- init-db --------------------------------------------------------------------------------------


def test_init_db_creates_then_upgrades_idempotently(stack, make_topic, pg_schema, admin_engine) -> None:
    from sqlalchemy import text

    topic = make_topic(partitions=1)
    env = cli_env(stack, topic, pg_schema)
    first = invoke(["init-db"], env)
    assert first.exit_code == 0, first.output
    assert first.stdout.splitlines() == [
        f"schema {pg_schema}:",
        "  created table etl_offsets",
        "  created table etl_runs",
        "  created table website_metrics",
        "  created table website_metrics_daily",
        "  created table website_metrics_hourly",
        "  created table website_metrics_latest",
        "  created table website_metrics_rejects",
    ]
    again = invoke(["init-db"], env)
    assert again.stdout.strip() == f"schema {pg_schema}: all tables already up to date"

    # A rejects table from before the review workflow: no status columns, no check, no index.
    with admin_engine.begin() as conn:
        table = f'"{pg_schema}".website_metrics_rejects'
        conn.execute(text(f"ALTER TABLE {table} DROP COLUMN status_note, DROP COLUMN status_changed_at"))
        conn.execute(text(f"ALTER TABLE {table} DROP COLUMN status"))  # its check constraint goes too
        conn.execute(text(f'DROP INDEX "{pg_schema}".website_metrics_rejects_rejected_at_idx'))
        conn.execute(
            text(
                f'INSERT INTO {table} (topic, partition, "offset", stage, errors, run_id) '
                "VALUES ('t', 0, 1, 'schema', '[]', 'old')"
            )
        )
    upgraded = invoke(["init-db"], env)
    assert upgraded.exit_code == 0, upgraded.output
    assert upgraded.stdout.splitlines()[1:] == [
        "  added column website_metrics_rejects.status",
        "  added column website_metrics_rejects.status_note",
        "  added column website_metrics_rejects.status_changed_at",
        "  added constraint website_metrics_rejects_status_ck",
        "  added index website_metrics_rejects_rejected_at_idx",
    ]
    assert rows(admin_engine, f'SELECT status FROM "{pg_schema}".website_metrics_rejects')[0].status == "new"
    assert invoke(["init-db"], env).stdout.strip().endswith("all tables already up to date")
    assert count(admin_engine, pg_schema, "website_metrics_rejects") == 1


def test_init_db_sql_prints_the_ddl_without_a_database() -> None:
    env: dict[str, Any] = {
        "METRIC_ETL_DB_URL": "postgresql://nobody@127.0.0.1:1/none",
        "METRIC_ETL_DB_SCHEMA": "m",
    }
    result = invoke(["init-db", "--sql"], env)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("CREATE SCHEMA IF NOT EXISTS m;")
    assert "CREATE TABLE IF NOT EXISTS m.website_metrics_rejects (" in result.stdout
    metrics = result.stdout[result.stdout.index("CREATE TABLE IF NOT EXISTS m.website_metrics (") :]
    metrics = metrics[: metrics.index(");")]
    assert (
        'CONSTRAINT website_metrics_pkey PRIMARY KEY (topic, partition, incarnation, "offset", checked_at)'
        in metrics
    )
    assert "PARTITION OF m.website_metrics DEFAULT" in result.stdout
    assert " id " not in metrics and "message_uq" not in metrics
    assert "CONSTRAINT website_metrics_rejects_message_uq UNIQUE" in result.stdout
