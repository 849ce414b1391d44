"""Throughput of the two pure stages, normalise and validate, without Kafka or PostgreSQL.

    .venv/bin/python bench/bench_stages.py              # 100 000 messages, 1% corrupted
    .venv/bin/python bench/bench_stages.py -n 200000 --corrupt 0 --unique-urls

Generates realistic ~200-byte messages (a fleet of monitored URLs, mostly successful checks, a few
failures), corrupts a share of them in the ways the hostile-input tests cover, and prints
messages/s for each stage (median of the runs). The Python loop figure at the top says how fast this
machine runs plain Python, to compare results between machines.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

# Run from a checkout without installing: the package sits next to this directory.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from etl.contract import RawMessage
from etl.normalise import normalise
from etl.validate import validate

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
PATTERNS = ["ok", "healthy", r"status:\s*up", "<title>Home</title>", None]
ERRORS = ["timeout after 10000 ms", "connection refused", "name or service not known", "TLS handshake failed"]
STATUSES = [200] * 90 + [301, 302, 404, 500, 502, 503, 204, 401, 403, 429]


def make_urls(count: int, rng: random.Random) -> list[str]:
    paths = ["/health", "/status", "/api/v1/ping", "/", "/login", "/healthz?verbose=1"]
    return [f"https://service-{i}.example{rng.randrange(1, 9)}.com{rng.choice(paths)}" for i in range(count)]


def message(rng: random.Random, urls: list[str], seq: int, unique: bool) -> dict[str, object]:
    """One check result as the producer writes it."""
    url = f"https://host-{seq}.example.net/health?n={seq}" if unique else rng.choice(urls)
    checked = NOW - timedelta(seconds=rng.randrange(0, 86_400), microseconds=rng.randrange(0, 999) * 1000)
    stamp = checked.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if rng.random() < 0.03:
        return {"url": url, "status_code": None, "response_time_ms": None, "regex_pattern": None,
                "regex_matched": None, "checked_at": stamp, "error": rng.choice(ERRORS)}  # fmt: skip
    pattern = rng.choice(PATTERNS)
    return {
        "url": url,
        "status_code": rng.choice(STATUSES),
        "response_time_ms": round(rng.lognormvariate(4.5, 0.8), 3),
        "regex_pattern": pattern,
        "regex_matched": None if pattern is None else rng.random() < 0.97,
        "checked_at": stamp,
        "error": None,
    }


def corrupt(rng: random.Random, data: bytes) -> bytes | None:
    """One of the faults the hostile-input corpus covers."""
    kind = rng.randrange(10)
    if kind == 0:
        return data[: rng.randrange(1, len(data))]  # truncated
    if kind == 1:
        i = rng.randrange(len(data))
        return data[:i] + b"\xff" + data[i + 1 :]  # invalid UTF-8
    if kind == 2:
        return data.replace(b'"status_code":', b'"status_code":"', 1).replace(
            b',"response_time_ms"', b'","response_time_ms"', 1
        )
    if kind == 3:
        return data.replace(b'"url":', b'"uri":', 1)
    if kind == 4:
        return data.replace(b'"checked_at":"', b'"checked_at":"\\u0000', 1)
    if kind == 5:
        return None  # tombstone
    if kind == 6:
        return b'{"url":"https://dup.example.com",' + data[1:]  # duplicate key
    if kind == 7:
        return data.replace(b'Z"', b'"', 1)  # no zone
    if kind == 8:
        return b"[" + data + b"]"  # not an object
    return data.replace(b'"url":"https', b'"url":"ftp', 1)


def generate(n: int, corrupt_share: float, unique_urls: bool, seed: int) -> list[RawMessage]:
    rng = random.Random(seed)
    urls = make_urls(500, rng)
    out = []
    base_ms = int(NOW.timestamp() * 1000)
    for i in range(n):
        clean = orjson.dumps(message(rng, urls, i, unique_urls))
        value = corrupt(rng, clean) if rng.random() < corrupt_share else clean
        out.append(RawMessage("website-metrics", i % 3, i // 3, base_ms + i, None, value))
    return out


def median_rates(fn: Callable[[], object], n: int, runs: int) -> tuple[float, float]:
    """messages/s from the median wall-clock time and from the median CPU time of ``runs`` runs.

    CPU time leaves out the time other processes held the core, so it varies less on a busy host.
    """
    wall, cpu = [], []
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return n / statistics.median(wall), n / statistics.median(cpu)


def python_loop_ns() -> float:
    """ns per iteration of a plain Python loop: a yardstick for this machine."""
    start = time.perf_counter()
    total = 0
    for i in range(2_000_000):
        total += i
    return (time.perf_counter() - start) / 2_000_000 * 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "-n", "--messages", type=int, default=100_000, help="messages per run (default 100000)"
    )
    parser.add_argument("--runs", type=int, default=5, help="runs per stage; the median is shown (default 5)")
    parser.add_argument(
        "--corrupt", type=float, default=0.01, help="share of corrupted messages (default 0.01)"
    )
    parser.add_argument(
        "--unique-urls", action="store_true", help="every message has its own URL (worst case)"
    )
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)

    messages = generate(args.messages, args.corrupt, args.unique_urls, args.seed)
    sizes = [len(m.value) for m in messages if m.value is not None]
    frame = normalise(messages)
    good, rejects = validate(frame, now=NOW)
    n = len(messages)
    print(f"python loop: {python_loop_ns():.0f} ns/iteration (a recent x86 core: ~20-30)")
    urls = "unique" if args.unique_urls else "500 distinct"
    print(
        f"messages: {n:,}, mean {statistics.mean(sizes):.0f} bytes, corrupted {args.corrupt:.1%}, "
        f"{urls} URLs -> good {len(good):,}, rejected {len(rejects):,}"
    )
    wall_n, cpu_n = median_rates(lambda: normalise(messages), n, args.runs)
    wall_v, cpu_v = median_rates(lambda: validate(frame, now=NOW), n, args.runs)
    print(f"median of {args.runs} runs    wall clock      CPU time")
    print(f"normalise:       {wall_n:>10,.0f} msg/s {cpu_n:>10,.0f} msg/s")
    print(f"validate:        {wall_v:>10,.0f} msg/s {cpu_v:>10,.0f} msg/s")
    both_wall, both_cpu = 1 / (1 / wall_n + 1 / wall_v), 1 / (1 / cpu_n + 1 / cpu_v)
    print(f"both, one core:  {both_wall:>10,.0f} msg/s {both_cpu:>10,.0f} msg/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
