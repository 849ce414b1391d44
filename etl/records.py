"""Kafka record batches (message format v2) -> RawMessages, fast, in pure Python.

kafka-python decodes a record with about a dozen Python calls (a function per varint, properties,
a record object, then a 13-field ConsumerRecord), 15 us a message on these machines: the largest
single cost of a run. :func:`decode_batch` reads the records of a batch in one loop, the usual
one-byte varints inline, straight into :class:`~etl.normalise.RawMessage` tuples.

:func:`install` puts it under one consumer: kafka-python's fetcher builds its per-partition
record iterators through ``self.PartitionRecords``, so an instance attribute on that consumer's
fetcher swaps in :class:`FastPartitionRecords`, which keeps every rule of the stock iterator (CRC
check, transactions, control batches, fetch positions) and only reads the records faster. Only
kafka-python versions whose internals were checked get it; others run unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

from etl.normalise import RawMessage

log = logging.getLogger(__name__)

CHECKED_VERSIONS = ("3.0.",)  # kafka-python versions whose fetcher internals this module matches


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """A zigzag varint of any length at ``pos``: (value, next position)."""
    result = 0
    shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7
        if shift >= 64:
            raise ValueError("varint out of int64 range")


def decode_batch(
    buf: bytes,
    pos: int,
    count: int,
    topic: str,
    partition: int,
    base_offset: int,
    first_timestamp: int,
    log_append_time: int | None = None,
) -> list[RawMessage]:
    """The ``count`` records that start at ``buf[pos]`` (uncompressed), in order.

    ``log_append_time`` is the batch's max timestamp when the broker stamps the records (every
    record then has it). Raises ValueError or IndexError on a malformed record.

    Varints of one and two bytes (every length below 8 KiB) are read inline: a function call
    costs as much as the rest of the record. The tuples are built with ``tuple.__new__``, a fifth
    of what the named tuple's own constructor costs.
    """
    out = []
    append = out.append
    make = tuple.__new__
    for _ in range(count):
        # Length
        b = buf[pos]
        if b < 0x80:
            length = (b >> 1) ^ -(b & 1)
            pos += 1
        elif buf[pos + 1] < 0x80:
            v = (b & 0x7F) | buf[pos + 1] << 7
            length = (v >> 1) ^ -(v & 1)
            pos += 2
        else:
            length, pos = _varint(buf, pos)
        end = pos + length
        pos += 1  # Attributes: unused
        # TimestampDelta
        b = buf[pos]
        if b < 0x80:
            ts_delta = (b >> 1) ^ -(b & 1)
            pos += 1
        elif buf[pos + 1] < 0x80:
            v = (b & 0x7F) | buf[pos + 1] << 7
            ts_delta = (v >> 1) ^ -(v & 1)
            pos += 2
        else:
            ts_delta, pos = _varint(buf, pos)
        # OffsetDelta
        b = buf[pos]
        if b < 0x80:
            offset_delta = (b >> 1) ^ -(b & 1)
            pos += 1
        elif buf[pos + 1] < 0x80:
            v = (b & 0x7F) | buf[pos + 1] << 7
            offset_delta = (v >> 1) ^ -(v & 1)
            pos += 2
        else:
            offset_delta, pos = _varint(buf, pos)
        # Key: length -1 (one byte, 0x01) is a null key
        if buf[pos] == 1:
            key = None
            pos += 1
        else:
            n, pos = _varint(buf, pos)
            if n < 0:
                key = None
            else:
                key = buf[pos : pos + n]
                pos += n
        # Value: length -1 is a tombstone
        b = buf[pos]
        if b < 0x80:
            n = (b >> 1) ^ -(b & 1)
            pos += 1
        elif buf[pos + 1] < 0x80:
            v = (b & 0x7F) | buf[pos + 1] << 7
            n = (v >> 1) ^ -(v & 1)
            pos += 2
        else:
            n, pos = _varint(buf, pos)
        if n < 0:
            value = None
        else:
            value = buf[pos : pos + n]
            pos += n
        # Headers (reading the count also fails on a record cut short)
        if buf[pos] == 0:
            pos += 1
            headers: tuple[tuple[str, bytes | None], ...] = ()
        else:
            headers, pos = _headers(buf, pos)
        if pos != end:
            raise ValueError(f"record size {length} but {length + pos - end} bytes read")
        timestamp = first_timestamp + ts_delta if log_append_time is None else log_append_time
        append(
            make(
                RawMessage,
                (
                    topic,
                    partition,
                    base_offset + offset_delta,
                    timestamp if timestamp >= 0 else None,
                    key,
                    value,
                    headers,
                ),
            )
        )
    if pos != len(buf):
        raise ValueError(f"{len(buf) - pos} unconsumed bytes after all records")
    return out


def _headers(buf: bytes, pos: int) -> tuple[tuple[tuple[str, bytes | None], ...], int]:
    count, pos = _varint(buf, pos)
    if count < 0:
        raise ValueError(f"invalid number of record headers {count}")
    headers = []
    for _ in range(count):
        n, pos = _varint(buf, pos)
        if n < 0:
            raise ValueError(f"invalid negative header key size {n}")
        name = buf[pos : pos + n].decode()
        pos += n
        n, pos = _varint(buf, pos)
        if n < 0:
            value = None
        else:
            value = buf[pos : pos + n]
            if len(value) != n:
                raise ValueError("header truncated")
            pos += n
        headers.append((name, value))
    return tuple(headers), pos


def install(consumer: Any) -> bool:
    """Read this consumer's records with :func:`decode_batch`; False (nothing changed) if unsure."""
    import kafka

    fetcher = getattr(consumer, "_fetcher", None)
    if not kafka.__version__.startswith(CHECKED_VERSIONS) or fetcher is None:
        log.debug("kafka-python %s: keeping its own record decoding", kafka.__version__)
        return False
    if consumer.config.get("key_deserializer") or consumer.config.get("value_deserializer"):
        return False
    fetcher.PartitionRecords = _fast_class()
    return True


_FAST: Any = None


def _fast_class() -> Any:
    """:class:`FastPartitionRecords`, built on first use so importing this module stays light."""
    global _FAST
    if _FAST is None:
        _FAST = _build()
    return _FAST


def _build() -> Any:
    import kafka.errors as errors
    from kafka.consumer.fetcher import Fetcher
    from kafka.protocol.consumer import IsolationLevel
    from kafka.record.default_records import DefaultRecordBatch

    class FastPartitionRecords(Fetcher.PartitionRecords):  # type: ignore[misc, name-defined]
        """kafka-python's iterator over one partition's fetched batches, yielding RawMessages."""

        def _unpack_records(
            self, tp: Any, records: Any, key_deserializer: Any, value_deserializer: Any
        ) -> Any:
            try:
                batch = records.next_batch()
                last_batch = None
                while batch is not None:
                    last_batch = batch
                    if self.check_crcs and not batch.validate_crc():
                        raise errors.CorruptRecordError(
                            f"Record batch for partition {self.topic_partition} at offset "
                            f"{batch.base_offset} failed crc check"
                        )
                    if batch.magic != 2:  # legacy message sets: the stock path, converted
                        yield from self._legacy(tp, batch)
                        batch = records.next_batch()
                        continue
                    self.leader_epoch = batch.leader_epoch
                    if self.isolation_level == IsolationLevel.READ_COMMITTED and batch.has_producer_id():
                        self._consume_aborted_transactions_up_to(batch.last_offset)
                        producer_id = batch.producer_id
                        if self._contains_abort_marker(batch):
                            self.aborted_producer_ids.discard(producer_id)
                        elif self._is_batch_aborted(batch):
                            self.next_fetch_offset = batch.next_offset
                            batch = records.next_batch()
                            continue
                    if batch.is_control_batch:
                        self.next_fetch_offset = batch.next_offset
                        batch = records.next_batch()
                        continue
                    for message in self._decode(tp, batch):
                        self.next_fetch_offset = message[2] + 1
                        yield message
                    batch = records.next_batch()
                else:
                    if last_batch and last_batch.magic == 2:
                        self.next_fetch_offset = last_batch.next_offset
                    self.drain()
            except StopIteration:
                log.exception("StopIteration raised unpacking messageset")
                raise RuntimeError("StopIteration raised unpacking messageset") from None

        def _decode(self, tp: Any, batch: DefaultRecordBatch) -> list[RawMessage]:
            batch._maybe_uncompress()
            log_append = batch.max_timestamp if batch.timestamp_type == batch.LOG_APPEND_TIME else None
            try:
                messages = decode_batch(
                    bytes(batch._buffer),
                    batch._pos,
                    batch._num_records,
                    tp.topic,
                    tp.partition,
                    batch.base_offset,
                    batch.first_timestamp,
                    log_append,
                )
            except (ValueError, IndexError, UnicodeDecodeError) as exc:
                raise errors.CorruptRecordError(f"Found invalid record structure: {exc!r}") from None
            self.records_read += len(messages)
            self.bytes_read += batch.size_in_bytes
            return messages

        def _legacy(self, tp: Any, batch: Any) -> Any:
            for record in batch:
                if self.check_crcs and not record.validate_crc():
                    raise errors.CorruptRecordError(
                        f"Record for partition {self.topic_partition} at offset {record.offset} "
                        "failed crc check"
                    )
                self.records_read += 1
                self.bytes_read += record.size_in_bytes
                self.next_fetch_offset = record.offset + 1
                ts = record.timestamp
                yield RawMessage(
                    tp.topic,
                    tp.partition,
                    record.offset,
                    ts if ts is not None and ts >= 0 else None,
                    record.key,
                    record.value,
                    tuple(record.headers) if record.headers else (),
                )

    return FastPartitionRecords
