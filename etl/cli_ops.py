"""Operations commands: ``rejects`` (list/show/export/replay/ignore/purge), ``status``, ``check``,
``init-db``. Flags -> settings -> one library call (etl.rejects, etl.status) -> output -> exit code.

No pandas and no SQL here; the library modules are imported inside the commands so that
``metric-etl --help`` stays fast. Importing this module adds the commands to ``etl.cli.main``.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import click

from etl.cli import (
    CONTEXT,
    _config_option,
    _fail,
    _load,
    _log_source,
    _logging_options,
    _scrub,
    _secrets_of,
    _setup_logging,
    main,
)
from etl.contract import REJECT_STATUSES, STAGES
from etl.errors import ConfigError, EtlError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")


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


# -- shared options -------------------------------------------------------------------------------


def _db_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--db-schema", help="Schema holding the tables, e.g. --db-schema metrics.  [default: public]"
    )(f)
    f = click.option(
        "--db-url", help="Database URL without the password, e.g. postgresql://etl@db:5432/metrics."
    )(f)
    return _config_option(f)


def _kafka_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--group-id", help="Consumer group whose stored offsets to compare, e.g. --group-id metric-etl."
    )(f)
    f = click.option("--topic", help="Topic, e.g. --topic website-metrics.  [default: website-metrics]")(f)
    f = click.option("--bootstrap-servers", help="Kafka brokers, e.g. kafka1:9092,kafka2:9092.")(f)
    return f


def _output_option(what: str) -> Callable[..., Any]:
    return click.option(
        "--output",
        type=click.Choice(["text", "json"]),
        default="text",
        show_default=True,
        help=f"{what} on stdout: text for people, json for scripts, e.g. --output json.",
    )


def _topic_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--all-topics", is_flag=True, help="Rejects of every topic, not only the configured one."
    )(f)
    return click.option(
        "--topic",
        "reject_topic",
        help="Only rejects read from this topic, e.g. --topic website-metrics.  "
        "[default: the configured topic]",
    )(f)


def _filter_options(*, default_limit: int | None, status_help: str) -> Callable[..., Any]:
    """The reject filters shared by list, export and replay."""

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        return _add_filters(f, default_limit, status_help)

    return decorate


def _add_filters(f: Callable[..., Any], default_limit: int | None, status_help: str) -> Callable[..., Any]:
    f = click.option(
        "--limit",
        type=click.IntRange(min=1),
        default=default_limit,
        show_default=default_limit is not None,
        help="At most N rejects, e.g. --limit 500.",
    )(f)
    f = _topic_options(f)
    f = click.option(
        "--status",
        "statuses",
        multiple=True,
        type=click.Choice(REJECT_STATUSES),
        help=status_help,
    )(f)
    f = click.option(
        "--stage",
        "stages",
        multiple=True,
        type=click.Choice(STAGES),
        help="Only rejects from this stage (repeatable), e.g. --stage schema.",
    )(f)
    f = click.option(
        "--rule",
        "rules",
        multiple=True,
        metavar="RULE",
        help="Only rejects that failed this rule (repeatable: any of them), e.g. --rule timezone.",
    )(f)
    f = click.option(
        "--since",
        type=SINCE,
        help="Only rejects stored at or after WHEN: an ISO time (UTC if no zone) or an age, "
        "e.g. --since 2026-11-28T00:00:00Z or --since 24h.",
    )(f)
    return f


def _settings(config_path: str | None, flags: dict[str, Any], logging_: tuple[int, int, str]) -> Any:
    """Load settings (exit 3 on a config error) and set up logging with the secrets masked."""
    verbose, quiet, log_format = logging_
    try:
        settings = _load(config_path, flags)
    except ConfigError as exc:
        _setup_logging(verbose, quiet, log_format, [])
        _fail(exc)
    _setup_logging(verbose, quiet, log_format, _secrets_of(settings))
    _log_source(settings)
    return settings


def _run(settings: Any, fn: Callable[[], Any]) -> Any:
    """Call the library; its errors become ``Error:``/``Hint:`` lines and the error's exit code."""
    try:
        return fn()
    except EtlError as exc:
        _fail(exc, _secrets_of(settings))
    except ValueError as exc:  # the library refusing an argument the options let through
        raise click.UsageError(str(exc)) from None


def _echo(settings: Any, text: str) -> None:
    click.echo(_scrub(text, _secrets_of(settings)))


def _echo_json(settings: Any, data: Any) -> None:
    # ensure_ascii: every control character is escaped, so the output is safe on a terminal too.
    _echo(settings, json.dumps(data, default=str))


def _filter(settings: Any, **kw: Any) -> Any:
    from etl.rejects import RejectFilter

    return RejectFilter(
        ids=tuple(kw.get("ids") or ()),
        since=kw.get("since"),
        rules=tuple(kw.get("rules") or ()),
        stages=tuple(kw.get("stages") or ()),
        statuses=tuple(kw.get("statuses") or ()),
        topic=_reject_topic(settings, kw),
        limit=kw.get("limit"),
    )


def _reject_topic(settings: Any, kw: dict[str, Any]) -> str | None:
    """--topic, else the configured topic; None (every topic) with --all-topics or named ids."""
    if kw.get("reject_topic"):
        return str(kw["reject_topic"])
    if kw.get("all_topics") or kw.get("ids"):
        return None
    return str(settings.topic)


# -- rejects --------------------------------------------------------------------------------------


@click.group(context_settings=CONTEXT)
def rejects() -> None:
    """Review rejected messages, replay them after a fix, ignore or purge them.

    \b
    Every message the job could not load is in the rejects table with its raw bytes, key, headers,
    Kafka coordinates and every rule it failed. Status: new (not handled yet), replayed (loaded
    by `rejects replay`), ignored (with a reason).

    \b
    Examples:
      metric-etl rejects list --since 24h --rule timezone
      metric-etl rejects show 42
      metric-etl rejects export --format jsonl -o rejects.jsonl
      metric-etl rejects replay --rule timezone --dry-run
      metric-etl rejects ignore 42 43 --reason "test traffic from staging"
      metric-etl rejects purge --older-than 30d
    """


@rejects.command("list", context_settings=CONTEXT)
@_db_options
@_filter_options(
    default_limit=50, status_help="Only rejects with this status (repeatable), e.g. --status new."
)
@_output_option("The table")
@_logging_options
def rejects_list(
    config_path: str | None, output: str, verbose: int, quiet: int, log_format: str, **kw: Any
) -> None:
    """List rejects, newest first, as a table.

    \b
    Examples:
      metric-etl rejects list
      metric-etl rejects list --since 2h --stage schema --status new
      metric-etl rejects list --rule url_scheme --rule url_host --limit 200 --output json
    """
    settings = _settings(config_path, _setting_flags(kw), (verbose, quiet, log_format))
    from etl import rejects as lib

    found = _run(settings, lambda: lib.list_rejects(settings, _filter(settings, **kw)))
    if output == "json":
        _echo_json(settings, [x.as_export() for x in found])
    else:
        import shutil

        _echo(settings, lib.format_table(found, width=shutil.get_terminal_size((120, 20)).columns))


@rejects.command("show", context_settings=CONTEXT)
@click.argument("reject_id", metavar="ID", type=click.IntRange(min=1))
@_db_options
@click.option("--hex", "hex_dump", is_flag=True, help="Show the payload as a hex dump even when it is text.")
@_output_option("The reject")
@_logging_options
def rejects_show(
    reject_id: int,
    config_path: str | None,
    hex_dump: bool,
    output: str,
    verbose: int,
    quiet: int,
    log_format: str,
    **kw: Any,
) -> None:
    """Show one reject: raw payload, decoded text, every error, Kafka coordinates, key, headers.

    Text that a terminal could act on (control characters, escape sequences) is escaped; bytes
    that are not UTF-8 are shown as a hex dump. --output json gives the payload in base64.

    \b
    Examples:
      metric-etl rejects show 42
      metric-etl rejects show 42 --hex
      metric-etl rejects show 42 --output json | jq -r .payload_base64 | base64 -d > payload.bin
    """
    settings = _settings(config_path, _setting_flags(kw), (verbose, quiet, log_format))
    from etl import rejects as lib

    found = _run(settings, lambda: lib.get_reject(settings, reject_id))
    if output == "json":
        _echo_json(settings, found.as_export())
    else:
        _echo(settings, found.to_text(hex_dump=hex_dump))


@rejects.command("export", context_settings=CONTEXT)
@_db_options
@_filter_options(
    default_limit=None, status_help="Only rejects with this status (repeatable), e.g. --status new."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "csv"]),
    default="jsonl",
    show_default=True,
    help="jsonl: one JSON object per line; csv: a header row, then one row per reject. E.g. --format csv.",
)
@click.option(
    "-o",
    "--output-file",
    type=click.Path(dir_okay=False, writable=True),
    help="Write to this file instead of stdout, e.g. -o rejects.jsonl.",
)
@_logging_options
def rejects_export(
    config_path: str | None,
    fmt: str,
    output_file: str | None,
    verbose: int,
    quiet: int,
    log_format: str,
    **kw: Any,
) -> None:
    """Export rejects, oldest first, with the exact payload and key in base64.

    Fields: id, topic, partition, offset, kafka_timestamp, key_base64, headers, payload_base64,
    payload_text, stage, errors, run_id, rejected_at, status, status_note, status_changed_at.
    In CSV, headers and errors are JSON text.

    \b
    Examples:
      metric-etl rejects export > rejects.jsonl
      metric-etl rejects export --format csv --since 7d -o last-week.csv
      metric-etl rejects export --status new --rule timezone | jq .payload_text
    """
    settings = _settings(config_path, _setting_flags(kw), (verbose, quiet, log_format))
    from etl import rejects as lib

    if output_file:
        with open(output_file, "w", encoding="utf-8", newline="") as out:
            n = _run(settings, lambda: lib.export_rejects(settings, _filter(settings, **kw), fmt, out))
        click.echo(f"exported {n} rejects to {output_file}", err=True)
    else:
        _run(settings, lambda: lib.export_rejects(settings, _filter(settings, **kw), fmt, sys.stdout))


@rejects.command("replay", context_settings=CONTEXT)
@click.argument("ids", nargs=-1, type=click.IntRange(min=1))
@_db_options
@_filter_options(
    default_limit=None,
    status_help="Replay rejects with this status (repeatable), e.g. --status ignored. "
    "[default: new; with IDS: new and ignored]",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Do everything in a transaction that is rolled back: shows what would load, changes nothing.",
)
@_output_option("The summary")
@_logging_options
def rejects_replay(
    ids: tuple[int, ...],
    config_path: str | None,
    dry_run: bool,
    output: str,
    verbose: int,
    quiet: int,
    log_format: str,
    **kw: Any,
) -> None:
    """Re-validate stored payloads with the current rules; load those that now pass.

    Picks the rejects named by IDS, or matched by the filters (IDS and filters combine). Those
    that pass are loaded in one transaction and marked replayed; those still bad stay, with their
    errors updated. A replayed reject is never replayed again, and the metrics table holds one
    row per Kafka message, so replaying twice loads nothing twice.

    \b
    Examples:
      metric-etl rejects replay --rule timezone --dry-run
      metric-etl rejects replay --since 24h --stage schema
      metric-etl rejects replay 42 43 44
    """
    if "replayed" in kw.get("statuses", ()):
        raise click.BadParameter(
            "replayed rejects are loaded already; pick new or ignored", param_hint="--status"
        )
    settings = _settings(config_path, _setting_flags(kw), (verbose, quiet, log_format))
    from etl import rejects as lib

    result = _run(settings, lambda: lib.replay(settings, _filter(settings, ids=ids, **kw), dry_run=dry_run))
    if output == "json":
        _echo_json(settings, result.as_dict())
    else:
        _echo(settings, result.to_text())


@rejects.command("ignore", context_settings=CONTEXT)
@click.argument("ids", nargs=-1, required=True, type=click.IntRange(min=1))
@click.option(
    "--reason",
    required=True,
    help='Why they need no replay (kept in status_note), e.g. --reason "synthetic test traffic".',
)
@_db_options
@_output_option("The summary")
@_logging_options
def rejects_ignore(
    ids: tuple[int, ...],
    reason: str,
    config_path: str | None,
    output: str,
    verbose: int,
    quiet: int,
    log_format: str,
    **kw: Any,
) -> None:
    """Mark rejects as ignored, with a reason. All or nothing: an unknown id changes nothing (exit 2).

    \b
    Examples:
      metric-etl rejects ignore 42 --reason "bad probe, fixed upstream"
      metric-etl rejects ignore 42 43 44 --reason "load test"
    """
    if not reason.strip():
        raise click.BadParameter("must not be empty", param_hint="--reason")
    settings = _settings(config_path, _setting_flags(kw), (verbose, quiet, log_format))
    from etl import rejects as lib

    result = _run(settings, lambda: lib.ignore(settings, ids, reason))
    if output == "json":
        _echo_json(settings, result.as_dict())
    else:
        _echo(settings, result.to_text())


@rejects.command("purge", context_settings=CONTEXT)
@click.option(
    "--older-than",
    type=DURATION,
    required=True,
    help="Delete rejects stored longer ago than this (by the database clock), e.g. --older-than 30d.",
)
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(REJECT_STATUSES),
    help="Only rejects with this status (repeatable), e.g. --status replayed --status ignored. "
    "[default: any status]",
)
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
@_topic_options
@_db_options
@_output_option("The summary")
@_logging_options
def rejects_purge(
    older_than: timedelta,
    statuses: tuple[str, ...],
    dry_run: bool,
    reject_topic: str | None,
    all_topics: bool,
    config_path: str | None,
    output: str,
    verbose: int,
    quiet: int,
    log_format: str,
    **kw: Any,
) -> None:
    """Delete old rejects (retention). Run it daily from cron, for instance.

    \b
    Examples:
      metric-etl rejects purge --older-than 30d
      metric-etl rejects purge --older-than 7d --status replayed --status ignored
      metric-etl rejects purge --older-than 90d --dry-run
      metric-etl rejects purge --older-than 30d --all-topics

    
    Only the configured topic's rejects (or --topic's), unless --all-topics.
    """
    settings = _settings(config_path, _setting_flags(kw), (verbose, quiet, log_format))
    from etl import rejects as lib

    topic = _reject_topic(settings, {"reject_topic": reject_topic, "all_topics": all_topics})
    result = _run(
        settings,
        lambda: lib.purge(settings, older_than, statuses=statuses, topic=topic, dry_run=dry_run),
    )
    if output == "json":
        _echo_json(settings, result.as_dict())
    else:
        _echo(settings, result.to_text())


# -- status, check, init-db -----------------------------------------------------------------------


@click.command(context_settings=CONTEXT)
@_db_options
@_kafka_options
@click.option(
    "--max-lag",
    type=click.IntRange(min=0),
    metavar="N",
    help="Exit 8 when more than N messages (all partitions) are left to read, e.g. --max-lag 100000.",
)
@click.option(
    "--max-age",
    type=DURATION,
    help="Exit 7 when no run ended ok within this time, e.g. --max-age 15m (three missed 5-minute runs).",
)
@click.option(
    "--max-lost",
    type=click.IntRange(min=0),
    metavar="N",
    help="Exit 9 when more than N messages were deleted upstream (retention) before the group read "
    "them, in the runs of the last 24 hours, e.g. --max-lost 0.",
)
@click.option(
    "--runs",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="How many recent runs to show, e.g. --runs 20.",
)
@_output_option("The status")
@_logging_options
def status(
    config_path: str | None,
    max_lag: int | None,
    max_age: timedelta | None,
    max_lost: int | None,
    runs: int,
    output: str,
    verbose: int,
    quiet: int,
    log_format: str,
    **kw: Any,
) -> None:
    """Offsets and lag per partition, and the last runs; the exit code is a monitor's verdict.

    Per partition: the next offset stored in the database (where the next run starts), the
    topic's end offset in Kafka, and the lag between them. Then the last runs from etl_runs.

    \b
    Exit codes (when several apply, the lowest wins):
      0  ok
      3  configuration: bad settings, the topic or the tables do not exist, TLS/SASL refused
      4  Kafka or PostgreSQL unreachable (without Kafka, the stored offsets are still shown)
      6  the last finished run failed (status failed, reject_ratio or interrupted)
      7  no run ended ok within --max-age
      8  lag above --max-lag
      9  more than --max-lost messages lost to retention in the last 24 hours

    \b
    Examples:
      metric-etl status
      metric-etl status --max-lag 100000 --max-age 15m     # from a monitor (Nagios, cron)
      metric-etl status --max-lost 0                       # alert on any message lost upstream
      metric-etl status --output json | jq .lag
    """
    settings = _settings(config_path, _setting_flags(kw), (verbose, quiet, log_format))
    from etl import status as lib

    report = _run(
        settings,
        lambda: lib.status(settings, runs=runs, max_lag=max_lag, max_age=max_age, max_lost=max_lost),
    )
    if output == "json":
        _echo_json(settings, report.as_dict())
    else:
        _echo(settings, report.to_text())
    sys.exit(int(report.exit_code))


@click.command(context_settings=CONTEXT)
@_db_options
@_kafka_options
@_output_option("The checks")
@_logging_options
def check(config_path: str | None, output: str, verbose: int, quiet: int, log_format: str, **kw: Any) -> None:
    """Check that a run can work: broker, topic, group, database, tables, privileges.

    Connects with the configured TLS/SASL settings and says, for each failure, what to fix.
    Changes nothing (the run's table set-up is tried in a transaction that is rolled back).

    \b
    Exit codes:
      0  every check passed (warnings allowed)
      3  a setting, a grant or the tables must change: retrying will not help
      4  Kafka or PostgreSQL unreachable, nothing else wrong found

    \b
    Examples:
      metric-etl check
      metric-etl check --config /etc/metric-etl/service.yaml --output json
      METRIC_ETL_SECURITY_PROTOCOL=SASL_SSL metric-etl check --bootstrap-servers kafka:9095
    """
    settings = _settings(config_path, _setting_flags(kw), (verbose, quiet, log_format))
    from etl import status as lib

    report = _run(settings, lambda: lib.check(settings))
    if output == "json":
        _echo_json(settings, report.as_dict())
    else:
        _echo(settings, report.to_text())
    sys.exit(int(report.exit_code))


@click.command("init-db", context_settings=CONTEXT)
@_db_options
@click.option("--sql", is_flag=True, help="Print the DDL instead of running it (no database needed).")
@_logging_options
def init_db(config_path: str | None, sql: bool, verbose: int, quiet: int, log_format: str, **kw: Any) -> None:
    """Create or upgrade the tables (idempotent: safe to run again, and concurrently).

    Creates the schema and any missing table, then adds what older tables lack: columns,
    indexes, check and unique constraints. A run does the creation part itself; init-db lets a
    DBA do it ahead, or review it with --sql.

    \b
    Examples:
      metric-etl init-db
      metric-etl init-db --db-schema metrics
      metric-etl init-db --sql > schema.sql
    """
    settings = _settings(config_path, _setting_flags(kw), (verbose, quiet, log_format))
    from etl.db import schema

    if sql:
        click.echo(schema.ddl_text(settings), nl=False)
        return
    result = _run(settings, lambda: schema.init_db(settings))
    _echo(settings, result.to_text())


# -- offsets --------------------------------------------------------------------------------------


@click.group(context_settings=CONTEXT)
def offsets() -> None:
    """Move the offsets stored for a group and topic (where its next run starts).

    \b
    Examples:
      metric-etl offsets reset --to earliest --dry-run      # what would change
      metric-etl offsets reset --to earliest                # after a topic was deleted and created again
      metric-etl offsets reset --to 2026-11-28T00:00:00Z --partition 0
    """


@offsets.command("reset", context_settings=CONTEXT)
@_db_options
@_kafka_options
@click.option(
    "--to",
    "to",
    required=True,
    metavar="WHERE",
    help="earliest (the log start), latest (the end; skips what is there), an ISO time with a zone "
    "(the first message at or after it) or an offset.",
)
@click.option(
    "--partition",
    "partitions",
    type=click.IntRange(min=0),
    multiple=True,
    metavar="N",
    help="Only this partition (repeatable).  [default: all]",
)
@click.option("--dry-run", is_flag=True, help="Show what would change; change nothing.")
@_output_option("The offsets before and after")
@_logging_options
def offsets_reset(
    config_path: str | None,
    to: str,
    partitions: tuple[int, ...],
    dry_run: bool,
    output: str,
    verbose: int,
    quiet: int,
    log_format: str,
    **kw: Any,
) -> None:
    """Move the stored offsets of the group and topic to WHERE.

    A partition whose stored offset belongs to an earlier incarnation of the topic (the topic was
    deleted and created again, or truncated: a run stops with exit 3 and says so) gets a new
    incarnation: its messages load as new rows, next to the rows loaded before. The reset is
    recorded in etl_runs (status reset, stop reason offsets_reset). It takes the run lock: while
    a run with --lock holds it, nothing changes (exit 75).

    \b
    Exit codes: 0 done (or dry run), 3 configuration (a bad --to or --partition, no such topic),
    4 Kafka or PostgreSQL unreachable, 75 a run holds the lock.
    """
    settings = _settings(config_path, _setting_flags(kw), (verbose, quiet, log_format))
    from etl.offsets import reset

    result = _run(settings, lambda: reset(settings, to, partitions=list(partitions), dry_run=dry_run))
    if output == "json":
        _echo_json(settings, result.as_dict())
    else:
        _echo(settings, result.to_text())


# -- helpers --------------------------------------------------------------------------------------

_FILTER_KEYS = ("since", "rules", "stages", "statuses", "reject_topic", "all_topics", "limit", "ids")


def _setting_flags(kw: dict[str, Any]) -> dict[str, Any]:
    """The options that are settings (``--db-url`` -> db_url); filters are not."""
    return {k: v for k, v in kw.items() if k not in _FILTER_KEYS and v is not None}


for _command in (rejects, status, check, init_db, offsets):
    main.add_command(_command)
