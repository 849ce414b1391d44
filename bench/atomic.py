"""``metric-etl run --atomic`` against the default run, side by side on one backlog.

    make bench                                        # 500,000 messages, 3 repeats each
    .venv/bin/python bench/atomic.py -n 100000 --repeat 2

An atomic run writes every cycle into one open transaction and commits once at the end; the default
run commits each cycle. Both drain the same topic (``bench/run.py``'s sample messages, 1% corrupted,
produced with kcat) into a fresh schema with a fresh group, in rotating order, and are checked
(status ok, read N, loaded + rejected = N in the tables). Reported: the medians of wall time and of
peak RSS (``os.wait4``) of each, and atomic over default for both. Targets: wall within 1.2x, peak
RSS within 10% (memory stays bounded by one cycle: nothing piles up in Python).

Writes ``<out-dir>/atomic.json`` and ``<out-dir>/atomic.md`` (default bench/results).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import REPO, Bench, Run, Stack, delete_topics, ensure_tools, git_commit, make_topic

WALL_TARGET = 1.2
RSS_TARGET = 1.10


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--messages", type=int, default=500_000, help="backlog (default 500,000)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each; medians are quoted")
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    stack = Stack.from_env()
    ensure_tools()
    label = uuid.uuid4().hex[:6]
    workdir = Path(tempfile.mkdtemp(prefix="metric-etl-bench-atomic-"))
    bench = Bench(stack, workdir, label)
    t0 = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {message}", file=sys.stderr, flush=True)

    topic = make_topic(stack, f"bench-{label}-atomic", args.messages, 0.01, args.partitions, workdir)
    log(f"topic {topic.name}: {args.messages:,} messages")
    contenders = [("default", ()), ("atomic", ("--atomic",))]
    runs: dict[str, list[Run]] = {name: [] for name, _ in contenders}
    try:
        for i in range(args.repeat):
            for name, extra in contenders[i % 2 :] + contenders[: i % 2]:
                run = bench.etl(topic, *extra)
                runs[name].append(run)
                log(f"{i + 1}/{args.repeat} {name}: {run.wall_s:.2f}s, {run.peak_rss_mb:.0f} MB")
    finally:
        bench.cleanup()
        delete_topics(stack, [topic.name])
    result = summary(runs, args.messages)
    result |= {"commit": git_commit(), "at": datetime.now(UTC).isoformat(timespec="seconds")}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "atomic.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / "atomic.md").write_text(markdown(result))
    print(markdown(result))
    return 0 if result["wall_ok"] and result["rss_ok"] else 1


def summary(runs: dict[str, list[Run]], n: int) -> dict[str, Any]:
    med = {
        name: {
            "wall_s": round(statistics.median(r.wall_s for r in rs), 2),
            "peak_rss_mb": round(statistics.median(r.peak_rss_mb for r in rs), 1),
            "walls": [round(r.wall_s, 2) for r in rs],
            "cycles": rs[0].detail.get("cycles"),
        }
        for name, rs in runs.items()
    }
    wall = med["atomic"]["wall_s"] / med["default"]["wall_s"]
    rss = med["atomic"]["peak_rss_mb"] / med["default"]["peak_rss_mb"]
    return {
        "messages": n,
        "repeat": len(runs["default"]),
        "medians": med,
        "wall_ratio": round(wall, 3),
        "rss_ratio": round(rss, 3),
        "wall_ok": wall <= WALL_TARGET,
        "rss_ok": rss <= RSS_TARGET,
    }


def markdown(r: dict[str, Any]) -> str:
    d, a = r["medians"]["default"], r["medians"]["atomic"]
    return (
        f"# --atomic against the default run: {r['messages']:,} messages, medians of {r['repeat']}\n\n"
        "| run | wall s | peak RSS MB | cycles |\n|---|---:|---:|---:|\n"
        f"| default | {d['wall_s']} | {d['peak_rss_mb']} | {d['cycles']} |\n"
        f"| --atomic | {a['wall_s']} | {a['peak_rss_mb']} | {a['cycles']} |\n\n"
        f"atomic / default: wall {r['wall_ratio']}x (target <= {WALL_TARGET}x, "
        f"{'met' if r['wall_ok'] else 'MISSED'}), peak RSS {r['rss_ratio']}x "
        f"(target <= {RSS_TARGET}x, {'met' if r['rss_ok'] else 'MISSED'}). Commit {r['commit']}, {r['at']}.\n"
    )


if __name__ == "__main__":
    sys.exit(main())
