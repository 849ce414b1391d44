"""The upgrade of tables made by 5cc9f5c (`metric-etl init-db`): how long it locks a big metrics table.

    . .stack/env && .venv/bin/python bench/upgrade.py -n 1000000 -r 3

Each repeat makes a fresh schema with 5cc9f5c's DDL (tests/schemas/schema_5cc9f5c.sql), fills the metrics
table with N rows and the rejects table with N/100 (generate_series, values like the job's), then runs
`metric-etl init-db` as a process of its own while a probe on another connection reads the metrics
table in a loop (``SELECT 1 ... LIMIT 1``, as a run's first statement on it would). Prints init-db's
wall time, its own account of each key (the concurrent index build, then the swap that locks the
table), and the longest the probe waited: the time the table was closed to others. Medians over the
repeats.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import REPO, Stack

OLD_DDL = REPO / "tests" / "schemas" / "schema_5cc9f5c.sql"


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--rows", type=int, default=1_000_000)
    ap.add_argument("-r", "--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    stack = Stack.from_env()
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
