"""The rejects workflow: list, show, export, replay, ignore and purge rejected messages.

A reject keeps the message byte for byte (payload, key, headers, Kafka coordinates) and every rule it
failed. After a rule change or an upstream fix, :func:`replay` runs the stored payloads through the
current :func:`etl.normalise.normalise` and :func:`etl.validate.validate` and loads those that now
pass, in one transaction, with :func:`etl.db.write.insert_good` (the same COPY path as a run). A replayed
reject is marked ``replayed`` and is never selected again, and ``website_metrics`` has one row per
Kafka message (UNIQUE topic, partition, offset), so replaying twice loads nothing twice.
"""

from __future__ import annotations

import base64
import csv
import json
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TextIO

from etl.contract import EXPORT_FIELDS, MESSAGE_KEY
from etl.db import schema
from etl.db.store import database
from etl.errors import EtlError, ExitCode
from etl.ops.rejects_view import escape, iso, preview, reject_text

if TYPE_CHECKING:
    from sqlalchemy import Table
    from sqlalchemy.engine import Connection

    from etl.config import Settings
    from etl.contract import RawMessage

EXPORT_FORMATS = ("jsonl", "csv")


class RejectNotFound(EtlError):
    """Asked for reject ids that are not in the table: nothing was changed."""

    exit_code = ExitCode.USAGE
    hint = "list them with `metric-etl rejects list`"


@dataclass(frozen=True)
class RejectFilter:
    """Which rejects a command acts on; empty fields do not filter. Conditions combine with AND;
    several rules, stages or statuses match any of them."""

    ids: tuple[int, ...] = ()
    since: datetime | None = None  # rejected at or after
    rules: tuple[str, ...] = ()
    stages: tuple[str, ...] = ()
    statuses: tuple[str, ...] = ()
    topic: str | None = None
    limit: int | None = None

    def clauses(self, r: Table) -> list[Any]:
        from sqlalchemy import or_

        out: list[Any] = []
        if self.ids:
            out.append(r.c.id.in_(self.ids))
        if self.since is not None:
            out.append(r.c.rejected_at >= self.since)
        if self.rules:
            out.append(or_(*(r.c.errors.contains([{"rule": rule}]) for rule in self.rules)))
        if self.stages:
            out.append(r.c.stage.in_(self.stages))
        if self.statuses:
            out.append(r.c.status.in_(self.statuses))
        if self.topic:
            out.append(r.c.topic == self.topic)
        return out


# -- one reject -----------------------------------------------------------------------------------


@dataclass
class Reject:
    """One row of the rejects table, with the bytes as bytes."""

    id: int
    topic: str
    partition: int
    offset: int
    key: bytes | None
    headers: list[Any] | None
    kafka_timestamp: datetime | None
    payload: bytes | None
    payload_text: str | None
    stage: str
    errors: list[dict[str, Any]]
    run_id: str
    rejected_at: datetime
    status: str
    status_note: str | None
    status_changed_at: datetime | None
    incarnation: int = 0  # of its partition (see etl.MESSAGE_KEY)

    @classmethod
    def from_row(cls, row: Any) -> Reject:
        values = dict(row)
        for name in ("key", "payload"):
            if values[name] is not None:
                values[name] = bytes(values[name])  # psycopg2 returns bytea as memoryview
        return cls(**{k: values[k] for k in cls.__dataclass_fields__})

    @property
    def rules(self) -> list[str]:
        return list(dict.fromkeys(str(e.get("rule")) for e in self.errors))

    def preview(self, width: int = 40) -> str:
        """The payload in one short, terminal-safe line."""
        return preview(self.payload, width)

    def as_export(self) -> dict[str, Any]:
        """JSON-ready: bytes as base64 (exact), times as ISO-8601 UTC."""
        return {
            "id": self.id,
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "kafka_timestamp": iso(self.kafka_timestamp),
            "key_base64": _b64(self.key),
            "headers": self.headers,
            "payload_base64": _b64(self.payload),
            "payload_text": self.payload_text,
            "stage": self.stage,
            "errors": [_error_value_as_json(e) for e in self.errors],
            "run_id": self.run_id,
            "rejected_at": iso(self.rejected_at),
            "status": self.status,
            "status_note": self.status_note,
            "status_changed_at": iso(self.status_changed_at),
        }

    def to_text(self, *, hex_dump: bool = False) -> str:
        """Everything about the reject, safe to print: control characters are escaped, bytes that
        are not text are shown as a hex dump."""
        return reject_text(self, hex_dump=hex_dump)


# -- reading --------------------------------------------------------------------------------------


def list_rejects(settings: Settings, filt: RejectFilter) -> list[Reject]:
    """Rejects matching ``filt``, newest first."""
    from sqlalchemy import select

    r = schema.tables_for(settings).rejects
    with database(settings, "rejects list") as engine, engine.connect() as conn:
        query = select(r).where(*filt.clauses(r)).order_by(r.c.id.desc())
        if filt.limit:
            query = query.limit(filt.limit)
        return [Reject.from_row(row) for row in conn.execute(query).mappings()]


def get_reject(settings: Settings, reject_id: int) -> Reject:
    """One reject by id; RejectNotFound when there is none."""
    from sqlalchemy import select

    r = schema.tables_for(settings).rejects
    with database(settings, "rejects show") as engine, engine.connect() as conn:
        row = conn.execute(select(r).where(r.c.id == reject_id)).mappings().first()
    if row is None:
        raise RejectNotFound(f"no reject with id {reject_id} in {settings.db_schema}.{r.name}")
    return Reject.from_row(row)


def export_rejects(settings: Settings, filt: RejectFilter, fmt: str, out: TextIO) -> int:
    """Write the matching rejects (oldest first) to ``out`` as JSON lines or CSV; returns how many.

    Payloads and keys are base64 (exact bytes); in CSV, headers and errors are JSON text.
    """
    from sqlalchemy import select

    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}")
    r = schema.tables_for(settings).rejects
    writer = None
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=EXPORT_FIELDS, lineterminator="\n")
        writer.writeheader()
    n = 0
    with database(settings, "rejects export") as engine, engine.connect() as conn:
        query = select(r).where(*filt.clauses(r)).order_by(r.c.id)
        if filt.limit:
            query = query.limit(filt.limit)
        # Stream: an export of a big backlog must not hold it all in memory.
        result = conn.execution_options(stream_results=True, yield_per=1000).execute(query)
        for row in result.mappings():
            record = Reject.from_row(row).as_export()
            if writer is None:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            else:
                for name in ("headers", "errors"):
                    record[name] = (
                        None if record[name] is None else json.dumps(record[name], ensure_ascii=False)
                    )
                writer.writerow(record)
            n += 1
    return n


# -- replay ---------------------------------------------------------------------------------------


@dataclass
class ReplayResult:
    """What a replay did (or, with ``dry_run``, would do)."""

    run_id: str
    dry_run: bool
    selected: int = 0
    loaded: list[int] = field(default_factory=list)  # passed now, loaded, marked replayed
    already_loaded: list[int] = field(default_factory=list)  # the row was in the metrics table already
    still_rejected: list[int] = field(default_factory=list)  # errors updated, status unchanged
    skipped: list[int] = field(default_factory=list)  # asked for by id, but already replayed
    rules: dict[str, int] = field(default_factory=dict)  # rules the still-rejected ones fail

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "dry_run": self.dry_run,
            "selected": self.selected,
            "loaded": len(self.loaded),
            "already_loaded": len(self.already_loaded),
            "still_rejected": len(self.still_rejected),
            "skipped": len(self.skipped),
            "rules": self.rules,
            "ids": {
                "loaded": self.loaded,
                "already_loaded": self.already_loaded,
                "still_rejected": self.still_rejected,
                "skipped": self.skipped,
            },
        }

    def to_text(self) -> str:
        would = "would be " if self.dry_run else ""
        head = f"rejects replay {self.run_id}" + (" (dry run: nothing was changed)" if self.dry_run else "")
        rows = [
            (f"pass now, {would}loaded and marked replayed", self.loaded),
            (f"already in the metrics table, {would}marked replayed", self.already_loaded),
            (f"still rejected, errors {would}updated", self.still_rejected),
        ]
        if self.skipped:
            rows.append(("skipped (already replayed)", self.skipped))
        width = max(len(label) for label, _ in rows)
        lines = [f"{head}: {self.selected} selected"]
        lines += [f"  {label + ':':<{width + 1}} {len(ids):>6}{_ids(ids)}" for label, ids in rows]
        if self.rules:
            top = sorted(self.rules.items(), key=lambda kv: (-kv[1], kv[0]))
            lines.append("  still failing: " + ", ".join(f"{rule} {n}" for rule, n in top[:10]))
        return "\n".join(lines)


def replay(settings: Settings, filt: RejectFilter, *, dry_run: bool = False) -> ReplayResult:
    """Re-validate the selected rejects with the current rules; load those that pass, in one transaction.

    Selects rejects with status ``new`` (``new`` and ``ignored`` when ids are given, or the statuses
    in ``filt``); ``replayed`` ones are never selected again. The selected rows are locked, so two
    replays at once cannot both load a message. With ``dry_run`` everything is done, the database
    included (so a value PostgreSQL refuses shows up), then rolled back.
    """
    from sqlalchemy import select

    tables = schema.tables_for(settings)
    r = tables.rejects
    statuses = tuple(
        s for s in (filt.statuses or (("new", "ignored") if filt.ids else ("new",))) if s != "replayed"
    )
    result = ReplayResult(run_id=f"replay-{uuid.uuid4().hex[:12]}", dry_run=dry_run)
    with database(settings, "rejects replay") as engine, engine.connect() as conn, conn.begin() as trans:
        if filt.ids:
            found = dict(conn.execute(select(r.c.id, r.c.status).where(r.c.id.in_(filt.ids))).all())
            _require(found, filt.ids, settings, r)
            result.skipped = sorted(i for i, s in found.items() if s == "replayed")
        query = _selection(r, filt, statuses)
        rows = [Reject.from_row(row) for row in conn.execute(query).mappings()]
        result.selected = len(rows)
        if rows:
            _replay_rows(conn, tables, rows, result)
        if dry_run:
            trans.rollback()
    return result


def _selection(r: Table, filt: RejectFilter, statuses: tuple[str, ...]) -> Any:
    from sqlalchemy import select

    query = select(r).where(*filt.clauses(r), r.c.status.in_(statuses)).order_by(r.c.id)
    if filt.limit:
        query = query.limit(filt.limit)
    # Lock what we replay: a concurrent replay waits, then sees them replayed and skips them.
    return query.with_for_update(of=r)


def _replay_rows(conn: Connection, tables: schema.Tables, rows: list[Reject], result: ReplayResult) -> None:
    import numpy as np
    from sqlalchemy import bindparam, func

    from etl.db.reject_rows import spell_out_nul
    from etl.db.write import find_stored, insert_good
    from etl.typed import split

    r, m = tables.rejects, tables.metrics
    messages = [_message(row) for row in rows]
    good, bad = split(messages)  # labels are positions: row i is rows[i]

    # Messages whose row is already in the metrics table (loaded by another path): mark, never load.
    keys = [tuple(getattr(row, k) for k in MESSAGE_KEY) for row in rows]
    present = np.zeros(0, dtype=bool)
    for chunk in _chunks(rows, 1000):
        columns = {
            k: np.array([getattr(row, k) for row in chunk], dtype=object if k == "topic" else np.int64)
            for k in MESSAGE_KEY
        }
        present = np.concatenate([present, find_stored(conn, [m], columns)])
    fresh = [label for label in good.index if not present[label]]
    already = [label for label in good.index if present[label]]
    good = good.assign(incarnation=[rows[label].incarnation for label in good.index])

    refused: dict[tuple[Any, ...], dict[str, Any]] = {}
    meanwhile: list[int] = []  # loaded by another path since the look above (a unique violation)
    if fresh:
        _, refused_rows = insert_good(
            conn, tables, good.loc[fresh], messages, result.run_id, already_loaded=meanwhile
        )
        refused = {tuple(x[k] for k in MESSAGE_KEY): x for x in refused_rows}
    loaded_meanwhile = set(meanwhile)

    marked: list[dict[str, Any]] = []
    updated: list[dict[str, Any]] = []
    for label in fresh:
        row = rows[label]
        x = refused.get(keys[label])
        if label in loaded_meanwhile:
            result.already_loaded.append(row.id)
            marked.append({"_id": row.id, "_note": f"already loaded; marked by {result.run_id}"})
        elif x is None:
            result.loaded.append(row.id)
            marked.append({"_id": row.id, "_note": f"loaded by {result.run_id}"})
        else:
            result.still_rejected.append(row.id)
            updated.append({"_id": row.id, "_stage": "database", "_errors": spell_out_nul(x["errors"])})
    for label in already:
        row = rows[label]
        result.already_loaded.append(row.id)
        marked.append({"_id": row.id, "_note": f"already in {m.name}; marked by {result.run_id}"})
    for label, stage, errors in zip(bad.index, bad["stage"], bad["errors"], strict=True):
        row = rows[label]
        result.still_rejected.append(row.id)
        updated.append({"_id": row.id, "_stage": stage, "_errors": spell_out_nul(list(errors))})

    if marked:
        conn.execute(
            r.update()
            .where(r.c.id == bindparam("_id"))
            .values(status="replayed", status_note=bindparam("_note"), status_changed_at=func.now()),
            marked,
        )
    if updated:
        conn.execute(
            r.update()
            .where(r.c.id == bindparam("_id"))
            .values(stage=bindparam("_stage"), errors=bindparam("_errors")),
            updated,
        )
    by_rule: Counter[str] = Counter()
    for item in updated:
        by_rule.update({str(e.get("rule")) for e in item["_errors"]})
    result.rules = dict(by_rule)
    for ids in (result.loaded, result.already_loaded, result.still_rejected):
        ids.sort()


def _message(row: Reject) -> RawMessage:
    """The Kafka message a reject was made from."""
    from etl.contract import RawMessage

    ts = None if row.kafka_timestamp is None else int(row.kafka_timestamp.timestamp() * 1000)
    return RawMessage(row.topic, row.partition, row.offset, ts, row.key, row.payload, _headers(row.headers))


def _headers(stored: list[Any] | None) -> tuple[tuple[str, bytes | None], ...]:
    """Headers as Kafka gave them, from the stored ``[[name, text], [name, b64, "base64"], ...]``."""
    out: list[tuple[str, bytes | None]] = []
    for item in stored or ():
        name, value = item[0], item[1]
        if value is None:
            out.append((name, None))
        elif len(item) > 2 and item[2] == "base64":
            out.append((name, base64.b64decode(value)))
        else:
            out.append((name, str(value).encode()))
    return tuple(out)


# -- ignore and purge -----------------------------------------------------------------------------


@dataclass
class IgnoreResult:
    ignored: list[int]
    skipped: list[int]  # already replayed: they are loaded, ignoring them means nothing
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"ignored": self.ignored, "skipped": self.skipped, "reason": self.reason}

    def to_text(self) -> str:
        text = f"ignored {len(self.ignored)} rejects{_ids(self.ignored)}: {escape(self.reason)}"
        if self.skipped:
            text += f"\nskipped {len(self.skipped)} already replayed{_ids(self.skipped)}"
        return text


def ignore(settings: Settings, ids: Sequence[int], reason: str) -> IgnoreResult:
    """Mark rejects ``ignored`` with a reason (all or none: unknown ids change nothing)."""
    from sqlalchemy import func, select

    if not reason.strip():
        raise ValueError("a reason is required")
    r = schema.tables_for(settings).rejects
    with database(settings, "rejects ignore") as engine, engine.begin() as conn:
        found = dict(conn.execute(select(r.c.id, r.c.status).where(r.c.id.in_(ids)).with_for_update()).all())
        _require(found, ids, settings, r)
        todo = sorted(i for i, s in found.items() if s != "replayed")
        if todo:
            conn.execute(
                r.update()
                .where(r.c.id.in_(todo))
                .values(status="ignored", status_note=reason, status_changed_at=func.now())
            )
    return IgnoreResult(todo, sorted(i for i, s in found.items() if s == "replayed"), reason)


@dataclass
class PurgeResult:
    deleted: int
    cutoff: datetime
    dry_run: bool
    topic: str | None = None  # None: every topic

    def as_dict(self) -> dict[str, Any]:
        return {
            "deleted": self.deleted,
            "cutoff": iso(self.cutoff),
            "dry_run": self.dry_run,
            "topic": self.topic,
        }

    def to_text(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        where = f"topic {escape(self.topic)}" if self.topic is not None else "every topic"
        return f"{verb} {self.deleted} rejects rejected before {iso(self.cutoff)} ({where})"


def purge(
    settings: Settings,
    older_than: timedelta,
    *,
    statuses: Sequence[str] = (),
    topic: str | None = None,
    dry_run: bool = False,
) -> PurgeResult:
    """Delete rejects rejected more than ``older_than`` ago (by the database clock), optionally only
    those with one of ``statuses`` or read from ``topic``."""
    from sqlalchemy import delete, func, select

    if older_than <= timedelta(0):
        raise ValueError("older_than must be positive")
    r = schema.tables_for(settings).rejects
    with database(settings, "rejects purge") as engine, engine.begin() as conn:
        cutoff = conn.execute(select(func.now() - older_than)).scalar_one()
        where = [r.c.rejected_at < cutoff]
        if statuses:
            where.append(r.c.status.in_(statuses))
        if topic is not None:
            where.append(r.c.topic == topic)
        if dry_run:
            n = conn.execute(select(func.count()).select_from(r).where(*where)).scalar_one()
        else:
            n = conn.execute(delete(r).where(*where)).rowcount
    return PurgeResult(int(n), cutoff, dry_run, topic)


def _require(found: dict[int, str], ids: Sequence[int], settings: Settings, r: Table) -> None:
    missing = sorted(set(ids) - set(found))
    if missing:
        raise RejectNotFound(
            f"no reject with id {', '.join(map(str, missing))} in {settings.db_schema}.{r.name}; "
            "nothing was changed"
        )


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for at in range(0, len(items), size):
        yield items[at : at + size]


def _ids(ids: list[int], most: int = 10) -> str:
    if not ids:
        return ""
    shown = ", ".join(map(str, ids[:most]))
    return f"  (ids {shown}{', ...' if len(ids) > most else ''})"


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _error_value_as_json(error: dict[str, Any]) -> dict[str, Any]:
    """An error entry for JSON output: its value is stored as JSON text (``"200"`` with the quotes for
    the string 200), so it is given as the JSON value it spells, not as a string inside a string. A
    value cut short (``…``) or not JSON (NaN) stays the text it is."""
    value = error.get("value")
    if not isinstance(value, str):
        return error
    try:
        parsed = json.loads(value, parse_constant=_not_json)
    except ValueError:
        return error
    if parsed is None:  # JSON null stays "null": a missing value is the one given as null
        return error
    return {**error, "value": parsed}


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
