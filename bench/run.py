"""End-to-end benchmark: ``metric-etl run`` against the raw limit and the naive baseline.

    make bench-throughput                         # 1,000,000 messages, 3 repeats -> bench/results/latest.*
    .venv/bin/python bench/run.py --smoke         # 20,000 messages, 1 repeat: checks it works (CI)
    .venv/bin/python bench/run.py -n 200000 --repeat 5 --out-dir /tmp/bench

Needs the local stack (``make stack-up``; the environment of ``. .stack/env``), ``kcat`` (installed
with apt-get when missing) and ``psql``.

Set-up: N sample messages (``etl.sample``: about 200 bytes, 1% corrupted) are written to one file per
partition and produced with ``kcat -P -p <partition>`` to a fresh topic of 6 partitions, so each
partition gets N/6. kcat is used because it is about 20x faster than a kafka-python producer; both
producer rates are measured on a sample and reported.

Measured side by side, each ``--repeat`` times in rotating order, medians quoted:

1. ``metric-etl run --output json`` with default settings (built-in defaults: it runs in an empty
   directory, so no config file applies), a fresh consumer group and a fresh schema, draining the
   whole backlog; the stage times come from its JSON report.
2. The raw limit: ``kcat -C -e -f '%s\\n' | psql -c "\\copy ... from stdin"`` into a one-column text
   table with no index and no validation. The copy is CSV with delimiter 0x1F and quote 0x1E and
   declares the input LATIN1: every byte sequence is valid LATIN1, so corrupted (non-UTF-8) payloads
   never fail it, the bytes stay recoverable (``convert_to(payload, 'LATIN1')``) and a backslash is
   plain data. A payload holding a newline, a carriage return, 0x1E or 0x1F would break this framing;
   the generated data has none, and the row count is checked after every run.
3. The naive baseline (``bench/naive.py``): kafka-python, one INSERT per message, one commit per
   poll, as the original service did. It is slow, so it runs on a subset (``--naive-messages``,
   default 20,000) and its rate is from that subset.
4. PostgreSQL alone: the rows the first metric-etl run loaded, saved in binary COPY form, stored again
   by ``psql \\copy ... (FORMAT binary)`` into a fresh metrics table made by metric-etl's own DDL.
   This is what the database needs for the table's key and index, with no Kafka and no Python: the
   ceiling for any loader that keeps the table as it is.

For each: wall time of the process (or pipeline) from start to exit, messages/s and MB/s of payload
over that wall time, and peak RSS from ``os.wait4`` (for the raw pipeline, kcat's plus psql's, which
run at once). Every run is checked: metric-etl must report status ok and have read N, and loaded plus
rejected rows in the database must add up to N; the raw table must hold N rows.

A second consumer group: a first load into a fresh schema, then another group draining the same backlog
into the same tables, where every message is a duplicate; the two wall times, pair by pair (issue 12:
within 1.5x of the first load).

Also: peak RSS of metric-etl on a backlog of N/10 against N (memory must be bounded by the cycle,
not the backlog); the time of a backlog with 10% corrupted messages against one with none (both
``--corrupt-messages``, default N); and the start-up time of ``metric-etl --help`` (median of 10).

Writes ``<out-dir>/latest.json`` and ``<out-dir>/latest.md`` (``bench/results``, or ``bench/results/smoke``
with ``--smoke``); the topics and schemas it made are dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from etl.contract import METRIC_COLUMNS as metric_columns  # noqa: E402
from etl.db.schema import build_tables, ddl  # noqa: E402
from etl.sample import messages as sample_messages  # noqa: E402

BIN = Path(sys.executable).parent
RAW_COPY = (
    "\\copy {table}(payload) from stdin with "
    "(format csv, delimiter E'\\x1f', quote E'\\x1e', encoding 'LATIN1')"
)
# librdkafka batches up to 1 MB and waits 20 ms to fill them: the producer is never the bottleneck.
KCAT_PRODUCE = ("kcat", "-P", "-X", "linger.ms=20", "-X", "batch.size=1048576")
METRIC_COLUMNS = ", ".join(f'"{c}"' for c in metric_columns)
STAGE_ORDER = ("connect", "consume", "normalise", "validate", "load", "commit")
TARGETS = {  # issue 5
    "etl_msg_per_s": (">=", 100_000),
    "etl_over_raw": (">=", 0.5),
    "etl_over_naive": (">=", 20.0),
    # the same three, with one worker process per core
    "workers_msg_per_s": (">=", 100_000),
    "workers_over_raw": (">=", 0.5),
    "workers_over_naive": (">=", 20.0),
    "etl_peak_rss_mb": ("<=", 300.0),
    "rss_large_over_small": ("<=", 1.15),
    "corrupt_over_clean": ("<=", 1.25),
    "second_group_over_first": ("<=", 1.5),  # issue 12: a second group on an already-loaded backlog
    "help_s": ("<=", 0.3),
}


# -- the stack ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stack:
    bootstrap: str
    db_url: str  # libpq URL without the password
    db_password: str | None

    @classmethod
    def from_env(cls) -> Stack:
        env = dict(os.environ)
        env_file = Path(env.get("STACK_DIR") or REPO / ".stack") / "env"
        if "METRIC_ETL_DB_URL" not in env and env_file.is_file():
            for line in env_file.read_text().splitlines():
                name, sep, value = line.removeprefix("export ").partition("=")
                if sep and not line.startswith("#"):
                    env.setdefault(name.strip(), value.strip().strip("'\""))
        try:
            return cls(
                env["METRIC_ETL_BOOTSTRAP_SERVERS"],
                env["METRIC_ETL_DB_URL"],
                env.get("METRIC_ETL_DB_PASSWORD"),
            )
        except KeyError as exc:
            sys.exit(f"bench: {exc.args[0]} is not set: run `make stack-up` and `. .stack/env`")

    def env(self, **extra: str) -> dict[str, str]:
        """A child's environment: no METRIC_ETL_* but the stack's, libpq's password for psql."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("METRIC_ETL_")}
        env.update(METRIC_ETL_BOOTSTRAP_SERVERS=self.bootstrap, METRIC_ETL_DB_URL=self.db_url)
        if self.db_password:
            env.update(METRIC_ETL_DB_PASSWORD=self.db_password, PGPASSWORD=self.db_password)
        env.update(extra)
        return env

    def sql(self, statement: str) -> list[tuple[Any, ...]]:
        import psycopg2

        conn = psycopg2.connect(self.db_url, password=self.db_password)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(statement)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def drop_schema(self, name: str) -> None:
        self.sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def ensure_tools() -> None:
    """kcat and psql on PATH; kcat is installed with apt-get when missing (Debian's package)."""
    if shutil.which("kcat") is None:
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        print("bench: kcat missing; installing it with apt-get", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run([*sudo, "apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run(
            [*sudo, "apt-get", "install", "-y", "-q", "kcat"], check=True, env=env, stdout=subprocess.DEVNULL
        )
    if shutil.which("psql") is None:
        sys.exit("bench: psql is missing (apt-get install -y postgresql-client, or make stack-up)")


# -- topics ---------------------------------------------------------------------------------------


@dataclass
class Topic:
    name: str
    messages: int
    corrupt_ratio: float
    payload_bytes: int
    produce_s: float


def make_topic(
    stack: Stack, name: str, n: int, corrupt_ratio: float, partitions: int, workdir: Path
) -> Topic:
    """Create ``name`` and fill it with ``n`` sample messages, ``n / partitions`` per partition."""
    from kafka.admin import KafkaAdminClient, NewTopic

    files = [workdir / f"{name}.{p}" for p in range(partitions)]
    outs = [f.open("wb") for f in files]
    payload = 0
    try:
        for i, value in enumerate(sample_messages(n, corrupt_ratio=corrupt_ratio, seed=7)):
            if b"\n" in value:  # kcat -P splits messages on newlines
                raise ValueError(f"message {i} holds a newline")
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
            [*KCAT_PRODUCE, "-b", stack.bootstrap, "-t", name, "-p", str(p), "-l", str(f)],
            stderr=subprocess.PIPE,
        )
        for p, f in enumerate(files)
    ]
    for p in producers:
        _, err = p.communicate()
        if p.returncode:
            raise RuntimeError(f"kcat -P failed: {err.decode(errors='replace')}")
    produce_s = time.perf_counter() - start
    for f in files:
        f.unlink()
    ends = end_offsets(stack, name)
    if sum(ends.values()) != n:
        raise RuntimeError(f"topic {name} holds {sum(ends.values())} messages, not {n}")
    return Topic(name, n, corrupt_ratio, payload, produce_s)


def end_offsets(stack: Stack, topic: str) -> dict[int, int]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=stack.bootstrap.split(","), client_id="metric-etl-bench")
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        return {tp.partition: o for tp, o in consumer.end_offsets(tps).items()}
    finally:
        consumer.close()


def delete_topics(stack: Stack, names: Iterable[str]) -> None:
    from kafka.admin import KafkaAdminClient

    names = list(names)
    if not names:
        return
    admin = KafkaAdminClient(bootstrap_servers=stack.bootstrap.split(","), client_id="metric-etl-bench")
    try:
        admin.delete_topics(names)
    except Exception as exc:  # a leftover topic is harmless; say so and go on
        print(f"bench: could not delete topics {names}: {exc}", file=sys.stderr)
    finally:
        admin.close()


def kafka_python_producer_rate(stack: Stack, n: int) -> float:
    """Messages/s of a kafka-python producer tuned for throughput (big batches, linger), to compare."""
    from kafka import KafkaProducer

    values = list(sample_messages(n, seed=11))
    name = f"bench-producer-{uuid.uuid4().hex[:8]}"
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=stack.bootstrap.split(","), client_id="metric-etl-bench")
    admin.create_topics([NewTopic(name, 6, 1)])
    admin.close()
    try:
        start = time.perf_counter()
        producer = KafkaProducer(
            bootstrap_servers=stack.bootstrap.split(","), linger_ms=50, batch_size=1 << 20, acks=1
        )
        for i, value in enumerate(values):
            producer.send(name, value=value, partition=i % 6)
        producer.flush()
        producer.close()
        return n / (time.perf_counter() - start)
    finally:
        delete_topics(stack, [name])


# -- measuring processes --------------------------------------------------------------------------


@dataclass
class Measured:
    wall_s: float
    peak_rss_mb: float  # sum over the processes of the pipeline (they run at once)
    exit_codes: list[int]
    cpu_s: float = 0.0  # user + system seconds of the processes, from their own rusage


def measure(
    commands: list[list[str]], env: dict[str, str], cwd: Path, stdout: Path, stderr: Path
) -> Measured:
    """Run ``cmd1 | cmd2 | ...``; wall time from the first start to the last exit, peak RSS by wait4."""
    procs: list[subprocess.Popen[bytes]] = []
    with stdout.open("wb") as out, stderr.open("wb") as err:
        start = time.perf_counter()
        upstream = None
        for i, cmd in enumerate(commands):
            last = i == len(commands) - 1
            p = subprocess.Popen(
                cmd, stdin=upstream, stdout=out if last else subprocess.PIPE, stderr=err, env=env, cwd=cwd
            )
            if upstream is not None:
                upstream.close()  # the child holds it now; its EOF must reach the next one
            upstream = p.stdout
            procs.append(p)
        codes, rss_kb, cpu = [], 0, 0.0
        for p in procs:
            _, status, usage = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)
            codes.append(p.returncode)
            rss_kb += usage.ru_maxrss  # kilobytes on Linux
            cpu += usage.ru_utime + usage.ru_stime
        wall = time.perf_counter() - start
    return Measured(wall, rss_kb / 1024, codes, cpu)


@dataclass
class Run:
    """One measured run of one contender."""

    messages: int
    payload_bytes: int
    wall_s: float
    peak_rss_mb: float
    stages: dict[str, float] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def msg_per_s(self) -> float:
        return self.messages / self.wall_s

    @property
    def mb_per_s(self) -> float:
        return self.payload_bytes / self.wall_s / 1e6

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "msg_per_s": round(self.msg_per_s, 1), "mb_per_s": round(self.mb_per_s, 2)}


class Bench:
    def __init__(self, stack: Stack, workdir: Path, label: str) -> None:
        self.stack = stack
        self.workdir = workdir
        self.label = label
        self.schemas: list[str] = []

    def _names(self, kind: str) -> tuple[str, Path]:
        name = f"bench_{self.label}_{kind}_{uuid.uuid4().hex[:6]}"
        self.schemas.append(name)
        return name, self.workdir / name

    def etl(self, topic: Topic, *extra: str, keep_rows: Path | None = None) -> Run:
        """``metric-etl run [EXTRA]`` draining the topic into a fresh schema with a fresh group.

        With ``keep_rows`` (a file not there yet), the loaded rows are saved to it in binary COPY
        form, for :meth:`database`.
        """
        schema, base = self._names("etl")
        run = self._etl_run(topic, schema, schema, base, extra)
        if keep_rows is not None and not keep_rows.exists():
            self.psql(
                f'\\copy (SELECT {METRIC_COLUMNS} FROM "{schema}".website_metrics) TO '
                f"'{keep_rows}' WITH (FORMAT binary)"
            )
        self.stack.drop_schema(schema)
        return run

    def second_group(self, topic: Topic) -> Run:
        """A first load into a fresh schema, then a second consumer group draining the same backlog
        into the same tables, where every message is stored already (each is a duplicate). The run
        returned is the second; ``detail`` holds the first's wall time and the ratio of the two."""
        schema, base = self._names("twice")
        first = self._etl_run(topic, schema, schema, base, ())
        second = self._etl_run(topic, schema + "_b", schema, base.with_name(base.name + "_b"), ())
        if second.detail["duplicates"] != topic.messages or second.detail["loaded"]:
            raise RuntimeError(
                f"{schema}: the second group did not find every message stored: {second.detail}"
            )
        self.stack.drop_schema(schema)
        second.detail["first_wall_s"] = round(first.wall_s, 3)
        second.detail["second_over_first"] = round(second.wall_s / first.wall_s, 3)
        return second

    def _etl_run(self, topic: Topic, group: str, schema: str, base: Path, extra: Iterable[str]) -> Run:
        """One ``metric-etl run`` draining ``topic`` for ``group`` into ``schema``, checked."""
        env = self.stack.env(
            METRIC_ETL_TOPIC=topic.name, METRIC_ETL_GROUP_ID=group, METRIC_ETL_DB_SCHEMA=schema
        )
        empty = self.workdir / "cwd"
        empty.mkdir(exist_ok=True)
        out, err = base.with_suffix(".json"), base.with_suffix(".log")
        m = measure(
            [[str(BIN / "metric-etl"), "run", "--output", "json", "-q", *extra]], env, empty, out, err
        )
        report = json.loads(out.read_text() or "{}")
        if m.exit_codes != [0] or report.get("status") != "ok" or report.get("read") != topic.messages:
            raise RuntimeError(f"metric-etl run failed ({m.exit_codes}): {report or err.read_text()[-2000:]}")
        ((loaded, rejected),) = self.stack.sql(
            f'SELECT (SELECT count(*) FROM "{schema}".website_metrics),'
            f' (SELECT count(*) FROM "{schema}".website_metrics_rejects)'
        )
        if loaded + rejected != topic.messages:
            raise RuntimeError(f"{schema}: {loaded} loaded + {rejected} rejected != {topic.messages}")
        keep = ("cycles", "read", "loaded", "rejected", "duplicates", "duration_s", "rate_per_s")
        return Run(
            topic.messages,
            topic.payload_bytes,
            m.wall_s,
            m.peak_rss_mb,
            stages=report.get("timings", {}),
            detail={k: report.get(k) for k in keep},
        )

    def raw(self, topic: Topic) -> Run:
        """kcat -C piped into psql \\copy: the bytes moved with nothing done to them."""
        schema, base = self._names("raw")
        table = f'"{schema}".payloads'
        self.stack.sql(f'CREATE SCHEMA "{schema}"; CREATE TABLE {table} (payload text)')
        kcat = ["kcat", "-C", "-b", self.stack.bootstrap, "-t", topic.name, "-o", "beginning", "-e", "-q"]
        psql = self._psql(RAW_COPY.format(table=table))
        m = measure(
            [[*kcat, "-f", "%s\n"], psql],
            self.stack.env(),
            self.workdir,
            base.with_suffix(".out"),
            base.with_suffix(".log"),
        )
        if m.exit_codes != [0, 0]:
            raise RuntimeError(
                f"raw pipeline failed {m.exit_codes}: {base.with_suffix('.log').read_text()[-2000:]}"
            )
        ((rows,),) = self.stack.sql(f"SELECT count(*) FROM {table}")
        if rows != topic.messages:
            raise RuntimeError(f"raw copy loaded {rows} rows, not {topic.messages}")
        self.stack.drop_schema(schema)
        return Run(topic.messages, topic.payload_bytes, m.wall_s, m.peak_rss_mb)

    def database(self, topic: Topic, rows: Path) -> Run:
        """PostgreSQL alone: ``psql \\copy`` of metric-etl's loaded rows, already in binary COPY form,
        into a fresh metrics table made by metric-etl's own DDL (its key and index). No loader that
        keeps that table can go faster on this machine."""
        schema, base = self._names("database")
        self.stack.sql(ddl(build_tables(schema)))
        m = measure(
            [
                self._psql(
                    f'\\copy "{schema}".website_metrics ({METRIC_COLUMNS}) '
                    f"FROM '{rows}' WITH (FORMAT binary)"
                )
            ],
            self.stack.env(),
            self.workdir,
            base.with_suffix(".out"),
            base.with_suffix(".log"),
        )
        if m.exit_codes != [0]:
            raise RuntimeError(f"psql \\copy failed: {base.with_suffix('.log').read_text()[-2000:]}")
        ((loaded,),) = self.stack.sql(f'SELECT count(*) FROM "{schema}".website_metrics')
        self.stack.drop_schema(schema)
        return Run(loaded, round(topic.payload_bytes * loaded / topic.messages), m.wall_s, m.peak_rss_mb)

    def _psql(self, command: str) -> list[str]:
        return ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", self.stack.db_url, "-c", command]

    def psql(self, command: str) -> None:
        subprocess.run(self._psql(command), env=self.stack.env(), cwd=self.workdir, check=True)

    def naive(self, topic: Topic, subset: int) -> Run:
        """bench/naive.py on the first ``subset`` messages (it reads whole polls, so a few more)."""
        schema, base = self._names("naive")
        out = base.with_suffix(".json")
        cmd = [sys.executable, str(REPO / "bench" / "naive.py"), topic.name, schema, schema, str(subset)]
        m = measure([cmd], self.stack.env(), self.workdir, out, base.with_suffix(".log"))
        if m.exit_codes != [0]:
            raise RuntimeError(f"naive baseline failed: {base.with_suffix('.log').read_text()[-2000:]}")
        counts = json.loads(out.read_text())
        self.stack.drop_schema(schema)
        read = counts["read"]
        return Run(
            read, round(topic.payload_bytes * read / topic.messages), m.wall_s, m.peak_rss_mb, detail=counts
        )

    def cleanup(self) -> None:
        for name in self.schemas:
            try:
                self.stack.drop_schema(name)
            except Exception as exc:  # best effort
                print(f"bench: could not drop schema {name}: {exc}", file=sys.stderr)


def help_startup(runs: int) -> list[float]:
    """Wall seconds of ``metric-etl --help``, each a fresh process."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([str(BIN / "metric-etl"), "--help"], check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


# -- summaries ------------------------------------------------------------------------------------


def summary(runs: list[Run]) -> dict[str, Any]:
    """Medians over the repeats, and every run."""
    med = statistics.median
    seen = {k for r in runs for k in r.stages}
    stages = [k for k in STAGE_ORDER if k in seen] + sorted(seen - set(STAGE_ORDER))
    out: dict[str, Any] = {
        "messages": runs[0].messages,
        "wall_s": round(med(r.wall_s for r in runs), 3),
        "msg_per_s": round(med(r.msg_per_s for r in runs), 1),
        "mb_per_s": round(med(r.mb_per_s for r in runs), 2),
        "peak_rss_mb": round(med(r.peak_rss_mb for r in runs), 1),
        "runs": [r.as_dict() for r in runs],
    }
    if stages:
        out["stages_s"] = {k: round(med(r.stages.get(k, 0.0) for r in runs), 3) for k in stages}
        out["drain_s"] = round(med(r.detail["duration_s"] for r in runs), 3)
    return out


def second_group(runs: list[Run]) -> dict[str, Any]:
    """A second consumer group on the loaded backlog against the first load, pair by pair."""
    med = statistics.median
    return {
        "messages": runs[0].messages,
        "first_wall_s": round(med(r.detail["first_wall_s"] for r in runs), 3),
        "second_wall_s": round(med(r.wall_s for r in runs), 3),
        "second_over_first": round(med(r.detail["second_over_first"] for r in runs), 3),
        "second": summary(runs),
    }


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("kafka-python", "pandas", "numpy", "SQLAlchemy", "psycopg2-binary", "orjson", "crc32c"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    kcat = subprocess.run(["kcat", "-V"], capture_output=True, text=True).stdout
    found = re.search(r"Version (\S+).*?librdkafka (\S+)", kcat, re.S)
    out["kcat"] = f"kcat {found[1]} (librdkafka {found[2]})" if found else "kcat ?"
    return out


def machine(stack: Stack) -> dict[str, Any]:
    from kafka import KafkaConsumer

    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    consumer = KafkaConsumer(bootstrap_servers=stack.bootstrap.split(","))
    broker = ".".join(map(str, consumer.config["api_version"]))
    consumer.close()
    ((pg,),) = stack.sql("SHOW server_version")
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "kafka_broker_api": broker,
        "postgresql": pg,
    }


def git_commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "etl"], cwd=REPO, capture_output=True, text=True
    )
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def targets(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    values = {
        "etl_msg_per_s": result["etl"]["msg_per_s"],
        "workers_msg_per_s": result["workers"]["msg_per_s"],
        "etl_over_raw": result["ratios"]["etl_over_raw"],
        "etl_over_naive": result["ratios"]["etl_over_naive"],
        "workers_over_raw": result["ratios"]["workers_over_raw"],
        "workers_over_naive": result["ratios"]["workers_over_naive"],
        "etl_peak_rss_mb": max(result["etl"]["peak_rss_mb"], result["rss_scaling"]["large_peak_rss_mb"]),
        "rss_large_over_small": result["rss_scaling"]["large_over_small"],
        "corrupt_over_clean": result["corruption"]["corrupt_over_clean"],
        "second_group_over_first": result["second_group"]["second_over_first"],
        "help_s": result["startup"]["help_s"],
    }
    out = {}
    for name, (op, limit) in TARGETS.items():
        value = values[name]
        met = value >= limit if op == ">=" else value <= limit
        out[name] = {"target": f"{op} {limit:g}", "value": value, "met": met}
    return out


def markdown(r: dict[str, Any]) -> str:
    p, e, w, n = r["params"], r["etl"], r["raw"], r["naive"]

    def row(name: str, s: dict[str, Any], note: str = "") -> str:
        return (
            f"| {name} | {s['messages']:,}{note} | {s['wall_s']:.2f} | {s['msg_per_s']:,.0f}"
            f" | {s['mb_per_s']:.1f} | {s['peak_rss_mb']:.0f} |"
        )

    m = r["machine"]
    lines = [
        f"# metric-etl benchmark ({r['started_at'][:10]}, commit {r['commit']})",
        "",
        f"{p['messages']:,} messages of {p['avg_bytes']:.0f} bytes ({p['corrupt_ratio']:.0%} corrupted), "
        f"{p['partitions']} partitions; medians of {p['repeat']} runs side by side. "
        f"`{r['command']}`",
        "",
        "| | messages | wall s | msg/s | MB/s | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|",
        row("metric-etl run (default settings)", e),
        row(f"metric-etl run --workers {p['workers']}", r["workers"]),
        row("raw limit: kcat -C \\| psql \\copy", w),
        row("naive: kafka-python, INSERT per row, commit per poll", n, " (subset)"),
        row(
            "PostgreSQL alone: psql \\copy (binary) of the loaded rows into the metrics table", r["database"]
        ),
        "",
        f"PostgreSQL alone takes {r['database']['wall_s']:.2f} s to store the rows metric-etl loaded, "
        f"already encoded: {r['database']['msg_per_s']:,.0f} rows/s, "
        f"{r['ratios']['database_over_raw']:.2f}x the raw limit (which fills one text column without an "
        "index). That is the ceiling for any loader that keeps the table's key and `checked_at` index, "
        "before Kafka and Python take their share of the two cores.",
        "",
        f"Ratios: metric-etl / raw = **{r['ratios']['etl_over_raw']:.3f}**, "
        f"metric-etl / naive = **{r['ratios']['etl_over_naive']:.1f}x**; with --workers {p['workers']}: "
        f"**{r['ratios']['workers_over_raw']:.3f}** and **{r['ratios']['workers_over_naive']:.1f}x**.",
        "",
        "metric-etl time by stage (s, medians): "
        + ", ".join(f"{k} {v:.2f}" for k, v in e["stages_s"].items())
        + f"; the run itself (drain) {e['drain_s']:.2f} of {e['wall_s']:.2f} s wall (the rest: start-up). "
        "A cycle's load runs while the next cycle is consumed, normalised and validated, so the stages add "
        "up to more than the drain.",
        "",
        "| measurement | value | target | met |",
        "|---|---:|---:|:---:|",
    ]
    rss = r["rss_scaling"]
    labels = {
        "etl_msg_per_s": f"metric-etl msg/s end to end ({p['messages']:,} backlog)",
        "etl_over_raw": "metric-etl / raw limit",
        "etl_over_naive": "metric-etl / naive",
        "workers_msg_per_s": f"metric-etl --workers {p['workers']} msg/s end to end",
        "workers_over_raw": f"metric-etl --workers {p['workers']} / raw limit",
        "workers_over_naive": f"metric-etl --workers {p['workers']} / naive",
        "etl_peak_rss_mb": "metric-etl peak RSS, MB",
        "rss_large_over_small": (
            f"peak RSS {rss['large_messages']:,} / {rss['small_messages']:,} backlog "
            f"({rss['large_peak_rss_mb']:.0f} / {rss['small_peak_rss_mb']:.0f} MB)"
        ),
        "corrupt_over_clean": (
            f"time 10% corrupted / clean, {r['corruption']['messages']:,} messages "
            f"({r['corruption']['corrupt_wall_s']:.2f} / {r['corruption']['clean_wall_s']:.2f} s)"
        ),
        "second_group_over_first": (
            f"a second group on the loaded backlog / the first load, {r['second_group']['messages']:,} "
            f"messages ({r['second_group']['second_wall_s']:.2f} / {r['second_group']['first_wall_s']:.2f} s)"
        ),
        "help_s": f"`metric-etl --help`, s (median of {len(r['startup']['runs_s'])})",
    }
    for name, t in r["targets"].items():
        v = t["value"]
        shown = f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
        lines.append(f"| {labels[name]} | {shown} | {t['target']} | {'yes' if t['met'] else '**no**'} |")
    s = r["setup"]
    v = r["versions"]
    load = r["load_average_1m"]
    lines += [
        "",
        f"Producing the backlog: kcat {s['kcat_msg_per_s']:,.0f} msg/s, kafka-python producer "
        f"{s['kafka_python_msg_per_s']:,.0f} msg/s (on {s['kafka_python_messages']:,} messages).",
        "",
        f"Machine: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, {m['os']}, 1-minute load average "
        f"{load['start']} at the start, {load['end']} at the end; Kafka broker API {m['kafka_broker_api']}, "
        f"PostgreSQL {m['postgresql']}; Python {v['python']}, kafka-python "
        f"{v['kafka-python']}, pandas {v['pandas']}, numpy {v['numpy']}, SQLAlchemy {v['SQLAlchemy']}, "
        f"psycopg2 {v['psycopg2-binary']}, orjson {v['orjson']}, crc32c {v['crc32c']}; {v['kcat']}.",
        "",
    ]
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-n", "--messages", type=int, default=1_000_000, help="backlog size (default 1,000,000)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each measurement; medians are quoted")
    ap.add_argument("--naive-messages", type=int, default=20_000, help="subset the naive baseline reads")
    ap.add_argument("--corrupt-messages", type=int, help="backlog of the 0%% / 10%% comparison (default -n)")
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument("--corrupt-ratio", type=float, default=0.01)
    ap.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 2,
        help="--workers of the parallel run (default: cores)",
    )
    ap.add_argument("--smoke", action="store_true", help="20,000 messages, 1 repeat, small subsets")
    ap.add_argument(
        "--out-dir",
        type=Path,
        help="where latest.json/.md go (bench/results; bench/results/smoke with --smoke)",
    )
    args = ap.parse_args(argv)
    if args.smoke:
        args.messages, args.repeat = 20_000, 1
        args.naive_messages = min(args.naive_messages, 2_000)
    # A smoke run must not overwrite the full run's figures.
    args.out_dir = args.out_dir or REPO / "bench" / "results" / ("smoke" if args.smoke else "")
    corrupt_n = args.corrupt_messages or args.messages
    small_n = max(args.messages // 10, 1_000)
    help_runs = 3 if args.smoke else 10

    stack = Stack.from_env()
    ensure_tools()
    label = uuid.uuid4().hex[:6]
    started = datetime.now(UTC)
    load_at_start = os.getloadavg()[0]
    topics: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="metric-etl-bench-"))
    bench = Bench(stack, workdir, label)

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {message}", file=sys.stderr, flush=True)

    def topic(kind: str, n: int, ratio: float) -> Topic:
        t = make_topic(stack, f"bench-{label}-{kind}", n, ratio, args.partitions, workdir)
        topics.append(t.name)
        log(f"topic {t.name}: {n:,} messages, {ratio:.0%} corrupted, produced in {t.produce_s:.2f}s")
        return t

    def repeat(what: str, fns: list[tuple[str, Callable[[], Run]]]) -> dict[str, list[Run]]:
        """Each function ``--repeat`` times, rotating the order so drift hits them alike."""
        runs: dict[str, list[Run]] = {name: [] for name, _ in fns}
        for i in range(args.repeat):
            order = fns[i % len(fns) :] + fns[: i % len(fns)]
            for name, fn in order:
                run = fn()
                runs[name].append(run)
                log(
                    f"{what} {i + 1}/{args.repeat} {name}: {run.wall_s:.2f}s, {run.msg_per_s:,.0f} msg/s, "
                    f"{run.peak_rss_mb:.0f} MB"
                )
        return runs

    t0 = time.perf_counter()
    try:
        main_topic = topic("main", args.messages, args.corrupt_ratio)
        kp_n = min(args.messages, 5_000 if args.smoke else 50_000)
        kp_rate = kafka_python_producer_rate(stack, kp_n)
        log(f"kafka-python producer: {kp_rate:,.0f} msg/s")

        rows = workdir / "loaded-rows.bin"  # the first metric-etl run's rows, for the database alone
        side = repeat(
            "side by side",
            [
                ("etl", lambda: bench.etl(main_topic, keep_rows=rows)),
                ("workers", lambda: bench.etl(main_topic, "--workers", str(args.workers))),
                ("raw", lambda: bench.raw(main_topic)),
                ("naive", lambda: bench.naive(main_topic, args.naive_messages)),
                ("database", lambda: bench.database(main_topic, rows)),
            ],
        )
        twice = repeat("second group", [("second", lambda: bench.second_group(main_topic))])["second"]
        small_topic = topic("small", small_n, args.corrupt_ratio)
        small = repeat("rss", [("small", lambda: bench.etl(small_topic))])["small"]
        clean_topic = topic("clean", corrupt_n, 0.0)
        dirty_topic = topic("corrupt10", corrupt_n, 0.10)
        corruption = repeat(
            "corruption",
            [("clean", lambda: bench.etl(clean_topic)), ("corrupt", lambda: bench.etl(dirty_topic))],
        )
        helps = help_startup(help_runs)
        log(f"metric-etl --help: median {statistics.median(helps):.3f}s")

        etl, raw, naive = summary(side["etl"]), summary(side["raw"]), summary(side["naive"])
        workers, database = summary(side["workers"]), summary(side["database"])
        small_s, clean, dirty = summary(small), summary(corruption["clean"]), summary(corruption["corrupt"])
        result: dict[str, Any] = {
            "started_at": started.isoformat(timespec="seconds"),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join(["bench/run.py", *(argv if argv is not None else sys.argv[1:])]),
            "commit": git_commit(),
            "params": {
                "messages": args.messages,
                "avg_bytes": round(main_topic.payload_bytes / main_topic.messages, 1),
                "partitions": args.partitions,
                "corrupt_ratio": args.corrupt_ratio,
                "repeat": args.repeat,
                "naive_messages": args.naive_messages,
                "small_messages": small_n,
                "corrupt_messages": corrupt_n,
                "smoke": args.smoke,
                "workers": args.workers,
            },
            "machine": machine(stack),
            # Other work on the machine shows here: the figures are only as quiet as the machine was.
            "load_average_1m": {"start": round(load_at_start, 2), "end": round(os.getloadavg()[0], 2)},
            "versions": versions(),
            "setup": {
                "kcat_msg_per_s": round(main_topic.messages / main_topic.produce_s, 1),
                "kafka_python_msg_per_s": round(kp_rate, 1),
                "kafka_python_messages": kp_n,
            },
            "etl": etl,
            "workers": workers,
            "raw": raw,
            "naive": naive,
            "database": database,
            "ratios": {
                "etl_over_raw": round(etl["msg_per_s"] / raw["msg_per_s"], 4),
                "etl_over_naive": round(etl["msg_per_s"] / naive["msg_per_s"], 2),
                "workers_over_raw": round(workers["msg_per_s"] / raw["msg_per_s"], 4),
                "workers_over_naive": round(workers["msg_per_s"] / naive["msg_per_s"], 2),
                "database_over_raw": round(database["msg_per_s"] / raw["msg_per_s"], 4),
            },
            "rss_scaling": {
                "small_messages": small_n,
                "large_messages": args.messages,
                "small_peak_rss_mb": small_s["peak_rss_mb"],
                "large_peak_rss_mb": etl["peak_rss_mb"],
                "large_over_small": round(etl["peak_rss_mb"] / small_s["peak_rss_mb"], 3),
                "small": small_s,
            },
            "corruption": {
                "messages": corrupt_n,
                "clean_wall_s": clean["wall_s"],
                "corrupt_wall_s": dirty["wall_s"],
                "corrupt_over_clean": round(dirty["wall_s"] / clean["wall_s"], 3),
                "drain_corrupt_over_clean": round(dirty["drain_s"] / clean["drain_s"], 3),
                "clean": clean,
                "corrupt": dirty,
            },
            "second_group": second_group(twice),
            "startup": {"help_s": round(statistics.median(helps), 3), "runs_s": [round(h, 3) for h in helps]},
        }
        result["targets"] = targets(result)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        for name, text in (
            ("latest.json", json.dumps(result, indent=2) + "\n"),
            ("latest.md", markdown(result)),
        ):
            tmp = args.out_dir / (name + ".tmp")
            tmp.write_text(text)
            tmp.replace(args.out_dir / name)
        print(markdown(result))
        log(f"wrote {args.out_dir / 'latest.json'} and latest.md")
        return 0
    finally:
        bench.cleanup()
        delete_topics(stack, topics)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
