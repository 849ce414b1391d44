"""The README's "A run and its report" block: what `make demo` prints, for real.

``make readme-demo`` (``python -m tests.demo_transcript --write``) runs scripts/demo.sh and writes its output
between the README's markers; tests/test_readme_commands.py runs the demo again and compares the two, with
what varies from run to run masked (times, run ids, durations, throughput) and the counts kept exact.

The demo runs on a throwaway topic and schema, deleted afterwards: the stack may be shared, and its
``website-metrics`` topic may hold an earlier demo's backlog, which a second demo would show beside the new
one. The throwaway topic's name is as long as ``website-metrics`` (so the printed columns keep their widths)
and is written as ``website-metrics``, the topic a fresh machine's demo uses; the checkout's path is written
as /home/you/metric-etl. Everything else is the demo's own output.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BEGIN = "<!-- demo-transcript: begin (written by `make readme-demo`; do not edit by hand) -->"
END = "<!-- demo-transcript: end -->"
TOPIC = "website-metrics"
CHECKOUT = "/home/you/metric-etl"
# The settings the demo takes from the stack's env file; every other METRIC_ETL_* of the caller is left
# out, so the demo runs with the defaults a fresh machine has.
STACK_SETTINGS = ("METRIC_ETL_BOOTSTRAP_SERVERS", "METRIC_ETL_DB_URL", "METRIC_ETL_DB_PASSWORD")


def run_demo(env: Mapping[str, str] | None = None) -> str:
    """scripts/demo.sh's stdout and stderr, as one terminal shows them, on a throwaway topic and schema.

    ``env`` holds the stack's settings (default: this process's environment, the env file sourced); its
    other METRIC_ETL_* settings are left out."""
    base = os.environ if env is None else env
    topic = f"readme-{secrets.token_hex(4)}"  # 15 characters, as many as website-metrics
    schema = topic.replace("-", "_")
    run_env = {k: v for k, v in base.items() if not k.startswith("METRIC_ETL_") or k in STACK_SETTINGS}
    missing = [name for name in STACK_SETTINGS if name not in run_env]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not set: source the stack's env file first (. .stack/env)")
    run_env.update(METRIC_ETL_TOPIC=topic, METRIC_ETL_DB_SCHEMA=schema)
    try:
        proc = subprocess.run(
            ["bash", str(REPO / "scripts" / "demo.sh")],
            cwd=REPO,
            env=run_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=600,
        )
    finally:
        _drop(topic, schema, run_env)
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/demo.sh exited {proc.returncode}:\n{proc.stdout}")
    return proc.stdout.replace(topic, TOPIC).replace(str(REPO), CHECKOUT)


def _drop(topic: str, schema: str, env: Mapping[str, str]) -> None:
    """Delete the throwaway topic and schema; a leftover is reported, never raised."""
    import sqlalchemy as sa
    from kafka.admin import KafkaAdminClient

    try:
        admin = KafkaAdminClient(
            bootstrap_servers=env["METRIC_ETL_BOOTSTRAP_SERVERS"], request_timeout_ms=15_000
        )
        try:
            admin.delete_topics([topic], timeout_ms=15_000)
        finally:
            admin.close()
    except Exception as exc:
        print(f"could not delete topic {topic}: {exc!r}", file=sys.stderr)
    url = sa.make_url(env["METRIC_ETL_DB_URL"]).set(
        drivername="postgresql+psycopg2", password=env["METRIC_ETL_DB_PASSWORD"]
    )
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    except Exception as exc:
        print(f"could not drop schema {schema}: {exc!r}", file=sys.stderr)
    finally:
        engine.dispose()


def render(output: str) -> str:
    """The README block for the demo's output: the command, then its lines after the stack's set-up."""
    return f"{BEGIN}\n```console\n$ make demo\n...\n{output.strip(chr(10))}\n```\n{END}"


def block_of(readme: str) -> str:
    """The README's demo block, markers included (the begin marker found by its first words)."""
    start = readme.index(BEGIN.split(" (", 1)[0])
    end = readme.index(END, start)
    return readme[start : end + len(END)]


def write_readme(output: str, path: Path = README) -> None:
    """Put ``output`` between the README's markers."""
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace(block_of(text), render(output)), encoding="utf-8")


_TIME = re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:\.\d+)?Z?")
_RUN_ID = re.compile(r"\b[0-9a-f]{16}\b")
_SECONDS = re.compile(r"\b\d+(?:\.\d+)?s\b")
_RATE = re.compile(r"\([\d,]+ msg/s\)")
_CYCLES = re.compile(r"\b\d+ cycles?(?= \(\d+ empty polls?\)| in\b)")
_EMPTY_POLLS = re.compile(r"\(\d+ empty polls?\)")
# The consumer group's assignment lines: how often a group rebalances while it forms depends on timing.
_GROUP = re.compile(r"INFO (assigned partitions|partitions revoked|positioned partitions)")
_CYCLE = re.compile(r"INFO cycle \d+: read (\d+), loaded (\d+), rejected (\d+), duplicates (\d+)$")
_RUNS_ROW_SECS = re.compile(r"^(<time>\s+\S+\s+\S+\s+)\d+\.\d+")


def mask(transcript: str) -> list[str]:
    """The transcript's lines with what varies from run to run masked; counts are kept.

    Times, run ids, durations and msg/s are masked; the group's assignment lines are dropped; cycle
    lines are added up into one (a busy machine may read the backlog in two polls, not one); runs of
    spaces become one (a masked number no longer sets a column's width).
    """
    lines: list[str] = []
    cycles: list[int] | None = None
    for raw in transcript.splitlines():
        if _GROUP.search(raw):
            continue
        line = _TIME.sub("<time>", raw)
        line = _RUN_ID.sub("<run>", line)
        line = _RATE.sub("(<rate> msg/s)", line)
        line = _CYCLES.sub("<cycles>", line)
        line = _EMPTY_POLLS.sub("(<polls>)", line)
        line = _SECONDS.sub("<secs>", line)
        line = " ".join(line.split())
        line = _RUNS_ROW_SECS.sub(r"\1<secs>", line)
        found = _CYCLE.search(line)
        if found:
            counts = [int(n) for n in found.groups()]
            cycles = counts if cycles is None else [a + b for a, b in zip(cycles, counts, strict=True)]
            continue
        if cycles is not None:
            lines.append("<time> INFO cycles: read {}, loaded {}, rejected {}, duplicates {}".format(*cycles))
            cycles = None
        lines.append(line)
    return lines


def main(argv: list[str]) -> int:
    """``--write``: run the demo and write its output into README.md; otherwise print it."""
    output = run_demo()
    if "--write" in argv:
        write_readme(output)
        print(f"wrote the demo's output ({len(output.splitlines())} lines) into {README}")
    else:
        print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
