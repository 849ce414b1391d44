"""Operations commands: ``status``, ``check``, ``init-db``, ``offsets reset``. Flags -> settings ->
one library call (etl.ops.status, etl.ops.check, etl.db.schema, etl.ops.offsets) -> output -> exit code.

No pandas and no SQL here; the library modules are imported inside the commands, so
``metric-etl --help`` stays fast.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from typing import Any

import click

from etl.cli.common import (
    CONTEXT,
    DURATION,
    call,
    db_options,
    echo,
    echo_json,
    kafka_options,
    logging_options,
    output_option,
    setting_flags,
    settings_or_fail,
)

# -- status, check, init-db -----------------------------------------------------------------------


@click.command(context_settings=CONTEXT)
@db_options
@kafka_options
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
@output_option("The status")
@logging_options
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
    settings = settings_or_fail(config_path, setting_flags(kw), (verbose, quiet, log_format))
    from etl.ops import status as lib

    report = call(
        settings,
        lambda: lib.status(settings, runs=runs, max_lag=max_lag, max_age=max_age, max_lost=max_lost),
    )
    if output == "json":
        echo_json(settings, report.as_dict())
    else:
        echo(settings, report.to_text())
    sys.exit(int(report.exit_code))


@click.command(context_settings=CONTEXT)
@db_options
@kafka_options
@output_option("The checks")
@logging_options
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
    settings = settings_or_fail(config_path, setting_flags(kw), (verbose, quiet, log_format))
    from etl.ops import check as lib

    report = call(settings, lambda: lib.check(settings))
    if output == "json":
        echo_json(settings, report.as_dict())
    else:
        echo(settings, report.to_text())
    sys.exit(int(report.exit_code))


@click.command("init-db", context_settings=CONTEXT)
@db_options
@click.option("--sql", is_flag=True, help="Print the DDL instead of running it (no database needed).")
@logging_options
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
    settings = settings_or_fail(config_path, setting_flags(kw), (verbose, quiet, log_format))
    from etl.db import schema

    if sql:
        click.echo(schema.ddl_text(settings), nl=False)
        return
    result = call(settings, lambda: schema.init_db(settings))
    echo(settings, result.to_text())


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
@db_options
@kafka_options
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
@output_option("The offsets before and after")
@logging_options
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
    settings = settings_or_fail(config_path, setting_flags(kw), (verbose, quiet, log_format))
    from etl.ops.offsets import reset

    result = call(settings, lambda: reset(settings, to, partitions=list(partitions), dry_run=dry_run))
    if output == "json":
        echo_json(settings, result.as_dict())
    else:
        echo(settings, result.to_text())
