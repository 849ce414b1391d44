"""PostgreSQL: one transaction per cycle holding the good rows, the rejects, the offsets and the run row.

Order inside the transaction matters: the conditional offset advance comes first, so two runs that
read the same partition serialise on its ``etl_offsets`` row, and the loser rolls back before it
writes anything (exactly once, see DESIGN.md). Good rows go in with one ``COPY`` on PostgreSQL (the
fast path) and ``DataFrame.to_sql`` elsewhere. Messages already stored (by another consumer group, a
rewind, a replay) are found by one query per table and count as duplicates. A value the database
refuses is isolated by bisection under savepoints and becomes a reject with stage ``database``; the
rest of the cycle loads.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from etl.contract import MESSAGE_KEY, METRIC_COLUMNS
from etl.db import schema
from etl.db.store import dbapi_error, first_line, is_data_error, sqlstate

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    from sqlalchemy.engine import Connection

    from etl.config import Settings

log = logging.getLogger(__name__)

NULL = "\\N"  # COPY's NULL marker (text format escapes a backslash in a value, so no clash)


class OffsetConflict(Exception):
    """Another run advanced a partition first: this cycle must roll back and re-seek."""

    def __init__(self, partitions: list[int]) -> None:
        super().__init__(f"partitions {partitions} were advanced by another run")
        self.partitions = partitions


@dataclass
class OffsetAdvance:
    """Move a partition from ``expected`` (None: no row yet) to ``new``."""

    partition: int
    expected: int | None
    new: int
    incarnation: int = 0  # for a partition's first row; an existing row keeps its own
    topic_id: str | None = None  # likewise


@dataclass
class CycleLoad:
    """What one cycle writes."""

    run_id: str
    good: pd.DataFrame
    rejects: list[dict[str, Any]]
    advances: list[OffsetAdvance]
    source: pd.DataFrame | None = None  # the normalised frame, to turn refused rows into rejects
    read: int = 0
    duplicates: int = 0


@dataclass
class LoadResult:
    loaded: int = 0
    rejected: int = 0
    refused: list[dict[str, Any]] = field(default_factory=list)  # stage "database" rejects
    already_loaded: int = 0  # messages already in the metrics or the rejects table: duplicates
    rejects: list[dict[str, Any]] | None = None  # the rejects written (None: not known one by one)


# -- set-up, offsets, runs, lock -------------------------------------------------------------------


def read_offsets(conn: Connection, tables: schema.Tables, group_id: str, topic: str) -> dict[int, int]:
    """partition -> next offset stored for the group and topic."""
    return {p: n for p, (n, _) in read_offset_owners(conn, tables, group_id, topic).items()}


@dataclass
class StoredOffset:
    """A row of the offsets table."""

    next_offset: int
    incarnation: int
    topic_id: str | None
    run_id: str | None


def read_stored(
    conn: Connection, tables: schema.Tables, group_id: str, topic: str, *, for_update: bool = False
) -> dict[int, StoredOffset]:
    """partition -> its stored offset row for the group and topic (locked with ``for_update``)."""
    from sqlalchemy import select

    o = tables.offsets
    query = select(o.c.partition, o.c.next_offset, o.c.incarnation, o.c.topic_id, o.c.run_id).where(
        o.c.group_id == group_id, o.c.topic == topic
    )
    rows = conn.execute(query.with_for_update() if for_update else query)
    return {int(p): StoredOffset(int(n), int(i), t, r) for p, n, i, t, r in rows}


def latest_incarnations(conn: Connection, tables: schema.Tables, topic: str) -> dict[int, int]:
    """partition -> the highest incarnation any group's stored offset of ``topic`` is at."""
    from sqlalchemy import func, select

    o = tables.offsets
    rows = conn.execute(
        select(o.c.partition, func.max(o.c.incarnation)).where(o.c.topic == topic).group_by(o.c.partition)
    )
    return {int(p): int(i) for p, i in rows}


def record_topic_state(
    conn: Connection,
    tables: schema.Tables,
    settings: Settings,
    run_id: str,
    gaps: dict[int, tuple[int, int]],
    topic_id: str | None,
) -> dict[int, tuple[int, int]]:
    """Move each stored offset of ``gaps`` (partition -> (stored, log start)) to its log start, if it
    is still where it was, and add what it stepped over to the run's ``lost_to_retention``; note the
    topic's id where the stored offsets have none yet. Returns the gaps this call moved."""
    from sqlalchemy import func

    o, runs = tables.offsets, tables.runs
    mine = (o.c.group_id == settings.group_id, o.c.topic == settings.topic)
    moved = {}
    for p, (stored, start) in sorted(gaps.items()):
        done = conn.execute(
            o.update()
            .where(*mine, o.c.partition == p, o.c.next_offset == stored)
            .values(next_offset=start, run_id=run_id, updated_at=func.now())
        ).rowcount
        if done == 1:
            moved[p] = (stored, start)
    if moved:
        total = sum(start - stored for stored, start in moved.values())
        conn.execute(
            runs.update()
            .where(runs.c.run_id == run_id)
            .values(lost_to_retention=runs.c.lost_to_retention + total)
        )
    if topic_id is not None:
        conn.execute(o.update().where(*mine, o.c.topic_id.is_(None)).values(topic_id=topic_id))
    return moved


def read_offset_owners(
    conn: Connection, tables: schema.Tables, group_id: str, topic: str
) -> dict[int, tuple[int, str | None]]:
    """partition -> (next offset, id of the run that stored it) for the group and topic."""
    from sqlalchemy import select

    o = tables.offsets
    rows = conn.execute(
        select(o.c.partition, o.c.next_offset, o.c.run_id).where(o.c.group_id == group_id, o.c.topic == topic)
    )
    return {int(p): (int(n), run) for p, n, run in rows}


def cycle_outcome(
    conn: Connection,
    tables: schema.Tables,
    run_id: str,
    topic: str,
    ranges: dict[int, tuple[int, int]],
    incarnations: dict[int, int] | None = None,
) -> LoadResult:
    """What ``run_id`` stored for the offsets ``[start, end)`` of each partition (in its incarnation,
    0 when not given): loaded and rejected."""
    from sqlalchemy import and_, func, or_, select

    result = LoadResult()
    of = incarnations or {}
    for table in (tables.metrics, tables.rejects):
        within = or_(
            *(
                and_(
                    table.c.partition == p,
                    table.c.incarnation == of.get(p, 0),
                    table.c.offset >= lo,
                    table.c.offset < hi,
                )
                for p, (lo, hi) in ranges.items()
            )
        )
        n = conn.execute(
            select(func.count()).where(table.c.run_id == run_id, table.c.topic == topic, within)
        ).scalar_one()
        if table is tables.metrics:
            result.loaded = int(n)
        else:
            result.rejected = int(n)
    return result


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
        )
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
        select(runs.c.run_id, runs.c.host, runs.c.pid, runs.c.started_at, runs.c.heartbeat_at).where(
            runs.c.group_id == settings.group_id, runs.c.topic == settings.topic, runs.c.status == "running"
        )
    ).all()
    closed: list[Abandoned] = []
    for run_id, run_host, pid, started_at, heartbeat_at in found:
        last_seen = heartbeat_at or started_at
        if run_host == host and _process_gone(int(pid), started_at):
            why = f"its process (pid {pid} on {host}) is gone"
        elif (now - last_seen).total_seconds() > bound:
            why = f"no heartbeat for {(now - last_seen).total_seconds():.0f}s (more than {bound:.0f}s)"
        else:
            continue
        seen = last_seen.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        done = conn.execute(
            runs.update()
            .where(
                runs.c.run_id == run_id,
                runs.c.status == "running",
                func.coalesce(runs.c.heartbeat_at, runs.c.started_at) == last_seen,
            )
            .values(
                status="abandoned",
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


# -- the cycle ------------------------------------------------------------------------------------


def load_cycle(conn: Connection, tables: schema.Tables, settings: Settings, batch: CycleLoad) -> LoadResult:
    """Write one cycle inside the caller's transaction. Raises OffsetConflict to make it roll back."""
    from sqlalchemy import func

    advance_offsets(conn, tables, settings.group_id, settings.topic, batch.run_id, batch.advances)
    result = LoadResult()
    good, rejects = batch.good, batch.rejects
    if len(good) or rejects:
        good, rejects, result.already_loaded = without_stored(conn, tables, good, rejects)
    if len(good):
        already: list[int] = []
        result.loaded, result.refused = insert_good(
            conn, tables, good, batch.source, batch.run_id, already_loaded=already
        )
        result.already_loaded += len(already)
    rejects = rejects + result.refused
    if rejects:
        insert_rejects(conn, tables, rejects, batch.run_id)
    result.rejected = len(rejects)
    result.rejects = rejects
    runs = tables.runs
    conn.execute(
        runs.update()
        .where(runs.c.run_id == batch.run_id)
        .values(
            cycles=runs.c.cycles + 1,
            read=runs.c.read + batch.read,
            loaded=runs.c.loaded + result.loaded,
            rejected=runs.c.rejected + result.rejected,
            duplicates=runs.c.duplicates + batch.duplicates + result.already_loaded,
            heartbeat_at=func.now(),
        )
    )
    return result


def without_stored(
    conn: Connection, tables: schema.Tables, good: pd.DataFrame, rejects: list[dict[str, Any]]
) -> tuple[pd.DataFrame, list[dict[str, Any]], int]:
    """``good`` and ``rejects`` without the messages already in the metrics or the rejects table, and
    how many those were.

    A message is stored once, in one of the two tables, whichever run or group read it first: a
    second group on the topic, a rewind or a replayed backlog finds its messages here, by one query
    over both tables (:func:`find_stored`), and they count as duplicates. On a first load the query
    looks at ranges of the key indexes that hold nothing yet: a few milliseconds a cycle.
    """
    import numpy as np

    keys: dict[str, np.ndarray] = {}
    for c in MESSAGE_KEY:
        # A frame or reject without an incarnation (a caller other than the pipeline) is of incarnation 0.
        values = good[c].to_numpy() if c in good.columns else np.zeros(len(good), dtype=np.int64)
        if rejects:
            kind = values.dtype if values.dtype.kind in "iu" else object
            values = np.concatenate([values, np.array([r.get(c, 0) for r in rejects], dtype=kind)])
        keys[c] = values
    stored = find_stored(conn, [tables.metrics, tables.rejects], keys)
    if not stored.any():
        return good, rejects, 0
    n = len(good)
    kept = [r for r, old in zip(rejects, stored[n:].tolist(), strict=True) if not old]
    return good[~stored[:n]], kept, int(stored.sum())


def find_stored(conn: Connection, tables: list[Any], keys: dict[str, np.ndarray]) -> np.ndarray:
    """Which of the messages in ``keys`` (an array for each column of :data:`etl.MESSAGE_KEY`,
    message by message) any of ``tables`` holds: a boolean array in the order of ``keys``.

    One query: each partition's range of offsets in the batch, read from each table's key index
    (the other key columns equal to the batch's values), then matched to the batch's keys exactly.
    """
    import numpy as np
    import pandas as pd
    from sqlalchemy import and_, or_, select, union_all

    key = list(MESSAGE_KEY)
    n = len(keys["offset"])
    if not n:
        return np.zeros(0, dtype=bool)
    parts, offsets = keys["partition"], keys["offset"]
    bounds = []
    for p in pd.unique(parts).tolist():
        within = offsets[parts == p]
        bounds.append((int(p), int(within.min()), int(within.max())))
    equal = {c: pd.unique(keys[c]).tolist() for c in key if c not in ("partition", "offset")}
    queries = []
    for table in tables:
        where = [table.c[c].in_(values) for c, values in equal.items()]
        where.append(
            or_(*(and_(table.c["partition"] == p, table.c["offset"].between(lo, hi)) for p, lo, hi in bounds))
        )
        queries.append(select(*(table.c[c] for c in key)).where(*where))
    found = set(map(tuple, conn.execute(union_all(*queries) if len(queries) > 1 else queries[0])))
    if not found:
        return np.zeros(n, dtype=bool)  # a first load: nothing in the ranges
    probe = zip(*(keys[c].tolist() for c in key), strict=True)
    return np.fromiter((k in found for k in probe), dtype=bool, count=n)


def advance_offsets(
    conn: Connection,
    tables: schema.Tables,
    group_id: str,
    topic: str,
    run_id: str,
    advances: list[OffsetAdvance],
) -> None:
    """Conditional advance: only from the offset this run started from. Raises OffsetConflict."""
    from sqlalchemy import func
    from sqlalchemy.dialects.postgresql import insert

    o = tables.offsets
    lost: list[int] = []
    for a in sorted(advances, key=lambda a: a.partition):  # one lock order: no deadlocks between runs
        stmt: Any
        if a.expected is None:
            stmt = (
                insert(o)
                .values(
                    group_id=group_id,
                    topic=topic,
                    partition=a.partition,
                    next_offset=a.new,
                    incarnation=a.incarnation,
                    topic_id=a.topic_id,
                    run_id=run_id,
                )
                .on_conflict_do_nothing()
            )
        else:
            stmt = (
                o.update()
                .where(
                    o.c.group_id == group_id,
                    o.c.topic == topic,
                    o.c.partition == a.partition,
                    o.c.next_offset == a.expected,
                )
                .values(next_offset=a.new, run_id=run_id, updated_at=func.now())
            )
        if conn.execute(stmt).rowcount != 1:
            lost.append(a.partition)
    if lost:
        raise OffsetConflict(lost)


def insert_good(
    conn: Connection,
    tables: schema.Tables,
    good: pd.DataFrame,
    source: pd.DataFrame | None,
    run_id: str,
    *,
    already_loaded: list[int] | None = None,
) -> tuple[int, list[dict[str, Any]]]:
    """Load good rows; rows the database refuses come back as stage-``database`` rejects.

    With ``already_loaded`` given, a row whose message is in the metrics table already (its unique
    key) is not a reject: its frame label goes into that list and the row is skipped, so a
    message never lands in both tables. Such rows are found by one lookup of the frame's keys
    when the COPY meets them, not by bisection (one savepoint per split: thousands exhaust
    PostgreSQL's lock table).
    A frame without an ``incarnation`` column is of incarnation 0.
    """
    extra: dict[str, Any] = {"run_id": run_id}
    if "incarnation" not in good.columns:
        extra["incarnation"] = 0
    frame = good.assign(**extra)[list(METRIC_COLUMNS)]
    refused: list[dict[str, Any]] = []
    loaded = _insert_isolating(conn, tables, frame, source, refused, already_loaded)
    return loaded, refused


def _insert_isolating(
    conn: Connection,
    tables: schema.Tables,
    frame: pd.DataFrame,
    source: pd.DataFrame | None,
    refused: list[dict[str, Any]],
    already_loaded: list[int] | None = None,
) -> int:
    """Insert ``frame`` under a savepoint; on a data error split it in halves until the bad rows are alone."""
    savepoint = conn.begin_nested()
    try:
        _to_sql(conn, tables.metrics, frame)
        savepoint.commit()
        return len(frame)
    except Exception as exc:
        savepoint.rollback()
        if not is_data_error(exc):
            raise
        if len(frame) > 1 and already_loaded is not None and sqlstate(exc) == "23505":
            # Another run stored some of these messages since the cycle looked (a second group
            # loading at the same time): find them all at once, then load the rest.
            keys = {c: frame[c].to_numpy() for c in MESSAGE_KEY}
            stored = find_stored(conn, [tables.metrics], keys)
            if stored.any():
                already_loaded.extend(frame.index[stored].tolist())
                rest = frame[~stored]
                return (
                    _insert_isolating(conn, tables, rest, source, refused, already_loaded) if len(rest) else 0
                )
        if len(frame) == 1 and already_loaded is not None and _is_message_key(conn, exc, tables, frame):
            already_loaded.append(frame.index[0])
            return 0
        if len(frame) == 1:
            refused.append(_refused_row(frame, source, exc))
            log.warning(
                "row refused by the database, sent to rejects: %s",
                first_line(str(dbapi_error(exc))),
            )
            return 0
    half = len(frame) // 2
    return _insert_isolating(
        conn, tables, frame.iloc[:half], source, refused, already_loaded
    ) + _insert_isolating(conn, tables, frame.iloc[half:], source, refused, already_loaded)


def _is_message_key(conn: Connection, exc: BaseException, tables: schema.Tables, row: pd.DataFrame) -> bool:
    """A unique violation because ``row``'s message is in the metrics table already.

    The key (:data:`etl.MESSAGE_KEY`) is the table's primary key, or ``<metrics>_message_uq``
    on a table made by an older version, whose primary key is a bigserial ``id``: a violation of a
    primary key is confirmed by looking the message up, so an ``id`` clash there stays a refused row.
    """
    from sqlalchemy import PrimaryKeyConstraint, func, select

    if sqlstate(exc) != "23505":
        return False
    diag = getattr(dbapi_error(exc), "diag", None)
    name = getattr(diag, "constraint_name", None)
    m = tables.metrics
    if name == f"{m.name}_message_uq":
        return True
    if name not in {c.name for c in m.constraints if isinstance(c, PrimaryKeyConstraint)}:
        return False
    values = row.iloc[0]
    found = conn.execute(
        select(func.count()).where(*(m.c[k] == _plain(values[k]) for k in MESSAGE_KEY))
    ).scalar_one()
    return bool(found)


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value a driver binds."""
    return value.item() if hasattr(value, "item") else value


def _to_sql(conn: Connection, table: Any, frame: pd.DataFrame) -> None:
    """Append ``frame`` to ``table`` with ``DataFrame.to_sql``: its ``method`` is one COPY on PostgreSQL,
    batched INSERTs elsewhere.

    On PostgreSQL the COPY is binary (:mod:`etl.pgcopy`) when every column has an exact binary form
    for its column of ``table``, and text otherwise. ``to_sql`` converts every column to Python
    objects before it calls the method, which the COPY methods do not use (they encode
    ``pd_table.frame`` column by column); the dear part is a ``datetime`` per timestamp, so the time
    columns go in already in the form the method writes: microseconds for binary
    (:func:`etl.pgcopy.times_as_micros`), COPY text for text (:func:`_times_as_text`). Elsewhere the
    frame goes in as it is.
    """
    from functools import partial

    from etl import pgcopy

    method: Any = None
    if conn.dialect.name == "postgresql":
        types = [table.c[str(name)].type for name in frame.columns]
        if pgcopy.encoder(frame, types) is not None:
            frame, method = pgcopy.times_as_micros(frame), partial(_binary_copy_method, table)
        else:
            frame, method = _times_as_text(frame), _copy_method
    frame.to_sql(
        table.name,
        conn,
        schema=table.schema,
        if_exists="append",
        index=False,
        method=method,
        chunksize=None if method else 5000,
    )


def _times_as_text(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with each datetime column as its COPY text (None where missing), other columns as they are.

    The text is what :func:`copy_text` writes for the datetime column, and COPY reads it into the same
    ``timestamp`` or ``timestamptz`` value.
    """
    import numpy as np
    import pandas as pd

    times = [i for i, dtype in enumerate(frame.dtypes) if pd.api.types.is_datetime64_any_dtype(dtype)]
    if not times:
        return frame
    out = frame.copy(deep=False)
    for i in times:
        texts, missing = _time_texts(frame.iloc[:, i])
        values = np.array(texts, dtype=object)
        values[missing] = None
        out.isetitem(i, pd.Series(values, index=frame.index, dtype=object, copy=False))
    return out


def _copy_method(pd_table: Any, conn: Connection, keys: list[str], data_iter: Any) -> int:
    """``to_sql`` method: the whole frame in one ``COPY ... FROM STDIN`` (text format)."""
    return _copy_frame(conn, pd_table.table, pd_table.frame[list(keys)])


def _binary_copy_method(table: Any, pd_table: Any, conn: Connection, keys: list[str], data_iter: Any) -> int:
    """``to_sql`` method: the whole frame in one ``COPY ... FROM STDIN (FORMAT binary)``, each column
    encoded for its column of ``table``."""
    from etl import pgcopy

    frame = pd_table.frame[list(keys)]
    pieces = pgcopy.stream(frame, [table.c[key].type for key in keys])
    if pieces is None:  # _to_sql checked the frame; only a changed frame can get here
        raise ValueError(f"the frame has no binary COPY form for {table.name}")
    return _copy(conn, table, list(keys), _CopyStream(pieces), " (FORMAT binary)")


def _copy(conn: Connection, table: Any, columns: list[str], stream: Any, options: str = "") -> int:
    preparer = conn.dialect.identifier_preparer
    target = preparer.format_table(table)
    names = ", ".join(preparer.quote(c) for c in columns)
    dbapi = conn.connection.driver_connection
    with dbapi.cursor() as cur:  # type: ignore[union-attr]
        cur.copy_expert(f"COPY {target} ({names}) FROM STDIN{options}", stream)
        return int(cur.rowcount)


def _copy_frame(conn: Connection, table: Any, frame: pd.DataFrame) -> int:
    """``COPY table (columns) FROM STDIN`` in text format, the frame serialised column by column.

    The rows go in slices: the server parses and indexes one slice (on another core) while the next
    is serialised, instead of waiting for the whole text.
    """
    slices = (copy_text(frame.iloc[i : i + 5_000]) for i in range(0, len(frame), 5_000))
    return _copy(conn, table, [str(c) for c in frame.columns], _CopyStream(slices))


class _CopyStream:
    """A file for ``copy_expert`` whose ``read`` hands over the next piece, encoded when asked for."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._pieces = pieces

    def read(self, size: int = -1) -> bytes:
        return next(self._pieces, b"")  # psycopg2 sends whatever comes back; empty ends the COPY


def copy_text(frame: pd.DataFrame) -> bytes:
    """The frame as the body of a ``COPY ... FROM STDIN`` in text format (UTF-8, one line per row).

    Each column is turned into its field texts in one vectorised pass (timestamps by numpy, not one
    ``strftime`` per value), then the rows are joined. In text format a backslash in a value is
    escaped, so ``\\N`` stays NULL and the text ``\\N`` stays text: no value needs a slower path.
    """
    if frame.empty:
        return b""
    fields = [_copy_fields(frame.iloc[:, i]) for i in range(frame.shape[1])]
    return ("\n".join(map("\t".join, zip(*fields, strict=True))) + "\n").encode()


# COPY text format: backslash starts an escape; tab, newline and carriage return are delimiters.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_SEPARATOR = "\x00"  # joins a column's texts to escape them in one pass (PostgreSQL text holds no NUL)


def _copy_fields(series: pd.Series) -> list[str]:
    """One column as COPY text fields, in row order; ``\\N`` for a missing value."""
    import numpy as np
    import pandas as pd

    dtype = series.dtype
    if pd.api.types.is_datetime64_any_dtype(dtype):
        stamps, missing = _time_texts(series)
        for i in np.flatnonzero(missing).tolist():
            stamps[i] = NULL
        return stamps
    missing = series.isna().to_numpy()
    if pd.api.types.is_bool_dtype(dtype):
        out = np.where(series.to_numpy(dtype=bool, na_value=False), "t", "f").astype(object)
    elif pd.api.types.is_integer_dtype(dtype):
        out = _int_texts(series.to_numpy(dtype=np.int64, na_value=0))
    elif pd.api.types.is_float_dtype(dtype):
        # repr is the shortest text that reads back as the same double; NaN is a missing value
        out = np.array(
            list(map(repr, series.to_numpy(dtype=np.float64, na_value=np.nan).tolist())), dtype=object
        )
    else:
        texts = series.to_numpy(dtype=object).tolist()
        if missing.any():
            texts = ["" if m else v for v, m in zip(texts, missing.tolist(), strict=True)]
        if set(map(type, texts)) - {str}:
            texts = [v if type(v) is str else str(v) for v in texts]
        out = np.array(_escaped(texts), dtype=object)
    out[missing] = NULL
    return out.tolist()


def _time_texts(series: pd.Series) -> tuple[list[str], np.ndarray]:
    """A datetime column as ISO texts to the microsecond, UTC (``Z``) when the column has a zone, naive
    otherwise; and where it is missing (NaT, whose text is left as numpy writes it)."""
    import numpy as np
    import pandas as pd

    values = series.to_numpy(dtype="datetime64[us]")  # UTC when the column has a zone
    zone = "UTC" if isinstance(series.dtype, pd.DatetimeTZDtype) else "naive"
    return np.datetime_as_string(values, unit="us", timezone=zone).tolist(), np.isnat(values)


def _int_texts(values: np.ndarray) -> np.ndarray:
    """int64 values as decimal texts (an object array). A column of few distinct values (a status
    code, a partition) looks each value up in the texts of its range instead of formatting each one."""
    import numpy as np

    if len(values):
        low, high = int(values.min()), int(values.max())
        if high - low < len(values) // 2:
            return np.array(list(map(str, range(low, high + 1))), dtype=object)[values - low]
    return np.array(list(map(str, values.tolist())), dtype=object)


def _escaped(texts: list[str]) -> list[str]:
    """Texts with COPY's escapes: the column is scanned once, and escaped in one pass when it needs it."""
    whole = _SEPARATOR.join(texts)
    if "\\" not in whole and "\t" not in whole and "\n" not in whole and "\r" not in whole:
        return texts
    if whole.count(_SEPARATOR) != len(texts) - 1:  # a value holds the separator: escape one by one
        return [v.translate(_COPY_ESCAPES) for v in texts]
    escaped = whole.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return escaped.split(_SEPARATOR)


def _refused_row(frame: pd.DataFrame, source: pd.DataFrame | None, exc: BaseException) -> dict[str, Any]:
    row = frame.iloc[0]
    orig = dbapi_error(exc)
    diag = getattr(orig, "diag", None)
    column = getattr(diag, "column_name", None) if diag is not None else None
    reject: dict[str, Any] = {
        "topic": row["topic"],
        "partition": int(row["partition"]),
        "offset": int(row["offset"]),
        "incarnation": int(row["incarnation"]),
        "kafka_timestamp": row["kafka_timestamp"],
        "stage": "database",
        "errors": [
            {
                "field": column,
                "rule": f"database:{sqlstate(exc) or 'error'}",
                "value": first_line(str(orig))[:200],
            }
        ],
    }
    if source is not None and frame.index[0] in source.index:
        src = source.loc[frame.index[0]]
        for key in ("key", "headers", "payload", "payload_text"):
            reject[key] = src.get(key)
    return reject


# Each row's values as SQL, read from ``r``, one element of the JSON array: text with ->>, the JSONB
# columns with -> (a JSON null stays a JSON null, as it was when bound as JSON), bytes from base64.
_REJECT_VALUES = (
    "r ->> 0",
    "CAST(r ->> 1 AS integer)",
    "CAST(r ->> 2 AS bigint)",
    "decode(r ->> 3, 'base64')",
    "r -> 4",
    "CAST(r ->> 5 AS timestamp with time zone)",
    "decode(r ->> 6, 'base64')",
    "r ->> 7",
    "r ->> 8",
    "r -> 9",
    "r ->> 10",
    "CAST(r ->> 11 AS integer)",
)
_REJECTS_PAGE_BYTES = 1 << 20  # JSON text per statement: a few statements a cycle, little memory held


def insert_rejects(
    conn: Connection, tables: schema.Tables, rejects: list[dict[str, Any]], run_id: str
) -> None:
    """Insert the rejects: on PostgreSQL one binary COPY, else (or when the COPY is refused) in a few
    statements, each row one JSON array and a page of rows one parameter.

    The COPY runs under a savepoint. A message already in the rejects table (a replayed backlog)
    makes it fail on the table's unique key; the rows then go by ``INSERT ... SELECT`` over
    ``jsonb_array_elements`` of each page, ``ON CONFLICT DO NOTHING``, so such a message stays there
    once. That path takes a page in one round trip (an executemany would take one per row).
    """
    if conn.dialect.name == "postgresql" and _copy_rejects(conn, tables, rejects, run_id):
        return
    _insert_reject_pages(conn, tables, rejects, run_id)


def _copy_rejects(
    conn: Connection, tables: schema.Tables, rejects: list[dict[str, Any]], run_id: str
) -> bool:
    """The rejects by one binary COPY under a savepoint; False (nothing written) when the database
    refuses a row, a message already there included, or a value has no binary form.

    About twice as fast on the server as the JSON pages, which it parses and takes apart row by row.
    """
    from etl import pgcopy

    frame = _rejects_frame(rejects, run_id)
    columns = [str(c) for c in frame.columns]
    pieces = pgcopy.stream(frame, [tables.rejects.c[c].type for c in columns])
    if pieces is None:
        return False
    savepoint = conn.begin_nested()
    try:
        _copy(conn, tables.rejects, columns, _CopyStream(pieces), " (FORMAT binary)")
    except Exception as exc:
        savepoint.rollback()
        if is_data_error(exc) or isinstance(exc, TypeError):  # TypeError: a key or payload not bytes
            return False
        raise
    savepoint.commit()
    return True


def _rejects_frame(rejects: list[dict[str, Any]], run_id: str) -> pd.DataFrame:
    """The rejects as a frame for :func:`_copy_rejects`, with the values :func:`_reject_rows` writes:
    ``errors`` and ``headers`` as JSON text (no headers: JSON null) with NUL spelt out (JSONB cannot
    hold it), and ``payload_text`` None where it holds a NUL (the payload keeps the bytes)."""
    import numpy as np
    import orjson
    import pandas as pd

    from etl.normalise import _objects as objects  # an object column holding the values as they are

    dumps, option = orjson.dumps, orjson.OPT_NON_STR_KEYS
    errors, headers, texts = [], [], []
    for r in rejects:
        data = dumps(list(r["errors"]), option=option)
        if b"\\u0000" in data:
            data = dumps(_scrub(list(r["errors"])), option=option)
        errors.append(data.decode())
        h = r.get("headers")
        if h is None:
            h = "null"  # JSON null, as the JSON pages store it
        else:
            if not isinstance(h, str):
                h = dumps(h, option=option).decode()
            if "\\u0000" in h:
                h = dumps(_scrub(orjson.loads(h)), option=option).decode()
        headers.append(h)
        text = r.get("payload_text")
        texts.append(None if text is not None and "\x00" in text else text)

    return pd.DataFrame(
        {
            "topic": objects([r["topic"] for r in rejects]),
            "partition": np.array([r["partition"] for r in rejects], dtype=np.int64),
            "offset": np.array([r["offset"] for r in rejects], dtype=np.int64),
            "key": objects([r.get("key") for r in rejects]),
            "headers": objects(headers),
            "kafka_timestamp": _utc_micros([r.get("kafka_timestamp") for r in rejects]),
            "payload": objects([r.get("payload") for r in rejects]),
            "payload_text": objects(texts),
            "stage": objects([r["stage"] for r in rejects]),
            "errors": objects(errors),
            "run_id": objects([run_id] * len(rejects)),
            "incarnation": np.array([r.get("incarnation", 0) for r in rejects], dtype=np.int64),
        },
        copy=False,
    )


def _utc_micros(times: list[Any]) -> pd.Series:
    """Times (``datetime``, ``Timestamp``, None or NaT) as int64 microseconds since 1970, NaT's integer
    where missing: the form :mod:`etl.pgcopy` writes for a time column."""
    import numpy as np
    import pandas as pd

    stamps = pd.to_datetime(pd.Series(times, dtype=object), utc=True).dt.as_unit("us")
    return pd.Series(stamps.to_numpy(dtype="datetime64[us]").view(np.int64), copy=False)


def _insert_reject_pages(
    conn: Connection, tables: schema.Tables, rejects: list[dict[str, Any]], run_id: str
) -> None:
    """The rejects by ``INSERT ... SELECT`` over pages of JSON rows, ``ON CONFLICT DO NOTHING``."""
    from sqlalchemy import text

    from etl.contract import REJECT_COLUMNS  # the order of each row's JSON array, then run_id, incarnation

    preparer = conn.dialect.identifier_preparer
    columns = ", ".join(preparer.quote(c) for c in (*REJECT_COLUMNS, "run_id", "incarnation"))
    statement = text(
        f"INSERT INTO {preparer.format_table(tables.rejects)} ({columns}) "
        f"SELECT {', '.join(_REJECT_VALUES)} FROM jsonb_array_elements(CAST(:rows AS jsonb)) AS r "
        "ON CONFLICT DO NOTHING"
    )
    for page in _json_pages(_reject_rows(rejects, run_id), _REJECTS_PAGE_BYTES):
        conn.execute(statement, {"rows": page})


def _json_pages(rows: Iterable[bytes], limit: int) -> Iterator[str]:
    """JSON arrays of the given JSON rows, in order, each at most ``limit`` bytes unless one row is more."""
    page: list[bytes] = []
    size = 1  # the opening bracket; each row brings its comma or the closing bracket
    for row in rows:
        if page and size + len(row) + 1 > limit:
            yield _json_array(page)
            page, size = [], 1
        page.append(row)
        size += len(row) + 1
    if page:
        yield _json_array(page)


def _json_array(rows: list[bytes]) -> str:
    return (b"[" + b",".join(rows) + b"]").decode()


def _reject_rows(rejects: Iterable[dict[str, Any]], run_id: str) -> Iterator[bytes]:
    """Each reject as a JSON array of its values in ``etl.contract.REJECT_COLUMNS`` order, then run_id
    and incarnation (0 when the reject has none)."""
    from binascii import b2a_base64

    import orjson

    dumps, option = orjson.dumps, orjson.OPT_NON_STR_KEYS
    for r in rejects:
        headers = r.get("headers")
        if isinstance(headers, str):
            headers = orjson.loads(headers)
        text = r.get("payload_text")
        if text is not None and "\x00" in text:  # PostgreSQL text cannot hold NUL; the raw bytes keep it
            text = None
        key, payload = r.get("key"), r.get("payload")
        when = _py_time(r.get("kafka_timestamp"))
        # orjson writes a UTC time as isoformat does; another zone goes as isoformat's text, which keeps
        # the seconds of an offset (orjson drops them)
        stamp = when if when is None or when.tzinfo is UTC else when.isoformat()
        row = [
            r["topic"],
            int(r["partition"]),
            int(r["offset"]),
            None if key is None else b2a_base64(key, newline=False).decode(),
            headers,
            stamp,
            None if payload is None else b2a_base64(payload, newline=False).decode(),
            text,
            r["stage"],
            list(r["errors"]),
            run_id,
            int(r.get("incarnation", 0)),
        ]
        data = dumps(row, option=option)
        if b"\\u0000" in data:  # a NUL somewhere (the check also matches a spelt-out one: harmless)
            row[4], row[9] = _scrub(headers), _scrub(row[9])
            data = dumps(row, option=option)
        yield data


def _scrub(value: Any) -> Any:
    """JSONB cannot hold NUL characters: spell them out."""
    if isinstance(value, str):
        return value.replace("\x00", "\\u0000")
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    if isinstance(value, tuple):
        return [_scrub(v) for v in value]
    if isinstance(value, dict):
        return {_scrub(k): _scrub(v) for k, v in value.items()}
    return value


def _py_time(value: Any) -> datetime | None:
    """A timestamp as a ``datetime``; None when missing or not a time."""
    if value is None or type(value) is datetime:
        return value
    import pandas as pd

    if type(value) is pd.Timestamp:  # the usual case, a column value (NaT is not a Timestamp)
        return value.to_pydatetime()
    try:
        if pd.isna(value):
            return None
        return pd.Timestamp(value).to_pydatetime()
    except (TypeError, ValueError):
        return None
