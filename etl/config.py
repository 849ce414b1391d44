"""Settings: built-in defaults < config file < ``METRIC_ETL_*`` environment < command-line flags.

Every setting has one name, used everywhere: the key in the YAML file, the environment variable
(``METRIC_ETL_`` + the name in upper case) and the flag (``--`` + the name with dashes). The whole
configuration is checked before anything connects, and every problem is reported at once.

Secrets (passwords, key passphrases) are never read from the config file or flags: they come from
the environment, or from a file named by ``<name>_file`` (in the config file or the environment).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

from etl.errors import ConfigError

ENV_PREFIX = "METRIC_ETL_"
DEFAULT_CONFIG_PATHS = (Path("config/service.yaml"), Path("/etc/metric-etl/service.yaml"))

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
ISOLATION_LEVELS = ("read_committed", "read_uncommitted")
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
MAX_WORKERS = 64
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _setting(default: Any, help: str, *, secret: bool = False, group: str = "run") -> Any:
    return field(default=default, metadata={"help": help, "secret": secret, "group": group})


@dataclass(frozen=True)
class Settings:
    """Everything a run needs. Build it with :func:`load_settings`, which validates it."""

    # Kafka
    bootstrap_servers: str = _setting("127.0.0.1:9092", "Kafka brokers, host:port[,host:port]", group="kafka")
    topic: str = _setting("website-metrics", "topic to drain", group="kafka")
    group_id: str = _setting(
        "metric-etl", "consumer group; also the key of the stored offsets", group="kafka"
    )
    security_protocol: str = _setting(
        "PLAINTEXT", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL", group="kafka"
    )
    ssl_cafile: str | None = _setting(
        None, "CA bundle (PEM) that signed the broker certificate", group="kafka"
    )
    ssl_certfile: str | None = _setting(None, "client certificate (PEM) for mutual TLS", group="kafka")
    ssl_keyfile: str | None = _setting(None, "client private key (PEM) for mutual TLS", group="kafka")
    ssl_key_password: str | None = _setting(None, "passphrase of the client key", secret=True, group="kafka")
    ssl_check_hostname: bool = _setting(True, "check the broker certificate's host name", group="kafka")
    sasl_mechanism: str | None = _setting(None, "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512", group="kafka")
    sasl_username: str | None = _setting(None, "SASL user name", group="kafka")
    sasl_password: str | None = _setting(None, "SASL password", secret=True, group="kafka")
    auto_offset_reset: str = _setting(
        "earliest", "where a partition with no stored offset starts: earliest or latest", group="kafka"
    )
    isolation_level: str = _setting(
        "read_committed",
        "read_committed (skip aborted transactions, stop at the last stable offset) or read_uncommitted",
        group="kafka",
    )
    poll_timeout_ms: int = _setting(1000, "how long one poll waits for messages", group="kafka")
    max_poll_records: int = _setting(40_000, "most messages one cycle reads (the batch size)", group="kafka")
    # 1 MiB, not more: kafka-python buffers whole fetch responses, and 4 MiB per partition made
    # peak memory grow with the backlog (273 MB at 100k messages, 358 MB at 1M) for no speed.
    max_partition_fetch_bytes: int = _setting(
        1024 * 1024, "most bytes fetched per partition per request", group="kafka"
    )
    # PostgreSQL
    db_url: str = _setting(
        "postgresql://127.0.0.1:5432/metrics", "SQLAlchemy URL, no password", group="database"
    )
    db_password: str | None = _setting(None, "database password", secret=True, group="database")
    db_sslmode: str | None = _setting(None, "libpq sslmode, e.g. verify-full", group="database")
    db_sslrootcert: str | None = _setting(
        None, "CA file for db_sslmode verify-ca/verify-full", group="database"
    )
    db_schema: str = _setting("public", "schema holding the tables", group="database")
    db_lock_timeout: float = _setting(
        30.0,
        "seconds a statement waits for a lock another session holds (a LOCK TABLE, a migration) before "
        "the cycle rolls back and is retried; never more than max_seconds",
        group="database",
    )
    metrics_table: str = _setting("website_metrics", "table of good rows", group="database")
    rejects_table: str = _setting("website_metrics_rejects", "table of rejected messages", group="database")
    offsets_table: str = _setting("etl_offsets", "table of stored offsets", group="database")
    runs_table: str = _setting("etl_runs", "table of run records", group="database")
    # The tables readers use: partitions and retention (etl.db.partitions, etl.ops.retention)
    partition_interval: str = _setting(
        "day",
        "what one partition of the metrics table holds: day, week or month of checks (UTC)",
        group="tables",
    )
    retention_raw_days: int | None = _setting(
        400, "days raw checks are kept (whole partitions are dropped); none: forever", group="tables"
    )
    retention_hourly_days: int | None = _setting(
        800, "days the hourly rollups are kept; none: forever", group="tables"
    )
    retention_daily_days: int | None = _setting(
        None, "days the daily rollups are kept; none: forever", group="tables"
    )
    retention_rejects_days: int | None = _setting(
        90, "days replayed and ignored rejects are kept; none: forever", group="tables"
    )
    retention_new_rejects_days: int | None = _setting(
        None, "days rejects never reviewed (status new) are kept; none: forever", group="tables"
    )
    # The run
    cycles: int | None = _setting(None, "stop after this many poll cycles")
    max_messages: int | None = _setting(None, "stop after reading this many messages")
    max_seconds: float | None = _setting(None, "stop after this many seconds")
    follow: bool = _setting(False, "keep polling forever (service mode)")
    sleep: float = _setting(0.0, "seconds to sleep between polls")
    from_beginning: bool = _setting(
        False, "re-read every partition from its start; handled messages are skipped"
    )
    from_timestamp: str | None = _setting(
        None, "ISO time: re-read from the first message since; handled ones are skipped"
    )
    dry_run: bool = _setting(False, "read and validate, write nothing, move no offset")
    max_reject_ratio: float = _setting(1.0, "fail a cycle whose rejected share is above this (0-1)")
    lock: bool = _setting(False, "hold a PostgreSQL advisory lock: a second run exits 75")
    workers: int = _setting(
        1, "group members run in parallel processes; one per core drains a backlog faster"
    )
    retry_deadline: float = _setting(60.0, "seconds to keep retrying an unreachable Kafka or PostgreSQL")
    atomic: bool = _setting(
        False, "the whole run commits in one transaction at its end, or nothing of it does (docs/atomic.md)"
    )

    # The config file the values were read from (None: none was found). Not a setting: set by
    # load_settings on the instance, so every command can say which file it used.
    config_file: ClassVar[str | None] = None

    def masked(self) -> dict[str, Any]:
        """All settings as a dict, secrets replaced by ``***`` and the URL's password hidden."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata["secret"] and value is not None:
                value = "***"
            out[f.name] = value
        out["db_url"] = mask_url(self.db_url)
        return out

    @property
    def stop_time(self) -> datetime | None:
        """``from_timestamp`` parsed (validated already)."""
        return _parse_time(self.from_timestamp) if self.from_timestamp else None


SETTING_NAMES = tuple(f.name for f in fields(Settings))
SECRET_NAMES = tuple(f.name for f in fields(Settings) if f.metadata["secret"])


def secrets_of(settings: Settings) -> list[str]:
    """Every secret value of the settings, and a password written inside ``db_url``."""
    from urllib.parse import unquote

    values = [getattr(settings, name) for name in SECRET_NAMES]
    try:
        password = urlsplit(settings.db_url).password
    except ValueError:
        password = None
    values.append(unquote(password) if password else None)
    return [v for v in values if v]


def mask(text: str, secrets: list[str]) -> str:
    """``text`` with each of ``secrets`` as ``***``, the longest first (so no part of a longer
    secret that contains a shorter one is left showing). The one scrubber: errors, logs, reports."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def mask_url(url: str) -> str:
    """The URL with any password replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = (parts.username or "") + ":***"
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc[-1]}"))


def url_has_password(url: str) -> bool:
    """True when a password is written in the URL (the README asks for none there)."""
    try:
        return urlsplit(url).password is not None
    except ValueError:
        return False


def load_settings(
    config_path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge defaults, the config file, the environment and ``overrides`` (flags); validate all at once.

    ``config_path`` None means the first of ``config/service.yaml`` (relative to the working directory)
    and ``/etc/metric-etl/service.yaml`` that exists, else built-in defaults only.
    Raises :class:`ConfigError` listing every problem.
    """
    env = os.environ if env is None else env
    problems: list[str] = []
    raw: dict[str, tuple[Any, str]] = {}  # name -> (value, where it came from)

    path = _find_config(config_path, env, problems)
    if path is not None:
        for key, value in _read_yaml(path, problems).items():
            where = f"{path}: {key}"
            if key.endswith("_file") and key[: -len("_file")] in SECRET_NAMES:
                _read_secret_file(key[: -len("_file")], value, where, raw, problems)
            elif key in SECRET_NAMES:
                problems.append(
                    f"{where}: secrets may not be written in the config file; "
                    f"set {ENV_PREFIX}{key.upper()} or {key}_file"
                )
            elif key not in SETTING_NAMES:
                problems.append(f"{where}: unknown setting{_suggest(key)}")
            else:
                raw[key] = (value, where)

    for name, value in env.items():
        # METRIC_ETL_STACK_* belong to the local stack's scripts, not to the job.
        if (
            not name.startswith(ENV_PREFIX)
            or name == ENV_PREFIX + "CONFIG"
            or name.startswith(ENV_PREFIX + "STACK_")
        ):
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key.endswith("_file") and key[: -len("_file")] in SECRET_NAMES:
            _read_secret_file(key[: -len("_file")], value, name, raw, problems)
        elif key not in SETTING_NAMES:
            problems.append(f"{name}: unknown setting{_suggest(key)}")
        else:
            raw[key] = (value, name)

    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in SETTING_NAMES:
            raise ValueError(f"unknown setting {key!r}")  # a programming error, not a user's
        raw[key] = (value, "--" + key.replace("_", "-"))

    values: dict[str, Any] = {}
    bad: set[str] = set()
    types = {f.name: f.type for f in fields(Settings)}
    for key, (value, where) in raw.items():
        try:
            values[key] = _coerce(value, str(types[key]))
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            bad.add(key)

    # Check the rest too (with defaults in place of the unreadable values): every problem at once.
    settings = Settings(**values)
    problems.extend(p for p in _check(settings) if p.split(":", 1)[0] not in bad)
    if problems:
        raise ConfigError(problems)
    object.__setattr__(settings, "config_file", str(path) if path is not None else None)
    return settings


def config_source(settings: Settings) -> str:
    """Where the settings came from, in a few words, for logs, ``check`` and the run report."""
    if settings.config_file is None:
        looked = " or ".join(str(p) for p in DEFAULT_CONFIG_PATHS)
        return f"no config file ({looked} not found): defaults, METRIC_ETL_* environment and flags"
    return f"config file {Path(settings.config_file).resolve()}, then METRIC_ETL_* environment and flags"


def _find_config(config_path: str | Path | None, env: Mapping[str, str], problems: list[str]) -> Path | None:
    explicit = config_path or env.get(ENV_PREFIX + "CONFIG")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            problems.append(f"config file {path} does not exist")
            return None
        return path
    return next((p for p in DEFAULT_CONFIG_PATHS if p.is_file()), None)


def _read_yaml(path: Path, problems: list[str]) -> dict[str, Any]:
    import yaml  # only when there is a file to read: keeps `--help` fast

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        problems.append(f"{path}: cannot read: {exc}")
        return {}
    if data is None:
        return {}
    if not isinstance(data, dict):
        problems.append(f"{path}: must be a mapping of setting: value")
        return {}
    return {str(k): v for k, v in data.items()}


def _read_secret_file(
    key: str, value: Any, where: str, raw: dict[str, tuple[Any, str]], problems: list[str]
) -> None:
    try:
        secret = Path(str(value)).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        problems.append(f"{where}: cannot read secret file {value}: {exc.strerror or exc}")
        return
    raw[key] = (secret, where)


def _suggest(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key, SETTING_NAMES, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(value: Any, type_name: str) -> Any:
    """Turn a YAML/env/flag value into the setting's type; ValueError says what was expected."""
    optional = "None" in type_name
    if value is None or (
        optional and isinstance(value, str) and value.strip().lower() in ("", "none", "null")
    ):
        if optional:
            return None
        raise ValueError("a value is required")
    if type_name.startswith("bool"):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError(f"expected true or false, got {value!r}")
    if type_name.startswith("int"):
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"expected a whole number, got {value!r}")
        try:
            return int(str(value).strip().replace("_", ""))
        except ValueError:
            raise ValueError(f"expected a whole number, got {value!r}") from None
    if type_name.startswith("float"):
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            number = float(str(value).strip())
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"expected a finite number, got {value!r}")
        return number
    if isinstance(value, (dict, list)):
        raise ValueError(f"expected text, got {type(value).__name__}")
    return str(value)


def _parse_time(text: str) -> datetime:
    parsed = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError("needs a zone")
    return parsed


def _check(s: Settings) -> list[str]:
    """Cross-field and range checks; returns every problem."""
    p: list[str] = []
    if not all(re.match(r"^[^\s:,]+:\d{1,5}$", b.strip()) for b in s.bootstrap_servers.split(",")):
        p.append(f"bootstrap_servers: expected host:port[,host:port], got {s.bootstrap_servers!r}")
    if not re.match(r"^[A-Za-z0-9._-]{1,249}$", s.topic):
        p.append(f"topic: {s.topic!r} is not a valid Kafka topic name")
    if not s.group_id.strip():
        p.append("group_id: must not be empty")
    if s.security_protocol not in SECURITY_PROTOCOLS:
        p.append(
            f"security_protocol: expected one of {', '.join(SECURITY_PROTOCOLS)}, got {s.security_protocol!r}"
        )
    if s.security_protocol.startswith("SASL"):
        if s.sasl_mechanism not in SASL_MECHANISMS:
            p.append(
                f"sasl_mechanism: {s.security_protocol} needs one of {', '.join(SASL_MECHANISMS)}, "
                f"got {s.sasl_mechanism!r}"
            )
        if not s.sasl_username:
            p.append(f"sasl_username: required with {s.security_protocol}")
        if not s.sasl_password:
            p.append(f"sasl_password: required with {s.security_protocol}; set {ENV_PREFIX}SASL_PASSWORD")
    elif s.sasl_mechanism is not None:
        p.append(f"sasl_mechanism: set, but security_protocol is {s.security_protocol} (no SASL)")
    for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "db_sslrootcert"):
        path = getattr(s, key)
        if path is not None and not Path(path).is_file():
            p.append(f"{key}: file {path} does not exist")
    if (s.ssl_certfile is None) != (s.ssl_keyfile is None):
        p.append("ssl_certfile and ssl_keyfile: give both or neither")
    if s.auto_offset_reset not in ("earliest", "latest"):
        p.append(f"auto_offset_reset: expected earliest or latest, got {s.auto_offset_reset!r}")
    if s.isolation_level not in ISOLATION_LEVELS:
        p.append(f"isolation_level: expected one of {', '.join(ISOLATION_LEVELS)}, got {s.isolation_level!r}")
    for key in ("poll_timeout_ms", "max_poll_records", "max_partition_fetch_bytes"):
        if getattr(s, key) <= 0:
            p.append(f"{key}: must be above 0, got {getattr(s, key)}")
    try:
        url = urlsplit(s.db_url)
        if not url.scheme.startswith("postgresql") and not url.scheme.startswith("sqlite"):
            p.append(f"db_url: expected a postgresql:// URL, got scheme {url.scheme!r}")
    except ValueError:
        p.append("db_url: not a URL")
    if s.db_sslmode is not None and s.db_sslmode not in SSLMODES:
        p.append(f"db_sslmode: expected one of {', '.join(SSLMODES)}, got {s.db_sslmode!r}")
    if s.db_sslmode in ("verify-ca", "verify-full") and s.db_sslrootcert is None:
        p.append(f"db_sslrootcert: required with db_sslmode {s.db_sslmode}")
    for key in ("db_schema", "metrics_table", "rejects_table", "offsets_table", "runs_table"):
        if not _IDENTIFIER.match(getattr(s, key)):
            p.append(
                f"{key}: {getattr(s, key)!r} is not a plain SQL identifier "
                "(lower-case letters, digits and _, at most 63, not starting with a digit)"
            )
    if len(s.metrics_table) > 48:
        p.append(
            f"metrics_table: {s.metrics_table!r} is longer than 48 characters (its partitions, rollups and "
            "views are named after it, within PostgreSQL's 63)"
        )
    if s.partition_interval not in ("day", "week", "month"):
        p.append(f"partition_interval: expected day, week or month, got {s.partition_interval!r}")
    for key in (
        "retention_raw_days",
        "retention_hourly_days",
        "retention_daily_days",
        "retention_rejects_days",
        "retention_new_rejects_days",
    ):
        if getattr(s, key) is not None and getattr(s, key) < 1:
            p.append(f"{key}: must be 1 or more (or none: keep forever), got {getattr(s, key)}")
    if (
        s.retention_raw_days is not None
        and s.retention_hourly_days is not None
        and s.retention_hourly_days < s.retention_raw_days
    ):
        p.append(
            "retention_hourly_days: must be at least retention_raw_days (rollups outlive the raw checks)"
        )
    names = [s.metrics_table, s.rejects_table, s.offsets_table, s.runs_table]
    if len(set(names)) != len(names):
        p.append("metrics_table, rejects_table, offsets_table, runs_table: must all differ")
    for key in ("cycles", "max_messages"):
        value = getattr(s, key)
        if value is not None and value <= 0:
            p.append(f"{key}: must be above 0, got {value}")
    if s.max_seconds is not None and s.max_seconds <= 0:
        p.append(f"max_seconds: must be above 0, got {s.max_seconds}")
    if s.sleep < 0:
        p.append(f"sleep: must be 0 or more, got {s.sleep}")
    if not 0 <= s.max_reject_ratio <= 1:
        p.append(f"max_reject_ratio: must be between 0 and 1, got {s.max_reject_ratio}")
    if not 1 <= s.workers <= MAX_WORKERS:
        p.append(f"workers: must be between 1 and {MAX_WORKERS}, got {s.workers}")
    if s.db_lock_timeout <= 0:
        p.append(f"db_lock_timeout: must be above 0, got {s.db_lock_timeout}")
    if s.retry_deadline < 0:
        p.append(f"retry_deadline: must be 0 or more, got {s.retry_deadline}")
    if s.atomic and s.follow:
        p.append("atomic and follow: an atomic run commits when it ends, and --follow never ends; choose one")
    if s.atomic and s.workers > 1:
        p.append(
            f"atomic and workers: {s.workers} workers would commit {s.workers} transactions; "
            "an atomic run is one process (workers 1)"
        )
    if s.from_timestamp is not None:
        try:
            _parse_time(s.from_timestamp)
        except ValueError:
            p.append(f"from_timestamp: expected an ISO-8601 time with a zone, got {s.from_timestamp!r}")
        if s.from_beginning:
            p.append("from_timestamp and from_beginning: choose one")
    return p


def replace(settings: Settings, **changes: Any) -> Settings:
    """A copy of ``settings`` with ``changes`` applied and checked."""
    updated = dataclasses.replace(settings, **changes)
    problems = _check(updated)
    if problems:
        raise ConfigError(problems)
    object.__setattr__(updated, "config_file", settings.config_file)
    return updated
