"""Airflow example: drain website-metrics into PostgreSQL every five minutes with ``metric-etl run``.

Copy this file into the DAGs folder of an Airflow 2.6+ or 3.x deployment whose workers have
metric-etl installed (``pip install metric-etl`` in the worker image). Settings come from
/etc/metric-etl/service.yaml on the worker; the secrets from files named by ``*_FILE`` variables,
so they never pass through Airflow (no Variable, no rendered template holds them).

- ``metric-etl run --max-seconds 240 --lock --output json``: the run stops itself after 240 s,
  ``execution_timeout`` kills it at 285 s, both below the five-minute schedule; ``max_active_runs=1``
  keeps runs from overlapping (and ``--lock`` across schedulers too).
- Retries only on the transient exit codes: 4 (Kafka or PostgreSQL unreachable) and 75 (another
  run holds the lock). Any other failure (3 configuration, 5 reject ratio, 1 bug) fails the task at
  once: retrying cannot fix it.
- The run report (one JSON object, the last line on stdout) is parsed and pushed to XCom as the
  task's return value: ``ti.xcom_pull(task_ids="metric_etl_run")["loaded"]``.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timedelta
from typing import Any

from airflow.exceptions import AirflowException, AirflowFailException, AirflowSkipException

try:  # Airflow 3
    from airflow.providers.standard.operators.bash import BashOperator
except ImportError:  # Airflow 2
    from airflow.operators.bash import BashOperator

try:  # Airflow 3
    from airflow.sdk import DAG
except ImportError:  # Airflow 2
    from airflow import DAG

METRIC_ETL = os.environ.get("METRIC_ETL_BIN", "metric-etl")
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
COMMAND = f"{METRIC_ETL} run --max-seconds {MAX_SECONDS} --lock --output json"
ENV = {
    "METRIC_ETL_CONFIG": "/etc/metric-etl/service.yaml",
    "METRIC_ETL_DB_PASSWORD_FILE": "/etc/metric-etl/db_password",
}

_EXIT_CODE = re.compile(r"non-zero exit code (\d+)")


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
    """BashOperator that fails without retrying unless the exit code is transient, and returns the
    run report as a dict (pushed to XCom)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("skip_on_exit_code", None)  # no exit code means "skipped" for metric-etl
        super().__init__(**kwargs)

    def execute(self, context: Any) -> Any:
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
    tags=["metric-etl"],
) as dag:
    run = MetricEtlRunOperator(
        task_id="metric_etl_run",
        bash_command=COMMAND,
        env=ENV,
        append_env=True,  # keep PATH and the worker's own METRIC_ETL_* variables
    )
