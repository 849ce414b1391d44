"""The naive baseline: what the original consumer-publisher service did, for ``bench/run.py``.

    .venv/bin/python bench/naive.py TOPIC GROUP SCHEMA MESSAGES

A kafka-python consumer in a group, default settings (up to 500 records a poll); each message parsed
with the standard json module and INSERTed as one row; one database commit and one Kafka commit per
poll. A message that is not a JSON object with a url and checked_at is skipped (the original crashed
on it); a poll whose INSERTs the database refuses is rolled back and counted as lost, as the original
lost it. Stops after reading MESSAGES messages and prints one JSON line of counts. The database URL
and password come from METRIC_ETL_DB_URL and METRIC_ETL_DB_PASSWORD, the broker from
METRIC_ETL_BOOTSTRAP_SERVERS; the table is the job's metrics table, created in SCHEMA.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import psycopg2
from kafka import KafkaConsumer
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from etl.db import schema

COLUMNS = ("url", "status_code", "response_time_ms", "regex_pattern", "regex_matched", "checked_at", "error")


def main(topic: str, group: str, schema_name: str, wanted: int) -> dict[str, int]:
    url = os.environ["METRIC_ETL_DB_URL"]
    password = os.environ.get("METRIC_ETL_DB_PASSWORD")
    tables = schema.build_tables(schema_name)
    engine = create_engine(
        url.replace("postgresql://", "postgresql+psycopg2://", 1),
        poolclass=NullPool,
        connect_args={"password": password} if password else {},
    )
    with engine.begin() as conn:
        schema.create_all(conn, tables)
    engine.dispose()

    db = psycopg2.connect(url, password=password)
    target = f'"{schema_name}"."{tables.metrics.name}"'
    sql = (
        f'INSERT INTO {target} ({", ".join(COLUMNS)}, topic, partition, "offset", run_id) '
        f"VALUES ({', '.join(['%s'] * (len(COLUMNS) + 4))})"
    )
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=os.environ["METRIC_ETL_BOOTSTRAP_SERVERS"].split(","),
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    counts = {"read": 0, "inserted": 0, "skipped": 0, "lost": 0}
    try:
        while counts["read"] < wanted:
            batch = consumer.poll(timeout_ms=1000)
            inserted = 0
            counts["read"] += sum(map(len, batch.values()))
            with db.cursor() as cur:
                try:
                    for records in batch.values():
                        for r in records:
                            try:
                                m = json.loads(r.value)
                            except (TypeError, ValueError):
                                counts["skipped"] += 1
                                continue
                            if not isinstance(m, dict) or "url" not in m or "checked_at" not in m:
                                counts["skipped"] += 1
                                continue
                            row = [m.get(c) for c in COLUMNS]
                            cur.execute(sql, (*row, r.topic, r.partition, r.offset, "naive"))
                            inserted += 1
                    db.commit()
                    counts["inserted"] += inserted
                except (psycopg2.DataError, psycopg2.IntegrityError):
                    db.rollback()  # one bad row loses the whole poll, as in the original service
                    counts["lost"] += inserted
            if batch:
                consumer.commit()
    finally:
        consumer.close(autocommit=False)
        db.close()
    return counts


if __name__ == "__main__":
    topic, group, schema_name, wanted = sys.argv[1:5]
    print(json.dumps(main(topic, group, schema_name, int(wanted))))
