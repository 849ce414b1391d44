"""The views readers query: uptime per day, latency percentiles per hour, day and week, and the URLs
down now, each read from the rollups (etl.db.rollups), never from the raw checks.

Each view is named after the metrics table: ``website_metrics_uptime_daily``,
``website_metrics_latency_hourly``, ``website_metrics_latency_daily``, ``website_metrics_latency_weekly``
and ``website_metrics_down_now``. Times are UTC; a week starts on Monday.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from etl.db.rollups import function_names

if TYPE_CHECKING:
    from etl.db.tables import Tables

VIEWS: Final = ("uptime_daily", "latency_hourly", "latency_daily", "latency_weekly", "down_now")


def view_name(tables: Tables, view: str) -> str:
    return f"{tables.metrics.name}_{view}"


def _q(tables: Tables, name: str) -> str:
    from etl.db.tables import qualified

    return qualified(tables.schema, name)


def views_ddl(tables: Tables) -> list[str]:
    """``CREATE OR REPLACE VIEW`` statements for :data:`VIEWS` (idempotent)."""
    f = function_names(tables.schema)
    hourly, daily, latest = (_q(tables, t.name) for t in (tables.hourly, tables.daily, tables.latest))

    def pct(hist: str) -> str:
        return ", ".join(f"{f['hist_quantile']}({hist}, {q}) AS p{int(q * 100)}" for q in (0.5, 0.95, 0.99))

    def view(name: str, select: str) -> str:
        return f"CREATE OR REPLACE VIEW {_q(tables, view_name(tables, name))} AS {select}"

    return [
        view(
            "uptime_daily",
            "SELECT url, day, checks, up, errors, up::float8 / NULLIF(checks, 0) AS uptime, "
            f"rt_sum / NULLIF(rt_count, 0) AS rt_avg, rt_min, rt_max, {pct('hist')} FROM {daily}",
        ),
        view(
            "latency_hourly",
            "SELECT url, hour, checks, rt_count, rt_sum / NULLIF(rt_count, 0) AS rt_avg, rt_min, rt_max, "
            f"{pct('hist')} FROM {hourly}",
        ),
        view(
            "latency_daily",
            "SELECT url, day, checks, rt_count, rt_sum / NULLIF(rt_count, 0) AS rt_avg, rt_min, rt_max, "
            f"{pct('hist')} FROM {daily}",
        ),
        view(
            "latency_weekly",
            "SELECT url, week, checks, up, up::float8 / NULLIF(checks, 0) AS uptime, rt_count, "
            f"rt_sum / NULLIF(rt_count, 0) AS rt_avg, rt_min, rt_max, {pct('hist')} FROM ("
            "SELECT url, date_trunc('week', day, 'UTC') AS week, sum(checks) AS checks, sum(up) AS up, "
            "sum(rt_count) AS rt_count, sum(rt_sum) AS rt_sum, min(rt_min) AS rt_min, max(rt_max) AS rt_max, "
            f"{f['hist_sum']}(hist) AS hist FROM {daily} GROUP BY 1, 2) AS w",
        ),
        view(
            "down_now",
            "SELECT url, up_since AS down_since, checked_at AS last_checked_at, status_code, error "
            f"FROM {latest} WHERE NOT up",
        ),
    ]
