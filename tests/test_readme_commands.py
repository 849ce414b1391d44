"""The commands the README and docs/ show, checked against the real tool (not only their names grepped).

Every `metric-etl` command shown is parsed by the real command line (its command, options and values),
every `make` target named is in the Makefile, every link to a file leads to one; the README's rejects
workflow, configuration example and monitoring command run as written against the local stack, and its
"A run and its report" block is what a fresh `make demo` prints.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

from etl.cli import main
from tests import demo_transcript
from tests.support import REPO, cli_env, good_message, produce, rows, run_cli

README = (REPO / "README.md").read_text(encoding="utf-8")
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


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


# -- every command shown, against the real tool -----------------------------------------------------

# A span with one of these is a pattern, not a command: `metric-etl COMMAND --help`, `--to earliest\|latest`,
# `rejects list / show`, `metric-etl run --metrics-file …`.
_PLACEHOLDER = re.compile(r"…|\.\.\.|\\\||<|>| / |\b[A-Z][A-Z_]*\b")


def _shown_commands(text: str) -> list[str]:
    """The `metric-etl …` commands a page shows: its inline code spans and its console blocks' `$` lines,
    a pipe's first command only; patterns with placeholders are left out."""
    found: list[str] = []
    for block in _console_blocks(text):
        for line in block.splitlines():
            if line.startswith("$ "):
                words = shlex.split(line[2:], comments=True)
                at = [i for i, w in enumerate(words) if w == "metric-etl" or w.endswith("/metric-etl")]
                if at:
                    found.append(" ".join(shlex.quote(w) for w in ["metric-etl", *words[at[0] + 1 :]]))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`(metric-etl [^`]+)`", prose):
        command = " ".join(span.split()).split(" | ", 1)[0]
        if not _PLACEHOLDER.search(command):
            found.append(command)
    return found


def _parse(words: list[str]) -> None:
    """Parse ``metric-etl WORDS`` as the real command line does, without running it; raises a click
    UsageError (unknown command or option, bad value) when the command line would refuse it."""
    command: click.Command = main
    name, args, parent = "metric-etl", words, None
    while True:
        try:
            ctx = command.make_context(name, list(args), parent=parent)
        except click.exceptions.Exit as done:  # --help, --version
            assert done.exit_code == 0, words
            return
        if not isinstance(command, click.Group):
            return
        rest = [*ctx._protected_args, *ctx.args]
        if not rest:
            return
        found, sub, args = command.resolve_command(ctx, rest)
        assert found is not None and sub is not None, words
        name, command, parent = found, sub, ctx


SHOWN = sorted({(path.name, cmd) for path in DOC_FILES for cmd in _shown_commands(path.read_text("utf-8"))})


def test_the_pages_show_commands() -> None:
    # Guards the extraction itself: a change that finds nothing would let every command below pass.
    assert len(SHOWN) >= 25, SHOWN
    assert {page for page, _ in SHOWN} >= {"README.md", "operations.md", "commands.md"}


@pytest.mark.parametrize(("page", "command"), SHOWN)
def test_every_command_shown_is_one_the_tool_accepts(page: str, command: str) -> None:
    words = shlex.split(command)[1:]
    try:
        _parse(words)
    except click.MissingParameter:
        # `metric-etl offsets reset` in a sentence names the command; its required --to is given
        # wherever the page shows it run. A command that does not exist fails in _parse before this.
        assert not any(w.startswith("-") for w in words), command
    except click.UsageError as exc:
        pytest.fail(f"{page} shows `{command}`, which metric-etl refuses: {exc.format_message()}")


def _make_targets() -> set[str]:
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([a-z][a-z-]*):", makefile, re.M))


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: p.name)
def test_every_make_target_named_is_in_the_makefile(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    code = " ".join(re.findall(r"```.*?```", text, re.S) + re.findall(r"`[^`\n]+`", text))
    named = set(re.findall(r"(?<![\w-])make ([a-z][a-z-]*)", code))
    assert named - _make_targets() == set(), f"{path.name} names make targets the Makefile lacks"


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {_anchor(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: p.name)
def test_every_link_leads_to_a_file_and_a_heading(path: Path) -> None:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    broken = []
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        where = (path.parent / target).resolve() if target else path
        if not where.exists():
            broken.append(f"{target}: no such file")
        elif anchor and where.suffix == ".md" and anchor not in _anchors(where):
            broken.append(f"{target}#{anchor}: no such heading")
    assert broken == [], f"{path.name}: {broken}"


# -- the README's sample output is what the demo prints ------------------------------------------


@pytest.mark.services
def test_the_readme_shows_what_make_demo_prints(stack) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METRIC_ETL_")}
    env.update({k: stack[k] for k in demo_transcript.STACK_SETTINGS})
    if stack.get("STACK_DIR"):
        env["STACK_DIR"] = stack["STACK_DIR"]
    output = demo_transcript.run_demo(env)
    shown = demo_transcript.mask(demo_transcript.block_of(README))
    printed = demo_transcript.mask(demo_transcript.render(output))
    assert printed == shown, "README.md's demo output is out of date: run `make readme-demo`"
