"""``metric-etl status``: offsets and lag per partition, the last runs, and a monitor's verdict.

Read-only (``check`` is :mod:`etl.ops.check`, ``init-db`` :func:`etl.db.schema.init_db`). Every
database problem comes out as an :class:`~etl.errors.EtlError` that says what to fix; Kafka connection
failures are diagnosed (TLS, SASL, wrong port) from what the client logged (:mod:`etl.kafka.diagnose`),
because kafka-python itself only says "Unable to bootstrap".
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from etl.db import schema
from etl.db.partitions import default_rows
from etl.db.store import database, first_line
from etl.errors import EtlError, ExitCode, StatusCode, exit_code_of
from etl.kafka.client import kafka_consumer
from etl.kafka.topics import topic_offsets
from etl.lag import PartitionLag

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from etl.config import Settings

log = logging.getLogger(__name__)

FAILED_STATUSES = ("failed", "reject_ratio", "interrupted", "abandoned", "rolled_back")


LOST_WINDOW = timedelta(hours=24)  # how far back --max-lost adds up lost_to_retention


# -- status ---------------------------------------------------------------------------------------


@dataclass
class RunSummary:
    run_id: str
    status: str
    stop_reason: str | None
    started_at: datetime
    finished_at: datetime | None
    cycles: int
    read: int
    loaded: int
    rejected: int
    duplicates: int
    host: str
    error: str | None
    lost_to_retention: int = 0

    @property
    def duration_s(self) -> float | None:
        return (self.finished_at - self.started_at).total_seconds() if self.finished_at else None


@dataclass
class StatusReport:
    """Where the job stands; ``exit_code`` is the monitor's verdict (see :class:`StatusCode`)."""

    topic: str
    group_id: str
    checked_at: datetime
    partitions: list[PartitionLag] = field(default_factory=list)
    runs: list[RunSummary] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    exit_code: int = StatusCode.OK
    max_lag: int | None = None
    max_age_s: float | None = None
    max_lost: int | None = None
    lost_recently: int = 0  # lost_to_retention of the runs started within LOST_WINDOW
    default_partition_rows: int = 0  # checks in the metrics table's default partition

    @property
    def lag(self) -> int | None:
        if not self.partitions or any(p.lag is None for p in self.partitions):
            return None
        return sum(p.lag or 0 for p in self.partitions)

    @property
    def last_finished(self) -> RunSummary | None:
        return next((r for r in self.runs if r.finished_at is not None), None)

    @property
    def last_success_at(self) -> datetime | None:
        return next((r.finished_at for r in self.runs if r.status == "ok" and r.finished_at), None)

    def as_dict(self) -> dict[str, Any]:
        def run(r: RunSummary) -> dict[str, Any]:
            d = asdict(r)
            d["started_at"] = _iso(r.started_at)
            d["finished_at"] = _iso(r.finished_at)
            d["duration_s"] = None if r.duration_s is None else round(r.duration_s, 3)
            return d

        return {
            "topic": self.topic,
            "group_id": self.group_id,
            "checked_at": _iso(self.checked_at),
            "exit_code": int(self.exit_code),
            "ok": self.exit_code == StatusCode.OK,
            "problems": self.problems,
            "lag": self.lag,
            "max_lag": self.max_lag,
            "max_age_s": self.max_age_s,
            "max_lost": self.max_lost,
            "lost_to_retention_24h": self.lost_recently,
            "default_partition_rows": self.default_partition_rows,
            "last_success_at": _iso(self.last_success_at),
            "partitions": [asdict(p) for p in self.partitions],
            "runs": [run(r) for r in self.runs],
        }

    def to_text(self) -> str:
        verdict = "OK" if self.exit_code == StatusCode.OK else f"PROBLEM (exit {int(self.exit_code)})"
        lines = [f"metric-etl status: {verdict}", f"  topic {self.topic}, group {self.group_id}"]
        lines += [f"  ! {p}" for p in self.problems]
        lines.append("")
        lines.append(f"  {'partition':>9}  {'stored':>12}  {'end':>12}  {'lag':>10}")
        for p in self.partitions:
            lines.append(f"  {p.partition:>9}  {_n(p.stored):>12}  {_n(p.end):>12}  {_n(p.lag):>10}")
        if not self.partitions:
            lines.append("  (no partitions known)")
        lines.append(f"  {'total':>9}  {'':>12}  {'':>12}  {_n(self.lag):>10}")
        if self.lost_recently:
            lines.append(
                f"  lost to retention in the last 24h: {self.lost_recently:,} messages deleted upstream "
                "before the group read them"
            )
        if self.default_partition_rows:
            lines.append(
                f"  default partition: {self.default_partition_rows:,} checks (in partitions not made yet, "
                "or older than retention_raw_days; `metric-etl retention` as the tables' owner moves the "
                "first kind into partitions of their own)"
            )
        lines.append("")
        if not self.runs:
            lines.append("  no runs recorded yet")
        else:
            lines.append(
                f"  {'started (UTC)':<20} {'status':<12} {'why it stopped':<14} {'secs':>7} "
                f"{'read':>9} {'loaded':>9} {'rejected':>9} {'dups':>6}"
            )
            for r in self.runs:
                secs = "-" if r.duration_s is None else f"{r.duration_s:.1f}"
                lines.append(
                    f"  {r.started_at.astimezone(UTC):%Y-%m-%d %H:%M:%S}  {r.status:<12} "
                    f"{r.stop_reason or '-':<14} {secs:>7} {r.read:>9,} {r.loaded:>9,} {r.rejected:>9,} "
                    f"{r.duplicates:>6,}"
                )
                if r.error and r.status in FAILED_STATUSES:
                    lines.append(f"    error: {first_line(r.error)[:200]}")
                if r.lost_to_retention:
                    lines.append(f"    lost to retention: {r.lost_to_retention:,}")
        return "\n".join(lines)


def status(
    settings: Settings,
    *,
    runs: int = 5,
    max_lag: int | None = None,
    max_age: timedelta | None = None,
    max_lost: int | None = None,
    now: datetime | None = None,
) -> StatusReport:
    """Stored offsets, end offsets and lag per partition, and the last ``runs`` runs, with a verdict.

    The database must answer (else TransientError / ConfigError is raised). Kafka may not: then the
    report has no end offsets, and its exit code is 4.
    """
    from sqlalchemy import func, select

    from etl.db.offsets import read_offsets

    now = now or datetime.now(UTC)
    report = StatusReport(
        settings.topic,
        settings.group_id,
        now,
        max_lag=max_lag,
        max_age_s=max_age.total_seconds() if max_age is not None else None,
        max_lost=max_lost,
    )
    tables = schema.tables_for(settings)
    u = tables.runs
    with database(settings, "status") as engine, engine.connect() as conn:
        _close_abandoned(conn, tables, settings)
        stored = read_offsets(conn, tables, settings.group_id, settings.topic)
        shown = [c for c in u.columns if c.name != "heartbeat_at"]  # a table not upgraded yet lacks it
        rows = conn.execute(
            select(*shown)
            .where(u.c.group_id == settings.group_id, u.c.topic == settings.topic)
            .order_by(u.c.started_at.desc())
            .limit(runs)
        ).mappings()
        report.runs = [
            RunSummary(
                run_id=r["run_id"],
                status=r["status"],
                stop_reason=r["stop_reason"],
                started_at=r["started_at"],
                finished_at=r["finished_at"],
                cycles=int(r["cycles"]),
                read=int(r["read"]),
                loaded=int(r["loaded"]),
                rejected=int(r["rejected"]),
                duplicates=int(r["duplicates"]),
                host=r["host"],
                error=r["error"],
                lost_to_retention=int(r["lost_to_retention"]),
            )
            for r in rows
        ]
        mine = (u.c.group_id == settings.group_id, u.c.topic == settings.topic)
        report.lost_recently = int(
            conn.execute(
                select(func.coalesce(func.sum(u.c.lost_to_retention), 0)).where(
                    *mine, u.c.started_at >= now - LOST_WINDOW
                )
            ).scalar_one()
        )
        report.default_partition_rows = default_rows(conn, tables)
        if max_age is not None:
            # The last success may be older than the runs shown: ask for it directly.
            last_ok = conn.execute(
                select(u.c.finished_at)
                .where(u.c.group_id == settings.group_id, u.c.topic == settings.topic, u.c.status == "ok")
                .order_by(u.c.finished_at.desc())
                .limit(1)
            ).scalar()
        else:
            last_ok = None

    codes: list[StatusCode] = []
    try:
        with kafka_consumer(settings) as consumer:
            begins, ends = topic_offsets(consumer, settings.topic)
    except EtlError as exc:
        report.problems.append(str(exc) + (f" ({exc.hint})" if exc.hint else ""))
        codes.append(StatusCode.CONFIG if exit_code_of(exc) == ExitCode.CONFIG else StatusCode.UNREACHABLE)
        report.partitions = [PartitionLag(p, o, None, None) for p, o in sorted(stored.items())]
    else:
        report.partitions = [PartitionLag.of(p, stored.get(p), begins.get(p), ends[p]) for p in sorted(ends)]

    last = report.last_finished
    if last is not None and last.status in FAILED_STATUSES:
        report.problems.append(
            f"the last run ({last.run_id}, finished {_iso(last.finished_at)}) ended {last.status}"
            + (f": {first_line(last.error)[:200]}" if last.error else "")
        )
        codes.append(StatusCode.LAST_RUN_FAILED)
    if max_age is not None and (last_ok is None or now - last_ok > max_age):
        when = f"the last one finished {_iso(last_ok)}" if last_ok else "there is none"
        report.problems.append(f"no run ended ok within the last {_age(max_age)} ({when})")
        codes.append(StatusCode.STALE)
    if max_lag is not None and report.lag is not None and report.lag > max_lag:
        report.problems.append(f"lag {report.lag:,} is above --max-lag {max_lag:,}")
        codes.append(StatusCode.LAG)
    if max_lost is not None and report.lost_recently > max_lost:
        report.problems.append(
            f"{report.lost_recently:,} messages were deleted upstream (retention) before the group read "
            f"them in the last 24h, above --max-lost {max_lost:,}"
        )
        codes.append(StatusCode.LOST)
    report.exit_code = min(codes) if codes else StatusCode.OK
    return report


def _close_abandoned(conn: Connection, tables: schema.Tables, settings: Settings) -> None:
    """Runs that were killed are shown as ``abandoned``, not ``running`` (see etl.db.runs.close_abandoned).

    Best effort: a role that may not update the runs table, or a table a run has not upgraded
    yet, shows the rows as they are.
    """
    from etl.db.runs import close_abandoned

    try:
        with conn.begin():
            close_abandoned(conn, tables, settings, by="metric-etl status")
    except Exception as exc:
        log.info("could not close abandoned runs: %s", first_line(str(exc)))
        conn.rollback()


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _n(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _age(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
