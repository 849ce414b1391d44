"""A run keeps the cyclic garbage collector out of its cycles, yet frees reference cycles every few
cycles and hands the collector back as it found it (a library caller's process goes on after the run)."""

from __future__ import annotations

import gc
import weakref

from etl.run.collector import Collector


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_cycles_are_collected_every_few_cycles_only() -> None:
    assert gc.isenabled()
    with Collector(every=3) as collector:
        assert not gc.isenabled()
        node = _Node()
        gone = weakref.ref(node)
        del node
        collector.cycle()
        collector.cycle()
        assert gone() is not None  # no automatic collection in the cycles
        collector.cycle()
        assert gone() is None  # the third cycle collected it
    assert gc.isenabled()


def test_a_collector_left_off_by_the_caller_stays_off() -> None:
    gc.disable()
    try:
        with Collector():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
