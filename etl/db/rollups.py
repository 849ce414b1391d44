"""The rollups: per URL per hour and per day, and each URL's latest state, kept by the load itself.

A cycle's good rows are aggregated column-wise (:func:`aggregate`) and added to the rollup rows in the
cycle's own transaction (:func:`upsert`): they commit with the rows, the rejects and the offsets, so a
rollup can never count a message twice or miss one. Late and out-of-order checks land in their own
hour. ``rollups rebuild`` recomputes them from the raw rows (:func:`rebuild`) and ``rollups check``
compares both (:func:`check`).

Latency percentiles come from a histogram with fixed, log-spaced buckets (:data:`EDGES`), stored as an
``int[]`` of counts that merges by addition: over any range of hours or days, p50/p95/p99 are read from
the summed histogram by nearest rank. Bucket ``b`` (1 to ``len(EDGES) - 1``) holds response times in
``[EDGES[b-1], EDGES[b])`` and reads as their geometric midpoint, so a percentile is within
:data:`PERCENTILE_BOUND` (4.9%) of the exact nearest-rank value; below 1 ms it reads 0.5 ms (within
0.5 ms), and from :data:`EDGES`'s last value (60 s) on, that value.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

from etl.contract import UP_SQL, up_mask

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    from sqlalchemy.engine import Connection, Engine

    from etl.db.tables import Tables

RATIO: Final = 1.1
EDGES: Final = tuple(RATIO**k for k in range(int(math.log(60_000) / math.log(RATIO)) + 1))  # 1 ms .. 60 s
BUCKETS: Final = len(EDGES) + 1
PERCENTILE_BOUND: Final = math.sqrt(RATIO) - 1  # relative, from 1 ms to 60 s
HOUR_US: Final = 3_600_000_000
DAY_US: Final = 24 * HOUR_US


def function_names(schema: str | None) -> dict[str, str]:
    """The SQL functions' qualified names in ``schema``."""
    from etl.db.tables import qualified

    return {
        name: qualified(schema, f"metric_etl_{name}")
        for name in ("hist_add", "hist_sum", "hist_of", "hist_quantile", "bucket")
    }


def functions_ddl(schema: str | None) -> list[str]:
    """The functions the rollups and views use, as ``CREATE OR REPLACE`` statements (idempotent)."""
    f = function_names(schema)
    edges = "ARRAY[" + ",".join(repr(e) for e in EDGES) + "]::float8[]"
    n = len(EDGES)
    return [
        # Element-wise sum of two histograms of any lengths (a stored one is cut after its last count).
        # ARRAY(...) of a scan already in ordinality order (no sort): a third cheaper than array_agg.
        f"CREATE OR REPLACE FUNCTION {f['hist_add']}(a int[], b int[]) RETURNS int[] "
        "LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT ARRAY(SELECT COALESCE(x, 0) + COALESCE(y, 0) "
        "FROM unnest(a, b) WITH ORDINALITY AS u(x, y, i) ORDER BY i) $$",
        f"DO $ddl$ BEGIN CREATE AGGREGATE {f['hist_sum']}(int[]) (SFUNC = {f['hist_add']}, STYPE = int[], "
        "INITCOND = '{}'); EXCEPTION WHEN duplicate_function THEN NULL; END $ddl$",
        # A response time's bucket: the number of edges at or below it (numpy's searchsorted, right).
        f"CREATE OR REPLACE FUNCTION {f['bucket']}(ms float8) RETURNS int "
        f"LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT width_bucket(ms, {edges}) $$",
        # The histogram of a list of buckets.
        f"CREATE OR REPLACE FUNCTION {f['hist_of']}(buckets int[]) RETURNS int[] "
        "LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ "
        "SELECT COALESCE(array_agg(COALESCE(c, 0) ORDER BY b), '{}') "
        "FROM generate_series(0, (SELECT max(x) FROM unnest(buckets) x)) AS b "
        "LEFT JOIN (SELECT x, count(*)::int AS c FROM unnest(buckets) x GROUP BY x) AS n ON n.x = b $$",
        # The q-quantile of a histogram, by nearest rank; NULL when it holds nothing.
        f"CREATE OR REPLACE FUNCTION {f['hist_quantile']}(h int[], q float8) RETURNS float8 "
        "LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT CASE WHEN b = 0 THEN 0.5 "
        f"WHEN b >= {n} THEN e[{n}] ELSE sqrt(e[b] * e[b + 1]) END "
        f"FROM (SELECT {edges} AS e) AS edges, (SELECT i::int - 1 AS b, sum(c) OVER (ORDER BY i) AS cum, "
        "sum(c) OVER () AS total FROM unnest(h) WITH ORDINALITY AS u(c, i)) AS s "
        "WHERE total > 0 AND cum >= greatest(ceil(q * total), 1) ORDER BY b LIMIT 1 $$",
    ]


# -- a cycle's aggregates, column-wise ------------------------------------------------------------


@dataclass
class Aggregates:
    """What a cycle adds, per rollup table: its columns as array literals (hourly, daily) or lists."""

    hourly: dict[str, str]
    daily: dict[str, str]
    latest: dict[str, list[Any]]
    flapped: dict[str, list[Any]]  # URLs whose state changed within the cycle: since when, exactly

    def __len__(self) -> int:
        return len(self.latest["url"])


def as_micros(times: pd.Series) -> np.ndarray:
    """A timezone-aware datetime column as integer microseconds since the epoch (UTC)."""
    import pandas as pd

    return pd.DatetimeIndex(times).as_unit("us").asi8


def histograms(group: np.ndarray, groups: int, ms: np.ndarray) -> str:
    """Each group's histogram of ``ms``, cut after its last count, as one ``text[]`` literal of
    ``int[]`` literals (``{"{0,2,1}","{}"}``), built without a Python step per count."""
    import numpy as np

    counts = np.bincount(
        group * BUCKETS + np.searchsorted(EDGES, ms, side="right"), minlength=groups * BUCKETS
    )
    counts = counts.reshape(groups, BUCKETS)
    used = BUCKETS - np.argmax(counts[:, ::-1] > 0, axis=1)
    used[~counts.any(axis=1)] = 0
    values = counts[np.arange(BUCKETS) < used[:, None]]  # the counts kept, group after group
    top = int(values.max(initial=0)) + 1
    followed = np.array([f"{v}," for v in range(top)], dtype=object)  # a count and its comma
    closing = np.array([f'{v}}}","{{' for v in range(top)], dtype=object)  # a group's last count
    # One token per count, and one for each group without counts ("{}"), in the groups' order.
    tokens = np.empty(len(values) + int((used == 0).sum()), dtype=object)
    width = np.maximum(used, 1)
    start = np.cumsum(width) - width
    at = np.repeat(start - (np.cumsum(used) - used), used) + np.arange(len(values))
    tokens[at] = followed[values]
    ends = np.cumsum(used)[used > 0] - 1
    tokens[at[ends]] = closing[values[ends]]
    tokens[start[used == 0]] = '}","{'
    return '{"{' + "".join(tokens.tolist())[: -len(',"{')] + "}"


def _numbers(values: np.ndarray) -> str:
    """A numeric column as an array literal (NaN as ``nan``, which ``float8`` reads as NaN)."""
    return "{" + ",".join(map(str, values.tolist())) + "}"


def _quoted(value: str | None) -> str:
    """One text element of an array literal."""
    if value is None:
        return "NULL"
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _by_period(
    url_code: np.ndarray,
    quoted_urls: np.ndarray,
    at_us: np.ndarray,
    period_us: int,
    up: np.ndarray,
    failed: np.ndarray,
    ms: np.ndarray,
) -> dict[str, str]:
    """The rollup rows of one period (an hour or a day), each column as one array literal."""
    import numpy as np
    import pandas as pd

    start = at_us // period_us * period_us
    group, keys = pd.factorize(url_code.astype(np.int64) * (1 << 40) + start // period_us, sort=True)
    g = len(keys)
    timed = ~np.isnan(ms)
    tg = group[timed]
    lo = np.full(g, np.inf)
    hi = np.full(g, -np.inf)
    np.minimum.at(lo, tg, ms[timed])
    np.maximum.at(hi, tg, ms[timed])
    rt_count = np.bincount(tg, minlength=g)
    some = rt_count > 0
    first = np.zeros(g, dtype=np.int64)
    first[group[::-1]] = np.arange(len(group))[::-1]  # a row of each group, for its url and start
    return {
        "url": "{" + ",".join(quoted_urls[url_code[first]].tolist()) + "}",
        "at": _numbers(start[first] // 1_000_000),
        "checks": _numbers(np.bincount(group, minlength=g)),
        "up": _numbers(np.bincount(group, weights=up, minlength=g).astype(np.int64)),
        "errors": _numbers(np.bincount(group, weights=failed, minlength=g).astype(np.int64)),
        "rt_count": _numbers(rt_count),
        "rt_sum": _numbers(np.bincount(tg, weights=ms[timed], minlength=g)),
        "rt_min": _numbers(np.where(some, lo, np.nan)),  # NaN: the SQL reads it as NULL
        "rt_max": _numbers(np.where(some, hi, np.nan)),
        "hist": histograms(tg, g, ms[timed]),
    }


def aggregate(frame: pd.DataFrame) -> Aggregates:
    """The rollup rows of ``frame`` (good rows as loaded: url, checked_at, status_code,
    response_time_ms, error, regex_matched, partition, offset), column-wise."""
    import numpy as np
    import pandas as pd

    url_code, urls = pd.factorize(frame["url"].to_numpy(dtype=object), sort=True)
    urls = np.asarray(urls, dtype=object)
    at = as_micros(frame["checked_at"])
    up = up_mask(frame["status_code"], frame["error"], frame["regex_matched"])
    failed = frame["error"].notna().to_numpy()
    ms = frame["response_time_ms"].to_numpy(dtype="float64", na_value=np.nan)
    quoted_urls = np.array([_quoted(u) for u in urls.tolist()], dtype=object)
    hourly = _by_period(url_code, quoted_urls, at, HOUR_US, up, failed, ms)
    daily = _by_period(url_code, quoted_urls, at, DAY_US, up, failed, ms)

    # The latest state: each URL's newest check, and where its last run of one state began.
    order = np.lexsort((frame["offset"].to_numpy(), frame["partition"].to_numpy(), at, url_code))
    u, t, s = url_code[order], at[order], up[order]
    n = len(order)
    new_url = np.ones(n, dtype=bool)
    new_url[1:] = u[1:] != u[:-1]
    new_run = new_url.copy()
    new_run[1:] |= s[1:] != s[:-1]
    run_start = np.maximum.accumulate(np.where(new_run, np.arange(n), 0))
    last = np.flatnonzero(np.append(new_url[1:], True))
    url_start = np.maximum.accumulate(np.where(new_url, np.arange(n), 0))
    since = t[run_start[last]]
    flapped = run_start[last] > url_start[last]
    rows = order[last]
    status = frame["status_code"].to_numpy(dtype="float64", na_value=np.nan)[rows]
    latest = {
        "url": urls[u[last]].tolist(),
        "checked_at": (t[last] / 1e6).tolist(),
        "up": s[last].tolist(),
        "up_since": (since / 1e6).tolist(),
        "status_code": [None if math.isnan(x) else int(x) for x in status.tolist()],
        "response_time_ms": [None if math.isnan(x) else x for x in ms[rows].tolist()],
        "error": frame["error"].to_numpy(dtype=object)[rows].tolist(),
    }
    flapped_rows = np.flatnonzero(flapped)
    flaps = {
        "url": [latest["url"][i] for i in flapped_rows],
        "checked_at": [latest["checked_at"][i] for i in flapped_rows],
        "up_since": [latest["up_since"][i] for i in flapped_rows],
    }
    return Aggregates(hourly, daily, latest, flaps)


# -- writing them ---------------------------------------------------------------------------------


def _element(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "NULL"
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, str):
        return _quoted(value)
    return repr(value)


def array_literals(columns: dict[str, list[Any]]) -> dict[str, str]:
    """Each column as one PostgreSQL array literal (``{1,2,NULL}``): a few long strings the server
    parses at C speed, where a list bound as ``ARRAY[...]`` is one expression per element to parse
    and plan (about 4x the upsert's time at 4,000 rows)."""
    return {name: "{" + ",".join(map(_element, values)) + "}" for name, values in columns.items()}


_SUMS = ("checks", "up", "errors", "rt_count", "rt_sum")


def _period_upsert(table: str, key: str, add: str) -> str:
    sums = ", ".join(f"{c} = t.{c} + excluded.{c}" for c in _SUMS)
    return (
        f"INSERT INTO {table} AS t ({key}, url, checks, up, errors, rt_count, rt_sum, rt_min, rt_max, hist) "
        f"SELECT to_timestamp(v.at), v.url, v.checks, v.up, v.errors, v.rt_count, v.rt_sum, "
        "NULLIF(v.rt_min, 'NaN'), NULLIF(v.rt_max, 'NaN'), CAST(v.hist AS int[]) "
        "FROM unnest(CAST(:url AS text[]), CAST(:at AS bigint[]), CAST(:checks AS bigint[]), "
        "CAST(:up AS bigint[]), CAST(:errors AS bigint[]), CAST(:rt_count AS bigint[]), "
        "CAST(:rt_sum AS float8[]), CAST(:rt_min AS float8[]), CAST(:rt_max AS float8[]), "
        "CAST(:hist AS text[])) AS v(url, at, checks, up, errors, rt_count, rt_sum, rt_min, rt_max, hist) "
        f"ORDER BY v.url, v.at ON CONFLICT (url, {key}) DO UPDATE SET {sums}, "
        "rt_min = LEAST(t.rt_min, excluded.rt_min), rt_max = GREATEST(t.rt_max, excluded.rt_max), "
        f"hist = {add}(t.hist, excluded.hist)"
    )


def upsert(conn: Connection, tables: Tables, frame: pd.DataFrame, agg: Aggregates | None = None) -> int:
    """Add ``frame``'s checks (the rows this transaction loaded) to the rollups; returns the URLs touched.
    ``agg``: ``aggregate(frame)``, when it was made ahead.

    Rows are written in key order, so two loads adding to the same rows (two workers) lock them in
    the same order and never deadlock.
    """
    from sqlalchemy import text

    if not len(frame):
        return 0
    if agg is None:
        agg = aggregate(frame)
    quote = conn.dialect.identifier_preparer.format_table
    add = function_names(tables.schema)["hist_add"]
    conn.execute(text(_period_upsert(quote(tables.hourly), "hour", add)), agg.hourly)
    conn.execute(text(_period_upsert(quote(tables.daily), "day", add)), agg.daily)
    latest = quote(tables.latest)
    conn.execute(
        text(
            f"INSERT INTO {latest} AS t "
            "(url, checked_at, up, up_since, status_code, response_time_ms, error) "
            "SELECT v.url, to_timestamp(v.at), v.up, to_timestamp(v.since), v.status, v.ms, v.error "
            "FROM unnest(CAST(:url AS text[]), CAST(:checked_at AS float8[]), CAST(:up AS boolean[]), "
            "CAST(:up_since AS float8[]), CAST(:status_code AS int[]), CAST(:response_time_ms AS float8[]), "
            "CAST(:error AS text[])) AS v(url, at, up, since, status, ms, error) ORDER BY v.url "
            "ON CONFLICT (url) DO UPDATE SET checked_at = excluded.checked_at, up = excluded.up, "
            "up_since = CASE WHEN t.up = excluded.up THEN t.up_since ELSE excluded.up_since END, "
            "status_code = excluded.status_code, response_time_ms = excluded.response_time_ms, "
            "error = excluded.error WHERE excluded.checked_at > t.checked_at"
        ),
        array_literals(agg.latest),
    )
    if agg.flapped["url"]:  # the state changed within the cycle: it holds since its last change here
        conn.execute(
            text(
                f"UPDATE {latest} AS t SET up_since = to_timestamp(v.since) "
                "FROM unnest(CAST(:url AS text[]), CAST(:checked_at AS float8[]), "
                "CAST(:up_since AS float8[])) AS v(url, at, since) "
                "WHERE t.url = v.url AND t.checked_at = to_timestamp(v.at)"
            ),
            array_literals(agg.flapped),
        )
    return len(agg)


# -- from the raw rows ----------------------------------------------------------------------------


def _recomputed(tables: Tables, quote: Any, period: str, bounds: str) -> str:
    """SELECT of the rollup rows of ``period`` (hour or day) from the raw rows within ``bounds``."""
    f = function_names(tables.schema)
    return (
        f"SELECT url, date_trunc('{period}', checked_at, 'UTC') AS at, count(*) AS checks, "
        f"count(*) FILTER (WHERE {UP_SQL}) AS up, count(error) AS errors, "
        "count(response_time_ms) AS rt_count, COALESCE(sum(response_time_ms), 0) AS rt_sum, "
        "min(response_time_ms) AS rt_min, max(response_time_ms) AS rt_max, "
        f"{f['hist_of']}(array_agg({f['bucket']}(response_time_ms)) "
        "FILTER (WHERE response_time_ms IS NOT NULL)) "
        f"AS hist FROM {quote(tables.metrics)} WHERE {bounds} GROUP BY 1, 2"
    )


def _bounds(period: str, since: datetime | None, until: datetime | None) -> tuple[str, dict[str, Any]]:
    """A WHERE over ``checked_at`` for whole periods from ``since`` to ``until``."""
    clauses, params = ["true"], {}
    if since is not None:
        clauses.append(f"checked_at >= date_trunc('{period}', CAST(:since AS timestamptz), 'UTC')")
        params["since"] = since
    if until is not None:
        clauses.append(
            f"checked_at < date_trunc('{period}', CAST(:until AS timestamptz), 'UTC') + interval '1 {period}'"
        )
        params["until"] = until
    return " AND ".join(clauses), params


_LATEST = (
    "WITH last AS (SELECT DISTINCT ON (url) url, checked_at, {up} AS up, status_code, response_time_ms, "
    'error FROM {m} ORDER BY url, checked_at DESC, partition DESC, "offset" DESC), '
    "flip AS (SELECT m.url, max(m.checked_at) AS at FROM {m} AS m JOIN last AS l ON l.url = m.url "
    "WHERE {m_up} IS DISTINCT FROM l.up GROUP BY m.url), "
    "since AS (SELECT m.url, min(m.checked_at) AS at FROM {m} AS m JOIN last AS l ON l.url = m.url "
    "LEFT JOIN flip AS f ON f.url = m.url WHERE m.checked_at > COALESCE(f.at, '-infinity') GROUP BY m.url) "
    "SELECT l.url, l.checked_at, l.up, s.at AS up_since, l.status_code, l.response_time_ms, l.error "
    "FROM last AS l JOIN since AS s ON s.url = l.url"
)


def _latest_sql(tables: Tables, quote: Any) -> str:
    m_up = UP_SQL.replace("status_code", "m.status_code").replace("error", "m.error")
    m_up = m_up.replace("regex_matched", "m.regex_matched")
    return _LATEST.format(up=UP_SQL, m=quote(tables.metrics), m_up=m_up)


@contextmanager
def snapshot(engine: Engine) -> Iterator[Connection]:
    """A transaction on one snapshot (REPEATABLE READ), for a rebuild: its hourly, daily and latest
    rows are computed from the same raw rows. Taken after the rollups' lock, its first statement."""
    with engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn, conn.begin():
        yield conn


def _oldest(conn: Connection, tables: Tables) -> datetime | None:
    """The oldest raw check kept: the start of what a rebuild or check without ``since`` covers
    (rollups of checks retention dropped are kept, and left alone)."""
    from sqlalchemy import func, select

    value: datetime | None = conn.execute(select(func.min(tables.metrics.c.checked_at))).scalar()
    return value


@dataclass
class RebuildResult:
    hourly: int = 0
    daily: int = 0
    latest: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"hourly": self.hourly, "daily": self.daily, "latest": self.latest, "seconds": self.seconds}


def rebuild(
    conn: Connection, tables: Tables, since: datetime | None = None, until: datetime | None = None
) -> RebuildResult:
    """Recompute the rollups of the whole hours and days from ``since`` to ``until`` (from the oldest
    raw check kept, to the newest, when None), and the latest state of every URL the raw rows hold;
    idempotent. Rollups older than the raw checks kept (retention dropped their rows) stay as they
    are. Loads' commits wait meanwhile (the rollup tables are locked), so no cycle is counted twice
    or missed."""
    import time

    from sqlalchemy import text

    t = time.monotonic()
    quote = conn.dialect.identifier_preparer.format_table
    result = RebuildResult()
    # First: under REPEATABLE READ (:func:`snapshot`) the snapshot is then taken after the lock.
    conn.execute(
        text(
            f"LOCK TABLE {quote(tables.hourly)}, {quote(tables.daily)}, {quote(tables.latest)} "
            "IN SHARE ROW EXCLUSIVE MODE"
        )
    )
    since = since or _oldest(conn, tables)
    if since is None:  # no raw checks: nothing to rebuild, and the rollups they left stay
        result.seconds = time.monotonic() - t
        return result
    for table, period in ((tables.hourly, "hour"), (tables.daily, "day")):
        bounds, params = _bounds(period, since, until)
        conn.execute(text(f"DELETE FROM {quote(table)} WHERE {bounds.replace('checked_at', period)}"), params)
        n = conn.execute(
            text(
                f"INSERT INTO {quote(table)} ({period}, url, checks, up, errors, rt_count, rt_sum, rt_min, "
                f"rt_max, hist) SELECT at, url, checks, up, errors, rt_count, rt_sum, rt_min, rt_max, hist "
                f"FROM ({_recomputed(tables, quote, period, bounds)}) AS r"
            ),
            params,
        ).rowcount
        setattr(result, "hourly" if period == "hour" else "daily", n)
    result.latest = conn.execute(
        text(
            f"INSERT INTO {quote(tables.latest)} AS t (url, checked_at, up, up_since, status_code, "
            f"response_time_ms, error) {_latest_sql(tables, quote)} ON CONFLICT (url) DO UPDATE SET "
            "checked_at = excluded.checked_at, up = excluded.up, up_since = excluded.up_since, "
            "status_code = excluded.status_code, response_time_ms = excluded.response_time_ms, "
            "error = excluded.error"
        )
    ).rowcount
    result.seconds = time.monotonic() - t
    return result


@dataclass
class CheckResult:
    """Rows of each rollup that differ from a recomputation from the raw rows (0: they agree)."""

    hourly: int = 0
    daily: int = 0
    latest: int = 0  # the newest check or its state differs
    since: int = 0  # only "up since" differs: exact only where a URL's checks arrive in time order
    compared: dict[str, int] | None = None

    @property
    def ok(self) -> bool:
        return not (self.hourly or self.daily or self.latest)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "differ": {
                "hourly": self.hourly,
                "daily": self.daily,
                "latest": self.latest,
                "since": self.since,
            },
            "compared": self.compared or {},
        }


def check(
    conn: Connection, tables: Tables, since: datetime | None = None, until: datetime | None = None
) -> CheckResult:
    """Compare the stored rollups from ``since`` to ``until`` (from the oldest raw check kept when
    None) with a recomputation from the raw rows (counts and histograms exactly, sums to 1e-9
    relative), and the latest state of each URL the raw rows hold ("up since" counted apart: it is
    exact only for checks that arrive in time order)."""
    from sqlalchemy import text

    quote = conn.dialect.identifier_preparer.format_table
    compared: dict[str, int] = {}
    result = CheckResult(compared=compared)
    since = since or _oldest(conn, tables)
    if since is None:
        return result
    for table, period in ((tables.hourly, "hour"), (tables.daily, "day")):
        bounds, params = _bounds(period, since, until)
        stored = f"SELECT * FROM {quote(table)} WHERE {bounds.replace('checked_at', period)}"
        row = conn.execute(
            text(
                f"SELECT count(*) FILTER (WHERE s.url IS NULL OR r.url IS NULL OR s.checks <> r.checks "
                "OR s.up <> r.up OR s.errors <> r.errors OR s.rt_count <> r.rt_count "
                "OR abs(s.rt_sum - r.rt_sum) > 1e-9 * greatest(abs(r.rt_sum), 1) "
                "OR s.rt_min IS DISTINCT FROM r.rt_min OR s.rt_max IS DISTINCT FROM r.rt_max "
                "OR s.hist <> r.hist), count(*) "
                f"FROM ({stored}) AS s FULL JOIN ({_recomputed(tables, quote, period, bounds)}) AS r "
                f"ON r.url = s.url AND r.at = s.{period}"
            ),
            params,
        ).one()
        setattr(result, "hourly" if period == "hour" else "daily", int(row[0]))
        compared[table.name] = int(row[1])
    row = conn.execute(
        text(
            "SELECT count(*) FILTER (WHERE s.url IS NULL OR s.checked_at <> r.checked_at OR s.up <> r.up), "
            "count(*) FILTER (WHERE s.up_since <> r.up_since), count(*) "
            f"FROM ({_latest_sql(tables, quote)}) AS r LEFT JOIN {quote(tables.latest)} AS s ON s.url = r.url"
        )
    ).one()
    result.latest, result.since = int(row[0]), int(row[1])
    compared[tables.latest.name] = int(row[2])
    return result
