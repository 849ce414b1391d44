"""TLS and SASL end to end (the original service's TLS never worked), and secrets never shown."""

from __future__ import annotations

import pytest

from etl.run import run_batch
from tests.support import cli_env, count, good_message, produce, rows, run_cli, settings_for

pytestmark = pytest.mark.services


def values() -> list[bytes | None]:
    return [good_message(i) for i in range(40)] + [b"{broken", None]


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"])
def test_run_over_sasl_ssl_loads_the_backlog(stack, make_topic, pg_schema, admin_engine, mechanism) -> None:
    topic = make_topic(partitions=2)
    produce(stack, topic, values(), partitions=2)
    s = settings_for(
        stack,
        topic,
        pg_schema,
        bootstrap_servers=stack["STACK_KAFKA_SASL_SSL"],
        security_protocol="SASL_SSL",
        ssl_cafile=stack["STACK_CA_FILE"],
        sasl_mechanism=mechanism,
        sasl_username=stack["STACK_SASL_USER"],
        sasl_password=stack["STACK_SASL_PASSWORD"],
    )
    report = run_batch(s)
    assert (report.loaded, report.rejected) == (40, 2)
    assert count(admin_engine, pg_schema, "website_metrics") == 40


def test_run_over_ssl_with_verified_database_tls(stack, make_topic, pg_schema, admin_engine) -> None:
    topic = make_topic(partitions=1)
    produce(stack, topic, values())
    env = cli_env(
        stack,
        topic,
        pg_schema,
        METRIC_ETL_BOOTSTRAP_SERVERS=stack["STACK_KAFKA_SSL"].replace("127.0.0.1", "localhost"),
        METRIC_ETL_SECURITY_PROTOCOL="SSL",
        METRIC_ETL_SSL_CAFILE=stack["STACK_CA_FILE"],
        METRIC_ETL_DB_URL=stack["METRIC_ETL_DB_URL"].replace("127.0.0.1", "localhost"),
        METRIC_ETL_DB_SSLMODE="verify-full",
        METRIC_ETL_DB_SSLROOTCERT=stack["STACK_CA_FILE"],
    )
    proc = run_cli(["run", "--output", "json"], env)
    assert proc.returncode == 0, proc.stderr
    assert '"loaded": 40' in proc.stdout


def test_wrong_ca_is_a_clear_configuration_error(stack, make_topic, pg_schema) -> None:
    topic = make_topic(partitions=1)
    env = cli_env(
        stack,
        topic,
        pg_schema,
        METRIC_ETL_BOOTSTRAP_SERVERS=stack["STACK_KAFKA_SSL"],
        METRIC_ETL_SECURITY_PROTOCOL="SSL",
        METRIC_ETL_SSL_CAFILE=stack["STACK_WRONG_CA_FILE"],
        METRIC_ETL_RETRY_DEADLINE="3",
    )
    proc = run_cli(["run"], env)
    assert proc.returncode in (3, 4), proc.stderr
    assert "Error:" in proc.stderr


def test_secrets_never_appear_in_output_logs_or_tables(stack, make_topic, pg_schema, admin_engine) -> None:
    topic = make_topic(partitions=1)
    produce(stack, topic, values())
    sasl_password = stack["STACK_SASL_PASSWORD"]
    db_password = stack["METRIC_ETL_DB_PASSWORD"]
    env = cli_env(
        stack,
        topic,
        pg_schema,
        METRIC_ETL_BOOTSTRAP_SERVERS=stack["STACK_KAFKA_SASL_SSL"],
        METRIC_ETL_SECURITY_PROTOCOL="SASL_SSL",
        METRIC_ETL_SSL_CAFILE=stack["STACK_CA_FILE"],
        METRIC_ETL_SASL_MECHANISM="SCRAM-SHA-512",
        METRIC_ETL_SASL_USERNAME=stack["STACK_SASL_USER"],
        METRIC_ETL_SASL_PASSWORD=sasl_password,
    )
    outputs = []
    for args in (["run", "-v", "--output", "json"], ["run", "-vv", "--log-format", "json"]):
        proc = run_cli(args, env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outputs.append(proc.stdout + proc.stderr)
    # A refused login shows only in the client's log, within its bootstrap wait (the retry deadline):
    # 5 s is too short for the TLS and SCRAM exchanges on a busy 2-core machine.
    wrong_env = {
        **env,
        "METRIC_ETL_SASL_PASSWORD": "wrong-" + sasl_password[:4],
        "METRIC_ETL_RETRY_DEADLINE": "20",
    }
    wrong = run_cli(["run"], wrong_env)
    assert wrong.returncode == 3, wrong.stderr
    assert "authentication failed" in wrong.stderr.lower()
    outputs.append(wrong.stdout + wrong.stderr)
    for text in outputs:
        assert sasl_password not in text and db_password not in text
    dump = rows(
        admin_engine,
        f"SELECT concat_ws('|', r::text) AS t FROM \"{pg_schema}\".etl_runs r "
        f'UNION ALL SELECT x::text FROM "{pg_schema}".website_metrics_rejects x',
    )
    for (text,) in dump:
        assert sasl_password not in text and db_password not in text


@pytest.mark.parametrize("listener", ["plaintext", "ssl"])
def test_messages_larger_than_a_socket_read_arrive_whole(
    stack, make_topic, pg_schema, admin_engine, listener
) -> None:
    """The job reads its sockets 256 KiB at a time (etl/kafka/fast_records.py): a fetch of several
    MiB, and a message larger than one read, arrive whole over plaintext and over TLS."""
    topic = make_topic(partitions=1)
    sizes = [700_000, 300_000, 262_144, 5, 650_001]
    produce(stack, topic, [good_message(i, regex_pattern="x" * n) for i, n in enumerate(sizes)])
    extra = {}
    if listener == "ssl":
        extra = {
            "METRIC_ETL_BOOTSTRAP_SERVERS": stack["STACK_KAFKA_SSL"].replace("127.0.0.1", "localhost"),
            "METRIC_ETL_SECURITY_PROTOCOL": "SSL",
            "METRIC_ETL_SSL_CAFILE": stack["STACK_CA_FILE"],
        }
    proc = run_cli(["run", "--output", "json"], cli_env(stack, topic, pg_schema, **extra))
    assert proc.returncode == 0, proc.stderr
    stored = rows(
        admin_engine,
        f'SELECT "offset", length(regex_pattern) FROM "{pg_schema}".website_metrics ORDER BY "offset"',
    )
    assert [tuple(r) for r in stored] == list(enumerate(sizes))
