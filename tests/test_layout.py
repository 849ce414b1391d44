"""The layout of etl/ keeps its promises: no import circle, no module reading another's private
names, no module longer than a reader can hold (docs/architecture.md)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ETL = Path(__file__).resolve().parent.parent / "etl"
MAX_LINES = 550


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ETL.rglob("*.py")):
        parts = path.relative_to(ETL.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported etl module, names taken from it, line) for every import, function-level included."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "etl":
                    found.append((alias.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], base]).strip(".")
            if base.split(".")[0] != "etl":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:  # `from etl import load`: the module itself
                    found.append((sub, [], node.lineno))
                else:
                    found.append((base, [alias.name], node.lineno))
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for name, path in MODULES.items():
        for target, _, _ in _imports(name, path):
            while target not in MODULES and "." in target:
                target = target.rpartition(".")[0]
            # a package's __init__ is imported on the way to its modules: not an edge of its own
            if target != name and target in MODULES and not name.startswith(target + "."):
                graph[name].add(target)
    return graph


def test_no_import_circle() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert circles == []


def test_no_module_reads_another_modules_private_names() -> None:
    """Not the job's modules, nor its tests: what a test needs is public."""
    found = []
    tests = {f"tests.{p.stem}": p for p in sorted(ETL.parent.joinpath("tests").glob("*.py"))}
    for name, path in {**MODULES, **tests}.items():
        for target, names, line in _imports(name, path):
            found += [
                f"{path.name}:{line} {target}.{n}" for n in names if n.startswith("_") and target != name
            ]
        tree = ast.parse(path.read_text())
        aliases = {
            a.asname or a.name: f"{n.module}.{a.name}"
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("etl")
            for a in n.names
            if f"{n.module}.{a.name}" in MODULES
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                found.append(f"{path.name}:{node.lineno} {aliases[node.value.id]}.{node.attr}")
    assert found == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_short_enough_to_read(name: str) -> None:
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name]} has {lines} lines"


def test_the_architecture_notes_name_every_module() -> None:
    """docs/architecture.md's map of etl/ is where a new maintainer starts: a module it does not
    name is a module nobody will find."""
    block = (ETL.parent / "docs" / "architecture.md").read_text().split("```")[1]
    named: set[str] = set()
    package = ""
    for line in block.splitlines():
        if m := re.match(r"^  (\w+)/", line):  # a package's heading
            package = m.group(1) + "."
            named.add("etl." + m.group(1))
        elif re.match(r"^  \S", line):  # a top-level module: the package's part is over
            package = ""
        head = re.split(r"\s{2,}", line.strip())[0]  # the file names, before their description
        for word in re.findall(r"([a-z_]+)\.py", head):
            named.add("etl." + package + word if word != "__init__" else "etl." + package.rstrip("."))
    missing = [name for name, path in MODULES.items() if path.name != "__main__.py" and name != "etl"]
    assert [name for name in missing if name not in named] == []
