"""The mutation score of each module after `make mutants`, from mutmut's own records (mutants/**/*.meta).

Score = killed / (killed + survived + timeout-free survivors); a timeout counts as killed (the mutant
made a test hang, which the suite notices), "no tests" and "not checked" are listed apart.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

KILLED = {1, 3, -24, 24, 152, 255, 36, 37}  # mutmut: failed test, internal error, timeouts
SURVIVED = {0}
NO_TESTS = {5, 33}


def main() -> int:
    metas = sorted(Path("mutants").glob("etl/**/*.py.meta"))
    if not metas:
        print("no mutants/ records: run `make mutants` first", file=sys.stderr)
        return 1
    survivors: list[str] = []
    print(f"{'module':<16}{'checked':>8}{'killed':>8}{'survived':>9}{'no tests':>9}{'score':>8}")
    for meta in metas:
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        checked = {k: v for k, v in codes.items() if v is not None}
        if not checked:
            continue
        n = Counter(
            "killed"
            if v in KILLED
            else "survived"
            if v in SURVIVED
            else "no tests"
            if v in NO_TESTS
            else "other"
            for v in checked.values()
        )
        judged = n["killed"] + n["survived"]
        score = f"{n['killed'] / judged:.0%}" if judged else "-"
        module = meta.name.removesuffix(".py.meta")
        print(f"{module:<16}{len(checked):>8}{n['killed']:>8}{n['survived']:>9}{n['no tests']:>9}{score:>8}")
        by_function: dict[str, Counter[str]] = {}
        for key, code in checked.items():
            function = key.split(".")[-1].rsplit("__mutmut_", 1)[0].removeprefix("x_").replace("xǁ", "")
            kind = "killed" if code in KILLED else "survived" if code in SURVIVED else "other"
            by_function.setdefault(function.replace("ǁ", "."), Counter())[kind] += 1
        for function, c in sorted(by_function.items()):
            judged = c["killed"] + c["survived"]
            print(
                f"  {function:<34} {c['killed']:>4}/{judged:<4} killed"
                + (f", {c['other']} other" if c["other"] else "")
            )
        survivors += sorted(k for k, v in checked.items() if v in SURVIVED)
    if survivors:
        print("\nsurvivors (`.venv-mutants/bin/mutmut show NAME` shows the change):")
        print("\n".join(f"  {s}" for s in survivors))
    return 0


if __name__ == "__main__":
    sys.exit(main())
