"""CPU time of reading a topic as ``KafkaSource.poll`` does: kafka-python's poll plus RawMessage.

    .venv/bin/python bench/bench_consume.py TOPIC -n 1000000            # etl's record decoding
    .venv/bin/python bench/bench_consume.py TOPIC -n 1000000 --stock    # kafka-python's own
    .venv/bin/python bench/bench_consume.py TOPIC -n 1000000 --compressed-stock  # compressed: its own
    .venv/bin/python bench/bench_consume.py TOPIC -n 1000000 --compare --runs 3
    .venv/bin/python bench/bench_consume.py TOPIC -n 1000000 --config '{"check_crcs": false}'

No group and no database: a consumer assigned every partition from the beginning, batches of
50,000 records built the way ``etl.kafka.source`` builds them (collector paused, one batch kept alive, as a
cycle keeps it). Prints wall and CPU seconds once connected, as JSON. ``--compare`` runs both
decodings in fresh processes, alternating (stock first), and prints each run and then the medians
side by side; CPU time varies less than wall time on a busy host.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import kafka

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import Stack

from etl.contract import RawMessage
from etl.kafka.fast_records import install_fast_records
from etl.kafka.source import raw_messages
from etl.normalise import paused_gc


def consume(topic: str, messages: int, config: dict, stock: bool, compressed_stock: bool = False) -> dict:
    """Read ``messages`` records of ``topic`` from the beginning; the timings, as a dict.

    ``compressed_stock``: etl's decoding, but compressed batches by kafka-python's (the fallback)."""
    consumer = kafka.KafkaConsumer(
        topic,
        bootstrap_servers=Stack.from_env().bootstrap.split(","),
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **config,
    )
    fast = False if stock else install_fast_records(consumer, compressed=not compressed_stock)
    if not stock and not fast:
        sys.exit(f"bench: kafka-python {kafka.__version__} is not one etl.kafka.fast_records supports")
    consumer.topics()  # connected before the clock starts
    got, started, cpu = 0, time.perf_counter(), time.process_time()
    kept: list[RawMessage] = []
    while got < messages:
        out: list[RawMessage] = []
        with paused_gc():
            while len(out) < 50_000 and got + len(out) < messages:
                batch = consumer.poll(timeout_ms=1000, max_records=50_000 - len(out))
                out.extend(raw_messages(batch))
        got += len(out)
        kept = out
    del kept
    consumer.close()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {
        "decoding": "stock" if stock else "etl, compressed by kafka-python" if compressed_stock else "etl",
        "messages": got,
        "config": config,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
    }


def compare(argv: list[str], runs: int) -> None:
    """``runs`` runs of each decoding in fresh processes, alternating; prints the medians."""
    results: dict[str, list[dict]] = {"stock": [], "etl": []}
    for i in range(runs):
        for name in ("stock", "etl"):
            extra = ["--stock"] if name == "stock" else []
            cmd = [sys.executable, __file__, *argv, *extra]
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
            print(f"run {i + 1} {line}", flush=True)
            results[name].append(json.loads(line.splitlines()[-1]))
    stock, fast = (
        {k: statistics.median(r[k] for r in results[name]) for k in ("wall_s", "cpu_s")}
        for name in ("stock", "etl")
    )
    n = results["stock"][0]["messages"]
    print(f"\nmedians of {runs} runs, {n:,} messages:")
    print(f"  {'decoding':<8} {'wall s':>8} {'cpu s':>8} {'cpu us/msg':>11}")
    for name, m in (("stock", stock), ("etl", fast)):
        print(f"  {name:<8} {m['wall_s']:>8.2f} {m['cpu_s']:>8.2f} {m['cpu_s'] / n * 1e6:>11.2f}")
    print(
        f"  speed-up: {stock['cpu_s'] / fast['cpu_s']:.1f}x CPU, {stock['wall_s'] / fast['wall_s']:.1f}x wall"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("topic")
    ap.add_argument("-n", "--messages", type=int, default=1_000_000)
    ap.add_argument("--config", default="{}", help="extra KafkaConsumer settings, as JSON")
    ap.add_argument("--stock", action="store_true", help="kafka-python's own record decoding")
    ap.add_argument(
        "--compressed-stock",
        action="store_true",
        help="etl's decoding, compressed batches by kafka-python's record reading (the fallback)",
    )
    ap.add_argument("--compare", action="store_true", help="stock and etl decoding, alternating")
    ap.add_argument("--runs", type=int, default=3, help="runs of each decoding with --compare")
    args = ap.parse_args(argv)
    if args.compare:
        passed = [args.topic, "-n", str(args.messages), "--config", args.config]
        compare(passed, args.runs)
        return 0
    config = {"max_partition_fetch_bytes": 1 << 20, **json.loads(args.config)}
    print(json.dumps(consume(args.topic, args.messages, config, args.stock, args.compressed_stock)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
