#!/usr/bin/env bash
# make demo: a sample backlog with some corrupted messages, one bounded run, the summary and the rejects.
set -euo pipefail
cd "$(dirname "$0")/.."
# The stack's env file: the one named by STACK_DIR (set by sourcing it, or by a checkout that shares another's
# stack), else this checkout's .stack/env.
# shellcheck disable=SC1091
. "${STACK_DIR:-.stack}/env"
export PATH="$PWD/.venv/bin:$PATH"
export METRIC_ETL_TOPIC=${METRIC_ETL_TOPIC:-website-metrics}

step() { printf '\n== %s\n' "$1"; }
show() { printf '$ %s\n' "$*"; "$@"; }

# One partition: its messages, and so its rejects, are stored in offset order, so every demo numbers
# the same rejects alike and prints what the README shows (across partitions the order varies).
step "1. a backlog of sample metrics, 2% corrupted, on topic $METRIC_ETL_TOPIC"
show metric-etl produce-sample -n 20000 --corrupt-ratio 0.02 --partitions 1

step "2. one bounded run: at most 10 poll cycles, then it exits"
set +e
show metric-etl run --cycles 10
code=$?
set -e
echo "(exit code $code)"

step "3. the rejected messages, each with every reason"
show metric-etl rejects list --limit 6
first=$(metric-etl rejects list --limit 1 --output json | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r[0]["id"] if r else "")')
if [ -n "$first" ]; then
  show metric-etl rejects show "$first"
fi

step "4. where each partition stands"
show metric-etl status || true

step "5. a second run: nothing new, nothing loaded twice"
show metric-etl run -q

step "6. what the readers get: each URL's uptime, latency and state, from the rollups the load keeps"
show metric-etl report --since 24h
exit "$code"
