"""The ``etl_runs`` rows: a run's start, heartbeat and finish, and closing the rows of runs that were
killed (``abandoned``)."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from etl.config import Settings
    from etl.db import schema

log = logging.getLogger(__name__)


def start_run(conn: Connection, tables: schema.Tables, run_id: str, settings: Settings, status: str) -> None:
    import os

    now = datetime.now(UTC)
    conn.execute(
        tables.runs.insert().values(
            run_id=run_id,
            group_id=settings.group_id,
            topic=settings.topic,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=now,
            status=status,
            heartbeat_at=now,
            # An atomic run's row says so until its one transaction commits (and clears it): a row
            # left `running` with it belongs to a run whose work was all rolled back (etl.run.atomic).
            stop_reason=ATOMIC_MARK if settings.atomic else None,
        )
    )


ATOMIC_MARK = "atomic"  # the stop_reason of an atomic run's row until its transaction commits


def progress(conn: Connection, tables: schema.Tables, run_id: str, read: int) -> None:
    """An atomic run read and staged one more cycle (outside its transaction, so it shows while it runs;
    what it loaded is written in the transaction itself, by :func:`totals`)."""
    from sqlalchemy import func

    runs = tables.runs
    conn.execute(
        runs.update()
        .where(runs.c.run_id == run_id)
        .values(cycles=runs.c.cycles + 1, read=runs.c.read + read, heartbeat_at=func.now())
    )


def totals(
    conn: Connection, tables: schema.Tables, run_id: str, loaded: int, rejected: int, duplicates: int
) -> None:
    """An atomic run's totals, in its transaction just before the COMMIT: true exactly when it commits."""
    runs = tables.runs
    conn.execute(
        runs.update()
        .where(runs.c.run_id == run_id)
        .values(loaded=loaded, rejected=rejected, duplicates=duplicates, stop_reason=None)
    )


HEARTBEAT_EVERY_S = 30.0  # an idle run (nothing to read) still says it is alive this often


def heartbeat(conn: Connection, tables: schema.Tables, run_id: str) -> None:
    """The run is alive (a cycle's load writes the same column in its own transaction)."""
    from sqlalchemy import func

    runs = tables.runs
    conn.execute(runs.update().where(runs.c.run_id == run_id).values(heartbeat_at=func.now()))


def abandoned_after(settings: Settings) -> float:
    """Seconds without a heartbeat after which a ``running`` row is taken for a run that was killed.

    Twice the longest a live run goes between heartbeats, and never under five minutes. That
    longest is: the idle heartbeat interval, one poll and ``sleep``, a load retried until
    ``retry_deadline`` and the Kafka connection retried as long, and a group join (which waits for
    a dead member's session to expire). With the defaults: 10 min 14 s.
    """
    from etl.kafka.client import join_wait

    join = join_wait(settings)
    longest = (
        HEARTBEAT_EVERY_S
        + settings.poll_timeout_ms / 1000
        + settings.sleep
        + 2 * settings.retry_deadline
        + join
    )
    return max(300.0, 2 * longest)


@dataclass
class Abandoned:
    run_id: str
    last_seen: datetime
    why: str


def close_abandoned(
    conn: Connection, tables: schema.Tables, settings: Settings, *, by: str, now: datetime | None = None
) -> list[Abandoned]:
    """Mark the group's and topic's ``running`` rows of runs that are gone as ``abandoned``.

    A run is gone when its process is (same host, pid not alive, or alive but started after the run:
    the pid was reused), or when its heartbeat is older than :func:`abandoned_after`. Its
    ``finished_at`` becomes the time it was last seen (its last heartbeat); ``error`` says why and
    who closed it (``by``). A row that heartbeats meanwhile is left alone.
    """
    from sqlalchemy import func, select

    runs = tables.runs
    now = now or datetime.now(UTC)
    bound = abandoned_after(settings)
    host = socket.gethostname()
    found = conn.execute(
        select(
            runs.c.run_id, runs.c.host, runs.c.pid, runs.c.started_at, runs.c.heartbeat_at, runs.c.stop_reason
        ).where(
            runs.c.group_id == settings.group_id, runs.c.topic == settings.topic, runs.c.status == "running"
        )
    ).all()
    closed: list[Abandoned] = []
    for run_id, run_host, pid, started_at, heartbeat_at, stop_reason in found:
        last_seen = heartbeat_at or started_at
        if run_host == host and _process_gone(int(pid), started_at):
            why = f"its process (pid {pid} on {host}) is gone"
        elif (now - last_seen).total_seconds() > bound:
            why = f"no heartbeat for {(now - last_seen).total_seconds():.0f}s (more than {bound:.0f}s)"
        else:
            continue
        seen = last_seen.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        outcome: dict[str, Any] = {"status": "abandoned"}
        if stop_reason == ATOMIC_MARK:  # its one transaction ended with its connection, uncommitted
            outcome = {"status": "rolled_back", "stop_reason": "abandoned"}
            why += "; an atomic run: its transaction was rolled back, nothing of it was kept"
        done = conn.execute(
            runs.update()
            .where(
                runs.c.run_id == run_id,
                runs.c.status == "running",
                func.coalesce(runs.c.heartbeat_at, runs.c.started_at) == last_seen,
            )
            .values(
                **outcome,
                finished_at=last_seen,
                error=f"abandoned: last seen {seen}; {why}; closed by {by}",
            )
        )
        if done.rowcount == 1:
            closed.append(Abandoned(run_id, last_seen, why))
            log.warning("run %s was abandoned (last seen %s): %s", run_id, seen, why)
    return closed


def _process_gone(pid: int, started_at: datetime) -> bool:
    """No live process ``pid`` on this host that could be the run started at ``started_at``."""
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: it exists
        pass
    try:  # Linux: a zombie is gone, and a process started after the run is another one (pid reused)
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            return True
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        began = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return began > started_at.timestamp() + 1
    except (OSError, ValueError, IndexError, StopIteration):
        return False


def finish_run(conn: Connection, tables: schema.Tables, run_id: str, **values: Any) -> None:
    runs = tables.runs
    conn.execute(runs.update().where(runs.c.run_id == run_id).values(finished_at=datetime.now(UTC), **values))
