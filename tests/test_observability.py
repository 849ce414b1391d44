"""`run --metrics-file` (Prometheus textfile, atomic, kept across failures) and the progress bar (only on
a terminal, only for text output), against the real broker and database."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from etl.report import RunReport
from etl.run.metrics_file import read_previous, render, write_atomic
from etl.run.progress import ProgressBar
from tests.support import REPO, cli_env, good_message, produce, run_cli

SAMPLE = re.compile(r"^([a-z_]+)(?:\{([^}]*)\})? (\S+)$")


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text format -> {(name, labels): value}; fails on any line that is not valid."""
    samples = {}
    declared: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            declared[name] = kind
            continue
        m = SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        assert m.group(1) in declared, f"{m.group(1)} has no TYPE line"
        samples[(m.group(1), labels)] = float(m.group(3))
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    matches = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert len(matches) == 1, (name, labels, matches)
    return matches[0]


def test_metrics_file_after_a_run(stack, make_topic, pg_schema, tmp_path) -> None:
    topic = make_topic(partitions=2)
    produce(stack, topic, [good_message(i) for i in range(10)] + [b"nope", b"{}"], partitions=2)
    path = tmp_path / "metric_etl.prom"
    before = time.time()
    proc = run_cli(["run", "--metrics-file", str(path)], cli_env(stack, topic, pg_schema))
    assert proc.returncode == 0, proc.stderr

    samples = parse(path.read_text())
    job = {"topic": topic, "group_id": f"g-{topic}"}
    assert all({("topic", topic), ("group_id", f"g-{topic}")} <= labels for _, labels in samples)
    assert value(samples, "metric_etl_last_run_read_messages", **job) == 12
    assert value(samples, "metric_etl_last_run_loaded_messages", **job) == 10
    assert value(samples, "metric_etl_last_run_rejected_messages", **job) == 2
    assert value(samples, "metric_etl_last_run_duplicate_messages", **job) == 0
    assert value(samples, "metric_etl_last_run_cycles", **job) >= 1
    assert 0 < value(samples, "metric_etl_last_run_duration_seconds", **job) < 60
    assert value(samples, "metric_etl_last_run_success", **job) == 1
    assert value(samples, "metric_etl_last_run_exit_code", **job) == 0
    assert value(samples, "metric_etl_last_run_status", status="ok") == 1
    assert value(samples, "metric_etl_last_run_status", status="failed") == 0
    finished = value(samples, "metric_etl_last_run_timestamp_seconds", **job)
    assert before < finished <= time.time()
    assert value(samples, "metric_etl_last_success_timestamp_seconds", **job) == finished
    assert value(samples, "metric_etl_lag_messages", **job) == 0
    assert value(samples, "metric_etl_partition_lag_messages", partition="0") == 0
    assert value(samples, "metric_etl_partition_lag_messages", partition="1") == 0
    assert path.stat().st_mode & 0o777 == 0o644  # node_exporter runs as another user
    assert [p.name for p in tmp_path.iterdir()] == ["metric_etl.prom"]  # no temporary file left


def test_a_dry_run_is_not_a_success() -> None:
    report = RunReport("r1", "t", "g", datetime.now(UTC), datetime.now(UTC), status="dry_run", dry_run=True)
    text = render(report, exit_code=0, labels={}, finished_at=2000.0, last_success=1000.0)
    assert "metric_etl_last_success_timestamp_seconds 1000\n" in text
    assert 'metric_etl_last_run_status{status="dry_run"} 1' in text


def test_metrics_file_after_failures_keeps_the_last_success(stack, make_topic, pg_schema, tmp_path) -> None:
    topic = make_topic(partitions=1)
    produce(stack, topic, [good_message(i) for i in range(3)])
    env = cli_env(stack, topic, pg_schema)
    path = tmp_path / "metric_etl.prom"
    assert run_cli(["run", "--metrics-file", str(path)], env).returncode == 0
    success = value(parse(path.read_text()), "metric_etl_last_success_timestamp_seconds")

    down = run_cli(
        ["run", "--metrics-file", str(path)], {**env, "METRIC_ETL_BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    )
    assert down.returncode == 4, down.stderr
    samples = parse(path.read_text())
    assert value(samples, "metric_etl_last_run_success") == 0
    assert value(samples, "metric_etl_last_run_exit_code") == 4
    assert value(samples, "metric_etl_last_run_status", status="failed") == 1
    assert value(samples, "metric_etl_last_success_timestamp_seconds") == success
    assert value(samples, "metric_etl_last_run_timestamp_seconds") > success

    bad_config = run_cli(["run", "--metrics-file", str(path)], {**env, "METRIC_ETL_MAX_REJECT_RATIO": "2"})
    assert bad_config.returncode == 3
    samples = parse(path.read_text())
    assert value(samples, "metric_etl_last_run_status", status="config_error") == 1
    assert value(samples, "metric_etl_last_run_exit_code", topic=topic, group_id=f"g-{topic}") == 3
    assert value(samples, "metric_etl_last_success_timestamp_seconds") == success


def test_metrics_file_in_a_missing_directory_fails_before_the_run(
    stack, make_topic, pg_schema, tmp_path
) -> None:
    topic = make_topic(partitions=1)
    produce(stack, topic, [good_message(0)])
    proc = run_cli(
        ["run", "--metrics-file", str(tmp_path / "nowhere" / "m.prom")], cli_env(stack, topic, pg_schema)
    )
    assert proc.returncode == 3
    assert (
        f"--metrics-file {tmp_path / 'nowhere' / 'm.prom'}: directory {tmp_path / 'nowhere'} does not exist"
        in proc.stderr
    )
    assert "Hint: create the directory or pick another path" in proc.stderr
    assert proc.stdout == ""  # nothing ran


def test_write_atomic_never_shows_half_a_file(tmp_path) -> None:
    path = tmp_path / "m.prom"
    texts = ["a 1\n" * 50_000, "b 2\n" * 70_000]
    write_atomic(path, texts[0])
    seen: set[int] = set()
    torn: list[int] = []  # sizes of contents that were neither file: asserted in the test's thread
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            content = path.read_text()
            if content in texts:
                seen.add(texts.index(content))
            else:
                torn.append(len(content))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(60):
            write_atomic(path, texts[i % 2])
    finally:
        stop.set()
        reader.join()
    assert torn == [], f"a reader saw half-written files of these sizes: {torn[:10]}"
    assert seen == {0, 1}

    with pytest.raises(UnicodeEncodeError):
        write_atomic(path, "c 3\n\udcff")  # a failed write leaves the old file and no temporary file
    assert path.read_text() == texts[1]
    assert [p.name for p in tmp_path.iterdir()] == ["m.prom"]


def test_render_escapes_labels_and_reads_back() -> None:
    report = RunReport(
        "r1", "t", "g", datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, 0, 0, 2, tzinfo=UTC)
    )
    report.status, report.read = "ok", 5
    text = render(
        report, exit_code=0, labels={"topic": 'we"ird\\name\n'}, finished_at=1000.5, last_success=None
    )
    assert 'metric_etl_last_run_read_messages{topic="we\\"ird\\\\name\\n"} 5' in text
    assert "metric_etl_last_success_timestamp_seconds{" in text and "} 1000.5\n" in text
    assert "metric_etl_lag_messages" not in text  # unknown lag is left out, not reported as 0
    labels, success = read_previous_from(text)
    assert labels == {"topic": 'we"ird\\name\n'} and success == 1000.5


def read_previous_from(text: str) -> tuple[dict[str, str], float | None]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.prom"
        path.write_text(text)
        return read_previous(path)


# -- progress bar ---------------------------------------------------------------------------------


def run_with_terminal_stderr(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """``metric-etl ARGS`` with stderr on a pseudo-terminal and stdout on a pipe."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "etl", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        env={**env, "COLUMNS": "100"},
        cwd=str(REPO),
    )
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    out = proc.stdout.read().decode() if proc.stdout else ""
    return proc.wait(timeout=30), out, b"".join(chunks).decode(errors="replace")


def test_progress_bar_only_on_a_terminal_and_for_text(stack, make_topic, pg_schema) -> None:
    topic = make_topic(partitions=2)
    produce(stack, topic, [good_message(i) for i in range(30)], partitions=2)
    env = cli_env(stack, topic, pg_schema, METRIC_ETL_MAX_POLL_RECORDS="10")

    code, out, terminal = run_with_terminal_stderr(["run"], env)
    assert code == 0, terminal
    assert "\r\x1b[K[" in terminal and "msg/s" in terminal and "ETA" in terminal
    assert "30/30 msgs" in terminal  # the estimate came from the lag measured before the run
    assert "10/30 msgs" in terminal  # ... and it moved with each cycle
    assert out.startswith("metric-etl run ") and "\x1b" not in out
    assert re.search(r"cycle 1: read 10", terminal)  # log lines still shown

    produce(stack, topic, [good_message(i) for i in range(5)], partitions=2)
    code, out, terminal = run_with_terminal_stderr(["run", "--output", "json"], env)
    assert code == 0, terminal
    assert "\x1b[K" not in terminal and "msg/s" not in terminal

    produce(stack, topic, [good_message(i) for i in range(5)], partitions=2)
    piped = run_cli(["run"], env)  # cron, Airflow: stderr is a file or a pipe
    assert piped.returncode == 0
    assert "\x1b" not in piped.stderr and "msg/s" not in piped.stderr


def test_progress_line_with_and_without_an_estimate() -> None:
    import io

    report = RunReport("r", "t", "g", datetime.now(UTC))
    report.read, report.loaded, report.rejected = 2500, 2400, 100
    line = ProgressBar(io.StringIO(), total=10_000).line(report, elapsed=5.0)
    assert re.search(
        r"^\[#+-+\]  25% 2,500/10,000 msgs  500 msg/s  ETA 0:15  loaded 2,400 rejected 100", line
    )
    unknown = ProgressBar(io.StringIO(), total=None).line(report, elapsed=65.0)
    assert unknown.startswith("2,500 msgs  38 msg/s  loaded 2,400 rejected 100  1:05 elapsed")

    stream = io.StringIO()
    bar = ProgressBar(stream, total=10_000)
    bar(report)
    bar.close()
    assert stream.getvalue().startswith("\r\x1b[K[") and stream.getvalue().endswith("\r\x1b[K")


def test_kafka_client_errors_stay_quiet_after_a_connect_that_saw_some(capsys) -> None:
    """The client's own ERROR lines are collected while connecting (to tell why bootstrap failed) and
    hidden at default verbosity; after a connect that saw some, later ones stay hidden too (a run
    started while brokers were away printed 52 raw kafka-python lines)."""
    import logging

    from etl.kafka.diagnose import ClientLog as _KafkaErrors
    from etl.logs import configure

    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.getLogger("kafka").level
    try:
        configure(verbose=0)
        conn = logging.getLogger("kafka.conn")
        with _KafkaErrors() as seen:
            conn.error("<BrokerConnection node_id=2>: connect attempt returned error 111")
        assert seen.last and "error 111" in seen.last
        conn.error("<BrokerConnection node_id=3>: connect attempt returned error 111")
        logging.getLogger("etl.run.pipeline").warning("the job's own warning")
        err = capsys.readouterr().err
        assert "the job's own warning" in err
        assert "BrokerConnection" not in err
    finally:
        root.handlers[:], level, kafka_level = saved
        root.setLevel(level)
        logging.getLogger("kafka").setLevel(kafka_level)


def test_a_kafka_time_out_says_what_did_not_answer() -> None:
    """kafka-python raises its time-outs without a message; the warnings said `KafkaTimeoutError: None`
    nine times in one outage."""
    from kafka.errors import KafkaConnectionError, KafkaTimeoutError

    from etl.kafka.client import kafka_error_text

    assert str(KafkaTimeoutError(None)) == "KafkaTimeoutError: None"  # what the client gives
    text = kafka_error_text(KafkaTimeoutError(None), 5000, "the group coordinator")
    assert text == "no answer from the group coordinator within 5s (KafkaTimeoutError; is a broker down?)"
    assert "None" not in kafka_error_text(KafkaTimeoutError())
    assert kafka_error_text(KafkaTimeoutError("Request timed out")) == "KafkaTimeoutError: Request timed out"
    assert kafka_error_text(KafkaConnectionError("refused")) == "KafkaConnectionError: refused"
