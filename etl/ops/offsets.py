"""``metric-etl offsets reset``: move the stored offsets of a group and topic.

A run stops (exit 3, :class:`~etl.errors.TopicChanged`) when a stored offset belongs to another
incarnation of its topic (see :mod:`etl.incarnation`); the operator moves the offsets with
:func:`reset`, which gives such partitions a new incarnation.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from etl.db import schema
from etl.errors import ConfigError, LockHeld
from etl.incarnation import changes
from etl.kafka.topics import TopicState

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from etl.config import Settings
    from etl.db.offsets import StoredOffset

log = logging.getLogger(__name__)


# -- offsets reset ----------------------------------------------------------------------------------

RESET_STATUS = "reset"  # etl_runs.status of a reset's row; its stop_reason is "offsets_reset"


@dataclass
class ResetRow:
    partition: int
    stored: int | None  # before; None: no stored offset
    new: int
    incarnation_before: int | None
    incarnation: int
    log_start: int
    end: int

    @property
    def new_incarnation(self) -> bool:
        return self.incarnation_before is not None and self.incarnation != self.incarnation_before


@dataclass
class ResetResult:
    topic: str
    group_id: str
    to: str
    topic_id: str | None
    dry_run: bool
    run_id: str | None = None
    rows: list[ResetRow] = field(default_factory=list)

    @property
    def changed(self) -> list[ResetRow]:
        return [r for r in self.rows if r.stored != r.new or r.new_incarnation]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["changed"] = len(self.changed)
        return d

    def to_text(self) -> str:
        head = "would move" if self.dry_run else "moved"
        lines = [
            f"offsets reset of group {self.group_id}, topic {self.topic} to {self.to}"
            + (" (dry run: nothing changed)" if self.dry_run else f" (run {self.run_id})"),
            f"  {'partition':>9}  {'stored':>12}  {'new':>12}  {'incarnation':>11}  "
            f"{'log start':>12}  {'end':>12}",
        ]
        for r in self.rows:
            inc = f"{r.incarnation_before}->{r.incarnation}" if r.new_incarnation else str(r.incarnation)
            lines.append(
                f"  {r.partition:>9}  {_n(r.stored):>12}  {r.new:>12,}  {inc:>11}  "
                f"{r.log_start:>12,}  {r.end:>12,}"
            )
        n = len(self.changed)
        lines.append(f"  {head} {n} of {len(self.rows)} partitions")
        if any(r.new_incarnation for r in self.rows):
            lines.append("  a new incarnation: its messages load as new rows next to the ones loaded before")
        return "\n".join(lines)


def parse_target(to: str) -> tuple[str, Any]:
    """``--to``: ("earliest"|"latest", None), ("offset", int) or ("time", epoch ms)."""
    text = to.strip()
    if text in ("earliest", "latest"):
        return text, None
    if text.lstrip("-").isdigit():
        offset = int(text)
        if offset < 0:
            raise ConfigError(f"--to {to}: an offset cannot be negative")
        return "offset", offset
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"--to {to}: expected earliest, latest, an offset or an ISO time with a zone "
            "(e.g. 2026-11-28T10:00:00Z)"
        ) from None
    if when.tzinfo is None:
        raise ConfigError(f"--to {to}: the time needs a zone, e.g. {text}Z")
    return "time", int(when.timestamp() * 1000)


def plan(
    state: TopicState,
    stored: dict[int, StoredOffset],
    targets: dict[int, int],
    known: dict[int, int],
    others: dict[int, list[StoredOffset]],
) -> list[ResetRow]:
    """The rows a reset writes: each partition of ``targets`` to its target offset, in the incarnation
    it belongs to.

    A partition whose stored offset belongs to another incarnation (:func:`changes`) gets a new one:
    the incarnation another group already gave the topic's current id (or, without topic ids, a
    higher one another group moved to), else one above every incarnation ``known`` for it.
    Others keep theirs; a partition without a stored offset takes the highest any group has.
    """
    changed = {c.partition for c in changes(state, stored)}
    rows = []
    for p, new in sorted(targets.items()):
        row = stored.get(p)
        if row is None:
            incarnation = max([o.incarnation for o in others.get(p, [])], default=0)
        elif p in changed:
            ahead = [
                o.incarnation
                for o in others.get(p, [])
                if o.incarnation > row.incarnation and o.topic_id == state.topic_id
            ]
            incarnation = max(ahead) if ahead else max(known.get(p, 0), row.incarnation) + 1
        else:
            incarnation = row.incarnation
        rows.append(
            ResetRow(
                p,
                None if row is None else row.next_offset,
                new,
                None if row is None else row.incarnation,
                incarnation,
                state.begins[p],
                state.ends[p],
            )
        )
    return rows


def reset(
    settings: Settings, to: str, *, partitions: list[int] | None = None, dry_run: bool = False
) -> ResetResult:
    """Move the stored offsets of the settings' group and topic (see the module's docstring).

    In one transaction, under the run lock (``run --lock``'s): the offsets rows, and a row of its own
    in etl_runs (status ``reset``, stop reason ``offsets_reset``, the offsets before and after).
    A dry run reads and plans the same, and writes nothing.
    """
    from sqlalchemy import text

    from etl.db.offsets import read_stored
    from etl.db.store import database
    from etl.kafka import topics

    kind, value = parse_target(to)
    state = topics.topic_state(settings)
    wanted = sorted(state.ends) if not partitions else sorted(set(partitions))
    unknown = [p for p in wanted if p not in state.ends]
    if unknown:
        raise ConfigError(
            f"--partition {', '.join(map(str, unknown))}: topic {settings.topic!r} has partitions "
            f"{min(state.ends)}..{max(state.ends)}"
        )
    if kind == "earliest":
        targets = {p: state.begins[p] for p in wanted}
    elif kind == "latest":
        # The last stable offset: messages of a transaction still open below the high watermark
        # are not skipped when it commits.
        targets = {p: state.stable.get(p, state.ends[p]) for p in wanted}
    elif kind == "offset":
        outside = [p for p in wanted if not state.begins[p] <= value <= state.ends[p]]
        if outside:
            raise ConfigError(
                f"--to {value}: outside partition "
                + "; ".join(f"{p}'s offsets {state.begins[p]}..{state.ends[p]}" for p in outside)
            )
        targets = dict.fromkeys(wanted, value)
    else:
        found = topics.offsets_at(settings, wanted, value)
        targets = {p: state.ends[p] if (at := found[p]) is None else at for p in wanted}

    tables = schema.tables_for(settings)
    result = ResetResult(settings.topic, settings.group_id, to, state.topic_id, dry_run)
    key = f"metric-etl:{settings.group_id}:{settings.topic}"
    with database(settings, "offsets reset") as engine, engine.begin() as conn:
        schema.ensure_tables(conn, tables)
        if not conn.execute(text("SELECT pg_try_advisory_xact_lock(hashtext(:k))"), {"k": key}).scalar():
            raise LockHeld(
                f"a run of group {settings.group_id!r} on topic {settings.topic!r} holds the run lock",
                hint="nothing was changed; reset when it has finished (see `metric-etl status`)",
            )
        stored = read_stored(conn, tables, settings.group_id, settings.topic, for_update=True)
        others = _other_groups(conn, tables, settings)
        known = _known_incarnations(conn, tables, settings.topic, wanted)
        result.rows = plan(state, stored, targets, known, others)
        if not dry_run:
            result.run_id = uuid.uuid4().hex[:16]
            _write(conn, tables, settings, result, state)
    return result


def _other_groups(
    conn: Connection, tables: schema.Tables, settings: Settings
) -> dict[int, list[StoredOffset]]:
    from sqlalchemy import select

    from etl.db.offsets import StoredOffset

    o = tables.offsets
    rows = conn.execute(
        select(o.c.partition, o.c.next_offset, o.c.incarnation, o.c.topic_id, o.c.run_id).where(
            o.c.topic == settings.topic, o.c.group_id != settings.group_id
        )
    )
    out: dict[int, list[StoredOffset]] = {}
    for p, n, i, t, r in rows:
        out.setdefault(int(p), []).append(StoredOffset(int(n), int(i), t, r))
    return out


def _known_incarnations(
    conn: Connection, tables: schema.Tables, topic: str, partitions: list[int]
) -> dict[int, int]:
    """partition -> the highest incarnation in the metrics and rejects tables and any group's offsets.

    One index probe per partition and table: the keys begin (topic, partition, incarnation).
    """
    from sqlalchemy import func, select

    out: dict[int, int] = {}
    for table in (tables.metrics, tables.rejects, tables.offsets):
        for p in partitions:
            found = conn.execute(
                select(func.max(table.c.incarnation)).where(table.c.topic == topic, table.c.partition == p)
            ).scalar()
            if found is not None:
                out[p] = max(out.get(p, 0), int(found))
    return out


def _write(
    conn: Connection, tables: schema.Tables, settings: Settings, result: ResetResult, state: TopicState
) -> None:
    import os
    import socket

    from sqlalchemy import func
    from sqlalchemy.dialects.postgresql import insert

    o, now = tables.offsets, datetime.now(UTC)
    for r in result.rows:
        values = {
            "next_offset": r.new,
            "incarnation": r.incarnation,
            "topic_id": state.topic_id,
            "run_id": result.run_id,
        }
        stmt = insert(o).values(
            group_id=settings.group_id, topic=settings.topic, partition=r.partition, **values
        )
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[o.c.group_id, o.c.topic, o.c.partition],
                set_={**values, "updated_at": func.now()},
            )
        )
    conn.execute(
        tables.runs.insert().values(
            run_id=result.run_id,
            group_id=settings.group_id,
            topic=settings.topic,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=now,
            finished_at=datetime.now(UTC),
            status=RESET_STATUS,
            stop_reason="offsets_reset",
            start_offsets={str(r.partition): r.stored for r in result.rows},
            end_offsets={str(r.partition): r.new for r in result.rows},
        )
    )
    moved = ", ".join(
        f"{r.partition}: {_n(r.stored)} -> {r.new}"
        + (f" (incarnation {r.incarnation})" if r.new_incarnation else "")
        for r in result.rows
    )
    log.warning(
        "offsets of group %s on topic %s reset to %s by run %s: %s",
        settings.group_id,
        settings.topic,
        result.to,
        result.run_id,
        moved,
    )


def _n(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"
