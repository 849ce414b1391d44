"""etl.records reads exactly what kafka-python reads: the same bytes, offsets, timestamps, keys and
headers, from batches kafka-python itself builds and from a real broker, and refuses broken batches."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

from etl import records
from etl.normalise import RawMessage
from etl.records import decode_batch

HEADER = DefaultRecordBatch.HEADER_STRUCT.size

Record = tuple[int, int | None, bytes | None, bytes | None, list[tuple[str, bytes | None]]]


def build(recs: list[Record], *, log_append: bool = False) -> bytes:
    b = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=0,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 30,
    )
    for offset, ts, key, value, headers in recs:
        b.append(offset, ts, key, value, headers)
    data = bytearray(b.build())
    if log_append:  # the broker's stamp: attribute bit 3, max timestamp for every record
        attrs = DefaultRecordBatch.ATTRIBUTES_OFFSET
        data[attrs + 1] |= 0x08
    return bytes(data)


def stock(data: bytes) -> list[tuple[Any, ...]]:
    return [
        (r.offset, r.timestamp if r.timestamp >= 0 else None, r.key, r.value, tuple(r.headers))
        for r in DefaultRecordBatch(data)
    ]


def fast(data: bytes, topic: str = "t", partition: int = 3) -> list[RawMessage]:
    batch = DefaultRecordBatch(data)
    log_append = batch.max_timestamp if batch.timestamp_type == batch.LOG_APPEND_TIME else None
    return decode_batch(
        data,
        HEADER,
        batch._num_records,
        topic,
        partition,
        batch.base_offset,
        batch.first_timestamp,
        log_append,
    )


def same(data: bytes) -> None:
    got = fast(data)
    assert all(type(m) is RawMessage and m.topic == "t" and m.partition == 3 for m in got)
    assert [(m.offset, m.timestamp_ms, m.key, m.value, m.headers) for m in got] == stock(data)


def test_every_kind_of_record_reads_as_kafka_python_reads_it() -> None:
    big = b"x" * 70_000  # a three-byte length
    recs: list[Record] = [
        (0, 1_700_000_000_000, None, b'{"url": "https://a"}', []),
        (1, 1_700_000_000_005, b"key", b"", []),  # empty value, not a tombstone
        (2, 1_700_000_000_001, b"k", None, []),  # tombstone
        (3, 1_700_000_099_999, None, big, [("trace", b"abc"), ("\u00e9t\u00e9", None)]),
        (4, 1_699_999_000_000, b"", b"v" * 200, [("h", b"\x00\xff")]),  # negative delta
        (700, 1_700_000_000_000, b"k" * 300, b"w" * 8000, [("n", b"")]),  # offset gap, two-byte varints
    ]
    same(build(recs))


def test_log_append_time_gives_every_record_the_brokers_stamp() -> None:
    data = build([(0, 5, None, b"a", []), (1, 9, None, b"b", [])], log_append=True)
    assert [m.timestamp_ms for m in fast(data)] == [r[1] for r in stock(data)] == [9, 9]


record_st = st.tuples(
    st.integers(0, 3_000),
    st.one_of(st.none(), st.binary(max_size=300)),
    st.one_of(st.none(), st.binary(max_size=3_000)),
    st.lists(st.tuples(st.text(max_size=20), st.one_of(st.none(), st.binary(max_size=50))), max_size=3),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(record_st, min_size=1, max_size=40), st.integers(0, 2**40))
def test_random_batches_read_as_kafka_python_reads_them(items: list[Any], base_ts: int) -> None:
    offset = 0
    recs: list[Record] = []
    for gap, key, value, headers in items:
        offset += 1 + gap % 5
        recs.append((offset, base_ts + gap * 1_000, key, value, headers))
    same(build(recs))


@pytest.mark.parametrize("cut", [1, 2, 7, 30])
def test_a_truncated_batch_is_refused(cut: int) -> None:
    data = build([(i, 1_700_000_000_000 + i, None, b"v" * 100, [("h", b"x")]) for i in range(5)])
    with pytest.raises((ValueError, IndexError)):
        decode_batch(data[:-cut], HEADER, 5, "t", 0, 0, 0)


def test_a_record_longer_than_its_length_says_is_refused() -> None:
    data = bytearray(build([(0, 1, None, b"abc", [])]))
    data[HEADER] += 2  # the record's length varint (zigzag): two bytes more than it holds
    with pytest.raises((ValueError, IndexError)):
        decode_batch(bytes(data), HEADER, 1, "t", 0, 0, 0)


# -- against the broker --------------------------------------------------------------------------


def _read(stack: Any, topic: str, n: int, *, fast_path: bool) -> list[tuple[Any, ...]]:
    consumer = KafkaConsumer(
        bootstrap_servers=stack["METRIC_ETL_BOOTSTRAP_SERVERS"],
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_partition_fetch_bytes=64 * 1024,  # many fetches, batches split across them
    )
    try:
        assert records.install(consumer) is True if fast_path else True
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(tps)
        consumer.seek_to_beginning()
        out: list[tuple[Any, ...]] = []
        while len(out) < n:
            for found in consumer.poll(timeout_ms=2000, max_records=137).values():
                for r in found:
                    assert (type(r) is RawMessage) == fast_path
                    ts = r.timestamp_ms if fast_path else (r.timestamp if r.timestamp >= 0 else None)
                    out.append((r.partition, r.offset, ts, r.key, r.value, tuple(r.headers)))
        return sorted(out, key=lambda x: (x[0], x[1]))
    finally:
        consumer.close()


@pytest.mark.usefixtures("stack")
def test_a_real_topic_reads_the_same_through_either_path(stack, make_topic) -> None:  # type: ignore[no-untyped-def]
    """Keys, headers, tombstones, and gzip-compressed batches next to plain ones, read from the
    broker in small fetches (a batch cut at a fetch's end, positions carried between polls)."""
    topic = make_topic(partitions=2)
    n = 0
    for compression in (None, "gzip"):
        producer = KafkaProducer(
            bootstrap_servers=stack["METRIC_ETL_BOOTSTRAP_SERVERS"],
            compression_type=compression,
            linger_ms=20,
        )
        for i in range(1_500):
            value = None if i % 101 == 0 else (b'{"i": %d, "pad": "' % i) + b"p" * (i % 400) + b'"}'
            key = b"k%d" % i if i % 3 == 0 or value is None else None
            headers = [("source", b"test"), ("empty", b"")] if i % 7 == 0 else []
            producer.send(topic, value=value, key=key, headers=headers, partition=i % 2)
            n += 1
        producer.flush()
        producer.close()
    expected = _read(stack, topic, n, fast_path=False)
    got = _read(stack, topic, n, fast_path=True)
    assert len(got) == n and got == expected
    assert [(p, o) for p, o, *_ in got] == sorted({(p, o) for p, o, *_ in got})  # each message once


def test_consumers_with_deserializers_keep_kafka_pythons_path() -> None:
    consumer = KafkaConsumer(
        bootstrap_servers="127.0.0.1:1", value_deserializer=bytes.decode, api_version=(2, 8)
    )
    try:
        assert records.install(consumer) is False
    finally:
        consumer.close()
