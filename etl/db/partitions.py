"""The metrics table's range partitions on ``checked_at``: which exist, making them, dropping them.

A partition covers one ``partition_interval`` (a day, a week from Monday, or a month, in UTC) and is
named after its first day: ``website_metrics_p20261204``. ``init-db`` and ``retention`` make them
ahead of time; a run makes, in a short transaction of its own before a cycle's load, those the
cycle's checks need (:class:`PartitionKeeper`). A check no partition can take (its partition could
not be made: a role without CREATE, a lock held too long; or it is older than the raw checks are
kept) lands in the default partition, and the run counts and reports it. Making a partition moves
the default partition's rows of its range into it, so they do not stay there.

A new partition is made as a table of its own and then attached: ``ATTACH PARTITION`` takes a lock
on the parent that loads do not wait for (``SHARE UPDATE EXCLUSIVE``), where ``CREATE TABLE ...
PARTITION OF`` would take one that stops them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import numpy as np
    from sqlalchemy.engine import Connection, Engine

    from etl.config import Settings
    from etl.db.tables import Tables

log = logging.getLogger(__name__)

INTERVALS: Final = ("day", "week", "month")
DAY_US: Final = 86_400_000_000
_MONDAY_US: Final = 4 * DAY_US  # 1970-01-01 was a Thursday; 1970-01-05 a Monday
AHEAD: Final = timedelta(days=7)  # how far ahead init-db and retention make partitions (at least 2)
LOCK_TIMEOUT_S: Final = 5.0  # how long making a partition waits for a lock before it gives up for now


def floor_us(us: np.ndarray, interval: str) -> np.ndarray:
    """The start, in microseconds since the epoch (UTC), of the interval each time falls in."""
    import numpy as np

    if interval == "day":
        return us // DAY_US * DAY_US
    if interval == "week":
        return (us - _MONDAY_US) // (7 * DAY_US) * (7 * DAY_US) + _MONDAY_US
    months = us.astype("datetime64[us]").astype("datetime64[M]")
    return months.astype("datetime64[us]").astype(np.int64)


def start_of(at: datetime, interval: str) -> datetime:
    """The start of the interval ``at`` falls in."""
    day = datetime(at.year, at.month, at.day, tzinfo=UTC)
    if interval == "day":
        return day
    if interval == "week":
        return day - timedelta(days=day.weekday())
    return day.replace(day=1)


def next_start(start: datetime, interval: str) -> datetime:
    """The start of the interval after the one beginning at ``start``."""
    if interval == "day":
        return start + timedelta(days=1)
    if interval == "week":
        return start + timedelta(days=7)
    return (start + timedelta(days=32)).replace(day=1)


def partition_name(tables: Tables, start: datetime) -> str:
    return f"{tables.metrics.name}_p{start:%Y%m%d}"


def default_name(tables: Tables) -> str:
    return f"{tables.metrics.name}_default"


@dataclass(frozen=True)
class Partition:
    """One partition of the metrics table: its range (``None``: unbounded), its size on disk."""

    name: str
    lo: datetime | None
    hi: datetime | None
    bytes: int
    default: bool = False


def existing(conn: Connection, tables: Tables, *, sizes: bool = False) -> list[Partition]:
    """The metrics table's partitions, oldest first, the default partition last; their sizes on disk
    with ``sizes`` (which waits for a lock on each: a run's look does without)."""
    from sqlalchemy import text

    size = "pg_total_relation_size(c.oid)" if sizes else "0"
    rows = conn.execute(
        text(
            "SELECT c.relname, b.bound = 'DEFAULT', "
            "CASE WHEN m[1] LIKE '''%' THEN CAST(btrim(m[1], '''') AS timestamptz) END, "
            "CASE WHEN m[2] LIKE '''%' THEN CAST(btrim(m[2], '''') AS timestamptz) END, "
            f"{size} "
            "FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid "
            "CROSS JOIN LATERAL (SELECT pg_get_expr(c.relpartbound, c.oid) AS bound) AS b "
            r"LEFT JOIN LATERAL regexp_match(b.bound, 'FROM \((.*)\) TO \((.*)\)') AS m ON true "
            "WHERE i.inhparent = to_regclass(:parent)"
        ),
        {"parent": conn.dialect.identifier_preparer.format_table(tables.metrics)},
    ).all()
    parts = [Partition(name, lo, hi, int(size), bool(is_default)) for name, is_default, lo, hi, size in rows]
    far = datetime.max.replace(tzinfo=UTC)
    return sorted(parts, key=lambda p: (p.default, p.lo or datetime.min.replace(tzinfo=UTC), p.hi or far))


def is_partitioned(conn: Connection, tables: Tables) -> bool:
    from sqlalchemy import text

    kind = conn.execute(
        text("SELECT relkind FROM pg_class WHERE oid = to_regclass(:t)"),
        {"t": conn.dialect.identifier_preparer.format_table(tables.metrics)},
    ).scalar()
    return kind == "p"


def _lock(conn: Connection, tables: Tables) -> None:
    """Serialise the job's partition changes on one table (two runs making the same partition)."""
    from sqlalchemy import text

    conn.execute(
        text("SELECT pg_advisory_xact_lock(hashtext(:k))"),
        {"k": f"metric-etl:partitions:{tables.schema}.{tables.metrics.name}"},
    )


def ensure_default(conn: Connection, tables: Tables) -> bool:
    """Make the default partition if the table has none; True if it was made."""
    from sqlalchemy import text

    if any(p.default for p in existing(conn, tables)):
        return False
    quote = conn.dialect.identifier_preparer
    conn.execute(
        text(
            f"CREATE TABLE IF NOT EXISTS {_qualified(tables, default_name(tables), quote)} "
            f"PARTITION OF {quote.format_table(tables.metrics)} DEFAULT"
        )
    )
    return True


def _qualified(tables: Tables, name: str, quote: Any) -> str:
    return (quote.quote(tables.schema) + "." if tables.schema else "") + quote.quote(name)


def create(conn: Connection, tables: Tables, start: datetime, end: datetime) -> int | None:
    """Make the partition ``[start, end)`` in the caller's transaction, moving into it the default
    partition's rows of that range; returns how many moved, or None if it exists already (or an
    existing partition overlaps the range)."""
    from sqlalchemy import text

    _lock(conn, tables)
    parts = existing(conn, tables)
    lowest = datetime.min.replace(tzinfo=UTC)
    highest = datetime.max.replace(tzinfo=UTC)
    if any(not p.default and (p.lo or lowest) < end and start < (p.hi or highest) for p in parts):
        return None
    quote = conn.dialect.identifier_preparer
    parent = quote.format_table(tables.metrics)
    new = _qualified(tables, partition_name(tables, start), quote)
    # With the parent's CHECK constraints (a DBA's too): ATTACH requires them.
    conn.execute(
        text(f"CREATE TABLE {new} (LIKE {parent} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE)")
    )
    moved = 0
    if any(p.default for p in parts):
        default = _qualified(tables, default_name(tables), quote)
        moved = conn.execute(
            text(
                f"WITH d AS (DELETE FROM {default} WHERE checked_at >= :lo AND checked_at < :hi RETURNING *) "
                f"INSERT INTO {new} SELECT * FROM d"
            ),
            {"lo": start, "hi": end},
        ).rowcount
    conn.execute(
        text(f"ALTER TABLE {parent} ATTACH PARTITION {new} FOR VALUES FROM (:lo) TO (:hi)"),
        {"lo": start, "hi": end},
    )
    return moved


def create_range(
    conn: Connection, tables: Tables, interval: str, first: datetime, last: datetime
) -> list[str]:
    """Make every missing partition from the one holding ``first`` to the one holding ``last``."""
    made = []
    start = start_of(first, interval)
    while start <= last:
        end = next_start(start, interval)
        if create(conn, tables, start, end) is not None:
            made.append(partition_name(tables, start))
        start = end
    return made


def default_rows(conn: Connection, tables: Tables) -> int:
    """Rows in the default partition (0 when there is none)."""
    from sqlalchemy import text

    if not any(p.default for p in existing(conn, tables)):
        return 0
    quote = conn.dialect.identifier_preparer
    return int(
        conn.execute(
            text(f"SELECT count(*) FROM {_qualified(tables, default_name(tables), quote)}")
        ).scalar_one()
    )


class PartitionKeeper:
    """Makes, before a cycle's load, the partitions its checks need; remembers the ranges that exist."""

    def __init__(self, settings: Settings, tables: Tables) -> None:
        self.interval = settings.partition_interval
        self.keep_days = settings.retention_raw_days
        self.tables = tables
        self.ranges: list[tuple[int, int]] = []  # [lo, hi) in us of each partition but the default
        self.loaded = False
        self.can_create = True
        self.tried: set[int] = set()  # starts that could not be made in this run
        self.to_default = 0  # checks this run sent to the default partition

    def outside(self, us: np.ndarray) -> np.ndarray:
        """Which of the times no partition but the default takes."""
        import numpy as np

        if not self.ranges:
            return np.ones(len(us), dtype=bool)
        lo = np.array([r[0] for r in self.ranges], dtype=np.int64)
        hi = np.array([r[1] for r in self.ranges], dtype=np.int64)
        i = np.searchsorted(lo, us, side="right") - 1
        return (i < 0) | (us >= hi[np.maximum(i, 0)])

    def ensure(self, engine: Engine, checked_at: Any) -> int:
        """Make the partitions the checks need (a short transaction of its own, on ``engine``);
        returns how many of the checks go to the default partition."""
        import numpy as np
        from sqlalchemy.exc import DBAPIError

        from etl.db.rollups import as_micros

        if not len(checked_at):
            return 0
        us = as_micros(checked_at)
        try:
            if not self.loaded:
                with engine.connect() as conn:
                    self._remember(conn)
            out = self.outside(us)
            if out.any() and self.can_create:
                missing = [int(s) for s in np.unique(floor_us(us[out], self.interval)).tolist()]
                missing = [s for s in missing if s not in self.tried]
                if missing:
                    self._make(engine, missing)
                    out = self.outside(us)
        except DBAPIError as exc:  # the load's own transaction meets it too, and retries or reports it
            log.warning(
                "could not look at or make the partitions of %s now: %s",
                self.tables.metrics.name,
                str(exc.orig).splitlines()[0] if exc.orig else exc,
            )
            return 0
        n = int(out.sum())
        if n:
            self.to_default += n
            log.warning(
                "%d checks went to the default partition of %s (their partitions could not be made, "
                "or they are older than retention_raw_days); `metric-etl retention` run as the table's "
                "owner makes the partitions and moves the checks in",
                n,
                self.tables.metrics.name,
            )
        return n

    def _make(self, engine: Engine, missing: list[int]) -> None:
        from sqlalchemy import text
        from sqlalchemy.exc import DBAPIError

        horizon = None
        if self.keep_days is not None:
            horizon = datetime.now(UTC) - timedelta(days=self.keep_days)
        self.tried.update(missing)
        try:
            with engine.begin() as conn:
                conn.execute(text(f"SET LOCAL lock_timeout = '{int(LOCK_TIMEOUT_S * 1000)}ms'"))
                for start_us in missing:
                    start = datetime.fromtimestamp(start_us / 1e6, UTC)
                    end = next_start(start, self.interval)
                    if horizon is not None and end <= horizon:
                        continue  # older than raw checks are kept: the default partition takes it
                    moved = create(conn, self.tables, start, end)
                    if moved:
                        log.info(
                            "made partition %s; moved %d checks into it from the default partition",
                            partition_name(self.tables, start),
                            moved,
                        )
                self._remember(conn)
        except DBAPIError as exc:
            if getattr(exc.orig, "pgcode", None) == "42501":  # insufficient privilege: the owner makes them
                self.can_create = False
            log.warning(
                "could not make partitions of %s now (%s); their checks go to the default partition",
                self.tables.metrics.name,
                str(exc.orig).splitlines()[0] if exc.orig else exc,
            )

    def _remember(self, conn: Connection) -> None:
        self.loaded = True
        lowest, highest = -(2**62), 2**62
        self.ranges = sorted(
            (
                lowest if p.lo is None else int(p.lo.timestamp() * 1_000_000),
                highest if p.hi is None else int(p.hi.timestamp() * 1_000_000),
            )
            for p in existing(conn, self.tables)
            if not p.default
        )
