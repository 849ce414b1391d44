"""CPU per message, side by side: the job at the baseline commit and the current one, on the same backlog.

    make bench                                         # 100,000 messages, 3 repeats -> bench/results/cpu.*
    make bench BENCH_ARGS="-n 500000 -n 1000000"       # the sizes issue 22's targets are measured at
    .venv/bin/python bench/cpu.py -n 20000 --repeat 1 --out-dir /tmp/cpu   # a quick check

The baseline (``--baseline``, default 2ad411b, the commit issue 22 measured) is a pinned copy of that
commit (``git archive``) under ``~/.cache/metric-etl/baseline-<commit>/`` with a virtualenv of its own,
both made here the first time. The current job is this checkout with the interpreter running this script.

For each size: a fresh topic of N sample messages (1% corrupted, 6 partitions), then ``--repeat`` times,
in rotating order, each contender's ``python -m etl run --output json -q`` with built-in defaults
(an empty working directory), a fresh schema and group, draining the backlog; then a second run of the
same group (caught up: nothing to read). Each run's CPU is user + system from its own rusage
(``os.wait4``), which the other work on a shared machine does not move the way it moves wall time.
Reported, medians:

- the CPU each message adds: (run CPU - caught-up run CPU) / messages, and its ratio to the baseline's;
- a caught-up run's CPU (start-up, connect, one empty poll) and its ratio to the baseline's;
- the default single-process run's wall time, start-up included, against PostgreSQL alone storing the
  same rows (``bench/run.py``'s measure: ``psql \\copy`` of the loaded rows in binary form into a fresh
  metrics table, once in each round, right after that round's runs), as a ratio of rates: the median
  of the rounds' ratios, so that each ratio compares runs made minutes apart, not across the session;
- peak RSS (``ru_maxrss``);
- the current job's wall and CPU on a backlog 10% corrupted against a clean one (``--corrupt-messages``);
- each stage's CPU per message, read / decode / validate / encode / COPY, measured one after the other in
  one thread by ``bench/stage_cpu.py`` with each contender's own code (on ``--stage-messages``).

Writes ``<out-dir>/cpu.json`` and ``<out-dir>/cpu.md`` (``bench/results``); topics and schemas it made
are dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import REPO, Bench, Stack, Topic, delete_topics, ensure_tools, git_commit, make_topic, measure

BASELINE = "2ad411b"
TARGETS = {  # issue 22
    "per_message_over_baseline": ("<=", 0.5),
    "caught_up_over_baseline": ("<=", 0.67),
    "peak_rss_mb": ("<=", 300.0),
    "corrupt_over_clean": ("<=", 1.25),
}
# the default run's rate over PostgreSQL alone's, by backlog size (issue 22)
OVER_DATABASE = {500_000: 0.5, 1_000_000: 0.6}
STAGES = ("read", "decode", "validate", "encode", "copy")


@dataclass(frozen=True)
class Contender:
    name: str
    python: Path
    checkout: Path


def compiled(who: Contender) -> Contender:
    """``who`` with its package's bytecode written, as ``pip install`` writes it.

    Without it a run compiles every module it imports from source (PYTHONDONTWRITEBYTECODE set, or
    a checkout not writable), about 0.1 s of CPU that an installed job never pays; both contenders
    are measured the same way.
    """
    subprocess.run([str(who.python), "-m", "compileall", "-q", str(who.checkout / "etl")], check=True)
    return who


def baseline(commit: str) -> Contender:
    """The pinned copy of ``commit`` and its virtualenv, made once under the cache directory."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "metric-etl"
    home = cache / f"baseline-{commit}"
    src, venv = home / "src", home / "venv"
    stamp = home / ".installed"
    if not stamp.exists():
        shutil.rmtree(home, ignore_errors=True)
        src.mkdir(parents=True)
        print(f"bench: a pinned copy of {commit} and its virtualenv in {home}", file=sys.stderr)
        archive = subprocess.run(
            ["git", "archive", "--format=tar", commit], cwd=REPO, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, str(src)], check=True)
        stamp.touch()
    return Contender("baseline", venv / "bin" / "python", src)


class Runs:
    """``python -m etl run`` of each contender, measured by its rusage."""

    def __init__(self, stack: Stack, workdir: Path, label: str) -> None:
        self.stack = stack
        self.workdir = workdir
        self.label = label
        self.empty = workdir / "cwd"
        self.empty.mkdir(exist_ok=True)

    def drain(self, who: Contender, topic: Topic, keep_rows: Path | None = None) -> dict[str, Any]:
        """A run draining ``topic`` into a fresh schema, then a caught-up run of the same group."""
        schema = f"cpu_{self.label}_{who.name}_{uuid.uuid4().hex[:6]}"
        try:
            first = self._run(who, topic, schema, expect=topic.messages)
            ((loaded, rejected),) = self.stack.sql(
                f'SELECT (SELECT count(*) FROM "{schema}".website_metrics),'
                f' (SELECT count(*) FROM "{schema}".website_metrics_rejects)'
            )
            if loaded + rejected != topic.messages:
                raise RuntimeError(f"{schema}: {loaded} loaded + {rejected} rejected != {topic.messages}")
            caught_up = self._run(who, topic, schema, expect=0)
            if keep_rows is not None and not keep_rows.exists():
                columns = ", ".join(f'"{c}"' for c in _metric_columns())
                subprocess.run(
                    [
                        "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", self.stack.db_url, "-c",
                        f'\\copy (SELECT {columns} FROM "{schema}".website_metrics) TO '
                        f"'{keep_rows}' WITH (FORMAT binary)",
                    ],
                    env=self.stack.env(),
                    check=True,
                )  # fmt: skip
        finally:
            self.stack.drop_schema(schema)
        return {
            "messages": topic.messages,
            "wall_s": round(first["wall_s"], 3),
            "cpu_s": round(first["cpu_s"], 3),
            "peak_rss_mb": round(first["peak_rss_mb"], 1),
            "caught_up_cpu_s": round(caught_up["cpu_s"], 3),
            "caught_up_wall_s": round(caught_up["wall_s"], 3),
            "per_message_us": round((first["cpu_s"] - caught_up["cpu_s"]) / topic.messages * 1e6, 3),
            "stages_s": first["timings"],
        }

    def _run(self, who: Contender, topic: Topic, schema: str, expect: int) -> dict[str, Any]:
        env = self.stack.env(
            METRIC_ETL_TOPIC=topic.name,
            METRIC_ETL_GROUP_ID=schema,
            METRIC_ETL_DB_SCHEMA=schema,
            PYTHONPATH=str(who.checkout),
        )
        base = self.workdir / f"{schema}-{expect}"
        out, err = base.with_suffix(".json"), base.with_suffix(".log")
        cmd = [str(who.python), "-m", "etl", "run", "--output", "json", "-q"]
        m = measure([cmd], env, self.empty, out, err)
        report = json.loads(out.read_text() or "{}")
        if m.exit_codes != [0] or report.get("status") != "ok" or report.get("read") != expect:
            raise RuntimeError(f"{who.name} run failed ({m.exit_codes}): {report or err.read_text()[-2000:]}")
        return {"wall_s": m.wall_s, "cpu_s": m.cpu_s, "peak_rss_mb": m.peak_rss_mb, **report}

    def stages(self, who: Contender, topic: Topic, limit: int) -> dict[str, Any]:
        """bench/stage_cpu.py with the contender's interpreter and code."""
        schema = f"cpu_{self.label}_stages_{uuid.uuid4().hex[:6]}"
        cmd = [
            str(who.python),
            str(REPO / "bench" / "stage_cpu.py"),
            str(who.checkout),
            topic.name,
            schema,
            "--limit",
            str(limit),
        ]
        done = subprocess.run(cmd, env=self.stack.env(), cwd=self.empty, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"stage_cpu.py failed for {who.name}: {done.stderr[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def _metric_columns() -> tuple[str, ...]:
    from etl.contract import METRIC_COLUMNS

    return METRIC_COLUMNS


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each number over the runs, and the runs themselves."""
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float)]
    out: dict[str, Any] = {k: round(statistics.median(r[k] for r in runs), 3) for k in keys}
    out["stages_s"] = {
        k: round(statistics.median(r["stages_s"].get(k, 0.0) for r in runs), 3) for k in runs[0]["stages_s"]
    }
    out["runs"] = runs
    return out


def measure_size(
    args: argparse.Namespace, stack: Stack, runs: Runs, bench: Bench, who: list[Contender], n: int, log: Any
) -> dict[str, Any]:
    """Every measurement at one backlog size."""
    topics: list[str] = []

    def topic(kind: str, count: int, ratio: float) -> Topic:
        t = make_topic(stack, f"bench-cpu-{runs.label}-{kind}-{count}", count, ratio, 6, runs.workdir)
        topics.append(t.name)
        log(f"topic {t.name}: {count:,} messages, {ratio:.0%} corrupted")
        return t

    try:
        main = topic("main", n, 0.01)
        rows = runs.workdir / f"rows-{n}.bin"
        drains: dict[str, list[dict[str, Any]]] = {c.name: [] for c in who}
        database: list[Any] = []  # PostgreSQL alone, once a round, right after the round's runs: side by side
        for i in range(args.repeat):
            for c in who[i % len(who) :] + who[: i % len(who)]:
                keep = rows if c.name == "current" else None
                r = runs.drain(c, main, keep_rows=keep)
                drains[c.name].append(r)
                log(
                    f"{n:,} {i + 1}/{args.repeat} {c.name}: wall {r['wall_s']:.2f}s, cpu {r['cpu_s']:.2f}s, "
                    f"caught up {r['caught_up_cpu_s']:.2f}s, {r['per_message_us']:.2f} us/msg, "
                    f"{r['peak_rss_mb']:.0f} MB"
                )
            database.append(bench.database(main, rows))
            log(f"{n:,} {i + 1}/{args.repeat} PostgreSQL alone: {database[-1].wall_s:.2f}s")
        db_wall = statistics.median(d.wall_s for d in database)
        # the current job's rate over PostgreSQL alone's in each round, then their median
        over_database = {
            c.name: statistics.median(
                d.wall_s / r["wall_s"] for d, r in zip(database, drains[c.name], strict=True)
            )
            for c in who
        }
        stage_n = min(n, args.stage_messages)
        stages = {c.name: runs.stages(c, main, stage_n) for c in who}
        log(f"{n:,} stages (us/msg): {stages}")
        corrupt_n = args.corrupt_messages or n
        clean_t, dirty_t = topic("clean", corrupt_n, 0.0), topic("corrupt10", corrupt_n, 0.10)
        current = who[-1]
        corruption: dict[str, list[dict[str, Any]]] = {"clean": [], "corrupt": []}
        for i in range(args.repeat):
            pair = [("clean", clean_t), ("corrupt", dirty_t)]
            for kind, t in pair[i % 2 :] + pair[: i % 2]:
                corruption[kind].append(runs.drain(current, t))
        summary = {c.name: median_of(drains[c.name]) for c in who}
    finally:
        delete_topics(stack, topics)
        rows.unlink(missing_ok=True)

    base, cur = summary["baseline"], summary["current"]
    clean, dirty = median_of(corruption["clean"]), median_of(corruption["corrupt"])
    db_rate = database[0].messages / db_wall
    result: dict[str, Any] = {
        "messages": n,
        "baseline": base,
        "current": cur,
        "database": {"rows": database[0].messages, "wall_s": round(db_wall, 3), "rows_per_s": round(db_rate)},
        "ratios": {
            "per_message_over_baseline": round(cur["per_message_us"] / base["per_message_us"], 3),
            "caught_up_over_baseline": round(cur["caught_up_cpu_s"] / base["caught_up_cpu_s"], 3),
            "run_cpu_over_baseline": round(cur["cpu_s"] / base["cpu_s"], 3),
            "current_over_database": round(over_database["current"], 3),
            "baseline_over_database": round(over_database["baseline"], 3),
            "corrupt_over_clean": round(dirty["wall_s"] / clean["wall_s"], 3),
            "corrupt_over_clean_cpu": round(dirty["cpu_s"] / clean["cpu_s"], 3),
        },
        "corruption": {"messages": corrupt_n, "clean": clean, "corrupt": dirty},
        "stages_us_per_message": stages,
    }
    r = result["ratios"]
    values = {
        "per_message_over_baseline": r["per_message_over_baseline"],
        "caught_up_over_baseline": r["caught_up_over_baseline"],
        "peak_rss_mb": cur["peak_rss_mb"],
        "corrupt_over_clean": r["corrupt_over_clean"],
    }
    checks = dict(TARGETS)
    if n in OVER_DATABASE:
        checks["current_over_database"] = (">=", OVER_DATABASE[n])
        values["current_over_database"] = r["current_over_database"]
    result["targets"] = {
        k: {"target": f"{op} {limit:g}", "value": values[k], "met": _met(values[k], op, limit)}
        for k, (op, limit) in checks.items()
    }
    return result


def _met(value: float, op: str, limit: float) -> bool:
    return value >= limit if op == ">=" else value <= limit


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# CPU per message: {result['baseline_commit']} against {result['commit']} "
        f"({result['started_at'][:10]})",
        "",
        f"`{result['command']}`; medians of {result['repeat']} runs side by side, rotating order; "
        f"1-minute load average {result['load_average_1m']['start']} at the start, "
        f"{result['load_average_1m']['end']} at the end ({os.cpu_count()} cores).",
        "",
    ]
    for size in result["sizes"]:
        n, b, c, r = size["messages"], size["baseline"], size["current"], size["ratios"]
        lines += [
            f"## {n:,} messages",
            "",
            "| | baseline | current | current / baseline |",
            "|---|---:|---:|---:|",
            f"| run CPU, s (user + system) | {b['cpu_s']:.2f} | {c['cpu_s']:.2f} "
            f"| {r['run_cpu_over_baseline']:.3f} |",
            f"| caught-up run CPU, s | {b['caught_up_cpu_s']:.3f} | {c['caught_up_cpu_s']:.3f} "
            f"| **{r['caught_up_over_baseline']:.3f}** |",
            f"| CPU each message adds, us | {b['per_message_us']:.2f} | {c['per_message_us']:.2f} "
            f"| **{r['per_message_over_baseline']:.3f}** |",
            f"| wall, s (start-up included) | {b['wall_s']:.2f} | {c['wall_s']:.2f} | "
            f"{c['wall_s'] / b['wall_s']:.3f} |",
            f"| msg/s over PostgreSQL alone ({size['database']['rows_per_s']:,} rows/s) "
            f"| {r['baseline_over_database']:.3f} | **{r['current_over_database']:.3f}** | |",
            f"| peak RSS, MB | {b['peak_rss_mb']:.0f} | {c['peak_rss_mb']:.0f} | |",
            "",
            f"10% corrupted against clean ({size['corruption']['messages']:,} messages, current): wall "
            f"{r['corrupt_over_clean']:.3f}x, CPU {r['corrupt_over_clean_cpu']:.3f}x.",
            "",
            "CPU per message by stage, us (bench/stage_cpu.py, one thread, "
            f"{size['stages_us_per_message']['current']['messages']:,} messages):",
            "",
            "| stage | baseline | current |",
            "|---|---:|---:|",
        ]
        st = size["stages_us_per_message"]
        for stage in (*STAGES, "total"):
            lines.append(f"| {stage} | {st['baseline'][stage]:.2f} | {st['current'][stage]:.2f} |")
        lines += ["", "| target (issue 22) | value | target | met |", "|---|---:|---:|:---:|"]
        for k, t in size["targets"].items():
            lines.append(f"| {k} | {t['value']:.3g} | {t['target']} | {'yes' if t['met'] else '**no**'} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "-n",
        "--messages",
        type=int,
        action="append",
        help="backlog size; repeat for several (default 100,000)",
    )
    ap.add_argument("--repeat", type=int, default=3, help="runs of each measurement; medians are quoted")
    ap.add_argument("--baseline", default=BASELINE, help=f"the commit to compare with (default {BASELINE})")
    ap.add_argument("--corrupt-messages", type=int, help="backlog of the 0%% / 10%% comparison (default -n)")
    ap.add_argument("--stage-messages", type=int, default=200_000, help="messages the stage table reads")
    ap.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    sizes = args.messages or [100_000]

    stack = Stack.from_env()
    ensure_tools()
    who = [compiled(baseline(args.baseline)), compiled(Contender("current", Path(sys.executable), REPO))]
    label = uuid.uuid4().hex[:6]
    workdir = Path(tempfile.mkdtemp(prefix="metric-etl-cpu-"))
    runs, bench = Runs(stack, workdir, label), Bench(stack, workdir, label)
    started, load_start, t0 = datetime.now(UTC), os.getloadavg()[0], time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {message}", file=sys.stderr, flush=True)

    try:
        measured = [measure_size(args, stack, runs, bench, who, n, log) for n in sizes]
    finally:
        bench.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    result = {
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["bench/cpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "commit": git_commit(),
        "baseline_commit": args.baseline,
        "repeat": args.repeat,
        "load_average_1m": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
        "sizes": measured,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / "cpu.md").write_text(markdown(result))
    print(markdown(result))
    log(f"wrote {args.out_dir / 'cpu.json'} and cpu.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
