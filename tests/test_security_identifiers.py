"""Hostile configuration and secrets.

SQL identifiers from configuration (schema and table names) are validated before anything connects
and quoted wherever they are used: ``x; drop table y`` is a configuration error (exit 3), never
executed. Secrets never appear in output, logs, the report, ``etl_runs`` or the rejects table,
also on error paths, and also when the password is written into ``db_url`` itself.
"""

from __future__ import annotations

import json
import os

import pytest
import sqlalchemy as sa
import yaml
from click.testing import CliRunner

from etl.cli import main
from etl.db import schema as schema_module
from tests.support import REPO, cli_env, good_message, produce, rows, run_cli

IDENTIFIER_SETTINGS = ("db_schema", "metrics_table", "rejects_table", "offsets_table", "runs_table")
HOSTILE = (
    "x; drop table y",
    'x"; drop table y; --',
    "x' or '1'='1",
    "y --",
    "a.b",
    "Website_Metrics",
    "1abc",
    "a" * 64,
    "tâble",
    "",
)


def _env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METRIC_ETL_")}
    env["METRIC_ETL_CONFIG"] = str(REPO / "config" / "service.yaml")
    env.update({f"METRIC_ETL_{k.upper()}": v for k, v in settings.items()})
    return env


@pytest.mark.parametrize("setting", IDENTIFIER_SETTINGS)
def test_a_hostile_identifier_from_the_environment_is_exit_3(setting) -> None:
    for value in HOSTILE:
        result = CliRunner().invoke(main, ["run"], env=_env(**{setting: value}))
        assert result.exit_code == 3, (value, result.output)
        assert f"{setting}: {value!r} is not a plain SQL identifier" in result.output, result.output


def test_hostile_identifiers_in_a_config_file_are_all_reported_at_once(tmp_path) -> None:
    config = tmp_path / "service.yaml"
    config.write_text(yaml.safe_dump({k: f"{k}; drop table y" for k in IDENTIFIER_SETTINGS}))
    result = CliRunner().invoke(main, ["run", "--config", str(config)], env=_env())
    assert result.exit_code == 3
    assert f"invalid configuration ({len(IDENTIFIER_SETTINGS)} problems)" in result.output
    for key in IDENTIFIER_SETTINGS:
        assert f"{key}: '{key}; drop table y' is not a plain SQL identifier" in result.output


@pytest.mark.services
def test_a_hostile_identifier_is_never_executed(stack, make_topic, pg_schema, admin_engine) -> None:
    """With the real services configured, nothing reaches the database: the sentinel survives and
    the schema stays empty (the configuration fails before any connection)."""
    topic = make_topic(partitions=1)
    produce(stack, topic, [good_message(0)])
    with admin_engine.begin() as conn:
        conn.execute(sa.text(f'CREATE TABLE "{pg_schema}".y (v int)'))
    for setting in IDENTIFIER_SETTINGS:
        env = cli_env(
            stack, topic, pg_schema, **{f"METRIC_ETL_{setting.upper()}": f"x; drop table {pg_schema}.y"}
        )
        if setting == "db_schema":
            env["METRIC_ETL_DB_SCHEMA"] = f"{pg_schema}; drop table {pg_schema}.y"
        proc = run_cli(["run"], env)
        assert proc.returncode == 3, proc.stderr
        assert proc.stderr.startswith("Error: invalid configuration")
    tables = rows(admin_engine, "SELECT tablename FROM pg_tables WHERE schemaname = :s", s=pg_schema)
    assert [t.tablename for t in tables] == ["y"]


@pytest.mark.services
def test_identifiers_are_quoted_even_past_validation(stack, admin_engine) -> None:
    """Defence in depth: the library quotes every name, so even a name that skipped validation (a
    caller building tables by hand) is a name, not SQL."""
    hostile = 'x"; drop table y; --'
    tables = schema_module.build_tables(hostile, metrics="m; drop table y")
    sentinel = f"sentinel_{os.getpid()}"
    with admin_engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE public.{sentinel} (v int)"))
    try:
        with admin_engine.begin() as conn:
            schema_module.create_all(conn, tables)
        names = rows(admin_engine, "SELECT tablename FROM pg_tables WHERE schemaname = :s", s=hostile)
        assert "m; drop table y" in {n.tablename for n in names}
        assert rows(admin_engine, "SELECT 1 FROM pg_tables WHERE tablename = :t", t=sentinel)
    finally:
        quote = admin_engine.dialect.identifier_preparer.quote
        with admin_engine.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA IF EXISTS {quote(hostile)} CASCADE"))
            conn.execute(sa.text(f"DROP TABLE IF EXISTS public.{sentinel}"))


# -- secrets ---------------------------------------------------------------------------------------


def _url_with_password(stack, password: str, **parts: object) -> str:
    url = sa.make_url(stack["METRIC_ETL_DB_URL"]).set(password=password, **parts)
    return url.render_as_string(hide_password=False)


def _dump(admin_engine: sa.Engine, schema: str) -> str:
    """Every row of the job's tables in the schema, as text."""
    parts = []
    for table in ("etl_runs", "website_metrics_rejects", "etl_offsets", "website_metrics"):
        found = rows(
            admin_engine,
            "SELECT 1 FROM pg_tables WHERE schemaname = :s AND tablename = :t",
            s=schema,
            t=table,
        )
        if found:
            parts += [r[0] for r in rows(admin_engine, f'SELECT x::text FROM "{schema}".{table} x')]
    return "\n".join(parts)


@pytest.mark.services
def test_a_password_in_db_url_is_never_echoed_on_any_path(stack, make_topic, pg_schema, admin_engine) -> None:
    topic = make_topic(partitions=1)
    produce(stack, topic, [good_message(i) for i in range(5)] + [b"{not json", b"\xff"])
    password = stack["METRIC_ETL_DB_PASSWORD"]
    wrong = "wr0ng-" + password[:6] + "-pw"
    cases = {
        # unreachable: exit 4
        "unreachable": (_url_with_password(stack, password, port=1), 4),
        # refused password: exit 3
        "wrong password": (_url_with_password(stack, wrong), 3),
        # an unparseable URL (the port): exit 3
        "bad port": (
            stack["METRIC_ETL_DB_URL"]
            .replace("etl@", f"etl:{password}@")
            .replace(f":{stack['STACK_PG_PORT']}", ":5x"),
            3,
        ),
        # the right password in the URL: the run works, and still says it nowhere
        "works": (_url_with_password(stack, password), 0),
    }
    for name, (url, code) in cases.items():
        env = cli_env(stack, topic, pg_schema, METRIC_ETL_DB_URL=url, METRIC_ETL_RETRY_DEADLINE="1")
        del env["METRIC_ETL_DB_PASSWORD"]
        for args in (["run", "--output", "json", "-v"], ["run", "--log-format", "json", "-vv"]):
            proc = run_cli(args, env)
            assert proc.returncode == code, (name, proc.stderr[-2000:])
            shown = proc.stdout + proc.stderr
            assert password not in shown and wrong not in shown, (name, args)
    dump = _dump(admin_engine, pg_schema)
    assert dump and password not in dump and wrong not in dump


@pytest.mark.services
def test_secrets_stay_out_of_etl_runs_and_the_report_when_kafka_fails(
    stack, make_topic, pg_schema, admin_engine
) -> None:
    """A failed run still records itself; its error text and its report hold no secret."""
    topic = make_topic(partitions=1)
    sasl_password = stack["STACK_SASL_PASSWORD"]
    env = cli_env(
        stack,
        topic,
        pg_schema,
        METRIC_ETL_BOOTSTRAP_SERVERS="127.0.0.1:1",
        METRIC_ETL_RETRY_DEADLINE="1",
        METRIC_ETL_SECURITY_PROTOCOL="SASL_PLAINTEXT",
        METRIC_ETL_SASL_MECHANISM="PLAIN",
        METRIC_ETL_SASL_USERNAME="etl",
        METRIC_ETL_SASL_PASSWORD=sasl_password,
    )
    proc = run_cli(["run", "--output", "json", "-vv", "--log-format", "json"], env)
    assert proc.returncode == 4, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["status"] == "failed"
    runs = rows(admin_engine, f'SELECT status, error FROM "{pg_schema}".etl_runs')
    assert [r.status for r in runs] == ["failed"] and runs[0].error
    for secret in (sasl_password, stack["METRIC_ETL_DB_PASSWORD"]):
        assert secret not in proc.stdout + proc.stderr
        assert secret not in _dump(admin_engine, pg_schema)
