"""The Kafka client's settings, time-outs and errors, shared by the run, ``check``, ``status`` and
``produce-sample``: one place that says how to connect (TLS/SASL), how long to wait, and what a
client error means to the operator.

A connection that fails is diagnosed by :mod:`etl.kafka.diagnose`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from etl.errors import ConfigError

if TYPE_CHECKING:
    from kafka import KafkaConsumer

    from etl.config import Settings

log = logging.getLogger(__name__)

# A run killed without leaving the group (SIGKILL, OOM, a lost host) keeps its partitions until its
# session times out, and the next run's join waits that long. kafka-python 3 defaults to 45 s; 10 s
# (its earlier default) is plenty, since heartbeats come from the client's own network thread.
SESSION_TIMEOUT_MS = 10_000
HEARTBEAT_INTERVAL_MS = 3_000
# Bounds for calls that kafka-python would otherwise let wait forever while a broker is away.
COMMIT_TIMEOUT_MS = 5_000
CLOSE_TIMEOUT_MS = 5_000
POSITION_TIMEOUT_MS = 10_000
# One bootstrap attempt while connecting: long enough for TLS and SCRAM on a busy machine, short
# enough that the client's log lines of a failed attempt are read (and a refusal named) early.
BOOTSTRAP_ATTEMPT_S = 5.0
KAFKA_TIMEOUT_S = 10.0  # one bootstrap attempt; status and check must answer quickly


def join_wait(settings: Settings) -> float:
    """How long a run waits for the group: a dead member's session, then everyone's rejoin."""
    return max(settings.retry_deadline, 2 * SESSION_TIMEOUT_MS / 1000 + 5)


def kafka_client_config(settings: Settings) -> dict[str, Any]:
    """kafka-python connection settings (shared by the consumer, the admin client and `check`)."""
    cfg: dict[str, Any] = {
        "bootstrap_servers": [b.strip() for b in settings.bootstrap_servers.split(",")],
        "security_protocol": settings.security_protocol,
        "client_id": "metric-etl",
    }
    if "SSL" in settings.security_protocol:
        cfg.update(
            ssl_cafile=settings.ssl_cafile,
            ssl_certfile=settings.ssl_certfile,
            ssl_keyfile=settings.ssl_keyfile,
            ssl_password=settings.ssl_key_password,
            ssl_check_hostname=settings.ssl_check_hostname,
        )
    if settings.security_protocol.startswith("SASL"):
        cfg.update(
            sasl_mechanism=settings.sasl_mechanism,
            sasl_plain_username=settings.sasl_username,
            sasl_plain_password=settings.sasl_password,
        )
    return cfg


def kafka_error_text(exc: BaseException, timeout_ms: int | None = None, who: str = "the broker") -> str:
    """A Kafka client error in words. kafka-python's time-outs often carry no message at all, and
    print as ``KafkaTimeoutError: None``: say what did not answer, and within how long."""
    import kafka.errors as kerr

    if isinstance(exc, kerr.KafkaTimeoutError) and not any(exc.args):
        within = f" within {timeout_ms / 1000:g}s" if timeout_ms else " in time"
        return f"no answer from {who}{within} (KafkaTimeoutError; is a broker down?)"
    return str(exc)


@contextmanager
def kafka_consumer(
    settings: Settings, *, timeout_s: float = KAFKA_TIMEOUT_S, group: bool = False
) -> Iterator[KafkaConsumer]:
    """A consumer that joins no group (``group`` True: it may fetch the group's committed offsets).

    Raises TransientError when no broker answers, ConfigError when TLS, SASL or the port is wrong.
    """
    import kafka

    from etl.kafka.diagnose import connect

    timeout_s = min(timeout_s, max(2.0, settings.retry_deadline))

    def make(bootstrap_timeout_ms: int) -> KafkaConsumer:
        return kafka.KafkaConsumer(
            group_id=settings.group_id if group else None,
            enable_auto_commit=False,
            bootstrap_timeout_ms=bootstrap_timeout_ms,
            request_timeout_ms=int(max(timeout_s, 2.0) * 1000),
            **kafka_client_config(settings),
        )

    # Short attempts: a refused password or certificate shows in the client's log within a second.
    consumer = connect(settings, make, deadline_s=timeout_s, attempt_s=2.5)
    try:
        yield consumer
    finally:
        try:
            consumer.close(autocommit=False)
        except Exception:  # closing is best effort
            log.debug("error closing the Kafka consumer", exc_info=True)


# The Python package each compressed batch needs (kafka.codec imports them; setup.cfg requires them).
CODEC_PACKAGES = {"gzip": None, "snappy": "python-snappy", "lz4": "lz4", "zstd": "zstandard"}


def codec_error(exc: Exception, topic: str) -> ConfigError:
    """kafka-python's UnsupportedCodecError as the configuration error it is (exit 3, not 4).

    Retrying cannot help: the batch stays in the topic, compressed as it is, until the package that
    decodes it is installed (or, for a codec this kafka-python does not know, it is upgraded).
    """
    text = str(exc)
    codec = next((c for c in CODEC_PACKAGES if f"for {c} compression" in text), None)
    if codec is not None and CODEC_PACKAGES[codec]:
        package = CODEC_PACKAGES[codec]
        return ConfigError(
            f"topic {topic!r} holds {codec}-compressed batches, and the Python package that decodes "
            f"{codec} ({package}) is not installed",
            hint=f"pip install '{package}' into metric-etl's environment (reinstalling metric-etl "
            "installs it too); the stored offsets stay before that batch, the next run resumes there",
        )
    return ConfigError(
        f"topic {topic!r} holds batches this Kafka client cannot decode: {text}",
        hint="upgrade kafka-python (pip install -U kafka-python), or have the producer use gzip, "
        "snappy, lz4 or zstd; the stored offsets stay before that batch",
    )


def ensure_topic(settings: Settings, partitions: int) -> bool:
    """Create the settings' topic with ``partitions`` partitions if missing; True if it was created.

    Its replication factor is the cluster's own default (``default.replication.factor``), so a
    topic made on a three-broker cluster is replicated like the operator's other topics.
    """
    from kafka.admin import KafkaAdminClient
    from kafka.errors import IncompatibleBrokerVersion, TopicAlreadyExistsError

    admin = KafkaAdminClient(**kafka_client_config(settings))
    try:
        if settings.topic in admin.list_topics():
            return False
        try:
            try:
                # -1: the broker applies its default (brokers from 2.4 on).
                admin.create_topics(
                    {settings.topic: {"num_partitions": partitions, "replication_factor": -1}}
                )
            except IncompatibleBrokerVersion:
                factor = default_replication_factor(admin)
                admin.create_topics(
                    {settings.topic: {"num_partitions": partitions, "replication_factor": factor}}
                )
        except TopicAlreadyExistsError:
            return False
        return True
    finally:
        admin.close()


def default_replication_factor(admin: Any) -> int:
    """The cluster's ``default.replication.factor``, as its controller reports it."""
    from kafka.admin import ConfigResource, ConfigResourceType

    node = str(admin.describe_cluster()["controller_id"])
    found = admin.describe_configs(
        [ConfigResource(ConfigResourceType.BROKER, node, configs={"default.replication.factor": None})],
        config_filter="all",
    )
    return int(found["broker"][node]["default.replication.factor"]["value"])
