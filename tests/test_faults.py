"""Nothing lost, nothing twice, whatever breaks: the job killed, PostgreSQL and the broker restarted,
connections cut, a full disk, signals. Each fault is real (a real process, the real services), and
each test ends with the invariant checked in SQL: every offset of every partition stored exactly
once, in the metrics table or in the rejects table, and the stored offsets saying so.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from etl.db import store
from etl.run import run_batch
from etl.run.pipeline import Pipeline
from tests.exactly_once import (
    Job,
    Kafka,
    Postgres,
    assert_consistent,
    assert_exactly_once,
    backends,
    committed_cycles,
    kafka_ends,
    reject_count,
    stored_offsets,
    terminate,
    wait_for,
)
from tests.support import cli_env, count, good_message, produce, rows, run_cli, settings_for, skip_outside_ci

pytestmark = pytest.mark.services


def backlog(n: int, *, bad_every: int = 0) -> list[bytes | None]:
    """``n`` messages, good except every ``bad_every``-th (undecodable, not JSON, or out of range)."""
    bad = [b"\xff\xfe not utf-8", b"{truncated", good_message(0, status_code=999)]
    return [
        bad[(i // bad_every) % len(bad)] if bad_every and i % bad_every == bad_every - 1 else good_message(i)
        for i in range(n)
    ]


def report_of(job: Job) -> dict:
    return json.loads(job.stdout)


def app_engine(stack) -> sa.Engine:
    return sa.create_engine(stack.app_db_url(), pool_pre_ping=True)


def create_tables(stack, schema: str) -> None:
    """The job's tables, created the way the job creates them (as the app role, which owns them)."""
    from etl.db.schema import ensure_tables, tables_for

    engine = app_engine(stack)
    try:
        with engine.begin() as conn:
            ensure_tables(conn, tables_for(settings_for(stack, "unused", schema)))
    finally:
        engine.dispose()


def install_fault(admin: sa.Engine, schema: str, body: str, times: int | None) -> None:
    """A statement trigger on the metrics table that runs ``body`` on the first ``times`` inserts
    (every insert when None). A sequence counts attempts: it is not rolled back with them."""
    limit = "true" if times is None else f"nextval('\"{schema}\".fault_count') <= {times}"
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SEQUENCE "{schema}".fault_count'))
        conn.execute(sa.text(f'GRANT USAGE ON SEQUENCE "{schema}".fault_count TO PUBLIC'))
        conn.execute(
            sa.text(
                f"""CREATE FUNCTION "{schema}".fault() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN IF {limit} THEN {body} END IF; RETURN NULL; END $$"""
            )
        )
        conn.execute(
            sa.text(
                f'CREATE TRIGGER fault BEFORE INSERT ON "{schema}".website_metrics '
                f'FOR EACH STATEMENT EXECUTE FUNCTION "{schema}".fault()'
            )
        )


def fault_count(admin: sa.Engine, schema: str) -> int:
    with admin.connect() as conn:
        return int(conn.execute(sa.text(f'SELECT last_value FROM "{schema}".fault_count')).scalar_one())


DISK_FULL = (
    "RAISE EXCEPTION 'could not extend file \"base/1/2\": No space left on device' "
    "USING ERRCODE = 'disk_full';"
)
LOSE_CONNECTION = "PERFORM pg_terminate_backend(pg_backend_pid());"


# -- SIGKILL ----------------------------------------------------------------------------------------


def _stopped(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("T", "t", "Z")


def kill_when(job: Job, condition, timeout: float) -> bool:
    """Freeze the job at random instants (SIGSTOP) until ``condition()`` holds for its frozen state,
    then SIGKILL it there. True if the condition was met, False if it was killed at the deadline."""
    deadline = time.monotonic() + timeout
    while job.alive() and time.monotonic() < deadline:
        _freeze(job)
        try:
            if condition():
                job.kill()
                return True
        finally:
            if job.alive():
                job.send(signal.SIGCONT)
        time.sleep(random.uniform(0, 0.02))
    if job.alive():
        job.kill()
    return False


def evict_members(kafka_admin, group: str) -> None:
    """What a member's session expiry would do, without waiting for it (see the SIGKILL test)."""
    from kafka.admin import MemberToRemove

    members = kafka_admin.describe_groups([group])[group]["members"]
    if members:
        kafka_admin.remove_group_members(group, [MemberToRemove(member_id=m["member_id"]) for m in members])


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing_and_loads_nothing_twice(
    stack, make_topic, pg_schema, admin_engine, kafka_admin, tmp_path
) -> None:
    """24 SIGKILLs over one backlog: while starting, between and inside cycles, inside the load
    transaction, and after the database commit but before the Kafka commit. After every kill the
    database is consistent; a final clean run completes the work."""
    rng = random.Random(20261128)
    random.seed(rng.random())
    topic = make_topic(partitions=3)
    group = f"g-{topic}"
    produce(stack, topic, backlog(2500, bad_every=29), partitions=3)
    ends = kafka_ends(stack, topic)
    env = cli_env(stack, topic, pg_schema, METRIC_ETL_MAX_POLL_RECORDS="20", METRIC_ETL_RETRY_DEADLINE="30")
    from kafka import TopicPartition

    def db_ahead_of_kafka(run_id: str) -> bool:
        """The run's latest load transaction committed, and Kafka has not got its offsets yet."""
        latest = f"""
            SELECT partition, next_offset FROM "{pg_schema}".etl_offsets o
            WHERE o.group_id = :g AND o.topic = :t AND o.run_id = :r AND o.updated_at = (
                SELECT max(updated_at) FROM "{pg_schema}".etl_offsets WHERE group_id = :g AND run_id = :r)
        """
        with admin_engine.connect() as conn:
            advanced = conn.execute(sa.text(latest), {"g": group, "t": topic, "r": run_id}).all()
        if not advanced:
            return False
        committed = kafka_admin.list_group_offsets({group: None}).get(group, {})
        for p, n in advanced:
            at = committed.get(TopicPartition(topic, p))
            if at is None or at.offset < n:
                return True
        return False

    # Mode per kill. A SIGKILLed member stays in the group until its session expires (10 s), and the
    # next run's join waits for it: the last trials show that path; in the others the test evicts
    # the dead member at once, as its expiry would, to keep the test short.
    def kill_once(job: Job, mode: str) -> bool:
        """Kill the run at a moment of the given kind; True if that moment was reached."""
        if mode == "starting":
            time.sleep(rng.uniform(0.1, 1.2))
            job.kill()
            return True
        run_id = job.run_id(admin_engine, pg_schema)
        wait_for(
            "the run to commit a cycle",
            lambda: committed_cycles(admin_engine, pg_schema, run_id) > 0 or not job.alive(),
            60,
        )
        assert job.alive(), f"the run ended before it could be killed:\n{job.stderr[-3000:]}"
        if mode == "random":
            time.sleep(rng.uniform(0, 0.6))
            job.kill()
            return True
        if mode == "in_transaction":
            return kill_when(job, lambda: backends(admin_engine, run_id, writing=True), 15)
        return kill_when(job, lambda: db_ahead_of_kafka(run_id), 15)

    # A SIGKILLed member stays in the group until its session expires (10 s), and the next run's
    # join waits for it: the last trials show that path; in the others the test evicts the dead
    # member at once, as its expiry would, to keep the test short.
    modes = ["starting", "random", "in_transaction", "after_db_commit"] * 6
    hits: dict[str, int] = {}
    for trial, mode in enumerate(modes):
        job = Job(env, ["--output", "json"], tmp_path, name=f"kill{trial}")
        hits[mode] = hits.get(mode, 0) + kill_once(job, mode)
        assert job.proc.returncode == -signal.SIGKILL
        assert_consistent(admin_engine, pg_schema, topic, group)
        if trial < len(modes) - 4:
            evict_members(kafka_admin, group)

    done = sum(stored_offsets(admin_engine, pg_schema, topic, group).values())
    print(
        f"{len(modes)} SIGKILLs, moments reached: {hits}; {done} of 2500 messages done before the final run"
    )
    assert hits["in_transaction"] >= 5 and hits["after_db_commit"] >= 4, hits
    assert sum(stored_offsets(admin_engine, pg_schema, topic, group).values()) < sum(ends.values())

    final = Job({**env, "METRIC_ETL_MAX_POLL_RECORDS": "500"}, ["--output", "json"], tmp_path, name="final")
    assert final.wait(120) == 0, final.stderr[-3000:]
    assert report_of(final)["stop_reason"] == "caught_up"
    assert_exactly_once(admin_engine, pg_schema, topic, group, ends)
    assert reject_count(admin_engine, pg_schema) == 2500 // 29  # the bad ones, and only those


def test_kafka_commit_lost_after_the_database_commit_is_harmless(
    stack, make_topic, pg_schema, admin_engine, kafka_admin
) -> None:
    """The database is the source of truth: Kafka's offsets rewound to 0 (as if every Kafka commit
    after a database commit had been lost) make the next run read nothing again."""
    from kafka import TopicPartition
    from kafka.structs import OffsetAndMetadata

    topic = make_topic(partitions=2)
    produce(stack, topic, backlog(200, bad_every=10), partitions=2)
    s = settings_for(stack, topic, pg_schema)
    assert run_batch(s).loaded == 180
    kafka_admin.alter_group_offsets(
        s.group_id, {TopicPartition(topic, p): OffsetAndMetadata(0, "", -1) for p in (0, 1)}
    )
    again = run_batch(s)
    assert (again.read, again.loaded, again.rejected) == (0, 0, 0)
    assert_exactly_once(admin_engine, pg_schema, topic, s.group_id, kafka_ends(stack, topic))


# -- PostgreSQL -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_postgres_restart_mid_run_rolls_back_retries_or_exits_4(
    stack, make_topic, pg_schema, admin_engine, tmp_path
) -> None:
    """PostgreSQL stopped for a few seconds in the middle of two runs: the one with a long retry
    deadline (and --lock, whose session lock dies with the server) completes; the one with a short
    deadline exits 4. Neither moves an offset without its rows."""
    pg = Postgres(stack, admin_engine)
    if not pg.ours:
        skip_outside_ci("the stack uses an existing PostgreSQL server; not ours to restart")
    patient_topic, hasty_topic = make_topic(partitions=2), make_topic(partitions=2)
    for topic in (patient_topic, hasty_topic):
        produce(stack, topic, backlog(1500, bad_every=50), partitions=2)
    small = {"METRIC_ETL_MAX_POLL_RECORDS": "10"}
    patient = Job(
        cli_env(stack, patient_topic, pg_schema, METRIC_ETL_RETRY_DEADLINE="60", **small),
        ["--lock", "--sleep", "0.05", "--output", "json"],
        tmp_path,
        "patient",
    )
    hasty = Job(
        cli_env(stack, hasty_topic, pg_schema, METRIC_ETL_RETRY_DEADLINE="2", **small),
        ["--sleep", "0.05", "--output", "json"],
        tmp_path,
        "hasty",
    )
    for job in (patient, hasty):
        run_id = job.run_id(admin_engine, pg_schema)
        wait_for("two committed cycles", lambda r=run_id: committed_cycles(admin_engine, pg_schema, r) >= 2)
    with pg.down():
        # Down until the hasty run gave up (its 2 s deadline) and the patient one is retrying.
        wait_for("the hasty run to give up", lambda: not hasty.alive(), 120)
        wait_for("the patient run to retry", lambda: "retrying in" in patient.stderr, 120)
    assert patient.wait(120) == 0, patient.stderr[-3000:]
    assert hasty.wait(120) == 4, hasty.stderr[-3000:]
    # The stage that met the outage varies (a load, the offsets, the run row); the error names it and
    # the server, and says it is PostgreSQL that is unreachable.
    (error,) = [line for line in hasty.stderr.splitlines() if line.startswith("Error: ")]
    host, port = stack["STACK_PG_HOST"], stack["STACK_PG_PORT"]
    assert re.fullmatch(rf"Error: [a-z ]+: PostgreSQL at {re.escape(host)}:{port}/metrics: .+", error), error
    assert report_of(hasty)["status"] == "failed"
    for topic in (patient_topic, hasty_topic):
        assert_consistent(admin_engine, pg_schema, topic, f"g-{topic}")
    assert run_cli(["run"], cli_env(stack, hasty_topic, pg_schema)).returncode == 0
    for topic in (patient_topic, hasty_topic):
        assert_exactly_once(admin_engine, pg_schema, topic, f"g-{topic}", kafka_ends(stack, topic))
    assert reject_count(admin_engine, pg_schema, "WHERE stage = 'database'") == 0


def test_terminated_connections_roll_the_cycle_back_and_are_retried(
    stack, make_topic, pg_schema, admin_engine, tmp_path
) -> None:
    """The run's connections terminated (pg_terminate_backend) again and again, mostly inside load
    transactions: every cycle hit rolls back and is retried; the run completes."""
    topic = make_topic(partitions=3)
    produce(stack, topic, backlog(900, bad_every=40), partitions=3)
    env = cli_env(stack, topic, pg_schema, METRIC_ETL_MAX_POLL_RECORDS="15", METRIC_ETL_RETRY_DEADLINE="30")
    job = Job(env, ["--output", "json"], tmp_path)
    run_id = job.run_id(admin_engine, pg_schema)
    terminated = 0
    while job.alive() and terminated < 15:
        pids = backends(admin_engine, run_id, writing=True) or backends(admin_engine, run_id)
        terminated += terminate(admin_engine, pids)
        time.sleep(random.uniform(0.05, 0.25))
    assert job.wait(120) == 0, job.stderr[-3000:]
    assert terminated >= 10, f"only {terminated} connections were cut before the run ended"
    assert "retrying in" in job.stderr
    assert_exactly_once(admin_engine, pg_schema, topic, f"g-{topic}", kafka_ends(stack, topic))
    assert reject_count(admin_engine, pg_schema) == 900 // 40  # no good message among them


def test_server_ending_the_connection_inside_copy_is_transient(
    stack, make_topic, pg_schema, admin_engine
) -> None:
    """The server ends the session in the middle of the COPY (a trigger terminates its own backend,
    SQLSTATE 57P01): retried; no good row becomes a reject."""
    topic = make_topic(partitions=1)
    produce(stack, topic, [good_message(i) for i in range(60)] + [good_message(60, regex_pattern="\\N")])
    create_tables(stack, pg_schema)
    install_fault(admin_engine, pg_schema, LOSE_CONNECTION, times=3)
    report = run_batch(settings_for(stack, topic, pg_schema, retry_deadline=30))
    assert (report.status, report.loaded, report.rejected) == ("ok", 61, 0)
    assert fault_count(admin_engine, pg_schema) >= 4  # three lost, then it went through
    assert_exactly_once(admin_engine, pg_schema, topic, f"g-{topic}", {0: 61})


def cut_tcp(client_port: int) -> bool:
    """Destroy the client's end of a TCP connection (``ss -K``), as a network failure would."""
    import subprocess

    proc = subprocess.run(["ss", "-K", "-t", f"sport = :{client_port}"], capture_output=True, text=True)
    return proc.returncode == 0 and str(client_port) in proc.stdout


def test_network_cut_inside_copy_is_transient_never_data(
    stack, make_topic, pg_schema, admin_engine, tmp_path
) -> None:
    """The job's TCP connection cut while the COPY is in flight (the server held in a trigger): the
    driver raises a bare error with no SQLSTATE from outside SQLAlchemy. It is a lost connection,
    retried; it never fails the run and never makes a good row a reject."""
    if os.geteuid() != 0:
        skip_outside_ci("cutting another process's TCP connection (ss -K) needs root")
    topic = make_topic(partitions=2)
    produce(stack, topic, backlog(300, bad_every=30), partitions=2)
    create_tables(stack, pg_schema)
    install_fault(admin_engine, pg_schema, "PERFORM pg_sleep(0.4);", times=4)
    env = cli_env(stack, topic, pg_schema, METRIC_ETL_MAX_POLL_RECORDS="50", METRIC_ETL_RETRY_DEADLINE="30")
    job = Job(env, ["--output", "json"], tmp_path)
    run_id = job.run_id(admin_engine, pg_schema)
    sql = (
        "SELECT client_port FROM pg_stat_activity "
        "WHERE application_name = :app AND wait_event = 'PgSleep' AND client_port IS NOT NULL"
    )
    cut: set[int] = set()  # a cut connection's server side may still sleep: never count it twice
    while job.alive() and len(cut) < 3:
        ports = [r.client_port for r in rows(admin_engine, sql, app=f"metric-etl run {run_id}")]
        fresh = [p for p in ports if p not in cut]
        if fresh and cut_tcp(fresh[0]):
            cut.add(fresh[0])
        time.sleep(0.01)  # polling pg_stat_activity for the next attempt
    assert len(cut) == 3, job.stderr[-3000:]
    assert job.wait(120) == 0, job.stderr[-3000:]
    assert "retrying in" in job.stderr
    assert report_of(job)["rejected"] == 300 // 30
    assert reject_count(admin_engine, pg_schema, "WHERE stage = 'database'") == 0
    assert_exactly_once(admin_engine, pg_schema, topic, f"g-{topic}", kafka_ends(stack, topic))


def test_errors_are_classified_through_their_wrappers() -> None:
    """Transient or data is decided by the driver's error, wherever SQLAlchemy or pandas put it."""
    import pandas as pd
    import psycopg2

    class DriverError(Exception):
        def __init__(self, pgcode: str | None) -> None:
            super().__init__(f"SQLSTATE {pgcode}")
            self.pgcode = pgcode

    def wrapped(pgcode: str) -> Exception:
        inner = sa.exc.DBAPIError("COPY ...", {}, DriverError(pgcode))
        try:
            raise pd.errors.DatabaseError("Execution failed on sql") from inner
        except pd.errors.DatabaseError as exc:
            return exc

    assert store.sqlstate(wrapped("22P02")) == "22P02" and store.is_data_error(wrapped("22P02"))
    assert store.is_data_error(wrapped("23514")) and store.is_data_error(wrapped("54000"))
    for transient in ("53100", "57P01", "08006", "40P01", "55P03"):
        assert store.is_transient(wrapped(transient)) and not store.is_data_error(wrapped(transient)), (
            transient
        )
    assert not store.is_transient(wrapped("42501")) and not store.is_data_error(wrapped("42501"))
    # A connection lost outside SQLAlchemy (the COPY path) carries no SQLSTATE at all.
    assert store.is_transient(psycopg2.OperationalError("server closed the connection unexpectedly"))
    assert store.is_transient(psycopg2.InterfaceError("connection already closed"))
    assert not store.is_transient(ValueError("a bug"))
    # A Ctrl-C while psycopg2 reads the COPY data comes back as a database error: it is an interrupt.
    read_failed = psycopg2.errors.QueryCanceled(
        "COPY from stdin failed: error in .read() call: KeyboardInterrupt"
    )
    assert store.interrupted(sa.exc.OperationalError("COPY ...", {}, read_failed))
    assert not store.interrupted(wrapped("57014"))


def test_disk_full_is_retried_and_never_sends_good_rows_to_rejects(
    stack, make_topic, pg_schema, admin_engine
) -> None:
    """SQLSTATE 53100 (disk full) on the metrics table: a resource error, retried with backoff;
    when it passes, every row loads; no good message is ever a reject."""
    topic = make_topic(partitions=2)
    produce(stack, topic, backlog(100, bad_every=25), partitions=2)
    create_tables(stack, pg_schema)
    install_fault(admin_engine, pg_schema, DISK_FULL, times=2)
    report = run_batch(settings_for(stack, topic, pg_schema, retry_deadline=30))
    assert (report.status, report.loaded, report.rejected) == ("ok", 96, 4)
    assert reject_count(admin_engine, pg_schema, "WHERE stage = 'database'") == 0
    assert_exactly_once(admin_engine, pg_schema, topic, f"g-{topic}", kafka_ends(stack, topic))


def test_disk_full_that_lasts_exits_4_and_moves_nothing(stack, make_topic, pg_schema, admin_engine) -> None:
    topic = make_topic(partitions=1)
    produce(stack, topic, backlog(50, bad_every=10))
    create_tables(stack, pg_schema)
    install_fault(admin_engine, pg_schema, DISK_FULL, times=None)
    proc = run_cli(
        ["run", "--output", "json"], cli_env(stack, topic, pg_schema, METRIC_ETL_RETRY_DEADLINE="2")
    )
    assert proc.returncode == 4, proc.stderr
    assert "Error: load: PostgreSQL at" in proc.stderr and "No space left on device" in proc.stderr
    assert json.loads(proc.stdout)["status"] == "failed"
    assert count(admin_engine, pg_schema, "website_metrics") == 0
    assert reject_count(admin_engine, pg_schema) == 0  # not even the 5 bad ones: the cycle rolled back
    assert stored_offsets(admin_engine, pg_schema, topic, f"g-{topic}") == {}


def test_a_value_the_table_refuses_never_stops_the_run(stack, make_topic, pg_schema, admin_engine) -> None:
    """A constraint the validator does not know about: the rows it refuses become stage-database
    rejects with the reason; the rest of each cycle loads."""
    topic = make_topic(partitions=2)
    values = [good_message(i, status_code=418 if i % 17 == 0 else 200) for i in range(170)]
    produce(stack, topic, values, partitions=2)
    create_tables(stack, pg_schema)
    with admin_engine.begin() as conn:
        table = f'"{pg_schema}".website_metrics'
        conn.execute(sa.text(f"ALTER TABLE {table} ADD CONSTRAINT no_teapots CHECK (status_code <> 418)"))
    report = run_batch(settings_for(stack, topic, pg_schema, max_poll_records=40))
    assert (report.status, report.loaded, report.rejected) == ("ok", 160, 10)
    rules = rows(
        admin_engine,
        f"SELECT DISTINCT e->>'rule' AS rule, stage "
        f'FROM "{pg_schema}".website_metrics_rejects, jsonb_array_elements(errors) e',
    )
    assert [(r.rule, r.stage) for r in rules] == [("database:23514", "database")]
    assert_exactly_once(admin_engine, pg_schema, topic, f"g-{topic}", kafka_ends(stack, topic))


def test_commit_acknowledgement_lost_is_recognised_not_loaded_twice(
    stack, make_topic, pg_schema, admin_engine, monkeypatch
) -> None:
    """The COMMIT went through but its acknowledgement was lost (the connection died right after):
    the retry finds its own offsets already advanced, and counts the cycle instead of re-reading it."""
    topic = make_topic(partitions=1)
    produce(stack, topic, backlog(30, bad_every=10))
    real_db = Pipeline.transact
    lost: list[str] = []

    def db(self, fn, what, *, retry=True):
        if what == "load" and not lost:
            real_db(self, fn, what, retry=False)  # committed...
            lost.append(what)  # ...and then the connection "dies": the retry runs the cycle again
        return real_db(self, fn, what, retry=retry)

    monkeypatch.setattr(Pipeline, "transact", db)
    report = run_batch(settings_for(stack, topic, pg_schema))
    assert lost
    assert (report.read, report.loaded, report.rejected, report.conflicts) == (30, 27, 3, 0)
    assert_exactly_once(admin_engine, pg_schema, topic, f"g-{topic}", {0: 30})


def test_lost_offsets_row_never_puts_a_message_in_both_tables(
    stack, make_topic, pg_schema, admin_engine
) -> None:
    """An operator deleted the stored offsets; a --from-beginning run re-reads everything. Rows already
    loaded or rejected are skipped as duplicates (the message key), never stored twice."""
    topic = make_topic(partitions=2)
    produce(stack, topic, backlog(120, bad_every=12), partitions=2)
    s = settings_for(stack, topic, pg_schema)
    assert run_batch(s).loaded == 110
    with admin_engine.begin() as conn:
        conn.execute(sa.text(f'DELETE FROM "{pg_schema}".etl_offsets'))
    again = run_batch(settings_for(stack, topic, pg_schema, from_beginning=True))
    assert (again.status, again.loaded, again.rejected, again.duplicates) == ("ok", 0, 0, 120)
    assert_exactly_once(admin_engine, pg_schema, topic, s.group_id, kafka_ends(stack, topic))


# -- the broker -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_broker_restart_mid_run_completes_or_exits_4(
    stack, make_topic, pg_schema, admin_engine, tmp_path
) -> None:
    """The broker stopped and started again in the middle of two runs: the patient one reconnects,
    rejoins its group and completes; the hasty one (2 s deadline) exits 4; offsets never run ahead."""
    patient_topic, hasty_topic = make_topic(partitions=2), make_topic(partitions=2)
    for topic in (patient_topic, hasty_topic):
        produce(stack, topic, backlog(2000, bad_every=50), partitions=2)
    small = {"METRIC_ETL_MAX_POLL_RECORDS": "20"}
    patient = Job(
        cli_env(stack, patient_topic, pg_schema, METRIC_ETL_RETRY_DEADLINE="90", **small),
        ["--sleep", "0.05", "--output", "json"],
        tmp_path,
        "patient",
    )
    hasty = Job(
        cli_env(stack, hasty_topic, pg_schema, METRIC_ETL_RETRY_DEADLINE="2", **small),
        ["--sleep", "0.05", "--output", "json"],
        tmp_path,
        "hasty",
    )
    for job in (patient, hasty):
        run_id = job.run_id(admin_engine, pg_schema)
        wait_for("two committed cycles", lambda r=run_id: committed_cycles(admin_engine, pg_schema, r) >= 2)
    kafka = Kafka(stack)
    with kafka.down():
        wait_for("the hasty run to give up", lambda: not hasty.alive(), 120)
    assert patient.wait(180) == 0, patient.stderr[-3000:]
    assert hasty.wait(180) == 4, hasty.stderr[-3000:]
    assert report_of(patient)["stop_reason"] == "caught_up"
    # The hasty run ended while the broker was away: its report still gives each partition's lag
    # (against the end offsets seen at start, marked so), not null.
    lags = {p: (v["lag"], v["end_offset_at"]) for p, v in report_of(hasty)["partitions"].items()}
    assert lags and all(lag is not None for lag, _ in lags.values()), lags
    for topic in (patient_topic, hasty_topic):
        assert_consistent(admin_engine, pg_schema, topic, f"g-{topic}")
    assert run_cli(["run"], cli_env(stack, hasty_topic, pg_schema)).returncode == 0
    for topic in (patient_topic, hasty_topic):
        assert_exactly_once(admin_engine, pg_schema, topic, f"g-{topic}", kafka_ends(stack, topic))
    assert reject_count(admin_engine, pg_schema) == 2 * (2000 // 50)


# -- signals ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_run_finishes_the_cycle_and_exits_0(
    stack, make_topic, pg_schema, admin_engine, tmp_path, sig
) -> None:
    topic = make_topic(partitions=2)
    produce(stack, topic, backlog(2000, bad_every=30), partitions=2)
    env = cli_env(stack, topic, pg_schema, METRIC_ETL_MAX_POLL_RECORDS="25")
    job = Job(env, ["--output", "json"], tmp_path)
    run_id = job.run_id(admin_engine, pg_schema)
    wait_for("three committed cycles", lambda: committed_cycles(admin_engine, pg_schema, run_id) >= 3)
    # Sent while a load transaction is open, so it is that cycle that must finish.
    wait_for("a load transaction", lambda: backends(admin_engine, run_id, writing=True), 30, every=0.002)
    job.send(sig)
    assert job.wait(60) == 0, job.stderr[-3000:]
    report = report_of(job)
    assert report["stop_reason"] == "signal" and report["status"] == "ok"
    assert f"{signal.Signals(sig).name} received: finishing the current cycle" in job.stderr
    offsets = assert_consistent(admin_engine, pg_schema, topic, f"g-{topic}")
    assert sum(offsets.values()) == report["read"] - report["duplicates"] < 2000
    assert run_cli(["run"], env).returncode == 0
    assert_exactly_once(admin_engine, pg_schema, topic, f"g-{topic}", kafka_ends(stack, topic))


def _freeze(job: Job) -> None:
    job.send(signal.SIGSTOP)
    wait_for("the job to stop", lambda: _stopped(job.pid), 5, every=0.001)


def _second_sigint_inside_a_transaction(
    job: Job, admin_engine: sa.Engine, schema: str, run_id: str
) -> int | None:
    """Freeze the run inside a load transaction, SIGINT, let it handle that, SIGINT again while
    still inside. Returns the committed cycles at that moment, or None if the cycle ended first."""
    while job.alive():
        _freeze(job)
        try:
            if backends(admin_engine, run_id, writing=True):
                cycles = committed_cycles(admin_engine, schema, run_id)
                job.send(signal.SIGINT)
                job.send(signal.SIGCONT)
                # Signals pending together merge into one: wait until the first was handled.
                wait_for("the first SIGINT", lambda: "SIGINT received" in job.stderr, 10, every=0.0005)
                _freeze(job)
                if not backends(admin_engine, run_id, writing=True):
                    return None
                job.send(signal.SIGINT)
                return cycles
        finally:
            job.send(signal.SIGCONT)
        time.sleep(random.uniform(0, 0.02))
    return None


def test_a_second_sigint_inside_a_transaction_rolls_it_back_and_exits_130(
    stack, make_topic, pg_schema, admin_engine, tmp_path
) -> None:
    """Ctrl-C twice: the first asks to finish the cycle, the second interrupts it there and then.
    Sent inside a load transaction, the second rolls it back: the cycle is not counted, exit 130.

    The second is best effort: a KeyboardInterrupt raised inside pandas' compiled code can be
    swallowed there (a hasattr that clears any exception), and then the run finishes the cycle and
    stops as after one Ctrl-C. Every attempt must leave the database consistent; some attempt must
    show the rollback."""
    topic = make_topic(partitions=1)
    produce(stack, topic, backlog(3000, bad_every=30))
    env = cli_env(stack, topic, pg_schema, METRIC_ETL_MAX_POLL_RECORDS="25")
    outcomes = []
    for attempt in range(12):  # on a loaded machine an attempt often sees the cycle end first
        job = Job(env, ["--output", "json"], tmp_path, name=f"sigint{attempt}")
        run_id = job.run_id(admin_engine, pg_schema)
        wait_for("a committed cycle", lambda r=run_id: committed_cycles(admin_engine, pg_schema, r) >= 1)
        cycles = _second_sigint_inside_a_transaction(job, admin_engine, pg_schema, run_id)
        code = job.wait(60)
        assert code in (0, 130), job.stderr[-3000:]
        assert_consistent(admin_engine, pg_schema, topic, f"g-{topic}")
        after = committed_cycles(admin_engine, pg_schema, run_id)
        outcomes.append((cycles is not None, code, None if cycles is None else after - cycles))
        if cycles is not None and code == 130 and after == cycles:
            break
    else:
        pytest.fail(f"no attempt showed the rollback: (caught, exit code, cycles committed after) {outcomes}")
    assert "interrupted; the cycle in progress was rolled back" in job.stderr
    status = rows(admin_engine, f'SELECT status FROM "{pg_schema}".etl_runs WHERE run_id = :r', r=run_id)
    assert [r.status for r in status] == ["interrupted"]
    assert run_cli(["run"], env).returncode == 0
    assert_exactly_once(admin_engine, pg_schema, topic, f"g-{topic}", {0: 3000})


def test_sigterm_while_retrying_stops_at_once_with_exit_4(
    stack, make_topic, pg_schema, admin_engine, tmp_path
) -> None:
    """A stop request ends the retries of a failing database: the cycle is rolled back, exit 4."""
    topic = make_topic(partitions=1)
    produce(stack, topic, backlog(40, bad_every=10))
    create_tables(stack, pg_schema)
    install_fault(admin_engine, pg_schema, DISK_FULL, times=None)
    job = Job(cli_env(stack, topic, pg_schema, METRIC_ETL_RETRY_DEADLINE="120"), [], tmp_path)
    wait_for("a retry", lambda: "retrying in" in job.stderr, 60)
    sent = time.monotonic()
    job.send(signal.SIGTERM)
    assert job.wait(30) == 4, job.stderr[-3000:]
    assert time.monotonic() - sent < 10
    assert count(admin_engine, pg_schema, "website_metrics") == 0
    assert reject_count(admin_engine, pg_schema) == 0
    assert stored_offsets(admin_engine, pg_schema, topic, f"g-{topic}") == {}
