"""``metric-etl rollups rebuild|check``: the rollups recomputed from, or compared with, the raw checks
(etl.db.rollups), each in one transaction of its own."""

from __future__ import annotations

from datetime import datetime

from etl.config import Settings
from etl.db import rollups, schema
from etl.db.store import database


def rebuild(settings: Settings, since: datetime | None, until: datetime | None) -> rollups.RebuildResult:
    """Recompute the rollups from ``since`` to ``until`` (whole hours and days; all when None)."""
    tables = schema.tables_for(settings)
    with database(settings, "rollups rebuild") as engine:
        with engine.begin() as conn:
            schema.ensure_tables(conn, tables)
        with rollups.snapshot(engine) as conn:
            return rollups.rebuild(conn, tables, since, until)


def check(settings: Settings, since: datetime | None, until: datetime | None) -> rollups.CheckResult:
    """Compare the rollups from ``since`` to ``until`` with the raw checks; changes nothing."""
    tables = schema.tables_for(settings)
    with database(settings, "rollups check") as engine, engine.begin() as conn:
        schema.ensure_tables(conn, tables)
        return rollups.check(conn, tables, since, until)
