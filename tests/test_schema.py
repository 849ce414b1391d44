"""The tables' layout. The metrics table's key is the message itself, (topic, partition, incarnation,
offset); a metrics table made by an older version (a bigserial ``id`` primary key, the message as the
unique constraint ``website_metrics_message_uq``) keeps working once `init-db` has upgraded it."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from etl.db.schema import build_tables, init_db
from etl.run import run_batch
from tests.exactly_once import assert_exactly_once, kafka_ends
from tests.support import count, create_old_metrics_table, produce, settings_for
from tests.test_faults import backlog


def test_the_message_is_the_metrics_key_and_rejects_keep_their_id() -> None:
    t = build_tables("s")
    assert "id" not in t.metrics.c
    assert t.metrics.primary_key.name == "website_metrics_pkey"
    assert [c.name for c in t.metrics.primary_key.columns] == [
        "topic",
        "partition",
        "incarnation",
        "offset",
        "checked_at",  # the partition column, which a message always carries the same
    ]
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
        altered = init_db(s).altered
        assert "added column website_metrics.incarnation" in altered
        assert any("surrogate column id" in line for line in altered)  # the message is the key
        assert any(line.startswith("partitioned website_metrics") for line in altered)
    produce(stack, topic, backlog(60, bad_every=10), partitions=2)
    first = run_batch(s)
    assert (first.status, first.loaded, first.rejected) == ("ok", 54, 6)

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

    # init-db finds nothing more to change, on an upgraded table too.
    result = init_db(s)
    assert (result.created, result.altered) == ([], [])
