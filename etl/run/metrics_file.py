"""The run's outcome as a Prometheus text file, for node_exporter's textfile collector.

Written after every run (``metric-etl run --metrics-file PATH``), whatever the outcome, atomically: a
temporary file in the same directory, then a rename, so the collector never reads half a file.
Every sample carries ``topic`` and ``group_id`` labels, so several jobs can share a collector
directory (one file each). The last success time survives failed runs: it is read back from the
previous file.

Metric names (all gauges; stable, documented in the README):

- ``metric_etl_last_run_timestamp_seconds``      when the last run ended
- ``metric_etl_last_success_timestamp_seconds``  when a run (not a dry run) last ended with exit code 0
- ``metric_etl_last_run_success``                1 if the last run exited 0, else 0
- ``metric_etl_last_run_exit_code``              the last run's exit code
- ``metric_etl_last_run_status{status=...}``     1 for the last run's status, 0 for the others
- ``metric_etl_last_run_duration_seconds``
- ``metric_etl_last_run_cycles``
- ``metric_etl_last_run_read_messages``, ``..._loaded_messages``, ``..._rejected_messages``,
  ``..._duplicate_messages``
- ``metric_etl_last_run_lost_messages``         messages deleted upstream (retention, delete-records)
                                                 before the group read them, found by the last run
- ``metric_etl_last_run_unread_partitions``      partitions with lag other members held (not read)
- ``metric_etl_lag_messages``                    messages left to read, all partitions
- ``metric_etl_partition_lag_messages{partition=...}``
- ``metric_etl_last_skip_timestamp_seconds``      when a run last found ``--lock`` held and did nothing
- ``metric_etl_skipped_runs``                     how many runs did so since the file was first written

A skipped run (``--lock`` held by another run: exit 75) did nothing wrong, so it leaves every other
sample of the file as the last real run wrote it (its success, its lag) and only updates the two
skip samples. ``metric_etl_last_success_timestamp_seconds`` is 0 until a run first succeeds, so an
alert on its age fires for a job that never succeeded.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from etl.config import Settings
    from etl.report import RunReport

log = logging.getLogger(__name__)

PREFIX = "metric_etl"
RUN_STATUSES = ("ok", "failed", "interrupted", "reject_ratio", "dry_run", "config_error")
SKIP_SERIES = (f"{PREFIX}_last_skip_timestamp_seconds", f"{PREFIX}_skipped_runs")
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def render(
    report: RunReport | None,
    *,
    exit_code: int,
    labels: Mapping[str, str],
    finished_at: float,
    last_success: float | None,
    lag: Mapping[int, int] | None = None,
) -> str:
    """The text file's contents. ``report`` None: the run failed before it had one (config error)."""
    status = _status(report, exit_code)
    success = exit_code == 0
    if success and status != "dry_run":  # a dry run loads nothing: it is no sign of health
        last_success = finished_at
    samples: list[tuple[str, str, str, list[tuple[dict[str, str], float]]]] = []

    def gauge(name: str, help_: str, value: float | None, extra: dict[str, str] | None = None) -> None:
        if value is None:
            return
        samples.append((f"{PREFIX}_{name}", help_, "gauge", [({**labels, **(extra or {})}, value)]))

    gauge("last_run_timestamp_seconds", "Unix time the last run ended.", finished_at)
    gauge(
        "last_success_timestamp_seconds",
        "Unix time a run last ended with exit code 0 (0: never).",
        last_success if last_success is not None else 0.0,
    )
    gauge("last_run_success", "1 if the last run exited 0, else 0.", 1.0 if success else 0.0)
    gauge("last_run_exit_code", "Exit code of the last run (see metric-etl run --help).", exit_code)
    samples.append(
        (
            f"{PREFIX}_last_run_status",
            "1 for the status the last run ended with, 0 for the others.",
            "gauge",
            [({**labels, "status": s}, 1.0 if s == status else 0.0) for s in RUN_STATUSES],
        )
    )
    if report is not None:
        gauge("last_run_duration_seconds", "How long the last run took.", report.duration_s)
        gauge("last_run_cycles", "Cycles the last run did (polls that read messages).", report.cycles)
        gauge("last_run_read_messages", "Messages the last run read from Kafka.", report.read)
        gauge("last_run_loaded_messages", "Messages the last run loaded.", report.loaded)
        gauge(
            "last_run_rejected_messages", "Messages the last run sent to the rejects table.", report.rejected
        )
        gauge(
            "last_run_duplicate_messages",
            "Messages the last run skipped as already handled.",
            report.duplicates,
        )
        gauge(
            "last_run_lost_messages",
            "Messages deleted upstream (retention) before the group read them, found by the last run.",
            report.lost_to_retention,
        )
        gauge(
            "last_run_unread_partitions",
            "Partitions with messages left that other members of the group held during the last run.",
            len(report.unread),
        )
    if lag:
        gauge("lag_messages", "Messages left to read in the topic, all partitions.", sum(lag.values()))
        samples.append(
            (
                f"{PREFIX}_partition_lag_messages",
                "Messages left to read, per partition.",
                "gauge",
                [({**labels, "partition": str(p)}, float(n)) for p, n in sorted(lag.items())],
            )
        )
    lines: list[str] = []
    for name, help_, kind, values in samples:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for sample_labels, value in values:
            lines.append(f"{name}{_labels(sample_labels)} {_number(value)}")
    return "\n".join(lines) + "\n"


def write_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename (readers see the old file or the new one)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # node_exporter runs as another user; mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable; not every filesystem allows it
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def read_previous(path: str | Path) -> tuple[dict[str, str], float | None]:
    """(labels, last success time) from an earlier file at ``path``; empty when there is none."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}, None
    labels: dict[str, str] = {}
    last_success = None
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        found = {k: _unescape(v) for k, v in _LABEL.findall(m.group("labels") or "")}
        if m.group("name") == f"{PREFIX}_last_run_timestamp_seconds":
            labels = found
        if m.group("name") == f"{PREFIX}_last_success_timestamp_seconds":
            with contextlib.suppress(ValueError):
                last_success = float(m.group("value"))
    return labels, last_success


def render_skip(previous: str, *, labels: Mapping[str, str], skipped_at: float) -> str:
    """``previous`` (the last real run's file, may be empty) with the skip samples updated."""
    kept: list[str] = []
    count = 0.0
    for line in previous.splitlines():
        name = line.split()[2] if line.startswith("# ") and len(line.split()) > 2 else None
        m = _SAMPLE.match(line)
        sample = m.group("name") if m else None
        if name in SKIP_SERIES or sample in SKIP_SERIES:
            if sample == SKIP_SERIES[1] and m:
                with contextlib.suppress(ValueError):
                    count = float(m.group("value"))
            continue
        kept.append(line)
    if not any(_SAMPLE.match(line) for line in kept):  # no earlier run: say it never succeeded
        kept = [
            f"# HELP {PREFIX}_last_success_timestamp_seconds Unix time a run last ended with exit code 0 "
            "(0: never).",
            f"# TYPE {PREFIX}_last_success_timestamp_seconds gauge",
            f"{PREFIX}_last_success_timestamp_seconds{_labels(labels)} 0",
        ]
    kept += [
        f"# HELP {SKIP_SERIES[0]} Unix time a run last found the lock held and did nothing.",
        f"# TYPE {SKIP_SERIES[0]} gauge",
        f"{SKIP_SERIES[0]}{_labels(labels)} {_number(skipped_at)}",
        f"# HELP {SKIP_SERIES[1]} Runs that found the lock held and did nothing.",
        f"# TYPE {SKIP_SERIES[1]} gauge",
        f"{SKIP_SERIES[1]}{_labels(labels)} {_number(count + 1)}",
    ]
    return "\n".join(kept) + "\n"


def check_writable(path: str | Path) -> str | None:
    """Why the file could not be written, or None: checked before a run, so a typo costs nothing."""
    parent = Path(path).parent
    if not parent.is_dir():
        return f"directory {parent} does not exist"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"directory {parent} is not writable by this user"
    if Path(path).is_dir():
        return f"{path} is a directory"
    return None


def record_run(
    path: str | Path,
    report: RunReport | None,
    exit_code: int,
    settings: Settings | None,
    *,
    measure_lag: bool = True,
) -> None:
    """Write the file for a finished run; never raises (the run's outcome matters more)."""
    try:
        old_labels, last_success = read_previous(path)
        if settings is not None:
            labels = {"topic": settings.topic, "group_id": settings.group_id}
        else:
            labels = {k: v for k, v in old_labels.items() if k in ("topic", "group_id")}
        if report is not None and report.status == "skipped":
            try:
                previous = Path(path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                previous = ""
            skipped_at = report.finished_at.timestamp() if report.finished_at else time.time()
            write_atomic(path, render_skip(previous, labels=labels, skipped_at=skipped_at))
            return
        lag = _lag(report, exit_code, settings, measure_lag)
        text = render(
            report,
            exit_code=exit_code,
            labels=labels,
            finished_at=report.finished_at.timestamp() if report and report.finished_at else time.time(),
            last_success=last_success,
            lag=lag,
        )
        write_atomic(path, text)
    except Exception as exc:
        log.warning("could not write the metrics file %s: %s", path, exc)


def _lag(
    report: RunReport | None, exit_code: int, settings: Settings | None, measure: bool
) -> dict[int, int] | None:
    """Lag of every partition: measured after a good run; else what the report knows (every partition
    of the topic, when the run got as far as reading the end offsets)."""
    if measure and exit_code == 0 and settings is not None and not settings.dry_run:
        try:
            from etl.lag import lag_now

            return lag_now(settings)
        except Exception as exc:  # lag is informative; the report's partial view will do
            log.debug("could not measure lag for the metrics file: %s", exc)
    if report is None:
        return None
    known = {p: r.lag for p, r in report.partitions.items() if r.lag is not None}
    return known or None


def _status(report: RunReport | None, exit_code: int) -> str:
    if report is None:
        return "config_error" if exit_code == 3 else ("interrupted" if exit_code == 130 else "failed")
    if report.status == "running":  # failed before the report was finished
        return "failed"
    return report.status


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), value)


def _number(value: Any) -> str:
    number = float(value)
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "+Inf" if number > 0 else "-Inf"
    return str(int(number)) if number.is_integer() and abs(number) < 2**53 else repr(number)
