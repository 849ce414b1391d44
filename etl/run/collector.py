"""CPython's cyclic garbage collector during a run: off in the cycles, a full collection every few.

A cycle holds tens of thousands of container objects alive at once (the records, their parsed
objects, the frames' object columns), on two threads. The collector, triggered by allocations,
walks them and every module's objects again and again: measured side by side on 200,000 messages,
2.51 s of CPU with it and 2.26 s without (1.2 us a message, medians of 3). Everything a cycle makes
is freed by reference counting as soon as the cycle lets go of it; only reference cycles need the
collector, and a full collection every :data:`COLLECT_EVERY` cycles frees those, so a run that
follows the topic for days holds at most that many cycles' cyclic garbage.

:func:`etl.run.run_batch` turns it off for the whole run, imports included; :class:`etl.run.pipeline.
Pipeline` collects every few cycles (forked workers too). Both hand it back as they found it.
"""

from __future__ import annotations

import gc
from types import TracebackType
from typing import Final

COLLECT_EVERY: Final = 16  # cycles (polls) between two full collections


class Collector:
    """``with Collector() as c:`` turns automatic collection off; ``c.cycle()`` after each poll."""

    def __init__(self, every: int = COLLECT_EVERY) -> None:
        self.every = every
        self.cycles = 0
        self._was_enabled = False

    def __enter__(self) -> Collector:
        self._was_enabled = gc.isenabled()
        gc.disable()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._was_enabled:
            gc.enable()

    def cycle(self) -> None:
        """One more cycle done: every ``every``-th collects everything, cycles included."""
        self.cycles += 1
        if self.cycles % self.every == 0:
            gc.collect()
