"""The tables (:mod:`etl.db.tables`) created idempotently, with what readers use beside them
(functions, views, partitions); ``init-db`` and its migrations.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table, bindparam, text
from sqlalchemy.engine import Connection
from sqlalchemy.schema import CreateIndex, CreateSchema, CreateTable

from etl.contract import MESSAGE_KEY, OLD_MESSAGE_KEY
from etl.db.store import database
from etl.db.tables import Tables, build_tables, qualified, tables_for
from etl.errors import ConfigError

if TYPE_CHECKING:  # type-only: the schema stage does not depend on config at run time
    from sqlalchemy.engine import Dialect

    from etl.config import Settings

__all__ = ["Tables", "build_tables", "create_all", "ddl", "ensure_tables", "init_db", "tables_for"]

# Columns added to a table after its first version, each nullable: a run adds them to an existing
# table itself (init-db adds every missing column).
ADDED_COLUMNS = {"runs": ("heartbeat_at",)}


def create_all(conn: Connection, tables: Tables) -> list[str]:
    """Create the schema and tables if missing, and add the columns later versions added (safe to run
    concurrently and repeatedly). Returns the columns added, as ``table.column``."""
    if _all_present(conn, tables):
        return _add_columns(conn, tables)  # the usual case; a role without CREATE privileges runs it
    # Serialise concurrent first runs: CREATE ... IF NOT EXISTS still races on the catalog.
    conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('metric-etl:ddl'))"))
    if tables.schema:
        exists = conn.execute(
            text("SELECT 1 FROM pg_namespace WHERE nspname = :s"), {"s": tables.schema}
        ).first()
        if not exists:
            conn.execute(CreateSchema(tables.schema, if_not_exists=True))
    tables.metadata.create_all(conn, checkfirst=True)
    create_readers(conn, tables)
    return _add_columns(conn, tables)


def create_readers(conn: Connection, tables: Tables) -> None:
    """The rollups' functions, the views and (on a partitioned table) the default partition and
    the partitions from now to :data:`etl.db.partitions.AHEAD`; idempotent."""
    from datetime import UTC, datetime

    from etl.db import partitions, rollups, views

    for statement in (*rollups.functions_ddl(tables.schema), *views.views_ddl(tables)):
        conn.execute(text(statement))
    if partitions.is_partitioned(conn, tables):
        partitions.ensure_default(conn, tables)
        now = datetime.now(UTC)
        partitions.create_range(conn, tables, _interval(tables), now, now + partitions.AHEAD)


def _interval(tables: Tables) -> str:
    return tables.metrics.info.get("partition_interval", "day")


def _add_columns(conn: Connection, tables: Tables) -> list[str]:
    """Add :data:`ADDED_COLUMNS` an existing table lacks (one catalog query when none is missing)."""
    from sqlalchemy import inspect
    from sqlalchemy.schema import CreateColumn

    added: list[str] = []
    for attr, names in ADDED_COLUMNS.items():
        table = getattr(tables, attr)
        have = {c["name"] for c in inspect(conn).get_columns(table.name, schema=tables.schema)}
        missing = [name for name in names if name not in have]
        if not missing:
            continue
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('metric-etl:ddl'))"))
        target = conn.dialect.identifier_preparer.format_table(table)
        for name in missing:
            spec = CreateColumn(table.c[name]).compile(dialect=conn.dialect)
            conn.execute(text(f"ALTER TABLE {target} ADD COLUMN IF NOT EXISTS {spec}"))
            added.append(f"{table.name}.{name}")
    return added


def _all_present(conn: Connection, tables: Tables) -> bool:
    from sqlalchemy import inspect

    names = set(inspect(conn).get_table_names(schema=tables.schema))
    return all(t.name in names for t in tables.metadata.sorted_tables)


def missing_columns(conn: Connection, tables: Tables) -> list[str]:
    """``table.column`` for each column the model has and the database's tables lack (one query)."""
    rows = conn.execute(
        text(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = :s AND table_name IN :names"
        ).bindparams(bindparam("names", expanding=True)),
        {"s": tables.schema or "public", "names": [t.name for t in tables.metadata.sorted_tables]},
    )
    have = {(t, c) for t, c in rows}
    return [
        f"{t.name}.{c.name}"
        for t in tables.metadata.sorted_tables
        for c in t.columns
        if (t.name, c.name) not in have
    ]


def ensure_tables(conn: Connection, tables: Tables) -> None:
    """Create missing tables; ConfigError when existing ones are from an older version."""
    from etl.db.partitions import is_partitioned

    create_all(conn, tables)
    missing = missing_columns(conn, tables)
    if not is_partitioned(conn, tables):
        missing.append(f"{tables.metrics.name}'s partitions")
    if missing:
        raise ConfigError(
            f"the tables in schema {tables.schema} are from an older version of metric-etl "
            f"(they lack {', '.join(missing)})",
            hint="upgrade them once with `metric-etl init-db` (it keeps every row; see the README, Tables)",
        )


@dataclass(frozen=True)
class OldKey:
    """A primary or unique key on :data:`OLD_MESSAGE_KEY` that :func:`swap_key` replaces."""

    table: Table
    name: str
    primary: bool

    @property
    def index(self) -> str:
        """The new key's index while it is built, before it takes the key's name."""
        return f"{self.name}_incarnation"[:63]


def old_keys(conn: Connection, tables: Tables) -> list[OldKey]:
    """The metrics and rejects tables' keys still on :data:`OLD_MESSAGE_KEY`."""
    out = []
    for table in (tables.metrics, tables.rejects):
        keys = conn.execute(
            text(
                "SELECT c.conname, c.contype, array_agg(a.attname::text ORDER BY k.n) "
                "FROM pg_constraint c "
                "CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(attnum, n) "
                "JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum "
                "WHERE c.conrelid = CAST(:t AS regclass) AND c.contype IN ('p', 'u') "
                "GROUP BY c.conname, c.contype"
            ),
            {"t": conn.dialect.identifier_preparer.format_table(table)},
        ).all()
        out += [
            OldKey(table, name, kind == "p") for name, kind, cols in keys if tuple(cols) == OLD_MESSAGE_KEY
        ]
    return out


def build_key_index(conn: Connection, key: OldKey) -> None:
    """Build the new key's unique index with ``CREATE INDEX CONCURRENTLY``: the table stays open to
    reads and writes meanwhile. ``conn`` must be in autocommit. A leftover of an attempt that failed
    (an invalid index) is dropped first; a valid one is kept."""
    quote = conn.dialect.identifier_preparer
    schema = quote.quote(key.table.schema) + "." if key.table.schema else ""
    valid = conn.execute(
        text("SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass(:n)"),
        {"n": f"{schema}{quote.quote(key.index)}"},
    ).scalar()
    if valid:
        return
    if valid is not None:
        conn.execute(text(f"DROP INDEX CONCURRENTLY IF EXISTS {schema}{quote.quote(key.index)}"))
    columns = ", ".join(quote.quote(c) for c in MESSAGE_KEY)
    conn.execute(
        text(
            f"CREATE UNIQUE INDEX CONCURRENTLY {quote.quote(key.index)} "
            f"ON {quote.format_table(key.table)} ({columns})"
        )
    )


def swap_key(conn: Connection, key: OldKey) -> None:
    """Replace the old key by the index :func:`build_key_index` built, under the same name and kind
    (one ALTER TABLE: the table is locked only while the constraint changes, not for an index build)."""
    quote = conn.dialect.identifier_preparer
    kind = "PRIMARY KEY" if key.primary else "UNIQUE"
    conn.execute(
        text(
            f"ALTER TABLE {quote.format_table(key.table)} DROP CONSTRAINT {quote.quote(key.name)}, "
            f"ADD CONSTRAINT {quote.quote(key.name)} {kind} USING INDEX {quote.quote(key.index)}"
        )
    )


def ddl(tables: Tables, dialect: Dialect | None = None) -> str:
    """The DDL as SQL text (for ``init-db --sql``)."""
    from sqlalchemy.dialects import postgresql

    d = dialect or postgresql.dialect()
    parts: list[str] = []
    if tables.schema:
        parts.append(str(CreateSchema(tables.schema, if_not_exists=True).compile(dialect=d)).strip() + ";")
    for table in tables.metadata.sorted_tables:
        parts.append(str(CreateTable(table, if_not_exists=True).compile(dialect=d)).strip() + ";")
        for index in sorted(table.indexes, key=lambda i: i.name or ""):
            parts.append(str(CreateIndex(index, if_not_exists=True).compile(dialect=d)).strip() + ";")
    parts += [statement + ";" for statement in _readers_ddl(tables)]
    return "\n\n".join(parts) + "\n"


def _readers_ddl(tables: Tables) -> list[str]:
    """What :func:`create_readers` makes, as SQL text: functions, views, the default partition and
    the partitions from today to a week ahead."""
    from datetime import UTC, datetime

    from etl.db import partitions, rollups, views

    def name(n: str) -> str:
        return qualified(tables.schema, n)

    parent = name(tables.metrics.name)
    out = [*rollups.functions_ddl(tables.schema), *views.views_ddl(tables)]
    out.append(
        f"CREATE TABLE IF NOT EXISTS {name(partitions.default_name(tables))} PARTITION OF {parent} DEFAULT"
    )
    now = datetime.now(UTC)
    start = partitions.start_of(now, _interval(tables))
    while start <= now + partitions.AHEAD:
        end = partitions.next_start(start, _interval(tables))
        part = name(partitions.partition_name(tables, start))
        out.append(
            f"CREATE TABLE IF NOT EXISTS {part} PARTITION OF {parent} "
            f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
        )
        start = end
    return out


# -- init-db --------------------------------------------------------------------------------------


@dataclass
class InitDbResult:
    schema: str
    created: list[str] = field(default_factory=list)
    altered: list[str] = field(default_factory=list)

    def to_text(self) -> str:
        if not self.created and not self.altered:
            return f"schema {self.schema}: all tables already up to date"
        lines = [f"schema {self.schema}:"]
        lines += [f"  created table {t}" for t in self.created]
        lines += [f"  {a}" for a in self.altered]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def ddl_text(settings: Settings) -> str:
    """The DDL that creates the tables (``init-db --sql``); needs no database."""
    return ddl(tables_for(settings))


def init_db(settings: Settings) -> InitDbResult:
    """Create the schema and missing tables, then add what older tables lack (columns, indexes,
    check and unique constraints) in one transaction; then replace an older message key
    (:func:`old_keys`), its new index built concurrently; then partition an unpartitioned metrics
    table and build its rollups (:mod:`etl.db.upgrade`); then make the partitions from now to a
    week ahead. Idempotent: an upgrade that stopped half-way is finished by the next one."""
    from sqlalchemy import CheckConstraint, UniqueConstraint, inspect, text
    from sqlalchemy.schema import AddConstraint, CreateColumn

    tables = tables_for(settings)
    result = InitDbResult(settings.db_schema)
    with database(settings, "init-db") as engine, engine.begin() as conn:
        conn.execute(text("SET LOCAL lock_timeout = '10s'"))
        before = set(inspect(conn).get_table_names(schema=tables.schema))
        added = create_all(conn, tables)
        result.altered += [f"added column {name}" for name in added]
        result.created = [t.name for t in tables.metadata.sorted_tables if t.name not in before]
        inspector = inspect(conn)
        quote = conn.dialect.identifier_preparer.format_table
        for table in tables.metadata.sorted_tables:
            if table.name not in before:
                continue
            have = {c["name"] for c in inspector.get_columns(table.name, schema=tables.schema)}
            for column in table.columns:
                if column.name in have:
                    continue
                if not column.nullable and column.server_default is None:
                    raise ConfigError(
                        f"table {tables.schema}.{table.name} lacks NOT NULL column {column.name} "
                        "that has no default",
                        hint="add it by hand (see `metric-etl init-db --sql`) after deciding its values",
                    )
                spec = str(CreateColumn(column).compile(dialect=conn.dialect))
                conn.execute(text(f"ALTER TABLE {quote(table)} ADD COLUMN IF NOT EXISTS {spec}"))
                result.altered.append(f"added column {table.name}.{column.name}")
            named = {c["name"] for c in inspector.get_check_constraints(table.name, schema=tables.schema)}
            named |= {c["name"] for c in inspector.get_unique_constraints(table.name, schema=tables.schema)}
            for constraint in table.constraints:
                wanted = isinstance(constraint, CheckConstraint | UniqueConstraint)
                if wanted and constraint.name not in named:
                    conn.execute(AddConstraint(constraint))
                    result.altered.append(f"added constraint {constraint.name}")
            indexes = {i["name"] for i in inspector.get_indexes(table.name, schema=tables.schema)}
            for index in table.indexes:
                if index.name not in indexes:
                    index.create(conn, checkfirst=True)
                    result.altered.append(f"added index {index.name}")
        keys = old_keys(conn, tables)
    # After the columns are committed: the new key takes the incarnation column added above. Its
    # index is built beside the old one while runs go on; then the keys swap in a short transaction.
    for key in keys:
        with database(settings, "init-db") as engine:
            t = time.monotonic()
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                build_key_index(conn, key)
            built = time.monotonic() - t
            t = time.monotonic()
            with engine.begin() as conn:
                conn.execute(text("SET LOCAL lock_timeout = '10s'"))
                swap_key(conn, key)
            result.altered.append(
                f"replaced {key.table.name}'s key {key.name} ({', '.join(OLD_MESSAGE_KEY)}) by "
                f"({', '.join(MESSAGE_KEY)}): index built in {built:.2f}s, beside the old one; "
                f"table locked for {time.monotonic() - t:.2f}s"
            )
    from etl.db.upgrade import partition_table

    result.altered += partition_table(settings, tables)
    with database(settings, "init-db") as engine, engine.begin() as conn:
        conn.execute(text("SET LOCAL lock_timeout = '10s'"))
        create_readers(conn, tables)
    return result
