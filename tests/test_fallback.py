"""kafka-python's own record reading, the fallback of etl.kafka.fast_records, is a path that works: a
`metric-etl run` under a kafka-python version the fast reader was not checked against loads every
message exactly once, into the same rows as a run with the fast reader. So an upgrade of kafka-python
that changes its internals costs speed, not correctness."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import pytest

from etl.kafka.fast_records import CHECKED_KAFKA_VERSIONS, JoinWatch, fast_path_supported
from tests.support import REPO, cli_env, good_message, produce, rows, run_cli

pytestmark = pytest.mark.services

UNCHECKED_VERSION = "3.1.0"  # a kafka-python the fast reader was not checked against

# `metric-etl run` in a process whose kafka-python reports UNCHECKED_VERSION, as after an upgrade, and
# that counts the records kafka-python's own per-record reading returns.
FALLBACK_RUN = f"""
import atexit, sys
import kafka
from kafka.record.default_records import DefaultRecordBatch

kafka.__version__ = {UNCHECKED_VERSION!r}
read = [0]
original = DefaultRecordBatch._read_msg

def counted(self, *args):
    read[0] += 1
    return original(self, *args)

DefaultRecordBatch._read_msg = counted
atexit.register(lambda: sys.stderr.write(f"records read by kafka-python: {{read[0]}}\\n"))
sys.argv = ["metric-etl", "run", "--output", "json"]
from etl.cli import main
main()
"""

BAD = [b"not json", b'{"url": "https://example.com/nul\\u0000"}', b"[1, 2]", b'{"url": 5}', b"\xff\xfe"]


def fallback_run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", FALLBACK_RUN],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=str(REPO),
    )


def fill(stack: Any, topic: str) -> int:
    """Plain and gzip batches over three partitions with keys, headers, tombstones and bad messages,
    then a committed and an aborted transaction; returns how many messages a run must read."""
    from kafka import KafkaProducer

    values: list[bytes | None] = []
    for i in range(900):
        values.append(BAD[i % len(BAD)] if i % 9 == 0 else None if i % 50 == 1 else good_message(i))
    n = produce(stack, topic, values, partitions=3, headers=[("source", b"test")])
    gzip = KafkaProducer(**stack.kafka_config("PLAINTEXT"), compression_type="gzip", linger_ms=20, acks="all")
    try:
        for i in range(900, 1500):
            gzip.send(topic, good_message(i), key=b"k%d" % i, partition=i % 3)
        gzip.flush(timeout=60)
    finally:
        gzip.close()
    n += 600
    tx = KafkaProducer(
        **stack.kafka_config("PLAINTEXT"),
        transactional_id=f"tx-{topic}",
        enable_idempotence=True,
        acks="all",
        transaction_timeout_ms=300_000,
    )
    try:
        tx.init_transactions()
        for numbers, commit in ((range(1500, 1700), True), (range(1700, 1900), False)):
            tx.begin_transaction()
            for i in numbers:
                tx.send(topic, good_message(i), partition=i % 3)
            tx.flush(timeout=60)
            if commit:
                tx.commit_transaction()
            else:
                tx.abort_transaction()
    finally:
        tx.close()
    return n + 200  # the aborted 200 are never read


def table(admin_engine: Any, schema: str, name: str, skip: set[str]) -> list[tuple[Any, ...]]:
    """The table's rows without the columns a run stamps (its id, times), ordered by message."""
    found = rows(admin_engine, f'SELECT * FROM "{schema}"."{name}" ORDER BY partition, "offset"')
    return [tuple(v for k, v in r._mapping.items() if k not in skip) for r in found]


def offsets(admin_engine: Any, schema: str, name: str) -> dict[int, int]:
    found = rows(admin_engine, f'SELECT partition, next_offset FROM "{schema}"."{name}"')
    return {r.partition: r.next_offset for r in found}


def test_kafka_pythons_own_reading_loads_the_same_rows_exactly_once(
    stack, make_topic, pg_schema, admin_engine
) -> None:
    assert (
        fast_path_supported()
    )  # the kafka-python installed is the one setup.cfg pins: a fast run to compare
    topic = make_topic(partitions=3)
    n = fill(stack, topic)
    fast_env = cli_env(stack, topic, pg_schema)
    # The same schema, the fallback's own group and tables.
    stock_env = cli_env(
        stack,
        topic,
        pg_schema,
        METRIC_ETL_GROUP_ID=f"g-stock-{topic}",
        METRIC_ETL_METRICS_TABLE="stock_metrics",
        METRIC_ETL_REJECTS_TABLE="stock_rejects",
        METRIC_ETL_OFFSETS_TABLE="stock_offsets",
        METRIC_ETL_RUNS_TABLE="stock_runs",
    )

    fast = run_cli(["run", "--output", "json"], fast_env, timeout=180)
    stock = fallback_run(stock_env)

    assert fast.returncode == 0, fast.stderr
    assert stock.returncode == 0, stock.stderr
    # The fallback really ran: kafka-python's own code read every record (and the transactions'
    # markers), and the run said why.
    found = re.search(r"records read by kafka-python: (\d+)", stock.stderr)
    assert found and int(found.group(1)) >= n, stock.stderr[-2000:]
    assert f"kafka-python {UNCHECKED_VERSION}" in stock.stderr, stock.stderr[-2000:]
    fast_report, stock_report = json.loads(fast.stdout), json.loads(stock.stdout)
    for report in (fast_report, stock_report):
        assert (report["status"], report["stop_reason"]) == ("ok", "caught_up")
        assert report["read"] == n and report["loaded"] + report["rejected"] == n
        assert report["duplicates"] == 0
    assert (stock_report["loaded"], stock_report["rejected"]) == (
        fast_report["loaded"],
        fast_report["rejected"],
    )

    stamped = {"run_id", "loaded_at", "rejected_at", "id"}
    fast_good = table(admin_engine, pg_schema, "website_metrics", stamped)
    fast_bad = table(admin_engine, pg_schema, "website_metrics_rejects", stamped)
    stock_good = table(admin_engine, pg_schema, "stock_metrics", stamped)
    stock_bad = table(admin_engine, pg_schema, "stock_rejects", stamped)
    assert stock_good == fast_good and stock_bad == fast_bad
    assert len(fast_good) == fast_report["loaded"] and len(fast_bad) == fast_report["rejected"] > 0
    # Every message read once: in one table or the other, never both, never twice.
    keys = [
        (r.partition, r.offset)
        for t in ("stock_metrics", "stock_rejects")
        for r in rows(admin_engine, f'SELECT partition, "offset" FROM "{pg_schema}".{t}')
    ]
    assert len(keys) == len(set(keys)) == n
    assert offsets(admin_engine, pg_schema, "stock_offsets") == offsets(
        admin_engine, pg_schema, "etl_offsets"
    )


def test_the_join_workaround_stays_away_from_unchecked_kafka_python(monkeypatch: pytest.MonkeyPatch) -> None:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(bootstrap_servers="127.0.0.1:1", api_version=(2, 8), group_id="g")
    try:
        assert fast_path_supported() and JoinWatch(consumer).active
        monkeypatch.setattr("kafka.__version__", UNCHECKED_VERSION)
        assert not UNCHECKED_VERSION.startswith(CHECKED_KAFKA_VERSIONS)
        assert not fast_path_supported()
        watch = JoinWatch(consumer)
        assert not watch.active
        watch.check()  # nothing to do, and no use of the coordinator
    finally:
        consumer.close()
