"""Under ``make mutants`` only: a ``python -m etl`` process started by a test reports which mutated
functions it ran, so mutmut runs that test against their mutants too.

mutmut records a test's function hits in the pytest process; a subprocess's hits would be lost and
its mutants left with no tests. tests/conftest.py puts this directory on PYTHONPATH while mutmut
collects its stats; this file writes the process's hits to a file the conftest reads back.
"""

import atexit
import os

_DIR = os.environ.get("MUTMUT_SUBPROCESS_HITS")
if _DIR and os.environ.get("MUTANT_UNDER_TEST") == "stats":
    import mutmut.mutation.trampoline as _trampoline

    _hits: set[str] = set()

    def _record(name: str, caller: str | None = None) -> None:
        _hits.add(name)

    _trampoline.record_trampoline_hit = _record

    @atexit.register
    def _write() -> None:
        with open(os.path.join(_DIR, f"{os.getpid()}.txt"), "w") as f:
            f.write("\n".join(sorted(_hits)))
