"""CPU per message of each stage of a cycle, one after the other in one thread: read, decode, validate,
encode, COPY.

    python bench/stage_cpu.py CHECKOUT TOPIC SCHEMA [--limit N] [--batch 40000]

Run by bench/cpu.py with each checkout's own interpreter (the baseline's and the current one), so both
are measured with the same code on the same topic. ``CHECKOUT`` goes first on ``sys.path``; the stack's
environment (``METRIC_ETL_BOOTSTRAP_SERVERS``, ``METRIC_ETL_DB_URL``, ``METRIC_ETL_DB_PASSWORD``) says
where Kafka and PostgreSQL are. Prints one JSON object: microseconds of CPU (user + system of this
process, ``time.process_time``) per message read, for each stage.

- read: a consumer with the checkout's fast record reader drains the topic from the start (the run's
  fetch settings), and the records become the checkout's ``RawMessage`` tuples, the garbage collector
  paused as the job's poll pauses it;
- decode: the checkout's decoding of a batch (``etl.normalise.normalise``);
- validate: ``etl.validate.validate``; where the checkout has ``etl.typed.split``, which does both at
  once, its CPU is shared between decode and validate in the proportion split's own clock gives;
- encode: the good rows as the binary COPY body (``etl.db.copy.stream``), as ``insert_good`` prepares
  them;
- COPY: the client's side of ``COPY ... FROM STDIN (FORMAT binary)`` of that body into a fresh metrics
  table (psycopg2 sending it; the server's CPU is not counted).

The stages after the read run under the checkout's own garbage-collector policy for a run's cycles
(``etl.run.collector.Collector`` where it exists; a full collection every 16 batches).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkout", type=Path)
    ap.add_argument("topic")
    ap.add_argument("schema")
    ap.add_argument("--limit", type=int, help="read at most about this many messages (default: all)")
    ap.add_argument("--batch", type=int, default=40_000, help="messages per cycle (the run's default)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(args.checkout.resolve()))

    from kafka import KafkaConsumer, TopicPartition

    from etl.kafka.fast_records import install_fast_records
    from etl.kafka.source import raw_messages

    cpu: dict[str, float] = dict.fromkeys(("read", "decode", "validate", "encode", "copy"), 0.0)
    clock = time.process_time
    collector = _collector()
    collector.__enter__()
    gc.disable()  # as the job's poll does (etl.normalise.paused_gc)
    start = clock()
    consumer = KafkaConsumer(
        bootstrap_servers=os.environ["METRIC_ETL_BOOTSTRAP_SERVERS"].split(","),
        enable_auto_commit=False,
        isolation_level="read_committed",
        max_partition_fetch_bytes=4 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    tps = [TopicPartition(args.topic, p) for p in sorted(consumer.partitions_for_topic(args.topic) or ())]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    install_fast_records(consumer)
    ends = consumer.end_offsets(tps)
    total = min(sum(ends.values()), args.limit or sum(ends.values()))
    messages: list[Any] = []
    while len(messages) < total:
        batch = consumer.poll(timeout_ms=1000, max_records=args.batch)
        messages.extend(raw_messages(batch))
    cpu["read"] = clock() - start
    consumer.close()
    del messages[total:]
    gc.enable()
    collector.__exit__(None, None, None)
    # The messages read stay out of the collector's sight (a run holds one batch, not all of them);
    # the rest runs as the checkout's run has it.
    gc.freeze()
    collector.__enter__()
    tick = getattr(collector, "cycle", lambda: None)

    decode = _decoder()
    split = _splitter()
    from sqlalchemy import create_engine

    from etl.contract import METRIC_COLUMNS
    from etl.db.copy import CopyStream, run_copy, stream, times_as_micros
    from etl.db.schema import build_tables, ddl
    from etl.validate import validate

    url = os.environ["METRIC_ETL_DB_URL"].replace("postgresql://", "postgresql+psycopg2://", 1)
    engine = create_engine(url, connect_args=_password())
    tables = build_tables(args.schema)
    with engine.begin() as conn:
        conn.exec_driver_sql(ddl(tables))
    table = tables.metrics
    types = [table.c[c].type for c in METRIC_COLUMNS]
    try:
        for i in range(0, len(messages), args.batch):
            chunk = messages[i : i + args.batch]
            t0 = clock()
            tick()
            if split is not None:  # decoding and checking interleave: split's own split of its time
                seconds: dict[str, float] = {}
                good, _rejects = split(chunk, seconds=seconds)
                t2 = clock()
                t1 = t0 + (t2 - t0) * seconds.get("normalise", 0.0) / max(sum(seconds.values()), 1e-9)
            else:
                frame = decode(chunk)
                t1 = clock()
                good, _rejects = validate(frame)
                t2 = clock()
            rows = good.assign(run_id="bench", incarnation=0)[list(METRIC_COLUMNS)]
            pieces = stream(times_as_micros(rows), types)
            if pieces is None:
                raise RuntimeError("the good rows have no binary COPY form")
            body = list(pieces)
            t3 = clock()
            with engine.begin() as conn:
                run_copy(conn, table, list(METRIC_COLUMNS), CopyStream(iter(body)), " (FORMAT binary)")
            t4 = clock()
            cpu["decode"] += t1 - t0
            cpu["validate"] += t2 - t1
            cpu["encode"] += t3 - t2
            cpu["copy"] += t4 - t3
    finally:
        collector.__exit__(None, None, None)
        gc.unfreeze()
        with engine.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{args.schema}" CASCADE')
        engine.dispose()
    n = len(messages)
    out = {"messages": n, **{k: round(v / n * 1e6, 3) for k, v in cpu.items()}}
    out["total"] = round(sum(v for k, v in out.items() if k != "messages"), 3)
    print(json.dumps(out))
    return 0


def _decoder() -> Any:
    """The checkout's batch decoder: raw messages -> the frame validation takes."""
    try:
        from etl.decode import decode  # type: ignore[import-not-found]
    except ImportError:
        from etl.normalise import normalise as decode
    return decode


def _splitter() -> Any:
    """The checkout's whole transform (``etl.typed.split``: messages -> good rows and rejects), where it
    has one; the CPU is shared between decode and validate as split times its two stages."""
    try:
        from etl.typed import split  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    return split


def _collector() -> Any:
    """The checkout's garbage collector policy for a run's cycles, where it has one."""
    try:
        from etl.run.collector import Collector  # type: ignore[import-not-found]
    except ImportError:
        return contextlib.nullcontext()
    return Collector()


def _password() -> dict[str, str]:
    password = os.environ.get("METRIC_ETL_DB_PASSWORD")
    return {"password": password} if password else {}


if __name__ == "__main__":
    sys.exit(main())
