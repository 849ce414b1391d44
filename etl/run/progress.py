"""A progress bar on stderr for long interactive drains and backfills.

Only when stderr is a terminal and the report is text: never in cron logs, Airflow or JSON output.
It is driven by the pipeline's ``on_cycle`` callback (one redraw per cycle) and estimates the total
from the lag measured before the run. Log lines still appear: the bar clears its line before each
one and is redrawn at the next cycle.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from etl.config import Settings
    from etl.report import RunReport

CLEAR = "\r\x1b[K"  # carriage return, erase to the end of the line


class ProgressBar:
    """Call it with the run report after each cycle; :meth:`close` before printing anything else."""

    def __init__(self, stream: TextIO, total: int | None) -> None:
        self.stream = stream
        self.total = total if total else None
        self.started = time.monotonic()
        self.drawn = False
        self._filter = _ClearLine(self)
        self._watched: list[logging.Handler] = []

    def __call__(self, report: RunReport) -> None:
        if not self._watched:  # from the first draw on, a log line first erases the bar
            self._watched = list(logging.getLogger().handlers)
            for handler in self._watched:
                handler.addFilter(self._filter)
        self.stream.write(CLEAR + self.line(report, time.monotonic() - self.started))
        self.stream.flush()
        self.drawn = True

    def line(self, report: RunReport, elapsed: float) -> str:
        """One line: bar, share done, counts, messages/s and the time left (when the total is known)."""
        width = shutil.get_terminal_size((100, 20)).columns
        rate = report.read / elapsed if elapsed > 0 else 0.0
        counts = f"loaded {report.loaded:,} rejected {report.rejected:,}"
        if self.total and report.read <= self.total:
            share = report.read / self.total
            eta = (self.total - report.read) / rate if rate > 0 else None
            tail = (
                f" {share:4.0%} {report.read:,}/{self.total:,} msgs  {rate:,.0f} msg/s  "
                f"ETA {_clock(eta)}  {counts}"
            )
            room = max(width - len(tail) - 3, 10)
            done = int(room * share)
            return f"[{'#' * done}{'-' * (room - done)}]{tail}"[: width - 1]
        # No estimate (follow mode, or more to read than the lag said): counts and speed only.
        return f"{report.read:,} msgs  {rate:,.0f} msg/s  {counts}  {_clock(elapsed)} elapsed"[: width - 1]

    def clear(self) -> None:
        if self.drawn:
            self.stream.write(CLEAR)
            self.stream.flush()

    def close(self) -> None:
        """Erase the bar and stop watching the log handlers."""
        self.clear()
        self.drawn = False
        for handler in self._watched:
            handler.removeFilter(self._filter)
        self._watched = []


class _ClearLine(logging.Filter):
    """Erases the bar before a log line is written on the same terminal."""

    def __init__(self, bar: ProgressBar) -> None:
        super().__init__()
        self.bar = bar

    def filter(self, record: logging.LogRecord) -> bool:
        self.bar.clear()
        self.bar.drawn = False
        return True


def wanted(output: str, stream: TextIO | None = None) -> bool:
    """A bar only for people: text output and a terminal on stderr."""
    stream = stream or sys.stderr
    try:
        return output == "text" and stream.isatty()
    except (AttributeError, ValueError):  # closed or odd streams
        return False


def progress_for(settings: Settings, output: str, stream: TextIO | None = None) -> ProgressBar | None:
    """The bar for a run, or None when it is not wanted. Measures the lag for the estimate (a few
    hundred milliseconds; skipped quietly when Kafka or the tables are not there yet)."""
    stream = stream or sys.stderr
    if not wanted(output, stream):
        return None
    total: int | None = None
    if not settings.follow:
        try:
            from etl.lag import lag_now

            total = sum(lag_now(settings, timeout_s=3.0).values())
        except Exception:  # the estimate is a nicety; the run reports its own errors
            total = None
        if total is not None and settings.max_messages is not None:
            total = min(total, settings.max_messages)
    return ProgressBar(stream, total)


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
