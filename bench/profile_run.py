"""Where a run's CPU goes: ``metric-etl run`` under a sampling profiler that sees every thread.

    .venv/bin/python bench/profile_run.py [--interval-ms 1] [--top 40] -- run --output json -q

Runs the CLI in this process (the environment says which topic, group and schema) while a thread takes
every thread's Python stack each interval. A thread waiting (on a lock, a socket, a sleep: its
innermost Python frame is one of :data:`IDLE`) is not counted, so the shares are of busy samples,
split by thread and by the innermost frame of the package (``etl/``) or, inside it, of a library.
cProfile sees the main thread only and slows the Python loops it measures far more than the C code,
which is why this exists. Prints the tables to stderr after the run.
"""

from __future__ import annotations

import argparse
import collections
import sys
import threading
import time
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# innermost functions of a thread that waits, not computes
IDLE = {"wait", "select", "poll", "_poll", "acquire", "sleep", "recv_into", "recv", "accept"}
IDLE.add("_wait_for_tstate_lock")


def _where(frame: FrameType | None) -> tuple[str, str]:
    """(innermost frame, innermost frame of the package) of a stack."""
    leaf = f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}" if frame else "?"
    own = "-"
    while frame is not None:
        name = frame.f_code.co_filename
        if "/etl/" in name:
            own = f"{name.split('/etl/')[-1]}:{frame.f_code.co_name}"
            break
        frame = frame.f_back
    return leaf, own


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--interval-ms", type=float, default=1.0)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("cli", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    cli = [a for a in args.cli if a != "--"]

    samples: collections.Counter[tuple[str, str, str]] = collections.Counter()
    done = threading.Event()

    def sample() -> None:
        me = threading.get_ident()
        names = {}
        while not done.wait(args.interval_ms / 1000):
            names.update({t.ident: t.name for t in threading.enumerate()})
            for ident, frame in sys._current_frames().items():
                if ident == me or frame.f_code.co_name in IDLE:
                    continue
                leaf, own = _where(frame)
                samples[(names.get(ident, str(ident)), own, leaf)] += 1

    sampler = threading.Thread(target=sample, name="sampler", daemon=True)
    sampler.start()
    from etl.cli import main as etl_main

    start = time.process_time()
    try:
        etl_main(cli, standalone_mode=False)
    finally:
        done.set()
        sampler.join()
        cpu = time.process_time() - start
        total = sum(samples.values()) or 1
        by_own: collections.Counter[tuple[str, str]] = collections.Counter()
        for (thread, own, _leaf), n in samples.items():
            by_own[(thread, own)] += n
        print(f"\nprocess CPU {cpu:.2f} s; {total} busy samples", file=sys.stderr)
        for (thread, own), n in by_own.most_common(args.top):
            print(f"{n / total:6.1%}  {thread:12.12}  {own}", file=sys.stderr)
        print("\ninnermost frames:", file=sys.stderr)
        for (thread, own, leaf), n in samples.most_common(args.top):
            print(f"{n / total:6.1%}  {thread:12.12}  {own}  <- {leaf}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
