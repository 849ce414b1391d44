"""The README's commands, run as written against the local stack (not only their names grepped)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from tests.support import REPO, cli_env, good_message, produce, rows, run_cli

README = (REPO / "README.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    start = README.index(title)
    end = README.find("\n## ", start + len(title))
    return README[start : end if end > 0 else None]


def _console_blocks(text: str) -> list[str]:
    return re.findall(r"```console\n(.*?)```", text, re.S)


def _metric_etl(command: str, env: dict[str, str], cwd) -> subprocess.CompletedProcess[str]:
    """``metric-etl ARGS`` from a README line, as this checkout's package."""
    words = shlex.split(command.split(" #", 1)[0])
    assert words[0] == "metric-etl", command
    return subprocess.run(
        [sys.executable, "-m", "etl", *words[1:]],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_configuration_example_prints_what_the_readme_shows() -> None:
    (block,) = [b for b in _console_blocks(_section("## Configuration")) if "drop table y" in b]
    command, *shown = block.strip().splitlines()
    expected = shown[: shown.index("$ echo $?")]
    code = int(shown[shown.index("$ echo $?") + 1])
    assignments, _, rest = command.removeprefix("$ ").partition(" metric-etl ")
    env = {"PATH": "/usr/bin:/bin"}
    for word in shlex.split(assignments):
        name, _, value = word.partition("=")
        env[name] = value
    proc = subprocess.run(
        [sys.executable, "-m", "etl", *shlex.split(rest)],
        env=env,
        cwd="/",  # no ./config/service.yaml: the README's example has none
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == code
    assert proc.stderr.splitlines() == expected


@pytest.mark.services
def test_the_rejects_workflow_runs_as_written(stack, make_topic, pg_schema, admin_engine, tmp_path) -> None:
    topic = make_topic(partitions=1)
    bad = [b"{broken", good_message(1, checked_at="2026-11-28T10:00:00"), b"\xff\xfe bytes"]
    produce(stack, topic, [good_message(0), *bad])
    env = cli_env(stack, topic, pg_schema)
    assert run_cli(["run"], env).returncode == 0
    ids = [
        r[0] for r in rows(admin_engine, f'SELECT id FROM "{pg_schema}".website_metrics_rejects ORDER BY id')
    ]
    assert len(ids) == 3
    (block,) = _console_blocks(_section("## Reviewing rejects"))
    commands = [line.removeprefix("$ ") for line in block.strip().splitlines() if line.startswith("$ ")]
    assert len(commands) >= 7
    # The README's example ids, mapped onto this test's rejects.
    mapping = {"397": str(ids[0]), "396": str(ids[1]), "392": str(ids[2])}
    for command in commands:
        command = re.sub(r"\b(397|396|392)\b", lambda m: mapping[m.group(1)], command)
        proc = _metric_etl(command, env, tmp_path)
        assert proc.returncode == 0, (command, proc.stdout, proc.stderr)
        assert "Error:" not in proc.stderr, (command, proc.stderr)
    assert (tmp_path / "rejects.jsonl").read_text().count("\n") == 3


@pytest.mark.services
def test_the_monitoring_command_exits_0_after_a_good_run(stack, make_topic, pg_schema) -> None:
    (command,) = re.findall(r"`(metric-etl status --max-lag \S+ --max-age \S+)`", _section("## Scheduling"))
    topic = make_topic(partitions=1)
    produce(stack, topic, [good_message(0)])
    env = cli_env(stack, topic, pg_schema)
    assert run_cli(["run"], env).returncode == 0
    proc = _metric_etl(command, env, REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
