"""Reading Kafka faster than kafka-python does, where that reaches into kafka-python's internals: all
of it in this module, behind one version gate (:func:`fast_path_supported`).

kafka-python reads a record with about a dozen Python calls (a function per varint, a record object
with properties, then a 13-field ConsumerRecord): some 15 us a message, the largest single cost of a
run. :func:`read_records` reads all the records of a batch (message format v2) in one loop instead,
the usual one- and two-byte varints looked up in tables, straight into
:class:`~etl.contract.RawMessage` tuples; pure Python, no I/O.

The result is what kafka-python reads from the same bytes, as ``etl.kafka.source.raw_messages`` turns
it into RawMessages: the timestamp is the batch's first timestamp plus the record's delta (the batch's
max timestamp for every record when the broker stamps them, LOG_APPEND_TIME), None when negative;
a key or value of length -1 is None; headers are ``(name, value or None)`` pairs, names UTF-8.
Malformed bytes raise :class:`kafka.errors.CorruptRecordError` where kafka-python raises it.

:func:`install_fast_records` puts this under a consumer (it swaps the fetcher's PartitionRecords), and
:class:`JoinWatch` works around a group join kafka-python 3.0 leaves unfinished (it drives the
consumer's coordinator). Both use internals that were read and tested on the kafka-python versions in
:data:`CHECKED_KAFKA_VERSIONS`, the line setup.cfg pins. Under any other version neither does
anything: the consumer keeps kafka-python's own record reading (consuming 1M messages took 14.6 s of
CPU that way against 4.3 s, README) and a stuck join waits out its session, so an upgrade that
changes the internals costs speed, not correctness (tests/test_fallback.py runs a real run that way
and compares its rows with the fast path's).
"""

from __future__ import annotations

import functools
import logging
import struct
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

import kafka.errors as kerr
from kafka.errors import CorruptRecordError

from etl.contract import RawMessage
from etl.kafka.records import read_records_in_python

try:
    import etl.native as native
except ImportError:  # built without a C compiler: the loop in Python
    native = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from kafka import KafkaConsumer, TopicPartition

log = logging.getLogger(__name__)

# kafka-python versions whose internals (Fetcher.PartitionRecords, the record batch classes, the
# group coordinator's state) FastPartitionRecords and JoinWatch were written against and tested with.
CHECKED_KAFKA_VERSIONS = ("3.0.",)


def fast_path_supported() -> bool:
    """True when the installed kafka-python is one whose internals this module was checked against:
    the one gate of :func:`install_fast_records` and :class:`JoinWatch`."""
    import kafka

    return kafka.__version__.startswith(CHECKED_KAFKA_VERSIONS)


# The v2 batch header (kafka.record.default_records.DefaultRecordBase.HEADER_STRUCT): base offset,
# length, partition leader epoch, magic, CRC, attributes, last offset delta, first timestamp, max
# timestamp, producer id, producer epoch, base sequence, record count.
HEADER: Final = struct.Struct(">qiibIhiqqqhii")
MAGIC_AT: Final = 16  # the magic byte: where message formats 0 and 1 have it too
CODEC_MASK: Final = 0x07
LOG_APPEND_TIME_MASK: Final = 0x08


def decode_batch(data: bytes | bytearray | memoryview, topic: str, partition: int) -> list[RawMessage]:
    """The records of one uncompressed v2 batch, given the batch's bytes from its base offset on.

    Control batches are not told apart: their records come back as they are. Raises ValueError for
    a batch that is not uncompressed v2 (kafka-python's own reading is needed for those) and
    CorruptRecordError for malformed bytes.
    """
    buf = bytes(data)
    if len(buf) > MAGIC_AT and buf[MAGIC_AT] != 2:
        raise ValueError(f"not an uncompressed v2 record batch (magic {buf[MAGIC_AT]})")
    if len(buf) < HEADER.size:
        raise CorruptRecordError(f"record batch of {len(buf)} bytes is shorter than its header")
    base_offset, _, _, _, _, attributes, _, first_ts, max_ts, _, _, _, count = HEADER.unpack_from(buf)
    if attributes & CODEC_MASK:
        raise ValueError(f"not an uncompressed v2 record batch (compression {attributes & CODEC_MASK})")
    log_append = max_ts if attributes & LOG_APPEND_TIME_MASK else None
    return read_records(buf, HEADER.size, count, topic, partition, base_offset, first_ts, log_append)[0]


def read_records(
    buf: bytes,
    pos: int,
    count: int,
    topic: str,
    partition: int,
    base_offset: int,
    first_timestamp: int,
    log_append_time: int | None = None,
) -> tuple[list[RawMessage], int]:
    """The ``count`` records from ``buf[pos]`` to the end of ``buf`` (uncompressed), in order, and
    their size as kafka-python counts it (the sum of the records' length fields).

    etl.native reads them in C where it was built; bytes it does not find well-formed (and
    varints longer than nine bytes) are read again by :func:`read_records_in_python`, which gives
    the same records and raises the same errors.
    """
    if native is not None:
        got = native.read_records(
            buf, pos, count, topic, partition, base_offset, first_timestamp, log_append_time, RawMessage
        )
        if got is not None:
            return got
    return read_records_in_python(
        buf, pos, count, topic, partition, base_offset, first_timestamp, log_append_time
    )


# -- the fetcher hook -------------------------------------------------------------------------------


def install_fast_records(consumer: KafkaConsumer, *, compressed: bool = True) -> bool:
    """Make ``consumer.poll()`` read v2 record batches with :func:`read_records`; True if installed.

    ``compressed`` False leaves compressed batches to kafka-python's own record reading, as before
    they were decompressed here (bench/codecs.py measures the two side by side).

    Only this consumer changes: kafka-python's fetcher makes its per-partition record iterators with
    ``self.PartitionRecords(...)``, so an attribute on this consumer's fetcher swaps in
    :class:`FastPartitionRecords`. ``poll()`` then returns RawMessages instead of ConsumerRecords
    (:func:`etl.kafka.source.raw_messages` takes either). Iterating over the consumer (``for r in
    consumer``), which needs ConsumerRecord's ``leader_epoch``, is not for such a consumer; this
    project only polls.

    Nothing changes (False) for a kafka-python version whose internals were not checked (logged at
    INFO: the run takes more CPU, and the operator may wonder why), or a consumer with key or value
    deserializers (logged at DEBUG).
    """
    import kafka

    fetcher = getattr(consumer, "_fetcher", None)
    if not fast_path_supported() or fetcher is None:
        log.info(
            "kafka-python %s is not a version the fast record reader was checked against (%s): reading "
            "records with kafka-python's own code, which takes more CPU",
            kafka.__version__,
            ", ".join(f"{v}x" for v in CHECKED_KAFKA_VERSIONS),
        )
        return False
    if consumer.config.get("key_deserializer") or consumer.config.get("value_deserializer"):
        log.debug("a consumer with deserializers keeps kafka-python's own record decoding")
        return False
    fetcher.PartitionRecords = fast_partition_records(compressed)
    _read_sockets_in_large_chunks()
    return True


RECV_BYTES: Final = 256 * 1024


@functools.cache
def _read_sockets_in_large_chunks() -> None:
    """Make kafka-python's connections read their socket ``RECV_BYTES`` at a time, not 4 KiB.

    Its IO thread reads whatever the socket holds in a loop of ``recv(4096)`` calls: a fetch of a
    few MiB took about a thousand turns of that loop, a third of the IO thread's CPU (docs/
    performance.md). The methods below are kafka-python 3.0's ``_sock_recv`` of the plain and the
    TLS transport, rule for rule, with the larger read; every connection of the process gets them.
    """
    import ssl

    from kafka.net import transport

    def reader(wouldblock: tuple[type[BaseException], ...]) -> Any:
        def _sock_recv(self: Any) -> tuple[bytes, Exception | None]:
            received: list[bytes] = []
            err = None
            while True:
                try:
                    data = self._sock.recv(RECV_BYTES)
                    if not data:
                        transport.log.error("%s: socket disconnected", self)
                        err = kerr.KafkaConnectionError("socket disconnected")
                        break
                    received.append(data)
                except wouldblock:
                    break
                except BaseException as e:
                    transport.log.exception("%s: Error receiving network data closing socket", self)
                    err = kerr.KafkaConnectionError(e)
                    break
            return (received[0] if len(received) == 1 else b"".join(received)), err

        return _sock_recv

    plain = (BlockingIOError, InterruptedError)
    transport.KafkaTCPTransport._sock_recv = reader(plain)
    transport.KafkaSSLTransport._sock_recv = reader((*plain, ssl.SSLWantReadError, ssl.SSLWantWriteError))


def fast_partition_records(compressed: bool = True) -> type:
    """:class:`FastPartitionRecords` (defined on first use: it subclasses a kafka-python class).

    ``compressed`` False: compressed batches go through kafka-python's own reading (the fallback).
    """
    return _fast_partition_records(bool(compressed))


@functools.cache
def _fast_partition_records(compressed: bool) -> type:
    from kafka.consumer.fetcher import Fetcher
    from kafka.protocol.consumer import IsolationLevel

    class FastPartitionRecords(Fetcher.PartitionRecords):
        """kafka-python's iterator over one partition's fetched batches, yielding RawMessages.

        ``_unpack_records`` is kafka-python 3.0's own, rule for rule: the CRC check, the leader
        epoch, aborted transactions under read_committed, control batches skipped, the next fetch
        offset after every record and after the last batch, the metrics, drain() at the end. Only
        the reading of v2 batches differs: :func:`read_records` reads a whole batch
        at once (a compressed one once kafka-python's codec has decompressed it, after the CRC
        check, as kafka-python does), and its records and bytes count in the metrics as soon as it
        is read, not one by one. Legacy (v0, v1) batches, and a batch that read_records finds
        malformed, go through kafka-python's own record reading, so a malformed batch yields the
        records before the bad one and then raises the same CorruptRecordError as it would.
        """

        decompress = compressed

        def _unpack_records(
            self, tp: TopicPartition, records: Any, key_deserializer: Any, value_deserializer: Any
        ) -> Iterator[Any]:
            if key_deserializer is not None or value_deserializer is not None:
                # Not a consumer install_fast_records accepts: kafka-python's ConsumerRecords.
                yield from super()._unpack_records(tp, records, key_deserializer, value_deserializer)
                return
            topic, partition = tp.topic, tp.partition
            try:
                batch = records.next_batch()
                last_batch = None
                while batch is not None:
                    last_batch = batch
                    if self.check_crcs and not batch.validate_crc():
                        raise kerr.CorruptRecordError(
                            f"Record batch for partition {self.topic_partition} at offset "
                            f"{batch.base_offset} failed crc check"
                        )
                    if batch.magic == 2:
                        self.leader_epoch = batch.leader_epoch
                        if self.isolation_level == IsolationLevel.READ_COMMITTED and batch.has_producer_id():
                            self._consume_aborted_transactions_up_to(batch.last_offset)
                            producer_id = batch.producer_id
                            if self._contains_abort_marker(batch):
                                self.aborted_producer_ids.discard(producer_id)
                            elif self._is_batch_aborted(batch):
                                log.debug(
                                    "Skipping aborted record batch from partition %s with producer_id %s"
                                    " and offsets %s to %s",
                                    self.topic_partition,
                                    producer_id,
                                    batch.base_offset,
                                    batch.last_offset,
                                )
                                self.next_fetch_offset = batch.next_offset
                                batch = records.next_batch()
                                continue
                        if batch.is_control_batch:
                            self.next_fetch_offset = batch.next_offset
                            batch = records.next_batch()
                            continue
                        if self.decompress or not batch.attributes & CODEC_MASK:
                            messages = self._read(batch, topic, partition)
                            if messages is not None:
                                for message in messages:
                                    self.next_fetch_offset = message[2] + 1
                                    yield message
                                batch = records.next_batch()
                                continue
                    yield from self._stock(batch, topic, partition)
                    batch = records.next_batch()
                else:
                    # v2 keeps a batch's last offset even when compaction removed its last record:
                    # fetch from after it, not that batch again.
                    if last_batch and last_batch.magic == 2:
                        self.next_fetch_offset = last_batch.next_offset
                    self.drain()
            except StopIteration as exc:
                # A StopIteration would end this generator quietly; raise it to the caller instead.
                log.exception("StopIteration raised unpacking messageset")
                raise RuntimeError("StopIteration raised unpacking messageset") from exc

        def _read(self, batch: Any, topic: str, partition: int) -> list[RawMessage] | None:
            """A v2 batch's records, or None when malformed (for the stock path)."""
            # kafka-python's own decompression: the batch then holds its records' bytes from _pos
            # 0, and the stock path reads the same bytes if these turn out malformed. A codec whose
            # package is missing raises UnsupportedCodecError here, as on the stock path.
            batch._maybe_uncompress()
            try:
                messages, size = read_records(
                    bytes(batch._buffer),
                    batch._pos,
                    batch.records_count,
                    topic,
                    partition,
                    batch.base_offset,
                    batch.first_timestamp,
                    batch.max_timestamp if batch.timestamp_type == batch.LOG_APPEND_TIME else None,
                )
            except kerr.CorruptRecordError:
                return None
            self.records_read += len(messages)
            self.bytes_read += size
            return messages

        def _stock(self, batch: Any, topic: str, partition: int) -> Iterator[RawMessage]:
            """kafka-python's own reading of one batch's records (and their CRCs), as RawMessages."""
            for record in batch:
                if self.check_crcs and not record.validate_crc():
                    raise kerr.CorruptRecordError(
                        f"Record for partition {self.topic_partition} at offset {record.offset} "
                        "failed crc check"
                    )
                self.records_read += 1
                self.bytes_read += record.size_in_bytes
                self.next_fetch_offset = record.offset + 1
                ts = record.timestamp
                yield RawMessage(
                    topic,
                    partition,
                    record.offset,
                    ts if ts is not None and ts >= 0 else None,
                    record.key,
                    record.value,
                    tuple(record.headers) if record.headers else (),
                )

    return FastPartitionRecords


class JoinWatch:
    """Work around kafka-python 3.0: a join that completes just as ``poll()``'s timer runs out,
    in a rejoin asked for by a metadata change, is never finished; the member stays REBALANCING
    with heartbeats off until its session expires. Asking to rejoin again finishes it.

    Call :meth:`check` after each poll that returned nothing while out of the group. Under a
    kafka-python version :func:`fast_path_supported` refuses, it does nothing: a stuck member then
    waits for its session to expire (the run's out-of-group bound, exit 4 at worst), never reads
    from a position the database did not decide.
    """

    def __init__(self, consumer: KafkaConsumer) -> None:
        self._coordinator = getattr(consumer, "_coordinator", None) if fast_path_supported() else None
        self._stuck_since: float | None = None

    @property
    def active(self) -> bool:
        """False when the workaround is off (a kafka-python version not checked)."""
        return self._coordinator is not None

    def check(self) -> None:
        from kafka.structs import MemberState

        coordinator = self._coordinator
        if coordinator is None:
            return
        now = time.monotonic()
        if coordinator.state is not MemberState.REBALANCING or coordinator.need_rejoin():
            self._stuck_since = None
        elif self._stuck_since is None:
            self._stuck_since = now
        elif now - self._stuck_since > 0.5:  # a healthy join finishes within milliseconds
            log.info("the Kafka client left a group join unfinished; asking it to rejoin")
            coordinator.request_rejoin()
            self._stuck_since = None
