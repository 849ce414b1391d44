"""The rollups and latest states a load keeps, as an analyst and an on-call engineer read them: equal to
the raw checks, percentiles within the stated bound, "down since" right, nothing counted twice.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from etl.contract import UP_SQL, up_mask
from etl.db import rollups, schema
from etl.db.tables import build_tables
from tests.support import cli_env, good_message, produce, rows, run_cli

pytestmark = pytest.mark.services

T0 = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=5)


def iso(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def check(url: str, at: datetime, **fields: object) -> bytes:
    body = {"url": url, "checked_at": iso(at), "response_time_ms": 100.0, **fields}
    return good_message(0, **body)


def run_json(env: dict[str, str], *args: str) -> dict:
    done = run_cli(["run", "--output", "json", *args], env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def cli_json(env: dict[str, str], *args: str) -> tuple[int, dict]:
    done = run_cli([*args, "--output", "json"], env)
    return done.returncode, (json.loads(done.stdout) if done.stdout.strip() else {"stderr": done.stderr})


# -- one definition of "up", one histogram, in Python and in SQL ------------------------------------


@pytest.fixture
def tables(stack, pg_schema: str) -> schema.Tables:
    engine = sa.create_engine(stack.app_db_url(), poolclass=sa.NullPool)
    t = build_tables(pg_schema)
    with engine.begin() as conn:
        schema.create_all(conn, t)
    engine.dispose()
    return t


def test_up_means_the_same_on_the_frame_and_in_sql(stack, tables) -> None:
    cases = [
        (200, None, True), (200, None, None), (200, None, False), (399, None, None), (400, None, None),
        (199, None, None), (500, None, True), (None, "timed out", None), (200, "odd", None),
        (None, None, None),
    ]  # fmt: skip
    frame = pd.DataFrame(cases, columns=["status_code", "error", "regex_matched"])
    frame = frame.astype({"status_code": "Int16", "regex_matched": "boolean"})
    mine = up_mask(frame["status_code"], frame["error"], frame["regex_matched"]).tolist()
    engine = sa.create_engine(stack.app_db_url(), poolclass=sa.NullPool)
    with engine.connect() as conn:
        values = ", ".join(
            f"({i}, CAST({'NULL' if s is None else s} AS smallint), CAST({'NULL' if e is None else repr(e)} "
            f"AS text), CAST({'NULL' if m is None else m} AS boolean))"
            for i, (s, e, m) in enumerate(cases)
        )
        sql = conn.execute(
            sa.text(
                f"SELECT {UP_SQL} FROM (VALUES {values}) "
                "AS v(i, status_code, error, regex_matched) ORDER BY i"
            )
        ).scalars()
        assert list(sql) == mine == [True, True, False, True, False, False, False, False, False, False]
    engine.dispose()


def test_a_response_time_falls_in_the_same_bucket_in_python_and_sql(stack, tables) -> None:
    edges = np.array(rollups.EDGES)
    times = np.concatenate(
        [[0.0, 0.5, 0.999999, 60_000.0, 1e7], edges, np.nextafter(edges, 0), np.nextafter(edges, np.inf)]
    )
    engine = sa.create_engine(stack.app_db_url(), poolclass=sa.NullPool)
    bucket = rollups.function_names(tables.schema)["bucket"]
    with engine.connect() as conn:
        sql = conn.execute(
            sa.text(
                f"SELECT {bucket}(x) FROM unnest(CAST(:x AS float8[])) WITH ORDINALITY AS u(x, i) ORDER BY i"
            ),
            {"x": times.tolist()},
        ).scalars()
        assert list(sql) == np.searchsorted(edges, times, side="right").tolist()
    engine.dispose()


def frame_of(url: str, times_ms: np.ndarray, at: datetime) -> pd.DataFrame:
    n = len(times_ms)
    return pd.DataFrame(
        {
            "url": [url] * n,
            "checked_at": pd.to_datetime([at + timedelta(seconds=i % 3000) for i in range(n)], utc=True),
            "status_code": pd.array([200] * n, dtype="Int16"),
            "response_time_ms": times_ms,
            "error": [None] * n,
            "regex_matched": pd.array([True] * n, dtype="boolean"),
            "partition": np.zeros(n, dtype=np.int64),
            "offset": np.arange(n, dtype=np.int64),
        }
    )


def test_percentiles_are_within_the_stated_bound_of_the_exact_ones(stack, tables) -> None:
    rng = np.random.default_rng(20)
    ms = np.round(rng.lognormal(mean=5.0, sigma=1.0, size=20_000), 1)  # 1 ms .. tens of seconds
    engine = sa.create_engine(stack.app_db_url(), poolclass=sa.NullPool)
    f = rollups.function_names(tables.schema)
    with engine.begin() as conn:
        for part in np.array_split(ms, 7):  # seven cycles: the histograms merge by addition
            rollups.upsert(conn, tables, frame_of("https://p.example/", part, T0))
        got = conn.execute(
            sa.text(
                f"SELECT {f['hist_quantile']}(hist, 0.5), {f['hist_quantile']}(hist, 0.95), "
                f'{f["hist_quantile"]}(hist, 0.99), rt_count FROM "{tables.schema}".website_metrics_hourly'
            )
        ).one()
    engine.dispose()
    assert got[3] == len(ms)
    ordered = np.sort(ms)
    for q, value in zip((0.5, 0.95, 0.99), got[:3], strict=True):
        exact = ordered[math.ceil(q * len(ms)) - 1]  # nearest rank
        assert abs(value - exact) / exact <= rollups.PERCENTILE_BOUND + 1e-12, (q, value, exact)
        cont = float(np.percentile(ms, q * 100))  # percentile_cont's interpolation
        assert abs(value - cont) / cont <= rollups.PERCENTILE_BOUND + 0.01, (q, value, cont)


def test_upserted_rollups_equal_each_hours_checks_whatever_the_urls_characters(stack, tables) -> None:
    """The columns travel as array literals: URLs that need quoting in them, hours without a response
    time, and checks split over cycles arrive as the plain sums and histograms of each URL's hour."""
    rng = np.random.default_rng(7)
    names = [
        'https://q.example/"x"',
        "https://b.example/a\\b",
        "https://c.example/{a,b}",
        "https://d.example/ é NULL",
    ]
    n = 3_000
    frame = pd.DataFrame(
        {
            "url": rng.choice(names, n),
            "checked_at": pd.to_datetime(
                [T0 + timedelta(seconds=int(s)) for s in rng.integers(0, 4 * 3600, n)], utc=True
            ),
            "status_code": pd.array(rng.choice([200, 404, 503], n), dtype="Int16"),
            "response_time_ms": np.round(rng.lognormal(5.0, 1.5, n), 1),
            "error": [None] * n,
            "regex_matched": pd.array([True] * n, dtype="boolean"),
            "partition": np.zeros(n, dtype=np.int64),
            "offset": np.arange(n, dtype=np.int64),
        }
    )
    failed = rng.random(n) < 0.1
    failed |= (frame["url"] == names[3]).to_numpy() & (
        frame["checked_at"] < T0 + timedelta(hours=1)
    ).to_numpy()
    frame.loc[failed, ["status_code", "response_time_ms"]] = None
    frame.loc[failed, "error"] = "timed out"
    engine = sa.create_engine(stack.app_db_url(), poolclass=sa.NullPool)
    with engine.begin() as conn:
        for part in (frame.iloc[k::3] for k in range(3)):
            rollups.upsert(conn, tables, part)
        stored = conn.execute(
            sa.text(
                "SELECT url, hour, checks, up, errors, rt_count, rt_sum, rt_min, rt_max, hist "
                f'FROM "{tables.schema}".website_metrics_hourly ORDER BY url, hour'
            )
        ).all()
    engine.dispose()
    expected = []
    up = up_mask(frame["status_code"], frame["error"], frame["regex_matched"])
    frame = frame.assign(hour=frame["checked_at"].dt.floor("h"), up=up)
    for (url, hour), g in sorted(frame.groupby(["url", "hour"]), key=lambda kv: kv[0]):
        ms = g["response_time_ms"].dropna().to_numpy()
        counts = np.bincount(np.searchsorted(rollups.EDGES, ms, side="right"), minlength=1).tolist()
        hist = counts[: max((i + 1 for i, c in enumerate(counts) if c), default=0)]
        lo, hi = (float(ms.min()), float(ms.max())) if len(ms) else (None, None)
        checks = (len(g), int(g["up"].sum()), int(failed[g.index].sum()), len(ms), float(ms.sum()))
        expected.append((url, hour.to_pydatetime(), *checks, lo, hi, hist))
    got = [(*r[:6], round(r[6], 6), *r[7:]) for r in stored]
    assert got == [(*e[:6], round(e[6], 6), *e[7:]) for e in expected]
    assert any(e[5] == 0 and e[9] == [] for e in expected)  # an hour without a response time


# -- kept by the load, exactly once -----------------------------------------------------------------


def backlog() -> tuple[list[bytes], list[bytes]]:
    """Five URLs checked every 10 minutes for 3 hours, keyed by URL (in order per URL): flap.example
    goes down at 1:00 and back up at 1:30; down.example goes down at 2:30 for good; a few bad messages."""
    values, keys = [], []
    for step in range(18):
        at = T0 + timedelta(minutes=10 * step)
        for name in ("a", "b", "c", "flap", "down"):
            url = f"https://{name}.example/"
            fields: dict[str, object] = {"status_code": 200, "response_time_ms": 40.0 + step * 3 + len(name)}
            if (name == "flap" and 6 <= step < 9) or (name == "down" and step >= 15):
                fields = {"status_code": None, "response_time_ms": None, "error": "connection refused"}
            if name == "c" and step % 4 == 0:
                fields = {"status_code": 503, "response_time_ms": 900.0 + step}
            values.append(check(url, at, **fields))
            keys.append(url.encode())
    for i in range(4):
        values.append(b'{"url": "https://a.example/", "status_code": 200' if i % 2 else b"\xff not json")
        keys.append(b"https://a.example/")
    return values, keys


def test_the_load_keeps_rollups_and_latest_states_equal_to_the_raw_checks(
    stack, make_topic, pg_schema, admin_engine
) -> None:
    topic = make_topic(partitions=3)
    values, keys = backlog()
    produce(stack, topic, values, keys=keys)
    env = cli_env(stack, topic, pg_schema, METRIC_ETL_MAX_POLL_RECORDS="7")
    report = run_json(env)
    assert (report["loaded"], report["rejected"], report["cycles"] > 5) == (90, 4, True)

    code, agree = cli_json(env, "rollups", "check")
    assert code == 0 and agree["ok"] and agree["differ"] == {"hourly": 0, "daily": 0, "latest": 0, "since": 0}
    q = f'"{pg_schema}"'
    hourly = rows(
        admin_engine,
        f"SELECT sum(checks) AS n, sum(up) AS up, sum(errors) AS e FROM {q}.website_metrics_hourly",
    )
    assert (hourly[0].n, hourly[0].up, hourly[0].e) == (90, 90 - 3 - 3 - 5, 3 + 3)  # rejects never count

    down = rows(admin_engine, f"SELECT url, down_since, last_checked_at FROM {q}.website_metrics_down_now")
    assert [(r.url, r.down_since, r.last_checked_at) for r in down] == [
        ("https://down.example/", T0 + timedelta(minutes=150), T0 + timedelta(minutes=170))
    ]
    flap = rows(
        admin_engine,
        f"SELECT up, up_since FROM {q}.website_metrics_latest WHERE url = 'https://flap.example/'",
    )
    assert (flap[0].up, flap[0].up_since) == (True, T0 + timedelta(minutes=90))  # back up at 1:30

    # A late check of an hour already summed lands in its own hour, and does not change the state.
    produce(stack, topic, [check("https://down.example/", T0 + timedelta(minutes=5), status_code=200)])
    assert run_json(env)["loaded"] == 1
    first = rows(
        admin_engine,
        f"SELECT checks, up FROM {q}.website_metrics_hourly "
        "WHERE url = 'https://down.example/' AND hour = :h",
        h=T0,
    )
    assert (first[0].checks, first[0].up) == (7, 7)
    assert (
        rows(admin_engine, f"SELECT up FROM {q}.website_metrics_latest WHERE url = 'https://down.example/'")[
            0
        ].up
        is False
    )

    # The same messages read again, by a second group or a rewind, are duplicates: nothing counts twice.
    again = run_json({**env, "METRIC_ETL_GROUP_ID": f"other-{topic}"})
    assert (again["loaded"], again["duplicates"]) == (0, 95)
    code, agree = cli_json(env, "rollups", "check")
    assert code == 0 and agree["ok"], agree
    # A dry run changes none of them.
    produce(stack, topic, [check("https://new.example/", T0, status_code=200)])
    before = rows(admin_engine, f"SELECT count(*) AS n, sum(checks) AS c FROM {q}.website_metrics_hourly")
    assert run_json(env, "--dry-run")["loaded"] == 1
    assert (
        rows(admin_engine, f"SELECT count(*) AS n, sum(checks) AS c FROM {q}.website_metrics_hourly")
        == before
    )

    # The report reads them: uptime, percentiles, the state and since when.
    done = run_cli(["report", "--since", "24h", "--output", "json", "--url", "https://down.example/"], env)
    assert done.returncode == 0, done.stderr
    (down_report,) = json.loads(done.stdout)["urls"]
    assert (down_report["checks"], down_report["up"], down_report["state"]) == (19, 16, "down")
    assert down_report["since"] == (T0 + timedelta(minutes=150)).isoformat()
    csv_out = run_cli(["report", "--since", "24h", "--output", "csv"], env).stdout.splitlines()
    assert csv_out[0].startswith("url,uptime,checks") and len(csv_out) == 1 + 5


def test_a_replayed_reject_that_loads_updates_the_rollups(stack, make_topic, pg_schema, admin_engine) -> None:
    """Rows the database refused (a CHECK added by a DBA) are rejects; once it is dropped, a replay loads
    them, and the rollups count them in the replay's own transaction."""
    topic = make_topic(partitions=1)
    env = cli_env(stack, topic, pg_schema)
    assert run_cli(["init-db"], env).returncode == 0
    q = f'"{pg_schema}"'
    with admin_engine.begin() as conn:
        conn.exec_driver_sql(
            f"ALTER TABLE {q}.website_metrics ADD CONSTRAINT no_b CHECK (url <> 'https://b.example/')"
        )
    values = [check(f"https://{n}.example/", T0, status_code=200) for n in "abab"]
    produce(stack, topic, values, keys=[b"k%d" % i for i in range(4)])
    report = run_json(env)
    assert (report["loaded"], report["rejected"]) == (2, 2)
    # A refused row's reject holds its message as read: key, payload bytes and their text.
    refused = rows(
        admin_engine, f'SELECT "offset", key, payload, payload_text FROM {q}.website_metrics_rejects'
    )
    assert sorted((r.offset, bytes(r.key), bytes(r.payload), r.payload_text) for r in refused) == [
        (i, b"k%d" % i, values[i], values[i].decode()) for i in (1, 3)
    ]
    assert rows(admin_engine, f"SELECT sum(checks) AS n FROM {q}.website_metrics_hourly")[0].n == 2
    with admin_engine.begin() as conn:
        conn.exec_driver_sql(f"ALTER TABLE {q}.website_metrics DROP CONSTRAINT no_b")
    replay = run_cli(["rejects", "replay", "--stage", "database"], env)
    assert replay.returncode == 0, replay.stderr + replay.stdout
    hourly = rows(admin_engine, f"SELECT url, checks FROM {q}.website_metrics_hourly ORDER BY url")
    assert [(r.url, r.checks) for r in hourly] == [("https://a.example/", 2), ("https://b.example/", 2)]
    assert cli_json(env, "rollups", "check")[0] == 0
