"""``metric-etl run`` (drain the topic) and ``metric-etl produce-sample`` (sample messages to try it).

No pandas and no SQL here; the library is imported inside the commands, so ``metric-etl --help``
stays fast.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

import click

from etl.cli.common import (
    CONTEXT,
    config_option,
    fail,
    load,
    log_source,
    logging_options,
    scrub,
    secrets_of,
    settings_or_fail,
    setup_logging,
)
from etl.errors import ConfigError, EtlError, ExitCode, Interrupted, LockHeld, TransientError, exit_code_of

# -- run ------------------------------------------------------------------------------------------


@click.command(context_settings=CONTEXT)
@config_option
@click.option("--topic", help="Topic to drain.  [default: website-metrics]")
@click.option("--bootstrap-servers", help="Kafka brokers, e.g. kafka1:9092,kafka2:9092.")
@click.option("--db-url", help="Database URL without the password, e.g. postgresql://etl@db:5432/metrics.")
@click.option("--db-schema", help="Schema holding the tables, e.g. --db-schema metrics.  [default: public]")
@click.option("--group-id", help="Consumer group; also keys the offsets stored in the database.")
@click.option(
    "--cycles",
    type=click.IntRange(min=1),
    help="Stop after N cycles (polls that read messages), e.g. --cycles 10.",
)
@click.option("--max-messages", type=click.IntRange(min=1), help="Stop after reading N messages.")
@click.option("--max-seconds", type=click.FloatRange(min=0, min_open=True), help="Stop after S seconds.")
@click.option("--sleep", type=click.FloatRange(min=0), help="Seconds to sleep between polls, e.g. --sleep 5.")
@click.option(
    "--follow",
    is_flag=True,
    default=None,
    help="Keep polling until SIGTERM/Ctrl-C (service mode; SIGTERM exits 0). With --max-seconds, "
    "--cycles or --max-messages it stops at that cap instead of when caught up.",
)
@click.option(
    "--from-beginning",
    is_flag=True,
    default=None,
    help="Re-read every partition from its start; messages already handled are skipped, never loaded twice.",
)
@click.option(
    "--from-timestamp",
    metavar="ISO",
    help="Re-read from the first message at or after this time, "
    "e.g. 2026-11-28T00:00:00Z; messages already handled are skipped.",
)
@click.option(
    "--dry-run", is_flag=True, default=None, help="Read and validate, write nothing, move no offset."
)
@click.option(
    "--max-reject-ratio",
    type=click.FloatRange(0, 1),
    metavar="R",
    help="Fail (exit 5) and roll back a cycle whose rejected share is above R, e.g. 0.5.",
)
@click.option(
    "--lock",
    is_flag=True,
    default=None,
    help="Take a PostgreSQL advisory lock for this group and topic; if another run holds it, "
    "exit 75 at once (skipped).",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    metavar="N",
    help="Run N members of the group in parallel processes, e.g. --workers 2 (one per core) "
    "to drain a backlog faster.  [default: 1]",
)
@click.option(
    "--atomic",
    is_flag=True,
    default=None,
    help="Commit the whole run (every cycle's rows, rejects and offsets) in one transaction at its "
    "end, or nothing of it: a failure, a reject ratio above the bound or SIGTERM keeps nothing. "
    "Not with --follow or --workers (docs/atomic.md).",
)
@click.option(
    "--output",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="The run report on stdout: text, or one JSON object (for Airflow's XCom).",
)
@click.option(
    "--metrics-file",
    type=click.Path(dir_okay=False),
    metavar="PATH",
    help="After the run, write Prometheus metrics here for node_exporter's textfile collector "
    "(atomically), e.g. --metrics-file /var/lib/node_exporter/textfile/metric_etl.prom.",
)
@logging_options
def run(
    config_path: str | None,
    output: str,
    metrics_file: str | None,
    log_format: str,
    verbose: int,
    quiet: int,
    **flags: Any,
) -> None:
    """Drain the topic into PostgreSQL: poll, validate, load each cycle in one transaction.

    \b
    Stops at the first of --cycles, --max-messages, --max-seconds, or when caught up with the
    end offsets seen at start (so a run always ends, even while producers keep writing).
    SIGTERM or Ctrl-C finishes the current cycle, then stops. --atomic commits the whole run
    at its end or nothing of it: SIGTERM then rolls it all back (exit 130).

    \b
    Examples:
      metric-etl run --cycles 10 --output json
      metric-etl run --max-seconds 240 --lock          # from cron, every 5 minutes
      METRIC_ETL_DB_PASSWORD=... metric-etl run --db-url postgresql://etl@db/metrics

    \b
    Exit codes: 0 ok, 1 bug, 2 usage, 3 configuration, 4 Kafka/PostgreSQL unreachable,
    5 reject ratio exceeded, 75 skipped: another run holds the lock, 130 interrupted (Ctrl-C)
    before the first commit. SIGTERM to --follow exits 0.
    """
    try:
        settings = load(config_path, flags)
        if metrics_file:
            _check_metrics_file(metrics_file)
    except ConfigError as exc:
        setup_logging(verbose, quiet, log_format, [])
        _record(metrics_file, None, int(exit_code_of(exc)), None)
        fail(exc)
    secrets = secrets_of(settings)
    setup_logging(verbose, quiet, log_format, secrets)
    log_source(settings)

    from etl.run import run_batch

    stop = threading.Event()
    restore = _install_signal_handlers(stop, atomic=settings.atomic and not settings.dry_run)
    progress = _progress_hook(output, settings) if settings.workers == 1 else None
    try:
        report = run_batch(settings, stop=stop, on_cycle=progress)
    except KeyboardInterrupt as exc:
        _close(progress)
        _record(metrics_file, None, int(exit_code_of(exc)), settings)
        fail(Interrupted("interrupted; the cycle in progress was rolled back"))
    except EtlError as exc:
        _close(progress)
        partial = getattr(exc, "report", None)
        if partial is not None:
            partial.exit_code = int(exit_code_of(exc))
        _record(metrics_file, partial, int(exit_code_of(exc)), settings)
        if partial is not None:
            _emit(partial, output, secrets)
        # LockHeld: a skip, not a failure: the other run is working
        fail(exc, secrets, skipped=isinstance(exc, LockHeld))
    except Exception as exc:
        _close(progress)
        _record(metrics_file, None, int(exit_code_of(exc)), settings)
        raise
    finally:
        restore()
    _close(progress)
    _record(metrics_file, report, int(ExitCode.OK), settings)
    _emit(report, output, secrets)


def _emit(report: Any, output: str, secrets: list[str]) -> None:
    level = {"ok": logging.INFO, "dry_run": logging.INFO, "skipped": logging.WARNING}.get(
        report.status, logging.ERROR
    )
    logging.getLogger("etl.run").log(level, report.summary_line(), extra=report.log_fields())
    text = report.to_json() if output == "json" else report.to_text()
    click.echo(scrub(text, secrets))


def _progress_hook(output: str, settings: Any) -> Callable[[Any], None] | None:
    """A progress bar on stderr, only for a person watching (a terminal, text output)."""
    from etl.run.progress import progress_for, wanted

    return progress_for(settings, output) if wanted(output) else None


def _close(progress: Any) -> None:
    if progress is not None:
        progress.close()


def _check_metrics_file(path: str) -> None:
    from etl.run.metrics_file import check_writable

    problem = check_writable(path)
    if problem:
        raise ConfigError(
            f"--metrics-file {path}: {problem}", hint="create the directory or pick another path"
        )


def _record(path: str | None, report: Any, exit_code: int, settings: Any) -> None:
    """Write the Prometheus metrics of this run (never fails the run)."""
    if path:
        from etl.run.metrics_file import record_run

        record_run(path, report, exit_code, settings)


def _say_stopping(name: str, atomic: bool) -> None:
    then = "rolling the whole atomic run back (docs/atomic.md)" if atomic else "stopping"
    logging.getLogger("etl").warning("%s received: finishing the current cycle, then %s", name, then)


def _install_signal_handlers(stop: threading.Event, *, atomic: bool = False) -> Callable[[], None]:
    """First SIGTERM/SIGINT: finish the cycle, then stop. A second SIGINT interrupts at once."""
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        name = signal.Signals(signum).name
        # Which signal asked: SIGTERM to --follow is a service manager's stop (exit 0), a Ctrl-C
        # before anything committed is an interrupt (130). See Pipeline._service_stop.
        stop.signal_name = name  # type: ignore[attr-defined]
        stop.set()
        # Logged from a thread, not here: a signal that lands while the main thread writes a log
        # line makes a write from the handler a "reentrant call" on stderr, which logging swallows,
        # and the stop was then never set (an idle --follow ignored SIGTERM, 2 of 3 times in a row).
        threading.Thread(target=_say_stopping, args=(name, atomic), name="signal-log", daemon=True).start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handler)

    def restore() -> None:
        for sig, h in previous.items():
            signal.signal(sig, h)

    return restore


@click.command("produce-sample", context_settings=CONTEXT)
@config_option
@click.option("--topic", help="Topic to write to.  [default: website-metrics]")
@click.option("--bootstrap-servers", help="Kafka brokers, e.g. 127.0.0.1:9092.")
@click.option(
    "-n",
    "--count",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="How many messages to write.",
)
@click.option(
    "--corrupt-ratio",
    type=click.FloatRange(0, 1),
    default=0.01,
    show_default=True,
    help="Share of corrupted messages (bad JSON, bad bytes, out-of-range values).",
)
@click.option(
    "--partitions",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Partitions for the topic if it has to be created.",
)
@click.option(
    "--seed", type=int, default=7, show_default=True, help="Random seed (same seed, same messages)."
)
@logging_options
def produce_sample(
    config_path: str | None,
    count: int,
    corrupt_ratio: float,
    partitions: int,
    seed: int,
    log_format: str,
    verbose: int,
    quiet: int,
    **flags: Any,
) -> None:
    """Write realistic sample metrics (some corrupted) to a topic, to try the job out.

    \b
    Example:
      metric-etl produce-sample -n 5000 --corrupt-ratio 0.02 --topic website-metrics
    """
    settings = settings_or_fail(config_path, flags, (verbose, quiet, log_format))
    from etl.kafka.client import ensure_topic
    from etl.sample import produce

    try:
        created = ensure_topic(settings, partitions)
        sent = produce(settings, count, corrupt_ratio=corrupt_ratio, seed=seed)
    except Exception as exc:
        from kafka.errors import KafkaError

        if isinstance(exc, KafkaError):  # the broker did not answer (or refused): try again later
            fail(TransientError(f"Kafka at {settings.bootstrap_servers}: {exc}"), secrets_of(settings))
        raise
    plural = "partition" if partitions == 1 else "partitions"
    what = f"created topic {settings.topic} with {partitions} {plural}; " if created else ""
    click.echo(f"{what}wrote {sent} messages to {settings.topic} ({corrupt_ratio:.0%} corrupted)")
