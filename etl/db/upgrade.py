"""``init-db``'s upgrade of an unpartitioned metrics table (made by 2ad411b and before) into the
partitioned layout, keeping every row, and the rollups built from the rows already there.

No row is copied: the old table becomes the new table's first partition, ``<metrics>_legacy``, from
the beginning of time to a cut-over a few days ahead; new partitions follow it. Everything slow is
done while loads go on: the partition key's unique index is built concurrently, and a ``CHECK`` on the
range is validated under a lock that lets rows in, so the attach need not scan the table. Loads wait
only for one short transaction (rename, create, attach), whose time ``init-db`` prints. Retention
drops the legacy partition whole once its newest check is past the horizon.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from etl.contract import METRICS_KEY
from etl.db import partitions, rollups
from etl.db.store import database
from etl.errors import ConfigError

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from etl.config import Settings
    from etl.db.tables import Tables

LOCK_TIMEOUT = "10s"


def legacy_name(tables: Tables) -> str:
    return f"{tables.metrics.name}_legacy"


def needs_partitioning(conn: Connection, tables: Tables) -> bool:
    """The metrics table exists and is a plain table."""
    from sqlalchemy import text

    kind = conn.execute(
        text("SELECT relkind FROM pg_class WHERE oid = to_regclass(:t)"),
        {"t": conn.dialect.identifier_preparer.format_table(tables.metrics)},
    ).scalar()
    return kind == "r"


def _extra_columns(conn: Connection, tables: Tables, name: str) -> list[str]:
    """Columns of table ``name`` (in the tables' schema) that the metrics table does not have."""
    from sqlalchemy import text

    have = conn.execute(
        text(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = :s AND table_name = :t "
            "ORDER BY ordinal_position"
        ),
        {"s": tables.schema or "public", "t": name},
    ).scalars()
    return [c for c in have if c not in tables.metrics.c]


def partition_table(settings: Settings, tables: Tables) -> list[str]:
    """Turn the plain metrics table into the partitioned one, then build the rollups from its rows;
    what was done, as lines for ``init-db``'s report. Idempotent: a run that stopped half-way is
    finished by the next."""
    from sqlalchemy import text

    quote_name = None
    done: list[str] = []
    with database(settings, "init-db") as engine:
        with engine.connect() as conn:
            if not needs_partitioning(conn, tables):
                return done
            quote_name = conn.dialect.identifier_preparer
            old = quote_name.format_table(tables.metrics)
            newest = conn.execute(text(f"SELECT max(checked_at) FROM {old}")).scalar()
        interval = settings.partition_interval
        now = datetime.now(UTC)
        # Past any check a load may bring meanwhile (validation takes them up to a day ahead).
        cutover = partitions.next_start(
            partitions.start_of(max(now + timedelta(days=2), newest or now), interval), interval
        )
        key = f"{tables.metrics.name}_legacy_key"
        check = f"{tables.metrics.name}_legacy_range"
        t = time.monotonic()
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f"SET lock_timeout = '{LOCK_TIMEOUT}'"))
            conn.execute(
                text(
                    f"CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS {quote_name.quote(key)} ON {old} "
                    f"({', '.join(quote_name.quote(c) for c in METRICS_KEY)})"
                )
            )
            has_check = conn.execute(
                text("SELECT 1 FROM pg_constraint WHERE conrelid = to_regclass(:t) AND conname = :c"),
                {"t": old, "c": check},
            ).first()
            if not has_check:
                conn.execute(
                    text(
                        f"ALTER TABLE {old} ADD CONSTRAINT {quote_name.quote(check)} "
                        f"CHECK (checked_at < '{cutover.isoformat()}') NOT VALID"
                    )
                )
            conn.execute(text(f"ALTER TABLE {old} VALIDATE CONSTRAINT {quote_name.quote(check)}"))
        done.append(
            f"built {tables.metrics.name}'s partition key index and range check in "
            f"{time.monotonic() - t:.2f}s, beside running loads"
        )
        t = time.monotonic()
        with engine.begin() as conn:
            conn.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
            conn.execute(text(f"LOCK TABLE {old} IN ACCESS EXCLUSIVE MODE"))
            bound = conn.execute(
                text(
                    "SELECT substring(pg_get_constraintdef(oid) from '''([^'']+)''') FROM pg_constraint "
                    "WHERE conrelid = to_regclass(:t) AND conname = :c"
                ),
                {"t": old, "c": check},
            ).scalar_one()
            legacy = legacy_name(tables)
            pkey = str(tables.metrics.primary_key.name)
            conn.execute(text(f"ALTER TABLE {old} RENAME TO {quote_name.quote(legacy)}"))
            legacy_q = (quote_name.quote(tables.schema) + "." if tables.schema else "") + quote_name.quote(
                legacy
            )
            conn.execute(text(f"ALTER TABLE {legacy_q} DROP CONSTRAINT IF EXISTS {quote_name.quote(pkey)}"))
            extra = _extra_columns(conn, tables, legacy)
            if extra == ["id"]:  # the bigserial surrogate of the oldest tables: the message is the key
                conn.execute(text(f"ALTER TABLE {legacy_q} DROP COLUMN id"))
                done.append(
                    f"dropped {tables.metrics.name}'s surrogate column id (each row's message is its key)"
                )
            elif extra:
                raise ConfigError(
                    f"table {tables.schema}.{tables.metrics.name} has columns metric-etl does not know "
                    f"({', '.join(extra)}); it cannot become a partition of the new table",
                    hint="drop or move them by hand, then run `metric-etl init-db` again",
                )
            index = f"{tables.metrics.name}_checked_at_idx"
            schema_q = quote_name.quote(tables.schema) + "." if tables.schema else ""
            conn.execute(
                text(
                    f"ALTER INDEX IF EXISTS {schema_q}{quote_name.quote(index)} "
                    f"RENAME TO {quote_name.quote(f'{tables.metrics.name}_legacy_checked_at_idx')}"
                )
            )
            tables.metrics.create(conn)
            conn_bound = conn.execute(text("SELECT CAST(:b AS timestamptz)"), {"b": bound}).scalar_one()
            conn.execute(
                text(f"ALTER TABLE {old} ATTACH PARTITION {legacy_q} FOR VALUES FROM (MINVALUE) TO (:hi)"),
                {"hi": conn_bound},
            )
            conn.execute(text(f"ALTER TABLE {legacy_q} DROP CONSTRAINT {quote_name.quote(check)}"))
            partitions.ensure_default(conn, tables)
            partitions.create_range(conn, tables, interval, conn_bound, now + partitions.AHEAD)
        done.append(
            f"partitioned {tables.metrics.name} by checked_at ({interval}): its rows are partition {legacy} "
            f"(up to {conn_bound:%Y-%m-%d %H:%M}Z); loads waited for {time.monotonic() - t:.2f}s"
        )
        with rollups.snapshot(engine) as conn:
            built = rollups.rebuild(conn, tables)
        done.append(
            f"built the rollups from the rows: {built.hourly} hourly, {built.daily} daily, "
            f"{built.latest} latest states in {built.seconds:.2f}s"
        )
    return done
