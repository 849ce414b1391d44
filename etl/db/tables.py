"""The tables, as SQLAlchemy Core objects: the metrics table (range-partitioned on ``checked_at``), the
rejects, the offsets, the runs, and the rollups readers use (hourly, daily, latest state).

Names come from the settings and are validated there (plain identifiers only); SQLAlchemy quotes
them wherever they are used, so a configured name is never pasted into SQL text. Creating and
upgrading them is :mod:`etl.db.schema`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Double,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

from etl.contract import MESSAGE_KEY, METRICS_KEY

if TYPE_CHECKING:  # type-only: the tables do not depend on config at run time
    from etl.config import Settings


@dataclass(frozen=True)
class Tables:
    """The job's tables in one schema."""

    metadata: MetaData
    metrics: Table
    rejects: Table
    offsets: Table
    runs: Table
    hourly: Table  # the rollups (etl.db.rollups)
    daily: Table
    latest: Table

    @property
    def schema(self) -> str | None:
        return self.metadata.schema


def build_tables(
    schema: str | None = "public",
    *,
    metrics: str = "website_metrics",
    rejects: str = "website_metrics_rejects",
    offsets: str = "etl_offsets",
    runs: str = "etl_runs",
) -> Tables:
    """Table objects for the given (already validated) names."""
    md = MetaData(schema=schema)
    m = Table(
        metrics,
        md,
        Column("url", Text, nullable=False),
        Column("status_code", SmallInteger),
        Column("response_time_ms", Double),
        Column("regex_pattern", Text),
        Column("regex_matched", Boolean),
        Column("checked_at", DateTime(timezone=True), nullable=False),
        Column("error", Text),
        Column("extra", JSONB),
        Column("topic", Text, nullable=False),
        Column("partition", Integer, nullable=False),
        Column("incarnation", Integer, nullable=False, server_default=text("0")),
        Column("offset", BigInteger, nullable=False),
        Column("kafka_timestamp", DateTime(timezone=True)),
        Column("run_id", Text, nullable=False),
        Column("loaded_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        # The idempotency backstop: one row per Kafka message, whatever happens upstream. The message
        # is the key: no surrogate id, so a COPY feeds no sequence and one index fewer.
        PrimaryKeyConstraint(*METRICS_KEY, name=f"{metrics}_pkey"),
        # Range partitions on the check's time (etl.db.partitions): retention drops whole partitions.
        postgresql_partition_by="RANGE (checked_at)",
    )
    Index(f"{metrics}_checked_at_idx", m.c.checked_at)
    r = Table(
        rejects,
        md,
        Column("id", BigInteger, primary_key=True, autoincrement=True),
        Column("topic", Text, nullable=False),
        Column("partition", Integer, nullable=False),
        Column("incarnation", Integer, nullable=False, server_default=text("0")),
        Column("offset", BigInteger, nullable=False),
        Column("key", LargeBinary),
        Column("headers", JSONB),
        Column("kafka_timestamp", DateTime(timezone=True)),
        Column("payload", LargeBinary),
        Column("payload_text", Text),
        Column("stage", Text, nullable=False),
        Column("errors", JSONB, nullable=False),
        Column("run_id", Text, nullable=False),
        Column("rejected_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        Column("status", Text, nullable=False, server_default=text("'new'")),
        Column("status_note", Text),
        Column("status_changed_at", DateTime(timezone=True)),
        CheckConstraint("stage IN ('decode', 'json', 'schema', 'database')", name=f"{rejects}_stage_ck"),
        CheckConstraint("status IN ('new', 'replayed', 'ignored')", name=f"{rejects}_status_ck"),
        UniqueConstraint(*MESSAGE_KEY, name=f"{rejects}_message_uq"),
    )
    Index(f"{rejects}_rejected_at_idx", r.c.rejected_at)
    o = Table(
        offsets,
        md,
        Column("group_id", Text, primary_key=True),
        Column("topic", Text, primary_key=True),
        Column("partition", Integer, primary_key=True),
        Column("next_offset", BigInteger, nullable=False),
        # The partition's incarnation its rows are loaded under, and the topic id (Kafka's UUID,
        # where the broker gives one) the offset belongs to: a recreated topic has a new id.
        Column("incarnation", Integer, nullable=False, server_default=text("0")),
        Column("topic_id", Text),
        Column("run_id", Text),
        Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    )
    u = Table(
        runs,
        md,
        Column("run_id", Text, primary_key=True),
        Column("group_id", Text, nullable=False),
        Column("topic", Text, nullable=False),
        Column("host", Text, nullable=False),
        Column("pid", Integer, nullable=False),
        Column("started_at", DateTime(timezone=True), nullable=False),
        Column("finished_at", DateTime(timezone=True)),
        Column("status", Text, nullable=False),
        Column("stop_reason", Text),
        Column("cycles", Integer, nullable=False, server_default=text("0")),
        Column("read", BigInteger, nullable=False, server_default=text("0")),
        Column("loaded", BigInteger, nullable=False, server_default=text("0")),
        Column("rejected", BigInteger, nullable=False, server_default=text("0")),
        Column("duplicates", BigInteger, nullable=False, server_default=text("0")),
        # Messages deleted upstream (retention, delete-records) before the group read them.
        Column("lost_to_retention", BigInteger, nullable=False, server_default=text("0")),
        Column("start_offsets", JSONB),
        Column("end_offsets", JSONB),
        Column("error", Text),
        # Written when the run starts and with every cycle: a `running` row whose heartbeat is stale,
        # or whose process is gone, was killed (etl.db.runs.close_abandoned); the last heartbeat is the
        # last time it was seen.
        Column("heartbeat_at", DateTime(timezone=True)),
    )
    Index(f"{runs}_started_at_idx", u.c.started_at)
    hourly, daily = (rollup_table(md, metrics, period) for period in ("hour", "day"))
    latest = Table(
        f"{metrics}_latest",
        md,
        Column("url", Text, primary_key=True),
        Column("checked_at", DateTime(timezone=True), nullable=False),  # its newest check
        Column("up", Boolean, nullable=False),
        Column("up_since", DateTime(timezone=True), nullable=False),  # the last change between up and down
        Column("status_code", SmallInteger),
        Column("response_time_ms", Double),
        Column("error", Text),
    )
    Index(f"{metrics}_latest_down_idx", latest.c.up_since, postgresql_where=text("NOT up"))
    return Tables(md, m, r, o, u, hourly, daily, latest)


def rollup_table(md: MetaData, metrics: str, period: str) -> Table:
    """The rollup of the metrics table per URL per ``period`` (hour or day): counts, response-time
    count, sum, min and max, and the response-time histogram (etl.db.rollups)."""
    name = f"{metrics}_{'hourly' if period == 'hour' else 'daily'}"
    return Table(
        name,
        md,
        Column("url", Text, nullable=False),
        Column(period, DateTime(timezone=True), nullable=False),
        Column("checks", BigInteger, nullable=False),
        Column("up", BigInteger, nullable=False),
        Column("errors", BigInteger, nullable=False),
        Column("rt_count", BigInteger, nullable=False),
        Column("rt_sum", Double, nullable=False),
        Column("rt_min", Double),
        Column("rt_max", Double),
        Column("hist", ARRAY(Integer), nullable=False),
        # URL first for a URL's range (the usual question); the time index for every URL's hours and
        # retention's deletes. Time first instead measured no faster to write (3,000 rows a cycle).
        PrimaryKeyConstraint("url", period, name=f"{name}_pkey"),
        Index(f"{name}_{period}_idx", period),
    )


def tables_for(settings: Settings) -> Tables:
    """Tables named by the settings."""
    tables = build_tables(
        settings.db_schema,
        metrics=settings.metrics_table,
        rejects=settings.rejects_table,
        offsets=settings.offsets_table,
        runs=settings.runs_table,
    )
    tables.metrics.info["partition_interval"] = settings.partition_interval
    return tables


def qualified(schema: str | None, name: str) -> str:
    """``schema.name`` as PostgreSQL reads it, each part quoted where it must be (for the SQL text
    the tables' functions, views and partitions are made with)."""
    from sqlalchemy.dialects import postgresql

    quote = postgresql.dialect().identifier_preparer.quote
    return f"{quote(schema)}.{quote(name)}" if schema else quote(name)
