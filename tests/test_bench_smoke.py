"""``bench/run.py --smoke`` keeps working: it runs against the stack and writes sane results.

Not a timed test: speed is the benchmark's business; this only checks that it measures something.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONTENDERS = ("etl", "workers", "raw", "naive", "database")


def test_bench_smoke_writes_results(stack, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METRIC_ETL_")}
    env.update({k: v for k, v in stack.items() if v})
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--smoke", "--out-dir", str(tmp_path)],
        env=env,
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "latest.json").read_text())
    markdown = (tmp_path / "latest.md").read_text()

    assert result["params"]["smoke"] is True
    n = result["params"]["messages"]
    assert n == 20_000
    assert 150 < result["params"]["avg_bytes"] < 250
    for name in CONTENDERS:
        s = result[name]
        assert {"messages", "wall_s", "msg_per_s", "mb_per_s", "peak_rss_mb", "runs"} <= s.keys()
        assert s["wall_s"] > 0 and s["msg_per_s"] > 0 and s["mb_per_s"] > 0
        assert 1 < s["peak_rss_mb"] < 4096
        assert s["msg_per_s"] == s["runs"][0]["msg_per_s"]  # one repeat: the median is that run
    assert result["etl"]["messages"] == result["raw"]["messages"] == n
    assert 0 < result["naive"]["messages"] <= n
    run = result["etl"]["runs"][0]["detail"]
    assert run["read"] == n and run["loaded"] + run["rejected"] == n and run["rejected"] > 0
    assert result["database"]["messages"] == run["loaded"]  # PostgreSQL alone stores the same rows
    assert {"consume", "normalise", "validate", "load"} <= result["etl"]["stages_s"].keys()
    parallel = result["workers"]["runs"][0]["detail"]
    assert parallel["read"] == n and parallel["loaded"] + parallel["rejected"] == n
    assert sum(result["etl"]["stages_s"].values()) <= result["etl"]["wall_s"]

    ratios = result["ratios"]
    assert ratios["etl_over_raw"] == round(result["etl"]["msg_per_s"] / result["raw"]["msg_per_s"], 4)
    assert ratios["etl_over_naive"] > 0
    assert result["rss_scaling"]["small_messages"] < result["rss_scaling"]["large_messages"]
    assert result["rss_scaling"]["large_over_small"] > 0
    assert result["corruption"]["corrupt_over_clean"] > 0
    assert 0 < result["startup"]["help_s"] < 30
    assert set(result["targets"]) == {
        "etl_msg_per_s",
        "etl_over_raw",
        "etl_over_naive",
        "workers_msg_per_s",
        "workers_over_raw",
        "workers_over_naive",
        "etl_peak_rss_mb",
        "rss_large_over_small",
        "corrupt_over_clean",
        "second_group_over_first",
        "help_s",
    }
    assert all(isinstance(t["met"], bool) for t in result["targets"].values())
    assert result["machine"]["cores"] >= 1 and result["versions"]["kafka-python"]
    assert "| metric-etl run (default settings) | 20,000 |" in markdown
    database_row = "| PostgreSQL alone: psql \\copy (binary) of the loaded rows into the metrics table |"
    assert f"{database_row} {run['loaded']:,} |" in markdown
