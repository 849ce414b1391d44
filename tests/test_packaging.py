"""The package as an operator gets it: ``python -m build`` (PEP 517, setuptools' own backend) makes a
wheel and an sdist with no warning, and pip installs the wheel, or the checkout itself, into a fresh
virtual environment of Debian's Python without a deprecation notice; the installed command runs."""

from __future__ import annotations

import configparser
import re
import subprocess
import tarfile
import zipfile

import pytest

import etl
from tests.installs import make_venv, operator_env
from tests.support import REPO

pytestmark = pytest.mark.slow


def test_build_makes_a_wheel_and_an_sdist_without_a_warning(built_dist) -> None:
    output = built_dist.stdout + built_dist.stderr
    assert not re.search(r"warn|deprecat", output, re.I), output
    version = etl.__version__
    # A wheel for this Python and platform: it carries etl.native, the C extension, built.
    (wheel,) = built_dist.outdir.glob(f"metric_etl-{version}-cp3*-*.whl")
    with zipfile.ZipFile(wheel) as whl:
        assert any(re.fullmatch(r"etl/native\..*\.so", name) for name in whl.namelist()), whl.namelist()
    # The sdist carries what an operator installs beside the package: the config, cron and Airflow files.
    with tarfile.open(built_dist.outdir / f"metric_etl-{version}.tar.gz") as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    for wanted in ("pyproject.toml", "setup.cfg", "setup.py", "etl/native.c", "config/service.yaml",
                   "cron/metric-etl.cron", "cron/airflow/metric_etl_dag.py",
                   "cron/systemd/metric-etl.service"):  # fmt: skip
        assert wanted in names, sorted(names)


def test_the_version_is_written_in_one_place() -> None:
    metadata = configparser.ConfigParser()
    metadata.read(REPO / "setup.cfg")
    assert metadata["metadata"]["version"] == "attr: etl.__version__"


def test_the_wheel_installs_into_a_fresh_venv_and_runs(built_dist, tmp_path) -> None:
    wheel = next(built_dist.outdir.glob("metric_etl-*.whl"))
    installed = make_venv(tmp_path / "venv", str(wheel))
    assert installed.returncode == 0, installed.stdout
    assert "DEPRECATION" not in installed.stdout, installed.stdout
    command = tmp_path / "venv" / "bin" / "metric-etl"
    # Elsewhere than the checkout: nothing may come from ./config or the source tree.
    shown = subprocess.run(
        [command, "--help"], cwd=tmp_path, env=operator_env(), capture_output=True, text=True
    )
    assert shown.returncode == 0 and "Usage: metric-etl" in shown.stdout, shown.stderr
    assert not re.search(r"warn|deprecat", shown.stderr, re.I), shown.stderr
    version = subprocess.run([command, "--version"], cwd=tmp_path, capture_output=True, text=True)
    assert version.stdout.strip().endswith(etl.__version__)


def test_pip_installs_the_checkout_without_the_legacy_setup_py_install(built_dist, tmp_path) -> None:
    # Debian bookworm's pip (23.0.1) without the wheel package ran `setup.py install` for a project
    # with no pyproject.toml and printed a DEPRECATION notice; the PEP 517 build needs neither.
    installed = make_venv(tmp_path / "venv", str(built_dist.outdir / "source"), extra=("--no-deps",))
    assert installed.returncode == 0, installed.stdout
    assert "DEPRECATION" not in installed.stdout and "setup.py install" not in installed.stdout, (
        installed.stdout
    )
    assert (tmp_path / "venv" / "bin" / "metric-etl").exists()
