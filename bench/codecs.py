"""Compressed topics: what each codec costs a run against uncompressed, and what reading decompressed
batches with etl.kafka.fast_records gains over kafka-python's own record reading.

    make bench                                        # runs this after bench/run.py
    .venv/bin/python bench/codecs.py                  # 200,000 messages, 3 repeats -> bench/results/codecs.*
    .venv/bin/python bench/codecs.py --smoke          # 10,000 messages, 1 repeat (checks it works)

Set-up: the same N sample messages (``etl.sample``, about 200 bytes, 1% corrupted) produced by kcat
(librdkafka) into one fresh topic per codec (none, gzip, snappy, lz4, zstd; ``kcat -z CODEC``, 1 MB
batches, 20 ms linger), N / partitions per partition.

Measured, each ``--repeat`` times in rotating order, medians quoted:

1. ``metric-etl run`` draining each topic (fresh group and schema, built-in defaults), checked
   (read N, N rows stored): wall time, msg/s, CPU seconds of the process (from wait4; steadier
   than wall time on a shared machine) and the time its report gives the consume stage.
2. Reading alone (bench/bench_consume.py: a consumer, no group, no database), CPU seconds, in fresh
   processes: etl's reader, which decompresses a batch with kafka-python's codec and reads its
   records with etl.kafka.fast_records, against the fallback that leaves compressed batches to kafka-python's
   per-record reading (what 5cc9f5c did).

Writes ``<out-dir>/codecs.json`` and ``<out-dir>/codecs.md`` (bench/results; bench/results/smoke with
``--smoke``). The topics and schemas it made are dropped.
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
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (
    BIN,
    KCAT_PRODUCE,
    REPO,
    Stack,
    Topic,
    delete_topics,
    end_offsets,
    ensure_tools,
    git_commit,
    machine,
    sample_messages,
    versions,
)

CODECS = ("none", "gzip", "snappy", "lz4", "zstd")
CONSUME = Path(__file__).resolve().parent / "bench_consume.py"


def make_codec_topic(
    stack: Stack, name: str, n: int, codec: str, partitions: int, workdir: Path
) -> tuple[Topic, float]:
    """``name`` filled by kcat with ``n`` sample messages in ``codec`` batches; (topic, producer s)."""
    from kafka.admin import KafkaAdminClient, NewTopic

    files = [workdir / f"{name}.{p}" for p in range(partitions)]
    outs = [f.open("wb") for f in files]
    payload = 0
    try:
        for i, value in enumerate(sample_messages(n, corrupt_ratio=0.01, seed=7)):
            payload += len(value)
            outs[i % partitions].write(value + b"\n")
    finally:
        for out in outs:
            out.close()
    admin = KafkaAdminClient(bootstrap_servers=stack.bootstrap.split(","), client_id="metric-etl-bench")
    try:
        admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        admin.close()
    start = time.perf_counter()
    producers = [
        subprocess.Popen(
            [*KCAT_PRODUCE, "-z", codec, "-b", stack.bootstrap, "-t", name, "-p", str(p), "-l", str(f)],
            stderr=subprocess.PIPE,
        )
        for p, f in enumerate(files)
    ]
    for proc in producers:
        _, err = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"kcat -P -z {codec} failed: {err.decode(errors='replace')}")
    produce_s = time.perf_counter() - start
    for f in files:
        f.unlink()
    if sum(end_offsets(stack, name).values()) != n:
        raise RuntimeError(f"topic {name} does not hold {n} messages")
    return Topic(name, n, 0.01, payload, produce_s), produce_s


def drain(stack: Stack, topic: Topic, workdir: Path) -> dict[str, float]:
    """``metric-etl run`` draining ``topic`` into a fresh schema and group: wall and CPU seconds of the
    process (CPU time moves less than wall time on a shared machine) and its consume stage."""
    schema = f"bench_codecs_{uuid.uuid4().hex[:8]}"
    env = stack.env(METRIC_ETL_TOPIC=topic.name, METRIC_ETL_GROUP_ID=schema, METRIC_ETL_DB_SCHEMA=schema)
    cwd = workdir / "cwd"  # no config file applies: built-in defaults, as bench/run.py runs it
    cwd.mkdir(exist_ok=True)
    try:
        with (workdir / f"{schema}.log").open("wb") as err:
            started = time.perf_counter()
            proc = subprocess.Popen(
                [str(BIN / "metric-etl"), "run", "--output", "json", "-q"],
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
                cwd=cwd,
            )
            assert proc.stdout is not None
            out = proc.stdout.read()
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - started
        report = json.loads(out or b"{}")
        if os.waitstatus_to_exitcode(status) != 0 or report.get("read") != topic.messages:
            raise RuntimeError(f"metric-etl run on {topic.name} failed: {report or out!r}")
        ((stored,),) = stack.sql(
            f'SELECT (SELECT count(*) FROM "{schema}".website_metrics)'
            f' + (SELECT count(*) FROM "{schema}".website_metrics_rejects)'
        )
        if stored != topic.messages:
            raise RuntimeError(f"{schema}: {stored} rows stored, not {topic.messages}")
    finally:
        stack.drop_schema(schema)
    return {
        "wall_s": round(wall, 3),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        "consume_s": round(report.get("timings", {}).get("consume", 0.0), 3),
    }


def read_alone(stack: Stack, topic: Topic, fallback: bool) -> dict[str, Any]:
    """bench_consume.py in a fresh process: wall and CPU seconds of reading the topic."""
    cmd = [sys.executable, str(CONSUME), topic.name, "-n", str(topic.messages)]
    if fallback:
        cmd.append("--compressed-stock")
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=stack.env())
    return json.loads(done.stdout.strip().splitlines()[-1])


def med(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def markdown(r: dict[str, Any]) -> str:
    p = r["params"]
    base = r["codecs"]["none"]
    lines = [
        "# Compressed topics: each codec against uncompressed",
        "",
        f"`{r['command']}` at {r['commit']}, {r['started_at']} to {r['finished_at']}; "
        f"{p['messages']:,} messages of ~{p['avg_bytes']} bytes (1% corrupted), "
        f"{p['partitions']} partitions, "
        f"produced by {r['versions']['kcat']} with `-z CODEC`; medians of {p['repeat']} runs side by side, "
        f"rotating order. {r['machine']['cores']} cores ({r['machine']['cpu']}), load average "
        f"{r['load_average_1m']['start']} at start, {r['load_average_1m']['end']} at the end: the machine "
        "is shared, so the figures move from run to run.",
        "",
        "## `metric-etl run` (end to end, validation and load included)",
        "",
        "| codec | wall s | msg/s | wall against none | CPU s | CPU against none | consume stage s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for codec, c in r["codecs"].items():
        run = c["run"]
        lines.append(
            f"| {codec} | {run['wall_s']:.2f} | {run['msg_per_s']:,.0f} | "
            f"{run['wall_s'] / base['run']['wall_s']:.2f}x | {run['cpu_s']:.2f} | "
            f"{run['cpu_s'] / base['run']['cpu_s']:.2f}x | {run['consume_s']:.2f} |"
        )
    lines += [
        "",
        "## Reading alone (bench/bench_consume.py: no group, no database), CPU seconds",
        "",
        "etl.kafka.fast_records on the decompressed batch against kafka-python's per-record reading of",
        "compressed batches (the fallback, and what 5cc9f5c did); uncompressed batches are read by",
        "etl.kafka.fast_records in both.",
        "",
        "| codec | etl.kafka.fast_records: CPU s | µs/msg | kafka-python: CPU s | µs/msg | speed-up |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    n = p["messages"]
    for codec, c in r["codecs"].items():
        fast, stock = c["read"]["etl_cpu_s"], c["read"]["fallback_cpu_s"]
        lines.append(
            f"| {codec} | {fast:.2f} | {fast / n * 1e6:.1f} | {stock:.2f} | {stock / n * 1e6:.1f} | "
            f"{stock / fast:.2f}x |"
        )
    lines += ["", "Every run: " + json.dumps({k: c["runs"] for k, c in r["codecs"].items()}), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-n", "--messages", type=int, default=200_000, help="messages per codec (200,000)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each measurement; medians are quoted")
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument("--smoke", action="store_true", help="10,000 messages, 1 repeat")
    ap.add_argument("--out-dir", type=Path, help="where codecs.json/.md go (bench/results)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.messages, args.repeat = 10_000, 1
    args.out_dir = args.out_dir or REPO / "bench" / "results" / ("smoke" if args.smoke else "")

    stack = Stack.from_env()
    ensure_tools()
    label = uuid.uuid4().hex[:6]
    started = datetime.now(UTC)
    load_at_start = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="metric-etl-bench-codecs-"))
    t0 = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {message}", file=sys.stderr, flush=True)

    topics: dict[str, Topic] = {}
    produce: dict[str, float] = {}
    runs: dict[str, dict[str, list[Any]]] = {c: {"run": [], "etl": [], "fallback": []} for c in CODECS}
    try:
        for codec in CODECS:
            topics[codec], produce[codec] = make_codec_topic(
                stack, f"bench-{label}-{codec}", args.messages, codec, args.partitions, workdir
            )
            log(f"{codec}: {args.messages:,} messages produced in {produce[codec]:.2f}s")
        for i in range(args.repeat):
            order = CODECS[i % len(CODECS) :] + CODECS[: i % len(CODECS)]
            for codec in order:
                topic = topics[codec]
                run = drain(stack, topic, workdir)
                runs[codec]["run"].append(run)
                for name, fallback in (("etl", False), ("fallback", True))[:: 1 if i % 2 else -1]:
                    runs[codec][name].append(read_alone(stack, topic, fallback))
                log(
                    f"{i + 1}/{args.repeat} {codec}: run {run['wall_s']:.2f}s, cpu {run['cpu_s']:.2f}s; "
                    f"read cpu {runs[codec]['etl'][-1]['cpu_s']:.2f}s, "
                    f"fallback {runs[codec]['fallback'][-1]['cpu_s']:.2f}s"
                )
    finally:
        delete_topics(stack, [t.name for t in topics.values()])

    n = args.messages
    codecs: dict[str, Any] = {}
    for codec in CODECS:
        r = runs[codec]
        wall = med([x["wall_s"] for x in r["run"]])
        codecs[codec] = {
            "produce_s": round(produce[codec], 3),
            "run": {
                "wall_s": wall,
                "msg_per_s": round(n / wall, 1),
                "cpu_s": med([x["cpu_s"] for x in r["run"]]),
                "consume_s": med([x["consume_s"] for x in r["run"]]),
            },
            "read": {
                "etl_cpu_s": med([x["cpu_s"] for x in r["etl"]]),
                "etl_wall_s": med([x["wall_s"] for x in r["etl"]]),
                "fallback_cpu_s": med([x["cpu_s"] for x in r["fallback"]]),
                "fallback_wall_s": med([x["wall_s"] for x in r["fallback"]]),
            },
            "runs": {
                "run_wall_s": [x["wall_s"] for x in r["run"]],
                "run_cpu_s": [x["cpu_s"] for x in r["run"]],
                "read_cpu_s": [x["cpu_s"] for x in r["etl"]],
                "fallback_cpu_s": [x["cpu_s"] for x in r["fallback"]],
            },
        }
    avg = topics["none"].payload_bytes / n
    result = {
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["bench/codecs.py", *(argv if argv is not None else sys.argv[1:])]),
        "commit": git_commit(),
        "params": {
            "messages": n,
            "avg_bytes": round(avg, 1),
            "partitions": args.partitions,
            "repeat": args.repeat,
            "smoke": args.smoke,
        },
        "machine": machine(stack),
        "load_average_1m": {"start": round(load_at_start, 2), "end": round(os.getloadavg()[0], 2)},
        "versions": {**versions(), **{d: metadata.version(d) for d in ("python-snappy", "lz4", "zstandard")}},
        "codecs": codecs,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "codecs.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / "codecs.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
