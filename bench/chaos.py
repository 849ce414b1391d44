"""Chaos: a backlog drained by overlapping runs that are SIGKILLed at random moments while PostgreSQL
and the broker restart under them; then ONE ordinary run, and the exactly-once checks.

    . .stack/env && .venv/bin/python bench/chaos.py                     # make chaos
    .venv/bin/python bench/chaos.py --messages 20000 --kills 8 --seed 3
    .venv/bin/python bench/chaos.py --cluster                          # make chaos-cluster

Everything is real: the backlog is written by ``metric-etl produce-sample`` (kafka-python's producer),
the runs are ``metric-etl run`` processes, PostgreSQL and the broker are stopped and started with
``scripts/pg.sh`` and ``scripts/kafka.sh`` (``scripts/cluster.sh`` for the three-broker cluster).
Each run's stdout and stderr stay in the results folder, with ``summary.json``.

The checks, after the final run:
  - every offset of every partition is in exactly one table (metrics or rejects), none twice;
  - the hourly and daily rollups and the latest states equal a recomputation from the raw rows;
  - the stored offsets (etl_offsets) equal the end offsets;
  - no etl_runs row of the group says ``running``;
  - no run exited 1 (an unexpected error) or with any code but 0 and 4 (and, with --atomic-share,
    75: a run that found an atomic run holding the group, and 5/130 never); the final run exited 0.

With ``--atomic-share P`` each chaos run is ``run --atomic`` with probability P: a SIGKILL then loses
its whole run (rolled back), and the ordinary runs stop (exit 75) while it holds the group.
Exit status: 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
# Exit codes a run may end with under chaos: 0 (done) and 4 (a service away past its retry deadline).
EXPECTED_EXITS = {0, 4}


@dataclass
class Options:
    messages: int = 300_000
    corrupt_ratio: float = 0.01
    partitions: int = 3
    runs: int = 3  # runs alive at once during the chaos
    kills: int = 30
    kill_gap: tuple[float, float] = (0.2, 3.0)  # seconds from arming a kill to striking, drawn uniformly
    kill_wait: float = 15.0  # a kill waits at most this long for progress since the previous one
    pg_restart: bool = True
    broker_restart: bool = True
    cluster: bool = False  # the three-broker cluster: a leader killed, then a rolling restart
    seed: int = 1
    max_poll_records: int = 2000
    retry_deadline: float = 30.0
    sleep: float = 0.0  # --sleep of the chaos runs (slows them down, so the events land mid-run)
    down_s: tuple[float, float] = (1.0, 5.0)  # how long a service stays down
    chaos_timeout: float = 900.0
    final_timeout: float = 600.0
    results: Path | None = None
    atomic_share: float = 0.0  # share of the chaos runs started with --atomic
    atomic_cycles: int = 20  # an atomic run is a bounded backfill: --cycles


@dataclass
class RunRecord:
    n: int
    slot: int
    started: float
    atomic: bool = False
    ended: float | None = None
    exit: str | None = None  # "0", "4", "SIGKILL", ...
    killed_after_s: float | None = None


@dataclass
class Result:
    """What happened and what the checks found; ``ok`` when every check passed."""

    topic: str
    schema: str
    group: str
    seed: int
    results: str
    retry_deadline: float = 0.0
    messages: int = 0
    end_offsets: dict[int, int] = field(default_factory=dict)
    kills: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    runs: list[RunRecord] = field(default_factory=list)
    handled_before_final: int = 0
    final: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    durations: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def exits(self) -> dict[str, int]:
        return dict(sorted(Counter(r.exit or "?" for r in self.runs).items()))

    def atomic_exits(self) -> dict[str, int]:
        return dict(sorted(Counter(r.exit or "?" for r in self.runs if r.atomic).items()))

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        d["exits"] = self.exits()
        d["atomic_exits"] = self.atomic_exits()
        return d

    def to_text(self) -> str:
        kinds = Counter(e["event"] for e in self.events)
        lines = [
            f"chaos {'PASSED' if self.ok else 'FAILED'}: topic and schema {self.topic}, seed {self.seed}",
            f"  messages   {self.messages:,} on {len(self.end_offsets)} partitions; in the tables: "
            + ", ".join(f"{k} {v:,}" for k, v in self.counts.items()),
            f"  kills      {self.kills} SIGKILLs among {len(self.runs)} runs"
            if self.runs
            else "  kills      0",
            "  events     " + (", ".join(f"{k} x{v}" for k, v in kinds.items()) or "none"),
        ]
        for e in self.events:
            lines.append(
                f"             {e['event']}: at {e['at_s']:.1f}s, down {e.get('down_s', 0):.1f}s, "
                f"back after {e['took_s']:.1f}s"
            )
            if "gave_up_after_s" in e:
                lines.append(f"               the runs alive gave up after {e['gave_up_after_s']}s")
                for n, run in e["runs"].items():
                    during = " (started during the outage)" if run["started_during_outage"] else ""
                    lines.append(
                        f"               run {n}{during}: exit {run['exit']}, loaded {run['loaded']}, "
                        f"lag {run['lags']}, raw Kafka lines {run['raw_kafka_lines']}: {run['error']}"
                    )
        lines += [
            "  run exits  " + ", ".join(f"{k}: {v}" for k, v in self.exits().items()),
            "  atomic     "
            + (", ".join(f"{k}: {v}" for k, v in self.atomic_exits().items()) or "none")
            + " (exits of the runs started with --atomic)",
            f"  handled    {self.handled_before_final:,} of {self.messages:,} before the final run",
            f"  final run  exit {self.final.get('exit')}, {self.final.get('summary', '')}",
            "  durations  " + ", ".join(f"{k} {v:.1f}s" for k, v in self.durations.items()),
            f"  logs       {self.results}",
        ]
        if self.failures:
            lines.append("  FAILED checks:")
            lines += [f"    - {f}" for f in self.failures]
        else:
            lines.append("  checks     every message in exactly one table, stored offsets = end offsets,")
            lines.append("             no run left 'running', no run exited 1")
        return "\n".join(lines)


# -- the stack ----------------------------------------------------------------------------------------


def stack_env() -> dict[str, str]:
    """The stack's settings: the environment (``. .stack/env``), else .stack/env itself."""
    env = dict(os.environ)
    stack_dir = env.get("STACK_DIR") or env.get("METRIC_ETL_STACK_DIR") or str(REPO / ".stack")
    env_file = Path(stack_dir) / "env"
    if "METRIC_ETL_DB_URL" not in env and env_file.is_file():
        for line in env_file.read_text().splitlines():
            line = line.strip().removeprefix("export ")
            name, sep, value = line.partition("=")
            if sep and not line.startswith("#"):
                env.setdefault(name, (shlex.split(value) or [""])[0])
    env.setdefault("STACK_DIR", stack_dir)
    missing = [k for k in ("METRIC_ETL_BOOTSTRAP_SERVERS", "METRIC_ETL_DB_URL") if not env.get(k)]
    if missing:
        raise SystemExit(f"chaos: {', '.join(missing)} not set: run `make stack-up` and `. .stack/env`")
    return env


def cluster_bootstrap(env: Mapping[str, str]) -> str:
    """The cluster's bootstrap servers, from ``scripts/cluster.sh bootstrap``."""
    out = _script("cluster.sh", "bootstrap", env=env).strip()
    if not out:
        raise SystemExit("chaos: the cluster is not up: run `make cluster-up`")
    return out


def _script(name: str, *args: str, env: Mapping[str, str]) -> str:
    proc = subprocess.run(
        [str(SCRIPTS / name), *args],
        env={**env, "METRIC_ETL_STACK_DIR": env["STACK_DIR"]},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,  # a Ctrl-C of the chaos must not kill a service half-started
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"scripts/{name} {' '.join(args)}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
        )
    return proc.stdout


def engine_for(env: Mapping[str, str]) -> Any:
    import sqlalchemy as sa

    url = sa.make_url(env["METRIC_ETL_DB_URL"])
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg2")
    if env.get("METRIC_ETL_DB_PASSWORD"):
        url = url.set(password=env["METRIC_ETL_DB_PASSWORD"])
    return sa.create_engine(url, pool_pre_ping=True, pool_size=1)


def wait_for(
    what: str, check: Callable[[], Any], timeout: float, every: float = 0.5, quiet: bool = False
) -> Any:
    """Poll ``check`` until it returns something true; at ``timeout`` raise (or return None: ``quiet``)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except Exception:  # a service on its way back
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            if quiet:
                return None
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def _outcome(results: Path, n: int, exit: str | None, *, started_during: bool) -> dict[str, Any]:
    """What one run showed the operator: exit, error, lag per partition, raw Kafka client lines."""
    err = (results / f"run-{n:03d}.err").read_text(errors="replace")
    try:
        report = json.loads((results / f"run-{n:03d}.out").read_text())
    except (OSError, ValueError):
        report = {}
    return {
        "exit": exit,
        "started_during_outage": started_during,
        "error": report.get("error"),
        "loaded": report.get("loaded"),
        "cycles": report.get("cycles"),
        "lags": {p: v.get("lag") for p, v in (report.get("partitions") or {}).items()},
        "raw_kafka_lines": sum("BrokerConnection" in line or "kafka." in line for line in err.splitlines()),
        "timeout_none_lines": err.count("KafkaTimeoutError: None"),
    }


def kafka_ends(bootstrap: str, topic: str) -> dict[int, int]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), request_timeout_ms=10_000)
    try:
        parts = wait_for(f"topic {topic}", lambda: consumer.partitions_for_topic(topic), 60)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        return {tp.partition: int(o) for tp, o in consumer.end_offsets(tps).items()}
    finally:
        consumer.close()


def replication(bootstrap: str, topic: str) -> tuple[int, int]:
    """(the topic's replication factor, the cluster's default.replication.factor)."""
    from kafka import KafkaAdminClient

    from etl.kafka.client import default_replication_factor

    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","), request_timeout_ms=10_000)
    try:
        (described,) = admin.describe_topics([topic])
        return len(described["partitions"][0]["replica_nodes"]), default_replication_factor(admin)
    finally:
        admin.close()


def group_empty(bootstrap: str, group: str) -> bool:
    """True when the group has no member (the killed runs' sessions have expired)."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","), request_timeout_ms=5000)
    try:
        return not admin.describe_groups([group])[group]["members"]
    finally:
        admin.close()


# -- service events ---------------------------------------------------------------------------------


class Services:
    """Stops and starts PostgreSQL and the broker(s) the way an operator (or a crash) would."""

    def __init__(self, env: Mapping[str, str], bootstrap: str, rng: random.Random, opts: Options) -> None:
        self.env, self.bootstrap, self.rng, self.opts = env, bootstrap, rng, opts

    def pg_restart(self) -> dict[str, Any]:
        _script("pg.sh", "down", env=self.env)
        down = self.rng.uniform(*self.opts.down_s)
        time.sleep(down)  # the outage itself, not a synchronisation
        _script("pg.sh", "up", env=self.env)
        engine = engine_for(self.env)
        try:
            wait_for("PostgreSQL", lambda: engine.connect().close() or True, 60)
        finally:
            engine.dispose()
        return {"down_s": down}

    def broker_restart(self) -> dict[str, Any]:
        _script("kafka.sh", "down", env=self.env)
        down = self.rng.uniform(*self.opts.down_s)
        time.sleep(down)
        _script("kafka.sh", "up", env=self.env)
        wait_for("the broker", lambda: group_empty(self.bootstrap, "chaos-probe"), 90)
        return {"down_s": down}

    def leader_kill(self, topic: str) -> dict[str, Any]:
        """SIGKILL the broker leading partition 0 of the topic, then start it again."""
        leader = self._leader(topic, 0)
        _script("cluster.sh", "kill", str(leader), env=self.env)
        down = self.rng.uniform(*self.opts.down_s) + 5  # long enough for a new leader to be elected
        time.sleep(down)
        _script("cluster.sh", "start", str(leader), env=self.env)
        wait_for("the partitions to be fully replicated", self._fully_replicated, 180)
        return {"node": leader, "down_s": down}

    def two_brokers_lost(self, topic: str, runs: Runs, results: Path) -> dict[str, Any]:
        """SIGKILL the two nodes that do not lead partition 0 (the quorum is lost; the survivor still
        serves its partitions), until the runs alive then have given up and one started during the
        outage has too; then start both again."""
        survivor = self._leader(topic, 0)
        lost = [n for n in (1, 2, 3) if n != survivor]
        alive = {record.n for _, record in runs.live.values()}
        t0 = time.monotonic()
        for n in lost:
            _script("cluster.sh", "kill", str(n), env=self.env)

        def ended(numbers: set[int]) -> bool:
            return all(r.exit is not None for r in runs.result.runs if r.n in numbers)

        bound = self.opts.retry_deadline * 3 + 60
        gave_up = wait_for("the runs to give up", lambda: ended(alive), bound, every=1.0, quiet=True)
        took = time.monotonic() - t0
        during = {r.n for r in runs.result.runs if r.n not in alive and r.exit is None}
        wait_for("the run started during the outage", lambda: ended(during), bound, every=1.0, quiet=True)
        for n in lost:
            _script("cluster.sh", "start", str(n), env=self.env)
        wait_for("the partitions to be fully replicated", self._fully_replicated, 300)
        info: dict[str, Any] = {
            "nodes": lost,
            "down_s": time.monotonic() - t0,
            "gave_up_after_s": round(took, 1),
        }
        info["runs"] = {}
        for r in runs.result.runs:
            if r.n in alive | during:
                info["runs"][r.n] = _outcome(results, r.n, r.exit, started_during=r.n in during)
        if not gave_up:
            info["still_running"] = True
        return info

    def rolling_restart(self) -> dict[str, Any]:
        """Each node in turn: SIGTERM, start, wait until every replica is back in sync."""
        for node in (1, 2, 3):
            _script("cluster.sh", "stop", str(node), env=self.env)
            _script("cluster.sh", "start", str(node), env=self.env)
            wait_for("the partitions to be fully replicated", self._fully_replicated, 180)
        return {"nodes": [1, 2, 3]}

    def _leader(self, topic: str, partition: int) -> int:
        for p in self._describe(topic)["partitions"]:
            if p["partition_index"] == partition:
                return int(p["leader_id"])
        raise RuntimeError(f"no partition {partition} in {topic}")

    def _describe(self, topic: str) -> dict[str, Any]:
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap.split(","), request_timeout_ms=10_000)
        try:
            return admin.describe_topics([topic])[0]
        finally:
            admin.close()

    def _fully_replicated(self) -> bool:
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap.split(","), request_timeout_ms=5000)
        try:
            topics = admin.describe_topics()
        finally:
            admin.close()
        return all(
            len(p["isr_nodes"]) == len(p["replica_nodes"]) and p["leader_id"] >= 0
            for t in topics
            for p in t["partitions"]
        )


# -- the runs -----------------------------------------------------------------------------------------


class Runs:
    """Up to ``opts.runs`` ``metric-etl run`` processes at once, each logging to its own files."""

    def __init__(self, env: Mapping[str, str], results: Path, result: Result, opts: Options) -> None:
        self.env, self.results, self.result, self.opts = env, results, result, opts
        self.live: dict[int, tuple[subprocess.Popen[bytes], RunRecord]] = {}
        self.t0 = time.monotonic()
        self.rng = random.Random(opts.seed + 1)  # which runs are atomic: the same for the same seed
        self.due: dict[int, float] = {}  # slot -> when to start its next run (after an exit 75)

    def start(self, slot: int) -> None:
        n = len(self.result.runs)
        args = [sys.executable, "-m", "etl", "run", "--output", "json"]
        atomic = self.rng.random() < self.opts.atomic_share
        if atomic:
            args += ["--atomic", "--cycles", str(self.opts.atomic_cycles)]
        if self.opts.sleep:
            args += ["--sleep", str(self.opts.sleep)]
        with (
            (self.results / f"run-{n:03d}.out").open("wb") as out,
            (self.results / f"run-{n:03d}.err").open("wb") as err,
        ):
            proc = subprocess.Popen(args, env=dict(self.env), cwd=str(REPO), stdout=out, stderr=err)
        record = RunRecord(n=n, slot=slot, started=round(time.monotonic() - self.t0, 2), atomic=atomic)
        self.result.runs.append(record)
        self.live[slot] = (proc, record)

    def reap(self, restart: bool) -> None:
        """Note the runs that ended by themselves; start another in their slot when ``restart``."""
        for slot, when in list(self.due.items()):
            if restart and time.monotonic() >= when:
                del self.due[slot]
                self.start(slot)
        for slot, (proc, record) in list(self.live.items()):
            code = proc.poll()
            if code is None:
                continue
            record.ended, record.exit = round(time.monotonic() - self.t0, 2), str(code)
            del self.live[slot]
            if restart and code == 75:  # an atomic run holds the group: try again a little later
                self.due[slot] = time.monotonic() + 2.0
            elif restart:
                self.start(slot)

    def kill_one(self, rng: random.Random) -> bool:
        if not self.live:
            return False
        slot = rng.choice(sorted(self.live))
        proc, record = self.live.pop(slot)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        code = proc.wait(30)
        record.ended = round(time.monotonic() - self.t0, 2)
        record.exit = "SIGKILL" if code == -signal.SIGKILL else str(code)
        record.killed_after_s = round(record.ended - record.started, 2)
        self.start(slot)
        return code == -signal.SIGKILL

    def finish(self, timeout: float) -> None:
        """Let the live runs end by themselves (no restart); SIGTERM any still going at ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.live and time.monotonic() < deadline:
            self.reap(restart=False)
            time.sleep(0.2)
        for proc, _ in self.live.values():
            proc.send_signal(signal.SIGTERM)
        for proc, _ in self.live.values():
            proc.wait(60)
        self.reap(restart=False)


# -- the checks -----------------------------------------------------------------------------------------


def handled(engine: Any, schema: str, topic: str) -> dict[int, tuple[int, int, int, int]]:
    """partition -> (messages handled, distinct offsets, lowest, highest) over metrics and rejects."""
    import sqlalchemy as sa

    sql = f"""
        WITH handled AS (
            SELECT partition, "offset" FROM "{schema}".website_metrics WHERE topic = :t
            UNION ALL
            SELECT partition, "offset" FROM "{schema}".website_metrics_rejects WHERE topic = :t
        )
        SELECT partition, count(*), count(DISTINCT "offset"), min("offset"), max("offset")
        FROM handled GROUP BY partition
    """
    with engine.connect() as conn:
        return {int(r[0]): tuple(int(v) for v in r[1:]) for r in conn.execute(sa.text(sql), {"t": topic})}


def what_the_operator_saw(result: Result, event: dict[str, Any]) -> None:
    """Two of three brokers lost: the runs give up within their bound, and say the truth."""
    limit = result.retry_deadline + 60  # the silence bound, plus a cycle's load and the start-up
    if event.get("still_running") or event.get("gave_up_after_s", 0) > limit:
        result.failures.append(
            f"two brokers lost: the runs went on for {event.get('gave_up_after_s')}s (limit {limit:.0f}s)"
        )
    for n, run in event.get("runs", {}).items():
        if any(lag is None for lag in run["lags"].values()):
            result.failures.append(f"two brokers lost: run {n}'s report shows lag null: {run['lags']}")
        if run["raw_kafka_lines"]:
            result.failures.append(
                f"two brokers lost: run {n} printed {run['raw_kafka_lines']} raw Kafka lines"
            )
        if run["timeout_none_lines"]:
            result.failures.append(f"two brokers lost: run {n} logged 'KafkaTimeoutError: None'")


def check(result: Result, engine: Any, schema: str) -> None:
    import sqlalchemy as sa

    topic, group, ends = result.topic, result.group, result.end_offsets
    counts = handled(engine, schema, topic)
    for p, end in sorted(ends.items()):
        n, distinct, lo, hi = counts.get(p, (0, 0, 0, -1))
        if n != distinct:
            result.failures.append(f"partition {p}: {n - distinct} messages stored twice")
        if (distinct, lo, hi) != ((end, 0, end - 1) if end else (0, 0, -1)):
            result.failures.append(
                f"partition {p}: end offset {end}, but {distinct} distinct offsets handled ({lo}..{hi})"
            )
    q = f'"{schema}"'
    with engine.connect() as conn:
        stored = dict(
            conn.execute(
                sa.text(
                    f"SELECT partition, next_offset FROM {q}.etl_offsets WHERE group_id = :g AND topic = :t"
                ),
                {"g": group, "t": topic},
            ).all()
        )
        running = conn.execute(
            sa.text(f"SELECT count(*) FROM {q}.etl_runs WHERE group_id = :g AND status = 'running'"),
            {"g": group},
        ).scalar_one()
        statuses = dict(
            conn.execute(
                sa.text(f"SELECT status, count(*) FROM {q}.etl_runs WHERE group_id = :g GROUP BY 1"),
                {"g": group},
            ).all()
        )
        result.counts |= {
            "metrics": conn.execute(
                sa.text(f"SELECT count(*) FROM {q}.website_metrics WHERE topic = :t"), {"t": topic}
            ).scalar_one(),
            "rejects": conn.execute(
                sa.text(f"SELECT count(*) FROM {q}.website_metrics_rejects WHERE topic = :t"), {"t": topic}
            ).scalar_one(),
        }
    result.counts.update({f"etl_runs {k}": int(v) for k, v in sorted(statuses.items())})
    # The rollups and latest states the cycles kept, against a recomputation from the raw rows: a
    # SIGKILLed cycle rolled back whole, so they must agree exactly. ("Up since" is counted, not
    # failed: the sample's checks of one URL are spread over partitions, so they arrive out of order.)
    from etl.db import rollups
    from etl.db.tables import build_tables

    with engine.begin() as conn:
        agree = rollups.check(conn, build_tables(schema))
    result.counts |= {f"rollups {k} differing": v for k, v in agree.as_dict()["differ"].items()}
    if not agree.ok:
        result.failures.append(f"the rollups differ from the raw rows: {agree.as_dict()['differ']}")
    if {int(p): int(o) for p, o in stored.items()} != ends:
        result.failures.append(
            f"stored offsets {dict(sorted(stored.items()))} are not the end offsets {ends}"
        )
    if running:
        result.failures.append(f"{running} etl_runs rows still say 'running'")
    expected = {"SIGKILL", *map(str, EXPECTED_EXITS)}
    if any(r.atomic for r in result.runs):  # the others skip (75) while an atomic run holds the group
        expected.add("75")
    bad = [r for r in result.runs if r.exit not in expected]
    for r in bad:
        what = "an unexpected error (a bug)" if r.exit == "1" else "an unexpected exit code"
        result.failures.append(f"run {r.n} exited {r.exit}: {what}; see run-{r.n:03d}.err")
    for event in result.events:
        if event["event"] == "two_brokers_lost":
            what_the_operator_saw(result, event)
    if result.final.get("exit") != 0:
        result.failures.append(f"the final run exited {result.final.get('exit')}; see final.err")


# -- the scenario ---------------------------------------------------------------------------------------


def chaos(opts: Options, env: Mapping[str, str] | None = None) -> Result:
    """Run the scenario against the stack of ``env`` (default: the environment or .stack/env)."""
    rng = random.Random(opts.seed)
    env = dict(env) if env is not None else stack_env()
    name = f"chaos_{uuid.UUID(int=rng.getrandbits(128)).hex[:8]}_{int(time.time()) % 100000}"
    results = opts.results or REPO / "chaos-results" / f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{name}"
    results.mkdir(parents=True, exist_ok=True)
    bootstrap = cluster_bootstrap(env) if opts.cluster else env["METRIC_ETL_BOOTSTRAP_SERVERS"]
    run_env = {
        k: v for k, v in env.items() if not k.startswith("METRIC_ETL_") or k.startswith("METRIC_ETL_DB_")
    }
    run_env.update(
        METRIC_ETL_BOOTSTRAP_SERVERS=bootstrap,
        METRIC_ETL_TOPIC=name,
        METRIC_ETL_GROUP_ID=f"g-{name}",
        METRIC_ETL_DB_SCHEMA=name,
        METRIC_ETL_MAX_POLL_RECORDS=str(opts.max_poll_records),
        METRIC_ETL_RETRY_DEADLINE=str(opts.retry_deadline),
        METRIC_ETL_DB_URL=env["METRIC_ETL_DB_URL"],
        METRIC_ETL_DB_PASSWORD=env.get("METRIC_ETL_DB_PASSWORD", ""),
    )
    result = Result(
        topic=name,
        schema=name,
        group=f"g-{name}",
        seed=opts.seed,
        results=str(results),
        retry_deadline=opts.retry_deadline,
    )
    say = _printer(results)
    say(f"chaos: seed {opts.seed}, topic and schema {name}, results in {results}")

    t = time.monotonic()
    sample = ["produce-sample", "-n", str(opts.messages), "--partitions", str(opts.partitions)]
    sample += ["--corrupt-ratio", str(opts.corrupt_ratio), "--seed", str(opts.seed)]
    produce = subprocess.run(
        [sys.executable, "-m", "etl", *sample],
        env=run_env,
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    (results / "produce.log").write_text(produce.stdout + produce.stderr)
    if produce.returncode != 0:
        raise SystemExit(f"chaos: produce-sample exited {produce.returncode}:\n{produce.stderr[-2000:]}")
    result.durations["produce"] = time.monotonic() - t
    result.end_offsets = kafka_ends(bootstrap, name)
    factor, default = replication(bootstrap, name)
    result.counts["replication_factor"] = factor
    if factor != default:
        result.failures.append(
            f"produce-sample made the topic with replication factor {factor}, not the default {default}"
        )
    result.messages = sum(result.end_offsets.values())
    say(f"{produce.stdout.strip()} in {result.durations['produce']:.1f}s")

    engine = engine_for(env)
    services = Services(env, bootstrap, rng, opts)
    events: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    if opts.cluster:
        events = [
            ("leader_kill", lambda: services.leader_kill(name)),
            ("rolling_restart", services.rolling_restart),
            ("two_brokers_lost", lambda: services.two_brokers_lost(name, runs, results)),
        ]
    else:
        if opts.pg_restart:
            events.append(("pg_restart", services.pg_restart))
        if opts.broker_restart:
            events.append(("broker_restart", services.broker_restart))
    # Each event starts at a random kill among the middle ones, or once a random share of the backlog
    # is handled (the cluster scenario has no kills), whichever comes first.
    triggers = sorted(
        (rng.randint(max(1, opts.kills // 5), max(1, opts.kills * 4 // 5)), rng.uniform(0.15, 0.6))
        for _ in events
    )
    t = time.monotonic()
    runs = Runs(run_env, results, result, opts)
    for slot in range(opts.runs):
        runs.start(slot)
    # A kill is armed once the runs have handled more since the previous kill (or after kill_wait
    # seconds without), then strikes after a random gap: kills land while runs load, not only while
    # the group is rebalancing after the last one.
    next_kill: float | None = None
    mark, unarmed_since, checked = 0, t, 0.0
    worker: threading.Thread | None = None
    errors: list[BaseException] = []

    def run_event(kind: str, fn: Callable[[], dict[str, Any]]) -> None:
        at = time.monotonic() - t
        say(f"{at:6.1f}s  {kind} ...")
        try:
            info = fn()
        except BaseException as exc:  # reported after the chaos; the services must come back first
            errors.append(exc)
            info = {"error": str(exc)}
        took = time.monotonic() - t - at
        result.events.append({"event": kind, "at_s": round(at, 1), "took_s": round(took, 1), **info})
        say(f"{time.monotonic() - t:6.1f}s  {kind} done in {took:.1f}s")

    try:
        while True:
            runs.reap(restart=True)
            now = time.monotonic()
            if now - t > opts.chaos_timeout:
                result.failures.append(f"the chaos phase did not end within {opts.chaos_timeout:.0f}s")
                break
            if result.kills < opts.kills and next_kill is None and now - checked > 0.3:
                checked = now
                if _done(engine, name, result.group) > mark or now - unarmed_since > opts.kill_wait:
                    next_kill = now + rng.uniform(*opts.kill_gap)
            if next_kill is not None and now >= next_kill:
                if runs.kill_one(rng):
                    result.kills += 1
                    mark = _done(engine, name, result.group)
                    say(f"{now - t:6.1f}s  SIGKILL {result.kills}/{opts.kills} ({mark:,} messages handled)")
                next_kill, unarmed_since = None, now
            if events and (worker is None or not worker.is_alive()):
                at_kill, at_share = triggers[0]
                done = _done(engine, name, result.group) / max(result.messages, 1)
                if (opts.kills and result.kills >= at_kill) or done >= at_share:
                    triggers.pop(0)
                    kind, fn = events.pop(0)
                    worker = threading.Thread(target=run_event, args=(kind, fn), daemon=True)
                    worker.start()
            if result.kills >= opts.kills and not events and (worker is None or not worker.is_alive()):
                break
            time.sleep(0.05)
    finally:
        if worker is not None:
            worker.join()
        runs.finish(timeout=opts.final_timeout)
    result.durations["chaos"] = time.monotonic() - t
    if errors:
        result.failures += [f"a service event failed: {e}" for e in errors]

    # The killed runs' group members stay until their sessions expire; an ordinary next run comes later.
    t = time.monotonic()
    wait_for("the killed runs' group members to expire", lambda: group_empty(bootstrap, result.group), 120)
    result.durations["group_expiry_wait"] = time.monotonic() - t
    result.handled_before_final = _done(engine, name, result.group)
    say(f"chaos over: {result.kills} kills; {result.handled_before_final:,} handled; the final run ...")

    t = time.monotonic()
    final_env = {**run_env}
    del final_env["METRIC_ETL_MAX_POLL_RECORDS"]
    with (results / "final.out").open("wb") as out, (results / "final.err").open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "etl", "run", "--output", "json"],
            env=final_env,
            cwd=str(REPO),
            stdout=out,
            stderr=err,
        )
        try:
            code = proc.wait(opts.final_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    result.durations["final_run"] = time.monotonic() - t
    result.final = {"exit": code, **_summary(results / "final.out")}

    check(result, engine, name)
    engine.dispose()
    result.durations = {k: round(v, 1) for k, v in result.durations.items()}
    (results / "summary.json").write_text(json.dumps(result.as_dict(), indent=2, default=str))
    say(result.to_text())
    return result


def _done(engine: Any, schema: str, group: str) -> int:
    import sqlalchemy as sa

    try:
        with engine.connect() as conn:
            sql = f'SELECT coalesce(sum(next_offset), 0) FROM "{schema}".etl_offsets WHERE group_id = :g'
            return int(conn.execute(sa.text(sql), {"g": group}).scalar_one())
    except Exception:  # no tables yet, or PostgreSQL restarting
        return 0


def _summary(path: Path) -> dict[str, Any]:
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"summary": "no JSON report"}
    return {
        "summary": f"{report.get('status')} ({report.get('stop_reason')}): read {report.get('read')}, "
        f"loaded {report.get('loaded')}, rejected {report.get('rejected')}, "
        f"duplicates {report.get('duplicates')}",
        "read": report.get("read"),
    }


def _printer(results: Path) -> Callable[[str], None]:
    log = (results / "chaos.log").open("a")

    def say(line: str) -> None:
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    return say


def parse(argv: list[str] | None = None) -> Options:
    d = Options()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=d.messages, help="backlog size (default %(default)s)")
    p.add_argument("--corrupt-ratio", type=float, default=d.corrupt_ratio, help="share of bad messages")
    p.add_argument("--partitions", type=int, default=d.partitions)
    p.add_argument("--runs", type=int, default=d.runs, help="runs alive at once (default %(default)s)")
    p.add_argument("--kills", type=int, default=d.kills, help="SIGKILLs (default %(default)s)")
    p.add_argument("--kill-gap", type=float, nargs=2, default=d.kill_gap, metavar=("MIN", "MAX"))
    p.add_argument("--kill-wait", type=float, default=d.kill_wait)
    p.add_argument("--no-pg-restart", dest="pg_restart", action="store_false")
    p.add_argument("--no-broker-restart", dest="broker_restart", action="store_false")
    p.add_argument("--cluster", action="store_true", help="on the three-broker cluster (make cluster-up)")
    p.add_argument("--seed", type=int, default=d.seed, help="same seed, same backlog and schedule")
    p.add_argument("--max-poll-records", type=int, default=d.max_poll_records)
    p.add_argument("--retry-deadline", type=float, default=d.retry_deadline)
    p.add_argument("--sleep", type=float, default=d.sleep, help="--sleep of the chaos runs")
    p.add_argument("--down", type=float, nargs=2, default=d.down_s, metavar=("MIN", "MAX"), dest="down_s")
    p.add_argument("--chaos-timeout", type=float, default=d.chaos_timeout)
    p.add_argument("--final-timeout", type=float, default=d.final_timeout)
    p.add_argument(
        "--atomic-share", type=float, default=d.atomic_share, help="share of the runs started with --atomic"
    )
    p.add_argument("--atomic-cycles", type=int, default=d.atomic_cycles, help="--cycles of an atomic run")
    p.add_argument("--results", type=Path, help="folder for the logs (default chaos-results/<time>-<topic>)")
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(p.parse_args(argv)).items()}
    if given["cluster"]:
        # One run at a time, slowed down so the leader kill and the rolling restart land mid-run;
        # flags given still win.
        flags = " ".join(argv if argv is not None else sys.argv[1:])
        for key, value in CLUSTER_DEFAULTS.items():
            if f"--{key.replace('_', '-')}" not in flags:
                given[key] = value
    return Options(**given)


CLUSTER_DEFAULTS = {
    "messages": 100_000,
    "runs": 1,
    "kills": 0,
    "max_poll_records": 200,
    "sleep": 0.5,
    "retry_deadline": 60.0,
}


def main(argv: list[str] | None = None) -> int:
    return 0 if chaos(parse(argv)).ok else 1


if __name__ == "__main__":
    sys.exit(main())
