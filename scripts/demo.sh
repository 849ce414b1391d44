#!/usr/bin/env bash
# make demo: a sample backlog with some corrupted messages, one bounded run, the summary and the rejects.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. .stack/env
etl=.venv/bin/metric-etl
export METRIC_ETL_TOPIC=${METRIC_ETL_TOPIC:-website-metrics}

echo "== 1. a backlog of sample metrics, 2% corrupted, on topic $METRIC_ETL_TOPIC"
echo "\$ metric-etl produce-sample -n 20000 --corrupt-ratio 0.02 --partitions 3"
$etl produce-sample -n 20000 --corrupt-ratio 0.02 --partitions 3 -q

echo
echo "== 2. one bounded run: at most 10 poll cycles, then it exits"
echo "\$ metric-etl run --cycles 10"
set +e
$etl run --cycles 10
code=$?
set -e
echo "(exit code $code)"

echo
echo "== 3. the rejected messages, with every reason"
if $etl rejects --help >/dev/null 2>&1; then
  echo "\$ metric-etl rejects list --limit 8"
  $etl rejects list --limit 8
else
  PGPASSWORD=$METRIC_ETL_DB_PASSWORD psql "${METRIC_ETL_DB_URL/postgresql:\/\//postgresql://}" -P pager=off -c \
    "SELECT id, partition, \"offset\", stage, left(errors::text, 90) AS errors FROM website_metrics_rejects ORDER BY id DESC LIMIT 8"
fi

echo
echo "== 4. what landed"
PGPASSWORD=$METRIC_ETL_DB_PASSWORD psql "$METRIC_ETL_DB_URL" -P pager=off -c \
  "SELECT url, count(*) AS checks, round(avg(response_time_ms)::numeric, 1) AS avg_ms,
          count(*) FILTER (WHERE error IS NOT NULL) AS failed
     FROM website_metrics GROUP BY url ORDER BY url"
exit "$code"
