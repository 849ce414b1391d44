"""Airflow: drain website-metrics into PostgreSQL every five minutes with ``metric-etl run``.

Copy this file into the DAGs folder of an Airflow 3.x (or 2.6+) deployment. On every worker, install
metric-etl from the repository (it is not on the public package index), in a virtual environment of
its own: ``python3 -m venv /opt/metric-etl/venv && /opt/metric-etl/venv/bin/pip install
metric_etl-<version>-<python>-<platform>.whl`` (the wheel ``python -m build`` makes in a checkout), or
``/opt/metric-etl/venv/bin/pip install "metric-etl @ git+<repository URL>"``. cron/README.md
("Airflow") goes from a fresh worker to a running DAG.

The DAG sets no environment variable: the job reads the worker's own (``METRIC_ETL_*``, secrets or
``*_FILE`` names of secret files), and, if the operator names one, a config file. Two Airflow
Variables, both optional, read when the task runs (not when the file is parsed):

- ``metric_etl_executable``: the ``metric-etl`` to run. Default: the one installed beside the
  worker's own Python, else ``metric-etl`` on the worker's PATH.
- ``metric_etl_config``: a config file on the worker, passed as ``--config``. A manual run can name
  another one with the ``config`` param (``airflow dags trigger metric_etl --conf '{"config": "..."}'``).
  Without either, the job looks where it always does (README "Configuration").

What the task does:

- ``metric-etl run --max-seconds 240 --lock --output json``: the run stops itself after 240 s,
  ``execution_timeout`` kills it at 285 s, both below the five-minute schedule; ``max_active_runs=1``
  keeps runs from overlapping (and ``--lock`` across schedulers too).
- Retries only on the transient exit codes: 4 (Kafka or PostgreSQL unreachable) and 75 (another
  run holds the lock). Any other failure (3 configuration, 5 reject ratio, 1 bug) fails the task at
  once: retrying cannot fix it.
- The run report (one JSON object, the last line on stdout) is parsed and pushed to XCom as the
  task's return value: ``ti.xcom_pull(task_ids="metric_etl_run")["loaded"]``.

A second DAG, ``metric_etl_retention``, runs ``metric-etl retention --output json`` once a day (03:17):
it drops the raw checks' partitions past ``retention_raw_days`` and makes partitions a week ahead.

The DAGs are created paused: ``airflow dags unpause metric_etl`` (and ``metric_etl_retention``) starts
the schedule.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

try:  # Airflow 3: the Task SDK (airflow.exceptions and airflow.models warn as deprecated there)
    from airflow.providers.standard.operators.bash import BashOperator
    from airflow.sdk import DAG, Param, Variable
    from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException
except ImportError:  # Airflow 2
    from airflow import DAG
    from airflow.exceptions import AirflowException, AirflowFailException, AirflowSkipException
    from airflow.models import Param, Variable
    from airflow.operators.bash import BashOperator

SCHEDULE = "*/5 * * * *"
MAX_SECONDS = 240  # the run's own cap: it stops between cycles
EXECUTION_TIMEOUT = timedelta(seconds=285)  # Airflow's hard cap, below the five-minute interval
RETRY_EXIT_CODES = frozenset({4, 75})  # transient: unreachable, or locked by another run
EXIT_CODES = {
    1: "unexpected error (a bug)",
    2: "usage error",
    3: "configuration error",
    4: "Kafka or PostgreSQL unreachable",
    5: "reject ratio above --max-reject-ratio",
    75: "another run holds the lock",
    130: "interrupted",
}
EXECUTABLE_VARIABLE = "metric_etl_executable"
CONFIG_VARIABLE = "metric_etl_config"

_EXIT_CODE = re.compile(r"non-zero exit code (\d+)")


def default_executable() -> str:
    """``metric-etl`` installed beside the worker's Python, else whatever PATH finds."""
    beside = Path(sys.executable).with_name("metric-etl")
    return str(beside) if beside.exists() else "metric-etl"


RUN_ARGS = ("run", "--max-seconds", str(MAX_SECONDS), "--lock", "--output", "json")
RETENTION_ARGS = ("retention", "--output", "json")
RETENTION_SCHEDULE = "17 3 * * *"  # daily, off the hour


def command_for(executable: str, config: str | None, args: tuple[str, ...] = RUN_ARGS) -> str:
    """The shell command of one run (or of ``args``); ``--config`` only when the operator named a file."""
    words = [executable, *args]
    if config:
        words += ["--config", config]
    return shlex.join(words)


def exit_code_of(exc: BaseException) -> int | None:
    """The command's exit code, from BashOperator's failure message (the same in Airflow 2 and 3)."""
    match = _EXIT_CODE.search(str(exc))
    return int(match.group(1)) if match else None


def should_retry(exit_code: int | None) -> bool:
    """Retry only what can pass later; an unknown failure (no exit code) keeps Airflow's default."""
    return exit_code is None or exit_code in RETRY_EXIT_CODES


def parse_report(output: str | None) -> Any:
    """The run report from the command's last output line (JSON), or the line itself if it is not."""
    if not output:
        return None
    last = output.strip().splitlines()[-1]
    try:
        return json.loads(last)
    except ValueError:
        return last


class MetricEtlRunOperator(BashOperator):
    """BashOperator that builds its command from the Variables when it runs, fails without retrying
    unless the exit code is transient, and returns the run report as a dict (pushed to XCom)."""

    def __init__(self, *, metric_etl_args: tuple[str, ...] = RUN_ARGS, **kwargs: Any) -> None:
        self.metric_etl_args = metric_etl_args
        kwargs.setdefault(
            "bash_command", command_for("metric-etl", None, metric_etl_args)
        )  # set in execute()
        kwargs.setdefault("skip_on_exit_code", None)  # no exit code means "skipped" for metric-etl
        super().__init__(**kwargs)

    def execute(self, context: Any) -> Any:
        # Variables are read here, in the task, not at parse time (the scheduler parses every 30 s).
        params = context.get("params") or {}
        executable = Variable.get(EXECUTABLE_VARIABLE, None) or default_executable()
        self.bash_command = command_for(
            executable, params.get("config") or Variable.get(CONFIG_VARIABLE, None), self.metric_etl_args
        )
        try:
            output = super().execute(context)
        except (AirflowSkipException, AirflowFailException):
            raise
        except AirflowException as exc:
            code = exit_code_of(exc)
            if not should_retry(code):
                meaning = EXIT_CODES.get(code or 0, "failed")
                raise AirflowFailException(f"metric-etl exited {code} ({meaning}); not retrying") from exc
            raise  # transient: Airflow retries after retry_delay
        return parse_report(output)


with DAG(
    dag_id="metric_etl",
    description="Kafka website-metrics -> PostgreSQL, every five minutes",
    schedule=SCHEDULE,
    start_date=datetime(2026, 1, 1),
    catchup=False,  # each run drains everything that is there: nothing to catch up
    max_active_runs=1,
    default_args={
        "retries": 2,
        "retry_delay": timedelta(seconds=30),
        "execution_timeout": EXECUTION_TIMEOUT,
    },
    params={
        "config": Param(
            None,
            type=["null", "string"],
            description=f"config file on the worker for this run (default: the {CONFIG_VARIABLE} Variable)",
        )
    },
    tags=["metric-etl"],
) as dag:
    # No env=: BashOperator then hands the command the worker's own environment, unchanged.
    run = MetricEtlRunOperator(task_id="metric_etl_run")


# Once a day: drop the raw checks' partitions past retention_raw_days, old rollup rows and reviewed
# rejects, and make the partitions a week ahead. Retried on 4 (unreachable, or the table stayed
# locked), like the run.
with DAG(
    dag_id="metric_etl_retention",
    description="metric-etl retention: drop partitions past the horizon, make them ahead",
    schedule=RETENTION_SCHEDULE,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={
        "retries": 2,
        "retry_delay": timedelta(minutes=5),
        "execution_timeout": timedelta(minutes=30),
    },
    params={"config": Param(None, type=["null", "string"], description="config file on the worker")},
    tags=["metric-etl"],
) as retention_dag:
    retention = MetricEtlRunOperator(task_id="metric_etl_retention", metric_etl_args=RETENTION_ARGS)
