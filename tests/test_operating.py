"""Operating the job as a scheduler and an on-call person see it: a lock skip is a skip, a stop is a
stop, every command names its config file, errors send a scheduler the right way, waits are bounded."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.support import REPO, cli_env, good_message, produce, rows, run_cli

pytestmark = pytest.mark.services


def _hold_run_lock(admin_engine, topic: str):
    """A connection holding the advisory lock of the test's group and topic (as another run would)."""
    from sqlalchemy import text

    holder = admin_engine.connect()
    key = f"metric-etl:g-{topic}:{topic}"
    assert holder.execute(text("SELECT pg_try_advisory_lock(hashtext(:k))"), {"k": key}).scalar()
    holder.commit()
    return holder


def _samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value of a Prometheus text file (labels left in the key)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[re.sub(r"\{.*\}", "", name) + (re.search(r"\{.*\}", name) or [""])[0]] = float(value)
    return out


def _names(text: str) -> set[str]:
    return {re.sub(r"\{.*", "", line.split(" ")[0]) for line in text.splitlines() if not line.startswith("#")}


# -- 4: a run that finds the lock held is a skip --------------------------------------------------


def test_lock_held_is_a_skip_in_report_log_runs_table_and_metrics_file(
    stack, make_topic, pg_schema, admin_engine, tmp_path
) -> None:
    topic = make_topic(partitions=2)
    produce(stack, topic, [good_message(i) for i in range(10)], partitions=2)
    env = cli_env(stack, topic, pg_schema)
    prom = tmp_path / "metric_etl.prom"
    first = run_cli(["run", "--lock", "--metrics-file", str(prom)], env)
    assert first.returncode == 0, first.stderr
    before = _samples(prom.read_text())
    assert before[f'metric_etl_last_run_success{{topic="{topic}",group_id="g-{topic}"}}'] == 1
    lag_names = {"metric_etl_lag_messages", "metric_etl_partition_lag_messages"}
    assert lag_names <= _names(prom.read_text())

    holder = _hold_run_lock(admin_engine, topic)
    try:
        as_json = run_cli(["run", "--lock", "--output", "json", "--metrics-file", str(prom)], env)
        as_text = run_cli(["run", "--lock", "--metrics-file", str(prom)], env)
    finally:
        holder.close()

    for proc in (as_json, as_text):
        assert proc.returncode == 75, proc.stderr
        assert " ERROR " not in proc.stderr, proc.stderr
        assert re.search(r" WARNING run \w+ skipped \(lock_held\)", proc.stderr), proc.stderr
        assert "another run holds the lock" in proc.stderr
    report = json.loads(as_json.stdout)
    assert (report["status"], report["stop_reason"]) == ("skipped", "lock_held")
    assert report["finished_at"] is not None and report["exit_code"] == 75
    assert "skipped (another run holds the lock (--lock); nothing was done)" in as_text.stdout

    statuses = [r[0] for r in rows(admin_engine, f'SELECT status FROM "{pg_schema}".etl_runs')]
    assert statuses == ["ok"], statuses  # the skips left no row, least of all one "running"

    after = prom.read_text()
    samples = _samples(after)
    labels = f'{{topic="{topic}",group_id="g-{topic}"}}'
    # The last real run's outcome stands: its success time, its success and its lag.
    for name in (
        "metric_etl_last_success_timestamp_seconds",
        "metric_etl_last_run_success",
        "metric_etl_lag_messages",
    ):
        assert samples[name + labels] == before[name + labels], name
    assert lag_names <= _names(after)
    assert samples["metric_etl_skipped_runs" + labels] == 2
    assert samples["metric_etl_last_skip_timestamp_seconds" + labels] >= time.time() - 120


# -- 6: SIGTERM to --follow is a requested stop: exit 0 ---------------------------------------------


def _start_follow(env, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "etl", "run", "--follow", "--output", "json", *args],
        env=env,
        cwd=str(REPO),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_line(proc: subprocess.Popen[str], pattern: str, timeout: float = 90) -> list[str]:
    """Read stderr until a line matches ``pattern``; the lines read (the event to wait for, no sleep)."""
    import selectors

    lines: list[str] = []
    sel = selectors.DefaultSelector()
    assert proc.stderr is not None
    sel.register(proc.stderr, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sel.select(timeout=1):
            continue
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if re.search(pattern, line):
            return lines
    proc.kill()
    raise AssertionError(f"no line matching {pattern!r} within {timeout}s:\n{''.join(lines)}")


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "busy"])
def test_sigterm_to_follow_exits_0_idle_or_busy(stack, make_topic, pg_schema, admin_engine, busy) -> None:
    from tests.support import count

    topic = make_topic(partitions=1)
    produce(stack, topic, [good_message(i) for i in range(200)])
    env = cli_env(stack, topic, pg_schema)
    if busy:  # one message a cycle: a cycle is always in flight
        env["METRIC_ETL_MAX_POLL_RECORDS"] = "1"
        proc = _start_follow(env)
        _wait_for_line(proc, r"cycle 1: read 1, loaded 1")
    else:  # idle: an earlier run loaded the backlog; the service has nothing to read
        assert run_cli(["run"], env).returncode == 0
        proc = _start_follow(env)
        deadline = time.monotonic() + 90
        running = f"SELECT 1 FROM \"{pg_schema}\".etl_runs WHERE status = 'running'"
        while not rows(admin_engine, running):  # the run row is written once it started
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert (report["status"], report["stop_reason"]) == ("ok", "signal"), err
    assert "interrupted" not in err
    if busy:  # the cycle in flight finished: what it read is loaded, nothing half done
        assert 1 <= report["loaded"] < 200
        assert count(admin_engine, pg_schema, "website_metrics") == report["loaded"]
    status = run_cli(["status"], env)
    assert status.returncode == 0, status.stdout + status.stderr  # a requested stop is no failed run


def test_follow_with_max_seconds_polls_until_the_time_limit(stack, make_topic, pg_schema) -> None:
    """--follow keeps polling after catching up; a cap still ends it (a scheduler without a timeout)."""
    topic = make_topic(partitions=1)
    produce(stack, topic, [good_message(i) for i in range(3)])
    started = time.monotonic()
    proc = run_cli(
        ["run", "--follow", "--max-seconds", "4", "--output", "json"], cli_env(stack, topic, pg_schema)
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["stop_reason"], report["loaded"]) == ("max_seconds", 3)
    assert report["duration_s"] >= 4 and time.monotonic() - started < 90


def test_a_first_run_joins_its_group_once_and_reads_on_its_first_poll(stack, make_topic, pg_schema) -> None:
    """A group's first run joins once, with the topic's partitions, and its first poll reads: no
    rebalance of its own at start (kafka-python joins with the metadata it last refreshed), and no
    poll that waits out its timeout while Kafka says where unstored partitions start."""
    topic = make_topic(partitions=3)
    produce(stack, topic, [good_message(i) for i in range(90)], partitions=3)
    proc = run_cli(["run", "--output", "json"], cli_env(stack, topic, pg_schema))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["status"], report["loaded"], report["cycles"], report["empty_polls"]) == ("ok", 90, 1, 0)
    assert proc.stderr.count("assigned partitions") == 1, proc.stderr
    assert "partitions revoked" not in proc.stderr.split("cycle 1:")[0], proc.stderr


def test_a_caught_up_run_stops_without_waiting_out_a_poll(stack, make_topic, pg_schema) -> None:
    """A run that finds nothing to read (cron's run after the backlog) stops as soon as the stored
    offsets meet the end offsets: no empty poll that waits out its timeout."""
    topic = make_topic(partitions=2)
    produce(stack, topic, [good_message(i) for i in range(40)], partitions=2)
    env = cli_env(stack, topic, pg_schema, METRIC_ETL_POLL_TIMEOUT_MS="6000")
    first = run_cli(["run", "--output", "json"], env)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["loaded"] == 40
    started = time.monotonic()
    second = run_cli(["run", "--output", "json"], env)
    took = time.monotonic() - started
    assert second.returncode == 0, second.stderr
    report = json.loads(second.stdout)
    assert (report["status"], report["stop_reason"], report["read"]) == ("ok", "caught_up", 0)
    assert (report["cycles"], report["empty_polls"], report["lag"]) == (0, 0, 0), report
    assert took < 6, f"the caught-up run took {took:.1f}s: it waited out a poll"


def test_kafka_shows_the_offsets_a_run_stored_when_it_ends(
    stack, make_topic, pg_schema, admin_engine, kafka_admin
) -> None:
    """The group's committed offsets in Kafka (what kafka-consumer-groups and lag exporters show)
    are the run's stored offsets when it ends, after every cycle: no lag left behind a finished run,
    and no warning about a commit."""
    topic = make_topic(partitions=3)
    produce(stack, topic, [good_message(i) for i in range(300)], partitions=3)
    env = cli_env(stack, topic, pg_schema, METRIC_ETL_MAX_POLL_RECORDS="20")
    proc = run_cli(["run", "--output", "json"], env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["loaded"] == 300 and report["cycles"] >= 10, report
    assert "offset commit failed" not in proc.stderr, proc.stderr
    stored = {
        r.partition: r.next_offset
        for r in rows(admin_engine, f'SELECT partition, next_offset FROM "{pg_schema}".etl_offsets')
    }
    group = f"g-{topic}"
    committed = kafka_admin.list_group_offsets({group: None}).get(group, {})
    assert {tp.partition: m.offset for tp, m in committed.items() if tp.topic == topic} == stored
    assert sum(stored.values()) == 300


# -- 7: every command names the config file it read -------------------------------------------------


def test_every_command_names_the_config_file_it_read(stack, make_topic, pg_schema, tmp_path) -> None:
    topic = make_topic(partitions=1)
    produce(stack, topic, [good_message(i) for i in range(3)])
    # A checkout's ./config/service.yaml, picked up because no --config / METRIC_ETL_CONFIG was given.
    (tmp_path / "config").mkdir()
    found = tmp_path / "config" / "service.yaml"
    found.write_text(f"topic: {topic}\n")
    env = cli_env(stack, "unused", pg_schema, METRIC_ETL_GROUP_ID=f"g-{topic}")
    del env["METRIC_ETL_CONFIG"], env["METRIC_ETL_TOPIC"]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "etl", *args],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )

    check = cli("check")
    assert check.stdout.splitlines()[0] == (
        f"settings: config file {found}, then METRIC_ETL_* environment and flags"
    ), check.stdout
    as_json = json.loads(cli("check", "--output", "json").stdout)
    assert as_json["config_file"] == str(found)
    run = cli("run", "--output", "json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["config_file"] == str(found)
    text = cli("run")
    assert f"  config file {found}" in text.stdout
    for args in (["status", "-v"], ["rejects", "list", "-v"], ["init-db", "-v"], ["run", "-v"]):
        proc = cli(*args)
        assert f"DEBUG settings: config file {found}, then" in proc.stderr, (args, proc.stderr)
    (tmp_path / "config" / "service.yaml").unlink()
    assert (
        "no config file (config/service.yaml or /etc/metric-etl/service.yaml not found)"
        in cli("check").stdout
    )


def test_an_unreadable_secret_file_is_named_in_the_error(tmp_path) -> None:
    missing = tmp_path / "secrets" / "db_password"
    env = {"PATH": "/usr/bin:/bin", "METRIC_ETL_DB_PASSWORD_FILE": str(missing)}
    proc = run_cli(["status"], env, timeout=60)
    assert proc.returncode == 3
    assert (
        f"METRIC_ETL_DB_PASSWORD_FILE: cannot read secret file {missing}: No such file or directory"
        in proc.stderr
    )
    config = tmp_path / "service.yaml"
    config.write_text(f"sasl_password_file: {tmp_path}\n")  # a directory: not readable as a file
    proc = run_cli(["check", "--config", str(config)], {"PATH": "/usr/bin:/bin"}, timeout=60)
    assert proc.returncode == 3
    assert f"{config}: sasl_password_file: cannot read secret file {tmp_path}: Is a directory" in proc.stderr


# -- 10: a run blocked by a database lock waits a bounded time and names who holds it --------------


@pytest.mark.parametrize(
    ("args", "extra"),
    [
        (["--max-seconds", "6"], {"METRIC_ETL_RETRY_DEADLINE": "300"}),
        (["--follow"], {"METRIC_ETL_DB_LOCK_TIMEOUT": "3", "METRIC_ETL_RETRY_DEADLINE": "5"}),
    ],
    ids=["max-seconds", "follow"],
)
def test_a_table_lock_bounds_the_run_names_the_blocker_and_the_next_run_resumes(
    stack, make_topic, pg_schema, admin_engine, args, extra
) -> None:
    import sqlalchemy as sa

    from tests.support import count

    topic = make_topic(partitions=1)
    produce(stack, topic, [good_message(i) for i in range(10)])
    env = cli_env(stack, topic, pg_schema)
    assert run_cli(["run"], env).returncode == 0
    produce(stack, topic, [good_message(i) for i in range(10, 20)])
    # An analyst's session of the job's own role (whose activity the job may read), holding the table.
    url = sa.make_url(stack["METRIC_ETL_DB_URL"]).set(password=stack["METRIC_ETL_DB_PASSWORD"])
    analyst = sa.create_engine(url.set(drivername="postgresql+psycopg2"))
    with analyst.connect() as holder:
        holder_pid = holder.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        holder.exec_driver_sql(f'LOCK TABLE "{pg_schema}".website_metrics IN ACCESS EXCLUSIVE MODE')
        started = time.monotonic()
        blocked = run_cli(["run", *args], {**env, **extra}, timeout=90)
        took = time.monotonic() - started
        holder.rollback()
    analyst.dispose()
    assert blocked.returncode == 4, blocked.stderr
    assert took < 60, took  # the lock was held for all of it: without a lock timeout it waits forever
    assert f"for a lock held by pid {holder_pid} (user " in blocked.stderr
    assert "state idle in transaction" in blocked.stderr
    assert f': LOCK TABLE "{pg_schema}".website_metrics IN ACCESS EXCLUSIVE MODE)' in blocked.stderr
    assert count(admin_engine, pg_schema, "website_metrics") == 10
    after = run_cli(["run", "--output", "json"], env)
    assert after.returncode == 0, after.stderr
    assert json.loads(after.stdout)["loaded"] == 10
    assert count(admin_engine, pg_schema, "website_metrics") == 20


# -- 8: configuration errors are exit 3 at once; mutual TLS for real ---------------------------------

SLOW_RETRIES = {"METRIC_ETL_RETRY_DEADLINE": "300"}  # a config error must not wait any of this


def _config_error(proc: subprocess.CompletedProcess[str], took: float, message: str) -> None:
    assert proc.returncode == 3, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert "retrying" not in proc.stderr, proc.stderr  # found on the first attempt
    assert took < 60, took


def _timed(args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    proc = run_cli(args, env, timeout=200)
    return proc, time.monotonic() - started


def test_a_missing_database_password_is_exit_3_at_once(stack, make_topic, pg_schema) -> None:
    env = {**cli_env(stack, make_topic(partitions=1), pg_schema), **SLOW_RETRIES}
    del env["METRIC_ETL_DB_PASSWORD"]
    proc, took = _timed(["run"], env)
    _config_error(proc, took, "the server asks for a password and none is set (")
    assert "fe_sendauth: no password supplied" in proc.stderr
    assert " running (-)" not in proc.stderr  # the report says failed, not still running
    assert "Hint: set METRIC_ETL_DB_PASSWORD or METRIC_ETL_DB_PASSWORD_FILE" in proc.stderr


def test_a_password_in_db_url_is_used_with_a_warning(stack, make_topic, pg_schema) -> None:
    import sqlalchemy as sa

    topic = make_topic(partitions=1)
    produce(stack, topic, [good_message(0)])
    env = cli_env(stack, topic, pg_schema)
    password = env.pop("METRIC_ETL_DB_PASSWORD")
    url = sa.make_url(stack["METRIC_ETL_DB_URL"]).set(password=password)
    proc = run_cli(["run", "--db-url", url.render_as_string(hide_password=False)], env)
    assert proc.returncode == 0, proc.stderr
    assert "WARNING db_url carries a password: it is used, but a URL shows in process lists" in proc.stderr
    assert password not in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("listener", "extra", "message"),
    [
        (
            "STACK_KAFKA_SSL",
            {"METRIC_ETL_SECURITY_PROTOCOL": "SSL", "METRIC_ETL_SSL_CAFILE": "STACK_WRONG_CA_FILE"},
            "the broker certificate is not trusted (",
        ),
        (
            "STACK_KAFKA_SASL_SSL",
            {
                "METRIC_ETL_SECURITY_PROTOCOL": "SASL_SSL",
                "METRIC_ETL_SSL_CAFILE": "STACK_CA_FILE",
                "METRIC_ETL_SASL_MECHANISM": "SCRAM-SHA-512",
            },
            "SASL authentication failed for user 'etl' with SCRAM-SHA-512",
        ),
        (
            "STACK_KAFKA_SASL_SSL",
            {
                "METRIC_ETL_SECURITY_PROTOCOL": "SASL_SSL",
                "METRIC_ETL_SSL_CAFILE": "STACK_CA_FILE",
                "METRIC_ETL_SASL_MECHANISM": "PLAIN",
            },
            "SASL authentication failed for user 'etl' with PLAIN",
        ),
        (
            "STACK_KAFKA_SASL_PLAINTEXT",
            {"METRIC_ETL_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "METRIC_ETL_SASL_MECHANISM": "SCRAM-SHA-256"},
            "SASL authentication failed for user 'etl' with SCRAM-SHA-256",
        ),
    ],
    ids=["wrong-ca", "sasl-ssl-scram", "sasl-ssl-plain", "sasl-plaintext-scram"],
)
def test_a_refused_certificate_or_password_is_exit_3_at_once_on_run(
    stack, make_topic, pg_schema, listener, extra, message
) -> None:
    env = {
        **cli_env(stack, make_topic(partitions=1), pg_schema),
        **SLOW_RETRIES,
        "METRIC_ETL_BOOTSTRAP_SERVERS": stack[listener],
        **{k: stack.get(v, v) for k, v in extra.items()},
    }
    if "SASL" in extra["METRIC_ETL_SECURITY_PROTOCOL"]:
        env["METRIC_ETL_SASL_USERNAME"] = stack["STACK_SASL_USER"]
        env["METRIC_ETL_SASL_PASSWORD"] = "not-" + stack["STACK_SASL_PASSWORD"][:6]
    proc, took = _timed(["run"], env)
    _config_error(proc, took, message)


def test_run_over_sasl_plaintext_loads(stack, make_topic, pg_schema) -> None:
    topic = make_topic(partitions=2)
    produce(stack, topic, [good_message(i) for i in range(8)], partitions=2)
    env = cli_env(
        stack,
        topic,
        pg_schema,
        METRIC_ETL_BOOTSTRAP_SERVERS=stack["STACK_KAFKA_SASL_PLAINTEXT"],
        METRIC_ETL_SECURITY_PROTOCOL="SASL_PLAINTEXT",
        METRIC_ETL_SASL_MECHANISM="SCRAM-SHA-512",
        METRIC_ETL_SASL_USERNAME=stack["STACK_SASL_USER"],
        METRIC_ETL_SASL_PASSWORD=stack["STACK_SASL_PASSWORD"],
    )
    proc = run_cli(["run", "--output", "json"], env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["loaded"] == 8


def _mtls_env(stack, topic: str, schema: str, **extra: str) -> dict[str, str]:
    settings = {
        "METRIC_ETL_BOOTSTRAP_SERVERS": stack["STACK_KAFKA_MTLS"],  # localhost: the only name it has
        "METRIC_ETL_SECURITY_PROTOCOL": "SSL",
        "METRIC_ETL_SSL_CAFILE": stack["STACK_CA_FILE"],
        **SLOW_RETRIES,
        **extra,
    }
    return cli_env(stack, topic, schema, **settings)


@pytest.mark.parametrize("key", ["plain", "encrypted"])
def test_mutual_tls_loads_with_a_client_certificate(stack, make_topic, pg_schema, key) -> None:
    topic = make_topic(partitions=1)
    produce(stack, topic, [good_message(i) for i in range(5)])
    extra = {
        "METRIC_ETL_SSL_CERTFILE": stack["STACK_CLIENT_CERT"],
        "METRIC_ETL_SSL_KEYFILE": stack["STACK_CLIENT_KEY"],
    }
    if key == "encrypted":
        extra["METRIC_ETL_SSL_KEYFILE"] = stack["STACK_CLIENT_KEY_ENCRYPTED"]
        extra["METRIC_ETL_SSL_KEY_PASSWORD"] = stack["STACK_CLIENT_KEY_PASSWORD"]
    proc = run_cli(["run", "--output", "json"], _mtls_env(stack, topic, pg_schema, **extra))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["loaded"] == 5
    assert stack["STACK_CLIENT_KEY_PASSWORD"] not in proc.stdout + proc.stderr


def test_mutual_tls_without_a_client_certificate_says_so(stack, make_topic, pg_schema) -> None:
    env = _mtls_env(stack, make_topic(partitions=1), pg_schema)
    proc, took = _timed(["run"], env)
    _config_error(proc, took, "the broker asks for a client certificate: set ssl_certfile and ssl_keyfile")
    check = run_cli(["check"], env)
    assert check.returncode == 3
    assert "the broker asks for a client certificate: set ssl_certfile and ssl_keyfile" in check.stdout


def test_mutual_tls_with_a_wrong_key_password_says_so(stack, make_topic, pg_schema) -> None:
    env = _mtls_env(
        stack,
        make_topic(partitions=1),
        pg_schema,
        METRIC_ETL_SSL_CERTFILE=stack["STACK_CLIENT_CERT"],
        METRIC_ETL_SSL_KEYFILE=stack["STACK_CLIENT_KEY_ENCRYPTED"],
        METRIC_ETL_SSL_KEY_PASSWORD="not-the-passphrase",
    )
    proc, took = _timed(["run"], env)
    _config_error(proc, took, f"cannot load the client certificate {stack['STACK_CLIENT_CERT']} with key")


def test_mutual_tls_host_name_mismatch_and_ssl_check_hostname_false(stack, make_topic, pg_schema) -> None:
    topic = make_topic(partitions=1)
    produce(stack, topic, [good_message(i) for i in range(3)])
    by_ip = stack["STACK_KAFKA_MTLS"].replace("localhost", "127.0.0.1")  # not in the certificate
    env = _mtls_env(
        stack,
        topic,
        pg_schema,
        METRIC_ETL_BOOTSTRAP_SERVERS=by_ip,
        METRIC_ETL_SSL_CERTFILE=stack["STACK_CLIENT_CERT"],
        METRIC_ETL_SSL_KEYFILE=stack["STACK_CLIENT_KEY"],
    )
    proc, took = _timed(["run"], env)
    _config_error(proc, took, "the broker certificate does not name this host (IP address mismatch")
    proc = run_cli(["run", "--output", "json"], {**env, "METRIC_ETL_SSL_CHECK_HOSTNAME": "false"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["loaded"] == 3


# -- 9: what the README says, the tool does ----------------------------------------------------------


def test_run_takes_db_schema_and_its_partition_table_is_aligned(stack, make_topic, pg_schema) -> None:
    topic = make_topic(partitions=2)
    produce(stack, topic, [good_message(i) for i in range(24)], partitions=2)
    env = cli_env(stack, topic, pg_schema)
    del env["METRIC_ETL_DB_SCHEMA"]
    proc = run_cli(["run", "--db-schema", pg_schema], env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    table = lines[lines.index("  partition  start  end  lag") :][:3]
    assert table == [
        "  partition  start  end  lag",
        "          0      0   12    0",
        "          1      0   12    0",
    ]


def _rejects_in_two_topics(stack, make_topic, pg_schema) -> tuple[dict[str, str], str, str]:
    """Two topics' rejects in one schema; the env configured for the first topic."""
    first, second = make_topic(partitions=1), make_topic(partitions=1)
    for topic in (first, second):
        produce(stack, topic, [good_message(0, status_code="200"), b"{broken"])
        assert run_cli(["run"], cli_env(stack, topic, pg_schema)).returncode == 0
    return cli_env(stack, first, pg_schema), first, second


def test_rejects_list_and_purge_honour_the_configured_topic(
    stack, make_topic, pg_schema, admin_engine
) -> None:
    env, first, second = _rejects_in_two_topics(stack, make_topic, pg_schema)
    listed = json.loads(run_cli(["rejects", "list", "--output", "json"], env).stdout)
    assert {r["topic"] for r in listed} == {first}
    listed = json.loads(run_cli(["rejects", "list", "--all-topics", "--output", "json"], env).stdout)
    assert {r["topic"] for r in listed} == {first, second}
    with admin_engine.begin() as conn:
        conn.exec_driver_sql(
            f"UPDATE \"{pg_schema}\".website_metrics_rejects SET rejected_at = now() - interval '40 days'"
        )
    purged = run_cli(["rejects", "purge", "--older-than", "30d"], env)
    assert purged.returncode == 0, purged.stderr
    assert (
        purged.stdout.startswith("deleted 2 rejects rejected before ") and f"(topic {first})" in purged.stdout
    )
    topics = [
        r[0] for r in rows(admin_engine, f'SELECT DISTINCT topic FROM "{pg_schema}".website_metrics_rejects')
    ]
    assert topics == [second]
    purged = run_cli(["rejects", "purge", "--older-than", "30d", "--topic", second, "--output", "json"], env)
    assert json.loads(purged.stdout)["deleted"] == 2


def test_error_values_are_json_values_in_show_and_export(stack, make_topic, pg_schema, admin_engine) -> None:
    env, first, _ = _rejects_in_two_topics(stack, make_topic, pg_schema)
    (reject_id,) = [
        r[0]
        for r in rows(
            admin_engine,
            f"SELECT id FROM \"{pg_schema}\".website_metrics_rejects WHERE topic = :t AND stage = 'schema'",
            t=first,
        )
    ]
    shown = json.loads(run_cli(["rejects", "show", str(reject_id), "--output", "json"], env).stdout)
    lines = run_cli(["rejects", "export", "--format", "jsonl"], env).stdout.splitlines()
    (exported,) = [r for r in map(json.loads, lines) if r["id"] == reject_id]
    for record in (shown, exported):
        (error,) = [e for e in record["errors"] if e["field"] == "status_code"]
        assert error["value"] == "200", error  # the string "200", not "\"200\""
    text = run_cli(["rejects", "show", str(reject_id)], env).stdout
    assert '- status_code: type  value: "200"' in text


def test_a_first_run_that_failed_writes_last_success_0(stack, make_topic, pg_schema, tmp_path) -> None:
    prom = tmp_path / "metric_etl.prom"
    env = cli_env(stack, make_topic(partitions=1), pg_schema, METRIC_ETL_BOOTSTRAP_SERVERS="127.0.0.1:1")
    env["METRIC_ETL_RETRY_DEADLINE"] = "1"
    proc = run_cli(["run", "--metrics-file", str(prom)], env)
    assert proc.returncode == 4, proc.stderr
    samples = _samples(prom.read_text())
    (key,) = [k for k in samples if k.startswith("metric_etl_last_success_timestamp_seconds{")]
    assert samples[key] == 0  # so `time() - metric_etl_last_success_timestamp_seconds > 900` fires


def test_check_names_every_grant_the_readme_lists_at_once(stack, make_topic, pg_schema, admin_engine) -> None:
    import secrets
    import uuid

    import sqlalchemy as sa

    topic = make_topic(partitions=1)
    env = cli_env(stack, topic, pg_schema)
    assert run_cli(["init-db"], env).returncode == 0
    name, password = f"lp_{uuid.uuid4().hex[:8]}", secrets.token_hex(16)
    with admin_engine.begin() as conn:
        conn.execute(sa.text(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'"))
        conn.execute(sa.text(f'GRANT USAGE ON SCHEMA "{pg_schema}" TO {name}'))
    try:
        url = sa.make_url(stack["METRIC_ETL_DB_URL"]).set(username=name)
        as_role = {
            **env,
            "METRIC_ETL_DB_URL": url.render_as_string(hide_password=False),
            "METRIC_ETL_DB_PASSWORD": password,
        }
        check = run_cli(["check"], as_role)
        assert check.returncode == 3, check.stdout
        # The run needs the sequence (its INSERT draws from it), as the README lists it: the grant
        # is in the run's failed check, not in the warning about the rejects commands.
        run_part, _, ops_part = check.stdout.partition("WARN  database: rejects commands")
        grant = f"GRANT USAGE ON SEQUENCE {pg_schema}.website_metrics_rejects_id_seq TO {name};"
        assert grant in run_part and grant not in ops_part, check.stdout
        assert f"GRANT SELECT, INSERT ON {pg_schema}.website_metrics_rejects TO {name};" in run_part
    finally:
        with admin_engine.begin() as conn:
            conn.execute(sa.text(f"DROP OWNED BY {name}"))
            conn.execute(sa.text(f"DROP ROLE {name}"))
