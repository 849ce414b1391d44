"""What every command shares: the click context, the shared option decorators, settings-or-fail,
the output helpers (secrets masked), the duration and point-in-time parameter types, and the one
place an error becomes ``Error:``/``Hint:`` lines and an exit code.

No pandas and no SQL here; heavy libraries are imported only by the commands that need them, so
``metric-etl --help`` stays fast.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

import click

from etl.errors import ConfigError, EtlError, exit_code_of

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")


# -- shared options -------------------------------------------------------------------------------


def config_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False),
        envvar="METRIC_ETL_CONFIG",
        help="YAML config file (default: ./config/service.yaml, then /etc/metric-etl/service.yaml).",
    )(f)


def logging_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--log-format",
        type=click.Choice(["text", "json"]),
        default="text",
        show_default=True,
        help="Log lines on stderr: text for people, json for log shippers.",
    )(f)
    f = click.option("-q", "--quiet", count=True, help="Fewer log lines (-q warnings, -qq errors only).")(f)
    f = click.option(
        "-v", "--verbose", count=True, help="More log lines (-v debug, -vv Kafka client debug too)."
    )(f)
    return f


def db_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--db-schema", help="Schema holding the tables, e.g. --db-schema metrics.  [default: public]"
    )(f)
    f = click.option(
        "--db-url", help="Database URL without the password, e.g. postgresql://etl@db:5432/metrics."
    )(f)
    return config_option(f)


def kafka_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--group-id", help="Consumer group whose stored offsets to compare, e.g. --group-id metric-etl."
    )(f)
    f = click.option("--topic", help="Topic, e.g. --topic website-metrics.  [default: website-metrics]")(f)
    f = click.option("--bootstrap-servers", help="Kafka brokers, e.g. kafka1:9092,kafka2:9092.")(f)
    return f


def output_option(what: str) -> Callable[..., Any]:
    return click.option(
        "--output",
        type=click.Choice(["text", "json"]),
        default="text",
        show_default=True,
        help=f"{what} on stdout: text for people, json for scripts, e.g. --output json.",
    )


# The rejects' filter options (etl/cli/rejects.py) are not settings; every other option is.
FILTER_KEYS = ("since", "rules", "stages", "statuses", "reject_topic", "all_topics", "limit", "ids")


def setting_flags(kw: dict[str, Any]) -> dict[str, Any]:
    """The options that are settings (``--db-url`` -> db_url); filters are not."""
    return {k: v for k, v in kw.items() if k not in FILTER_KEYS and v is not None}


# -- settings, logging, secrets -------------------------------------------------------------------


def setup_logging(verbose: int, quiet: int, fmt: str, secrets: list[str]) -> None:
    from etl.logs import configure

    configure(verbose=verbose, quiet=quiet, fmt=fmt, secrets=secrets)


def log_source(settings: Any) -> None:
    """Name the config file the command read (-v): a checkout's ./config/service.yaml is no surprise."""
    from etl.config import config_source, url_has_password

    logger = logging.getLogger("etl.config")
    logger.debug("settings: %s", config_source(settings))
    if url_has_password(settings.db_url):
        logger.warning(
            "db_url carries a password: it is %s, but a URL shows in process lists, shell history and "
            "config files; put the password in METRIC_ETL_DB_PASSWORD or db_password_file instead",
            "overridden by db_password" if settings.db_password else "used",
        )


def load(config_path: str | None, overrides: dict[str, Any]) -> Any:
    from etl.config import load_settings

    return load_settings(config_path, overrides=overrides)


def scrub(text: str, secrets: Sequence[str]) -> str:
    from etl.config import mask

    return mask(text, list(secrets))


def secrets_of(settings: Any) -> list[str]:
    from etl.config import secrets_of as settings_secrets

    return settings_secrets(settings)


def settings_or_fail(config_path: str | None, flags: dict[str, Any], logging_: tuple[int, int, str]) -> Any:
    """Load settings (exit 3 on a config error) and set up logging with the secrets masked."""
    verbose, quiet, log_format = logging_
    try:
        settings = load(config_path, flags)
    except ConfigError as exc:
        setup_logging(verbose, quiet, log_format, [])
        fail(exc)
    setup_logging(verbose, quiet, log_format, secrets_of(settings))
    log_source(settings)
    return settings


# -- errors -> exit codes -------------------------------------------------------------------------


def fail(exc: EtlError, secrets: Sequence[str] = (), *, skipped: bool = False) -> NoReturn:
    """The one way a command ends on an error: ``Error: <message>`` (secrets masked), ``Hint: ...``
    when the error has one, and the exit code errors.exit_code_of gives it. ``skipped``: a run that
    found another holding the lock is a skip, not a failure: ``Skipped: <message>``, no hint."""
    message = scrub(str(exc), secrets)
    if skipped:
        click.echo(f"Skipped: {message}", err=True)
    else:
        click.echo(f"Error: {message}", err=True)
        if exc.hint:
            click.echo(f"Hint: {exc.hint}", err=True)
    sys.exit(int(exit_code_of(exc)))


def call(settings: Any, fn: Callable[[], Any]) -> Any:
    """Call the library; its errors become ``Error:``/``Hint:`` lines and the error's exit code."""
    try:
        return fn()
    except EtlError as exc:
        fail(exc, secrets_of(settings))
    except ValueError as exc:  # the library refusing an argument the options let through
        raise click.UsageError(str(exc)) from None


# -- output ---------------------------------------------------------------------------------------


def echo(settings: Any, text: str) -> None:
    click.echo(scrub(text, secrets_of(settings)))


def echo_json(settings: Any, data: Any) -> None:
    # ensure_ascii: every control character is escaped, so the output is safe on a terminal too.
    echo(settings, json.dumps(data, default=str))


def _json_default(value: Any) -> str:
    return str(value)


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, default=_json_default, indent=2))


# -- parameter types ------------------------------------------------------------------------------


class Duration(click.ParamType):
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w`` or combined, e.g. ``1d12h``."""

    name = "DURATION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> timedelta:
        if isinstance(value, timedelta):
            return value
        text = str(value).strip().lower().replace(" ", "")
        parts = _DURATION.findall(text)
        if not text or "".join(n + u for n, u in parts) != text:
            self.fail(f"{value!r} is not a duration like 30d, 12h, 90m, 45s or 1d12h", param, ctx)
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
        if seconds <= 0:
            self.fail(f"{value!r} must be longer than 0", param, ctx)
        return timedelta(seconds=seconds)


class Since(click.ParamType):
    """A point in time: ISO-8601 (no zone means UTC) or a duration ago, e.g. ``2h``."""

    name = "WHEN"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        text = str(value).strip()
        if _DURATION.fullmatch(text.lower()) or re.fullmatch(r"(\d+(?:\.\d+)?[smhdw])+", text.lower()):
            return datetime.now(UTC) - Duration().convert(text, param, ctx)
        try:
            when = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            self.fail(
                f"{value!r} is neither an ISO time (2026-11-28T10:00:00Z) nor an age (2h, 7d)", param, ctx
            )
        return when if when.tzinfo else when.replace(tzinfo=UTC)


DURATION = Duration()
SINCE = Since()
