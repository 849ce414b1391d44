"""What real producers write: compressed batches (librdkafka via kcat) and transactions (kafka-python's
transactional producer), read by `metric-etl run` as a separate process against the real broker."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from etl.errors import ConfigError
from tests.support import REPO, cli_env, count, good_message, rows, run_cli

pytestmark = pytest.mark.services

CODECS = ("gzip", "snappy", "lz4", "zstd")


def kcat() -> str:
    """kcat (scripts/deps.sh installs it with the stack); a clear failure where it is missing."""
    found = shutil.which("kcat") or shutil.which("kafkacat")
    if found is None:
        pytest.fail("kcat is missing (scripts/deps.sh installs it: apt-get install kcat)", pytrace=False)
    return found


def kcat_produce(stack, topic: str, values: list[bytes], codec: str) -> None:
    """``values`` into ``topic`` by librdkafka, in batches compressed with ``codec``, one per line."""
    proc = subprocess.run(
        [
            kcat(),
            "-P",
            "-b",
            stack.plaintext,
            "-t",
            topic,
            "-z",
            codec,
            # Batches of many records, as a busy producer makes them: the codec has work to do.
            "-X",
            "linger.ms=100",
        ],
        input=b"\n".join(values) + b"\n",
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")


def stored_offsets(admin_engine, schema: str) -> dict[int, int]:
    found = rows(admin_engine, f'SELECT partition, next_offset FROM "{schema}".etl_offsets')
    return {r.partition: r.next_offset for r in found}


def end_offsets(stack, topic: str, isolation_level: str = "read_uncommitted") -> dict[int, int]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(**stack.kafka_config("PLAINTEXT", isolation_level=isolation_level))
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        return {tp.partition: o for tp, o in consumer.end_offsets(tps).items()}
    finally:
        consumer.close()


# -- compressed batches ---------------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
def test_every_codec_is_read_out_of_the_box(codec, stack, make_topic, pg_schema, admin_engine) -> None:
    topic = make_topic()
    values = [good_message(i) for i in range(2000)]
    kcat_produce(stack, topic, values, codec)

    proc = run_cli(["run", "--output", "json"], cli_env(stack, topic, pg_schema))

    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["read"], report["loaded"], report["rejected"]) == (2000, 2000, 0)
    assert count(admin_engine, pg_schema, "website_metrics") == 2000
    urls = rows(admin_engine, f'SELECT url FROM "{pg_schema}".website_metrics ORDER BY "offset"')
    assert [r.url for r in urls] == [f"https://example.com/{i}" for i in range(2000)]
    assert stored_offsets(admin_engine, pg_schema) == {0: 2000}


def blocked_codec_run(env: dict[str, str], module: str) -> subprocess.CompletedProcess[str]:
    """``metric-etl run`` in a process where ``import <module>`` fails, as where it is not installed."""
    code = (
        "import sys\n"
        f"sys.modules[{module!r}] = None  # import {module} raises ImportError\n"
        "sys.argv = ['metric-etl', 'run']\n"
        "from etl.cli import main\n"
        "main()\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=str(REPO)
    )


def test_a_codec_without_its_package_is_a_config_error_naming_both(
    stack, make_topic, pg_schema, admin_engine
) -> None:
    topic = make_topic()
    kcat_produce(stack, topic, [good_message(i) for i in range(300)], "snappy")
    env = cli_env(stack, topic, pg_schema)

    proc = blocked_codec_run(env, "snappy")

    # Exit 3 (fix the installation), not 4 (a scheduler would retry it forever); nothing lost.
    assert proc.returncode == 3, proc.stderr
    assert "snappy" in proc.stderr and "python-snappy" in proc.stderr, proc.stderr
    assert count(admin_engine, pg_schema, "website_metrics") == 0
    assert stored_offsets(admin_engine, pg_schema) == {}
    again = run_cli(["run"], env)
    assert again.returncode == 0, again.stderr
    assert count(admin_engine, pg_schema, "website_metrics") == 300


@pytest.mark.parametrize(
    ("message", "codec", "package"),
    [
        ("Libraries for snappy compression codec not found", "snappy", "python-snappy"),
        ("Libraries for lz4 compression codec not found", "lz4", "'lz4'"),
        ("Libraries for zstd compression codec not found", "zstd", "zstandard"),
        ("Unrecognized compression type: 5", "compression type: 5", "kafka-python"),
    ],
)
def test_codec_error_names_the_codec_and_the_package(message, codec, package) -> None:
    from kafka.errors import UnsupportedCodecError

    from etl.kafka.client import codec_error

    error = codec_error(UnsupportedCodecError(message), "metrics")

    assert isinstance(error, ConfigError) and error.exit_code == 3
    assert codec in str(error) and "'metrics'" in str(error)
    assert package in error.hint


# -- transactions ---------------------------------------------------------------------------------


def transactional_producer(stack, topic: str):
    from kafka import KafkaProducer

    producer = KafkaProducer(
        **stack.kafka_config("PLAINTEXT"),
        transactional_id=f"tx-{topic}",
        enable_idempotence=True,
        acks="all",
        # Longer than any test: the broker must not abort the open transaction on its own.
        transaction_timeout_ms=300_000,
    )
    producer.init_transactions()
    return producer


def send_transaction(producer, topic: str, numbers: range, *, commit: bool) -> None:
    producer.begin_transaction()
    for i in numbers:
        producer.send(topic, good_message(i))
    producer.flush(timeout=60)
    if commit:
        producer.commit_transaction()
    else:
        producer.abort_transaction()


def test_aborted_transactions_are_never_loaded_and_markers_do_not_stall_offsets(
    stack, make_topic, pg_schema, admin_engine
) -> None:
    topic = make_topic()
    producer = transactional_producer(stack, topic)
    try:
        send_transaction(producer, topic, range(0, 500), commit=True)
        send_transaction(producer, topic, range(500, 1000), commit=False)
        send_transaction(producer, topic, range(1000, 1500), commit=True)
    finally:
        producer.close()
    end = end_offsets(stack, topic)
    assert end == {0: 1503}  # 1,500 messages and three transaction markers

    proc = run_cli(["run", "--output", "json"], cli_env(stack, topic, pg_schema))

    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["status"], report["stop_reason"]) == ("ok", "caught_up")
    assert (report["read"], report["loaded"]) == (1000, 1000)
    numbers = rows(admin_engine, f'SELECT url FROM "{pg_schema}".website_metrics')
    expected = {f"https://example.com/{i}" for i in [*range(500), *range(1000, 1500)]}
    assert {r.url for r in numbers} == expected and len(numbers) == 1000
    # The last record is a commit marker: the stored offset still reaches the end, and no lag is left.
    assert stored_offsets(admin_engine, pg_schema) == end
    assert report["lag"] == 0
    assert report["partitions"]["0"]["end"] == 1503

    status = run_cli(["status", "--output", "json"], cli_env(stack, topic, pg_schema))
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["lag"] == 0


def test_read_uncommitted_loads_aborted_transactions_too(stack, make_topic, pg_schema, admin_engine) -> None:
    topic = make_topic()
    producer = transactional_producer(stack, topic)
    try:
        send_transaction(producer, topic, range(0, 500), commit=True)
        send_transaction(producer, topic, range(500, 1000), commit=False)
        send_transaction(producer, topic, range(1000, 1500), commit=True)
    finally:
        producer.close()

    env = cli_env(stack, topic, pg_schema, METRIC_ETL_ISOLATION_LEVEL="read_uncommitted")
    proc = run_cli(["run", "--output", "json"], env)

    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["loaded"] == 1500
    assert count(admin_engine, pg_schema, "website_metrics") == 1500
    assert stored_offsets(admin_engine, pg_schema) == {0: 1503}


def test_an_open_transaction_ends_the_run_at_the_last_stable_offset(
    stack, make_topic, pg_schema, admin_engine
) -> None:
    topic = make_topic()
    committed = transactional_producer(stack, topic)
    try:
        send_transaction(committed, topic, range(0, 300), commit=True)
    finally:
        committed.close()
    open_tx = transactional_producer(stack, f"{topic}-open")
    try:
        open_tx.begin_transaction()
        for i in range(300, 500):
            open_tx.send(topic, good_message(i))
        open_tx.flush(timeout=60)
        assert end_offsets(stack, topic) == {0: 501}  # the open transaction's 200 are in the log
        assert end_offsets(stack, topic, "read_committed") == {0: 301}  # the last stable offset
        env = cli_env(stack, topic, pg_schema)

        started = time.monotonic()
        first = run_cli(["run", "--output", "json"], env, timeout=90)
        took = time.monotonic() - started

        assert first.returncode == 0, first.stderr
        report = json.loads(first.stdout)
        assert report["stop_reason"] == "caught_up"
        assert report["loaded"] == 300 and count(admin_engine, pg_schema, "website_metrics") == 300
        assert stored_offsets(admin_engine, pg_schema) == {0: 301}
        assert took < 60, f"the run took {took:.0f}s with a transaction open"

        open_tx.commit_transaction()
    finally:
        open_tx.close()

    second = run_cli(["run", "--output", "json"], env)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["loaded"] == 200
    assert count(admin_engine, pg_schema, "website_metrics") == 500
    assert stored_offsets(admin_engine, pg_schema) == end_offsets(stack, topic) == {0: 502}


def test_isolation_level_is_read_committed_unless_set_and_is_checked() -> None:
    from etl.config import load_settings

    assert load_settings(env={}).isolation_level == "read_committed"
    assert load_settings(env={"METRIC_ETL_ISOLATION_LEVEL": "read_uncommitted"}).isolation_level == (
        "read_uncommitted"
    )
    with pytest.raises(
        ConfigError, match="isolation_level: expected one of read_committed, read_uncommitted"
    ):
        load_settings(env={"METRIC_ETL_ISOLATION_LEVEL": "read_commited"})
