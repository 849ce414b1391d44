"""A cycle's write: one transaction holding the good rows, the rejects, the offsets and the run row.

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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from etl.contract import MESSAGE_KEY, METRIC_COLUMNS
from etl.db import copy, rollups
from etl.db.offsets import OffsetAdvance, advance_offsets
from etl.db.reject_rows import as_frame, joined, json_pages, reject_rows, rejects_frame
from etl.db.store import dbapi_error, first_line, is_data_error, sqlstate

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    import numpy as np
    import pandas as pd
    from sqlalchemy.engine import Connection

    from etl.config import Settings
    from etl.contract import RawMessage
    from etl.db import schema

log = logging.getLogger(__name__)

RejectsCopy = tuple[list[str], "Iterable[bytes]"]  # the rejects table's columns, its COPY body's pieces


@dataclass
class CycleLoad:
    """What one cycle writes."""

    run_id: str
    good: pd.DataFrame
    rejects: pd.DataFrame  # validation's frame (a list of rejects is taken as one, see as_frame)
    advances: list[OffsetAdvance]
    source: Sequence[RawMessage] | None = None  # the messages good's labels index: refused rows' rejects
    read: int = 0
    duplicates: int = 0
    # False: the run keeps its etl_runs row itself (an atomic run: its long transaction must not
    # hold that row's lock, which its heartbeat and `status` update from outside)
    count_run: bool = True
    made: Made | None = None  # good's rows made ready ahead of the load (see made_ahead)
    copying: Callable[[], object] | None = None  # called as the metrics COPY starts (copy.to_sql)


@dataclass
class Made:
    """A cycle's good rows made ready for the load by :func:`made_ahead`: what the load thread would
    otherwise make while PostgreSQL waits for it."""

    good: pd.DataFrame  # the frame they were made from: used for this very frame only
    frame: pd.DataFrame  # the metrics table's columns (metrics_frame)
    body: list[bytes] | None  # its binary COPY body (copy.body)
    aggregates: rollups.Aggregates  # what it adds to the rollups
    rejects: pd.DataFrame | None = None  # the rejects frame rejects_body was made from
    rejects_body: RejectsCopy | None = None  # their binary COPY (rejects_body)


def made_ahead(
    tables: schema.Tables, good: pd.DataFrame, run_id: str, rejects: pd.DataFrame | None = None
) -> Made:
    """``good`` made ready for the metrics table, its COPY and the rollups, and ``rejects`` for the
    rejects table's COPY (pure, no I/O).

    A run makes it on the thread that reads, while the cycle before loads; the load uses each part
    when it stores exactly that frame (no message of it stored already, no row refused), and
    otherwise makes what it stores itself. The same bytes and the same rollup rows either way.
    """
    frame = metrics_frame(good, run_id)
    made = Made(good, frame, copy.body(frame, tables.metrics), rollups.aggregate(frame))
    if rejects is not None and len(rejects):
        made.rejects, made.rejects_body = rejects, rejects_body(tables, rejects, run_id)
    return made


def metrics_frame(good: pd.DataFrame, run_id: str) -> pd.DataFrame:
    """Validated good rows as the metrics table's columns: with ``run_id``, and incarnation 0 for a
    frame without one."""
    extra: dict[str, Any] = {"run_id": run_id}
    if "incarnation" not in good.columns:
        extra["incarnation"] = 0
    return good.assign(**extra)[list(METRIC_COLUMNS)]


@dataclass
class LoadResult:
    loaded: int = 0
    rejected: int = 0
    refused: list[dict[str, Any]] = field(default_factory=list)  # stage "database" rejects
    already_loaded: int = 0  # messages already in the metrics or the rejects table: duplicates
    rejects: pd.DataFrame | None = None  # the rejects written (None: not known one by one)


def load_cycle(conn: Connection, tables: schema.Tables, settings: Settings, batch: CycleLoad) -> LoadResult:
    """Write one cycle inside the caller's transaction. Raises OffsetConflict to make it roll back."""
    from sqlalchemy import func

    advance_offsets(conn, tables, settings.group_id, settings.topic, batch.run_id, batch.advances)
    result = LoadResult()
    good, rejects = batch.good, as_frame(batch.rejects)
    if len(good) or len(rejects):
        good, rejects, result.already_loaded = without_stored(conn, tables, good, rejects)
    if len(good):
        already: list[int] = []
        made = batch.made if batch.made is not None and batch.made.good is good else None
        result.loaded, result.refused = insert_good(
            conn,
            tables,
            good,
            batch.source,
            batch.run_id,
            already_loaded=already,
            made=made,
            copying=batch.copying,
        )
        result.already_loaded += len(already)
    if result.refused:  # rare: rows the database itself refused
        rejects = joined(rejects, as_frame(result.refused))
    if len(rejects):
        ahead = batch.made
        body = ahead.rejects_body if ahead is not None and ahead.rejects is rejects else None
        insert_rejects(conn, tables, rejects, batch.run_id, body=body)
    result.rejected = len(rejects)
    result.rejects = rejects
    if not batch.count_run:
        return result
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
    conn: Connection, tables: schema.Tables, good: pd.DataFrame, rejects: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame, int]:
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
        if len(rejects):
            kind = values.dtype if values.dtype.kind in "iu" else object
            more = rejects[c].to_numpy() if c in rejects.columns else np.zeros(len(rejects), dtype=np.int64)
            values = np.concatenate([values, more.astype(kind)])
        keys[c] = values
    checked = rollups.as_micros(good["checked_at"]) if len(good) and "checked_at" in good.columns else None
    stored = find_stored(conn, [tables.metrics, tables.rejects], keys, checked_at=checked)
    if not stored.any():
        return good, rejects, 0
    n = len(good)
    return good[~stored[:n]], rejects[~stored[n:]], int(stored.sum())


SPARSE_SLACK = 1_000  # offsets a partition's range may hold beyond twice those asked for, and be read whole


def find_stored(
    conn: Connection, tables: list[Any], keys: dict[str, np.ndarray], *, checked_at: np.ndarray | None = None
) -> np.ndarray:
    """Which of the messages in ``keys`` (an array for each column of :data:`etl.MESSAGE_KEY`,
    message by message) any of ``tables`` holds: a boolean array in the order of ``keys``.

    One query: each partition's range of offsets in the batch, read from each table's key index
    (the other key columns equal to the batch's values), then matched to the batch's keys exactly.
    A partition whose offsets are sparse (rejects picked for a replay, far apart) is asked for those
    offsets alone, not for the whole range between them.

    The one "already loaded?" check: a cycle (:func:`without_stored`), a COPY that met a stored
    message (:func:`insert_good`) and a rejects replay all ask it.

    ``checked_at`` (the checks' times, in microseconds) bounds the look in a table partitioned on it
    to the partitions those times fall in: a year of daily partitions costs no more than one.
    """
    import numpy as np
    import pandas as pd
    from sqlalchemy import and_, or_, select, union_all

    key = list(MESSAGE_KEY)
    n = len(keys["offset"])
    if not n:
        return np.zeros(0, dtype=bool)
    parts, offsets = keys["partition"], keys["offset"]
    bounds: list[tuple[int, int, int, list[int] | None]] = []  # partition, lowest, highest, sparse offsets
    for p in pd.unique(parts).tolist():
        within = offsets[parts == p]
        lo, hi = int(within.min()), int(within.max())
        sparse = hi - lo + 1 > 2 * len(within) + SPARSE_SLACK
        bounds.append((int(p), lo, hi, sorted(set(within.tolist())) if sparse else None))
    equal = {c: pd.unique(keys[c]).tolist() for c in key if c not in ("partition", "offset")}
    queries = []
    for table in tables:
        where = [table.c[c].in_(values) for c, values in equal.items()]
        if checked_at is not None and len(checked_at) and "checked_at" in table.c:
            first, last = (
                datetime.fromtimestamp(int(x) / 1e6, UTC) for x in (checked_at.min(), checked_at.max())
            )
            where.append(table.c["checked_at"].between(first, last))
        where.append(
            or_(
                *(
                    and_(
                        table.c["partition"] == p,
                        table.c["offset"].between(lo, hi) if exact is None else table.c["offset"].in_(exact),
                    )
                    for p, lo, hi, exact in bounds
                )
            )
        )
        queries.append(select(*(table.c[c] for c in key)).where(*where))
    found = set(map(tuple, conn.execute(union_all(*queries) if len(queries) > 1 else queries[0])))
    if not found:
        return np.zeros(n, dtype=bool)  # a first load: nothing in the ranges
    probe = zip(*(keys[c].tolist() for c in key), strict=True)
    return np.fromiter((k in found for k in probe), dtype=bool, count=n)


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


def insert_good(
    conn: Connection,
    tables: schema.Tables,
    good: pd.DataFrame,
    source: Sequence[RawMessage] | None,
    run_id: str,
    *,
    already_loaded: list[int] | None = None,
    made: Made | None = None,
    copying: Callable[[], object] | None = None,
) -> tuple[int, list[dict[str, Any]]]:
    """Load good rows; rows the database refuses come back as stage-``database`` rejects.

    With ``already_loaded`` given, a row whose message is in the metrics table already (its unique
    key) is not a reject: its frame label goes into that list and the row is skipped, so a
    message never lands in both tables. Such rows are found by one lookup of the frame's keys
    when the COPY meets them, not by bisection (one savepoint per split: thousands exhaust
    PostgreSQL's lock table).
    A frame without an ``incarnation`` column is of incarnation 0. ``made``: ``good`` made ready
    ahead (:func:`made_ahead`). ``copying`` is called as the COPY starts.
    """
    frame = made.frame if made is not None else metrics_frame(good, run_id)
    refused: list[dict[str, Any]] = []
    already: list[int] = []
    loaded = _insert_isolating(
        conn, tables, frame, source, refused, already if already_loaded is not None else None, made, copying
    )
    if already_loaded is not None:
        already_loaded.extend(already)
    if loaded and conn.dialect.name == "postgresql":
        # The rollups take exactly the rows this transaction stored.
        if already or refused:
            stored = ~frame.index.isin(already)
            if refused:
                out = {(r["partition"], r["offset"]) for r in refused}
                pairs = zip(frame["partition"].tolist(), frame["offset"].tolist(), strict=True)
                stored &= [pair not in out for pair in pairs]
            frame, made = frame[stored], None
        rollups.upsert(conn, tables, frame, made.aggregates if made is not None else None)
    return loaded, refused


def _insert_isolating(
    conn: Connection,
    tables: schema.Tables,
    frame: pd.DataFrame,
    source: Sequence[RawMessage] | None,
    refused: list[dict[str, Any]],
    already_loaded: list[int] | None = None,
    made: Made | None = None,
    copying: Callable[[], object] | None = None,
) -> int:
    """Insert ``frame`` under a savepoint; on a data error split it in halves until the bad rows are alone."""
    savepoint = conn.begin_nested()
    try:
        copy.to_sql(conn, tables.metrics, frame, made.body if made is not None else None, copying=copying)
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
            stored = find_stored(
                conn, [tables.metrics], keys, checked_at=rollups.as_micros(frame["checked_at"])
            )
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
    if sqlstate(exc) != "23505":
        return False
    diag = getattr(dbapi_error(exc), "diag", None)
    m = tables.metrics
    if getattr(diag, "constraint_name", None) == f"{m.name}_message_uq":
        return True
    # A partition's key index names the violation after the partition: look the message up.
    return bool(find_stored(conn, [m], {k: row[k].to_numpy() for k in MESSAGE_KEY}).any())


def _refused_row(
    frame: pd.DataFrame, source: Sequence[RawMessage] | None, exc: BaseException
) -> dict[str, Any]:
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
    from etl.normalise import headers_json

    label = frame.index[0]
    if source is not None and 0 <= label < len(source):
        message = source[label]
        reject["key"] = message.key
        reject["headers"] = headers_json(message.headers) if message.headers else None
        reject["payload"] = payload = message.value
        # A good row's payload parsed as JSON, so it is UTF-8 text (normalise's payload_text).
        reject["payload_text"] = payload.decode() if isinstance(payload, bytes) else None
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
REJECTS_PAGE_BYTES = 1 << 20  # JSON text per statement: a few statements a cycle, little memory held


def insert_rejects(
    conn: Connection,
    tables: schema.Tables,
    rejects: pd.DataFrame | list[dict[str, Any]],
    run_id: str,
    *,
    body: RejectsCopy | None = None,
) -> None:
    """Insert the rejects: on PostgreSQL one binary COPY, else (or when the COPY is refused) in a few
    statements, each row one JSON array and a page of rows one parameter.

    The COPY runs under a savepoint. A message already in the rejects table (a replayed backlog)
    makes it fail on the table's unique key; the rows then go by ``INSERT ... SELECT`` over
    ``jsonb_array_elements`` of each page, ``ON CONFLICT DO NOTHING``, so such a message stays there
    once. That path takes a page in one round trip (an executemany would take one per row).
    ``body``: the COPY body of exactly ``rejects``, made ahead (:func:`rejects_body`).
    """
    frame = as_frame(rejects)
    if conn.dialect.name == "postgresql" and copy_rejects(conn, tables, frame, run_id, body=body):
        return
    insert_reject_pages(conn, tables, frame, run_id)


def rejects_copy(tables: schema.Tables, rejects: pd.DataFrame, run_id: str) -> RejectsCopy | None:
    """The columns and the binary COPY body (encoded as it is read) that :func:`copy_rejects` sends
    for ``rejects``; None when a value has no binary form."""
    frame = rejects_frame(rejects, run_id)
    columns = [str(c) for c in frame.columns]
    pieces = copy.stream(frame, [tables.rejects.c[c].type for c in columns])
    return None if pieces is None else (columns, pieces)


def rejects_body(tables: schema.Tables, rejects: pd.DataFrame, run_id: str) -> RejectsCopy | None:
    """:func:`rejects_copy` with the body encoded now, ahead of the load (pure); None also for a key
    or payload that is not bytes (the load then writes those rejects its own way)."""
    made = rejects_copy(tables, rejects, run_id)
    try:
        return None if made is None else (made[0], list(made[1]))
    except TypeError:
        return None


def copy_rejects(
    conn: Connection,
    tables: schema.Tables,
    rejects: pd.DataFrame,
    run_id: str,
    *,
    body: RejectsCopy | None = None,
) -> bool:
    """The rejects by one binary COPY under a savepoint; False (nothing written) when the database
    refuses a row, a message already there included, or a value has no binary form. ``body``: its
    COPY made ahead (:func:`rejects_body`).

    About twice as fast on the server as the JSON pages, which it parses and takes apart row by row.
    """
    made = body if body is not None else rejects_copy(tables, rejects, run_id)
    if made is None:
        return False
    columns, pieces = made
    savepoint = conn.begin_nested()
    try:
        copy.run_copy(conn, tables.rejects, columns, copy.CopyStream(iter(pieces)), " (FORMAT binary)")
    except Exception as exc:
        savepoint.rollback()
        if is_data_error(exc) or isinstance(exc, TypeError):  # TypeError: a key or payload not bytes
            return False
        raise
    savepoint.commit()
    return True


def insert_reject_pages(
    conn: Connection, tables: schema.Tables, rejects: pd.DataFrame | list[dict[str, Any]], run_id: str
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
    rows = as_frame(rejects).to_dict("records")
    for page in json_pages(reject_rows(rows, run_id), REJECTS_PAGE_BYTES):
        conn.execute(statement, {"rows": page})
