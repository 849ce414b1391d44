"""The ``metric-etl`` command: flags -> settings -> one library call -> report -> exit code.

``main`` is the click group; the commands live beside it: ``run`` and ``produce-sample``
(etl/cli/run.py), ``rejects`` (etl/cli/rejects.py), ``status``, ``check``, ``init-db`` and
``offsets`` (etl/cli/ops.py), ``report``, ``retention`` and ``rollups``
(etl/cli/tables.py), over the shared options and the one error -> exit wrapper of
etl/cli/common.py. No pandas and no SQL here; heavy libraries are imported only by the commands
that need them, so ``metric-etl --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

import click

from etl.cli import ops, rejects, run, tables
from etl.cli.common import CONTEXT

__all__ = ["console", "main"]


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="metric-etl")
def main() -> None:
    """Move website-availability metrics from Kafka into PostgreSQL, exactly once.

    \b
    Examples:
      metric-etl run                      drain the topic until caught up, then exit
      metric-etl run --cycles 10          a bounded backfill of 10 cycles
      metric-etl run --follow             keep polling (service mode)
      metric-etl run --dry-run            read and validate, write nothing

    Settings come from built-in defaults < config/service.yaml (or --config) < METRIC_ETL_* environment
    variables < flags. Secrets come from the environment or *_file settings only.
    """


for _command in (
    run.run,
    run.produce_sample,
    rejects.rejects,
    ops.status,
    ops.check,
    ops.init_db,
    ops.offsets,
    tables.report,
    tables.retention,
    tables.rollups,
):
    main.add_command(_command)


def console() -> None:
    """``metric-etl`` as installed, and ``python -m etl``: :func:`main`, then the process ends at once.

    When ``main`` returns, a command's work is committed, reported and flushed; what is left is the
    interpreter freeing its objects and modules one by one and a last garbage collection: 0.2-0.3 s
    after a run, a third of a caught-up run's CPU, which the operating system does in no time. The
    log handlers and the standard streams are flushed first. An exception other than ``SystemExit``
    (a bug's traceback) leaves the usual way.
    """
    try:
        main()
        code: object = 0
    except SystemExit as exc:
        code = exc.code
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"): the message, then 1
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader that went away, a closed stream
            stream.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    console()
