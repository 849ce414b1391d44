"""Lag: the messages a consumer group still has to read, per partition (its stored offsets against
the topic's ends). ``status`` reports it, and a run's progress bar and metrics file read it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from etl.db import schema
from etl.db.store import database
from etl.kafka.client import kafka_consumer
from etl.kafka.topics import topic_offsets

if TYPE_CHECKING:
    from etl.config import Settings


@dataclass
class PartitionLag:
    """One partition's lag: the messages between the group's stored offset and the topic's end."""

    partition: int
    stored: int | None  # next offset stored in etl_offsets (None: never loaded)
    end: int | None  # the topic's end offset now (None: Kafka not reachable)
    lag: int | None  # messages still to read

    @staticmethod
    def of(partition: int, stored: int | None, begin: int | None, end: int | None) -> PartitionLag:
        start = stored if stored is not None else begin  # a never-loaded partition starts at its beginning
        if start is not None and begin is not None and begin > start:
            start = begin  # retention deleted the messages before the log start: not lag, lost
        lag = None if end is None or start is None else max(end - start, 0)
        return PartitionLag(partition, stored, end, lag)


def lag_now(settings: Settings, *, timeout_s: float = 5.0) -> dict[int, int]:
    """Messages left to read per partition, right now (stored offsets vs. the topic's end)."""
    from etl.db.offsets import read_offsets

    tables = schema.tables_for(settings)
    with database(settings, "read offsets") as engine, engine.connect() as conn:
        try:
            stored = read_offsets(conn, tables, settings.group_id, settings.topic)
        except Exception as exc:
            if getattr(getattr(exc, "orig", None), "pgcode", None) in ("42P01", "3F000"):
                stored = {}  # no tables yet: nothing loaded, everything is lag
            else:
                raise
    with kafka_consumer(settings, timeout_s=timeout_s) as consumer:
        begins, ends = topic_offsets(consumer, settings.topic)
    out: dict[int, int] = {}
    for p, end in ends.items():
        lag = PartitionLag.of(p, stored.get(p), begins.get(p), end).lag
        out[p] = lag or 0
    return out
