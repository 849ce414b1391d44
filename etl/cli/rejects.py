"""``metric-etl rejects`` (list/show/export/replay/ignore/purge): flags -> settings -> one call
into etl.ops.rejects -> output -> exit code.

No pandas and no SQL here; the library is imported inside the commands, so ``metric-etl --help``
stays fast.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import timedelta
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
from etl.contract import REJECT_STATUSES, STAGES

# -- filter options -------------------------------------------------------------------------------


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


def _filter(settings: Any, **kw: Any) -> Any:
    from etl.ops.rejects import RejectFilter

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
@db_options
@_filter_options(
    default_limit=50, status_help="Only rejects with this status (repeatable), e.g. --status new."
)
@output_option("The table")
@logging_options
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
    settings = settings_or_fail(config_path, setting_flags(kw), (verbose, quiet, log_format))
    from etl.ops import rejects as lib
    from etl.ops.rejects_view import format_table

    found = call(settings, lambda: lib.list_rejects(settings, _filter(settings, **kw)))
    if output == "json":
        echo_json(settings, [x.as_export() for x in found])
    else:
        import shutil

        echo(settings, format_table(found, width=shutil.get_terminal_size((120, 20)).columns))


@rejects.command("show", context_settings=CONTEXT)
@click.argument("reject_id", metavar="ID", type=click.IntRange(min=1))
@db_options
@click.option("--hex", "hex_dump", is_flag=True, help="Show the payload as a hex dump even when it is text.")
@output_option("The reject")
@logging_options
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
    settings = settings_or_fail(config_path, setting_flags(kw), (verbose, quiet, log_format))
    from etl.ops import rejects as lib

    found = call(settings, lambda: lib.get_reject(settings, reject_id))
    if output == "json":
        echo_json(settings, found.as_export())
    else:
        echo(settings, found.to_text(hex_dump=hex_dump))


@rejects.command("export", context_settings=CONTEXT)
@db_options
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
@logging_options
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
    settings = settings_or_fail(config_path, setting_flags(kw), (verbose, quiet, log_format))
    from etl.ops import rejects as lib

    if output_file:
        with open(output_file, "w", encoding="utf-8", newline="") as out:
            n = call(settings, lambda: lib.export_rejects(settings, _filter(settings, **kw), fmt, out))
        click.echo(f"exported {n} rejects to {output_file}", err=True)
    else:
        call(settings, lambda: lib.export_rejects(settings, _filter(settings, **kw), fmt, sys.stdout))


@rejects.command("replay", context_settings=CONTEXT)
@click.argument("ids", nargs=-1, type=click.IntRange(min=1))
@db_options
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
@output_option("The summary")
@logging_options
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
    settings = settings_or_fail(config_path, setting_flags(kw), (verbose, quiet, log_format))
    from etl.ops import rejects as lib

    result = call(settings, lambda: lib.replay(settings, _filter(settings, ids=ids, **kw), dry_run=dry_run))
    if output == "json":
        echo_json(settings, result.as_dict())
    else:
        echo(settings, result.to_text())


@rejects.command("ignore", context_settings=CONTEXT)
@click.argument("ids", nargs=-1, required=True, type=click.IntRange(min=1))
@click.option(
    "--reason",
    required=True,
    help='Why they need no replay (kept in status_note), e.g. --reason "synthetic test traffic".',
)
@db_options
@output_option("The summary")
@logging_options
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
    settings = settings_or_fail(config_path, setting_flags(kw), (verbose, quiet, log_format))
    from etl.ops import rejects as lib

    result = call(settings, lambda: lib.ignore(settings, ids, reason))
    if output == "json":
        echo_json(settings, result.as_dict())
    else:
        echo(settings, result.to_text())


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
@db_options
@output_option("The summary")
@logging_options
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
    settings = settings_or_fail(config_path, setting_flags(kw), (verbose, quiet, log_format))
    from etl.ops import rejects as lib

    topic = _reject_topic(settings, {"reject_topic": reject_topic, "all_topics": all_topics})
    result = call(
        settings,
        lambda: lib.purge(settings, older_than, statuses=statuses, topic=topic, dry_run=dry_run),
    )
    if output == "json":
        echo_json(settings, result.as_dict())
    else:
        echo(settings, result.to_text())
