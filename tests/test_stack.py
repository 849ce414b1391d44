"""The local stack is real: Kafka on every listener, PostgreSQL with verified TLS, an idempotent `up`."""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import sqlalchemy as sa
from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaConnectionError, KafkaTimeoutError, SaslAuthenticationFailedError

from tests.support import skip_outside_ci

REPO = Path(__file__).resolve().parent.parent
MECHANISMS = ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"]

pytestmark = pytest.mark.services

# kafka-python 3.0 retries a failed bootstrap until bootstrap_timeout_ms and then raises
# KafkaTimeoutError("Unable to bootstrap from ..."); the cause (TLS or SASL) is only in its log.
# A newer release may raise the cause itself: accept both, and look for the cause in either place.
BOOTSTRAP_FAILURES = (KafkaTimeoutError, KafkaConnectionError, SaslAuthenticationFailedError)
FAILING_BOOTSTRAP_MS = 3_000


def roundtrip(config: dict[str, Any], topic: str, count: int = 3) -> list[bytes]:
    """Produce ``count`` messages to ``topic`` and read them back from the beginning."""
    sent = [f"message {i} over {config['security_protocol']}".encode() for i in range(count)]
    producer = KafkaProducer(max_block_ms=10_000, **config)
    try:
        for value in sent:
            producer.send(topic, value).get(timeout=10)
    finally:
        producer.close(timeout=5)
    consumer = KafkaConsumer(
        topic,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=10_000,
        **config,
    )
    received: list[bytes] = []
    try:
        for record in consumer:
            received.append(record.value)
            if len(received) == count:
                break
    finally:
        consumer.close()
    assert received == sent
    return received


def failed_bootstrap(config: dict[str, Any], caplog: pytest.LogCaptureFixture) -> str:
    """Try to connect with ``config``, expecting to fail within the bootstrap timeout; return everything
    the client said: the exception and its log."""
    caplog.set_level(logging.WARNING, logger="kafka")
    config = {**config, "bootstrap_timeout_ms": FAILING_BOOTSTRAP_MS, "reconnect_backoff_max_ms": 250}
    started = time.monotonic()
    with pytest.raises(BOOTSTRAP_FAILURES) as info:
        KafkaProducer(max_block_ms=FAILING_BOOTSTRAP_MS, **config).close(timeout=1)
    assert time.monotonic() - started < FAILING_BOOTSTRAP_MS / 1000 + 10
    return f"{info.value!r}\n{caplog.text}"


class BrokerLog:
    """What the broker logs from now on (its server.log under the stack's directory)."""

    def __init__(self, stack) -> None:
        self.path = Path(stack["STACK_DIR"] or REPO / ".stack") / "kafka" / "logs" / "server.log"
        self.start = self.path.stat().st_size

    def since(self) -> str:
        with self.path.open("rb") as log:
            log.seek(self.start if log.seek(0, 2) >= self.start else 0)  # the log may have rolled over
            return log.read().decode(errors="replace")


# ---- Kafka -----------------------------------------------------------------------------------------


def test_plaintext_produce_and_consume(stack, make_topic) -> None:
    roundtrip(stack.kafka_config("PLAINTEXT"), make_topic())


def test_make_topic_gives_the_partitions_asked_for(stack, make_topic) -> None:
    topic = make_topic(partitions=3)
    consumer = KafkaConsumer(**stack.kafka_config("PLAINTEXT"))
    try:
        assert consumer.partitions_for_topic(topic) == {0, 1, 2}
    finally:
        consumer.close()


def test_ssl_verifies_the_stack_ca(stack, make_topic) -> None:
    roundtrip(stack.kafka_config("SSL"), make_topic())


def test_ssl_checks_the_hostname_localhost_too(stack, make_topic) -> None:
    config = stack.kafka_config("SSL", ssl_check_hostname=True)
    config["bootstrap_servers"] = config["bootstrap_servers"].replace("127.0.0.1", "localhost")
    roundtrip(config, make_topic())


def test_ssl_with_the_wrong_ca_fails_on_certificate_verification(stack, caplog) -> None:
    config = stack.kafka_config("SSL", ssl_cafile=stack["STACK_WRONG_CA_FILE"])
    said = failed_bootstrap(config, caplog)
    assert "CERTIFICATE_VERIFY_FAILED" in said
    assert "certificate verify failed: self-signed certificate in certificate chain" in said


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_sasl_ssl_produce_and_consume(stack, make_topic, mechanism) -> None:
    roundtrip(stack.kafka_config("SASL_SSL", mechanism), make_topic())


@pytest.mark.parametrize(
    ("mechanism", "reason"),
    [
        ("SCRAM-SHA-512", "invalid credentials with SASL mechanism SCRAM-SHA-512"),
        ("PLAIN", "Invalid username or password"),
    ],
)
def test_sasl_ssl_with_a_wrong_password_fails_authentication(stack, caplog, mechanism, reason) -> None:
    broker = BrokerLog(stack)
    config = stack.kafka_config("SASL_SSL", mechanism, sasl_plain_password="not-the-password")
    said = failed_bootstrap(config, caplog)
    # The broker refuses every attempt and says why. kafka-python 3.0.12 reads that answer on only some
    # of its attempts (on the others it reports "socket disconnected"; in 3 s on a busy machine often on
    # none), so the client's side is not asserted here: what an operator sees, exit 3 and "authentication
    # failed" from the job, is asserted by test_secure_transport with a long enough retry deadline.
    assert "Failed authentication with /127.0.0.1" in broker.since()
    assert reason in broker.since()
    assert "Unable to bootstrap" in said


def test_sasl_ssl_with_an_unknown_user_fails_authentication(stack, caplog) -> None:
    broker = BrokerLog(stack)
    config = stack.kafka_config("SASL_SSL", "SCRAM-SHA-512", sasl_plain_username="nobody")
    failed_bootstrap(config, caplog)
    assert "invalid credentials with SASL mechanism SCRAM-SHA-512" in broker.since()


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_sasl_plaintext_produce_and_consume(stack, make_topic, mechanism) -> None:
    roundtrip(stack.kafka_config("SASL_PLAINTEXT", mechanism), make_topic())


# ---- PostgreSQL ------------------------------------------------------------------------------------


@pytest.fixture
def tls_database(stack) -> None:
    if stack.get("STACK_PG_TLS") != "1":
        skip_outside_ci(
            "PostgreSQL is an existing server (METRIC_ETL_STACK_PG_URL): its TLS is not the stack's"
        )


def app_engine(stack, host: str | None = None, **connect_args: Any) -> sa.Engine:
    url = stack.app_db_url()
    if host:
        url = url.set(host=host)
    return sa.create_engine(url, poolclass=sa.NullPool, connect_args={"connect_timeout": 10, **connect_args})


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_postgres_verify_full_as_the_app_role(stack, tls_database, unique_name, host) -> None:
    engine = app_engine(stack, host, sslmode="verify-full", sslrootcert=stack["STACK_CA_FILE"])
    with engine.begin() as conn:
        assert (
            conn.execute(sa.text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")).scalar() is True
        )
        assert conn.execute(sa.text("SELECT current_user, current_database()")).one() == ("etl", "metrics")
        conn.execute(sa.text(f'CREATE SCHEMA "{unique_name}"'))
        conn.execute(sa.text(f'CREATE TABLE "{unique_name}".probe (id int PRIMARY KEY)'))
        conn.execute(sa.text(f'DROP SCHEMA "{unique_name}" CASCADE'))
    with engine.connect() as conn:
        left = conn.execute(
            sa.text("SELECT count(*) FROM information_schema.schemata WHERE schema_name = :name"),
            {"name": unique_name},
        ).scalar()
    assert left == 0


def test_postgres_verify_full_with_the_wrong_ca_fails(stack, tls_database) -> None:
    engine = app_engine(stack, sslmode="verify-full", sslrootcert=stack["STACK_WRONG_CA_FILE"])
    with pytest.raises(sa.exc.OperationalError) as info:
        engine.connect().close()
    assert isinstance(info.value.orig, psycopg2.OperationalError)
    assert "certificate verify failed" in str(info.value.orig)


def test_postgres_wrong_password_fails(stack) -> None:
    engine = sa.create_engine(
        stack.app_db_url().set(password="not-the-password"),
        poolclass=sa.NullPool,
        connect_args={"connect_timeout": 10},
    )
    with pytest.raises(sa.exc.OperationalError, match='password authentication failed for user "etl"'):
        engine.connect().close()


def test_pg_schema_is_owned_by_the_app_role(stack, pg_schema) -> None:
    engine = app_engine(stack)
    with engine.begin() as conn:
        owner = conn.execute(
            sa.text("SELECT schema_owner FROM information_schema.schemata WHERE schema_name = :name"),
            {"name": pg_schema},
        ).scalar()
        conn.execute(sa.text(f'CREATE TABLE "{pg_schema}".probe (id int)'))
    assert owner == "etl"


# ---- the scripts -----------------------------------------------------------------------------------


def test_stack_up_twice_is_harmless(stack) -> None:
    pid_file = Path(stack["STACK_KAFKA_PID_FILE"])
    assert pid_file.is_file(), f"no broker pid file at {pid_file}: was the stack started by scripts/stack.sh?"
    broker = pid_file.read_text().strip()
    proc = subprocess.run(
        [str(REPO / "scripts" / "stack.sh"), "up"], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr
    assert f"Kafka broker already running (pid {broker})" in proc.stdout
    assert pid_file.read_text().strip() == broker
    assert Path(f"/proc/{broker}").exists()
