"""The tables' layout. The metrics table's key is the message itself, (topic, partition, incarnation,
offset); a metrics table made by an older version (a bigserial ``id`` primary key, the message as the
unique constraint ``website_metrics_message_uq``) keeps working once `init-db` has upgraded it."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from etl.db.schema import build_tables, init_db
from etl.run import run_batch
from tests.exactly_once import assert_exactly_once, kafka_ends
from tests.support import count, create_old_metrics_table, produce, rows, settings_for
from tests.test_faults import backlog


def test_the_message_is_the_metrics_key_and_rejects_keep_their_id() -> None:
    t = build_tables("s")
    assert "id" not in t.metrics.c
    assert t.metrics.primary_key.name == "website_metrics_pkey"
    assert [c.name for c in t.metrics.primary_key.columns] == ["topic", "partition", "incarnation", "offset"]
    assert not any(isinstance(c, sa.UniqueConstraint) for c in t.metrics.constraints)  # no second index
    assert [c.name for c in t.rejects.primary_key.columns] == ["id"]  # `rejects show ID` and friends


@pytest.mark.parametrize("layout", ["new", "old"])
def test_a_message_met_again_is_a_duplicate_on_either_layout(
    stack, make_topic, pg_schema, admin_engine, layout
) -> None:
    topic = make_topic(partitions=2)
    s = settings_for(stack, topic, pg_schema)
    if layout == "old":
        create_old_metrics_table(admin_engine, stack, pg_schema)
        assert "added column website_metrics.incarnation" in init_db(s).altered
    produce(stack, topic, backlog(60, bad_every=10), partitions=2)
    first = run_batch(s)
    assert (first.status, first.loaded, first.rejected) == ("ok", 54, 6)
    if layout == "old":  # the loader never writes id: the old table's sequence fills it
        ids = rows(
            admin_engine, f'SELECT count(DISTINCT id) AS n, min(id) AS lo FROM "{pg_schema}".website_metrics'
        )
        assert (ids[0].n, ids[0].lo) == (54, 1)

    # The stored offsets lost, a --from-beginning run meets every message again: the table's message
    # key (the primary key, or the old table's unique constraint) makes the loaded ones duplicates,
    # never rejects; the rejected ones are duplicates too (stored in the rejects table already).
    with admin_engine.begin() as conn:
        conn.execute(sa.text(f'DELETE FROM "{pg_schema}".etl_offsets'))
    again = run_batch(settings_for(stack, topic, pg_schema, from_beginning=True))
    assert (again.status, again.loaded, again.rejected, again.duplicates) == ("ok", 0, 0, 60)
    assert count(admin_engine, pg_schema, "website_metrics") == 54
    assert count(admin_engine, pg_schema, "website_metrics_rejects") == 6
    assert_exactly_once(admin_engine, pg_schema, topic, s.group_id, kafka_ends(stack, topic))

    # init-db finds nothing to change, on an old table too (it keeps its id).
    result = init_db(s)
    assert (result.created, result.altered) == ([], [])


def test_an_id_clash_on_an_old_table_is_a_refused_row_not_a_duplicate(
    stack, make_topic, pg_schema, admin_engine
) -> None:
    """On an old table the primary key is the id: a clash there (rows inserted by hand with the ids the
    sequence gives next) is not the message met again. A row that keeps clashing becomes a reject;
    none is dropped as a duplicate."""
    create_old_metrics_table(admin_engine, stack, pg_schema)
    topic = make_topic(partitions=1)
    init_db(settings_for(stack, topic, pg_schema))
    with admin_engine.begin() as conn:
        conn.execute(
            sa.text(
                f'INSERT INTO "{pg_schema}".website_metrics (id, url, checked_at, topic, partition, '
                "\"offset\", run_id) SELECT i, 'https://x.example/', now(), 'elsewhere', 0, i, 'by hand' "
                "FROM generate_series(1, 100) AS i"
            )
        )
    produce(stack, topic, backlog(20, bad_every=100))
    report = run_batch(settings_for(stack, topic, pg_schema))
    assert report.status == "ok" and report.duplicates == 0
    assert report.loaded + report.rejected == 20 and report.rejected >= 1
    refused = rows(admin_engine, f'SELECT stage, errors FROM "{pg_schema}".website_metrics_rejects')
    assert {(r.stage, r.errors[0]["rule"]) for r in refused} == {("database", "database:23505")}
    ours = count(admin_engine, pg_schema, "website_metrics", "WHERE topic <> 'elsewhere'")
    assert ours + len(refused) == 20
