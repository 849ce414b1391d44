"""The run report: counts, timings, offsets and why the run stopped; as text or JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

STOP_REASONS = {
    "caught_up": "caught up with the end offsets seen at start",
    "cycles": "did the requested number of cycles",
    "max_messages": "read the requested number of messages",
    "max_seconds": "reached the time limit",
    "signal": "stopped by a signal after finishing the current cycle",
    "no_partitions": "the group gave this run no partitions (other runs hold them all)",
    "reject_ratio": "a cycle's reject ratio was above --max-reject-ratio; it was rolled back",
    "lock_held": "another run holds the lock (--lock); nothing was done",
    "atomic_run": "an atomic run holds the group and topic; this run stopped (docs/atomic.md)",
    "abandoned": "its process was killed",
    "topic_changed": "the topic was deleted and created again, or truncated: nothing read "
    "(see `metric-etl offsets reset`)",
    "offsets_reset": "an operator moved the stored offsets (`metric-etl offsets reset`)",
    "error": "failed",
}


@dataclass
class PartitionReport:
    """One partition of the topic, whether this run read it or not."""

    partition: int
    start: int | None = None  # first offset this run read from
    end: int | None = None  # next offset to read when the run ended
    end_offset: int | None = None  # the topic's end offset when the run ended
    # "start" when the broker did not answer at the end: end_offset is the one seen at start, so
    # the lag is at least what it says
    end_offset_at: str = "end"
    read: int = 0
    lost: int = 0  # messages deleted upstream (retention) before the group read them
    stored: int | None = None  # the group's stored offset when the run ended, whoever stored it
    log_start: int | None = None  # the partition's first offset (where a group with nothing stored starts)
    assigned: bool = True  # the group gave this run the partition (at some time during the run)
    held_by: str | None = None  # not assigned: the member of the group that held it at the end

    @property
    def lag(self) -> int | None:
        """Messages left to read: the end offset against the stored offset (this run's position, or the
        log start, where nothing is stored)."""
        at = next((o for o in (self.stored, self.end, self.log_start) if o is not None), None)
        if at is None or self.end_offset is None:
            return None
        return max(self.end_offset - at, 0)


@dataclass
class RunReport:
    """What a run did. ``status`` is ok, dry_run, failed, interrupted, reject_ratio, skipped (another
    run held the lock: nothing was done) or rolled_back (an atomic run that did not commit: nothing
    of it was kept, ``rolled_back`` says how many messages it had written, ``stop_reason`` why)."""

    run_id: str
    topic: str
    group_id: str
    started_at: datetime
    finished_at: datetime | None = None
    status: str = "running"
    stop_reason: str | None = None
    dry_run: bool = False
    cycles: int = 0  # polls that read messages: each is one load transaction (etl_runs.cycles)
    empty_polls: int = 0
    read: int = 0
    loaded: int = 0
    rejected: int = 0
    duplicates: int = 0
    lost_to_retention: int = 0  # messages deleted upstream before the group read them
    default_partition: int = 0  # checks loaded into the metrics table's default partition
    conflicts: int = 0
    committed_cycles: int = 0
    partitions: dict[int, PartitionReport] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    rejects_by_rule: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    exit_code: int = 0
    workers: list[str] = field(default_factory=list)  # run ids of the worker processes (--workers)
    config_file: str | None = None  # the config file the settings were read from (None: none)
    atomic: bool = False  # --atomic: one transaction for the whole run
    rolled_back: int = 0  # an atomic run rolled back: messages it had loaded or rejected, all undone

    @property
    def duration_s(self) -> float:
        if self.finished_at is None:
            return 0.0
        return (self.finished_at - self.started_at).total_seconds()

    @property
    def rate(self) -> float:
        """Messages read per second of the whole run."""
        return self.read / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def lag(self) -> int | None:
        lags = [p.lag for p in self.partitions.values() if p.lag is not None]
        return sum(lags) if lags else None

    @property
    def unread(self) -> dict[int, PartitionReport]:
        """Partitions with messages left that the group never gave this run (other members held them)."""
        return {p: r for p, r in sorted(self.partitions.items()) if not r.assigned and r.lag}

    def add_time(self, stage: str, seconds: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready; stable keys (documented in the README)."""
        d = asdict(self)
        d["started_at"] = self.started_at.isoformat()
        d["finished_at"] = self.finished_at.isoformat() if self.finished_at else None
        d["duration_s"] = round(self.duration_s, 3)
        d["rate_per_s"] = round(self.rate, 1)
        d["lag"] = self.lag
        d["timings"] = {k: round(v, 3) for k, v in self.timings.items()}
        d["partitions"] = {str(p): {**asdict(r), "lag": r.lag} for p, r in sorted(self.partitions.items())}
        return d

    def summary_line(self) -> str:
        """One line for a log: what a person grepping a cron log at 3 a.m. needs."""
        return (
            f"run {self.run_id} {self.status} ({self.stop_reason or '-'}): read {self.read}, "
            f"{'would load' if self.dry_run else 'loaded'} {self.loaded}, rejected {self.rejected}, "
            f"duplicates {self.duplicates}, "
            + (f"lost to retention {self.lost_to_retention}, " if self.lost_to_retention else "")
            + f"lag {_fmt(self.lag)}, "
            f"{_cycles(self.cycles)} in {self.duration_s:.1f}s"
        )

    def log_fields(self) -> dict[str, Any]:
        """The summary as structured log fields (see etl.logs.EXTRA_FIELDS)."""
        return {
            "event": "summary",
            "run_id": self.run_id,
            "status": self.status,
            "stop_reason": self.stop_reason,
            "cycles": self.cycles,
            "read": self.read,
            "loaded": self.loaded,
            "rejected": self.rejected,
            "duplicates": self.duplicates,
            "lost_to_retention": self.lost_to_retention,
            "lag": self.lag,
            "duration_s": round(self.duration_s, 3),
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), sort_keys=False)

    def to_text(self) -> str:
        """The summary a person reads at the end of a run (and in a cron log)."""
        verb = "would load" if self.dry_run else "loaded"
        reason = STOP_REASONS.get(self.stop_reason or "", self.stop_reason or "")
        lines = [
            f"metric-etl run {self.run_id}: {self.status}" + (f" ({reason})" if reason else ""),
            f"  topic {self.topic}, group {self.group_id}, {_cycles(self.cycles)}"
            f" ({self.empty_polls} empty poll{'' if self.empty_polls == 1 else 's'})"
            f" in {self.duration_s:.1f}s ({self.rate:,.0f} msg/s)",
            f"  read {self.read:,}  {verb} {self.loaded:,}  rejected {self.rejected:,}"
            f"  duplicates skipped {self.duplicates:,}",
        ]
        lines.append(
            f"  config file {self.config_file or 'none (defaults, METRIC_ETL_* environment, flags)'}"
        )
        if self.lost_to_retention:
            where = ", ".join(
                f"partition {p} {r.lost:,}" for p, r in sorted(self.partitions.items()) if r.lost
            )
            lines.append(
                f"  lost to retention {self.lost_to_retention:,} (deleted upstream before this group "
                f"read them: {where})"
            )
        if self.default_partition:
            lines.append(
                f"  default partition {self.default_partition:,} (checks whose partition could not be "
                "made, or older than retention_raw_days; `metric-etl retention` as the tables' owner "
                "moves the first kind into partitions)"
            )
        if self.rejects_by_rule:
            top = sorted(self.rejects_by_rule.items(), key=lambda kv: (-kv[1], kv[0]))
            lines.append("  rejects by rule: " + ", ".join(f"{rule} {n}" for rule, n in top[:8]))
        if self.partitions:
            table = [("partition", "start", "end", "lag")] + [
                (str(p), _fmt(r.start), _fmt(r.end), _lag(r)) for p, r in sorted(self.partitions.items())
            ]
            widths = [max(len(row[i]) for row in table) for i in range(4)]
            notes = [""] + [
                ""
                if r.assigned
                else "  not read by this run" + (f": held by {r.held_by}" if r.held_by else "")
                for _, r in sorted(self.partitions.items())
            ]
            for row, note in zip(table, notes, strict=True):  # right-aligned columns, like `status`
                cells = "  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True))
                lines.append("  " + cells + note)
        if self.unread:
            waiting = sum(r.lag or 0 for r in self.unread.values())
            lines.append(
                f"  {waiting:,} messages wait on partitions {', '.join(map(str, self.unread))}, which other "
                "members of the group held (they read them, or the next run does)"
            )
        if self.timings:
            lines.append("  time: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items()))
        if self.workers:
            lines.append(f"  {len(self.workers)} workers, runs " + ", ".join(self.workers))
        if self.rolled_back or self.status == "rolled_back":
            lines.append(
                f"  rolled back: the run's one transaction, with the {self.rolled_back:,} messages it had "
                "loaded or rejected, was rolled back; nothing of it was kept (the next run reads them)"
            )
        if self.conflicts:
            lines.append(
                f"  {self.conflicts} cycles yielded to another run (their messages were loaded by it)"
            )
        if self.error:
            lines.append(f"  error: {self.error}")
        return "\n".join(lines)


def _cycles(n: int) -> str:
    return f"{n} cycle" if n == 1 else f"{n} cycles"


def _lag(r: PartitionReport) -> str:
    """A lag against the end offsets seen at start (the broker did not answer at the end) is a floor."""
    return (">=" if r.end_offset_at == "start" and r.lag is not None else "") + _fmt(r.lag)


def _fmt(value: int | None) -> str:
    return "-" if value is None else str(value)
