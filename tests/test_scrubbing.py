"""Secrets masked on the error paths, where they really turn up (README: "masked ... also on error paths").

Each test makes a real failure whose text carries a secret: a server error naming what the operator
put in the database URL, a URL parse error, the Kafka client's own debug lines. Each of the three
scrubbers is the only guard of one of these lines: ``etl.db.store.scrub`` of the database errors (it alone
knows a password written in ``db_url``), ``cli.common.scrub`` of the ``Error:`` line of a configuration
error raised before any database call, ``logs.ScrubSecrets`` of the Kafka client's log lines.
"""

from __future__ import annotations

import json
import uuid

import pytest
import sqlalchemy as sa

from tests.support import cli_env, run_cli

pytestmark = pytest.mark.services


def _nowhere(secret: str, *texts: str) -> None:
    for text in texts:
        assert secret not in text, f"the secret is shown:\n{text[-3000:]}"


def test_a_password_written_in_db_url_is_masked_in_a_server_error_naming_it(stack, pg_schema) -> None:
    """The password pasted into the database name too: PostgreSQL's error names the database, so the
    password comes back from the server, in the retry warnings and the Error line."""
    password = stack["METRIC_ETL_DB_PASSWORD"]
    url = sa.make_url(stack["METRIC_ETL_DB_URL"])
    db_url = f"postgresql://{url.username}:{password}@{url.host}:{url.port}/x{password}"
    env = cli_env(stack, "t_unused", pg_schema, METRIC_ETL_DB_URL=db_url, METRIC_ETL_RETRY_DEADLINE="1.5")
    del env["METRIC_ETL_DB_PASSWORD"]  # only the URL knows it
    proc = run_cli(["run", "--output", "json", "--log-format", "json"], env)
    _nowhere(password, proc.stdout, proc.stderr)
    assert proc.returncode == 4, proc.stderr
    assert 'database "x***" does not exist' in proc.stderr
    warnings = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert any('database \\"x***\\"' in json.dumps(w) for w in warnings if w["level"] == "warning")
    assert json.loads(proc.stdout)["exit_code"] == 4


def test_a_password_in_the_port_of_db_url_is_masked_in_the_error(stack, pg_schema) -> None:
    """``user@host:password`` instead of ``user:password@host``: the URL parser's error quotes the
    port, which is the password (also set in METRIC_ETL_DB_PASSWORD)."""
    password = stack["METRIC_ETL_DB_PASSWORD"]
    url = sa.make_url(stack["METRIC_ETL_DB_URL"])
    env = cli_env(
        stack, "t_unused", pg_schema, METRIC_ETL_DB_URL=f"postgresql://{url.username}@{url.host}:{password}/x"
    )
    proc = run_cli(["run"], env)
    _nowhere(password, proc.stdout, proc.stderr)
    assert proc.returncode == 3, proc.stderr
    assert f"db_url: postgresql://{url.username}@{url.host}:***/x is not a valid URL" in proc.stderr
    assert "invalid literal for int() with base 10: '***'" in proc.stderr


def test_a_sasl_password_in_kafka_client_debug_lines_and_the_error_is_masked(stack, pg_schema) -> None:
    """A deployment template that filled the broker address with the SASL password: the Kafka client's
    own debug lines (-vv) and the unreachable-broker error name the host, which is the password."""
    password = f"pw{uuid.uuid4().hex}"
    env = cli_env(
        stack,
        "t_unused",
        pg_schema,
        METRIC_ETL_BOOTSTRAP_SERVERS=f"{password}:9",
        METRIC_ETL_SECURITY_PROTOCOL="SASL_PLAINTEXT",
        METRIC_ETL_SASL_MECHANISM="SCRAM-SHA-512",
        METRIC_ETL_SASL_USERNAME=stack["STACK_SASL_USER"],
        METRIC_ETL_SASL_PASSWORD=password,
        METRIC_ETL_RETRY_DEADLINE="2",
    )
    proc = run_cli(["run", "-vv"], env)
    _nowhere(password, proc.stdout, proc.stderr)
    assert proc.returncode == 4, proc.stderr
    assert "Error: connect to Kafka: no Kafka broker reachable at ***:9" in proc.stderr
    # The client's own lines, e.g. "DNS lookup failed for ***:9, gaierror(...)".
    assert "DNS lookup failed for ***:9" in proc.stderr, proc.stderr[-3000:]


def test_a_secret_inside_a_longer_one_leaves_no_part_of_the_longer_shown() -> None:
    """The longest secret is masked first: masking a password that is part of another would leave the
    rest of the other one in the text ("***-rest")."""
    from etl.config import Settings
    from etl.db.store import scrub

    settings = Settings(
        db_password="hunter2",
        sasl_password="hunter2-and-more",
        db_url="postgresql://etl:hunter2-x@db/metrics",
    )
    text = "failed: hunter2-and-more; hunter2-x; hunter2"
    assert scrub(text, settings) == "failed: ***; ***; ***"


def test_a_secret_inside_a_longer_one_that_sorts_before_it_is_masked_whole() -> None:
    """Longest first, not the reverse alphabetical order: "zz9" sorts after "a-zz9-b" and would be
    masked first, leaving "a-***-b"."""
    from etl.config import Settings, mask, secrets_of

    settings = Settings(db_password="zz9", sasl_password="a-zz9-b", db_url="postgresql://etl@db/metrics")
    assert mask("failed: a-zz9-b; zz9", secrets_of(settings)) == "failed: ***; ***"
