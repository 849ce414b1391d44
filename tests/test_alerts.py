"""The shipped Prometheus rules (cron/prometheus/metric-etl.rules.yml): promtool checks them and runs
their unit tests, and a real failed run makes a real Prometheus, scraping a real node_exporter's
textfile collector, fire the failed-run alert (and a successful run does not)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from etl.cli import main
from tests.support import REPO, cli_env, good_message, produce, run_cli, skip_outside_ci

RULES_DIR = REPO / "cron" / "prometheus"
RULES = RULES_DIR / "metric-etl.rules.yml"
RULE_TESTS = RULES_DIR / "metric-etl.rules.test.yml"
ALERTS = {
    "MetricEtlNoRecentSuccess",
    "MetricEtlLastRunFailed",
    "MetricEtlLagHigh",
    "MetricEtlMessagesLost",
    "MetricEtlRejectShareRising",
    "MetricEtlMetricsFileStale",
}
WAIT_S = 60  # for an alert to fire once the metrics file says so (scrape and evaluation every 1 s)


def tool(*names: str) -> str:
    """The first of ``names`` on PATH (scripts/deps.sh installs them with the stack); skipped where
    missing, except under CI, which fails."""
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    skip_outside_ci(f"{names[0]} is missing (scripts/deps.sh installs it: apt-get install prometheus "
                    "prometheus-node-exporter)")  # fmt: skip
    raise AssertionError("unreachable")


def promtool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args], capture_output=True, text=True, timeout=120, cwd=str(cwd)
    )


def alert_rules(path: Path = RULES) -> dict[str, dict[str, Any]]:
    """The alerting rules of a rules file by name."""
    groups = yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


def test_promtool_checks_the_rules() -> None:
    proc = promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 7 rules found" in proc.stdout  # the six alerts and the file-age recording rule


def test_every_alert_tells_what_to_run_next() -> None:
    rules = alert_rules()
    assert set(rules) == ALERTS
    named = []
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        text = rule["annotations"]["summary"] + " " + rule["annotations"]["description"]
        commands = re.findall(r"`(metric-etl [^`]*)`", re.sub(r"\{\{[^}]*\}\}", "X", text))
        assert commands, f"{name} names no metric-etl command"
        named += commands
    # Each command is one the CLI has, with options it takes: a renamed command or option fails here.
    for command in named:
        words = command.split()[1:]
        found: click.Command = main
        while isinstance(found, click.Group) and words and words[0] in found.commands:
            found = found.commands[words.pop(0)]
        assert not isinstance(found, click.Group), f"{command}: not a command"
        options = {o for p in found.params for o in p.opts}
        for word in words:
            if word.startswith("--"):
                assert word in options, f"{command}: {found.name} has no {word}"


def test_every_alert_has_unit_tests_that_fire_it_and_keep_it_quiet() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))["tests"]
    cases = [case for t in tests for case in t.get("alert_rule_test", [])]
    fired = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert fired == ALERTS and quiet == ALERTS


def test_promtool_runs_the_unit_tests() -> None:
    proc = promtool("test", "rules", str(RULE_TESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


# One change per alert that the unit tests must catch: on the firing side (the alert would stay
# quiet) or on the quiet side (it would fire too soon, or for the wrong series).
MUTANTS = [
    ("metric_etl_last_success_timestamp_seconds > 900", "metric_etl_last_success_timestamp_seconds > 1800"),
    ("metric_etl_last_run_exit_code != 0", "metric_etl_last_run_exit_code > 4"),
    (
        "metric_etl_lag_messages > 100000\n        for: 15m",
        "metric_etl_lag_messages > 100000\n        for: 5m",
    ),
    ("metric_etl_last_run_lost_messages[1h]", "metric_etl_last_run_lost_messages[30m]"),
    ("          ) > 0.01\n", "          ) > 0.001\n"),
    ("metric_etl:metrics_file_age_seconds > 600", "metric_etl:metrics_file_age_seconds > 300"),
    ('{file=~"(.*/)?metric_etl[^/]*\\\\.prom"}', '{file=~"metric_etl[^/]*\\\\.prom"}'),
]


@pytest.mark.parametrize(("old", "new"), MUTANTS, ids=[m[1].split("\n")[0][:40] for m in MUTANTS])
def test_the_unit_tests_catch_a_changed_rule(tmp_path, old: str, new: str) -> None:
    text = RULES.read_text(encoding="utf-8")
    assert text.count(old) == 1, old
    (tmp_path / RULES.name).write_text(text.replace(old, new), encoding="utf-8")
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    proc = promtool("test", "rules", str(tmp_path / RULE_TESTS.name))
    assert proc.returncode != 0, proc.stdout
    assert "FAILED" in proc.stdout + proc.stderr


# --- a real Prometheus ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def wait_for(what: str, check: Callable[[], Any], timeout: float, log: Path | None = None) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds saying what."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except OSError as exc:  # not listening yet
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.25)
    tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
    pytest.fail(f"no {what} within {timeout:.0f} s (last: {last!r})\n{tail}", pytrace=False)


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


class Prometheus:
    """A Prometheus on a loopback port, with the shipped rules, scraping one node_exporter."""

    def __init__(self, url: str, textfile_dir: Path, log: Path) -> None:
        self.url = url
        self.textfile_dir = textfile_dir
        self.log = log

    def query(self, promql: str) -> list[dict[str, Any]]:
        body = get_json(f"{self.url}/api/v1/query?query={urllib.parse.quote(promql)}")
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def alerts(self, name: str, **labels: str) -> list[dict[str, Any]]:
        body = get_json(f"{self.url}/api/v1/alerts")
        return [
            a
            for a in body["data"]["alerts"]
            if a["labels"]["alertname"] == name and labels.items() <= a["labels"].items()
        ]

    def rule(self, name: str) -> dict[str, Any]:
        body = get_json(f"{self.url}/api/v1/rules")
        for group in body["data"]["groups"]:
            for rule in group["rules"]:
                if rule["name"] == name:
                    return {**rule, "group_evaluated": group["lastEvaluation"]}
        raise AssertionError(f"{name} is not loaded: {body}")


@pytest.fixture
def prometheus(tmp_path) -> Iterator[Prometheus]:
    """node_exporter (textfile collector only) and Prometheus (scrape and rule evaluation every 1 s,
    the shipped rules file as is), both on free loopback ports, stopped after the test."""
    exporter_bin = tool("prometheus-node-exporter", "node_exporter")
    prometheus_bin = tool("prometheus")
    textfile_dir = tmp_path / "textfile"
    textfile_dir.mkdir()
    exporter_port, prometheus_port = free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [
                    {"job_name": "node", "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}]}
                ],
            }
        )
    )
    exporter_log, prometheus_log = tmp_path / "node_exporter.log", tmp_path / "prometheus.log"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(
            start(
                [
                    exporter_bin,
                    f"--web.listen-address=127.0.0.1:{exporter_port}",
                    "--collector.disable-defaults",
                    "--collector.textfile",
                    f"--collector.textfile.directory={textfile_dir}",
                ],
                exporter_log,
            )
        )
        wait_for(
            "node_exporter",
            lambda: (
                urllib.request.urlopen(f"http://127.0.0.1:{exporter_port}/metrics", timeout=2).status == 200
            ),
            30,
            exporter_log,
        )
        procs.append(
            start(
                [
                    prometheus_bin,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prometheus_port}",
                ],
                prometheus_log,
            )
        )
        url = f"http://127.0.0.1:{prometheus_port}"
        wait_for(
            "Prometheus ready",
            lambda: urllib.request.urlopen(f"{url}/-/ready", timeout=2).status == 200,
            60,
            prometheus_log,
        )
        yield Prometheus(url, textfile_dir, prometheus_log)
    finally:
        for proc in reversed(procs):
            stop(proc)


def evaluated_at(rule: dict[str, Any]) -> float:
    """The rule group's last evaluation as Unix time (Prometheus writes nanoseconds, Python reads 6)."""
    text = re.sub(r"(\.\d{6})\d+", r"\1", rule["group_evaluated"]).replace("Z", "+00:00")
    return datetime.fromisoformat(text).timestamp()


def test_a_failed_run_fires_the_alert_in_a_real_prometheus(
    stack, make_topic, pg_schema, prometheus: Prometheus
) -> None:
    topic = make_topic(partitions=1)
    produce(stack, topic, [good_message(i) for i in range(3)])
    env = cli_env(stack, topic, pg_schema)
    metrics = prometheus.textfile_dir / "metric_etl.prom"
    job = {"topic": topic, "group_id": f"g-{topic}"}

    # A good run: Prometheus scrapes its exit code 0, evaluates the rules after that, and stays quiet.
    ok = run_cli(["run", "--metrics-file", str(metrics)], env)
    assert ok.returncode == 0, ok.stderr
    selector = f'metric_etl_last_run_exit_code{{topic="{topic}"}}'
    (sample,) = wait_for("scrape of the good run", lambda: prometheus.query(f"{selector} == 0"), WAIT_S)
    scraped_at = float(sample["value"][0])
    rule = wait_for(
        "rule evaluation after the scrape",
        lambda: (r := prometheus.rule("MetricEtlLastRunFailed")) and evaluated_at(r) > scraped_at + 1 and r,
        WAIT_S,
        prometheus.log,
    )
    assert rule["health"] == "ok", rule
    assert rule["state"] == "inactive" and rule["alerts"] == [], rule
    assert prometheus.alerts("MetricEtlLastRunFailed", **job) == []
    # The file-age rule's selector matches the file label this node_exporter writes (the full path).
    (age,) = prometheus.query(f'metric_etl:metrics_file_age_seconds{{file="{metrics}"}}')
    assert 0 <= float(age["value"][1]) < WAIT_S

    # A run that cannot reach Kafka (a closed port) exits 4; the alert fires, naming the command.
    failed = run_cli(
        ["run", "--metrics-file", str(metrics)],
        {**env, "METRIC_ETL_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"},
    )
    assert failed.returncode == 4, failed.stderr
    started = time.monotonic()
    (alert,) = wait_for(
        "firing MetricEtlLastRunFailed",
        lambda: [a for a in prometheus.alerts("MetricEtlLastRunFailed", **job) if a["state"] == "firing"],
        WAIT_S,
        prometheus.log,
    )
    print(f"the failed-run alert fired {time.monotonic() - started:.1f} s after the run ended")
    assert alert["labels"]["severity"] == "warning"
    assert float(alert["value"]) == 4
    assert alert["annotations"]["summary"] == f"metric-etl: the last run on {topic} failed with exit code 4"
    description = alert["annotations"]["description"]
    assert f"`metric-etl status --topic {topic} --group-id g-{topic}`" in description
    assert "Exit 4: Kafka or PostgreSQL was unreachable after retries. Run `metric-etl check`" in description
