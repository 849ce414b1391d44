"""The ``etl_offsets`` rows: where each group's next run starts, per partition, and the conditional
advance of the exactly-once protocol (only from the offset the run started from)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from etl.config import Settings
    from etl.db import schema


class OffsetConflict(Exception):
    """Another run advanced a partition first: this cycle must roll back and re-seek."""

    def __init__(self, partitions: list[int]) -> None:
        super().__init__(f"partitions {partitions} were advanced by another run")
        self.partitions = partitions


@dataclass
class OffsetAdvance:
    """Move a partition from ``expected`` (None: no row yet) to ``new``."""

    partition: int
    expected: int | None
    new: int
    incarnation: int = 0  # for a partition's first row; an existing row keeps its own
    topic_id: str | None = None  # likewise


def read_offsets(conn: Connection, tables: schema.Tables, group_id: str, topic: str) -> dict[int, int]:
    """partition -> next offset stored for the group and topic."""
    return {p: n for p, (n, _) in read_offset_owners(conn, tables, group_id, topic).items()}


@dataclass
class StoredOffset:
    """A row of the offsets table."""

    next_offset: int
    incarnation: int
    topic_id: str | None
    run_id: str | None


def read_stored(
    conn: Connection, tables: schema.Tables, group_id: str, topic: str, *, for_update: bool = False
) -> dict[int, StoredOffset]:
    """partition -> its stored offset row for the group and topic (locked with ``for_update``)."""
    from sqlalchemy import select

    o = tables.offsets
    query = select(o.c.partition, o.c.next_offset, o.c.incarnation, o.c.topic_id, o.c.run_id).where(
        o.c.group_id == group_id, o.c.topic == topic
    )
    rows = conn.execute(query.with_for_update() if for_update else query)
    return {int(p): StoredOffset(int(n), int(i), t, r) for p, n, i, t, r in rows}


def latest_incarnations(conn: Connection, tables: schema.Tables, topic: str) -> dict[int, int]:
    """partition -> the highest incarnation any group's stored offset of ``topic`` is at."""
    from sqlalchemy import func, select

    o = tables.offsets
    rows = conn.execute(
        select(o.c.partition, func.max(o.c.incarnation)).where(o.c.topic == topic).group_by(o.c.partition)
    )
    return {int(p): int(i) for p, i in rows}


def record_topic_state(
    conn: Connection,
    tables: schema.Tables,
    settings: Settings,
    run_id: str,
    gaps: dict[int, tuple[int, int]],
    topic_id: str | None,
) -> dict[int, tuple[int, int]]:
    """Move each stored offset of ``gaps`` (partition -> (stored, log start)) to its log start, if it
    is still where it was, and add what it stepped over to the run's ``lost_to_retention``; note the
    topic's id where the stored offsets have none yet. Returns the gaps this call moved."""
    from sqlalchemy import func

    o, runs = tables.offsets, tables.runs
    mine = (o.c.group_id == settings.group_id, o.c.topic == settings.topic)
    moved = {}
    for p, (stored, start) in sorted(gaps.items()):
        done = conn.execute(
            o.update()
            .where(*mine, o.c.partition == p, o.c.next_offset == stored)
            .values(next_offset=start, run_id=run_id, updated_at=func.now())
        ).rowcount
        if done == 1:
            moved[p] = (stored, start)
    if moved:
        total = sum(start - stored for stored, start in moved.values())
        conn.execute(
            runs.update()
            .where(runs.c.run_id == run_id)
            .values(lost_to_retention=runs.c.lost_to_retention + total)
        )
    if topic_id is not None:
        conn.execute(o.update().where(*mine, o.c.topic_id.is_(None)).values(topic_id=topic_id))
    return moved


def read_offset_owners(
    conn: Connection, tables: schema.Tables, group_id: str, topic: str
) -> dict[int, tuple[int, str | None]]:
    """partition -> (next offset, id of the run that stored it) for the group and topic."""
    from sqlalchemy import select

    o = tables.offsets
    rows = conn.execute(
        select(o.c.partition, o.c.next_offset, o.c.run_id).where(o.c.group_id == group_id, o.c.topic == topic)
    )
    return {int(p): (int(n), run) for p, n, run in rows}


def advance_offsets(
    conn: Connection,
    tables: schema.Tables,
    group_id: str,
    topic: str,
    run_id: str,
    advances: list[OffsetAdvance],
) -> None:
    """Conditional advance: only from the offset this run started from. Raises OffsetConflict."""
    from sqlalchemy import func
    from sqlalchemy.dialects.postgresql import insert

    o = tables.offsets
    lost: list[int] = []
    for a in sorted(advances, key=lambda a: a.partition):  # one lock order: no deadlocks between runs
        stmt: Any
        if a.expected is None:
            stmt = (
                insert(o)
                .values(
                    group_id=group_id,
                    topic=topic,
                    partition=a.partition,
                    next_offset=a.new,
                    incarnation=a.incarnation,
                    topic_id=a.topic_id,
                    run_id=run_id,
                )
                .on_conflict_do_nothing()
            )
        else:
            stmt = (
                o.update()
                .where(
                    o.c.group_id == group_id,
                    o.c.topic == topic,
                    o.c.partition == a.partition,
                    o.c.next_offset == a.expected,
                )
                .values(next_offset=a.new, run_id=run_id, updated_at=func.now())
            )
        if conn.execute(stmt).rowcount != 1:
            lost.append(a.partition)
    if lost:
        raise OffsetConflict(lost)
