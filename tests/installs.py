"""Build the package as an operator does and install it into virtual environments of their own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support import REPO

# Debian's own Python: a fresh Debian host's `python3 -m venv` brings its pip (23.0.1 on bookworm),
# the one that installs a project without pyproject.toml the legacy way.
SYSTEM_PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable


def operator_env() -> dict[str, str]:
    """The environment an operator's shell has: no METRIC_ETL_* from the test run, and bytecode
    writing on (PYTHONDONTWRITEBYTECODE makes setuptools print "byte-compiling is disabled")."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("METRIC_ETL_") and k not in ("PYTHONDONTWRITEBYTECODE", "VIRTUAL_ENV")
    }


def build(outdir: Path) -> subprocess.CompletedProcess[str]:
    """``python -m build`` of a clean copy of the checkout: a wheel and an sdist in ``outdir``."""
    source = outdir / "source"
    # A copy of what git tracks (plus uncommitted edits), not the worktree's .venv, .stack and caches.
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    return subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(outdir), str(source)],
        env=operator_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def make_venv(path: Path, *packages: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """A fresh virtual environment at ``path`` with ``packages`` installed by its own pip; the pip
    run's output (stdout and stderr together) is in the result."""
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(path)], check=True, timeout=120)
    return subprocess.run(
        [str(path / "bin" / "pip"), "install", *extra, *packages],
        env=operator_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )
