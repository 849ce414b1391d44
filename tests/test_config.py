"""Settings: precedence, every problem at once, secrets only from env or files."""

from __future__ import annotations

from pathlib import Path

import pytest

from etl.config import Settings, load_settings, mask, mask_url, secrets_of
from etl.errors import ConfigError, ExitCode

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "service.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_config_file_states_the_built_in_defaults() -> None:
    # config/service.yaml documents the defaults; an installed wheel uses the built-in ones instead.
    assert load_settings(REPO / "config" / "service.yaml", env={}) == Settings()


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    path = write(tmp_path, "topic: from-file\ngroup_id: file-group\nsleep: 2\nmax_poll_records: 10\n")
    env = {"METRIC_ETL_GROUP_ID": "env-group", "METRIC_ETL_SLEEP": "3"}
    s = load_settings(path, env=env, overrides={"sleep": 4.0, "cycles": None})
    assert s.topic == "from-file"  # file over default
    assert s.group_id == "env-group"  # env over file
    assert s.sleep == 4.0  # flag over env
    assert s.max_poll_records == 10
    assert s.cycles is None  # a flag not given changes nothing
    assert s.db_schema == "public"  # default


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "topic: picked-by-env\n")
    assert load_settings(env={"METRIC_ETL_CONFIG": str(path)}).topic == "picked-by-env"


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "topik: x\nmax_poll_records: lots\nsecurity_protocol: TLS\nmetrics_table: 'x; drop table y'\n",
    )
    env = {"METRIC_ETL_DB_SSLMODE": "sometimes", "METRIC_ETL_MAX_REJECT_RATIO": "2"}
    with pytest.raises(ConfigError) as info:
        load_settings(path, env=env)
    text = str(info.value)
    assert info.value.exit_code == ExitCode.CONFIG
    assert "topik: unknown setting (did you mean 'topic'?)" in text
    assert "max_poll_records: expected a whole number, got 'lots'" in text
    assert "security_protocol: expected one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL, got 'TLS'" in text
    assert "metrics_table: 'x; drop table y' is not a plain SQL identifier" in text
    assert "db_sslmode: expected one of" in text
    assert "max_reject_ratio: must be between 0 and 1, got 2.0" in text
    assert len(info.value.problems) == 6


def test_range_and_cross_field_problems_listed_together() -> None:
    env = {
        "METRIC_ETL_SECURITY_PROTOCOL": "SASL_SSL",
        "METRIC_ETL_DB_SSLMODE": "sometimes",
        "METRIC_ETL_MAX_REJECT_RATIO": "2",
        "METRIC_ETL_METRICS_TABLE": "x; drop table y",
        "METRIC_ETL_FROM_TIMESTAMP": "2026-11-28T10:00:00",
    }
    with pytest.raises(ConfigError) as info:
        load_settings(env=env)
    problems = "\n".join(info.value.problems)
    for expected in (
        "sasl_mechanism: SASL_SSL needs one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512",
        "sasl_username: required with SASL_SSL",
        "sasl_password: required with SASL_SSL",
        "db_sslmode: expected one of",
        "max_reject_ratio: must be between 0 and 1",
        "metrics_table: 'x; drop table y' is not a plain SQL identifier",
        "from_timestamp: expected an ISO-8601 time with a zone",
    ):
        assert expected in problems
    assert len(info.value.problems) == 7


def test_secret_in_config_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "db_password: hunter2\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert "secrets may not be written in the config file; set METRIC_ETL_DB_PASSWORD" in str(info.value)
    assert "hunter2" not in str(info.value)


def test_secret_from_env_and_from_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "pw"
    secret_file.write_text("s3cret-from-file\n", encoding="utf-8")
    path = write(tmp_path, f"sasl_password_file: {secret_file}\n")
    s = load_settings(path, env={"METRIC_ETL_DB_PASSWORD": "s3cret-env"})
    assert s.sasl_password == "s3cret-from-file"
    assert s.db_password == "s3cret-env"
    masked = s.masked()
    assert masked["db_password"] == "***" and masked["sasl_password"] == "***"
    assert "s3cret" not in repr(masked)


def test_missing_secret_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="METRIC_ETL_DB_PASSWORD_FILE: cannot read secret file"):
        load_settings(env={"METRIC_ETL_DB_PASSWORD_FILE": str(tmp_path / "absent")})


def test_missing_config_file_named_explicitly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml", env={})


def test_booleans_and_nulls_from_env() -> None:
    s = load_settings(
        env={"METRIC_ETL_SSL_CHECK_HOSTNAME": "no", "METRIC_ETL_CYCLES": "", "METRIC_ETL_LOCK": "1"}
    )
    assert s.ssl_check_hostname is False and s.cycles is None and s.lock is True


def test_mask_url_hides_only_the_password() -> None:
    assert mask_url("postgresql://etl:pw@db:5432/metrics") == "postgresql://etl:***@db:5432/metrics"
    assert mask_url("postgresql://etl@db/metrics") == "postgresql://etl@db/metrics"


def test_the_scrubber_masks_the_longest_secret_first_and_the_password_inside_db_url() -> None:
    s = Settings(
        db_url="postgresql://etl:in%40url@db.example/metrics", db_password="abc", sasl_password="abcdef"
    )
    assert sorted(secrets_of(s)) == ["abc", "abcdef", "in@url"]
    # "abc" first would leave "***def" showing part of the SASL password.
    assert mask("sasl abcdef db abc url in@url", secrets_of(s)) == "sasl *** db *** url ***"
    assert mask("nothing secret", []) == "nothing secret"
