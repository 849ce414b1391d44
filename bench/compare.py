"""Side by side: ``metric-etl run`` from several checkouts or settings on one topic, alternating.

    git worktree add /tmp/before HEAD~1
    .venv/bin/python bench/compare.py -t TOPIC -r 3 before=/tmp/before after=.
    .venv/bin/python bench/compare.py -t TOPIC 4MiB=. 1MiB=.:METRIC_ETL_MAX_PARTITION_FETCH_BYTES=1048576

Each variant is ``NAME=CHECKOUT[:VAR=VALUE[,VAR=VALUE...]]``: the job runs as ``python -m etl run`` with
that checkout first on ``PYTHONPATH`` and the extra environment, in a fresh schema and consumer group,
draining the existing TOPIC (make one with ``bench/run.py``'s helpers or ``kcat -P``). The order of the
variants rotates each repeat. Prints each run, then the medians: wall time, CPU seconds of the
process (steadier than wall time on a busy machine), peak RSS and the report's stage times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import Stack


def parse_variant(text: str) -> tuple[str, Path, dict[str, str]]:
    name, _, rest = text.partition("=")
    checkout, _, extra = rest.partition(":")
    env = dict(pair.split("=", 1) for pair in extra.split(",") if pair)
    return name, Path(checkout).resolve(), env


def run_once(stack: Stack, topic: str, checkout: Path, extra: dict[str, str]) -> dict[str, float]:
    """One drain of ``topic`` into a fresh schema; wall and CPU seconds, peak RSS, stage times."""
    schema = f"compare_{uuid.uuid4().hex[:8]}"
    env = stack.env(
        METRIC_ETL_TOPIC=topic,
        METRIC_ETL_GROUP_ID=schema,
        METRIC_ETL_DB_SCHEMA=schema,
        PYTHONPATH=str(checkout),
    )
    env.update(extra)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "etl", "run", "--output", "json", "-q"],
            env=env,
            cwd="/",  # no config file: built-in defaults and the environment only
            stdout=out,
            stderr=err,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        report = json.loads(out.read() or b"{}")
        failure = err.read().decode(errors="replace")[-2000:]
    stack.drop_schema(schema)
    if os.waitstatus_to_exitcode(status) != 0 or report.get("status") != "ok":
        raise RuntimeError(f"run failed: {failure}")
    return {
        "wall": wall,
        "cpu": usage.ru_utime + usage.ru_stime,
        "rss_mb": usage.ru_maxrss / 1024,
        "read": report["read"],
        "cycles": report["cycles"],
        **report["timings"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-t", "--topic", required=True)
    ap.add_argument("-r", "--repeat", type=int, default=2)
    ap.add_argument("variants", nargs="+", help="NAME=CHECKOUT[:VAR=VALUE,...]")
    args = ap.parse_args(argv)
    stack = Stack.from_env()
    variants = [parse_variant(v) for v in args.variants]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in variants}
    for i in range(args.repeat):
        for name, checkout, extra in variants[i % len(variants) :] + variants[: i % len(variants)]:
            run = run_once(stack, args.topic, checkout, extra)
            runs[name].append(run)
            shown = {k: round(v, 2) for k, v in run.items()}
            print(f"{i + 1}/{args.repeat} {name}: {shown}", flush=True)
    print()
    for name, results in runs.items():
        keys = [k for k in results[0] if all(k in r for r in results)]
        med = {k: round(statistics.median(r[k] for r in results), 2) for k in keys}
        print(f"{name}: {med['read'] / med['wall']:,.0f} msg/s, median {med}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
