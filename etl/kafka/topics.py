"""What the broker says of a topic: its id, and per partition its log start, its end and the
offset of a time (with the admin client), or a consumer's view of its beginning and end offsets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from etl.errors import ConfigError, TransientError
from etl.kafka.client import POSITION_TIMEOUT_MS, kafka_client_config

if TYPE_CHECKING:
    from kafka import KafkaConsumer

    from etl.config import Settings


@dataclass(frozen=True)
class TopicState:
    """What the broker says of a topic now (:func:`topic_state`)."""

    topic: str
    topic_id: str | None  # None where the broker gives none
    begins: dict[int, int]  # partition -> log start offset
    ends: dict[int, int]  # partition -> high watermark
    stable: dict[int, int] = field(default_factory=dict)  # partition -> last stable offset


def topic_state(settings: Settings, *, timeout_ms: int = POSITION_TIMEOUT_MS) -> TopicState:
    """The topic's id and, per partition, its log start and high watermark: an
    :class:`TopicState`, read with the admin client.

    The high watermark, not the last stable offset a read_committed consumer's ``end_offsets``
    gives: an open transaction holds that back, and a stored offset beyond it is not a sign that
    the topic changed. ConfigError when the topic does not exist; TransientError when Kafka fails.
    """
    import kafka.errors as kerr
    from kafka import TopicPartition
    from kafka.admin import KafkaAdminClient, OffsetSpec
    from kafka.protocol.consumer import IsolationLevel

    try:
        admin = KafkaAdminClient(
            **kafka_client_config(settings),
            request_timeout_ms=timeout_ms,
            bootstrap_timeout_ms=max(2000, int(min(settings.retry_deadline, 30) * 1000)),
        )
    except kerr.KafkaError as exc:
        raise TransientError(f"admin client: {exc}", stage="Kafka") from None
    try:
        described = admin.describe_topics([settings.topic])
        found = next((t for t in described if t.get("name") == settings.topic), None)
        if found is None or found.get("error_code") or not found.get("partitions"):
            raise ConfigError(f"topic {settings.topic!r} does not exist on {settings.bootstrap_servers}")
        tps = [TopicPartition(settings.topic, p["partition_index"]) for p in found["partitions"]]

        def offsets(spec: Any, level: Any) -> dict[int, int]:
            got = admin.list_partition_offsets(dict.fromkeys(tps, spec), isolation_level=level)
            return {tp.partition: int(o.offset) for tp, o in got.items()}

        return TopicState(
            topic=settings.topic,
            topic_id=_topic_id(found.get("topic_id")),
            begins=offsets(OffsetSpec.EARLIEST, IsolationLevel.READ_UNCOMMITTED),
            ends=offsets(OffsetSpec.LATEST, IsolationLevel.READ_UNCOMMITTED),
            stable=offsets(OffsetSpec.LATEST, IsolationLevel.READ_COMMITTED),
        )
    except kerr.KafkaError as exc:
        raise TransientError(f"read the topic's offsets: {exc}", stage="Kafka") from None
    finally:
        admin.close()


def offsets_at(settings: Settings, partitions: list[int], ms: int) -> dict[int, int | None]:
    """Per partition, the first offset whose message is at or after ``ms`` (None: no message is)."""
    import kafka.errors as kerr
    from kafka import TopicPartition
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(**kafka_client_config(settings))
    try:
        got = admin.list_partition_offsets({TopicPartition(settings.topic, p): ms for p in partitions})
        return {tp.partition: (int(o.offset) if o.offset >= 0 else None) for tp, o in got.items()}
    except kerr.KafkaError as exc:
        raise TransientError(f"offsets for a time: {exc}", stage="Kafka") from None
    finally:
        admin.close()


_NO_TOPIC_ID = "00000000-0000-0000-0000-000000000000"


def _topic_id(value: Any) -> str | None:
    """The topic id as text; None where the broker gives none (before Kafka 2.8, or the zero id)."""
    if value is None:
        return None
    text = str(value)
    return None if text in (_NO_TOPIC_ID, "AAAAAAAAAAAAAAAAAAAAAA") else text


def topic_offsets(consumer: KafkaConsumer, topic: str) -> tuple[dict[int, int], dict[int, int]]:
    """(beginning, end) offset per partition of ``topic``; ConfigError when it does not exist."""
    from kafka import TopicPartition

    ids = consumer.partitions_for_topic(topic)
    if not ids:
        raise ConfigError(
            f"topic {topic!r} does not exist on the broker",
            hint="create it, or set topic / METRIC_ETL_TOPIC / --topic to the right name",
        )
    tps = [TopicPartition(topic, p) for p in sorted(ids)]
    begins = consumer.beginning_offsets(tps)
    ends = consumer.end_offsets(tps)
    return {tp.partition: o for tp, o in begins.items()}, {tp.partition: o for tp, o in ends.items()}
