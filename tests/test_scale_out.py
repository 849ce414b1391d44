"""Past one host: two independent installations (each its own virtual environment with the built wheel,
its own working directory and environment, as on two hosts) run `metric-etl run --follow` in one consumer
group. Kafka gives each a share of the partitions; every message ends in exactly one table, none twice."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
from itertools import chain
from pathlib import Path
from typing import Any

import pytest

from tests.installs import make_venv
from tests.support import good_message, produce, rows

pytestmark = pytest.mark.slow

PARTITIONS = 4


def install_two(built_dist: Any, tmp_path: Path) -> list[Path]:
    """Two hosts' installations, made side by side (each a fresh venv of Debian's Python)."""
    wheel = str(next(built_dist.outdir.glob("metric_etl-*.whl")))
    hosts = [tmp_path / "host-a", tmp_path / "host-b"]
    results: dict[Path, subprocess.CompletedProcess[str]] = {}

    def install(host: Path) -> None:
        results[host] = make_venv(host / "venv", wheel, extra=("--no-compile",))

    threads = [threading.Thread(target=install, args=(host,)) for host in hosts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for host in hosts:
        assert results[host].returncode == 0, results[host].stdout
        (host / "work").mkdir()
    return hosts


def start(host: Path, stack: Any, topic: str, schema: str) -> subprocess.Popen[str]:
    env = {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "METRIC_ETL_BOOTSTRAP_SERVERS": stack["METRIC_ETL_BOOTSTRAP_SERVERS"],
        "METRIC_ETL_DB_URL": stack["METRIC_ETL_DB_URL"],
        "METRIC_ETL_DB_PASSWORD": stack["METRIC_ETL_DB_PASSWORD"],
        "METRIC_ETL_TOPIC": topic,
        "METRIC_ETL_GROUP_ID": f"g-{topic}",  # one group: the two are members of it
        "METRIC_ETL_DB_SCHEMA": schema,
        "METRIC_ETL_POLL_TIMEOUT_MS": "500",
    }
    return subprocess.Popen(
        [str(host / "venv" / "bin" / "metric-etl"), "run", "--follow", "--sleep", "0.5", "--output", "json"],
        env=env,
        cwd=host / "work",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


class Log:
    """A run's stderr, read on a thread; ``wait(pattern)`` waits for a line that matches."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.lines.append("<exited>")
            self.changed.notify_all()

    def last_assignment(self) -> list[int] | None:
        found = [re.search(r"positioned partitions \[([\d, ]*)\]", line) for line in self.lines]
        matches = [m for m in found if m]
        return [int(p) for p in matches[-1].group(1).split(", ") if p] if matches else None

    def wait(self, done: Any, timeout: float = 120) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: done(self), timeout), "".join(self.lines)


def test_two_installations_share_one_topic_and_load_every_message_once(
    built_dist, stack, make_topic, pg_schema, admin_engine, tmp_path
) -> None:
    topic = make_topic(partitions=PARTITIONS)
    hosts = install_two(built_dist, tmp_path)
    procs = [start(host, stack, topic, pg_schema) for host in hosts]
    logs = [Log(proc) for proc in procs]
    try:
        # Both joined: the group's partitions are split between them, none held twice.
        for log in logs:
            log.wait(lambda log: log.last_assignment() not in (None, []) or "<exited>" in log.lines)
        settled = time.monotonic() + 120
        while sorted(chain.from_iterable(log.last_assignment() or [] for log in logs)) != list(
            range(PARTITIONS)
        ):
            assert time.monotonic() < settled, [log.last_assignment() for log in logs]
            with logs[0].changed:
                logs[0].changed.wait(0.5)
        shares = [log.last_assignment() for log in logs]
        assert all(shares), shares

        values = [good_message(i) for i in range(400)] + [b"{not json"] * 20
        produce(stack, topic, values, partitions=PARTITIONS)
        total = len(values)
        deadline = time.monotonic() + 120
        while _handled(admin_engine, pg_schema) < total:
            assert time.monotonic() < deadline, _handled(admin_engine, pg_schema)
            time.sleep(0.2)  # polling the database for the rows: no event to wait on there
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        outputs = [proc.communicate(timeout=90)[0] for proc in procs]
    reports = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    assert [proc.returncode for proc in procs] == [0, 0], reports

    # Each installation loaded a part; together all of it, every message in exactly one table.
    assert all(r["loaded"] + r["rejected"] > 0 for r in reports), reports
    assert sum(r["loaded"] for r in reports) == 400 and sum(r["rejected"] for r in reports) == 20
    positions = rows(
        admin_engine,
        f'SELECT partition, "offset" FROM "{pg_schema}".website_metrics '
        f'UNION ALL SELECT partition, "offset" FROM "{pg_schema}".website_metrics_rejects',
    )
    assert len(positions) == total == len(set(positions))
    ends = rows(admin_engine, f'SELECT partition, max("offset") + 1 FROM (SELECT partition, "offset" FROM '
                f'"{pg_schema}".website_metrics UNION ALL SELECT partition, "offset" FROM '
                f'"{pg_schema}".website_metrics_rejects) m GROUP BY partition')  # fmt: skip
    assert sum(end for _, end in ends) == total  # no gap: offsets 0..end-1 in every partition


def _handled(engine: Any, schema: str) -> int:
    [(n,)] = rows(
        engine,
        f'SELECT (SELECT count(*) FROM "{schema}".website_metrics) '
        f'+ (SELECT count(*) FROM "{schema}".website_metrics_rejects)',
    )
    return int(n)
