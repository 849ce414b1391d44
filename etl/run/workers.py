"""Several members of the consumer group in parallel processes, one report.

One Python process decodes, parses and validates on one core. ``run_parallel`` forks ``workers``
processes, each an ordinary run: its own consumer in the group (Kafka shares the partitions out),
its own transactions and ``etl_runs`` row. Exactly-once holds between them as between any concurrent
runs: each cycle's conditional offset advance decides. The parent only forwards signals, holds the
``--lock`` and merges the reports.

Signals: the workers ignore SIGINT (a terminal sends Ctrl-C to the whole process group) and take
their orders from the parent: SIGTERM finishes the cycle and stops, SIGUSR1 interrupts at once.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import threading
import traceback
import uuid
from contextlib import ExitStack, suppress
from datetime import UTC, datetime
from multiprocessing.connection import Connection, wait
from typing import Any, cast

from etl.config import Settings
from etl.errors import EtlError, ExitCode, Interrupted, LockHeld, exit_code_of, urgency
from etl.report import PartitionReport, RunReport

log = logging.getLogger(__name__)


class WorkerFailed(EtlError):
    """A worker failed; carries its exit code, message and hint."""

    def __init__(self, message: str, exit_code: int, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.exit_code = ExitCode(exit_code)


def share(total: int | None, workers: int, index: int) -> int | None:
    """Worker ``index``'s part of a message cap: the total split as evenly as it goes."""
    if total is None:
        return None
    return total // workers + (1 if index < total % workers else 0)


def run_parallel(settings: Settings, *, stop: threading.Event | None = None) -> RunReport:
    """Run ``settings.workers`` group members in forked processes; the merged report.

    Raises :class:`WorkerFailed` (with the most urgent worker's exit code) if any worker failed,
    after every worker has ended; the merged partial report is on ``exc.report``.
    """
    from etl.db import store

    stop = stop or threading.Event()
    n = settings.workers
    started = datetime.now(UTC)
    with ExitStack() as stack:
        if settings.lock and not settings.dry_run:
            # Taken before forking: a worker inherits the connection's socket but never uses it,
            # and leaves through os._exit, so nothing of it is closed or written by a worker.
            engine = store.make_engine(settings, application_name="metric-etl run (workers)")
            stack.callback(engine.dispose)
            try:
                stack.enter_context(store.advisory_lock(engine, settings))
            except LockHeld as exc:
                skipped = RunReport(
                    run_id=uuid.uuid4().hex[:16],
                    topic=settings.topic,
                    group_id=settings.group_id,
                    started_at=started,
                    finished_at=datetime.now(UTC),
                    status="skipped",
                    stop_reason="lock_held",
                    config_file=_config_file(settings),
                )
                raise _with_report(exc, skipped) from None
        _preload()
        ctx = multiprocessing.get_context("fork")
        procs: list[tuple[Any, Connection]] = []
        try:
            for i in range(n):
                mine = dataclasses.replace(
                    settings, workers=1, lock=False, max_messages=share(settings.max_messages, n, i)
                )
                if mine.max_messages == 0:
                    continue
                receiver, sender = ctx.Pipe(duplex=False)
                proc = ctx.Process(
                    target=_worker, args=(mine, i + 1, sender), name=f"metric-etl worker {i + 1}"
                )
                proc.start()
                sender.close()
                procs.append((proc, receiver))
            outcomes = _wait(procs, stop)
        finally:
            for proc, _ in procs:
                if proc.is_alive():  # only after an error in this process: never leave one behind
                    proc.terminate()
                proc.join(5)
    return merge(settings, started, outcomes)


def _preload() -> None:
    """Import the heavy modules once, before forking: each worker starts with them loaded."""
    import importlib

    heavy = ("kafka", "etl.normalise", "etl.validate", "etl.typed", "etl.kafka.source", "etl.run.pipeline")
    for name in heavy:
        importlib.import_module(name)


def _wait(procs: list[tuple[Any, Connection]], stop: threading.Event) -> list[dict[str, Any]]:
    """Each worker's outcome, forwarding a stop request (SIGTERM) and an interrupt (SIGUSR1)."""
    outcomes: dict[int, dict[str, Any]] = {}
    forwarded = False
    interrupted = False
    pending = {receiver: i for i, (_, receiver) in enumerate(procs)}
    while pending:
        try:
            if stop.is_set() and not forwarded:
                forwarded = True
                _signal_all(procs, signal.SIGTERM)
            for ready in wait(list(pending), timeout=0.2):
                receiver = cast(Connection, ready)  # wait() returns the objects it was given
                i = pending.pop(receiver)
                try:
                    outcomes[i] = receiver.recv()
                except EOFError:  # died without a word: killed, or out of memory
                    procs[i][0].join()
                    outcomes[i] = {
                        "kind": "error",
                        "code": int(ExitCode.UNEXPECTED),
                        "message": f"worker {i + 1} died (exit status {procs[i][0].exitcode})",
                        "hint": "see the log above; the offsets it had not committed are read again",
                        "report": None,
                    }
        except KeyboardInterrupt:  # a second Ctrl-C: interrupt the workers too, then report it
            interrupted = True
            _signal_all(procs, signal.SIGUSR1)
    if interrupted:
        raise KeyboardInterrupt
    return [outcomes[i] for i in sorted(outcomes)]


def _signal_all(procs: list[tuple[Any, Connection]], signum: int) -> None:
    for proc, _ in procs:
        if proc.is_alive() and proc.pid is not None:
            with suppress(ProcessLookupError):  # ended meanwhile
                os.kill(proc.pid, signum)


def _worker(settings: Settings, number: int, sender: Connection) -> None:
    """One group member: an ordinary run; its outcome goes back to the parent through ``sender``."""
    from etl.run.pipeline import Pipeline  # not run_batch: see etl.run.quick_gil_handover

    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerTag(number))

    stop = threading.Event()

    def on_term(signum: int, frame: Any) -> None:
        stop.set()

    def on_interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGUSR1, on_interrupt)
    outcome: dict[str, Any]
    try:
        outcome = {"kind": "ok", "report": Pipeline(settings, stop=stop).run()}
    except KeyboardInterrupt:
        outcome = {"kind": "interrupted", "report": None}
    except EtlError as exc:
        outcome = {
            "kind": "error",
            "code": int(exit_code_of(exc)),
            "message": str(exc),
            "hint": exc.hint,
            "report": getattr(exc, "report", None),
        }
    except BaseException as exc:
        outcome = {
            "kind": "error",
            "code": int(exit_code_of(exc)),
            "message": traceback.format_exc(limit=8).strip(),
            "hint": "",
            "report": None,
        }
    sender.send(outcome)
    sender.close()


class _WorkerTag(logging.Filter):
    """Starts each log line of a worker with ``worker N:`` (and sets ``worker`` for JSON logs)."""

    def __init__(self, number: int) -> None:
        super().__init__()
        self.number = number

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "worker", None) is None:
            record.worker = self.number
            record.msg = f"worker {self.number}: {record.msg}"
        return True


def merge(settings: Settings, started: datetime, outcomes: list[dict[str, Any]]) -> RunReport:
    """One report of the workers' reports; raises WorkerFailed/KeyboardInterrupt for failures."""
    reports: list[RunReport] = [o["report"] for o in outcomes if o.get("report") is not None]
    merged = RunReport(
        run_id=uuid.uuid4().hex[:16],
        topic=settings.topic,
        group_id=settings.group_id,
        started_at=min([started, *(r.started_at for r in reports)]),
        dry_run=settings.dry_run,
        workers=[r.run_id for r in reports],
        config_file=_config_file(settings),
    )
    for r in reports:
        for name in (
            "cycles",
            "empty_polls",
            "read",
            "loaded",
            "rejected",
            "duplicates",
            "lost_to_retention",
            "default_partition",
            "conflicts",
            "committed_cycles",
        ):
            setattr(merged, name, getattr(merged, name) + getattr(r, name))
        for stage, seconds in r.timings.items():
            merged.add_time(stage, seconds)
        for rule, count in r.rejects_by_rule.items():
            merged.rejects_by_rule[rule] = merged.rejects_by_rule.get(rule, 0) + count
        for p, pr in r.partitions.items():
            merged.partitions[p] = _merge_partition(merged.partitions.get(p), pr)
    merged.finished_at = datetime.now(UTC)
    # A worker the group gave no partition (more workers than partitions) says nothing of the run.
    reasons = {r.stop_reason for r in reports if r.stop_reason != "no_partitions"} or {
        r.stop_reason for r in reports
    }
    merged.stop_reason = ", ".join(sorted(filter(None, reasons))) or None
    failures = [o for o in outcomes if o["kind"] != "ok"]
    if any(o["kind"] == "interrupted" for o in failures):  # SIGUSR1 from a second Ctrl-C
        raise KeyboardInterrupt
    stopped = [o for o in failures if o["code"] == ExitCode.INTERRUPTED]
    if stopped and len(stopped) == len(failures) and merged.committed_cycles:
        # Stopped by a signal before its first commit while others committed: the run as a
        # whole stopped on the signal, as one process would have after its last cycle.
        failures = []
        merged.stop_reason = "signal"
    elif stopped and len(stopped) == len(failures):
        merged.status = "interrupted"
        raise _with_report(Interrupted("interrupted before any cycle committed"), merged)
    if failures:
        worst = min(failures, key=lambda o: urgency(o["code"]))
        merged.status = next((r.status for r in reports if r.status not in ("ok", "dry_run")), "failed")
        merged.error = worst["message"]
        others = f" ({len(failures) - 1} more workers failed)" if len(failures) > 1 else ""
        raise _with_report(WorkerFailed(worst["message"] + others, worst["code"], worst["hint"]), merged)
    merged.status = "dry_run" if settings.dry_run else "ok"
    return merged


def _merge_partition(a: PartitionReport | None, b: PartitionReport) -> PartitionReport:
    """A partition as two workers saw it (read by both in turn, or by one while the other saw it held):
    the span of both."""
    if a is None:
        return dataclasses.replace(b)
    starts = [s for s in (a.start, b.start) if s is not None]
    ends = [e for e in (a.end, b.end) if e is not None]
    end_offsets = [e for e in (a.end_offset, b.end_offset) if e is not None]
    stored = [o for o in (a.stored, b.stored) if o is not None]
    assigned = a.assigned or b.assigned  # a worker held it: the run read it
    return PartitionReport(
        b.partition,
        start=min(starts) if starts else None,
        end=max(ends) if ends else None,
        end_offset=max(end_offsets) if end_offsets else None,
        end_offset_at="start" if "start" in (a.end_offset_at, b.end_offset_at) else "end",
        read=a.read + b.read,
        lost=a.lost + b.lost,
        stored=max(stored) if stored else None,
        log_start=a.log_start if a.log_start is not None else b.log_start,
        assigned=assigned,
        held_by=None if assigned else (b.held_by or a.held_by),
    )


def _with_report(exc: EtlError, report: RunReport) -> EtlError:
    exc.report = report  # type: ignore[attr-defined]
    return exc


def _config_file(settings: Settings) -> str | None:
    from pathlib import Path

    return str(Path(settings.config_file).resolve()) if settings.config_file else None
