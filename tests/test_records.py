"""etl.kafka.fast_records (the batch reader and the fetcher hook) reads exactly what kafka-python
reads: the same offsets, timestamps, keys, values and headers from the same bytes, the same fetch
positions, and the same refusals of broken batches; from batches kafka-python itself builds and from
a real broker."""

from __future__ import annotations

import struct
from collections import namedtuple
from collections.abc import Callable
from typing import Any

import kafka
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord, Fetcher
from kafka.errors import CorruptRecordError
from kafka.protocol.consumer import IsolationLevel
from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder
from kafka.record.memory_records import MemoryRecords, MemoryRecordsBuilder
from kafka.record.util import calc_crc32c, encode_varint

from etl.contract import RawMessage
from etl.kafka.fast_records import decode_batch, fast_partition_records, install_fast_records, read_records
from etl.kafka.source import KafkaSource, raw_messages
from tests.support import settings_for

HEADER = DefaultRecordBatch.HEADER_STRUCT.size
TS = 1_700_000_000_000
TP = TopicPartition("t", 3)

# offset, timestamp (None: now), key, value, headers
Record = tuple[int, int | None, bytes | None, bytes | None, list[tuple[str, bytes | None]]]


def build(
    recs: list[Record],
    *,
    base_offset: int = 0,
    log_append: bool = False,
    compression: int = 0,
    producer_id: int = -1,
    transactional: bool = False,
    control: bool = False,
    last_offset_delta: int | None = None,
) -> bytes:
    """One v2 batch as kafka-python's producer writes it; then what the broker may change: the base
    offset, LOG_APPEND_TIME, a control flag, a last offset beyond the last record (compaction)."""
    b = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=compression,
        is_transactional=transactional,
        producer_id=producer_id,
        producer_epoch=0 if producer_id >= 0 else -1,
        base_sequence=0 if producer_id >= 0 else -1,
        batch_size=1 << 30,
    )
    for offset, ts, key, value, headers in recs:
        b.append(offset, ts, key, value, headers)
    return restamp(
        b.build(),
        base_offset=base_offset,
        attributes=(0x08 if log_append else 0) | (0x20 if control else 0),
        last_offset_delta=last_offset_delta,
    )


def restamp(
    data: bytes | bytearray,
    *,
    base_offset: int = 0,
    attributes: int = 0,
    last_offset_delta: int | None = None,
) -> bytes:
    """``data`` with its base offset set, attribute bits added, and a correct CRC."""
    out = bytearray(data)
    struct.pack_into(">q", out, 0, base_offset)
    attrs_at = DefaultRecordBatch.ATTRIBUTES_OFFSET
    struct.pack_into(">h", out, attrs_at, struct.unpack_from(">h", out, attrs_at)[0] | attributes)
    if last_offset_delta is not None:
        struct.pack_into(">i", out, attrs_at + 2, last_offset_delta)
    crc = calc_crc32c(memoryview(out)[attrs_at:])
    struct.pack_into(">I", out, DefaultRecordBatch.CRC_OFFSET, crc)
    return bytes(out)


def as_raw(r: Any, tp: TopicPartition = TP) -> RawMessage:
    """A kafka-python record as the RawMessage etl.kafka.source makes of it."""
    ts = r.timestamp
    return RawMessage(
        tp.topic,
        tp.partition,
        r.offset,
        ts if ts is not None and ts >= 0 else None,
        r.key,
        r.value,
        tuple(r.headers) if r.headers else (),
    )


def stock(data: bytes) -> list[RawMessage]:
    return [as_raw(r) for r in DefaultRecordBatch(data)]


def outcome(read: Callable[[], list[Any]]) -> list[Any] | type[Exception]:
    """What a reading gives: its records, or the CorruptRecordError it raises."""
    try:
        return read()
    except CorruptRecordError:
        return CorruptRecordError


def same(data: bytes) -> list[RawMessage]:
    """decode_batch reads ``data`` exactly as kafka-python does; read_records counts the same bytes."""
    got = decode_batch(data, TP.topic, TP.partition)
    assert all(type(m) is RawMessage for m in got)
    assert got == stock(data)
    batch = DefaultRecordBatch(data)
    log_append = batch.max_timestamp if batch.timestamp_type == batch.LOG_APPEND_TIME else None
    _, size = read_records(
        data, HEADER, batch.records_count, "t", 3, batch.base_offset, batch.first_timestamp, log_append
    )
    assert size == sum(r.size_in_bytes for r in DefaultRecordBatch(data))
    return got


# -- the batch reader on its own -----------------------------------------------------------------------


def test_every_kind_of_record_reads_as_kafka_python_reads_it() -> None:
    big = b"x" * 70_000  # a three-byte length
    got = same(
        build(
            [
                (0, TS, None, b'{"url": "https://a"}', []),
                (1, TS + 5, b"key", b"", []),  # empty value, not a tombstone
                (2, TS + 1, b"k", None, []),  # tombstone
                (3, TS + 99_999, None, big, [("trace", b"abc"), ("été", None), ("", b"")]),
                (4, TS - 1_000_000, b"", b"v" * 200, [("h", b"\x00\xff")]),  # negative delta
                (700, TS, b"k" * 300, b"w" * 8000, [("n" * 100, b"x" * 20_000)]),  # gap, long header
            ],
            base_offset=10_000_000_000,
        )
    )
    assert [m.offset for m in got] == [10_000_000_000 + o for o in (0, 1, 2, 3, 4, 700)]
    assert got[1].key == b"key" and got[1].value == b"" and got[2].value is None
    assert got[3].headers == (("trace", b"abc"), ("été", None), ("", b""))


def test_many_records_need_long_offset_deltas() -> None:
    got = same(build([(i, TS + i * 3, None, b"%d" % i, []) for i in range(20_000)]))
    assert [m.offset for m in got] == list(range(20_000))


def test_log_append_time_gives_every_record_the_brokers_stamp() -> None:
    data = build([(0, TS, None, b"a", []), (1, TS + 9, None, b"b", [])], log_append=True)
    assert [m.timestamp_ms for m in same(data)] == [TS + 9, TS + 9]


def test_negative_timestamps_read_as_none() -> None:
    got = same(build([(0, -1, None, b"a", []), (1, 5, None, b"b", []), (2, -7, None, b"c", [])]))
    assert [m.timestamp_ms for m in got] == [None, 5, None]


def test_records_without_a_timestamp_get_the_producers_clock() -> None:
    got = same(build([(0, None, None, b"a", [])]))
    assert got[0].timestamp_ms is not None and got[0].timestamp_ms > TS


def test_an_empty_batch_reads_as_no_records() -> None:
    header = bytearray(build([(0, TS, None, b"a", [])])[:HEADER])
    struct.pack_into(">i", header, HEADER - 4, 0)  # the record count
    empty = restamp(header)
    assert decode_batch(empty, "t", 0) == stock(empty) == []


def test_compressed_and_legacy_batches_are_not_for_decode_batch() -> None:
    gzip = build([(0, TS, None, b"abc" * 100, [])], compression=1)
    assert DefaultRecordBatch(gzip).compression_type == 1
    with pytest.raises(ValueError, match="not an uncompressed v2"):
        decode_batch(gzip, "t", 0)
    legacy = MemoryRecordsBuilder(magic=1, compression_type=0, batch_size=1 << 20)
    legacy.append(TS, None, b"v")
    legacy.close()
    with pytest.raises(ValueError, match="not an uncompressed v2"):
        decode_batch(bytes(legacy.buffer()), "t", 0)


def header_st() -> st.SearchStrategy[Any]:
    return st.tuples(st.text(max_size=20), st.one_of(st.none(), st.binary(max_size=50)))


record_st = st.tuples(
    st.integers(0, 3_000),  # offset gap
    st.integers(-20_000, 20_000),  # timestamp delta, past the two-byte varints
    st.one_of(st.none(), st.binary(max_size=300)),
    st.one_of(st.none(), st.binary(max_size=3_000), st.binary(min_size=8_000, max_size=9_000)),
    st.lists(header_st(), max_size=3),
)


# smaller records, for tests that draw several batches
small_record_st = st.tuples(
    st.integers(0, 3_000),
    st.integers(-200, 200),
    st.one_of(st.none(), st.binary(max_size=20)),
    st.one_of(st.none(), st.binary(max_size=200)),
    st.lists(header_st(), max_size=1),
)


@st.composite
def batches(draw: st.DrawFn, records: st.SearchStrategy[Any] = record_st, most: int = 30) -> bytes:
    """One uncompressed v2 batch of random records, offsets and timestamps."""
    base_ts = draw(st.one_of(st.just(TS), st.integers(-(2**40), 2**40)))
    offset = -1
    recs: list[Record] = []
    for gap, delta, key, value, headers in draw(st.lists(records, min_size=1, max_size=most)):
        offset += 1 + gap % 5
        recs.append((offset, base_ts + delta, key, value, headers))
    return build(recs, base_offset=draw(st.integers(0, 2**50)), log_append=draw(st.booleans()))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_random_batches_read_as_kafka_python_reads_them(data: bytes) -> None:
    same(data)


# -- broken batches ---------------------------------------------------------------------------------


def one_record(body: bytes) -> bytes:
    """A batch holding one record whose bytes after its length field are ``body``."""
    out = bytearray()
    encode_varint(len(body), out.append)
    data = build([(0, TS, None, b"v", [])])
    head = bytearray(data[:HEADER])
    return restamp(bytes(head) + bytes(out) + body)


def varint(v: int) -> bytes:
    out = bytearray()
    encode_varint(v, out.append)
    return bytes(out)


BROKEN = {
    # attributes, ts delta, offset delta, key, value, header count
    "negative header count": varint(0) + varint(0) + varint(0) + varint(-1) + varint(-1) + varint(-2),
    "negative header name size": (
        varint(0) * 3 + varint(-1) + varint(-1) + varint(1) + varint(-3) + b"x" + varint(-1)
    ),
    "header name not UTF-8": varint(0) * 3
    + varint(-1)
    + varint(-1)
    + varint(1)
    + varint(1)
    + b"\xff"
    + varint(-1),
    "value runs past the batch": varint(0) * 3 + varint(-1) + varint(50) + b"abc",
    "varint of eleven bytes": varint(0) * 2 + b"\xff" * 11 + b"\x00",
}


@pytest.mark.parametrize("body", BROKEN.values(), ids=BROKEN.keys())
def test_malformed_records_are_refused_as_kafka_python_refuses_them(body: bytes) -> None:
    data = one_record(body)
    assert outcome(lambda: stock(data)) is CorruptRecordError
    with pytest.raises(CorruptRecordError):
        decode_batch(data, "t", 0)


def test_a_record_longer_or_shorter_than_its_length_field_is_refused() -> None:
    data = build([(0, TS, None, b"abc", []), (1, TS, None, b"def", [])])
    for change in (-2, 2):
        broken = bytearray(data)
        broken[HEADER] += change  # the first record's length (zigzag): one byte more or less
        with pytest.raises(CorruptRecordError, match="Invalid record size"):
            decode_batch(bytes(broken), "t", 0)
        assert outcome(lambda b=bytes(broken): stock(b)) is CorruptRecordError


def test_bytes_after_the_last_record_are_refused() -> None:
    data = restamp(build([(0, TS, None, b"abc", [])]) + b"\x00\x00")
    with pytest.raises(CorruptRecordError, match="2 unconsumed bytes"):
        decode_batch(data, "t", 0)
    assert outcome(lambda: stock(data)) is CorruptRecordError


@pytest.mark.parametrize("cut", [1, 2, 3, 7, 30, 200])
def test_a_truncated_batch_is_refused(cut: int) -> None:
    data = build([(i, TS + i, b"k", b"v" * 40, [("h", b"x")]) for i in range(5)])[:-cut]
    assert outcome(lambda: stock(data)) is CorruptRecordError
    with pytest.raises(CorruptRecordError):
        decode_batch(data, "t", 0)


def test_a_batch_shorter_than_its_header_is_refused() -> None:
    with pytest.raises(CorruptRecordError):
        decode_batch(build([(0, TS, None, b"v", [])])[:40], "t", 0)


@settings(max_examples=300, deadline=None)
@given(batches(), st.data())
def test_damaged_batches_fail_exactly_when_kafka_python_fails(data: bytes, draw: st.DataObject) -> None:
    """Random bytes of the records changed, or the batch cut short: decode_batch raises
    CorruptRecordError when kafka-python does, and otherwise reads the same records."""
    damaged = bytearray(data)
    if draw.draw(st.booleans()) and len(damaged) > HEADER:
        for _ in range(draw.draw(st.integers(1, 3))):
            damaged[draw.draw(st.integers(HEADER, len(damaged) - 1))] = draw.draw(st.integers(0, 255))
    else:
        del damaged[draw.draw(st.integers(HEADER, len(damaged))) :]
    expected = outcome(lambda: stock(bytes(damaged)))
    assert outcome(lambda: decode_batch(damaged, TP.topic, TP.partition)) == expected


# -- the fetcher hook, on fetched bytes --------------------------------------------------------------

Aborted = namedtuple("Aborted", "producer_id first_offset")


def take_all(
    cls: type,
    buf: bytes,
    *,
    fetch_offset: int = 0,
    n: int = 7,
    **kwargs: Any,
) -> tuple[list[Any], tuple[int, int, int, int]]:
    """Everything a PartitionRecords of ``cls`` hands the fetcher from ``buf``, ``n`` records at a
    time: each take's records (as RawMessages) with the next fetch offset after it, or the error
    raised; then (next fetch offset, records_read, bytes_read, drains) at the end."""
    drains: list[Any] = []
    part = cls(fetch_offset, TP, MemoryRecords(buf), on_drain=drains.append, **kwargs)
    events: list[Any] = []
    for _ in range(100_000):
        if not part:
            break
        try:
            got = part.take(n)
        except CorruptRecordError as exc:
            events.append(("error", str(exc)))
            break
        events.append(([r if type(r) is RawMessage else as_raw(r) for r in got], part.next_fetch_offset))
        if not got:
            break
    return events, (part.next_fetch_offset, part.records_read, part.bytes_read, len(drains))


def hook_same(buf: bytes, **kwargs: Any) -> tuple[list[RawMessage], Any]:
    """The hook hands the fetcher what kafka-python's own PartitionRecords does: the same records,
    fetch positions after every take, errors and metrics. Returns the records and the last event."""
    fast = take_all(fast_partition_records(), buf, **kwargs)
    assert fast == take_all(Fetcher.PartitionRecords, buf, **kwargs)
    events, (next_fetch_offset, *_) = fast
    records = [m for event in events if event[0] != "error" for m in event[0]]
    return records, (events[-1] if events[-1][0] == "error" else next_fetch_offset)


def legacy_batch(magic: int, compression: int, offset: int) -> bytes:
    b = MemoryRecordsBuilder(magic=magic, compression_type=compression, batch_size=1 << 20, offset=offset)
    for i in range(4):
        b.append(TS + i, b"k%d" % i, b"legacy" * 20)
    b.close()
    return bytes(b.buffer())


def control(base_offset: int, producer_id: int, abort: bool) -> bytes:
    key = struct.pack(">hh", 0, 0 if abort else 1)
    return build(
        [(0, TS, key, b"\x00\x00\x00\x00\x00\x00", [])],
        base_offset=base_offset,
        producer_id=producer_id,
        transactional=True,
        control=True,
    )


def test_the_hook_reads_every_kind_of_batch_as_kafka_python_does() -> None:
    plain = [
        (i, TS + i, b"k" if i % 2 else None, b"v%d" % i, [("h", None)] if i % 3 else []) for i in range(10)
    ]
    buf = b"".join(
        [
            build(plain, base_offset=0),
            build(plain[:5], base_offset=10, compression=1),  # gzip
            build(plain[:5], base_offset=15, compression=1, log_append=True),
            legacy_batch(1, 0, 20),
            legacy_batch(1, 1, 24),  # a gzip message set, v1
            legacy_batch(0, 0, 28),
            build(plain[:3], base_offset=32, log_append=True),
            build(plain[:2], base_offset=35, last_offset_delta=9),  # compacted: offsets up to 44
        ]
    )
    records, next_fetch_offset = hook_same(buf)
    assert [m.offset for m in records] == [*range(35), 35, 36]
    assert next_fetch_offset == 45  # after the last batch, from its last offset on
    for fetch_offset in (3, 12, 22, 36):  # a fetch from inside a batch skips what comes before
        assert hook_same(buf, fetch_offset=fetch_offset, n=5)


@pytest.mark.parametrize("codec", [1, 2, 3, 4], ids=["gzip", "snappy", "lz4", "zstd"])
def test_the_hook_reads_compressed_batches_of_every_codec_as_kafka_python_does(codec: int) -> None:
    plain = [(i, TS + i, b"k%d" % i, b"v%d" % i * 30, [("h", b"x")] if i % 4 else []) for i in range(10)]
    buf = b"".join(
        [
            build(plain, base_offset=0, compression=codec),
            build(plain[:5], base_offset=10, compression=codec, log_append=True),
            build(plain[:2], base_offset=15, compression=codec, last_offset_delta=4),  # compacted
        ]
    )
    assert DefaultRecordBatch(buf).compression_type == codec
    records, next_fetch_offset = hook_same(buf)
    assert [m.offset for m in records] == [*range(17)]
    assert next_fetch_offset == 20
    for fetch_offset in (3, 12):  # a fetch from inside a compressed batch skips what comes before
        hook_same(buf, fetch_offset=fetch_offset, n=4)
    # The fallback (kafka-python's reading of compressed batches) hands over the same.
    assert take_all(fast_partition_records(False), buf) == take_all(Fetcher.PartitionRecords, buf)


def test_the_hook_skips_aborted_transactions_and_control_batches() -> None:
    recs = [(i, TS, None, b"t%d" % i, []) for i in range(3)]
    buf = b"".join(
        [
            build(recs, base_offset=0, producer_id=7, transactional=True),  # aborted below
            control(3, 7, abort=True),
            build(recs, base_offset=4, producer_id=8, transactional=True),  # committed
            control(7, 8, abort=False),
            build(recs, base_offset=8),
        ]
    )
    aborted = [Aborted(7, 0)]
    committed, _ = hook_same(buf, isolation_level=IsolationLevel.READ_COMMITTED, aborted_transactions=aborted)
    assert [m.offset for m in committed] == [4, 5, 6, 8, 9, 10]
    uncommitted, _ = hook_same(buf, aborted_transactions=aborted)
    assert [m.offset for m in uncommitted] == [0, 1, 2, 4, 5, 6, 8, 9, 10]


def test_the_hook_checks_crcs_as_kafka_python_does() -> None:
    good = build([(i, TS, None, b"value %d" % i, []) for i in range(3)])
    bad = bytearray(build([(0, TS, None, b"other", [])], base_offset=3))
    bad[-3] ^= 0xFF  # in the value: the CRC no longer matches
    buf = good + bytes(bad)
    records, last = hook_same(buf)
    assert [m.offset for m in records] == [0, 1, 2]
    assert last[0] == "error" and "failed crc check" in last[1]
    relaxed, _ = hook_same(buf, check_crcs=False)
    assert [m.offset for m in relaxed] == [0, 1, 2, 3]


def test_a_malformed_record_ends_the_batch_where_kafka_python_ends_it() -> None:
    """The records before it are handed out, then the same error."""
    data = bytearray(build([(i, TS, None, b"v%d" % i, []) for i in range(6)], base_offset=100))
    # the fourth record's header count: each record is 1 length byte + 8 bytes here
    at = HEADER + 3 * 9 + 8
    assert data[at] == 0
    data[at] = 3  # -2 headers
    records, last = hook_same(restamp(data, base_offset=100), n=2)
    assert [m.offset for m in records] == [100, 101, 102]
    assert last[0] == "error" and last[1].endswith("Found invalid number of record headers -2")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(batches(small_record_st, 10), min_size=1, max_size=4),
    st.lists(st.booleans(), min_size=4, max_size=4),
    st.data(),
)
def test_random_fetches_hand_out_what_kafka_python_does(
    parts: list[bytes], gzip: list[bool], draw: st.DataObject
) -> None:
    buf, base = b"", 0
    for data, compress in zip(parts, gzip, strict=False):
        batch = DefaultRecordBatch(data)
        recs: list[Record] = [
            (r.offset - batch.base_offset, r.timestamp, r.key, r.value, list(r.headers))
            for r in DefaultRecordBatch(data)
        ]
        rebuilt = build(
            recs,
            base_offset=base,
            compression=1 if compress else 0,
            log_append=batch.timestamp_type == batch.LOG_APPEND_TIME,
        )
        buf += rebuilt
        base = DefaultRecordBatch(rebuilt).next_offset
    hook_same(buf, fetch_offset=draw.draw(st.integers(0, base)), n=draw.draw(st.integers(1, 50)))


class _Same(kafka.serializer.Deserializer):
    def deserialize(self, topic: str, headers: Any, data: bytes | None) -> bytes | None:
        return data


def test_with_deserializers_the_hook_leaves_records_to_kafka_python() -> None:
    buf = build([(0, TS, None, b"v", [])])
    part = fast_partition_records()(0, TP, MemoryRecords(buf), value_deserializer=_Same())
    assert [type(r) for r in part.take(10)] == [ConsumerRecord]


def test_install_keeps_away_from_other_kafka_python_versions_and_deserializers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def consumer(**config: Any) -> KafkaConsumer:
        return KafkaConsumer(bootstrap_servers="127.0.0.1:1", api_version=(2, 8), **config)

    plain = consumer()
    with_deserializer = consumer(value_deserializer=_Same())
    try:
        stock_class = plain._fetcher.PartitionRecords
        monkeypatch.setattr(kafka, "__version__", "3.1.0")
        assert install_fast_records(plain) is False
        assert plain._fetcher.PartitionRecords is stock_class
        monkeypatch.undo()
        assert install_fast_records(with_deserializer) is False
        assert install_fast_records(plain) is True
        assert plain._fetcher.PartitionRecords is fast_partition_records()
        assert with_deserializer._fetcher.PartitionRecords is stock_class  # only that consumer
    finally:
        plain.close()
        with_deserializer.close()


def test_raw_messages_takes_both_kinds_of_record() -> None:
    data = build([(0, TS, b"k", b"v", [("h", b"x")]), (1, -1, None, None, [])])
    fast = decode_batch(data, TP.topic, TP.partition)
    records = [
        ConsumerRecord(
            TP.topic, TP.partition, 0, r.offset, r.timestamp, 0, r.key, r.value, r.headers, None, 0, 0, 0
        )
        for r in DefaultRecordBatch(data)
    ]
    assert list(raw_messages({TP: fast})) == list(raw_messages({TP: records})) == fast
    assert list(raw_messages({TP: records[:1] + fast[1:]})) == fast


# -- against the broker ------------------------------------------------------------------------------


def _produce(stack: Any, topic: str) -> int:
    """Partition 0: plain batches; partition 1: gzip. Keys, headers, tombstones, big values."""
    n = 0
    for partition, compression in ((0, None), (1, "gzip")):
        producer = KafkaProducer(
            bootstrap_servers=stack.plaintext, compression_type=compression, linger_ms=20, acks="all"
        )
        for i in range(1_200):
            if i % 101 == 0:
                value = None
            elif i % 250 == 7:
                value = b"big" * 7_000  # 21 KB
            elif i % 97 == 0:
                value = b""
            else:
                value = b'{"i": %d, "pad": "%s"}' % (i, b"p" * (i % 400))
            key = b"k%d" % i if i % 3 == 0 or value is None else None
            headers = [("source", b"test"), ("ünïcode", b"")] if i % 7 == 0 else []
            producer.send(topic, value=value, key=key, headers=headers, partition=partition)
            n += 1
        producer.flush()
        producer.close()
    return n


def _read_stock(stack: Any, topic: str, n: int) -> list[RawMessage]:
    consumer = KafkaConsumer(
        bootstrap_servers=stack.plaintext,
        enable_auto_commit=False,
        max_partition_fetch_bytes=64 * 1024,  # many fetches: batches cut at a fetch's end
    )
    try:
        consumer.assign([TopicPartition(topic, p) for p in (0, 1)])
        consumer.seek_to_beginning()
        out: list[RawMessage] = []
        while len(out) < n:
            for tp, found in consumer.poll(timeout_ms=2000, max_records=137).items():
                assert all(type(r) is ConsumerRecord for r in found)
                out.extend(as_raw(r, tp) for r in found)
        return out
    finally:
        consumer.close()


@pytest.mark.usefixtures("stack")
def test_a_real_topic_reads_the_same_through_kafka_source(
    stack: Any, make_topic: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What KafkaSource polls equals what a stock kafka-python consumer reads, and kafka-python's own
    record reading is used for none of the batches, compressed or not."""
    topic = make_topic(partitions=2)
    n = _produce(stack, topic)

    read_by_stock: list[int] = []
    original = DefaultRecordBatch._read_msg

    def spy(self: DefaultRecordBatch, *args: Any) -> Any:
        read_by_stock.append(self.compression_type)
        return original(self, *args)

    monkeypatch.setattr(DefaultRecordBatch, "_read_msg", spy)
    expected = _read_stock(stack, topic, n)
    assert set(read_by_stock) == {0, 1}  # the probe sees kafka-python read both kinds
    read_by_stock.clear()

    cfg = settings_for(stack, topic, "unused", max_partition_fetch_bytes=64 * 1024, max_poll_records=500)
    source = KafkaSource(cfg, start_for=lambda tps: dict.fromkeys(tps))
    source.open()
    try:
        assert source.wait_for_group(30)
        source.settle()
        got: list[RawMessage] = []
        for _ in range(200):
            source.settle()  # a rebalance meanwhile (a busy broker) pauses partitions until settled
            got.extend(source.poll(500, 1000, caught_up=lambda: False))
            if len(got) >= n:
                break
        assert source.consumer._fetcher.PartitionRecords is fast_partition_records()
    finally:
        source.close()

    assert all(type(m) is RawMessage for m in got)
    key = lambda m: (m.partition, m.offset)  # noqa: E731
    assert sorted(got, key=key) == sorted(expected, key=key)
    assert len(got) == n == len({key(m) for m in got})
    assert read_by_stock == []  # gzip batches too: decompressed, then read by etl.kafka.fast_records
    tombstones = [m for m in got if m.value is None]
    assert tombstones and all(m.key is not None for m in tombstones)
    assert any(m.headers == (("source", b"test"), ("ünïcode", b"")) for m in got)
    assert any(m.value is not None and len(m.value) > 16 * 1024 for m in got)
