"""`make chaos`, CI-sized: SIGKILLs among three overlapping runs, a PostgreSQL restart and a broker
restart during one backlog, then one ordinary run; every message ends in exactly one table.

The scenario is bench/chaos.py's (the same code `make chaos` runs with a 300,000-message backlog);
this test runs it small and bounded and asserts each of its checks by name.
"""

from __future__ import annotations

import contextlib
import os
import sys

import pytest
import sqlalchemy as sa

from tests.exactly_once import Kafka, Postgres, _terminate_raises
from tests.support import REPO

sys.path.insert(0, str(REPO / "bench"))
import chaos

pytestmark = [pytest.mark.services, pytest.mark.slow]


def test_chaos_kills_and_restarts_lose_nothing_and_load_nothing_twice(
    stack, admin_engine, kafka_admin, tmp_path
) -> None:
    opts = chaos.Options(
        messages=6000,
        partitions=3,
        runs=3,
        kills=5,
        kill_gap=(0.2, 2.0),
        max_poll_records=100,
        sleep=0.1,  # slows the runs down, so the kills and restarts land while they load
        retry_deadline=20.0,
        down_s=(1.0, 3.0),
        chaos_timeout=150.0,
        final_timeout=120.0,
        seed=20261203,
        results=tmp_path,
    )
    result = None
    try:
        with _terminate_raises():
            result = chaos.chaos(opts, env={**os.environ, **stack})
    finally:
        # Other tests share the stack: whatever happened, both services are up after this test.
        Postgres(stack, admin_engine).start()
        Kafka(stack).start()
        if result is not None:
            _drop(admin_engine, kafka_admin, result.schema, result.topic)
    assert result.kills == opts.kills
    assert {e["event"] for e in result.events} == {"pg_restart", "broker_restart"}
    assert not [f for f in result.failures if "twice" in f or "distinct offsets" in f], result.failures
    assert not [f for f in result.failures if "stored offsets" in f], result.failures
    assert not [f for f in result.failures if "exited" in f], result.failures
    assert result.final["exit"] == 0
    assert result.handled_before_final > 0  # the chaos hit runs that were loading
    assert result.counts["metrics"] + result.counts["rejects"] == opts.messages
    assert 0 < result.counts["rejects"] < opts.messages * 0.05  # the corrupted ones, only those
    # Every run's output is kept, so the cause of a failure is never lost.
    assert len(list(tmp_path.glob("run-*.err"))) == len(result.runs) >= opts.runs + opts.kills
    # Killed runs' rows are closed ('abandoned') by the next run: none stays 'running'.
    assert not [f for f in result.failures if "running" in f], result.failures
    assert result.ok, result.failures


def _drop(admin_engine: sa.Engine, kafka_admin, schema: str, topic: str) -> None:
    with admin_engine.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    with contextlib.suppress(Exception):
        kafka_admin.delete_topics([topic], timeout_ms=10_000)
