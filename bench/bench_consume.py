"""CPU time of reading a topic as ``KafkaSource.poll`` does: kafka-python's poll plus RawMessage.

    .venv/bin/python bench/bench_consume.py TOPIC -n 1000000
    .venv/bin/python bench/bench_consume.py TOPIC -n 1000000 --config '{"check_crcs": false}'

No group and no database: a consumer assigned every partition from the beginning, batches of
50,000 records built the way ``etl.source`` builds them (collector paused, one batch kept alive, as a
cycle keeps it). Prints wall and CPU seconds once connected, as JSON. Run variants in
alternation (a shell loop) and compare medians; CPU time varies less than wall time on a busy host.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import kafka

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import Stack

from etl import records
from etl.normalise import RawMessage, paused_gc
from etl.source import raw_messages


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("topic")
    ap.add_argument("-n", "--messages", type=int, default=1_000_000)
    ap.add_argument("--config", default="{}", help="extra KafkaConsumer settings, as JSON")
    ap.add_argument(
        "--stock", action="store_true", help="kafka-python's own record decoding (no etl.records)"
    )
    args = ap.parse_args(argv)
    config = {"max_partition_fetch_bytes": 1 << 20, **json.loads(args.config)}
    consumer = kafka.KafkaConsumer(
        args.topic,
        bootstrap_servers=Stack.from_env().bootstrap.split(","),
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **config,
    )
    if not args.stock:
        records.install(consumer)
    consumer.topics()  # connected before the clock starts
    got, started, cpu = 0, time.perf_counter(), time.process_time()
    kept: list[RawMessage] = []
    while got < args.messages:
        out: list[RawMessage] = []
        with paused_gc():
            while len(out) < 50_000 and got + len(out) < args.messages:
                batch = consumer.poll(timeout_ms=1000, max_records=50_000 - len(out))
                out.extend(raw_messages(batch))
        got += len(out)
        kept = out
    del kept
    consumer.close()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    print(
        json.dumps(
            {
                "stock": args.stock,
                "messages": got,
                "config": config,
                "wall_s": round(wall, 3),
                "cpu_s": round(cpu, 3),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
