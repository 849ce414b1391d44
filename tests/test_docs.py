"""The documentation names every command, option, setting and exit code (like sqlite-utils' test_docs).

The README names every command, setting (with its environment variable) and exit code; an option may be
documented in docs/ instead (docs/commands.md lists them all), which the README links to.
"""

from __future__ import annotations

from dataclasses import fields

import click
import pytest

from etl.cli import main
from etl.config import Settings
from tests.support import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
DOCS = "\n".join([README, *(p.read_text(encoding="utf-8") for p in sorted((REPO / "docs").glob("*.md")))])


def commands(group: click.Group, prefix: str = "metric-etl") -> list[tuple[str, click.Command]]:
    found: list[tuple[str, click.Command]] = []
    for name, command in sorted(group.commands.items()):
        path = f"{prefix} {name}"
        found.append((path, command))
        if isinstance(command, click.Group):
            found.extend(commands(command, path))
    return found


COMMANDS = commands(main)


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS])
def test_every_command_is_in_the_readme(path: str) -> None:
    *parents, name = path.split()
    assert (
        path in README
        or (len(parents) > 1 and f"{parents[-1]} {name}" in README)
        or (f"{' '.join(parents)} " in README and f"/ {name}" in README)
    ), f"{path} is not documented in README.md"


@pytest.mark.parametrize(
    ("path", "option"),
    [
        (path, opt)
        for path, command in COMMANDS
        for param in command.params
        if isinstance(param, click.Option)
        for opt in param.opts
        if opt.startswith("--") and opt != "--help"
    ],
)
def test_every_option_is_documented(path: str, option: str) -> None:
    assert f"`{option}" in DOCS or f" {option} " in DOCS or f" {option}`" in DOCS, (
        f"{path} {option} is documented neither in README.md nor in docs/"
    )


@pytest.mark.parametrize("name", [f.name for f in fields(Settings)])
def test_every_setting_and_its_variable_are_in_the_readme(name: str) -> None:
    assert f"`{name}`" in README and f"`METRIC_ETL_{name.upper()}`" in README


def test_every_exit_code_is_in_the_readme() -> None:
    from etl.errors import ExitCode

    for code in ExitCode:
        assert f"| {int(code)} |" in README
