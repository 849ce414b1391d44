"""The commands for the tables readers use: ``report``, ``retention`` and ``rollups rebuild|check``.
Flags -> settings -> one library call (etl.ops.uptime, etl.ops.retention, etl.db.rollups) -> output
-> exit code. No pandas and no SQL here.
"""

from __future__ import annotations

import sys
from datetime import datetime, timedelta
from typing import Any

import click

from etl.cli.common import (
    CONTEXT,
    DURATION,
    SINCE,
    call,
    db_options,
    echo,
    echo_json,
    logging_options,
    output_option,
    setting_flags,
    settings_or_fail,
)
from etl.errors import StatusCode


@click.command(context_settings=CONTEXT)
@db_options
@click.option(
    "--since",
    "period",
    type=DURATION,
    default="7d",
    show_default=True,
    help="The range, back from now, e.g. --since 24h or --since 30d.",
)
@click.option(
    "--url", "urls", multiple=True, help="Only this URL (repeat for more), e.g. --url https://example.com/."
)
@click.option(
    "--output",
    type=click.Choice(["text", "json", "csv"]),
    default="text",
    show_default=True,
    help="text for people, json or csv for scripts and spreadsheets, e.g. --output csv.",
)
@logging_options
def report(
    config_path: str | None,
    period: timedelta,
    urls: tuple[str, ...],
    output: str,
    verbose: int,
    quiet: int,
    log_format: str,
    **kw: Any,
) -> None:
    """Each URL's uptime, checks, p50/p95/p99 response time and last state over a range.

    Read from the rollups the load keeps, so it takes milliseconds at any table size. A range
    under two days starts at the hour --since falls in; a longer one at its day (UTC).
    Percentiles are within 4.9% of the exact ones.

    \b
    Examples:
      metric-etl report
      metric-etl report --since 24h --url https://example.com/health
      metric-etl report --since 30d --output csv > uptime.csv
    """
    settings = settings_or_fail(config_path, setting_flags(kw), (verbose, quiet, log_format))
    from etl.ops import uptime

    result = call(settings, lambda: uptime.report(settings, period, list(urls) or None))
    if output == "json":
        echo_json(settings, result.as_dict())
    elif output == "csv":
        click.echo(result.to_csv(), nl=False)
    else:
        echo(settings, result.to_text())


@click.command(context_settings=CONTEXT)
@db_options
@click.option("--dry-run", is_flag=True, help="Say what would be removed; change nothing.")
@output_option("What was removed")
@logging_options
def retention(
    config_path: str | None, dry_run: bool, output: str, verbose: int, quiet: int, log_format: str, **kw: Any
) -> None:
    """Drop raw checks past retention_raw_days by whole partitions (never a DELETE of metrics
    rows), delete rollup rows and reviewed rejects past their horizons, and make the partitions a
    week ahead. Waits at most 5 s at a time for the metrics table's lock (3 tries); run it daily.

    \b
    Exit codes:
      0  done (or, with --dry-run, reported)
      3  configuration error
      4  PostgreSQL unreachable, or the table stayed locked: run it again later

    \b
    Examples:
      metric-etl retention --dry-run
      metric-etl retention
      METRIC_ETL_RETENTION_RAW_DAYS=90 metric-etl retention --output json
    """
    settings = settings_or_fail(config_path, setting_flags(kw), (verbose, quiet, log_format))
    from etl.ops.retention import retention as apply

    result = call(settings, lambda: apply(settings, dry_run=dry_run))
    if output == "json":
        echo_json(settings, result.as_dict())
    else:
        echo(settings, result.to_text())


@click.group(context_settings=CONTEXT)
def rollups() -> None:
    """Recompute or verify the rollups and latest states from the raw checks.

    \b
    Examples:
      metric-etl rollups check
      metric-etl rollups rebuild --since 2026-11-01T00:00:00Z --until 2026-11-08T00:00:00Z
    """


def _range(f: Any) -> Any:
    f = click.option(
        "--until",
        type=SINCE,
        help="The last hour and day, e.g. --until 2026-11-08T00:00:00Z.  [default: all]",
    )(f)
    return click.option(
        "--since", type=SINCE, help="The first hour and day, e.g. --since 7d.  [default: all]"
    )(f)


@rollups.command(context_settings=CONTEXT)
@db_options
@_range
@output_option("What was rebuilt")
@logging_options
def rebuild(
    config_path: str | None,
    since: datetime | None,
    until: datetime | None,
    output: str,
    verbose: int,
    quiet: int,
    log_format: str,
    **kw: Any,
) -> None:
    """Recompute the hourly and daily rollups of a range (every URL's latest state too) from the
    raw checks. Idempotent; loads wait to commit meanwhile."""
    settings = settings_or_fail(config_path, setting_flags(kw), (verbose, quiet, log_format))
    from etl.ops.rollups import rebuild as lib

    result = call(settings, lambda: lib(settings, since, until))
    if output == "json":
        echo_json(settings, result.as_dict())
    else:
        echo(
            settings,
            f"rebuilt {result.hourly:,} hourly and {result.daily:,} daily rollup rows and "
            f"{result.latest:,} latest states in {result.seconds:.2f}s",
        )


@rollups.command("check", context_settings=CONTEXT)
@db_options
@_range
@output_option("The comparison")
@logging_options
def check_rollups(
    config_path: str | None,
    since: datetime | None,
    until: datetime | None,
    output: str,
    verbose: int,
    quiet: int,
    log_format: str,
    **kw: Any,
) -> None:
    """Compare the rollups and latest states with a recomputation from the raw checks; exit 10
    when they differ (then `metric-etl rollups rebuild` over the range mends them)."""
    settings = settings_or_fail(config_path, setting_flags(kw), (verbose, quiet, log_format))
    from etl.ops.rollups import check as lib

    result = call(settings, lambda: lib(settings, since, until))
    if output == "json":
        echo_json(settings, result.as_dict())
    else:
        differ = result.as_dict()["differ"]
        echo(
            settings,
            ("rollups agree with the raw checks" if result.ok else "rollups DIFFER from the raw checks")
            + f": compared {result.compared}; differing rows {differ}",
        )
    sys.exit(0 if result.ok else int(StatusCode.ROLLUPS_DIFFER))
