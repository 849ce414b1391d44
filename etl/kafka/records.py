"""Kafka's v2 record format read in Python: the records of an uncompressed batch as
:class:`~etl.contract.RawMessage` tuples (pure, no I/O).

:func:`etl.kafka.fast_records.read_records` uses etl.native's reader in C where it was built, and this
one where it was not, or for bytes the C reader does not find well-formed (it then raises here, as
kafka-python would). tests/test_native.py holds the two to the same records.
"""

from __future__ import annotations

from typing import Final

from kafka.errors import CorruptRecordError

from etl.contract import RawMessage

Header = tuple[str, bytes | None]


def _zigzag(v: int) -> int:
    return (v >> 1) ^ -(v & 1)


# Varints of one and two bytes, decoded in advance: _ONE[b] for one byte b (< 0x80), _TWO[c][b] for
# b (>= 0x80) then c (< 0x80). Indexing a tuple is far cheaper in the interpreter than bit arithmetic.
_ONE: Final = tuple(_zigzag(b) for b in range(0x80))
_TWO: Final = tuple(
    tuple(_zigzag((b & 0x7F) | c << 7) if b >= 0x80 else 0 for b in range(0x100)) for c in range(0x80)
)


def varint(buf: bytes, pos: int) -> tuple[int, int]:
    """The zigzag varint at ``buf[pos]``, any length: (value, position after it).

    Raises ValueError past ten bytes and IndexError past the end, as kafka-python's own does.
    """
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
            raise ValueError("Out of int64 range")


def read_records_in_python(
    buf: bytes,
    pos: int,
    count: int,
    topic: str,
    partition: int,
    base_offset: int,
    first_timestamp: int,
    log_append_time: int | None = None,
) -> tuple[list[RawMessage], int]:
    """:func:`read_records` in Python: the ``count`` records from ``buf[pos]`` to the end of ``buf``.

    ``log_append_time`` is the batch's max timestamp when the broker stamps the records. Raises
    CorruptRecordError for a record whose length field disagrees with its contents, bytes left
    after the last record, a negative header count or header name length, and truncated or
    otherwise unreadable data, the same checks as kafka-python's.

    Written for speed: one loop, varints of one and two bytes (every value from -8,192 to 8,191)
    read inline from tables, since a function call or a bit operation costs more than a tuple
    lookup; other varints by :func:`varint`. The tuples are built with ``tuple.__new__``, a fraction
    of what the named tuple's own constructor costs.
    """
    out: list[RawMessage] = []
    append = out.append
    make = tuple.__new__
    one, two = _ONE, _TWO
    first = pos
    narrow = wide = 0  # length fields of one byte, and bytes beyond two in longer ones
    last_delta: int | None = None  # consecutive records mostly share a timestamp: share its int too
    ts: int | None = None
    try:
        for _ in range(count):
            # Length (its own size is counted where it is not two bytes, for the size returned)
            b = buf[pos]
            if b < 0x80:
                length = one[b]
                pos += 1
                narrow += 1
            else:
                c = buf[pos + 1]
                if c < 0x80:
                    length = two[c][b]
                    pos += 2
                else:
                    length, after = varint(buf, pos)
                    wide += after - pos - 2
                    pos = after
            start = pos
            # Attributes: none are defined for records; read as a varint all the same
            if buf[pos] < 0x80:
                pos += 1
            else:
                pos = varint(buf, pos)[1]
            # TimestampDelta
            b = buf[pos]
            if b < 0x80:
                ts_delta = one[b]
                pos += 1
            else:
                c = buf[pos + 1]
                if c < 0x80:
                    ts_delta = two[c][b]
                    pos += 2
                else:
                    ts_delta, pos = varint(buf, pos)
            # OffsetDelta
            b = buf[pos]
            if b < 0x80:
                offset_delta = one[b]
                pos += 1
            else:
                c = buf[pos + 1]
                if c < 0x80:
                    offset_delta = two[c][b]
                    pos += 2
                else:
                    offset_delta, pos = varint(buf, pos)
            # Key: a negative length is a null key
            b = buf[pos]
            if b < 0x80:
                n = one[b]
                pos += 1
            else:
                c = buf[pos + 1]
                if c < 0x80:
                    n = two[c][b]
                    pos += 2
                else:
                    n, pos = varint(buf, pos)
            if n < 0:
                key = None
            else:
                n += pos
                key = buf[pos:n]
                pos = n
            # Value: a negative length is a tombstone
            b = buf[pos]
            if b < 0x80:
                n = one[b]
                pos += 1
            else:
                c = buf[pos + 1]
                if c < 0x80:
                    n = two[c][b]
                    pos += 2
                else:
                    n, pos = varint(buf, pos)
            if n < 0:
                value = None
            else:
                n += pos
                value = buf[pos:n]
                pos = n
            # Headers: almost always none (a single zero byte)
            if buf[pos] == 0:
                pos += 1
                headers: tuple[Header, ...] = ()
            else:
                n, pos = varint(buf, pos)
                if n < 0:
                    raise CorruptRecordError(f"Found invalid number of record headers {n}")
                found: list[Header] = []
                for _ in range(n):
                    h, pos = varint(buf, pos)
                    if h < 0:
                        raise CorruptRecordError(f"Invalid negative header key size {h}")
                    name = buf[pos : pos + h].decode("utf-8")
                    pos += h
                    h, pos = varint(buf, pos)
                    if h < 0:
                        found.append((name, None))
                    else:
                        found.append((name, buf[pos : pos + h]))
                        pos += h
                headers = tuple(found)
            if pos - start != length:
                raise CorruptRecordError(
                    f"Invalid record size: expected to read {length} bytes in record payload, "
                    f"but instead read {pos - start}"
                )
            if ts_delta != last_delta:
                last_delta = ts_delta
                ts = first_timestamp + ts_delta if log_append_time is None else log_append_time
                if ts < 0:
                    ts = None
            append(
                make(
                    RawMessage,
                    (
                        topic,
                        partition,
                        base_offset + offset_delta,
                        ts,
                        key,
                        value,
                        headers,
                    ),
                )
            )
    except (ValueError, IndexError) as exc:  # UnicodeDecodeError is a ValueError
        raise CorruptRecordError(f"Found invalid record structure: {exc!r}") from None
    if pos != len(buf):
        raise CorruptRecordError(f"{len(buf) - pos} unconsumed bytes after all records consumed")
    # Every record is its length field and then that many bytes.
    return out, len(buf) - first - 2 * len(out) + narrow - wide
