#!/usr/bin/env bash
# Mutation testing of the modules that hold the promises (`make mutants`; opt-in, not in CI).
#
# mutmut 3 (pinned here, in .venv-mutants: a tool, not a dependency of the package) copies etl/ and
# tests/ to mutants/ and runs, for each mutant, the tests that reached the mutated function (the
# [mutmut] section of setup.cfg lists the modules and the test files). The mutant is chosen by the
# MUTANT_UNDER_TEST environment variable, which the `python -m etl` processes of the tests inherit;
# they start in mutants/, so they import the mutated copy.
#
#   make mutants                       all groups, time-boxed to MUTANTS_MINUTES (default 45)
#   scripts/mutants.sh 'etl.validate.*'  only mutants whose names match
#   scripts/mutants.sh --score         the scores of the last run, per module, and the survivors
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=.venv-mutants
MUTMUT_VERSION=3.8.1

if [[ "${1:-}" == "--score" ]]; then
    exec "$VENV/bin/python" scripts/mutants_score.py
fi

if [[ ! -x "$VENV/bin/mutmut" ]] || ! "$VENV/bin/mutmut" --version 2>/dev/null | grep -q "$MUTMUT_VERSION"; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q -e '.[dev]' "mutmut==$MUTMUT_VERSION" >"$VENV/pip.log" 2>&1 || {
        echo "error: pip install mutmut==$MUTMUT_VERSION failed; see $VENV/pip.log" >&2
        exit 1
    }
fi
[[ -f .stack/env ]] || { echo "error: the stack is not up (make stack-up)" >&2; exit 1; }
# shellcheck disable=SC1091
. .stack/env

# The promises, most important first. Two mutmut invocations (each runs the clean tests and a forced
# failure once): the first computes which test reaches which function; before the second, validate's
# mutants are narrowed to validate's own tests.
first=(
    'etl.db.offsets.x_advance_offsets__mutmut_*'
    'etl.config.x_mask__mutmut_*'
    'etl.config.x_secrets_of__mutmut_*'
    'etl.run.book.xǁOffsetBookǁsplit_duplicates__mutmut_*'
)
second=(
    'etl.validate.*'
    'etl.checks.*'
    'etl.run.pipeline.xǁPipelineǁ_prepare__mutmut_*'
    'etl.cli.common.x_fail__mutmut_*'
    'etl.errors.*'
    'etl.db.store.x_classify__mutmut_*'
    'etl.db.write.x_load_cycle__mutmut_*'
)
if (($#)); then
    first=("$@")
    second=()
fi

# validate (and its checks) is pure and has its own 190 tests (6 s): its mutants run against those, not against every
# services test that happens to pass through it (minutes each for a survivor).
own_tests() {
    [[ -f mutants/mutmut-stats.json ]] || return 0
    "$VENV/bin/python" - <<'PY'
import json
path = "mutants/mutmut-stats.json"
stats = json.load(open(path))
tests = stats["tests_by_mangled_function_name"]
for name, covering in tests.items():
    if name.startswith(("etl.validate.", "etl.checks.")):
        tests[name] = [t for t in covering if t.startswith("tests/test_validate.py")]
json.dump(stats, open(path, "w"), indent=4)
PY
}

[[ -n "${MUTANTS_KEEP:-}" ]] || rm -rf mutants
minutes="${MUTANTS_MINUTES:-45}"
started=$(date +%s)
status=0
for batch in first second; do
    declare -n names="$batch"
    ((${#names[@]})) || continue
    left=$((minutes * 60 - ($(date +%s) - started)))
    if ((left <= 0)); then
        echo "time box of $minutes minutes reached; not run: ${names[*]}" >&2
        continue
    fi
    own_tests
    echo "== ${names[*]} (${left}s left)"
    timeout --signal=INT --kill-after=30 "$left" \
        "$VENV/bin/mutmut" run --max-children "${MUTANTS_CHILDREN:-2}" "${names[@]}" || status=$?
done
"$VENV/bin/python" scripts/mutants_score.py
exit "$status"
