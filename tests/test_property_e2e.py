"""For any messages at all, through the real broker and database: the run succeeds, and every
message produced is loaded or rejected, exactly once, with its key and headers kept.

Each example makes a fresh topic and runs the job for real, so examples are few (15) and have no
deadline; the pure stages get hundreds of examples in tests/test_hostile_input.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from etl.run import run_batch
from tests.exactly_once import assert_exactly_once
from tests.support import good_message, rows, settings_for

pytestmark = pytest.mark.services

TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=12)  # Kafka needs UTF-8
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=6,
)
FIELDS = ("url", "status_code", "response_time_ms", "regex_pattern", "regex_matched", "checked_at", "error")


def _near_miss(i: int, changes: dict) -> bytes:
    """A valid message with some contract fields replaced, removed (None key) or added."""
    body = json.loads(good_message(i))
    for key, value in changes.items():
        if value == "<drop>":
            body.pop(key, None)
        else:
            body[key] = value
    return json.dumps(body, allow_nan=True).encode()


payloads = st.one_of(
    st.none(),
    st.binary(max_size=200),
    st.builds(good_message, st.integers(0, 10**6)),
    st.builds(
        _near_miss,
        st.integers(0, 10**6),
        st.dictionaries(st.sampled_from(FIELDS) | TEXT, JSON | st.just("<drop>")),
    ),
    JSON.map(lambda v: json.dumps(v).encode()),
)
KEYS = st.one_of(st.none(), st.binary(max_size=30))
HEADERS = st.lists(st.tuples(TEXT, st.binary(max_size=20)), max_size=3)
# Each example ends with a message that is surely rejected, with a key and headers: the checks of
# what a reject keeps run on every example, not only on those that happened to produce rejects.
SURE_REJECT = st.tuples(st.just(b"\xff{not json"), st.binary(min_size=1, max_size=30), HEADERS.filter(bool))
messages = st.tuples(st.lists(st.tuples(payloads, KEYS, HEADERS), max_size=30), SURE_REJECT).map(
    lambda drawn: [*drawn[0], drawn[1]]
)


def produce_all(
    stack: Mapping[str, str], topic: str, batch: list
) -> list[tuple[int, int, bytes | None, list]]:
    """Write each (value, key, headers); returns (partition, offset, key, headers) of each, in order."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=stack["METRIC_ETL_BOOTSTRAP_SERVERS"], acks="all", linger_ms=5)
    try:
        sent = []
        for value, key, headers in batch:
            if value is None and key is None:
                key = b""  # Kafka wants a key or a value; an empty key keeps the tombstone keyless-ish
            sent.append((producer.send(topic, value=value, key=key, headers=headers or None), key, headers))
        producer.flush(60)
        return [(f.get(30).partition, f.get(30).offset, key, headers) for f, key, headers in sent]
    finally:
        producer.close()


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(batch=messages, partitions=st.integers(1, 3))
def test_any_messages_end_up_loaded_or_rejected_exactly_once(
    stack, make_topic, pg_schema, admin_engine, batch, partitions
) -> None:
    topic = make_topic(partitions=partitions)
    sent = produce_all(stack, topic, batch)
    report = run_batch(settings_for(stack, topic, pg_schema))
    assert report.status == "ok" and report.exit_code == 0
    assert report.loaded + report.rejected == len(batch)
    assert report.read == len(batch)
    ends: dict[int, int] = {}
    for partition, offset, _, _ in sent:
        ends[partition] = max(ends.get(partition, 0), offset + 1)
    assert_exactly_once(admin_engine, pg_schema, topic, f"g-{topic}", ends)

    # A reject keeps the message's key and headers as they came.
    table = f'"{pg_schema}".website_metrics_rejects'
    sql = f'SELECT partition, "offset", key, headers FROM {table} WHERE topic = :t'
    stored = {(r.partition, r.offset): r for r in rows(admin_engine, sql, t=topic)}
    assert len(stored) == report.rejected >= 1
    assert (sent[-1][0], sent[-1][1]) in stored  # the sure reject
    for partition, offset, key, headers in sent:
        reject = stored.get((partition, offset))
        if reject is not None:
            assert (bytes(reject.key) if reject.key is not None else None) == key
            names = [h[0] for h in reject.headers or []]
            assert names == [name.replace("\x00", "\\u0000") for name, _ in headers]  # JSONB holds no NUL
