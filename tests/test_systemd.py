"""cron/systemd/: the units pass `systemd-analyze verify`, and the service's ExecStart line, run as
systemd runs it (its EnvironmentFile, its working directory, systemd's PATH), stops on SIGTERM with exit 0,
idle or after loading, within TimeoutStopSec. These machines do not boot systemd, so nothing here
starts a unit; the line and the signal are what systemd would use."""

from __future__ import annotations

import configparser
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO, count, good_message, produce

UNITS = REPO / "cron" / "systemd"
INSTALLED = "/opt/metric-etl/venv/bin/metric-etl"
HERE = str(Path(sys.executable).parent / "metric-etl")  # this venv's console script
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / name)
    return parser


def systemd_analyze() -> str:
    """systemd-analyze, installed from Debian's systemd package when missing."""
    found = shutil.which("systemd-analyze")
    if not found:
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "systemd"], check=True)
        found = shutil.which("systemd-analyze")
    assert found
    return found


def test_units_pass_systemd_analyze_verify(tmp_path) -> None:
    # verify checks that ExecStart's program exists: point it at this venv's metric-etl.
    for path in UNITS.iterdir():
        (tmp_path / path.name).write_text(path.read_text().replace(INSTALLED, HERE))
    done = subprocess.run(
        [systemd_analyze(), "verify", *sorted(str(p) for p in tmp_path.iterdir())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stderr == "" and done.stdout == "", done.stdout + done.stderr


def test_units_say_what_the_readme_says() -> None:
    service = unit("metric-etl.service")["Service"]
    assert shlex.split(service["ExecStart"])[:3] == [INSTALLED, "run", "--follow"]
    assert "--lock" not in service["ExecStart"]  # one group may have members on several hosts
    assert service["KillSignal"] == "SIGTERM" and service["Restart"] == "on-failure"
    assert set(service["RestartPreventExitStatus"].split()) == {"3", "5"}
    oneshot = unit("metric-etl-run.service")["Service"]
    assert oneshot["Type"] == "oneshot" and oneshot["SuccessExitStatus"] == "75"
    words = shlex.split(oneshot["ExecStart"])
    max_seconds = int(words[words.index("--max-seconds") + 1])
    assert max_seconds < int(oneshot["TimeoutStartSec"]) < 300  # both below the timer's interval
    assert unit("metric-etl-run.timer")["Timer"]["OnCalendar"] == "*:0/5"


def environment_file(path: Path, values: dict[str, str]) -> dict[str, str]:
    """Write ``values`` as an EnvironmentFile and read it back as systemd does (KEY=value lines)."""
    path.write_text("# written by the test\n" + "".join(f"{k}={v}\n" for k, v in values.items()))
    env = {"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8"}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env


def start_service(stack, topic: str, schema: str, tmp_path: Path) -> subprocess.Popen[str]:
    service = unit("metric-etl.service")["Service"]
    env = environment_file(
        tmp_path / "env",
        {
            "METRIC_ETL_BOOTSTRAP_SERVERS": stack["METRIC_ETL_BOOTSTRAP_SERVERS"],
            "METRIC_ETL_DB_URL": stack["METRIC_ETL_DB_URL"],
            "METRIC_ETL_DB_PASSWORD": stack["METRIC_ETL_DB_PASSWORD"],
            "METRIC_ETL_TOPIC": topic,
            "METRIC_ETL_GROUP_ID": f"g-{topic}",
            "METRIC_ETL_DB_SCHEMA": schema,
            "METRIC_ETL_POLL_TIMEOUT_MS": "500",
        },
    )
    argv = [HERE if word == INSTALLED else word for word in shlex.split(service["ExecStart"])]
    return subprocess.Popen(argv, env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen[str], text: str) -> list[str]:
    """The service's log lines up to the first one containing ``text``."""
    seen = []
    for line in proc.stderr:  # type: ignore[union-attr]
        seen.append(line)
        if text in line:
            return seen
    pytest.fail(f"exited {proc.wait()} before logging {text!r}: {''.join(seen)}")


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """SIGTERM, as `systemctl stop` sends it; the exit code and the rest of the log. Past
    TimeoutStopSec systemd would SIGKILL it: so does communicate's timeout, failing the test."""
    proc.send_signal(signal.SIGTERM)
    try:
        _, rest = proc.communicate(timeout=int(unit("metric-etl.service")["Service"]["TimeoutStopSec"]))
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"still running past TimeoutStopSec after SIGTERM: {proc.communicate()[1]}")
    return proc.returncode, rest


def test_service_idle_stops_on_sigterm_with_exit_0(stack, make_topic, pg_schema, tmp_path) -> None:
    topic = make_topic()
    proc = start_service(stack, topic, pg_schema, tmp_path)
    try:
        wait_for(proc, "positioned partitions")  # joined and polling an empty topic
        code, log = stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, log  # a requested stop of a healthy service is a success for systemd
    assert "ok (signal)" in log


def test_service_stops_on_sigterm_after_loading_with_exit_0(
    stack, make_topic, pg_schema, admin_engine, tmp_path
) -> None:
    topic = make_topic(partitions=2)
    produce(stack, topic, [good_message(i) for i in range(40)], partitions=2)
    proc = start_service(stack, topic, pg_schema, tmp_path)
    try:
        wait_for(proc, "cycle 1: read 40, loaded 40")
        produce(stack, topic, [good_message(i) for i in range(40, 50)], partitions=2)
        code, log = stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, log
    # What it read before the stop is loaded, and nothing twice; a later start takes the rest.
    loaded = count(admin_engine, pg_schema, "website_metrics")
    assert loaded in range(40, 51)
    assert f"loaded {loaded}," in log
