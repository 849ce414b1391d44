"""The partitions of the topic as a run ends: lag for each, read by the run or not, and the wait for
partitions other members of the group hold."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from etl.db import offsets as db_offsets
from etl.errors import EtlError, TransientError
from etl.kafka.client import join_wait
from etl.report import PartitionReport
from etl.run.loader import topic_partition

if TYPE_CHECKING:
    from etl.run.loader import Run

log = logging.getLogger(__name__)


def fill_lag(run: Run) -> None:
    """Lag of every partition of the topic, read by this run or not: the stored offset against the
    end offset; the members holding the partitions it was not given."""
    r = run.report
    if run.source is None or not run.source.is_open:
        return
    partitions = sorted(set(run.ends_at_start) | set(r.partitions))
    if not partitions:
        return
    tps = [topic_partition(run.s.topic, p) for p in partitions]
    ends: dict[int, int] = {}
    # Bounded: after a broker failure the report must not wait for the broker to return.
    try:
        ends = {tp.partition: e for tp, e in run.source.end_offsets(tps, timeout_ms=3000).items()}
    except Exception:  # lag is informative only
        log.debug("could not read end offsets for the report", exc_info=True)
        # One partition whose leader is away fails the request for all: ask for each alone.
        for tp in tps:
            try:
                ends.update({t.partition: e for t, e in run.source.end_offsets([tp], 1000).items()})
            except Exception:
                log.debug("no end offset for partition %d", tp.partition, exc_info=True)
    try:
        stored: dict[int, int] | None = run.transact(
            lambda c: db_offsets.read_offsets(c, run.tables, run.s.group_id, run.s.topic),
            "read offsets",
            retry=False,
        )
    except Exception:  # the database may be what failed: this run's own positions will do
        stored = None
    for p in partitions:
        pr = r.partitions.setdefault(p, PartitionReport(p))
        pr.assigned = p in run.ever_assigned or pr.read > 0
        if pr.end is None and pr.assigned:
            pr.end = run.book.expected.get(p)
        if ends.get(p) is not None:  # a partition without a leader may come back as None
            pr.end_offset = ends[p]
        elif p in run.ends_at_start:
            # No answer now: the end seen when the run started, so the lag shown is a lower bound.
            pr.end_offset, pr.end_offset_at = run.ends_at_start[p], "start"
        if stored is not None:
            pr.stored = stored.get(p)
        if pr.stored is None and pr.end is None:
            pr.log_start = run.begins_at_start.get(p)
    if r.unread:
        try:
            holders = run.source.holders()
        except Exception:  # who holds them is a courtesy; the lag is the point
            log.debug("could not describe the consumer group", exc_info=True)
            holders = {}
        for p, pr in r.unread.items():
            pr.held_by = holders.get(p)
        log.warning(
            "partitions %s were not read by this run: other members of group %r held them (%s); "
            "%d messages wait on them",
            list(r.unread),
            run.s.group_id,
            "; ".join(f"{p}: {pr.held_by or 'unknown'}" for p, pr in r.unread.items()),
            sum(pr.lag or 0 for pr in r.unread.values()),
        )


class HeldPartitions:
    """Partitions with messages from before the run started that other members of the group hold."""

    def __init__(self) -> None:
        # When the waiting began, and the held partitions' stored offsets then.
        self.since: tuple[float, dict[int, int]] | None = None

    def waiting(self, run: Run) -> bool:
        """True while partitions the group did not give this run hold messages from before it started,
        and their members may be runs that were killed.

        A member killed without leaving holds its partitions until its session expires; then the
        group hands them over. So the run waits for that, up to :func:`etl.kafka.client.join_wait`,
        before it calls itself done. A holder that moves its partition's stored offset meanwhile is alive and
        reading (scale-out): the run does not wait for it. What is still held at the end is named in
        the report.
        """
        assert run.source is not None
        mine = {tp.partition for tp in run.source.assigned()}
        others = [p for p in run.ends_at_start if p not in mine]
        if not others:
            self.since = None
            return False
        stored = run.stored_offsets()
        at = {p: stored.get(p, run.begins_at_start.get(p, 0)) for p in others}
        lagging = {p: o for p, o in at.items() if run.ends_at_start[p] > o}
        if not lagging:
            self.since = None
            return False
        now = time.monotonic()
        if self.since is None:
            self.since = (now, dict(lagging))
            log.info(
                "partitions %s have %d messages to read and other members of the group hold them; "
                "waiting up to %.0fs for them to read them or leave the group (a killed run's member "
                "stays until its session expires)",
                sorted(lagging),
                sum(run.ends_at_start[p] - o for p, o in lagging.items()),
                join_wait(run.s),
            )
        since, first = self.since
        for p, o in lagging.items():
            first.setdefault(p, o)
        if all(first[p] != o for p, o in lagging.items()):
            return False  # every holder is reading: live members
        if now - since > join_wait(run.s):
            log.info("partitions %s are still held by other members; leaving them to them", sorted(lagging))
            return False
        return True


def stop_if_stalled(run: Run, silent: dict[int, float], resume_hint: str) -> None:
    """Raise TransientError if a partition silent for so long (``silent``: partition -> seconds)
    still has messages to read."""
    assert run.source is not None
    behind: dict[int, int | None] = {}
    for tp in run.source.assigned():
        if tp.partition not in silent:
            continue
        end = run.ends_at_start.get(tp.partition)
        try:
            position = run.source.position(tp)
        except EtlError:  # the partition's leader is away: unknown, so not known to be done
            behind[tp.partition] = None
            continue
        if end is not None and position < end:
            behind[tp.partition] = end - position
    if not behind:
        return
    known = [n for n in behind.values() if n is not None]
    left = f"at least {sum(known):,} messages" if known else "messages"
    raise TransientError(
        f"partitions {sorted(behind)} of {run.s.topic} gave no message for "
        f"{max(silent[p] for p in behind):.0f}s while they have {left} to read",
        stage="poll Kafka",
        hint=f"is each partition's leader broker up? {resume_hint}",
    )
