"""The readers' four questions, on the raw checks and through the rollups, after a load by the job itself.

    make bench-readers                                 # 10,000,000 checks, 1,000 URLs, 30 days
    .venv/bin/python bench/readers.py -n 200000 --urls 100 --days 30 --out-dir /tmp/readers

Fill: N checks of ``--urls`` URLs over ``--days`` days up to the start of the current hour ("now"), in
time order, each URL checked every ``days * 86400 / (N / urls)`` seconds (about 4 minutes at the default
size) from a phase of its own; 3% failed checks (``error``, no status or time), status 200 mostly with
2% 500 and 1% 404 (regex not matched), response times log-normal around a median of each URL's own
(clipped to 20-2000 ms). The JSON lines go to one file per Kafka partition (a URL always to the same
partition, as a producer keying by URL would), are produced with ``kcat -P`` to a fresh topic, and
``metric-etl run`` drains the topic into a fresh schema with its defaults: the rollups are the load's.

Then, for each question, the SQL an analyst writes on the raw table and the same question through the
rollup tables and views, each run once to warm up and then ``--repeat`` times (median quoted):

1. uptime of each URL per day, the last 7 days and today (``etl.contract.UP_SQL``; ``_uptime_daily``);
2. p95 response time of one URL per week, the last 8 weeks (``percentile_cont``; ``_latency_weekly``);
3. the latest check of every URL (``DISTINCT ON``; ``_latest``);
4. one URL's last 24 whole hours: checks and mean response time (``_hourly``).

Every rollup answer is checked against the raw one: counts and uptime exactly, means to 1e-9 relative,
the p95 within ``rollups.PERCENTILE_BOUND`` of the exact nearest-rank value (``percentile_disc``); its
difference to ``percentile_cont`` is reported. Finally ``metric-etl rollups check`` runs on the whole
table. Writes ``<out-dir>/readers.json`` and ``readers.md``; the topic is deleted, the schema dropped
unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import BIN, KCAT_PRODUCE, REPO, Stack, delete_topics, end_offsets, ensure_tools, git_commit, measure

from etl.contract import UP_SQL
from etl.db.rollups import PERCENTILE_BOUND

TARGET_MS = 100.0
ERRORS = ("DNS lookup failed", "connection refused", "timed out after 10s", "TLS handshake failed")


# -- the data ---------------------------------------------------------------------------------------


def url_of(i: int) -> str:
    return f"https://site-{i:05d}.example.com/health"


def generate(n: int, urls: int, days: float, end: datetime, partitions: int, workdir: Path) -> dict[str, Any]:
    """Write ``n`` checks as JSON lines, one file per partition, in time order within each file."""
    import numpy as np

    rng = np.random.default_rng(12)
    steps = math.ceil(n / urls)
    interval_us = int(days * 86_400_000_000) // steps
    start_us = int(end.timestamp() * 1_000_000) - steps * interval_us
    order = np.argsort(rng.integers(0, interval_us, urls))  # URLs in the order of their phase
    phase = np.sort(rng.integers(0, interval_us, urls))
    median_ms = np.exp(rng.normal(math.log(120), 0.6, urls))  # each URL's own typical time
    names = [url_of(i) for i in range(urls)]
    files = [(workdir / f"part.{p}").open("w") for p in range(partitions)]
    payload = written = 0
    try:
        chunk_steps = max(1, 1_000_000 // urls)
        for k0 in range(0, steps, chunk_steps):
            k = np.arange(k0, min(steps, k0 + chunk_steps))
            u = np.tile(order, len(k))[: max(0, n - k0 * urls)]
            kk = np.repeat(k, urls)[: len(u)]
            at = start_us + kk * interval_us + np.tile(phase, len(k))[: len(u)]
            when = np.datetime_as_string(at.astype("datetime64[us]").astype("datetime64[ms]"), unit="ms")
            r = rng.random(len(u))
            ms = np.clip(median_ms[u] * np.exp(rng.normal(0.0, 0.7, len(u))), 20.0, 2000.0)
            status = np.where(r < 0.94, 200, np.where(r < 0.96, 500, 404))
            lines_by_part: list[list[str]] = [[] for _ in range(partitions)]
            for ui, w, ri, m, s in zip(
                u.tolist(), when.tolist(), r.tolist(), ms.tolist(), status.tolist(), strict=True
            ):
                if ri >= 0.97:
                    line = (
                        f'{{"url": "{names[ui]}", "status_code": null, "response_time_ms": null, '
                        f'"regex_pattern": null, "regex_matched": null, "checked_at": "{w}Z", '
                        f'"error": "{ERRORS[ui % 4]}"}}\n'
                    )
                else:
                    line = (
                        f'{{"url": "{names[ui]}", "status_code": {s}, "response_time_ms": {m:.1f}, '
                        f'"regex_pattern": "ok", "regex_matched": {"true" if s == 200 else "false"}, '
                        f'"checked_at": "{w}Z", "error": null}}\n'
                    )
                lines_by_part[ui % partitions].append(line)
            for f, lines in zip(files, lines_by_part, strict=True):
                text = "".join(lines)
                payload += len(text)
                f.write(text)
            written += len(u)
            if written >= n:
                break
    finally:
        for f in files:
            f.close()
    return {
        "files": [workdir / f"part.{p}" for p in range(partitions)],
        "payload_bytes": payload - written,
        "first_at": datetime.fromtimestamp(start_us / 1e6, UTC),
        "interval_s": interval_us / 1e6,
    }


def produce(stack: Stack, topic: str, files: list[Path], n: int) -> float:
    """Create ``topic`` with one partition per file and ``kcat -P`` each file to its partition."""
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=stack.bootstrap.split(","), client_id="metric-etl-bench")
    try:
        admin.create_topics([NewTopic(topic, len(files), 1)])
    finally:
        admin.close()
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [*KCAT_PRODUCE, "-b", stack.bootstrap, "-t", topic, "-p", str(p), "-l", str(f)],
            stderr=subprocess.PIPE,
        )
        for p, f in enumerate(files)
    ]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise RuntimeError(f"kcat -P failed: {err.decode(errors='replace')}")
    took = time.perf_counter() - start
    if sum(end_offsets(stack, topic).values()) != n:
        raise RuntimeError(f"topic {topic} does not hold {n} messages")
    return took


def load(stack: Stack, topic: str, schema: str, workdir: Path, n: int) -> dict[str, Any]:
    """``metric-etl run`` draining ``topic`` into ``schema`` with default settings; checked."""
    env = stack.env(METRIC_ETL_TOPIC=topic, METRIC_ETL_GROUP_ID=schema, METRIC_ETL_DB_SCHEMA=schema)
    cwd = workdir / "cwd"
    cwd.mkdir(exist_ok=True)
    out, err = workdir / "fill.json", workdir / "fill.log"
    m = measure([[str(BIN / "metric-etl"), "run", "--output", "json", "-q"]], env, cwd, out, err)
    report = json.loads(out.read_text() or "{}")
    if m.exit_codes != [0] or report.get("status") != "ok" or report.get("read") != n:
        raise RuntimeError(f"metric-etl run failed ({m.exit_codes}): {report or err.read_text()[-2000:]}")
    return {
        "wall_s": round(m.wall_s, 2),
        "msg_per_s": round(n / m.wall_s, 1),
        "peak_rss_mb": round(m.peak_rss_mb, 1),
        "report": {
            k: report.get(k) for k in ("cycles", "read", "loaded", "rejected", "duration_s", "timings")
        },
    }


def sizes(stack: Stack, schema: str) -> dict[str, Any]:
    q = f'"{schema}"'
    ((raw, parts),) = stack.sql(
        "SELECT sum(pg_total_relation_size(relid)), count(*) "
        f"FROM pg_partition_tree('{q}.website_metrics') WHERE isleaf"
    )
    out: dict[str, Any] = {"raw_partitions_bytes": int(raw), "raw_partitions": int(parts)}
    for t in ("hourly", "daily", "latest"):
        ((size, rows),) = stack.sql(
            f"SELECT pg_total_relation_size('{q}.website_metrics_{t}'), "
            f"(SELECT count(*) FROM {q}.website_metrics_{t})"
        )
        out[f"{t}_bytes"], out[f"{t}_rows"] = int(size), int(rows)
    out["rollups_bytes"] = sum(out[f"{t}_bytes"] for t in ("hourly", "daily", "latest"))
    out["raw_over_rollups"] = round(out["raw_partitions_bytes"] / out["rollups_bytes"], 1)
    return out


# -- the questions ----------------------------------------------------------------------------------


def questions(schema: str) -> dict[str, dict[str, str]]:
    """Each question's raw SQL and rollup SQL; ``%(now)s`` and ``%(url)s`` are bound."""
    m = f'"{schema}".website_metrics'
    now = "%(now)s::timestamptz"
    return {
        "uptime_daily_7d": {
            "raw": f"SELECT url, date_trunc('day', checked_at, 'UTC') AS day, count(*) AS checks, "
            f"sum({UP_SQL}::int) AS up, avg({UP_SQL}::int) AS uptime FROM {m} "
            f"WHERE checked_at >= date_trunc('day', {now}, 'UTC') - interval '7 days' AND checked_at < {now} "
            "GROUP BY 1, 2 ORDER BY 1, 2",
            "rollup": f"SELECT url, day, checks, up, uptime FROM {m}_uptime_daily "
            f"WHERE day >= date_trunc('day', {now}, 'UTC') - interval '7 days' AND day < {now} ORDER BY 1, 2",
        },
        "p95_weekly_8w": {
            "raw": "SELECT date_trunc('week', checked_at, 'UTC') AS week, "
            f"percentile_cont(0.95) WITHIN GROUP (ORDER BY response_time_ms) FROM {m} "
            f"WHERE url = %(url)s AND checked_at >= date_trunc('week', {now}, 'UTC') - interval '7 weeks' "
            f"AND checked_at < {now} GROUP BY 1 ORDER BY 1",
            "rollup": f"SELECT week, p95 FROM {m}_latency_weekly WHERE url = %(url)s "
            f"AND week >= date_trunc('week', {now}, 'UTC') - interval '7 weeks' AND week < {now} ORDER BY 1",
        },
        "latest_per_url": {
            "raw": f"SELECT DISTINCT ON (url) url, checked_at, {UP_SQL} AS up, status_code, "
            f"response_time_ms, error FROM {m} ORDER BY url, checked_at DESC",
            "rollup": "SELECT url, checked_at, up, status_code, response_time_ms, error "
            f"FROM {m}_latest ORDER BY url",
        },
        "url_last_24h": {
            "raw": f"SELECT count(*), avg(response_time_ms) FROM {m} WHERE url = %(url)s "
            f"AND checked_at >= date_trunc('hour', {now}) - interval '24 hours' AND checked_at < {now}",
            "rollup": "SELECT sum(checks)::bigint, sum(rt_sum) / nullif(sum(rt_count), 0) "
            f"FROM {m}_hourly WHERE url = %(url)s "
            f"AND hour >= date_trunc('hour', {now}) - interval '24 hours' AND hour < {now}",
        },
    }


# The exact nearest-rank p95 per week, which the histogram's answer is held to (not timed).
def exact_p95(schema: str) -> str:
    return (
        "SELECT date_trunc('week', checked_at, 'UTC') AS week, "
        "percentile_disc(0.95) WITHIN GROUP (ORDER BY response_time_ms) "
        f'FROM "{schema}".website_metrics WHERE url = %(url)s '
        "AND checked_at >= date_trunc('week', %(now)s::timestamptz, 'UTC') - interval '7 weeks' "
        "AND checked_at < %(now)s::timestamptz GROUP BY 1 ORDER BY 1"
    )


def timed(
    cur: Any, sql: str, params: dict[str, Any], repeat: int
) -> tuple[list[tuple[Any, ...]], list[float]]:
    """One warm-up run, then ``repeat`` timed runs (client wall time, rows fetched); the rows and times."""
    cur.execute(sql, params)
    rows = cur.fetchall()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        cur.execute(sql, params)
        cur.fetchall()
        times.append((time.perf_counter() - t) * 1000)
    return rows, times


def compare(
    name: str, raw: list[tuple[Any, ...]], rollup: list[tuple[Any, ...]], exact: Any
) -> dict[str, Any]:
    """Whether the rollup answers what the raw SQL answers (see the module's docstring)."""
    out: dict[str, Any] = {"raw_rows": len(raw), "rollup_rows": len(rollup)}
    if name == "uptime_daily_7d":
        ok = [(u, d, c, int(up)) for u, d, c, up, _ in raw] == [(u, d, c, up) for u, d, c, up, _ in rollup]
        ok = ok and all(abs(float(a[4]) - b[4]) < 1e-12 for a, b in zip(raw, rollup, strict=True))
        out["equal"] = ok
    elif name == "p95_weekly_8w":
        weeks = [w for w, _ in raw] == [w for w, _ in rollup] == [w for w, _ in exact]
        rel_exact = [abs(b - e) / e for (_, b), (_, e) in zip(rollup, exact, strict=True)]
        rel_cont = [abs(b - c) / c for (_, b), (_, c) in zip(rollup, raw, strict=True)]
        out.update(
            equal=weeks and max(rel_exact) <= PERCENTILE_BOUND,
            weeks=len(raw),
            max_rel_diff_to_nearest_rank=round(max(rel_exact), 5),
            max_rel_diff_to_percentile_cont=round(max(rel_cont), 5),
            bound=round(PERCENTILE_BOUND, 5),
            per_week=[
                {
                    "week": w.date().isoformat(),
                    "rollup_p95": round(b, 2),
                    "nearest_rank": e,
                    "cont": round(c, 2),
                }
                for (w, b), (_, e), (_, c) in zip(rollup, exact, raw, strict=True)
            ],
        )
    elif name == "latest_per_url":
        out["equal"] = raw == rollup
    else:
        ((rc, ra),), ((gc, ga),) = raw, rollup
        out.update(equal=rc == gc and abs(ra - ga) <= 1e-9 * abs(ra), raw=[rc, ra], rollup=[gc, ga])
    return out


def ask(stack: Stack, schema: str, now: datetime, url: str, repeat: int) -> dict[str, Any]:
    import psycopg2

    params = {"now": now, "url": url}
    conn = psycopg2.connect(stack.db_url, password=stack.db_password)
    conn.autocommit = True
    out: dict[str, Any] = {}
    try:
        with conn.cursor() as cur:
            cur.execute("SET TIME ZONE 'UTC'")
            cur.execute(exact_p95(schema), params)
            exact = cur.fetchall()
            for name, sql in questions(schema).items():
                raw, raw_ms = timed(cur, sql["raw"], params, repeat)
                rollup, rollup_ms = timed(cur, sql["rollup"], params, repeat)
                out[name] = {
                    "raw_ms": round(statistics.median(raw_ms), 2),
                    "rollup_ms": round(statistics.median(rollup_ms), 2),
                    "raw_runs_ms": [round(t, 2) for t in raw_ms],
                    "rollup_runs_ms": [round(t, 2) for t in rollup_ms],
                    "speedup": round(statistics.median(raw_ms) / statistics.median(rollup_ms), 1),
                    "rollup_under_target": statistics.median(rollup_ms) < TARGET_MS,
                    **compare(name, raw, rollup, exact),
                    "sql": sql,
                }
                log(
                    f"{name}: raw {out[name]['raw_ms']:.1f} ms, rollup {out[name]['rollup_ms']:.2f} ms, "
                    f"equal {out[name]['equal']}"
                )
    finally:
        conn.close()
    return out


def rollups_check(stack: Stack, schema: str) -> dict[str, Any]:
    t = time.perf_counter()
    done = subprocess.run(
        [str(BIN / "metric-etl"), "rollups", "check", "--output", "json", "-q"],
        env=stack.env(METRIC_ETL_DB_SCHEMA=schema),
        cwd="/",
        capture_output=True,
        text=True,
        check=False,
    )
    took = time.perf_counter() - t
    try:
        result = json.loads(done.stdout)
    except json.JSONDecodeError:
        result = {"stdout": done.stdout[-2000:], "stderr": done.stderr[-2000:]}
    return {"exit_code": done.returncode, "wall_s": round(took, 2), "result": result}


# -- output -----------------------------------------------------------------------------------------

T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def markdown(r: dict[str, Any]) -> str:
    p, f, s = r["params"], r["fill"], r["sizes"]
    mb = 1024 * 1024
    lines = [
        f"# The readers' questions: raw checks against the rollups ({r['started_at'][:10]}, "
        f"commit {r['commit']})",
        "",
        f"{p['messages']:,} checks of {p['urls']:,} URLs over {p['days']} days (one every "
        f"{p['interval_s']:.0f} s per URL; 3% failed, 2% 500, 1% 404), produced with kcat to "
        f"{p['partitions']} partitions and loaded by `metric-etl run` (default settings) into a fresh "
        "schema. "
        f'"now" = {p["now"]} (the data\'s end). Medians of {p["repeat"]} warm runs, client wall time, '
        "rows fetched.",
        "",
        f"Reproduce: `{r['command']}` (`make bench-readers` runs the full size).",
        "",
        f"Fill: generating {f['generate_s']:.1f} s, producing {f['produce_s']:.1f} s "
        f"({f['produce_msg_per_s']:,.0f} msg/s), `metric-etl run` {f['load']['wall_s']:.1f} s "
        f"(**{f['load']['msg_per_s']:,.0f} msg/s**, peak RSS {f['load']['peak_rss_mb']:.0f} MB, "
        f"{f['load']['report']['cycles']} cycles, loaded {f['load']['report']['loaded']:,}).",
        "",
        f"Sizes: raw checks {s['raw_partitions_bytes'] / mb:,.0f} MiB in {s['raw_partitions']} partitions; "
        f"rollups {s['rollups_bytes'] / mb:,.1f} MiB (hourly {s['hourly_rows']:,} rows "
        f"{s['hourly_bytes'] / mb:,.1f} MiB, daily {s['daily_rows']:,} rows "
        f"{s['daily_bytes'] / mb:,.1f} MiB, "
        f"latest {s['latest_rows']:,} rows {s['latest_bytes'] / mb:,.2f} MiB): "
        f"raw / rollups = {s['raw_over_rollups']}x.",
        "",
        "| question | raw SQL, ms | rollups, ms | speed-up | rollups < 100 ms | same answer |",
        "|---|---:|---:|---:|:---:|:---:|",
    ]
    label = {
        "uptime_daily_7d": "uptime of each URL per day, last 7 days (`_uptime_daily`)",
        "p95_weekly_8w": "p95 of one URL per week, last 8 weeks (`_latency_weekly`)",
        "latest_per_url": "latest check of every URL (`_latest`)",
        "url_last_24h": "one URL's last 24 whole hours: checks, mean (`_hourly`)",
    }
    for name, q in r["questions"].items():
        lines.append(
            f"| {label[name]} | {q['raw_ms']:,.1f} | {q['rollup_ms']:.2f} | {q['speedup']:,.0f}x "
            f"| {'yes' if q['rollup_under_target'] else '**no**'} | {'yes' if q['equal'] else '**no**'} |"
        )
    pq = r["questions"]["p95_weekly_8w"]
    c = r["rollups_check"]
    lines += [
        "",
        f"p95: over {pq['weeks']} weeks, the histogram's answer is at most "
        f"{pq['max_rel_diff_to_nearest_rank']:.2%} from the exact nearest-rank value (bound "
        f"{pq['bound']:.2%}) and at most {pq['max_rel_diff_to_percentile_cont']:.2%} from "
        "`percentile_cont(0.95)`. Counts and uptime are exact; the 24-hour mean agrees to 1e-9.",
        "",
        f"`metric-etl rollups check` on the whole table: exit {c['exit_code']} in {c['wall_s']:.1f} s "
        f"({'agree' if c['result'].get('ok') else 'see readers.json'}).",
        "",
        f"Machine: {r['machine']}; 1-minute load average {r['load_average_1m']['start']} at the start, "
        f"{r['load_average_1m']['end']} at the end.",
        "",
    ]
    return "\n".join(lines)


# readers.py, partitions.py, upgrade.py --from 2ad411b; then what the figures do not say by themselves
SECTIONS = ("questions", "partitions", "upgrade", "notes")


def write_results(out_dir: Path, section: str, result: dict[str, Any], text: str | None = None) -> None:
    """Put one script's ``result`` (and its Markdown ``text``) into ``readers.json`` under ``section``,
    keeping the other scripts' sections, and write ``readers.md`` from all of them in order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "readers.json"
    whole = json.loads(path.read_text()) if path.is_file() else {}
    if "questions" in whole and "fill" in whole:  # the layout before sections: the questions' own
        whole = {"questions": whole}
    if text is not None:
        result = {**result, "markdown": text}
    whole[section] = result
    parts = []
    for name in SECTIONS:
        if name not in whole:
            continue
        parts.append(markdown(whole[name]) if name == "questions" else whole[name]["markdown"])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(whole, indent=2, default=str) + "\n")
    tmp.replace(path)
    (out_dir / "readers.md").write_text("\n".join(parts))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-n", "--messages", type=int, default=10_000_000, help="checks (default 10,000,000)")
    ap.add_argument("--urls", type=int, default=1_000, help="URLs (default 1,000)")
    ap.add_argument("--days", type=int, default=30, help="days the checks cover (default 30)")
    ap.add_argument("--partitions", type=int, default=6, help="Kafka partitions (default 6)")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs of each query (default 5)")
    ap.add_argument("--keep", action="store_true", help="keep the schema (its name is printed)")
    ap.add_argument("--schema", help="ask an existing (kept) schema instead of filling a new one")
    ap.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    stack = Stack.from_env()
    ensure_tools()
    started = datetime.now(UTC)
    load_start = os.getloadavg()[0]
    label = uuid.uuid4().hex[:6]
    schema = args.schema or f"bench_readers_{label}"
    topic = f"bench-readers-{label}"
    workdir = Path(tempfile.mkdtemp(prefix="metric-etl-readers-"))
    made_topic = False
    fill: dict[str, Any] = {}
    try:
        if args.schema:
            ((newest,),) = stack.sql(f'SELECT max(checked_at) FROM "{schema}".website_metrics')
            now = newest.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
            interval_s = args.days * 86400 / math.ceil(args.messages / args.urls)
        else:
            now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
            t = time.perf_counter()
            data = generate(args.messages, args.urls, args.days, now, args.partitions, workdir)
            fill["generate_s"] = round(time.perf_counter() - t, 2)
            interval_s = data["interval_s"]
            log(
                f"generated {args.messages:,} checks ({data['payload_bytes'] / 1e6:,.0f} MB) "
                f"in {fill['generate_s']:.1f}s"
            )
            made_topic = True
            fill["produce_s"] = round(produce(stack, topic, data["files"], args.messages), 2)
            fill["produce_msg_per_s"] = round(args.messages / fill["produce_s"], 1)
            fill["payload_bytes"] = data["payload_bytes"]
            for f in data["files"]:
                f.unlink()
            log(f"produced in {fill['produce_s']:.1f}s ({fill['produce_msg_per_s']:,.0f} msg/s)")
            fill["load"] = load(stack, topic, schema, workdir, args.messages)
            log(f"loaded in {fill['load']['wall_s']:.1f}s ({fill['load']['msg_per_s']:,.0f} msg/s)")
            delete_topics(stack, [topic])
            made_topic = False
            stack.sql(f'VACUUM ANALYZE "{schema}".website_metrics')
        size = sizes(stack, schema)
        log(f"sizes: {size}")
        answers = ask(stack, schema, now, url_of(0), args.repeat)
        check = rollups_check(stack, schema)
        log(f"rollups check: exit {check['exit_code']} in {check['wall_s']:.1f}s")
        result = {
            "started_at": started.isoformat(timespec="seconds"),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join(["bench/readers.py", *(argv if argv is not None else sys.argv[1:])]),
            "commit": git_commit(),
            "params": {
                "messages": args.messages,
                "urls": args.urls,
                "days": args.days,
                "interval_s": round(interval_s, 1),
                "partitions": args.partitions,
                "repeat": args.repeat,
                "now": now.isoformat(),
                "schema": schema,
            },
            "machine": f"{os.cpu_count()} cores, PostgreSQL {stack.sql('SHOW server_version')[0][0]}",
            "load_average_1m": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
            "fill": fill,
            "sizes": size,
            "questions": answers,
            "rollups_check": check,
        }
        if fill:
            write_results(args.out_dir, "questions", result)
            print(markdown(result))
        log(f"wrote {args.out_dir / 'readers.json'}")
        return 0
    finally:
        if made_topic:
            delete_topics(stack, [topic])
        if args.keep or args.schema:
            log(f"kept schema {schema}")
        else:
            stack.drop_schema(schema)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
