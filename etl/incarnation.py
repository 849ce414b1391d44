"""Is the topic the one a group's stored offsets were taken from? The checks a run makes before it
reads, and the ones ``metric-etl offsets reset`` plans with.

A message is known by (topic, partition, incarnation, offset) (:data:`etl.MESSAGE_KEY`). A
topic deleted and created again, or a partition truncated (an unclean leader election), numbers its
messages from where it starts again, so offsets alone would take new messages for loaded ones. A
run therefore stops (exit 3, :class:`~etl.errors.TopicChanged`) when a stored offset is beyond its
partition's high watermark or the topic's id is not the one stored; the operator moves the offsets
with :func:`etl.ops.offsets.reset`, which gives such partitions a new incarnation. A log start beyond
a stored offset is the other way round: retention (or delete-records) removed messages the group
never read. The run counts them (``lost_to_retention``), moves the stored offset to the log start
and goes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from etl.errors import TopicChanged
from etl.kafka.topics import TopicState

if TYPE_CHECKING:
    from etl.db.offsets import StoredOffset


@dataclass(frozen=True)
class Change:
    """A partition whose stored offset belongs to another incarnation of the topic."""

    partition: int
    stored: int
    end: int | None  # None: the topic has no such partition now
    why: str


def changes(state: TopicState, stored: dict[int, StoredOffset]) -> list[Change]:
    """The partitions a run must not read from their stored offsets (empty: all is well)."""
    out = []
    for p, row in sorted(stored.items()):
        end = state.ends.get(p)
        if end is None:
            out.append(Change(p, row.next_offset, None, "the topic has no such partition now"))
        elif row.topic_id is not None and state.topic_id is not None and row.topic_id != state.topic_id:
            out.append(Change(p, row.next_offset, end, f"topic id {state.topic_id}, stored {row.topic_id}"))
        elif row.next_offset > end:
            out.append(Change(p, row.next_offset, end, "stored offset beyond the end"))
    return out


def changed_error(state: TopicState, group_id: str, found: list[Change]) -> TopicChanged:
    """The error that stops a run, naming the partitions, offsets and the fix."""
    recreated = any("topic id" in c.why or c.end is None for c in found)
    what = "was deleted and created again" if recreated else "was deleted and created again, or truncated"
    parts = "; ".join(
        f"partition {c.partition}: stored offset {c.stored}, end offset {'-' if c.end is None else c.end}"
        + ("" if c.why == "stored offset beyond the end" else f" ({c.why})")
        for c in found
    )
    return TopicChanged(
        f"topic {state.topic!r} {what} since group {group_id!r} stored its offsets: {parts}. "
        "Its new messages would be taken for ones already loaded; nothing was read",
        hint=f"see what a reset would do with `metric-etl offsets reset --topic {state.topic} "
        f"--group-id {group_id} --to earliest --dry-run`, then run it without --dry-run "
        "(the new messages load as a new incarnation; the rows loaded before stay)",
    )


def lost(state: TopicState, stored: dict[int, StoredOffset]) -> dict[int, tuple[int, int]]:
    """partition -> (stored offset, log start) where the log starts beyond the stored offset: the
    messages ``[stored, log start)`` were deleted upstream before the group read them."""
    return {
        p: (row.next_offset, state.begins[p])
        for p, row in sorted(stored.items())
        if p in state.begins and row.next_offset < state.begins[p]
    }
