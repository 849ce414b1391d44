"""The DAG under a real Apache Airflow 3 (`make airflow-check`; not part of `make test`).

`make airflow-check` installs Airflow from cron/airflow/requirements-airflow.txt into a venv of its own and
runs this file with AIRFLOW_CHECK_VENV pointing at it. metric-etl goes into another venv, from the wheel
`python -m build` makes, as cron/README.md tells an operator. Every `airflow dags test` runs with the
worker's environment only (PATH, HOME, AIRFLOW_* and the job's own METRIC_ETL_* connection settings); the
DAG file is copied into a fresh DAGs folder as it ships.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.installs import make_venv
from tests.support import REPO, count, good_message, produce

DAG_FILE = REPO / "cron" / "airflow" / "metric_etl_dag.py"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def airflow_bin() -> Path:
    venv = os.environ.get("AIRFLOW_CHECK_VENV")
    assert venv, "run me with `make airflow-check` (it sets AIRFLOW_CHECK_VENV)"
    return Path(venv) / "bin"


@pytest.fixture(scope="module")
def worker_metric_etl(built_dist: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """metric-etl in a venv of its own, from the built wheel."""
    venv = tmp_path_factory.mktemp("metric-etl") / "venv"
    wheel = next(built_dist.outdir.glob("metric_etl-*.whl"))
    done = make_venv(venv, str(wheel))
    assert done.returncode == 0, done.stdout
    return venv / "bin" / "metric-etl"


@pytest.fixture(scope="module")
def airflow(airflow_bin: Path, worker_metric_etl: Path, stack: Any, tmp_path_factory) -> Callable[..., Any]:
    """``airflow(*args, **worker_env)``: the airflow CLI in the worker's environment; the metadata
    database migrated, the DAG file in the DAGs folder, metric_etl_executable set."""
    home = tmp_path_factory.mktemp("airflow-home")
    (home / "dags").mkdir()
    shutil.copy(DAG_FILE, home / "dags")
    base = {
        "PATH": f"{airflow_bin}:/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "METRIC_ETL_BOOTSTRAP_SERVERS": stack["METRIC_ETL_BOOTSTRAP_SERVERS"],
        "METRIC_ETL_DB_URL": stack["METRIC_ETL_DB_URL"],
        "METRIC_ETL_DB_PASSWORD": stack["METRIC_ETL_DB_PASSWORD"],
        "METRIC_ETL_POLL_TIMEOUT_MS": "500",
        "METRIC_ETL_RETRY_DEADLINE": "3",
    }

    def run(*args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(airflow_bin / "airflow"), *args],
            env={**base, **env},
            cwd=home,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )

    run.home = home  # type: ignore[attr-defined]
    run.env = base  # type: ignore[attr-defined]
    for args in (("db", "migrate"), ("variables", "set", "metric_etl_executable", str(worker_metric_etl))):
        done = run(*args)
        assert done.returncode == 0, done.stdout[-3000:]
    return run


def no_deprecation_from_the_dag(output: str) -> None:
    """Airflow logs a warning with the file that caused it; none may come from the DAG file, and none
    may name the task exceptions' old home."""
    for line in output.splitlines():
        if "metric_etl_dag.py" in line and ("warning" in line.lower() or "Deprecat" in line):
            pytest.fail(f"a warning from the DAG file: {line}")
        assert "airflow.exceptions.Airflow" not in line, line


def tries(output: str, code: int) -> tuple[int, list[str]]:
    """How many times the command ran with exit ``code``, and the task states Airflow recorded."""
    ran = len(re.findall(rf"Command exited with return code {code}\b", output))
    return ran, re.findall(r"new_state=(\w+)", output)


def test_unpause_and_a_run_with_the_report_as_xcom(
    airflow, stack, make_topic, pg_schema, admin_engine
) -> None:
    topic = make_topic(partitions=2)
    produce(stack, topic, [good_message(i) for i in range(30)] + [b"{broken"], partitions=2)
    config = airflow.home / "metric-etl.yaml"
    config.write_text(f"topic: {topic}\ngroup_id: g-{topic}\ndb_schema: {pg_schema}\n")
    assert airflow("variables", "set", "metric_etl_config", str(config)).returncode == 0

    parsed = airflow("dags", "reserialize")
    assert parsed.returncode == 0, parsed.stdout[-3000:]
    no_deprecation_from_the_dag(parsed.stdout)
    assert airflow("dags", "list-import-errors").stdout.count("metric_etl_dag.py") == 0
    listed = json.loads(airflow("dags", "list", "-o", "json").stdout.strip().splitlines()[-1])
    assert sorted((d["dag_id"], d["is_paused"]) for d in listed) == [
        ("metric_etl", "True"),
        ("metric_etl_retention", "True"),
    ]  # created paused
    assert airflow("dags", "unpause", "metric_etl").returncode == 0
    listed = json.loads(airflow("dags", "list", "-o", "json").stdout.strip().splitlines()[-1])
    assert sorted((d["dag_id"], d["is_paused"]) for d in listed) == [
        ("metric_etl", "False"),
        ("metric_etl_retention", "True"),
    ]

    done = airflow("dags", "test", "metric_etl")
    assert done.returncode == 0, done.stdout[-5000:]
    no_deprecation_from_the_dag(done.stdout)
    assert tries(done.stdout, 0) == (1, ["success"])
    report = returned(airflow, "metric_etl", "metric_etl_run")
    assert (report["status"], report["topic"], report["loaded"], report["rejected"]) == ("ok", topic, 30, 1)
    assert count(admin_engine, pg_schema, "website_metrics") == 30
    assert airflow("variables", "delete", "metric_etl_config").returncode == 0


def test_exit_3_fails_at_once(airflow) -> None:
    # A config file the worker does not have, named for this run only by the DAG's param.
    done = airflow("dags", "test", "metric_etl", "-c", json.dumps({"config": "/nonexistent/metric-etl.yaml"}))
    assert done.returncode != 0
    assert "config file /nonexistent/metric-etl.yaml does not exist" in done.stdout
    assert tries(done.stdout, 3) == (1, ["failed"]), done.stdout[-5000:]
    assert "metric-etl exited 3 (configuration error); not retrying" in done.stdout


def test_exit_4_is_retried(airflow, make_topic, pg_schema) -> None:
    topic = make_topic()
    done = airflow(
        "dags", "test", "metric_etl",
        METRIC_ETL_BOOTSTRAP_SERVERS="127.0.0.1:1", METRIC_ETL_TOPIC=topic, METRIC_ETL_DB_SCHEMA=pg_schema,
    )  # fmt: skip
    assert done.returncode != 0
    assert tries(done.stdout, 4) == (3, ["up_for_retry", "up_for_retry", "failed"]), done.stdout[-5000:]


def test_exit_75_is_retried(airflow, worker_metric_etl, stack, make_topic, pg_schema) -> None:
    # Another run of the same group and topic holds the lock for as long as the DAG tries.
    topic = make_topic()
    env = {**airflow.env, "METRIC_ETL_TOPIC": topic, "METRIC_ETL_GROUP_ID": f"g-{topic}",
           "METRIC_ETL_DB_SCHEMA": pg_schema}  # fmt: skip
    holder = subprocess.Popen(
        [str(worker_metric_etl), "run", "--follow", "--lock"],
        env=env,
        cwd=airflow.home,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        for line in holder.stderr:  # the lock is taken before Kafka is asked for partitions
            if "assigned partitions" in line:
                break
        else:
            pytest.fail(f"the lock holder exited {holder.wait()}")
        done = airflow(
            "dags", "test", "metric_etl",
            METRIC_ETL_TOPIC=topic, METRIC_ETL_GROUP_ID=f"g-{topic}", METRIC_ETL_DB_SCHEMA=pg_schema,
        )  # fmt: skip
    finally:
        os.killpg(holder.pid, signal.SIGTERM)
        holder.communicate(timeout=60)
    assert done.returncode != 0
    assert tries(done.stdout, 75) == (3, ["up_for_retry", "up_for_retry", "failed"]), done.stdout[-5000:]


def returned(airflow: Any, dag_id: str, task_id: str) -> Any:
    """The newest value a task returned (its ``return_value`` XCom), from Airflow's database."""
    with sqlite3.connect(airflow.home / "airflow.db") as db:
        (value,) = db.execute(
            "SELECT value FROM xcom WHERE dag_id = ? AND task_id = ? AND key = 'return_value'"
            " ORDER BY timestamp DESC LIMIT 1",
            (dag_id, task_id),
        ).fetchone()
    return json.loads(value)


def test_the_retention_dag_drops_the_partitions_past_the_horizon(
    airflow, stack, make_topic, pg_schema, admin_engine
) -> None:
    """The daily DAG runs `metric-etl retention`: whole partitions past retention_raw_days go, the
    report is the task's XCom."""
    topic = make_topic(partitions=1)
    today = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    days = [today - timedelta(days=d) for d in range(8)]
    produce(stack, topic, [good_message(i, checked_at=f"{t:%Y-%m-%dT%H:%M:%SZ}") for i, t in enumerate(days)])
    config = airflow.home / "retention.yaml"
    settings = f"topic: {topic}\ngroup_id: g-{topic}\ndb_schema: {pg_schema}\n"
    config.write_text(settings)
    assert airflow("variables", "set", "metric_etl_config", str(config)).returncode == 0
    try:
        loaded = airflow("dags", "test", "metric_etl")
        assert loaded.returncode == 0, loaded.stdout[-5000:]
        assert count(admin_engine, pg_schema, "website_metrics") == 8
        config.write_text(settings + "retention_raw_days: 3\n")  # the DBA shortens it

        done = airflow("dags", "test", "metric_etl_retention")
        assert done.returncode == 0, done.stdout[-5000:]
        no_deprecation_from_the_dag(done.stdout)
        assert tries(done.stdout, 0) == (1, ["success"])
        report = returned(airflow, "metric_etl_retention", "metric_etl_retention")
        # Days 4 to 7 lie wholly before the horizon (3 days back); day 3 still holds checks within it.
        expected = [f"website_metrics_p{t:%Y%m%d}" for t in reversed(days[4:])]
        assert [d["name"] for d in report["dropped"]] == expected and report["bytes_freed"] > 0
        assert count(admin_engine, pg_schema, "website_metrics") == 4
    finally:
        assert airflow("variables", "delete", "metric_etl_config").returncode == 0
