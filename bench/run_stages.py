"""The CPU a real run spends in each stage, counted exactly rather than sampled.

    .venv/bin/python bench/run_stages.py -- run --output json -q

Runs the CLI in this process (the environment says which topic, group and schema), with the functions
of each stage wrapped to add up the CPU time of the thread that calls them (``time.thread_time``), and
a thread reading each thread's CPU from ``/proc/self/task`` (Linux) for the threads no stage covers:
kafka-python's IO thread, and the start-up and bookkeeping of the main thread. Prints a table to
stderr after the run, seconds and microseconds a message read:

- poll: ``KafkaSource.poll`` (kafka-python's poll, the record reading), main thread;
- split: ``etl.typed.split`` (decoding and every rule), main thread;
- made ahead: ``etl.db.write.made_ahead`` (the COPY body and the rollups' aggregates, made while the
  cycle before loads), main thread;
- load: ``etl.db.write.load_cycle`` (one cycle's transaction), a load thread; within it the COPY
  through ``DataFrame.to_sql`` (and within that pandas' own conversion, ``SQLTable.insert_data``),
  the rollups, the rejects and the lookup of stored messages.

``bench/stage_cpu.py`` measures the stages one after the other in one thread on the same messages;
this one sees what a run adds around them (the threads, the rollups, pandas' conversion, imports).
"""

from __future__ import annotations

import collections
import functools
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (label, module, attribute path, the label it is part of)
STAGES = (
    ("poll", "etl.kafka.source", "KafkaSource.poll", None),
    ("split", "etl.typed", "split", None),
    ("made ahead", "etl.db.write", "made_ahead", None),
    ("  COPY body", "etl.db.copy", "body", "made ahead"),
    ("  rollups' aggregates", "etl.db.rollups", "aggregate", "made ahead"),
    ("load", "etl.db.write", "load_cycle", None),
    ("  COPY via to_sql", "etl.db.copy", "to_sql", "load"),
    ("    pandas' insert_data", "pandas.io.sql", "SQLTable.insert_data", "  COPY via to_sql"),
    ("  rollups", "etl.db.rollups", "upsert", "load"),
    ("  rejects", "etl.db.write", "insert_rejects", "load"),
    ("  stored lookup", "etl.db.write", "without_stored", "load"),
)


def _wrap(spent: collections.Counter[str], label: str, func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.thread_time()
        try:
            return func(*args, **kwargs)
        finally:
            spent[label] += time.thread_time() - start

    return wrapper


def _install(spent: collections.Counter[str]) -> None:
    import importlib

    for label, module_name, path, _ in STAGES:
        owner: Any = importlib.import_module(module_name)
        *parents, name = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        setattr(owner, name, _wrap(spent, label, getattr(owner, name)))


def _threads(seen: dict[str, tuple[str, float]], done: threading.Event) -> None:
    """Each thread's CPU seconds (user + system), by thread id, until ``done``."""
    tick = os.sysconf("SC_CLK_TCK")
    while not done.wait(0.05):
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/self/task/{tid}/comm") as f:
                    name = f.read().strip()
            except OSError:  # ended meanwhile
                continue
            seen[tid] = (name, (int(fields[11]) + int(fields[12])) / tick)


def main(argv: list[str]) -> int:
    cli = [a for a in argv if a != "--"] or ["run", "--output", "json", "-q"]
    spent: collections.Counter[str] = collections.Counter()
    _install(spent)
    seen: dict[str, tuple[str, float]] = {}
    done = threading.Event()
    watcher = threading.Thread(target=_threads, args=(seen, done), name="cpu-watch", daemon=True)
    watcher.start()
    reports: list[Any] = []  # the run's report, for its read count
    import etl.run

    run_batch = etl.run.run_batch

    def keep(*args: Any, **kwargs: Any) -> Any:
        reports.append(run_batch(*args, **kwargs))
        return reports[-1]

    etl.run.run_batch = keep  # the CLI imports it from etl.run when it runs
    from etl.cli import main as etl_main

    try:
        etl_main(cli, standalone_mode=False)
    finally:
        done.set()
        watcher.join()
        cpu = time.process_time()
        read = reports[-1].read if reports else 0
        per = 1e6 / read if read else 0.0
        print(f"\n{read:,} messages; process CPU {cpu:.2f} s", file=sys.stderr)
        print(f"{'stage':26s} {'s':>7s} {'us/msg':>7s}", file=sys.stderr)
        for label, *_ in STAGES:
            print(f"{label:26s} {spent[label]:7.2f} {spent[label] * per:7.2f}", file=sys.stderr)
        top = sum(spent[label] for label, *_, parent in STAGES if parent is None)
        print(f"{'the rest':26s} {cpu - top:7.2f} {(cpu - top) * per:7.2f}", file=sys.stderr)
        # Threads by CPU (the OS knows them all as "python"): the main thread first, then
        # kafka-python's IO thread; a load thread lives one cycle (the last reading of each counts).
        mine = str(watcher.native_id)  # the watcher itself
        threads = sorted(((seconds, tid) for tid, (_, seconds) in seen.items() if tid != mine), reverse=True)
        for rank, (seconds, _tid) in enumerate(threads[:2]):
            print(f"  thread #{rank + 1} by CPU        {seconds:7.2f}", file=sys.stderr)
        rest = sum(seconds for seconds, _ in threads[2:])
        print(f"  {len(threads[2:])} other threads         {rest:7.2f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
