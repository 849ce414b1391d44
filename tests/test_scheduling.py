"""cron/: the crontab entries (well-formed, capped, locked) run for real against the local stack; the
logrotate snippet; the Airflow DAG compiled and loaded with stand-in Airflow classes that run its command
like BashOperator does, and its retry mapping."""

from __future__ import annotations

import grp
import importlib.util
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import types
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest

from tests.support import REPO, count, good_message, produce

CRON_FILE = REPO / "cron" / "metric-etl.cron"
LOGROTATE_FILE = REPO / "cron" / "metric-etl.logrotate"
DAG_FILE = REPO / "cron" / "airflow" / "metric_etl_dag.py"
BIN = Path(sys.executable).parent  # where the metric-etl console script is installed

# minute, hour, day of month, month, day of week
FIELD_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))


def cron_entries() -> tuple[dict[str, str], list[tuple[list[str], str, str]]]:
    """(variables, [(time fields, user, command)]) of the /etc/cron.d file."""
    variables: dict[str, str] = {}
    entries = []
    for line in CRON_FILE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if re.match(r"^[A-Z_]+=", line):
            name, _, value = line.partition("=")
            variables[name] = value
            continue
        parts = line.split(None, 6)
        assert len(parts) == 7, f"not 5 time fields, a user and a command: {line}"
        entries.append((parts[:5], parts[5], parts[6]))
    return variables, entries


def valid_field(field: str, low: int, high: int) -> bool:
    for item in field.split(","):
        base, _, step = item.partition("/")
        if step and not (step.isdigit() and int(step) > 0):
            return False
        if base == "*":
            continue
        bounds = base.split("-")
        if not all(b.isdigit() and low <= int(b) <= high for b in bounds) or len(bounds) > 2:
            return False
    return True


def run_entry() -> str:
    _, entries = cron_entries()
    return next(cmd for fields, _, cmd in entries if fields[0] == "*/5" and " run " in cmd)


def test_crontab_entries_are_well_formed_and_capped_below_the_interval() -> None:
    variables, entries = cron_entries()
    assert variables["SHELL"] == "/bin/sh"
    assert variables["PATH"].split(":")[0] == "/opt/metric-etl/venv/bin"
    assert len(entries) == 2
    for fields, user, command in entries:
        assert all(valid_field(f, *r) for f, r in zip(fields, FIELD_RANGES, strict=True)), fields
        assert user == "metric-etl"
        assert "%" not in command  # cron would turn it into a newline
        assert "PASSWORD" not in command.upper()  # secrets come from the env file only
        shlex.split(command)  # balanced quotes

    command = run_entry()
    run, _, tail = command.partition("; code=$?; ")
    words = shlex.split(run)
    # flock's own code for "held" is one the job never exits with, so the tail can tell a skipped
    # tick (one line in the log, exit 75) from the job's own exit 75 (its advisory lock).
    assert words[:5] == ["flock", "-n", "-E", "200", "/run/lock/metric-etl.lock"]
    assert words[5:8] == ["timeout", "--preserve-status", "-k"]
    kill_after, hard_cap = int(words[8]), int(words[9])
    inner = words[words.index("-c") + 1]
    max_seconds = float(re.search(r"--max-seconds (\d+)", inner).group(1))
    assert max_seconds < hard_cap < hard_cap + kill_after < 300  # the next slot is 300 s away
    assert inner.startswith("set -a && . /etc/metric-etl/env && set +a && exec metric-etl run ")
    assert "--lock" in inner and "--metrics-file " in inner
    assert words[-3:] == [">>", "/var/log/metric-etl/metric-etl.log", "2>&1"]
    assert tail.startswith("[ $code -ne 200 ] || {") and tail.endswith("code=75; }; exit $code")


def local(command: str, tmp: Path) -> str:
    """The cron command with this machine's paths for the lock, env file, log and metrics file."""
    return (
        command.replace("/run/lock/metric-etl.lock", str(tmp / "run.lock"))
        .replace("/etc/metric-etl/env", str(tmp / "env"))
        .replace("/var/log/metric-etl/metric-etl.log", str(tmp / "run.log"))
        .replace("/var/lib/prometheus/node-exporter/metric_etl.prom", str(tmp / "metric_etl.prom"))
    )


def cron_environment() -> dict[str, str]:
    """What cron gives a job: its variables and little else (no METRIC_ETL_* from the test run)."""
    return {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(Path.home()), "SHELL": "/bin/sh", "LANG": "C.UTF-8"}


def write_env_file(path: Path, stack: dict[str, str], topic: str, schema: str) -> None:
    values = {
        "METRIC_ETL_BOOTSTRAP_SERVERS": stack["METRIC_ETL_BOOTSTRAP_SERVERS"],
        "METRIC_ETL_DB_URL": stack["METRIC_ETL_DB_URL"],
        "METRIC_ETL_DB_PASSWORD": stack["METRIC_ETL_DB_PASSWORD"],
        "METRIC_ETL_TOPIC": topic,
        "METRIC_ETL_GROUP_ID": f"g-{topic}",
        "METRIC_ETL_DB_SCHEMA": schema,
        "METRIC_ETL_POLL_TIMEOUT_MS": "500",
        "METRIC_ETL_RETRY_DEADLINE": "5",
        "METRIC_ETL_CONFIG": str(REPO / "config" / "service.yaml"),
    }
    path.write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items()))
    path.chmod(0o600)


def test_crontab_command_runs_and_a_concurrent_one_exits_75(
    stack, make_topic, pg_schema, admin_engine, tmp_path
):
    topic = make_topic(partitions=2)
    produce(stack, topic, [good_message(i) for i in range(20)] + [b"{broken"], partitions=2)
    write_env_file(tmp_path / "env", stack, topic, pg_schema)
    command = local(run_entry(), tmp_path)

    # Another run holds the lock: this one exits 75 at once and does nothing.
    holder = subprocess.Popen(["flock", str(tmp_path / "run.lock"), "sleep", "60"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["flock", "-n", str(tmp_path / "run.lock"), "true"]).returncode == 0:
            assert time.monotonic() < deadline, "the holder never took the lock"
            time.sleep(0.05)
        start = time.monotonic()
        second = subprocess.run(["sh", "-c", command], env=cron_environment(), timeout=30)
        assert second.returncode == 75
        assert time.monotonic() - start < 5
        assert not (tmp_path / "metric_etl.prom").exists()
        # The skipped tick leaves one line in the log, and only one.
        skipped = (tmp_path / "run.log").read_text().splitlines()
        assert len(skipped) == 1, skipped
        assert re.fullmatch(
            r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00 WARNING cron tick skipped: the previous run on this "
            rf"host still holds {re.escape(str(tmp_path / 'run.lock'))}",
            skipped[0],
        ), skipped
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # flock and its sleep, which holds the lock too
        holder.wait()

    first = subprocess.run(["sh", "-c", command], env=cron_environment(), timeout=120)
    log = (tmp_path / "run.log").read_text().split("\n", 1)[1]
    assert first.returncode == 0, log
    assert re.search(r"metric-etl run \w+: ok \(caught up", log)
    assert "read 21  loaded 20  rejected 1" in log
    assert stack["METRIC_ETL_DB_PASSWORD"] not in log
    assert count(admin_engine, pg_schema, "website_metrics") == 20
    assert "metric_etl_last_run_success{" in (tmp_path / "metric_etl.prom").read_text()

    _, entries = cron_entries()
    daily = local(next(cmd for _, _, cmd in entries if "metric-etl retention" in cmd), tmp_path)
    done = subprocess.run(["sh", "-c", daily], env=cron_environment(), timeout=60)
    assert done.returncode == 0, (tmp_path / "run.log").read_text()
    log = (tmp_path / "run.log").read_text()
    assert "no partition is past the horizon" in log, log


def test_the_hard_cap_passes_the_runs_own_exit_code_through(tmp_path) -> None:
    # The job stood in by a process that does what `metric-etl run` does on SIGTERM: finish, exit 0.
    # timeout alone would report 124 for it, as if the run had failed.
    (tmp_path / "env").write_text("")
    command = local(run_entry(), tmp_path).replace(" -k 15 270 ", " -k 15 1 ")
    job = re.search(r"exec metric-etl run [^']*", command).group(0)
    for stops_with in (0, 3):
        stand_in = f'trap "exit {stops_with}" TERM; sleep 60 & wait'  # timeout signals the group
        done = subprocess.run(
            ["sh", "-c", command.replace(job, stand_in)], env=cron_environment(), timeout=30
        )
        assert done.returncode == stops_with
    assert (tmp_path / "run.log").read_text() == ""


def test_logrotate_snippet(tmp_path) -> None:
    text = LOGROTATE_FILE.read_text()
    body = re.search(r"^(/var/log/metric-etl/metric-etl\.log) \{\n(.*?)^\}", text, re.S | re.M)
    assert body, text
    directives = [line.split()[0] for line in body.group(2).splitlines() if line.strip()]
    for wanted in ("su", "weekly", "rotate", "compress", "missingok", "notifempty", "create"):
        assert wanted in directives
    assert "copytruncate" not in directives  # each run reopens the log: renaming is enough
    assert shutil.which("logrotate"), "logrotate is missing: `make stack-up` installs it (scripts/deps.sh)"
    log = tmp_path / "metric-etl.log"
    log.write_text("a line\n")
    conf = tmp_path / "logrotate.conf"
    # The host's metric-etl user does not exist here: su goes, create names the user running the test.
    me, group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
    local = re.sub(r"^\s*su .*\n", "", text.replace(body.group(1), str(log)), flags=re.M)
    local = re.sub(r"^(\s*create \d+) \S+ \S+$", rf"\1 {me} {group}", local, flags=re.M)
    conf.write_text(local)
    checked = subprocess.run(
        ["logrotate", "-d", "-s", str(tmp_path / "state"), str(conf)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr
    assert f"considering log {log}" in checked.stderr + checked.stdout  # it read the snippet's block


# -- Airflow --------------------------------------------------------------------------------------
# Stand-in Airflow modules, for the DAG file's own logic; `make airflow-check` (tests/check_airflow.py)
# runs the same file under a real Apache Airflow 3.


class AirflowException(Exception):
    pass


class AirflowFailException(AirflowException):
    pass


class AirflowSkipException(AirflowException):
    pass


class FakeDAG:
    """Records what the DAG file passes; a context manager like the real one."""

    made: ClassVar[dict[str, FakeDAG]] = {}  # by dag_id

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        FakeDAG.made[kwargs["dag_id"]] = self

    def __enter__(self) -> FakeDAG:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class FakeParam:
    def __init__(self, default: Any = None, **kwargs: Any) -> None:
        self.default, self.kwargs = default, kwargs


class FakeVariable:
    """Airflow Variables: ``get(key, default)`` in both Airflow 2 and 3."""

    values: ClassVar[dict[str, str]] = {}

    @classmethod
    def get(cls, key: str, default: Any = None) -> Any:
        return cls.values.get(key, default)


class FakeBashOperator:
    """Behaves like Airflow's BashOperator.execute: bash -c in the worker's environment (``env``
    replaces it, or is laid over it with ``append_env``), stderr into stdout, the last line is the
    result; a non-zero exit raises AirflowException with Airflow's own message."""

    def __init__(
        self,
        *,
        task_id: str,
        bash_command: str,
        env: dict[str, str] | None = None,
        append_env: bool = False,
        skip_on_exit_code: Any = 99,
        **kwargs: Any,
    ) -> None:
        self.task_id, self.bash_command, self.env, self.append_env = task_id, bash_command, env, append_env
        self.skip_on_exit_code = (
            [] if skip_on_exit_code is None else [skip_on_exit_code]
            if isinstance(skip_on_exit_code, int) else list(skip_on_exit_code)
        )  # fmt: skip
        self.kwargs = kwargs

    def execute(self, context: Any) -> str:
        if self.env is None:
            env = dict(os.environ)
        else:
            env = {**os.environ, **self.env} if self.append_env else dict(self.env)
        proc = subprocess.run(
            ["bash", "-c", self.bash_command],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=120,
        )
        lines = proc.stdout.rstrip("\n").splitlines()
        if proc.returncode in self.skip_on_exit_code:
            raise AirflowSkipException(f"Bash command returned exit code {proc.returncode}. Skipping.")
        if proc.returncode != 0:
            raise AirflowException(
                f"Bash command failed. The command returned a non-zero exit code {proc.returncode}.\n"
                + proc.stdout
            )
        return lines[-1] if lines else ""


def _deprecated_exceptions(name: str) -> Any:
    """Airflow 3's airflow.exceptions: the task exceptions still there, each with a warning."""
    found = {e.__name__: e for e in (AirflowException, AirflowFailException, AirflowSkipException)}
    if name in ("AirflowFailException", "AirflowSkipException"):
        warnings.warn(
            f"airflow.exceptions.{name} is deprecated; use airflow.sdk.exceptions",
            DeprecationWarning,
            stacklevel=2,
        )
    if name in found:
        return found[name]
    raise AttributeError(name)


def load_dag(monkeypatch: pytest.MonkeyPatch, layout: str) -> types.ModuleType:
    """Import the DAG file with stand-in ``airflow`` modules laid out like Airflow 2 or Airflow 3;
    any warning while importing it fails the test."""
    modules = {name: types.ModuleType(name) for name in ("airflow", "airflow.exceptions")}
    exceptions = {
        "AirflowException": AirflowException,
        "AirflowFailException": AirflowFailException,
        "AirflowSkipException": AirflowSkipException,
    }
    if layout == "airflow2":
        vars(modules["airflow.exceptions"]).update(exceptions)
        modules["airflow"].DAG = FakeDAG  # type: ignore[attr-defined]
        for name in ("airflow.models", "airflow.operators", "airflow.operators.bash"):
            modules[name] = types.ModuleType(name)
        vars(modules["airflow.models"]).update(Param=FakeParam, Variable=FakeVariable)
        modules["airflow.operators.bash"].BashOperator = FakeBashOperator  # type: ignore[attr-defined]
    else:
        modules["airflow.exceptions"].__getattr__ = _deprecated_exceptions  # type: ignore[attr-defined]
        bash = "airflow.providers.standard.operators.bash"
        for name in (
            "airflow.providers",
            "airflow.providers.standard",
            "airflow.providers.standard.operators",
            bash,
            "airflow.sdk",
            "airflow.sdk.exceptions",
        ):
            modules[name] = types.ModuleType(name)
        modules[bash].BashOperator = FakeBashOperator  # type: ignore[attr-defined]
        vars(modules["airflow.sdk"]).update(DAG=FakeDAG, Param=FakeParam, Variable=FakeVariable)
        vars(modules["airflow.sdk.exceptions"]).update(exceptions)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(FakeVariable, "values", {})
    spec = importlib.util.spec_from_file_location(f"metric_etl_dag_{layout}", DAG_FILE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec.loader.exec_module(module)
    return module


def test_dag_file_compiles() -> None:
    compile(DAG_FILE.read_text(), str(DAG_FILE), "exec")


@pytest.mark.parametrize("layout", ["airflow2", "airflow3"])
def test_dag_schedule_command_and_caps(monkeypatch, layout) -> None:
    dag = load_dag(monkeypatch, layout)
    kwargs = FakeDAG.made["metric_etl"].kwargs
    assert kwargs["schedule"] == "*/5 * * * *"
    assert kwargs["max_active_runs"] == 1 and kwargs["catchup"] is False
    args = kwargs["default_args"]
    assert args["retries"] >= 1 and args["retry_delay"] <= timedelta(minutes=1)
    assert timedelta(seconds=dag.MAX_SECONDS) < args["execution_timeout"] < timedelta(minutes=5)
    assert kwargs["params"]["config"].default is None

    task = dag.run
    assert isinstance(task, dag.MetricEtlRunOperator) and task.task_id == "metric_etl_run"
    assert task.skip_on_exit_code == []  # no exit code of metric-etl means "skipped"
    assert task.env is None  # the worker's own environment, nothing laid over it
    assert dag.command_for("/opt/metric-etl/venv/bin/metric-etl", None) == (
        "/opt/metric-etl/venv/bin/metric-etl run --max-seconds 240 --lock --output json"
    )
    assert dag.command_for("metric-etl", "/srv/my etl.yaml").endswith(" --config '/srv/my etl.yaml'")

    # Retention, daily, as a DAG of its own: its task runs `metric-etl retention`.
    daily = FakeDAG.made["metric_etl_retention"].kwargs
    assert daily["schedule"] == "17 3 * * *" and daily["max_active_runs"] == 1
    assert dag.retention.task_id == "metric_etl_retention"
    assert dag.command_for("metric-etl", None, dag.retention.metric_etl_args) == (
        "metric-etl retention --output json"
    )


def test_dag_imports_nothing_deprecated_under_airflow3(monkeypatch) -> None:
    # Airflow 3 warns on every parse for airflow.exceptions' task exceptions (load_dag makes any
    # warning an error); the Task SDK's airflow.sdk.exceptions has them.
    dag = load_dag(monkeypatch, "airflow3")
    assert dag.AirflowFailException is AirflowFailException
    assert "airflow dags unpause metric_etl" in (dag.__doc__ or "")


def test_dag_retries_only_transient_exit_codes(monkeypatch) -> None:
    dag = load_dag(monkeypatch, "airflow3")
    assert {4, 75} == dag.RETRY_EXIT_CODES
    assert [code for code in (0, 1, 2, 3, 4, 5, 75, 130) if dag.should_retry(code)] == [4, 75]
    assert dag.should_retry(None)  # not a metric-etl exit code (e.g. the worker died): Airflow decides
    message = "Bash command failed. The command returned a non-zero exit code 75."
    assert dag.exit_code_of(AirflowException(message)) == 75
    assert dag.parse_report('a log line\n{"status": "ok", "loaded": 3}\n') == {"status": "ok", "loaded": 3}


def worker_environment(monkeypatch: pytest.MonkeyPatch, settings: dict[str, str]) -> None:
    """The Airflow worker's process environment: its own METRIC_ETL_* settings, and a PATH without
    the virtual environment (metric-etl is found beside the worker's Python, or by a Variable)."""
    for name in list(os.environ):
        if name.startswith("METRIC_ETL_"):
            monkeypatch.delenv(name)
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")


def connection_settings(stack: dict[str, str]) -> dict[str, str]:
    return {
        "METRIC_ETL_BOOTSTRAP_SERVERS": stack["METRIC_ETL_BOOTSTRAP_SERVERS"],
        "METRIC_ETL_DB_URL": stack["METRIC_ETL_DB_URL"],
        "METRIC_ETL_DB_PASSWORD": stack["METRIC_ETL_DB_PASSWORD"],
        "METRIC_ETL_POLL_TIMEOUT_MS": "500",
        "METRIC_ETL_RETRY_DEADLINE": "3",
    }


def test_dag_task_runs_with_only_the_workers_environment_and_maps_failures(
    monkeypatch, stack, make_topic, pg_schema, admin_engine, tmp_path
) -> None:
    # Nothing of the DAG's own reaches the job: no METRIC_ETL_CONFIG pointing at a file the worker
    # lacks, no METRIC_ETL_BIN that the job refuses as an unknown setting.
    dag = load_dag(monkeypatch, "airflow3")
    topic = make_topic(partitions=2)
    produce(stack, topic, [good_message(i) for i in range(15)] + [b"[1, 2]"], partitions=2)
    worker_environment(
        monkeypatch,
        {
            **connection_settings(stack),
            "METRIC_ETL_TOPIC": topic,
            "METRIC_ETL_GROUP_ID": f"g-{topic}",
            "METRIC_ETL_DB_SCHEMA": pg_schema,
        },
    )
    monkeypatch.chdir(tmp_path)  # no ./config/service.yaml: the worker's environment alone
    task = dag.run

    report = task.execute({"params": {"config": None}})
    assert isinstance(report, dict)  # what Airflow pushes to XCom
    assert (report["status"], report["loaded"], report["rejected"]) == ("ok", 15, 1)
    assert count(admin_engine, pg_schema, "website_metrics") == 15

    monkeypatch.setenv("METRIC_ETL_BOOTSTRAP_SERVERS", "127.0.0.1:1")
    with pytest.raises(AirflowException) as transient:
        task.execute({"params": {}})
    assert type(transient.value) is AirflowException  # Airflow will retry it
    assert "non-zero exit code 4" in str(transient.value)

    monkeypatch.setenv("METRIC_ETL_MAX_REJECT_RATIO", "2")
    with pytest.raises(
        AirflowFailException, match=r"metric-etl exited 3 \(configuration error\); not retrying"
    ):
        task.execute({"params": {}})


def test_dag_config_file_from_a_variable_or_the_runs_param(
    monkeypatch, stack, make_topic, pg_schema, admin_engine, tmp_path
) -> None:
    dag = load_dag(monkeypatch, "airflow2")
    topic = make_topic()
    produce(stack, topic, [good_message(i) for i in range(5)])
    config = tmp_path / "etl.yaml"
    config.write_text(f"topic: {topic}\ngroup_id: g-{topic}\ndb_schema: {pg_schema}\n")
    worker_environment(monkeypatch, connection_settings(stack))
    monkeypatch.chdir(tmp_path)
    FakeVariable.values = {
        "metric_etl_config": str(config),
        "metric_etl_executable": str(BIN / "metric-etl"),
    }

    report = dag.run.execute({"params": {"config": None}})
    assert (report["topic"], report["loaded"]) == (topic, 5)
    assert count(admin_engine, pg_schema, "website_metrics") == 5

    with pytest.raises(AirflowFailException, match=r"metric-etl exited 3 "):  # the param wins
        dag.run.execute({"params": {"config": str(tmp_path / "missing.yaml")}})
