"""Every exit code of the design's table, produced by the real command against the real services."""

from __future__ import annotations

import json
import os
import signal

import pytest
from click.testing import CliRunner

from etl.cli import main
from etl.errors import (
    ConfigError,
    EtlError,
    ExitCode,
    Interrupted,
    LockHeld,
    RejectRatioExceeded,
    TopicChanged,
    TransientError,
    exit_code_of,
)
from tests.exactly_once import Job, wait_for
from tests.support import REPO, cli_env, count, good_message, produce, run_cli


def test_exit_code_values_are_stable() -> None:
    # Schedulers and wrappers key on these numbers: changing one is a breaking change.
    assert {c.name: int(c) for c in ExitCode} == {
        "OK": 0,
        "UNEXPECTED": 1,
        "USAGE": 2,
        "CONFIG": 3,
        "UNREACHABLE": 4,
        "REJECT_RATIO": 5,
        "LOCKED": 75,
        "INTERRUPTED": 130,
    }


def test_each_exception_has_one_exit_code() -> None:
    # errors.exit_code_of is the one translation the CLI and the workers use.
    assert exit_code_of(ConfigError("x")) == 3
    assert exit_code_of(TransientError("x")) == 4
    assert exit_code_of(RejectRatioExceeded("x")) == 5
    assert exit_code_of(TopicChanged("x")) == 3
    assert exit_code_of(LockHeld("x")) == 75
    assert exit_code_of(Interrupted("x")) == 130
    assert exit_code_of(KeyboardInterrupt()) == 130
    assert exit_code_of(EtlError("x")) == 1
    assert exit_code_of(RuntimeError("a bug")) == 1


def test_usage_error_is_2() -> None:
    result = CliRunner().invoke(main, ["run", "--cycles", "zero"])
    assert result.exit_code == 2
    assert "Invalid value for '--cycles'" in result.output


def test_config_error_is_3_and_lists_every_problem(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METRIC_ETL_")}
    env.update(
        METRIC_ETL_SECURITY_PROTOCOL="SASL_SSL",
        METRIC_ETL_METRICS_TABLE="x; drop table y",
        METRIC_ETL_CONFIG=str(REPO / "config" / "service.yaml"),
    )
    proc = run_cli(["run"], env)
    assert proc.returncode == 3
    assert proc.stderr.startswith("Error: invalid configuration (4 problems):")
    assert "metrics_table: 'x; drop table y' is not a plain SQL identifier" in proc.stderr
    assert "sasl_password: required with SASL_SSL" in proc.stderr


@pytest.mark.services
def test_unreachable_kafka_is_4_and_moves_nothing(stack, make_topic, pg_schema) -> None:
    topic = make_topic(partitions=1)
    env = cli_env(
        stack, topic, pg_schema, METRIC_ETL_BOOTSTRAP_SERVERS="127.0.0.1:1", METRIC_ETL_RETRY_DEADLINE="2"
    )
    proc = run_cli(["run"], env)
    assert proc.returncode == 4, proc.stderr
    assert "Error: connect to Kafka: no Kafka broker reachable at 127.0.0.1:1" in proc.stderr


@pytest.mark.services
def test_a_topic_that_does_not_exist_is_3_and_is_not_created(stack, kafka_admin, pg_schema) -> None:
    """The broker creates topics on demand (auto.create.topics.enable, Kafka's default): a misspelt
    topic must still be an error, not a new empty topic the run then waits on."""
    topic = f"t-missing-{os.urandom(4).hex()}"
    proc = run_cli(["run"], cli_env(stack, topic, pg_schema))
    assert proc.returncode == 3, proc.stderr
    assert f"topic {topic!r} does not exist" in proc.stderr
    assert topic not in kafka_admin.list_topics()


@pytest.mark.services
def test_unreachable_database_is_4_and_hides_the_password(stack, make_topic, pg_schema) -> None:
    topic = make_topic(partitions=1)
    env = cli_env(
        stack,
        topic,
        pg_schema,
        METRIC_ETL_DB_URL="postgresql://etl@127.0.0.1:1/metrics",
        METRIC_ETL_RETRY_DEADLINE="1",
    )
    proc = run_cli(["run"], env)
    assert proc.returncode == 4, proc.stderr
    assert "PostgreSQL at 127.0.0.1:1/metrics" in proc.stderr
    assert stack["METRIC_ETL_DB_PASSWORD"] not in proc.stderr + proc.stdout


@pytest.mark.services
def test_wrong_database_password_is_3(stack, make_topic, pg_schema) -> None:
    topic = make_topic(partitions=1)
    env = cli_env(stack, topic, pg_schema, METRIC_ETL_DB_PASSWORD="not-the-password")
    proc = run_cli(["run"], env)
    assert proc.returncode == 3, proc.stderr
    assert "authentication failed" in proc.stderr
    assert "not-the-password" not in proc.stderr + proc.stdout


@pytest.mark.services
def test_reject_ratio_is_5_and_rolls_the_cycle_back(stack, make_topic, pg_schema, admin_engine) -> None:
    topic = make_topic(partitions=1)
    produce(stack, topic, [b"not json"] * 5 + [good_message(i) for i in range(5)])
    proc = run_cli(["run", "--max-reject-ratio", "0.2"], cli_env(stack, topic, pg_schema))
    assert proc.returncode == 5, proc.stderr
    assert "5 of 10 messages in cycle 1 were rejected (50% > max_reject_ratio 20%)" in proc.stderr
    assert count(admin_engine, pg_schema, "website_metrics") == 0
    assert count(admin_engine, pg_schema, "website_metrics_rejects") == 0
    assert count(admin_engine, pg_schema, "etl_offsets") == 0
    ok = run_cli(["run", "--max-reject-ratio", "0.5"], cli_env(stack, topic, pg_schema))
    assert ok.returncode == 0


@pytest.mark.services
def test_lock_held_is_75_and_does_nothing(stack, make_topic, pg_schema, admin_engine) -> None:
    from sqlalchemy import text

    topic = make_topic(partitions=1)
    produce(stack, topic, [good_message(i) for i in range(3)])
    key = f"metric-etl:g-{topic}:{topic}"
    with admin_engine.connect() as holder:
        assert holder.execute(text("SELECT pg_try_advisory_lock(hashtext(:k))"), {"k": key}).scalar()
        # The lock stays held throughout: a run that waited for it would never end (run_cli's timeout).
        proc = run_cli(["run", "--lock"], cli_env(stack, topic, pg_schema), timeout=60)
        assert proc.returncode == 75, proc.stderr
        assert "another run holds the lock" in proc.stderr
        holder.execute(text("SELECT pg_advisory_unlock(hashtext(:k))"), {"k": key})
        holder.commit()
    proc = run_cli(["run", "--lock"], cli_env(stack, topic, pg_schema))
    assert proc.returncode == 0


@pytest.mark.services
def test_interrupt_before_first_commit_is_130(stack, make_topic, pg_schema, tmp_path) -> None:
    topic = make_topic(partitions=1)
    job = Job(cli_env(stack, topic, pg_schema), ["--follow"], tmp_path)
    wait_for("the run to poll its partition", lambda: "positioned partitions [0]" in job.stderr)
    job.send(signal.SIGINT)
    assert job.wait(60) == 130, job.stderr
    assert "interrupted before the first cycle committed" in job.stderr


@pytest.mark.services
def test_sigterm_after_commits_finishes_the_cycle_and_exits_0(stack, make_topic, pg_schema, tmp_path) -> None:
    topic = make_topic(partitions=1)
    produce(stack, topic, [good_message(i) for i in range(20)])
    job = Job(cli_env(stack, topic, pg_schema), ["--follow", "--output", "json"], tmp_path)
    wait_for("the backlog loaded", lambda: "loaded 20" in job.stderr)
    job.send(signal.SIGTERM)
    assert job.wait(60) == 0, job.stderr
    out, err = job.stdout, job.stderr
    assert '"stop_reason": "signal"' in out and '"loaded": 20' in out
    assert "SIGTERM received: finishing the current cycle" in err


def test_one_configuration_problem_is_the_error_line_and_several_are_listed_one_a_line() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METRIC_ETL_")}
    env.update(
        METRIC_ETL_METRICS_TABLE="x; drop table y", METRIC_ETL_CONFIG=str(REPO / "config" / "service.yaml")
    )
    table = "metrics_table: 'x; drop table y' is not a plain SQL identifier"
    one = run_cli(["run"], env)
    assert one.returncode == 3
    assert one.stdout == ""
    assert one.stderr.splitlines()[0].startswith(f"Error: invalid configuration: {table}"), one.stderr
    two = run_cli(["run"], {**env, "METRIC_ETL_MAX_REJECT_RATIO": "2"})
    assert two.returncode == 3
    lines = two.stderr.splitlines()
    assert lines[0] == "Error: invalid configuration (2 problems):", two.stderr
    assert (
        lines[1].startswith(f"  - {table}")
        and lines[2] == "  - max_reject_ratio: must be between 0 and 1, got 2.0"
    )


@pytest.mark.services
def test_a_refused_database_password_is_3_with_its_hint_on_stderr(stack, make_topic, pg_schema) -> None:
    topic = make_topic(partitions=1)
    proc = run_cli(["run"], cli_env(stack, topic, pg_schema, METRIC_ETL_DB_PASSWORD="not-the-password"))
    assert proc.returncode == 3, proc.stderr
    assert "Hint: check METRIC_ETL_DB_PASSWORD" in proc.stderr.splitlines()
    assert "Error:" not in proc.stdout and "Hint:" not in proc.stdout


@pytest.mark.services
def test_reject_ratio_says_what_was_rolled_back_and_what_to_do(stack, make_topic, pg_schema) -> None:
    """The report of the run that stopped, on stdout; the error and its hint on stderr."""
    topic = make_topic(partitions=1)
    produce(stack, topic, [b"not json"] * 3 + [good_message(i) for i in range(7)])
    proc = run_cli(["run", "--max-reject-ratio", "0.2", "--output", "json"], cli_env(stack, topic, pg_schema))
    assert proc.returncode == 5, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["exit_code"], report["stop_reason"], report["loaded"]) == (5, "reject_ratio", 0)
    lines = proc.stderr.splitlines()
    assert (
        "Error: 3 of 10 messages in cycle 1 were rejected (30% > max_reject_ratio 20%); "
        "the cycle was rolled back and no offset moved"
    ) in lines, proc.stderr
    assert "Hint: inspect the messages (run with --dry-run) or raise --max-reject-ratio" in lines


@pytest.mark.services
def test_unreachable_kafka_says_what_to_check(stack, make_topic, pg_schema) -> None:
    topic = make_topic(partitions=1)
    env = cli_env(
        stack, topic, pg_schema, METRIC_ETL_BOOTSTRAP_SERVERS="127.0.0.1:1", METRIC_ETL_RETRY_DEADLINE="2"
    )
    proc = run_cli(["run"], env)
    assert proc.returncode == 4, proc.stderr
    hint = "Hint: is the broker up, and is bootstrap_servers the listener for security_protocol PLAINTEXT?"
    assert hint in proc.stderr.splitlines(), proc.stderr
