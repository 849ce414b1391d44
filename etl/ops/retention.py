"""``metric-etl retention``: keep the tables to their configured horizons, without bloat.

Raw checks go by whole partitions: every partition whose range ends before ``retention_raw_days``
is dropped, in one short transaction that waits at most :data:`LOCK_WAIT_S` for the table's lock
(a load waits for it no longer than that plus the drops). No metrics row is ever ``DELETE``d. The
rollups (``retention_hourly_days``, ``retention_daily_days``) and the reviewed rejects
(``retention_rejects_days``; those never reviewed only with ``retention_new_rejects_days``) are
deleted by time, as they are small. Retention also does the partitions' upkeep: it makes them a week
ahead and moves checks out of the default partition into partitions it makes for them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from etl.db import partitions, schema
from etl.db.store import database

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from etl.config import Settings

log = logging.getLogger(__name__)

LOCK_WAIT_S: Final = 5.0  # the longest retention waits for the metrics table's lock, per try
TRIES: Final = 3


@dataclass
class Dropped:
    name: str
    first: str | None  # the partition's range, ISO (None: unbounded)
    end: str | None
    bytes: int


@dataclass
class RetentionResult:
    """What retention removed (or, with ``dry_run``, would remove)."""

    dry_run: bool
    horizons: dict[str, str | None] = field(default_factory=dict)
    dropped: list[Dropped] = field(default_factory=list)
    made: list[str] = field(default_factory=list)
    moved_from_default: int = 0
    default_rows: int = 0
    deleted: dict[str, int] = field(default_factory=dict)  # rollup and reject rows, per table
    lock_wait_s: float = 0.0
    seconds: float = 0.0

    @property
    def bytes_freed(self) -> int:
        return sum(d.bytes for d in self.dropped)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bytes_freed": self.bytes_freed}

    def to_text(self) -> str:
        verb = "would drop" if self.dry_run else "dropped"
        lines = [f"retention{' (dry run: nothing changed)' if self.dry_run else ''}:"]
        for name, horizon in self.horizons.items():
            lines.append(f"  {name:<36} kept {'since ' + horizon if horizon else 'forever'}")
        if self.dropped:
            lines.append(
                f"  {verb} {len(self.dropped)} partitions ({_size(self.bytes_freed)}): "
                f"{self.dropped[0].name} .. {self.dropped[-1].name}"
            )
        else:
            lines.append("  no partition is past the horizon")
        for table, n in self.deleted.items():
            if n:
                lines.append(f"  {'would delete' if self.dry_run else 'deleted'} {n:,} rows of {table}")
        if self.made:
            lines.append(f"  made {len(self.made)} partitions ahead: {', '.join(self.made)}")
        if self.moved_from_default:
            lines.append(f"  moved {self.moved_from_default:,} checks out of the default partition")
        if self.default_rows:
            lines.append(
                f"  the default partition holds {self.default_rows:,} checks (older than the raw horizon, "
                "or in partitions not made yet)"
            )
        if not self.dry_run:
            lines.append(f"  took {self.seconds:.2f}s, of which {self.lock_wait_s:.2f}s waiting for locks")
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _horizon(now: datetime, days: int | None) -> datetime | None:
    return None if days is None else now - timedelta(days=days)


def retention(settings: Settings, *, dry_run: bool = False, now: datetime | None = None) -> RetentionResult:
    """Apply the configured retention (see the module's docstring)."""

    t0 = time.monotonic()
    now = now or datetime.now(UTC)
    tables = schema.tables_for(settings)
    result = RetentionResult(dry_run)
    raw = _horizon(now, settings.retention_raw_days)
    horizons = {
        tables.metrics.name: raw,
        tables.hourly.name: _horizon(now, settings.retention_hourly_days),
        tables.daily.name: _horizon(now, settings.retention_daily_days),
        f"{tables.rejects.name} (reviewed)": _horizon(now, settings.retention_rejects_days),
        f"{tables.rejects.name} (new)": _horizon(now, settings.retention_new_rejects_days),
    }
    result.horizons = {k: v.isoformat(timespec="seconds") if v else None for k, v in horizons.items()}
    with database(settings, "retention") as engine:
        with engine.begin() as conn:
            schema.ensure_tables(conn, tables)
            parts = partitions.existing(conn, tables, sizes=True)
        old = [p for p in parts if not p.default and raw is not None and p.hi is not None and p.hi <= raw]
        result.dropped = [
            Dropped(p.name, p.lo.isoformat() if p.lo else None, p.hi.isoformat() if p.hi else None, p.bytes)
            for p in old
        ]
        if old and not dry_run:
            result.lock_wait_s = _drop(engine, tables, [p.name for p in old])
        with engine.begin() as conn:
            result.deleted = _delete_old(conn, tables, horizons, dry_run)
            if not dry_run:
                _upkeep(conn, tables, settings, raw, now, result)
            result.default_rows = partitions.default_rows(conn, tables)
    result.seconds = time.monotonic() - t0
    return result


def _drop(engine: Any, tables: schema.Tables, names: list[str]) -> float:
    """Drop the partitions ``names`` in one transaction; returns the seconds spent waiting for the
    lock. Each try waits at most :data:`LOCK_WAIT_S`; a busy table is tried :data:`TRIES` times."""
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    from etl.errors import TransientError

    waited = 0.0
    for attempt in range(1, TRIES + 1):
        t = time.monotonic()
        try:
            with engine.begin() as conn:
                conn.execute(text(f"SET LOCAL lock_timeout = '{int(LOCK_WAIT_S * 1000)}ms'"))
                quote = conn.dialect.identifier_preparer
                conn.execute(
                    text(f"LOCK TABLE {quote.format_table(tables.metrics)} IN ACCESS EXCLUSIVE MODE")
                )
                waited += time.monotonic() - t
                schema_q = quote.quote(tables.schema) + "." if tables.schema else ""
                for name in names:
                    conn.execute(text(f"DROP TABLE {schema_q}{quote.quote(name)}"))
            return waited
        except OperationalError as exc:
            waited += time.monotonic() - t
            if getattr(exc.orig, "pgcode", None) != "55P03" or attempt == TRIES:
                if getattr(exc.orig, "pgcode", None) == "55P03":
                    raise TransientError(
                        f"retention: {tables.metrics.name} stayed locked by other sessions for "
                        f"{TRIES} tries of {LOCK_WAIT_S:.0f}s; nothing was dropped",
                        hint="run it again later (an --atomic backfill holds the table until it ends)",
                    ) from None
                raise
            log.warning("retention: %s is busy, trying again (%d of %d)", tables.metrics.name, attempt, TRIES)
    return waited


def _delete_old(
    conn: Connection, tables: schema.Tables, horizons: dict[str, datetime | None], dry_run: bool
) -> dict[str, int]:
    """Delete (or count) the rollup rows and rejects past their horizons."""
    from sqlalchemy import func, select

    out: dict[str, int] = {}
    r = tables.rejects
    targets = [
        (tables.hourly, tables.hourly.c.hour, horizons[tables.hourly.name], None),
        (tables.daily, tables.daily.c.day, horizons[tables.daily.name], None),
        (r, r.c.rejected_at, horizons[f"{r.name} (reviewed)"], r.c.status.in_(("replayed", "ignored"))),
        (r, r.c.rejected_at, horizons[f"{r.name} (new)"], r.c.status == "new"),
    ]
    for table, column, horizon, extra in targets:
        if horizon is None:
            continue
        where = [column < horizon] + ([extra] if extra is not None else [])
        if dry_run:
            n = conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one()
        else:
            n = conn.execute(table.delete().where(*where)).rowcount
        out[table.name] = out.get(table.name, 0) + int(n)
    return out


def _upkeep(
    conn: Connection,
    tables: schema.Tables,
    settings: Settings,
    raw: datetime | None,
    now: datetime,
    result: RetentionResult,
) -> None:
    """Make the partitions a week ahead, and those the default partition's checks belong in."""
    from sqlalchemy import text

    conn.execute(text(f"SET LOCAL lock_timeout = '{int(LOCK_WAIT_S * 1000)}ms'"))
    interval = settings.partition_interval
    result.made = partitions.create_range(conn, tables, interval, now, now + partitions.AHEAD)
    if not partitions.default_rows(conn, tables):
        return
    quote = conn.dialect.identifier_preparer
    default = (quote.quote(tables.schema) + "." if tables.schema else "") + quote.quote(
        partitions.default_name(tables)
    )
    times = [
        row[0]
        for row in conn.execute(
            text(f"SELECT DISTINCT date_trunc('day', checked_at, 'UTC') FROM {default} ORDER BY 1")
        )
    ]
    for at in times:
        start = partitions.start_of(at, interval)
        end = partitions.next_start(start, interval)
        if raw is not None and end <= raw:
            continue  # past the horizon: left where it is, and counted
        moved = partitions.create(conn, tables, start, end)
        if moved is not None:
            result.made.append(partitions.partition_name(tables, start))
            result.moved_from_default += moved
