"""Which config file a real ``metric-etl`` process reads, and precedence through its real flags.

README: the config file is ``--config PATH`` (or ``METRIC_ETL_CONFIG``), else ``./config/service.yaml``,
else ``/etc/metric-etl/service.yaml``; built-in defaults < file < ``METRIC_ETL_*`` < flags.

A file is recognised by a key only it holds: the job refuses unknown keys and names the file it read
them from, before it connects to anything. The /etc test gives one process its own view of /etc (an
overlay in a private mount namespace), so nothing on the shared machine sees the file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from etl.config import DEFAULT_CONFIG_PATHS
from tests.support import REPO, cli_env, good_message, produce, rows


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METRIC_ETL_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _marked(path: Path, marker: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"topic: from-{marker}\n{marker}: 1\n")
    return path


def _read_by(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """The markers of the config files the process read (from its unknown-setting errors)."""
    assert proc.returncode == 3, proc.stderr
    return [m for m in ("cwd", "etc", "env", "flag") if f"{m}: unknown setting" in proc.stderr]


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "etl", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def test_the_default_places_are_the_readme_s() -> None:
    readme = (Path("config/service.yaml"), Path("/etc/metric-etl/service.yaml"))
    assert readme == DEFAULT_CONFIG_PATHS


def test_config_service_yaml_in_the_working_directory_is_read(tmp_path: Path) -> None:
    _marked(tmp_path / "config" / "service.yaml", "cwd")
    proc = _run(["run"], tmp_path, _env())
    assert _read_by(proc) == ["cwd"]
    assert "config/service.yaml: cwd: unknown setting" in proc.stderr


def test_metric_etl_config_names_the_file_and_config_flag_wins_over_it(tmp_path: Path) -> None:
    _marked(tmp_path / "config" / "service.yaml", "cwd")
    from_env = _marked(tmp_path / "env.yaml", "env")
    from_flag = _marked(tmp_path / "flag.yaml", "flag")
    assert _read_by(_run(["run"], tmp_path, _env(METRIC_ETL_CONFIG=str(from_env)))) == ["env"]
    both = _run(["run", "--config", str(from_flag)], tmp_path, _env(METRIC_ETL_CONFIG=str(from_env)))
    assert _read_by(both) == ["flag"]
    missing = _run(["run", "--config", str(tmp_path / "nope.yaml")], tmp_path, _env())
    assert (
        missing.returncode == 3 and f"config file {tmp_path / 'nope.yaml'} does not exist" in missing.stderr
    )


def _with_etc_file(tmp_path: Path, content: str) -> list[str]:
    """A command prefix that runs the rest with /etc/metric-etl/service.yaml holding ``content``, in a
    private mount namespace (an overlay on /etc that only that process sees)."""
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed for the /etc test")
    upper = tmp_path / "etc-upper"
    (upper / "metric-etl").mkdir(parents=True)
    (upper / "metric-etl" / "service.yaml").write_text(content)
    script = (
        'set -e; w=$(mktemp -d); mount -t tmpfs tmpfs "$w"; mkdir "$w/u" "$w/w"; cp -a "$1"/. "$w/u/"; '
        'mount -t overlay overlay -o "lowerdir=/etc,upperdir=$w/u,workdir=$w/w" /etc; shift; exec "$@"'
    )
    user_ns = [] if os.geteuid() == 0 else ["--map-root-user"]
    return ["unshare", *user_ns, "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(upper)]


def test_etc_metric_etl_is_read_when_the_working_directory_has_none(tmp_path: Path) -> None:
    prefix = _with_etc_file(tmp_path, "topic: from-etc\netc: 1\n")
    work = tmp_path / "work"
    work.mkdir()
    command = [*prefix, sys.executable, "-m", "etl", "run"]
    proc = subprocess.run(command, cwd=work, env=_env(), capture_output=True, text=True, timeout=60)
    assert _read_by(proc) == ["etc"], proc.stderr
    assert "/etc/metric-etl/service.yaml: etc: unknown setting" in proc.stderr
    # ./config/service.yaml comes first when both exist.
    _marked(work / "config" / "service.yaml", "cwd")
    proc = subprocess.run(command, cwd=work, env=_env(), capture_output=True, text=True, timeout=60)
    assert _read_by(proc) == ["cwd"]
    assert not Path("/etc/metric-etl/service.yaml").exists(), "the file leaked out of the namespace"


@pytest.mark.services
def test_precedence_file_then_env_then_flags_through_the_real_cli(
    stack, make_topic, pg_schema, admin_engine, tmp_path: Path
) -> None:
    """File: topic, schema, group g-file, 5 messages a cycle. Environment: group g-env, 10 a cycle.
    Flag: --group-id g-flag. The run reads the file's topic, 10 a cycle (2 cycles for 20 messages)
    and stores its offsets under g-flag."""
    topic = make_topic(partitions=1)
    produce(stack, topic, [good_message(i) for i in range(20)])
    config = tmp_path / "service.yaml"
    config.write_text(
        f"topic: {topic}\ndb_schema: {pg_schema}\ngroup_id: g-file\nmax_poll_records: 5\n"
        f"bootstrap_servers: '{stack['METRIC_ETL_BOOTSTRAP_SERVERS']}'\n"
        f"db_url: '{stack['METRIC_ETL_DB_URL']}'\n"
    )
    env = cli_env(stack, topic, pg_schema)
    for name in (
        "METRIC_ETL_TOPIC",
        "METRIC_ETL_DB_SCHEMA",
        "METRIC_ETL_BOOTSTRAP_SERVERS",
        "METRIC_ETL_DB_URL",
    ):
        del env[name]
    env.update(METRIC_ETL_CONFIG=str(config), METRIC_ETL_GROUP_ID="g-env", METRIC_ETL_MAX_POLL_RECORDS="10")
    proc = _run(["run", "--group-id", "g-flag", "--output", "json"], REPO, env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["topic"], report["group_id"], report["loaded"]) == (topic, "g-flag", 20)
    assert report["cycles"] == 2, report
    stored = rows(admin_engine, f'SELECT group_id, next_offset FROM "{pg_schema}".etl_offsets')
    assert [tuple(r) for r in stored] == [("g-flag", 20)]
