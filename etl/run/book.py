"""The offset book of the exactly-once protocol: where each partition stands, as this run knows it.

A cycle's load advances a partition's stored offset only from the value the book expects (the
conditional advance of :func:`etl.db.offsets.advance_offsets`): if another run moved it first, the load
rolls back. Messages of a batch below the expected offset were loaded or rejected before (a rewind)
and are skipped here, before they cost a load. Each partition's messages are loaded under its
incarnation (see :data:`etl.contract.MESSAGE_KEY`).
"""

from __future__ import annotations

from operator import itemgetter
from typing import TYPE_CHECKING, Any

from etl.db.offsets import OffsetAdvance
from etl.report import PartitionReport

try:
    import etl.native as native
except ImportError:  # built without a C compiler
    native = None  # type: ignore[assignment]

if TYPE_CHECKING:  # numpy is imported where used: a run with nothing to read never needs it
    import pandas as pd

    from etl.contract import RawMessage
    from etl.db.offsets import StoredOffset
    from etl.report import RunReport


class OffsetBook:
    """Per partition: the stored next offset the next advance starts from, and the incarnation."""

    def __init__(self) -> None:
        # partition -> next offset as stored in the database (None: no row yet). The conditional
        # advance in the load transaction checks against it.
        self.expected: dict[int, int | None] = {}
        # partition -> the incarnation its messages are loaded under: the stored one, else the
        # highest any group of the topic is at (``latest``), else 0.
        self.incarnation: dict[int, int] = {}
        self.latest: dict[int, int] = {}
        self.topic_id: str | None = None

    def note_stored(self, rows: dict[int, StoredOffset]) -> dict[int, int]:
        """partition -> stored next offset; notes each partition's incarnation on the way."""
        for p, row in rows.items():
            self.incarnation[p] = row.incarnation
        return {p: row.next_offset for p, row in rows.items()}

    def incarnation_of(self, partition: int) -> int:
        found = self.incarnation.get(partition)
        return found if found is not None else self.latest.get(partition, 0)

    def moved(self, advances: list[OffsetAdvance]) -> None:
        """The next batch starts from these advances (loaded, or in flight)."""
        for a in advances:
            self.expected[a.partition] = a.new

    def with_incarnation(
        self, good: pd.DataFrame, rejects: pd.DataFrame
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """``good`` and ``rejects`` with their ``incarnation`` column."""
        return self._with_incarnation(good), self._with_incarnation(rejects)

    def _with_incarnation(self, frame: pd.DataFrame) -> pd.DataFrame:
        import numpy as np

        of = self.incarnation_of
        parts = frame["partition"].to_numpy(dtype=np.int64) if len(frame) else np.zeros(0, dtype=np.int64)
        lookup = {p: of(p) for p in distinct(parts)}
        values = set(lookup.values())
        if len(values) <= 1:  # the usual case: one value for the whole batch
            return frame.assign(incarnation=np.int32(values.pop() if values else 0))
        return frame.assign(incarnation=np.array([lookup[p] for p in parts.tolist()], dtype=np.int32))

    def split_duplicates(
        self, messages: list[RawMessage], positions: tuple[Any, Any], report: RunReport
    ) -> tuple[list[RawMessage], int]:
        """Messages below the stored offset were loaded or rejected before (a rewind): skip them.

        A message twice in one batch (re-fetched after a seek) is kept once. The usual batch has
        neither, which numpy tells at once (a sort of the keys: numpy's hashing ``unique`` took 20
        times as long); only a batch with either is walked message by message.
        """
        import numpy as np

        parts, offsets = positions
        for p, start, count in zip(*partition_runs(parts, offsets), strict=True):
            pr = report.partitions.setdefault(p, PartitionReport(p))
            if pr.start is None:
                pr.start = start
            pr.read += count
        below = np.zeros(len(messages), dtype=bool)
        for p, e in self.expected.items():
            if e is not None:
                below |= (parts == p) & (offsets < e)
        keys = parts << 44 | offsets  # partition < 2**19, offset < 2**44 (17 trillion)
        if not below.any():
            ordered = np.sort(keys)
            if not (ordered[1:] == ordered[:-1]).any():
                return messages, 0
        seen: set[tuple[int, int]] = set()
        fresh = []
        for m, old in zip(messages, below.tolist(), strict=True):
            if not old and (m.partition, m.offset) not in seen:
                seen.add((m.partition, m.offset))
                fresh.append(m)
        return fresh, len(messages) - len(fresh)

    def advances(self, positions: tuple[Any, Any], report: RunReport) -> list[OffsetAdvance]:
        """Each partition's conditional advance for a batch: from the expected offset to past its last."""

        parts, offsets = positions
        out = []
        for p in distinct(parts):
            offset = int(offsets[parts == p].max())
            expected = self.expected.get(p)
            if expected is None or offset + 1 > expected:
                incarnation = self.incarnation_of(p)
                out.append(OffsetAdvance(p, expected, offset + 1, incarnation, self.topic_id))
            report.partitions[p].end = max(offset + 1, expected or 0)
        return out


def positions(messages: list[RawMessage]) -> tuple[Any, Any]:
    """The partitions and offsets of ``messages`` as two int64 arrays."""
    import numpy as np

    if native is not None:
        parts, offsets, *_ = native.fields(messages)
        return np.frombuffer(parts, dtype=np.int64), np.frombuffer(offsets, dtype=np.int64)
    n = len(messages)
    parts = np.fromiter(map(itemgetter(1), messages), dtype=np.int64, count=n)
    offsets = np.fromiter(map(itemgetter(2), messages), dtype=np.int64, count=n)
    return parts, offsets


def distinct(parts: Any) -> list[int]:
    """The partitions of a batch (an int64 array), in order: one pass over a batch whose messages come
    partition by partition, as Kafka's fetches give them (numpy's hashing ``unique`` took 50 times as
    long)."""
    import numpy as np

    if not len(parts):
        return []
    ends = np.flatnonzero(parts[1:] != parts[:-1])
    return sorted(set(parts[ends].tolist()) | {int(parts[-1])})


def partition_runs(parts: Any, offsets: Any) -> tuple[list[int], list[int], list[int]]:
    """Per partition of a batch, in partition order: its first offset in batch order and its count."""
    import numpy as np

    unique, first, counts = np.unique(parts, return_index=True, return_counts=True)
    return unique.tolist(), offsets[first].tolist(), counts.tolist()
