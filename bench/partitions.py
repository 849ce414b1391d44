"""Partitions and the load: many partitions, a second consumer group, and retention beside a load.

    .venv/bin/python bench/partitions.py                       # 300,000 messages, 3 repeats
    .venv/bin/python bench/partitions.py -n 200000 --repeat 1 --days 365 --rows-per-day 3000

(a) The first load of the same N messages (``bench/readers.py``'s checks of 1,000 URLs, all on
yesterday) by ``metric-etl run`` into a fresh schema made by ``metric-etl init-db`` (the partitions it
makes ahead, the default one, and the one yesterday's checks need, made by the run), against a schema
where ``etl.db.partitions.create_range`` made the 365 daily partitions up to yesterday beforehand.
Alternating, ``--repeat`` times; medians of wall and CPU seconds (target: within 10%).

(b) After each fresh load, a second consumer group drains the same topic into the same tables: every
message is a duplicate, found by the "already loaded?" lookup. Its wall time against the first load's
(target: within 1.5x).

(c) A schema with a year of daily partitions holding ``--rows-per-day`` checks each (generate_series),
and a ``metric-etl run`` loading today's checks into it; once the load is under way,
``metric-etl retention`` with ``METRIC_ETL_RETENTION_RAW_DAYS`` set so that ``--drop`` partitions are
past it. Records retention's wall time (target under 10 s) and its own lock wait, the year's
partitions' size before and after (they should fall by the dropped share), the load's report, and the
longest gap between two offset commits of the load (a probe reads its offsets every 10 ms), against the
longest gap before retention began. The lock wait is bounded at 5 s a try (etl.ops.retention).

Writes the ``partitions`` section of ``<out-dir>/readers.json`` and ``readers.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from readers import generate, produce, write_results
from run import BIN, REPO, Stack, delete_topics, ensure_tools, git_commit

T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def job(stack: Stack, args: list[str], schema: str, workdir: Path, **env: str) -> dict[str, Any]:
    """``metric-etl ARGS --output json -q`` for ``schema``: wall and CPU seconds, the JSON report."""
    with tempfile.TemporaryFile(dir=workdir) as out, tempfile.TemporaryFile(dir=workdir) as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [str(BIN / "metric-etl"), *args, *(() if args == ["init-db"] else ("--output", "json")), "-q"],
            env=stack.env(METRIC_ETL_DB_SCHEMA=schema, **env),
            cwd=workdir,  # no config file: built-in defaults and the environment only
            stdout=out,
            stderr=err,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        text = out.read().decode()
        code = os.waitstatus_to_exitcode(status)
        if code:
            raise RuntimeError(f"metric-etl {' '.join(args)} exited {code}: {err.read().decode()[-2000:]}")
    return {
        "wall_s": round(wall, 3),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        "report": json.loads(text) if text.lstrip().startswith("{") else {"text": text},
    }


def engine(stack: Stack) -> Any:
    from sqlalchemy import create_engine

    url = stack.db_url.replace("postgresql://", "postgresql+psycopg2://", 1)
    return create_engine(url, connect_args={"password": stack.db_password} if stack.db_password else {})


def premake(stack: Stack, schema: str, first: datetime, last: datetime) -> int:
    """``create_range`` of daily partitions from ``first`` to ``last``; how many leaf partitions then."""
    from etl.db.partitions import create_range
    from etl.db.tables import build_tables

    eng = engine(stack)
    try:
        with eng.begin() as conn:
            create_range(conn, build_tables(schema), "day", first, last)
    finally:
        eng.dispose()
    return leaves(stack, schema)


def leaves(stack: Stack, schema: str) -> int:
    ((n,),) = stack.sql(
        f"SELECT count(*) FROM pg_partition_tree('\"{schema}\".website_metrics') WHERE isleaf"
    )
    return int(n)


def run_load(stack: Stack, topic: str, group: str, schema: str, workdir: Path, n: int) -> dict[str, Any]:
    r = job(stack, ["run"], schema, workdir, METRIC_ETL_TOPIC=topic, METRIC_ETL_GROUP_ID=group)
    rep = r["report"]
    if rep.get("status") != "ok" or rep.get("read") != n:
        raise RuntimeError(f"{schema}: the load did not read {n}: {rep}")
    r["report"] = {
        k: rep.get(k) for k in ("cycles", "read", "loaded", "rejected", "duplicates", "duration_s", "timings")
    }
    return r


# -- (a) and (b) ------------------------------------------------------------------------------------


def loads(stack: Stack, topic: str, n: int, repeat: int, workdir: Path, label: str) -> dict[str, Any]:
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    runs: dict[str, list[dict[str, Any]]] = {"fresh": [], "premade": [], "second": []}
    for i in range(repeat):
        order = ("fresh", "premade") if i % 2 == 0 else ("premade", "fresh")
        for kind in order:
            schema = f"bench_parts_{label}_{kind}_{i}"
            try:
                job(stack, ["init-db"], schema, workdir)
                if kind == "premade":
                    premake(stack, schema, today - timedelta(days=365), today - timedelta(days=1))
                before = leaves(stack, schema)
                r = run_load(stack, topic, schema, schema, workdir, n)
                r["partitions_before"], r["partitions_after"] = before, leaves(stack, schema)
                runs[kind].append(r)
                log(
                    f"{i + 1}/{repeat} {kind}: {r['wall_s']:.2f}s wall, {r['cpu_s']:.2f}s CPU, "
                    f"{before} -> {r['partitions_after']} partitions"
                )
                if kind == "fresh":
                    s = run_load(stack, topic, schema + "_b", schema, workdir, n)
                    if s["report"]["duplicates"] != n or s["report"]["loaded"]:
                        raise RuntimeError(f"the second group did not find every message stored: {s}")
                    s["first_wall_s"] = r["wall_s"]
                    s["second_over_first"] = round(s["wall_s"] / r["wall_s"], 3)
                    runs["second"].append(s)
                    log(f"{i + 1}/{repeat} second group: {s['wall_s']:.2f}s ({s['second_over_first']:.2f}x)")
            finally:
                stack.drop_schema(schema)
    med = statistics.median

    def summary(rs: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "wall_s": round(med(r["wall_s"] for r in rs), 3),
            "cpu_s": round(med(r["cpu_s"] for r in rs), 3),
            "msg_per_s": round(n / med(r["wall_s"] for r in rs), 1),
            # the database's share of a cycle (the COPY, the lookup, the rollups), from the job's report
            "load_stage_s": round(med((r["report"].get("timings") or {}).get("load", 0.0) for r in rs), 3),
            "runs": rs,
        }

    fresh, pre, second = summary(runs["fresh"]), summary(runs["premade"]), summary(runs["second"])
    return {
        "messages": n,
        "fresh": fresh,
        "premade": pre,
        "premade_over_fresh_wall": round(pre["wall_s"] / fresh["wall_s"], 3),
        "premade_over_fresh_cpu": round(pre["cpu_s"] / fresh["cpu_s"], 3),
        "second_group": second,
        "second_over_first": round(med(r["second_over_first"] for r in runs["second"]), 3),
    }


# -- (c) --------------------------------------------------------------------------------------------


def year_bytes(stack: Stack, schema: str, today: datetime) -> tuple[int, int]:
    """Size and number of the partitions before today (the year's history; the load writes today's)."""
    ((size, count),) = stack.sql(
        "SELECT coalesce(sum(pg_total_relation_size(t.relid)), 0), count(*) "
        f"FROM pg_partition_tree('\"{schema}\".website_metrics') t JOIN pg_class c ON c.oid = t.relid "
        f"WHERE t.isleaf AND c.relname LIKE 'website\\_metrics\\_p%' "
        f"AND c.relname < 'website_metrics_p{today:%Y%m%d}'"
    )
    return int(size), int(count)


def probe(
    stack: Stack, schema: str, group: str, stop: threading.Event, seen: list[tuple[float, int]]
) -> None:
    """Every 10 ms, the load's committed offsets; each change with its time."""
    import psycopg2

    conn = psycopg2.connect(stack.db_url, password=stack.db_password)
    conn.autocommit = True
    last = -1
    try:
        with conn.cursor() as cur:
            while not stop.is_set():
                try:
                    cur.execute(
                        f'SELECT coalesce(sum(next_offset), 0) FROM "{schema}".etl_offsets '
                        "WHERE group_id = %s",
                        (group,),
                    )
                    (value,) = cur.fetchone()
                except psycopg2.errors.UndefinedTable:
                    value = 0
                if value != last:
                    seen.append((time.perf_counter(), int(value)))
                    last = value
                time.sleep(0.01)
    finally:
        conn.close()


def retention_beside_load(
    stack: Stack, days: int, per_day: int, drop: int, load_n: int, workdir: Path, label: str
) -> dict[str, Any]:
    schema = f"bench_parts_{label}_retention"
    topic = f"bench-parts-{label}-retention"
    now = datetime.now(UTC)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    first = today - timedelta(days=days)
    try:
        job(stack, ["init-db"], schema, workdir)
        premake(stack, schema, first, today)
        q = f'"{schema}".website_metrics'
        t = time.perf_counter()
        stack.sql(
            f"INSERT INTO {q} (url, status_code, response_time_ms, regex_pattern, regex_matched, checked_at, "
            'error, topic, partition, incarnation, "offset", kafka_timestamp, run_id) '
            "SELECT 'https://site-' || lpad((i % 1000)::text, 5, '0') || '.example.com/health', 200, "
            f"20 + (i % 997), 'ok', true, timestamptz '{first.isoformat()}' + (i::float8 / {days * per_day}) "
            f"* interval '{days} days', NULL, 'bench-history', i % 6, 0, i / 6, NULL, 'history' "
            f"FROM generate_series(0, {days * per_day - 1}) AS i"
        )
        stack.sql(f"VACUUM ANALYZE {q}")
        fill_s = time.perf_counter() - t
        size_before, parts_before = year_bytes(stack, schema, today)
        log(
            f"retention: {days * per_day:,} rows in {parts_before} partitions ({size_before / 2**20:.0f} MiB)"
        )

        data = generate(load_n, 1000, 0.25, now.replace(minute=0, second=0, microsecond=0), 6, workdir)
        produce(stack, topic, data["files"], load_n)
        for f in data["files"]:
            f.unlink()
        seen: list[tuple[float, int]] = []
        stop = threading.Event()
        reader = threading.Thread(target=probe, args=(stack, schema, schema, stop, seen))
        reader.start()
        load_out: dict[str, Any] = {}

        def loader() -> None:
            try:
                load_out.update(run_load(stack, topic, schema, schema, workdir, load_n))
            except Exception as exc:  # reported with the result
                load_out["error"] = str(exc)

        load_thread = threading.Thread(target=loader)
        load_thread.start()
        while not any(v > 0 for _, v in seen) and load_thread.is_alive():
            time.sleep(0.05)
        time.sleep(1.0)  # a few cycles in: the gaps before retention are the baseline
        keep = days - drop
        ret_start = time.perf_counter()
        ret = job(stack, ["retention"], schema, workdir, METRIC_ETL_RETENTION_RAW_DAYS=str(keep))
        ret_end = time.perf_counter()
        load_thread.join()
        stop.set()
        reader.join()
        size_after, parts_after = year_bytes(stack, schema, today)
        times = [t for t, v in seen if v > 0]
        gaps = [(b - a, a, b) for a, b in itertools.pairwise(times)]
        before = [g for g, _, b in gaps if b <= ret_start]
        during = [g for g, a, b in gaps if b > ret_start and a < ret_end]
        rep = ret["report"]
        dropped = rep.get("dropped", [])
        return {
            "rows": days * per_day,
            "fill_s": round(fill_s, 1),
            "retention_raw_days": keep,
            "retention_wall_s": ret["wall_s"],
            "retention_seconds": rep.get("seconds"),
            "retention_lock_wait_s": rep.get("lock_wait_s"),
            "dropped_partitions": len(dropped),
            "bytes_freed": sum(d.get("bytes", 0) for d in dropped),
            "year_partitions_before": parts_before,
            "year_partitions_after": parts_after,
            "year_bytes_before": size_before,
            "year_bytes_after": size_after,
            "size_fell_by": round(1 - size_after / size_before, 4),
            "dropped_share": round(len(dropped) / parts_before, 4) if parts_before else None,
            "load": load_out,
            "load_messages": load_n,
            "max_commit_gap_before_retention_s": round(max(before), 3) if before else None,
            "max_commit_gap_during_retention_s": round(max(during), 3) if during else None,
            "commits_during_retention": len(during),
            "retention_report": rep,
        }
    finally:
        delete_topics(stack, [topic])
        stack.drop_schema(schema)


def markdown(r: dict[str, Any]) -> str:
    a, c = r["loads"], r["retention"]
    f, p, s = a["fresh"], a["premade"], a["second_group"]
    load = c["load"]
    gap_ok = (c["max_commit_gap_during_retention_s"] or 0) <= 5 + c["retention_wall_s"]
    load_text = (
        f"status ok, read {load['report']['read']:,}, loaded {load['report']['loaded']:,} "
        f"in {load['wall_s']:.1f} s"
        if "report" in load
        else f"**failed**: {load.get('error')}"
    )
    return "\n".join(
        [
            "## Partitions and the load",
            "",
            f"Reproduce: `{r['command']}`. Medians of {r['repeat']} runs, alternating (every run's figures "
            "are in readers.json).",
            "",
            "| measurement | value | target | met |",
            "|---|---:|---:|:---:|",
            f"| first load of {a['messages']:,} messages, {f['runs'][0]['partitions_after']} partitions "
            f"(init-db's) | {f['wall_s']:.2f} s wall, {f['cpu_s']:.2f} s CPU, "
            f"{f['msg_per_s']:,.0f} msg/s | | |",
            "| the same with 365 daily partitions made beforehand "
            f"({p['runs'][0]['partitions_after']} in all) "
            f"| {p['wall_s']:.2f} s wall, {p['cpu_s']:.2f} s CPU, {p['msg_per_s']:,.0f} msg/s | | |",
            f"| 365 partitions / few: wall (CPU; the job's load stage) | {a['premade_over_fresh_wall']:.3f} "
            f"({a['premade_over_fresh_cpu']:.3f}; {p['load_stage_s']:.2f} / {f['load_stage_s']:.2f} s) "
            "| <= 1.10 | "
            f"{'yes' if a['premade_over_fresh_wall'] <= 1.10 else '**no**'} |",
            f"| a second group over the loaded topic (all duplicates) / the first load | "
            f"{a['second_over_first']:.3f} ({s['wall_s']:.2f} s) | <= 1.5 | "
            f"{'yes' if a['second_over_first'] <= 1.5 else '**no**'} |",
            f"| `metric-etl retention` dropping {c['dropped_partitions']} of {c['year_partitions_before']} "
            f"daily partitions ({c['rows']:,} rows) beside a load, wall s | {c['retention_wall_s']:.2f} "
            f"(lock wait {c['retention_lock_wait_s']:.2f}) | < 10 | "
            f"{'yes' if c['retention_wall_s'] < 10 else '**no**'} |",
            f"| the year's partitions' size, before -> after | {c['year_bytes_before'] / 2**20:,.1f} -> "
            f"{c['year_bytes_after'] / 2**20:,.1f} MiB (fell {c['size_fell_by']:.1%}; dropped share "
            f"{c['dropped_share']:.1%}) | | |",
            f"| the load beside it ({c['load_messages']:,} messages) | {load_text} | no failure | "
            f"{'yes' if 'report' in load else '**no**'} |",
            f"| its longest gap between offset commits: before retention / during | "
            f"{c['max_commit_gap_before_retention_s']} s / {c['max_commit_gap_during_retention_s']} s "
            f"({c['commits_during_retention']} commits during) | <= 5 s lock wait + drop | "
            f"{'yes' if gap_ok else '**no**'} |",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-n", "--messages", type=int, default=300_000, help="messages of (a) and (b)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--days", type=int, default=365, help="daily partitions holding data in (c)")
    ap.add_argument("--rows-per-day", type=int, default=3_000)
    ap.add_argument("--drop", type=int, default=30, help="partitions past retention in (c)")
    ap.add_argument("--load-messages", type=int, default=300_000, help="the load beside retention in (c)")
    ap.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    stack = Stack.from_env()
    ensure_tools()
    label = uuid.uuid4().hex[:6]
    workdir = Path(tempfile.mkdtemp(prefix="metric-etl-parts-"))
    topic = f"bench-parts-{label}"
    started = datetime.now(UTC)
    load_start = os.getloadavg()[0]
    try:
        yesterday_end = started.replace(hour=0, minute=0, second=0, microsecond=0)
        data = generate(args.messages, 1000, 0.9, yesterday_end, 6, workdir)
        produce(stack, topic, data["files"], args.messages)
        for f in data["files"]:
            f.unlink()
        a = loads(stack, topic, args.messages, args.repeat, workdir, label)
        c = retention_beside_load(
            stack, args.days, args.rows_per_day, args.drop, args.load_messages, workdir, label
        )
        log(f"retention: {json.dumps({k: v for k, v in c.items() if k != 'retention_report'}, default=str)}")
        result = {
            "started_at": started.isoformat(timespec="seconds"),
            "command": " ".join(["bench/partitions.py", *(argv if argv is not None else sys.argv[1:])]),
            "commit": git_commit(),
            "repeat": args.repeat,
            "load_average_1m": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
            "loads": a,
            "retention": c,
        }
        text = markdown(result)
        write_results(args.out_dir, "partitions", result, text)
        print(text)
        return 0
    finally:
        delete_topics(stack, [topic])
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
