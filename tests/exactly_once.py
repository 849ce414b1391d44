"""The exactly-once invariant, checked with SQL, and the means to break things for real.

Used by the fault, concurrency, privilege and property tests. Everything here acts on the real
local stack: the job runs as a real process, PostgreSQL is stopped with ``pg_ctl`` and the broker
with ``scripts/kafka.sh``, exactly as an operator (or a crash) would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tests.support import REPO

# -- the invariant --------------------------------------------------------------------------------


def handled(engine: sa.Engine, schema: str, topic: str) -> dict[int, tuple[int, int, int]]:
    """partition -> (messages handled, lowest offset, highest offset) over metrics and rejects."""
    sql = f"""
        WITH handled AS (
            SELECT partition, "offset" FROM "{schema}".website_metrics WHERE topic = :t
            UNION ALL
            SELECT partition, "offset" FROM "{schema}".website_metrics_rejects WHERE topic = :t
        )
        SELECT partition, count(*), min("offset"), max("offset") FROM handled GROUP BY partition
    """
    with engine.connect() as conn:
        return {
            int(p): (int(n), int(lo), int(hi)) for p, n, lo, hi in conn.execute(sa.text(sql), {"t": topic})
        }


def twice(engine: sa.Engine, schema: str, topic: str) -> list[tuple[int, int, int]]:
    """(partition, offset, copies) of every message stored more than once, in one table or both (a
    topic's incarnations are different messages: see etl.contract.MESSAGE_KEY)."""
    sql = f"""
        WITH handled AS (
            SELECT partition, incarnation, "offset" FROM "{schema}".website_metrics WHERE topic = :t
            UNION ALL
            SELECT partition, incarnation, "offset" FROM "{schema}".website_metrics_rejects WHERE topic = :t
        )
        SELECT partition, "offset", count(*) FROM handled GROUP BY partition, incarnation, "offset"
        HAVING count(*) > 1 LIMIT 20
    """
    with engine.connect() as conn:
        return [tuple(map(int, row)) for row in conn.execute(sa.text(sql), {"t": topic})]


def stored_offsets(engine: sa.Engine, schema: str, topic: str, group: str) -> dict[int, int]:
    sql = f'SELECT partition, next_offset FROM "{schema}".etl_offsets WHERE topic = :t AND group_id = :g'
    with engine.connect() as conn:
        return {int(p): int(n) for p, n in conn.execute(sa.text(sql), {"t": topic, "g": group})}


def tables_exist(engine: sa.Engine, schema: str) -> bool:
    """A run killed while starting may not have created its tables (DDL is transactional)."""
    names = ("website_metrics", "website_metrics_rejects", "etl_offsets")
    with engine.connect() as conn:
        found = [
            conn.execute(sa.text("SELECT to_regclass(:n)"), {"n": f'"{schema}".{n}'}).scalar() for n in names
        ]
    assert all(found) or not any(found), (
        f"some of the job's tables exist, not all: {dict(zip(names, found, strict=True))}"
    )
    return all(found)


def assert_consistent(engine: sa.Engine, schema: str, topic: str, group: str) -> dict[int, int]:
    """At any moment, even right after a crash: for each partition the stored offset is N and the
    messages handled are exactly offsets 0..N-1, each in one table, once. Returns the offsets."""
    if not tables_exist(engine, schema):
        return {}
    doubles = twice(engine, schema, topic)
    assert not doubles, f"messages stored twice (partition, offset, copies): {doubles}"
    offsets = stored_offsets(engine, schema, topic, group)
    counts = handled(engine, schema, topic)
    for p in set(offsets) | set(counts):
        n = offsets.get(p, 0)
        got = counts.get(p, (0, 0, -1))
        want = (n, 0, n - 1) if n else (0, 0, -1)
        assert got == want, (
            f"partition {p}: stored next_offset {n}, but (count, min, max) of handled offsets is {got}"
        )
    return offsets


def assert_exactly_once(
    engine: sa.Engine, schema: str, topic: str, group: str, ends: Mapping[int, int]
) -> None:
    """Every message that reached the topic (offsets 0..end-1 of each partition) is stored exactly
    once, in the metrics table or in the rejects table, and the stored offsets say so."""
    offsets = assert_consistent(engine, schema, topic, group)
    assert {p: offsets.get(p, 0) for p in ends} == dict(ends)
    assert set(offsets) <= set(ends)


def kafka_ends(stack: Mapping[str, str], topic: str) -> dict[int, int]:
    """partition -> end offset (messages produced, on a fresh topic)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=stack["METRIC_ETL_BOOTSTRAP_SERVERS"])
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        return {tp.partition: int(o) for tp, o in consumer.end_offsets(tps).items()}
    finally:
        consumer.close()


def reject_count(engine: sa.Engine, schema: str, where: str = "") -> int:
    with engine.connect() as conn:
        sql = f'SELECT count(*) FROM "{schema}".website_metrics_rejects {where}'
        return int(conn.execute(sa.text(sql)).scalar_one())


# -- waiting ----------------------------------------------------------------------------------------


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60, every: float = 0.05) -> Any:
    """Poll ``check`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


# -- the job as a real process ---------------------------------------------------------------------


class Job:
    """``python -m etl run ARGS`` as a child process, its output in files (a pipe could fill up)."""

    def __init__(self, env: Mapping[str, str], args: list[str], workdir: Path, name: str = "job") -> None:
        self.args = args
        self.out_path = workdir / f"{name}.out"
        self.err_path = workdir / f"{name}.err"
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "etl", "run", *args],
                env=dict(env),
                cwd=str(REPO),
                stdout=out,
                stderr=err,
            )
        self._run_id: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(
                f"metric-etl run {self.args} did not end in {timeout:.0f}s:\n{self.stderr[-3000:]}"
            ) from None

    def send(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind, as the kernel's OOM killer or a lost host would."""
        self.send(signal.SIGKILL)
        self.proc.wait(10)

    def run_id(self, engine: sa.Engine, schema: str, timeout: float = 30) -> str:
        """The run's id, from its own etl_runs row (matched by process id)."""
        if self._run_id is None:
            sql = f'SELECT run_id FROM "{schema}".etl_runs WHERE pid = :pid ORDER BY started_at DESC LIMIT 1'

            def find() -> str | None:
                if not self.alive():
                    raise AssertionError(f"the run ended before it recorded itself:\n{self.stderr[-3000:]}")
                with contextlib.suppress(sa.exc.ProgrammingError), engine.connect() as conn:
                    return conn.execute(sa.text(sql), {"pid": self.pid}).scalar()
                return None

            self._run_id = wait_for("the run's etl_runs row", find, timeout)
        return self._run_id


def committed_cycles(engine: sa.Engine, schema: str, run_id: str) -> int:
    """Cycles the run has committed (its etl_runs row is updated in each load transaction)."""
    with engine.connect() as conn:
        sql = f'SELECT cycles FROM "{schema}".etl_runs WHERE run_id = :r'
        return int(conn.execute(sa.text(sql), {"r": run_id}).scalar() or 0)


def backends(engine: sa.Engine, run_id: str, *, writing: bool = False) -> list[int]:
    """Server pids of the run's connections (its application_name carries the run id); with
    ``writing``, only those inside a transaction that has written something."""
    sql = "SELECT pid FROM pg_stat_activity WHERE application_name = :app"
    if writing:
        sql += " AND backend_xid IS NOT NULL"
    with engine.connect() as conn:
        return [int(p) for p in conn.execute(sa.text(sql), {"app": f"metric-etl run {run_id}"}).scalars()]


def terminate(engine: sa.Engine, pids: list[int]) -> int:
    """pg_terminate_backend each pid; returns how many were terminated."""
    with engine.connect() as conn:
        done = sum(
            bool(conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": p}).scalar()) for p in pids
        )
        conn.commit()
    return done


# -- stopping and starting the services --------------------------------------------------------------


@contextlib.contextmanager
def _terminate_raises() -> Iterator[None]:
    """SIGTERM (a CI time-out, someone stopping the tests) raises, so ``finally`` restarts the
    service: other people's tests run against the same stack."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum} while a service was stopped")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _as_owner(cmd: list[str]) -> list[str]:
    """The PostgreSQL cluster runs as OS user postgres when the stack was made by root."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _pg_bindir() -> Path:
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True
    )
    for d in candidates:
        if (d / "pg_ctl").exists():
            return d
    found = subprocess.run(["sh", "-c", "command -v pg_ctl"], capture_output=True, text=True).stdout.strip()
    return Path(found).resolve().parent


class Postgres:
    """The stack's throwaway cluster (.stack/pg/data), stopped and started like scripts/pg.sh does."""

    def __init__(self, stack: Mapping[str, str], admin: sa.Engine) -> None:
        self.data = Path(stack["STACK_DIR"]) / "pg" / "data"
        self.log = Path(stack["STACK_DIR"]) / "pg" / "postgres.log"
        self.admin = admin

    @property
    def ours(self) -> bool:
        """False when the stack uses an existing server (METRIC_ETL_STACK_PG_URL): not ours to stop."""
        return (self.data / "postmaster.pid").is_file()

    def _ctl(self, *args: str) -> None:
        cmd = _as_owner([str(_pg_bindir() / "pg_ctl"), "-D", str(self.data), *args])
        proc = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=90, start_new_session=True
        )
        assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stdout}{proc.stderr}"

    def stop(self) -> None:
        self._ctl("-m", "fast", "-w", "-t", "30", "stop")

    def start(self) -> None:
        # The same options scripts/pg.sh starts it with (its settings live in the data directory).
        if not (self.data / "postmaster.pid").is_file():
            self._ctl("-l", str(self.log), "-w", "-t", "60", "start")
        self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            try:
                with self.admin.connect() as conn:
                    conn.execute(sa.text("SELECT 1"))
                return True
            except sa.exc.OperationalError:
                return False

        self.admin.dispose()
        wait_for("PostgreSQL to accept connections", ready, timeout, every=0.2)

    @contextlib.contextmanager
    def down(self) -> Iterator[None]:
        """PostgreSQL stopped inside the block, and running again after it, whatever happens."""
        with _terminate_raises():
            self.stop()
            try:
                yield
            finally:
                self.start()


class Kafka:
    """The stack's broker, stopped and started with scripts/kafka.sh."""

    def __init__(self, stack: Mapping[str, str]) -> None:
        self.env = {**os.environ, "METRIC_ETL_STACK_DIR": stack["STACK_DIR"]}
        self.plaintext = stack["METRIC_ETL_BOOTSTRAP_SERVERS"]

    def _script(self, action: str) -> None:
        proc = subprocess.run(
            [str(REPO / "scripts" / "kafka.sh"), action],
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=180,
            start_new_session=True,
        )
        assert proc.returncode == 0, f"scripts/kafka.sh {action}: {proc.stdout}{proc.stderr}"

    def stop(self) -> None:
        self._script("down")

    def start(self) -> None:
        self._script("up")
        self.wait_ready()

    def wait_ready(self, timeout: float = 90) -> None:
        """Ports open is not enough: wait until the broker answers metadata and group requests."""
        from kafka import KafkaAdminClient

        def ready() -> bool:
            try:
                admin = KafkaAdminClient(
                    bootstrap_servers=self.plaintext, request_timeout_ms=5000, bootstrap_timeout_ms=5000
                )
            except Exception:
                return False
            try:
                admin.list_topics()
                admin.list_groups()
                return True
            except Exception:
                return False
            finally:
                admin.close()

        wait_for("the Kafka broker to answer", ready, timeout, every=0.5)

    @contextlib.contextmanager
    def down(self) -> Iterator[None]:
        """The broker stopped inside the block, and running again after it, whatever happens."""
        with _terminate_raises():
            self.stop()
            try:
                yield
            finally:
                self.start()
