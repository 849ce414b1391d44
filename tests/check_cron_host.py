"""cron/README.md followed on this machine, as root, with a real cron daemon (`make cron-check`; not part
of `make test`: it installs Debian packages, adds the user metric-etl and writes to /etc, /opt and /var).

The README's shell blocks run as written, from a copy of the checkout with the built wheel in dist/. The
check only fills /etc/metric-etl/env with the local stack's settings (the README's "then edit it") and
moves the run from every five minutes to every minute, so a tick comes within a minute. It then waits for
a tick to load the topic and for a tick during a run still going to write its one "skipped" line, and
removes everything it installed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.support import REPO, count, good_message, produce

pytestmark = pytest.mark.slow

README = REPO / "cron" / "README.md"
LOG = Path("/var/log/metric-etl/metric-etl.log")
CRONTAB = Path("/etc/cron.d/metric-etl")
INSTALLED = (
    CRONTAB,
    Path("/etc/logrotate.d/metric-etl"),
    Path("/etc/metric-etl"),
    Path("/opt/metric-etl"),
    Path("/var/log/metric-etl"),
    Path("/var/lib/metric-etl"),
)


def readme_blocks() -> list[str]:
    """The ```sh blocks from "Installing the job on a host" up to "systemd", in order."""
    text = README.read_text()
    start, end = text.index("## Installing the job on a host"), text.index("## systemd")
    return re.findall(r"```sh\n(.*?)```", text[start:end], re.S)


# A root login shell's environment on Debian (not this test run's: no venv, no pyenv, no METRIC_ETL_*).
ROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
}


def sh(script: str, cwd: Path) -> None:
    done = subprocess.run(
        ["sh", "-ex"], input=script, cwd=cwd, env=ROOT_ENV, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, f"{script}\n--- output:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"


def wait_for_log(pattern: str, timeout: float) -> str:
    """The log once a line matches ``pattern`` (cron ticks at the start of each minute)."""
    deadline = time.monotonic() + timeout
    while True:
        text = LOG.read_text() if LOG.exists() else ""
        if re.search(pattern, text, re.M):
            return text
        assert time.monotonic() < deadline, f"no line matching {pattern!r} in {LOG}:\n{text}"
        time.sleep(1)  # the log is a plain file cron's job appends to: nothing to wait on but the file


@pytest.fixture
def host(built_dist: Any) -> Iterator[SimpleNamespace]:
    """A copy of the checkout with the wheel in dist/; afterwards, everything the README installed goes."""
    assert os.geteuid() == 0, "make cron-check runs as root (useradd, /etc, apt-get)"
    leftovers = [p for p in INSTALLED if p.exists()]
    leftovers += (
        ["user metric-etl"]
        if subprocess.run(["id", "metric-etl"], capture_output=True).returncode == 0
        else []
    )
    assert not leftovers, f"already on this machine, not touching it: {leftovers}"
    source = built_dist.outdir / "source"
    (source / "dist").mkdir(exist_ok=True)
    for wheel in built_dist.outdir.glob("*.whl"):
        shutil.copy(wheel, source / "dist")
    prometheus_existed = Path("/var/lib/prometheus/node-exporter").exists()
    found = SimpleNamespace(source=source, daemon=None)
    try:
        yield found
    finally:
        if found.daemon is not None:  # first, so that no tick starts while the files go
            found.daemon.terminate()
            found.daemon.wait(timeout=30)
        for path in INSTALLED:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        subprocess.run(["userdel", "metric-etl"], capture_output=True)
        if not prometheus_existed:
            shutil.rmtree("/var/lib/prometheus/node-exporter", ignore_errors=True)
        Path("/run/lock/metric-etl.lock").unlink(missing_ok=True)


def start_cron() -> subprocess.Popen[bytes] | None:
    """The cron daemon, in the foreground of a process of ours, unless one already runs."""
    if subprocess.run(["pgrep", "-x", "cron"], capture_output=True).returncode == 0:
        return None
    return subprocess.Popen(["cron", "-f"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_the_readme_installs_a_job_cron_runs(host, stack, make_topic, pg_schema, admin_engine) -> None:
    install, check, cron = readme_blocks()
    sh(install, host.source)

    # "then edit it": the local stack's settings, this check's topic and schema.
    topic = make_topic(partitions=2)
    produce(stack, topic, [good_message(i) for i in range(25)] + [b"{broken"], partitions=2)
    settings = {k: v for k, v in stack.items() if k.startswith("METRIC_ETL_")}
    settings.update(METRIC_ETL_TOPIC=topic, METRIC_ETL_GROUP_ID=f"g-{topic}", METRIC_ETL_DB_SCHEMA=pg_schema)
    env_file = Path("/etc/metric-etl/env")
    env_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    assert oct(env_file.stat().st_mode & 0o777) == "0o600" and env_file.owner() == "metric-etl"

    sh(check, host.source)
    sh(cron, host.source)
    text = CRONTAB.read_text()
    assert text.count("\n*/5 * * * *  metric-etl  flock") == 1
    CRONTAB.write_text(text.replace("\n*/5 * * * *  metric-etl  flock", "\n* * * * *  metric-etl  flock"))
    host.daemon = start_cron()

    log = wait_for_log(r"^metric-etl run \w+: ok \(caught up", timeout=150)
    assert "read 26  loaded 25  rejected 1" in log
    assert count(admin_engine, pg_schema, "website_metrics") == 25
    assert Path("/var/lib/prometheus/node-exporter/metric_etl.prom").owner() == "metric-etl"

    # A run still going on this host (here: the lock held as a run holds it): the next tick skips.
    holder = subprocess.Popen(["flock", "/run/lock/metric-etl.lock", "sleep", "150"], start_new_session=True)
    try:
        log = wait_for_log(r"WARNING cron tick skipped", timeout=90)
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # flock and its sleep, which holds the lock too
        holder.wait()
    skipped = [line for line in log.splitlines() if "cron tick skipped" in line]
    assert len(skipped) == 1, skipped
    assert re.fullmatch(
        r"\S+ WARNING cron tick skipped: the previous run on this host still holds /run/lock/metric-etl.lock",
        skipped[0],
    )
