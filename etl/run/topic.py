"""Before a run reads: is the topic the one the stored offsets were taken from?"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from etl.db import offsets as db_offsets
from etl.report import PartitionReport

if TYPE_CHECKING:
    from etl.run.loader import Run

log = logging.getLogger(__name__)


def check_topic(run: Run) -> None:
    """Before reading: stop on a recreated or truncated topic (TopicChanged, exit 3); count the
    messages deleted upstream before the group read them, and go on from the log start."""
    from etl import incarnation
    from etl.kafka.topics import topic_state

    s, r = run.s, run.report
    state = topic_state(s)
    run.book.topic_id = state.topic_id

    def read(c: Any) -> tuple[dict[int, db_offsets.StoredOffset], dict[int, int]]:
        return (
            db_offsets.read_stored(c, run.tables, s.group_id, s.topic),
            db_offsets.latest_incarnations(c, run.tables, s.topic),
        )

    if s.dry_run:
        try:
            stored, run.book.latest = run.transact(read, "read offsets", retry=False)
        except Exception:  # no tables yet: a dry run creates nothing
            stored, run.book.latest = {}, {}
    else:
        stored, run.book.latest = run.transact(read, "read offsets")
    found = incarnation.changes(state, stored)
    if found:
        raise incarnation.changed_error(state, s.group_id, found)
    gaps = incarnation.lost(state, stored)
    unmarked = state.topic_id is not None and any(row.topic_id is None for row in stored.values())
    if not s.dry_run and (gaps or unmarked):

        def mark(c: Any) -> dict[int, tuple[int, int]]:
            return db_offsets.record_topic_state(c, run.tables, s, r.run_id, gaps, state.topic_id)

        # Only the run that moves a stored offset counts its gap: a gap is counted once.
        gaps = run.transact(mark, "record the topic's state")
    for p, (first, start) in gaps.items():
        log.warning(
            "partition %d: messages %d to %d (%d) were deleted from the topic (retention or "
            "delete-records) before group %s read them; going on from offset %d",
            p,
            first,
            start - 1,
            start - first,
            s.group_id,
            start,
            extra={"event": "lost", "partition": p, "lost": start - first},
        )
        r.lost_to_retention += start - first
        r.partitions.setdefault(p, PartitionReport(p)).lost = start - first
