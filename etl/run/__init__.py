"""A run: drain the topic as the settings say (:func:`run_batch`), in one process or several.

:mod:`etl.run.pipeline` is the loop of one process, :mod:`etl.run.loader` its load thread,
:mod:`etl.run.book` the offset book of the exactly-once protocol; :mod:`etl.run.workers` forks
several runs and merges their reports.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from etl.config import Settings
    from etl.report import RunReport

SWITCH_INTERVAL_S = 0.001  # CPython's default is 0.005


def run_batch(
    settings: Settings,
    *,
    stop: threading.Event | None = None,
    on_cycle: Callable[[RunReport], None] | None = None,
) -> RunReport:
    """Drain the topic as the settings say and return the report.

    With ``settings.workers`` above 1 the run forks that many processes (see :mod:`etl.run.workers`),
    ``on_cycle`` is not called and the report is theirs merged.
    Raises an :class:`~etl.errors.EtlError` on failure; the partial report is on ``exc.report``.
    """
    from etl.run.collector import Collector

    # From here: the imports a run makes (SQLAlchemy, kafka-python, pandas) build many objects, and
    # the cyclic collector walked them over and over (0.05 s of a caught-up run's 0.45 s).
    with Collector():
        if settings.workers > 1:
            from etl.run.workers import run_parallel

            return run_parallel(settings, stop=stop)
        from etl.run.pipeline import Pipeline

        with quick_gil_handover():
            return Pipeline(settings, stop=stop, on_cycle=on_cycle).run()


@contextlib.contextmanager
def quick_gil_handover() -> Iterator[None]:
    """Let a thread waiting for the GIL take it after 1 ms instead of 5 ms, then restore the setting.

    The load thread mostly waits on PostgreSQL with the GIL released, and each time a reply comes it
    needs the GIL back from the thread parsing the next batch. At CPython's 5 ms it queues for it
    several times a cycle, and the load of each cycle is what the run waits for. Side by side on 1M
    messages (``bench/compare.py``, medians of 5): 28.1 s at 5 ms, 25.1 s at 1 ms. Worker processes
    keep 5 ms: with one per core the cores are busy anyway, and the extra handovers cost CPU (20.4 s
    against 22.3 s, medians of 3). The setting is process-wide, so a lower one already in place is
    kept and the previous value comes back on exit.
    """
    before = sys.getswitchinterval()
    if before <= SWITCH_INTERVAL_S:
        yield
        return
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        yield
    finally:
        sys.setswitchinterval(before)
