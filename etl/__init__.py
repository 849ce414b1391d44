"""metric-etl: move website-availability metrics from Kafka into PostgreSQL, exactly once.

Library use::

    from etl import load_settings, run_batch

    report = run_batch(load_settings(overrides={"cycles": 10}))
    print(report.loaded, report.rejected, report.stop_reason)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["ExitCode", "RunReport", "Settings", "load_settings", "run_batch"]

if TYPE_CHECKING:
    from etl.config import Settings, load_settings
    from etl.errors import ExitCode
    from etl.report import RunReport
    from etl.run import run_batch

_LAZY = {
    "Settings": "etl.config",
    "load_settings": "etl.config",
    "ExitCode": "etl.errors",
    "run_batch": "etl.run",
    "RunReport": "etl.report",
}


def __getattr__(name: str) -> Any:
    # Lazy: `import etl` (and so `metric-etl --help`) must not pay for pandas, SQLAlchemy and Kafka.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'etl' has no attribute {name!r}")
