"""``metric-etl report``: each URL's uptime, checks, latency percentiles and last state over a range,
read from the rollups and the latest states (never the raw checks), so it answers in milliseconds
at any table size.

A range under two days is read from the hourly rollups, from the start of the hour ``since`` falls
in; a longer one from the daily rollups, from the start of its day (UTC). Percentiles are read from
the merged histograms (within 4.9%, see :mod:`etl.db.rollups`).
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from etl.config import Settings
from etl.db import rollups, schema
from etl.db.store import database

HOURLY_UNDER: Final = timedelta(days=2)
FIELDS: Final = (
    "url",
    "uptime",
    "checks",
    "up",
    "errors",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "avg_ms",
    "state",
    "since",
)


@dataclass
class UrlReport:
    url: str
    uptime: float | None  # share of checks up, 0-1
    checks: int
    up: int
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    avg_ms: float | None
    state: str | None  # "up" or "down" at its latest check (None: never checked)
    since: str | None  # when it last changed between up and down (ISO)


@dataclass
class Report:
    since: str
    until: str
    source: str  # the rollup read
    urls: list[UrlReport] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(FIELDS)
        for u in self.urls:
            writer.writerow(["" if v is None else v for v in (getattr(u, f) for f in FIELDS)])
        return out.getvalue()

    def to_text(self) -> str:
        head = f"{len(self.urls)} URLs, {self.since} to {self.until} (from {self.source})"
        rows = [("url", "uptime", "checks", "p50", "p95", "p99", "state", "since")]
        for u in self.urls:
            rows.append(
                (
                    u.url,
                    "-" if u.uptime is None else f"{u.uptime * 100:.2f}%",
                    f"{u.checks:,}",
                    _ms(u.p50_ms),
                    _ms(u.p95_ms),
                    _ms(u.p99_ms),
                    u.state or "-",
                    u.since or "-",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [head, ""]
        for r in rows:
            lines.append(
                "  ".join(
                    c.ljust(w) if i in (0, 6, 7) else c.rjust(w)
                    for i, (c, w) in enumerate(zip(r, widths, strict=True))
                ).rstrip()
            )
        return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}ms" if value >= 10 else f"{value:.1f}ms"


def report(
    settings: Settings, since: timedelta, urls: list[str] | None = None, *, now: datetime | None = None
) -> Report:
    """The report over the last ``since`` (see the module's docstring), for ``urls`` or every URL."""
    from sqlalchemy import text

    now = now or datetime.now(UTC)
    tables = schema.tables_for(settings)
    hourly = since < HOURLY_UNDER
    table, column = (tables.hourly, "hour") if hourly else (tables.daily, "day")
    start = now - since
    start = start.replace(minute=0, second=0, microsecond=0)
    if not hourly:
        start = start.replace(hour=0)
    f = rollups.function_names(tables.schema)
    with database(settings, "report") as engine, engine.connect() as conn:
        quote = conn.dialect.identifier_preparer.format_table
        only = "AND r.url = ANY(CAST(:urls AS text[]))" if urls else ""
        rows = conn.execute(
            text(
                "SELECT r.url, r.checks, r.up, r.errors, r.rt_sum / NULLIF(r.rt_count, 0), "
                f"{f['hist_quantile']}(r.hist, 0.5), {f['hist_quantile']}(r.hist, 0.95), "
                f"{f['hist_quantile']}(r.hist, 0.99), l.up, l.up_since FROM ("
                "SELECT url, sum(checks) AS checks, sum(up) AS up, sum(errors) AS errors, "
                f"sum(rt_sum) AS rt_sum, sum(rt_count) AS rt_count, {f['hist_sum']}(hist) AS hist "
                f"FROM {quote(table)} AS r WHERE {column} >= :start {only} GROUP BY url) AS r "
                f"LEFT JOIN {quote(tables.latest)} AS l ON l.url = r.url ORDER BY r.url"
            ),
            {"start": start, "urls": urls or []},
        ).all()
    out = Report(start.isoformat(), now.isoformat(timespec="seconds"), table.name)
    for url, checks, up, errors, avg, p50, p95, p99, is_up, up_since in rows:
        out.urls.append(
            UrlReport(
                url,
                int(up) / int(checks) if checks else None,
                int(checks),
                int(up),
                int(errors),
                p50,
                p95,
                p99,
                avg,
                None if is_up is None else ("up" if is_up else "down"),
                up_since.isoformat() if up_since else None,
            )
        )
    return out
