"""The upgrades of `metric-etl init-db`: how long they lock a big metrics table.

    . .stack/env && .venv/bin/python bench/upgrade.py -n 1000000 -r 3
    . .stack/env && .venv/bin/python bench/upgrade.py --from 2ad411b -n 1000000 -r 1

Each repeat makes a fresh schema with 5cc9f5c's DDL (tests/schemas/schema_5cc9f5c.sql), fills the metrics
table with N rows and the rejects table with N/100 (generate_series, values like the job's), then runs
`metric-etl init-db` as a process of its own while a probe on another connection reads the metrics
table in a loop (``SELECT 1 ... LIMIT 1``, as a run's first statement on it would). Prints init-db's
wall time, its own account of each key (the concurrent index build, then the swap that locks the
table), and the longest the probe waited: the time the table was closed to others. Medians over the
repeats.

With ``--from 2ad411b``: the partitioning upgrade. A fresh schema with 2ad411b's DDL
(tests/schemas/schema_2ad411b.sql: a plain metrics table) holds N checks over the last 30 days
(generate_series); a `metric-etl run` of 2ad411b's own code (a git worktree of it, on PYTHONPATH; the
current code refuses an unpartitioned table) loads ``--load-messages`` checks of the last hours from a
fresh topic into it, and once it has committed its first cycle, the current `metric-etl init-db` runs.
Records init-db's wall time and its own account ("loads waited for X s"), the longest gap between the
old load's offset commits while init-db ran, the old load's report, that every row is there once
(N + what the load loaded; no key twice), and `metric-etl rollups check` afterwards. Writes the
``upgrade`` section of ``bench/results/readers.json`` and ``readers.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import BIN, REPO, Stack, delete_topics, git_commit

OLD_DDL = REPO / "tests" / "schemas" / "schema_5cc9f5c.sql"
DDL_2AD411B = REPO / "tests" / "schemas" / "schema_2ad411b.sql"


def fill(stack: Stack, schema: str, n: int) -> None:
    q = f'"{schema}"'
    stack.sql(f"CREATE SCHEMA {q}")
    stack.sql(OLD_DDL.read_text().replace("{schema}", q))
    stack.sql(
        f"INSERT INTO {q}.website_metrics (url, status_code, response_time_ms, regex_pattern, regex_matched, "
        'checked_at, error, extra, topic, partition, "offset", kafka_timestamp, run_id) '
        "SELECT 'https://example.com/health/' || (i % 1000), 200, 10 + (i % 997) / 7.0, 'ok', true, "
        "timestamptz '2026-11-28 10:00:00+00' + i * interval '1 ms', NULL, NULL, 'website-metrics', "
        "i % 6, i / 6, timestamptz '2026-11-28 10:00:00+00' + i * interval '1 ms', 'old-run' "
        f"FROM generate_series(0, {n - 1}) AS i"
    )
    stack.sql(
        f"INSERT INTO {q}.website_metrics_rejects "
        '(topic, partition, "offset", payload, stage, errors, run_id) '
        "SELECT 'website-metrics', i % 6, 1000000000 + i / 6, convert_to('{\"url\": 1}', 'UTF8'), 'schema', "
        '\'[{"field": "url", "rule": "type", "value": "1"}]\', \'old-run\' '
        f"FROM generate_series(0, {n // 100 - 1}) AS i"
    )
    stack.sql(
        f"INSERT INTO {q}.etl_offsets (group_id, topic, partition, next_offset) "
        f"SELECT 'metric-etl', 'website-metrics', p, {n} / 6 + 1 FROM generate_series(0, 5) AS p"
    )
    stack.sql(f"ANALYZE {q}.website_metrics")
    stack.sql(f"ANALYZE {q}.website_metrics_rejects")


def probe(stack: Stack, schema: str, stop: threading.Event, waits: list[float]) -> None:
    """Read the metrics table in a loop; record how long each read took."""
    import psycopg2

    conn = psycopg2.connect(stack.db_url, password=stack.db_password)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            while not stop.is_set():
                t = time.perf_counter()
                cur.execute(f'SELECT 1 FROM "{schema}".website_metrics LIMIT 1')
                cur.fetchall()
                waits.append(time.perf_counter() - t)
                time.sleep(0.002)
    finally:
        conn.close()


def once(stack: Stack, n: int) -> dict[str, float]:
    schema = f"upgrade_{uuid.uuid4().hex[:8]}"
    try:
        t = time.perf_counter()
        fill(stack, schema, n)
        filled = time.perf_counter() - t
        waits: list[float] = []
        stop = threading.Event()
        reader = threading.Thread(target=probe, args=(stack, schema, stop, waits))
        reader.start()
        time.sleep(0.2)  # the probe is reading before init-db starts
        t = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "etl", "init-db"],
            env=stack.env(METRIC_ETL_DB_SCHEMA=schema),
            cwd="/",
            capture_output=True,
            text=True,
            check=False,
        )
        wall = time.perf_counter() - t
        stop.set()
        reader.join()
        if done.returncode:
            raise RuntimeError(f"init-db failed: {done.stderr}")
        keys = [
            (float(b), float(lk))
            for b, lk in re.findall(r"index built in (\d+\.\d+)s.*?table locked for (\d+\.\d+)s", done.stdout)
        ]
        rows = stack.sql(
            f'SELECT count(*), count(*) FILTER (WHERE incarnation = 0) FROM "{schema}".website_metrics'
        )
        if rows[0] != (n, n):
            raise RuntimeError(f"after the upgrade the table holds {rows[0]}, not {n} rows of incarnation 0")
        return {
            "fill_s": filled,
            "init_db_s": wall,
            "metrics_index_build_s": keys[0][0],
            "metrics_key_swap_s": keys[0][1],
            "rejects_index_build_s": keys[1][0],
            "rejects_key_swap_s": keys[1][1],
            "longest_read_wait_s": max(waits) if waits else 0.0,
        }
    finally:
        stack.drop_schema(schema)


# -- from 2ad411b: partitioning a plain metrics table while 2ad411b's job loads into it ---------------


def fill_2ad411b(stack: Stack, schema: str, n: int) -> None:
    """2ad411b's tables with ``n`` checks over the last 30 days (1,000 URLs, 3% failed)."""
    q = f'"{schema}"'
    stack.sql(f"CREATE SCHEMA {q}")
    stack.sql(DDL_2AD411B.read_text().replace("{schema}", q))
    stack.sql(
        f"INSERT INTO {q}.website_metrics (url, status_code, response_time_ms, regex_pattern, regex_matched, "
        'checked_at, error, topic, partition, incarnation, "offset", kafka_timestamp, run_id) '
        "SELECT 'https://site-' || lpad((i % 1000)::text, 5, '0') || '.example.com/health', "
        "CASE WHEN i % 33 = 0 THEN NULL ELSE 200 END, "
        "CASE WHEN i % 33 = 0 THEN NULL ELSE 20 + (i % 997) END, "
        "'ok', CASE WHEN i % 33 = 0 THEN NULL ELSE true END, "
        f"date_trunc('hour', now()) - interval '30 days' + (i::float8 / {n}) * interval '29 days', "
        "CASE WHEN i % 33 = 0 THEN 'connection refused' END, "
        "'bench-history', i % 6, 0, i / 6, NULL, 'old-run' "
        f"FROM generate_series(0, {n - 1}) AS i"
    )
    stack.sql(f"ANALYZE {q}.website_metrics")


def offsets_probe(stack: Stack, schema: str, stop: threading.Event, seen: list[tuple[float, int]]) -> None:
    """Every 10 ms, the sum of the committed offsets in ``schema``; each change with its time."""
    import psycopg2

    conn = psycopg2.connect(stack.db_url, password=stack.db_password)
    conn.autocommit = True
    last = -1
    try:
        with conn.cursor() as cur:
            while not stop.is_set():
                cur.execute(f'SELECT coalesce(sum(next_offset), 0) FROM "{schema}".etl_offsets')
                (value,) = cur.fetchone()
                if value != last:
                    seen.append((time.perf_counter(), int(value)))
                    last = value
                time.sleep(0.01)
    finally:
        conn.close()


def once_2ad411b(stack: Stack, n: int, load_n: int, old: Path, workdir: Path) -> dict[str, Any]:
    from readers import generate, produce

    label = uuid.uuid4().hex[:8]
    schema, topic = f"upgrade2ad_{label}", f"bench-upgrade-{label}"
    try:
        t = time.perf_counter()
        fill_2ad411b(stack, schema, n)
        fill_s = time.perf_counter() - t
        data = generate(
            load_n, 1000, 0.25, datetime.now(UTC).replace(minute=0, second=0, microsecond=0), 6, workdir
        )
        produce(stack, topic, data["files"], load_n)
        seen: list[tuple[float, int]] = []
        stop = threading.Event()
        reader = threading.Thread(target=offsets_probe, args=(stack, schema, stop, seen))
        reader.start()
        env = stack.env(
            METRIC_ETL_DB_SCHEMA=schema,
            METRIC_ETL_TOPIC=topic,
            METRIC_ETL_GROUP_ID=schema,
            PYTHONPATH=str(old),
        )
        load = subprocess.Popen(
            [sys.executable, "-m", "etl", "run", "--output", "json", "-q"],
            env=env,
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        while not any(v > 0 for _, v in seen) and load.poll() is None:
            time.sleep(0.05)
        time.sleep(0.5)
        start = time.perf_counter()
        done = subprocess.run(
            [str(BIN / "metric-etl"), "init-db"],
            env=stack.env(METRIC_ETL_DB_SCHEMA=schema),
            cwd=workdir,
            capture_output=True,
            text=True,
            check=False,
        )
        end = time.perf_counter()
        out, err = load.communicate()
        load_end = time.perf_counter()
        stop.set()
        reader.join()
        if done.returncode:
            raise RuntimeError(f"init-db failed: {done.stdout}{done.stderr}")
        report = json.loads(out) if out.strip().startswith("{") else {"stderr": err[-2000:]}
        waited = re.search(r"loads waited for (\d+\.\d+)s", done.stdout)
        times = [t for t, v in seen if v > 0]
        during = [b - a for a, b in itertools.pairwise(times) if b > start and a < end]
        before = [b - a for a, b in itertools.pairwise(times) if b <= start]
        ((rows, keys, history, loaded_rows, parts),) = stack.sql(
            f'SELECT count(*), count(DISTINCT (topic, partition, incarnation, "offset")), '
            "count(*) FILTER (WHERE topic = 'bench-history'), count(*) FILTER (WHERE topic = %s), "
            f"(SELECT count(*) FROM pg_partition_tree('\"{schema}\".website_metrics') WHERE isleaf) "
            f'FROM "{schema}".website_metrics'.replace("%s", f"'{topic}'")
        )
        t = time.perf_counter()
        check = subprocess.run(
            [str(BIN / "metric-etl"), "rollups", "check", "--output", "json", "-q"],
            env=stack.env(METRIC_ETL_DB_SCHEMA=schema),
            cwd=workdir,
            capture_output=True,
            text=True,
            check=False,
        )
        check_s = time.perf_counter() - t
        loaded = report.get("loaded")
        return {
            "rows": n,
            "fill_s": round(fill_s, 1),
            "init_db_s": round(end - start, 2),
            "init_db_output": done.stdout.strip().splitlines(),
            "loads_waited_s": float(waited[1]) if waited else None,
            "load_messages": load_n,
            "load_exit_code": load.returncode,
            "load_report": {
                k: report.get(k) for k in ("status", "cycles", "read", "loaded", "rejected", "duplicates")
            }
            if "status" in report
            else report,
            "load_still_running_at_init_db_end": load_end > end + 0.2,
            "max_commit_gap_before_s": round(max(before), 3) if before else None,
            "max_commit_gap_during_init_db_s": round(max(during), 3) if during else None,
            "commits_during_init_db": len(during),
            "rows_after": rows,
            "distinct_keys_after": keys,
            "history_rows_after": history,
            "loaded_rows_after": loaded_rows,
            "partitions_after": parts,
            "no_row_lost_or_doubled": rows == keys and history == n and loaded_rows == loaded,
            "rollups_check": {
                "exit_code": check.returncode,
                "wall_s": round(check_s, 2),
                "result": json.loads(check.stdout)
                if check.stdout.strip().startswith("{")
                else check.stderr[-2000:],
            },
        }
    finally:
        delete_topics(stack, [topic])
        stack.drop_schema(schema)


def markdown_2ad411b(r: dict[str, Any]) -> str:
    m = r["median"]
    lines = [
        "## The upgrade from 2ad411b (init-db partitions a plain metrics table)",
        "",
        f"Reproduce: `{r['command']}`. {r['rows']:,} checks in 2ad411b's layout "
        "(tests/schemas/schema_2ad411b.sql), 2ad411b's own `metric-etl run` loading "
        f"{r['runs'][0]['load_messages']:,} messages into it while the current `metric-etl init-db` runs; "
        f"medians of {len(r['runs'])}.",
        "",
        "| measurement | value |",
        "|---|---:|",
        f"| init-db, wall s (index, range check, swap, rollups built from the rows) | {m['init_db_s']:.2f} |",
        "| loads waited for (init-db's own account: the swap under ACCESS EXCLUSIVE) | "
        f"{m['loads_waited_s']:.2f} s |",
        f"| the old load's longest gap between commits: before / during init-db | "
        f"{m['max_commit_gap_before_s'] or 'n/a'} s / {m['max_commit_gap_during_init_db_s']} s |",
    ]
    for i, run in enumerate(r["runs"], 1):
        rep = run["load_report"]
        lines.append(
            f"| run {i}: rows after = kept + loaded, no key twice | {run['rows_after']:,} = "
            f"{run['history_rows_after']:,} + {run['loaded_rows_after']:,} "
            f"({'yes' if run['no_row_lost_or_doubled'] else '**no**'}); the old load exit "
            f"{run['load_exit_code']}, {rep.get('status')}, loaded {rep.get('loaded')}, "
            f"{run['commits_during_init_db']} commits during init-db; {run['partitions_after']} partitions |"
        )
        c = run["rollups_check"]
        differ = c["result"].get("differ", {}) if isinstance(c["result"], dict) else {}
        lines.append(
            f"| run {i}: `metric-etl rollups check` afterwards | exit {c['exit_code']} "
            f"in {c['wall_s']:.1f} s; rows differing: "
            + ", ".join(f"{k} {v:,}" for k, v in differ.items() if k != "since")
            + " |"
        )
    lines.append("")
    return "\n".join(lines)


def from_2ad411b(stack: Stack, args: argparse.Namespace, argv: list[str] | None) -> int:
    """``--from 2ad411b``: see the module's docstring."""
    from readers import write_results

    workdir = Path(tempfile.mkdtemp(prefix="metric-etl-upgrade-"))
    old = workdir / "base-2ad411b"
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(old), "2ad411b"], cwd=REPO, check=True, capture_output=True
    )
    try:
        runs = []
        for i in range(args.repeat):
            result = once_2ad411b(stack, args.rows, args.load_messages, old, workdir)
            runs.append(result)
            print(f"{i + 1}/{args.repeat}: {json.dumps(result, default=str)}", flush=True)
        keys = ("init_db_s", "loads_waited_s", "max_commit_gap_before_s", "max_commit_gap_during_init_db_s")
        med = {
            k: statistics.median(vs) if (vs := [r[k] for r in runs if r[k] is not None]) else None
            for k in keys
        }
        result = {
            "command": " ".join(["bench/upgrade.py", *(argv if argv is not None else sys.argv[1:])]),
            "commit": git_commit(),
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "rows": args.rows,
            "median": med,
            "runs": runs,
        }
        text = markdown_2ad411b(result)
        write_results(args.out_dir, "upgrade", result, text)
        print(text)
        return 0
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=REPO, check=False)
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--rows", type=int, default=1_000_000)
    ap.add_argument("-r", "--repeat", type=int, default=3)
    ap.add_argument("--from", dest="base", choices=("5cc9f5c", "2ad411b"), default="5cc9f5c")
    ap.add_argument("--load-messages", type=int, default=600_000, help="the old load beside (2ad411b)")
    ap.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    stack = Stack.from_env()
    if args.base == "2ad411b":
        return from_2ad411b(stack, args, argv)
    results = []
    for i in range(args.repeat):
        result = once(stack, args.rows)
        results.append(result)
        print(f"{i + 1}/{args.repeat}: { ({k: round(v, 2) for k, v in result.items()}) }", flush=True)
    med = {k: round(statistics.median(r[k] for r in results), 2) for k in results[0]}
    print(f"{args.rows:,} rows, medians of {args.repeat}: {med}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
