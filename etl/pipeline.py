"""Runs the cycles: poll -> normalise -> validate -> load in one transaction -> commit to Kafka.

The run stops at the first of: ``cycles`` polls, ``max_messages`` read, ``max_seconds`` elapsed,
caught up with the end offsets captured at start, or a stop request (SIGTERM/SIGINT finish the
current cycle). ``follow`` polls until stopped.

A cycle's load runs on a thread of its own while the next cycle is polled, normalised and
validated: PostgreSQL stores one batch while Python reads the next. Loads stay one at a time and
in order, and everything Kafka is done on the calling thread. The next batch's conditional offset
advances start from where the batch in flight will leave them; if that batch yields to another run
instead, the next one is put back unread (its partitions re-seeked) before anything is retried.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import wait as wait_for
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from etl import load
from etl.db import schema, store
from etl.errors import (
    ConfigError,
    EtlError,
    Interrupted,
    LockHeld,
    RejectRatioExceeded,
    TopicChanged,
    TransientError,
)
from etl.report import PartitionReport, RunReport

if TYPE_CHECKING:
    import pandas as pd
    from kafka import TopicPartition
    from sqlalchemy.engine import Engine

    from etl.config import Settings
    from etl.contract import RawMessage
    from etl.source import KafkaSource

log = logging.getLogger(__name__)

ABORT_WAIT_S = 30.0  # after a second Ctrl-C, how long the load in flight gets to roll back
SILENCE_MIN_S = 30.0  # the least time a partition with messages left may give none before a run stops


@dataclass
class _Batch:
    """One cycle read and transformed, ready to load."""

    cycle: int  # the poll that read it
    messages: list[RawMessage]
    positions: tuple[Any, Any]
    duplicates: int
    good: pd.DataFrame
    rejects: list[dict[str, Any]]
    frame: pd.DataFrame
    advances: list[load.OffsetAdvance]


@dataclass
class _InFlight:
    """A batch whose load runs on the load thread."""

    batch: _Batch
    future: Future[tuple[load.LoadResult, float]]
    connections: list[Any] = field(default_factory=list)  # the driver connection of each attempt


def run_batch(
    settings: Settings,
    *,
    stop: threading.Event | None = None,
    on_cycle: Callable[[RunReport], None] | None = None,
) -> RunReport:
    """Drain the topic as the settings say and return the report.

    With ``settings.workers`` above 1 the run forks that many processes (see :mod:`etl.workers`),
    ``on_cycle`` is not called and the report is theirs merged.
    Raises an :class:`~etl.errors.EtlError` on failure; the partial report is on ``exc.report``.
    """
    if settings.workers > 1:
        from etl.workers import run_parallel

        return run_parallel(settings, stop=stop)
    with quick_gil_handover():
        return Pipeline(settings, stop=stop, on_cycle=on_cycle).run()


SWITCH_INTERVAL_S = 0.001  # CPython's default is 0.005


@contextlib.contextmanager
def quick_gil_handover() -> Iterator[None]:
    """Let a thread waiting for the GIL take it after 1 ms instead of 5 ms, then restore the setting.

    The load thread mostly waits on PostgreSQL with the GIL released, and each time a reply comes it
    needs the GIL back from the thread parsing the next batch. At CPython's 5 ms it queues for it
    several times a cycle, and the load of each cycle is what the run waits for. Side by side on 1M
    messages (``bench/compare.py``, medians of 5): 28.1 s at 5 ms, 25.1 s at 1 ms. Worker processes
    keep 5 ms: with one per core the cores are busy anyway, and the extra handovers cost CPU (20.4 s
    against 22.3 s, medians of 3). The setting is process-wide, so a lower one already in place is
    kept and the previous value comes back on exit.
    """
    before = sys.getswitchinterval()
    if before <= SWITCH_INTERVAL_S:
        yield
        return
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


class Pipeline:
    """One run. Holds the per-partition state the exactly-once protocol needs."""

    def __init__(
        self,
        settings: Settings,
        *,
        stop: threading.Event | None = None,
        on_cycle: Callable[[RunReport], None] | None = None,
    ) -> None:
        self.s = settings
        self.stop = stop or threading.Event()
        self.on_cycle = on_cycle
        self.tables = schema.tables_for(settings)
        self.report = RunReport(
            run_id=uuid.uuid4().hex[:16],
            topic=settings.topic,
            group_id=settings.group_id,
            started_at=datetime.now(UTC),
            dry_run=settings.dry_run,
            config_file=_resolved(settings.config_file),
        )
        # partition -> next offset as stored in the database (None: no row yet). The conditional
        # advance in the load transaction checks against it.
        self.expected: dict[int, int | None] = {}
        # partition -> the incarnation its messages are loaded under (see etl.MESSAGE_KEY): the
        # stored one, else the highest any group of the topic is at (``_latest``), else 0.
        self.incarnation: dict[int, int] = {}
        self._latest: dict[int, int] = {}
        self.topic_id: str | None = None
        self.rewind: dict[int, int] = {}
        self.ends_at_start: dict[int, int] = {}  # every partition of the topic
        self.begins_at_start: dict[int, int] = {}
        self.ever_assigned: set[int] = set()
        # Waiting for partitions other members hold: when it began, and their stored offsets then.
        self._held: tuple[float, dict[int, int]] | None = None
        self.engine: Engine | None = None
        self.source: KafkaSource | None = None
        self._clock = time.monotonic()
        self._inflight: _InFlight | None = None
        self._abort = threading.Event()  # a second Ctrl-C: the load in flight must roll back
        self._heartbeat_at = time.monotonic()  # the last heartbeat written
        self._db_waited = 0.0  # seconds the run loop spent waiting for loads (the silence bound)

    # -- the run ----------------------------------------------------------------------------------

    def run(self) -> RunReport:
        r = self.report
        try:
            with ExitStack() as stack:
                # The run id in pg_stat_activity tells an operator (and the fault tests) whose
                # connection is whose.
                self.engine = store.make_engine(self.s, application_name=f"metric-etl run {r.run_id}")
                stack.callback(self.engine.dispose)
                self._prepare_database()
                if self.s.lock:
                    try:
                        stack.enter_context(store.advisory_lock(self.engine, self.s))
                    except LockHeld:
                        # Not a failure: another run is working. Nothing was started or recorded.
                        r.status, r.stop_reason = "skipped", "lock_held"
                        r.finished_at = datetime.now(UTC)
                        raise
                if not self.s.dry_run:
                    self._close_abandoned()
                    self._db(
                        lambda c: load.start_run(c, self.tables, r.run_id, self.s, "running"), "start run"
                    )
                    self._heartbeat_at = time.monotonic()
                try:
                    self._open_source(stack)
                    self._loop()
                except BaseException as exc:
                    self._end_inflight(exc)
                    self._finish(exc)
                    raise
                self._finish(None)
        except EtlError as exc:
            if r.finished_at is None:  # failed before the cycles (the database, the lock): say so
                r.finished_at = datetime.now(UTC)
                r.status, r.stop_reason, r.error = "failed", "error", store.scrub(str(exc), self.s)
            exc.report = r  # type: ignore[attr-defined]
            raise
        return r

    def _close_abandoned(self) -> None:
        """Runs of the group and topic that were killed leave rows saying ``running``: close them."""
        by = f"run {self.report.run_id}"
        self._db(lambda c: load.close_abandoned(c, self.tables, self.s, by=by), "close abandoned runs")

    def _heartbeat(self) -> None:
        """An idle run says it is alive every HEARTBEAT_EVERY_S (a cycle's load says it anyway)."""
        if self.s.dry_run or time.monotonic() - self._heartbeat_at < load.HEARTBEAT_EVERY_S:
            return
        try:
            self._db(lambda c: load.heartbeat(c, self.tables, self.report.run_id), "heartbeat", retry=False)
            self._heartbeat_at = time.monotonic()
        except Exception as exc:  # the next cycle's load or heartbeat tries again
            log.debug("heartbeat failed: %s", exc)

    def _prepare_database(self) -> None:
        if self.s.dry_run:
            return
        self._db(lambda c: schema.ensure_tables(c, self.tables), "create tables")

    def _open_source(self, stack: ExitStack) -> None:
        from etl.source import KafkaSource

        t = time.monotonic()
        self.source = KafkaSource(self.s, self._start_for)
        self.source.open()
        stack.callback(self.source.close)
        self._check_topic()
        # The first poll alone rarely completes the join: the group waits for its other members
        # to rejoin, and for a run that died without leaving to time out.
        if not self.source.wait_for_group(self._join_wait()):
            raise TransientError(
                f"could not join consumer group {self.s.group_id!r} within {self._join_wait():.0f}s",
                stage="join the Kafka group",
                hint="another member of the group is slow to rejoin, or the group coordinator is "
                "unavailable; nothing was read, the next run resumes",
            )
        tps = self.source.partitions()
        self.ends_at_start = {tp.partition: o for tp, o in self.source.end_offsets(tps).items()}
        self.begins_at_start = {tp.partition: o for tp, o in self.source.beginning_offsets(tps).items()}
        if self.s.from_beginning:
            self.rewind = dict(self.begins_at_start)
        elif self.s.stop_time is not None:
            ms = int(self.s.stop_time.timestamp() * 1000)
            self.rewind = {tp.partition: o for tp, o in self.source.offsets_for_time(tps, ms).items()}
        self.report.add_time("connect", time.monotonic() - t)

    def _check_topic(self) -> None:
        """Before reading: stop on a recreated or truncated topic (TopicChanged, exit 3); count the
        messages deleted upstream before the group read them, and go on from the log start."""
        from etl import offsets
        from etl.kafka.topics import topic_state

        s, r = self.s, self.report
        state = topic_state(s)
        self.topic_id = state.topic_id

        def read(c: Any) -> tuple[dict[int, load.StoredOffset], dict[int, int]]:
            return (
                load.read_stored(c, self.tables, s.group_id, s.topic),
                load.latest_incarnations(c, self.tables, s.topic),
            )

        if s.dry_run:
            try:
                stored, self._latest = self._db(read, "read offsets", retry=False)
            except Exception:  # no tables yet: a dry run creates nothing
                stored, self._latest = {}, {}
        else:
            stored, self._latest = self._db(read, "read offsets")
        found = offsets.changes(state, stored)
        if found:
            raise offsets.changed_error(state, s.group_id, found)
        gaps = offsets.lost(state, stored)
        unmarked = state.topic_id is not None and any(row.topic_id is None for row in stored.values())
        if not s.dry_run and (gaps or unmarked):

            def mark(c: Any) -> dict[int, tuple[int, int]]:
                return load.record_topic_state(c, self.tables, s, r.run_id, gaps, state.topic_id)

            # Only the run that moves a stored offset counts its gap: a gap is counted once.
            gaps = self._db(mark, "record the topic's state")
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

    def _start_for(self, tps: list[TopicPartition]) -> dict[TopicPartition, int | None]:
        """Where newly assigned partitions start: the stored offset (or an earlier rewind target)."""
        stored = self._stored_offsets()
        starts: dict[TopicPartition, int | None] = {}
        for tp in tps:
            p = tp.partition
            self.ever_assigned.add(p)
            known = stored.get(p)
            self.expected[p] = known
            candidates = [o for o in (known, self.rewind.get(p)) if o is not None]
            starts[tp] = min(candidates) if candidates else None
        return starts

    def _stored_offsets(self) -> dict[int, int]:
        """partition -> stored next offset; notes each partition's incarnation on the way."""

        def read(c: Any) -> dict[int, load.StoredOffset]:
            return load.read_stored(c, self.tables, self.s.group_id, self.s.topic)

        if self.s.dry_run:
            try:
                rows = self._db(read, "read offsets", retry=False)
            except Exception:  # no tables yet: a dry run creates nothing
                rows = {}
        else:
            rows = self._db(read, "read offsets")
        for p, row in rows.items():
            self.incarnation[p] = row.incarnation
        return {p: row.next_offset for p, row in rows.items()}

    def _join_wait(self) -> float:
        """How long a run waits for the group (:func:`etl.kafka.client.join_wait`)."""
        from etl.kafka.client import join_wait

        return join_wait(self.s)

    def _loop(self) -> None:
        assert self.source is not None
        r, s = self.report, self.s
        started = time.monotonic()
        out_of_group_since: float | None = None
        # partition -> seconds since it last gave a message: per partition, so that messages from one
        # (the broker that survived) never hide another that cannot be read; not counting time spent
        # waiting for PostgreSQL, so that a load retrying through a database restart is not taken
        # for Kafka's silence; and at least SILENCE_MIN_S, because a partition can wait its turn for
        # seconds behind another's fetched batches when batches are small.
        silent: dict[int, float] = {}
        bound = max(s.retry_deadline, s.poll_timeout_ms / 1000 * 3, SILENCE_MIN_S)
        last_step, last_waited = time.monotonic(), self._db_waited
        while True:
            # Partitions assigned by a rebalance start where the database says, before any poll;
            # the database says it once the load in flight is done.
            if self._inflight is not None and self.source.pending():
                self._complete()
            for tp in self.source.settle():
                silent[tp.partition] = 0.0
            reason = self._stop_reason(started)
            if reason and self._inflight is not None:
                self._complete()  # the reason may not hold after it (a conflict re-seeks)
                continue
            if reason:
                self._store_skipped()
                r.stop_reason = reason
                return
            t = time.monotonic()
            limit = (
                s.max_poll_records
                if s.max_messages is None
                else min(s.max_poll_records, s.max_messages - r.read)
            )
            messages = self._poll(limit)
            r.add_time("consume", time.monotonic() - t)
            if not messages and self._inflight is not None:
                self._complete()  # nothing to read meanwhile: account for the load now
            if not messages:
                self._store_skipped()
            if not messages and not self._in_group():
                # Rebalancing (another run joined or left) or the broker is away: not a cycle.
                self.source.unstick_join()
                now = time.monotonic()
                out_of_group_since = out_of_group_since or now
                if not s.follow and now - out_of_group_since > self._join_wait():
                    raise TransientError(
                        f"out of consumer group {s.group_id!r} for {now - out_of_group_since:.0f}s",
                        stage="join the Kafka group",
                        hint=f"is the broker up? {self._resume_hint()}",
                    )
                self._heartbeat()
                last_step, last_waited = time.monotonic(), self._db_waited  # this bound is not silence
                continue
            out_of_group_since = None
            # A cycle is a poll that read messages (one load transaction, as etl_runs counts them);
            # an empty poll is not a cycle.
            if messages:
                r.cycles += 1
            else:
                r.empty_polls += 1
            if messages:
                batch = self._prepare(messages)
                if batch is not None and self._complete(discard=batch):
                    self._submit(batch)
            now = time.monotonic()
            step = now - last_step - (self._db_waited - last_waited)
            last_step, last_waited = now, self._db_waited
            got = set(map(itemgetter(1), messages))
            for p in silent:
                silent[p] = 0.0 if p in got else silent[p] + step
            if not s.follow and max(silent.values(), default=0.0) > bound:
                self._stop_if_stalled({p: v for p, v in silent.items() if v > bound})
            if not messages:
                self._heartbeat()
            if self.on_cycle is not None:
                self.on_cycle(r)
            if s.sleep and not self._stop_reason(started):
                self.stop.wait(s.sleep)

    def _stop_if_stalled(self, silent: dict[int, float]) -> None:
        """Raise TransientError if a partition silent for so long still has messages to read."""
        assert self.source is not None
        behind: dict[int, int | None] = {}
        for tp in self.source.assigned():
            if tp.partition not in silent:
                continue
            end = self.ends_at_start.get(tp.partition)
            try:
                position = self.source.position(tp)
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
            f"partitions {sorted(behind)} of {self.s.topic} gave no message for "
            f"{max(silent[p] for p in behind):.0f}s while they have {left} to read",
            stage="poll Kafka",
            hint=f"is each partition's leader broker up? {self._resume_hint()}",
        )

    def _resume_hint(self) -> str:
        """What a run stopping on a transient error leaves behind: the truth about its offsets."""
        r = self.report
        if r.committed_cycles == 0 and self._inflight is None:
            return "the offsets did not move; the next run resumes"
        return (
            "what this run loaded before stopping stays committed (see its report); "
            "the next run resumes from the stored offsets"
        )

    def _poll(self, limit: int) -> list[RawMessage]:
        """One poll; a broker blip is an empty poll (the silence and group bounds decide when to give up)."""
        import kafka.errors as kerr

        from etl.kafka.client import kafka_error_text

        assert self.source is not None
        try:
            return self.source.poll(limit, self.s.poll_timeout_ms, self._caught_up)
        except kerr.KafkaError as exc:
            if not getattr(exc, "retriable", False) and not isinstance(
                exc, (kerr.KafkaConnectionError, kerr.NodeNotReadyError, kerr.KafkaTimeoutError)
            ):
                raise TransientError(kafka_error_text(exc), stage="poll Kafka") from None
            log.warning("Kafka poll failed, will poll again: %s", kafka_error_text(exc))
            time.sleep(0.5)
            return []

    def _store_skipped(self) -> None:
        """Move stored offsets over records the consumer passed without returning any message.

        Transaction markers (and, under read_committed, aborted transactions) take offsets but are
        never messages: without this, a partition whose last record is a commit marker would keep
        its stored offset one short of the end for ever, and show a lag that no run can read.
        The position is past only records that were returned (and are loaded, with no load in
        flight) or skipped; the advance is conditional like any other.
        """
        if self.s.dry_run or self._inflight is not None or self.source is None or not self._in_group():
            return
        moves: list[load.OffsetAdvance] = []
        try:
            for tp in sorted(self.source.assigned()):
                stored = self.expected.get(tp.partition)
                if stored is not None and (at := self.source.position(tp)) > stored:
                    moves.append(load.OffsetAdvance(tp.partition, stored, at))
        except (EtlError, ValueError) as exc:  # the broker is away or a partition was revoked: later
            log.debug("could not read positions: %s", exc)
            return
        if not moves:
            return
        r, s = self.report, self.s
        try:
            self._db(
                lambda c: load.advance_offsets(c, self.tables, s.group_id, s.topic, r.run_id, moves),
                "store offsets past transaction markers",
            )
        except load.OffsetConflict:  # another run moved them meanwhile; it read at least as far
            return
        for a in moves:
            self.expected[a.partition] = a.new
            r.partitions.setdefault(a.partition, PartitionReport(a.partition)).end = a.new
        self.source.commit({_tp(s.topic, a.partition): a.new for a in moves})

    def _in_group(self) -> bool:
        """A stable member whose every partition is positioned: its assignment means something."""
        assert self.source is not None
        return self.source.joined() and not self.source.pending()

    def _stop_reason(self, started: float) -> str | None:
        r, s = self.report, self.s
        if self.stop.is_set():
            return "signal"
        if s.cycles is not None and r.cycles >= s.cycles:
            return "cycles"
        if s.max_messages is not None and r.read >= s.max_messages:
            return "max_messages"
        if s.max_seconds is not None and time.monotonic() - started >= s.max_seconds:
            return "max_seconds"
        if not s.follow and self.source is not None and self._in_group():
            # Only a settled member's empty assignment means that other runs hold every partition.
            if not self.source.assigned():
                return None if self._others_hold_work() else "no_partitions"
            if r.cycles + r.empty_polls > 0 and self._caught_up():
                return None if self._others_hold_work() else "caught_up"
        return None

    def _others_hold_work(self) -> bool:
        """True while partitions the group did not give this run hold messages from before it started,
        and their members may be runs that were killed.

        A member killed without leaving holds its partitions until its session expires; then the
        group hands them over. So the run waits for that, up to :meth:`_join_wait`, before it calls
        itself done. A holder that moves its partition's stored offset meanwhile is alive and
        reading (scale-out): the run does not wait for it. What is still held at the end is named in
        the report.
        """
        assert self.source is not None
        mine = {tp.partition for tp in self.source.assigned()}
        others = [p for p in self.ends_at_start if p not in mine]
        if not others:
            self._held = None
            return False
        stored = self._stored_offsets()
        at = {p: stored.get(p, self.begins_at_start.get(p, 0)) for p in others}
        lagging = {p: o for p, o in at.items() if self.ends_at_start[p] > o}
        if not lagging:
            self._held = None
            return False
        now = time.monotonic()
        if self._held is None:
            self._held = (now, dict(lagging))
            log.info(
                "partitions %s have %d messages to read and other members of the group hold them; "
                "waiting up to %.0fs for them to read them or leave the group (a killed run's member "
                "stays until its session expires)",
                sorted(lagging),
                sum(self.ends_at_start[p] - o for p, o in lagging.items()),
                self._join_wait(),
            )
        since, first = self._held
        for p, o in lagging.items():
            first.setdefault(p, o)
        if all(first[p] != o for p, o in lagging.items()):
            return False  # every holder is reading: live members
        if now - since > self._join_wait():
            log.info("partitions %s are still held by other members; leaving them to them", sorted(lagging))
            return False
        return True

    def _caught_up(self) -> bool:
        """Every assigned partition is at or past the end offset it had when the run started."""
        assert self.source is not None
        assigned = self.source.assigned()
        if not assigned or self.source.pending():
            return False
        try:
            for tp in assigned:
                end = self.ends_at_start.get(tp.partition)
                if end is None:  # a partition added since the run started: its end is its end now
                    end = self.source.end_offsets([tp])[tp]
                    self.ends_at_start[tp.partition] = end
                if self.source.position(tp) < end:
                    return False
        except EtlError as exc:  # the broker is away: not caught up; the idle bound decides
            log.debug("could not tell whether caught up: %s", exc)
            return False
        return True

    # -- one cycle --------------------------------------------------------------------------------

    def _prepare(self, messages: list[RawMessage]) -> _Batch | None:
        """Count, de-duplicate, normalise and validate a poll's messages; None in a dry run (counted)."""
        from etl.normalise import normalise
        from etl.validate import records, validate

        r, s = self.report, self.s
        r.read += len(messages)
        positions = _positions(messages)
        fresh, duplicates = self._split_duplicates(messages, positions)
        r.duplicates += duplicates
        t = time.monotonic()
        frame = normalise(fresh)
        r.add_time("normalise", time.monotonic() - t)
        t = time.monotonic()
        good, rejected = validate(frame)
        r.add_time("validate", time.monotonic() - t)
        rejects = records(rejected)
        good = self._with_incarnation(good, rejects)

        if fresh and len(rejects) / len(fresh) > s.max_reject_ratio:
            r.stop_reason = "reject_ratio"
            raise RejectRatioExceeded(
                f"{len(rejects)} of {len(fresh)} messages in cycle {r.cycles} were rejected "
                f"({len(rejects) / len(fresh):.0%} > max_reject_ratio {s.max_reject_ratio:.0%}); "
                "the cycle was rolled back and no offset moved"
            )

        advances = self._advances(positions)
        if s.dry_run:
            self._count(len(good), len(rejects), rejects)
            for a in advances:
                self.expected[a.partition] = a.new
            self._log_cycle(r.cycles, len(messages), len(good), len(rejects), duplicates)
            return None
        return _Batch(r.cycles, messages, positions, duplicates, good, rejects, frame, advances)

    def _with_incarnation(self, good: pd.DataFrame, rejects: list[dict[str, Any]]) -> pd.DataFrame:
        """``good`` with its ``incarnation`` column; each reject gets its own."""
        import numpy as np

        of = self._incarnation_of
        for reject in rejects:
            reject["incarnation"] = of(int(reject["partition"]))
        parts = good["partition"].to_numpy() if len(good) else np.zeros(0, dtype=np.int64)
        values = {of(int(p)) for p in np.unique(parts).tolist()}
        if len(values) <= 1:  # the usual case: one value for the whole batch
            return good.assign(incarnation=np.int32(values.pop() if values else 0))
        lookup = {p: of(p) for p in np.unique(parts).tolist()}
        return good.assign(incarnation=np.array([lookup[p] for p in parts.tolist()], dtype=np.int32))

    def _incarnation_of(self, partition: int) -> int:
        found = self.incarnation.get(partition)
        return found if found is not None else self._latest.get(partition, 0)

    def _submit(self, batch: _Batch) -> None:
        """Start loading ``batch`` on the load thread; the next batch starts from its offsets."""
        assert self._inflight is None
        cycle = load.CycleLoad(
            run_id=self.report.run_id,
            good=batch.good,
            rejects=batch.rejects,
            advances=batch.advances,
            source=batch.frame,
            read=len(batch.messages),
            duplicates=batch.duplicates,
        )
        inflight = _InFlight(batch, Future())

        def attempt(conn: Any) -> load.LoadResult:
            inflight.connections.append(conn.connection.driver_connection)
            if self._abort.is_set():
                raise KeyboardInterrupt
            result = load.load_cycle(conn, self.tables, self.s, cycle)
            if self._abort.is_set():  # interrupted between statements: no COMMIT
                raise KeyboardInterrupt
            return result

        def work() -> tuple[load.LoadResult, float]:
            t = time.monotonic()
            return self._db(attempt, "load"), time.monotonic() - t

        _start(inflight.future, work)
        self._inflight = inflight
        for a in batch.advances:
            self.expected[a.partition] = a.new

    def _complete(self, discard: _Batch | None = None) -> bool:
        """Wait for the load in flight and account for it; False if it yielded to another run.

        A batch prepared meanwhile (``discard``) read past offsets that are not this run's after
        all: on False it is put back unread.
        """
        inflight = self._inflight
        if inflight is None:
            return True
        r, s, batch = self.report, self.s, inflight.batch
        waiting = time.monotonic()
        try:
            result, took = inflight.future.result()
        except KeyboardInterrupt:
            raise
        except load.OffsetConflict as conflict:
            self._inflight = None
            own = self._own_commit(batch.advances)
            if own is None:
                if discard is not None:
                    self._discard(discard)
                self._discard(batch, conflict=True)
                self._yield_to_other_run(conflict.partitions, batch.messages)
                return False
            # Known from the database by totals: what it neither loaded nor rejected was stored before.
            own.already_loaded = len(batch.messages) - batch.duplicates - own.loaded - own.rejected
            result, took = own, 0.0
        except BaseException:
            self._inflight = None
            raise
        finally:
            self._db_waited += time.monotonic() - waiting
        self._inflight = None
        self._heartbeat_at = time.monotonic()  # the load wrote it
        r.add_time("load", took)
        r.committed_cycles += 1
        r.duplicates += result.already_loaded
        # result.rejected, not len(rejects): a cycle found committed after a lost connection knows
        # its totals from the database, not its rejects one by one.
        written = result.rejects if result.rejects is not None else [*batch.rejects, *result.refused]
        self._count(result.loaded, result.rejected, written)
        t = time.monotonic()
        assert self.source is not None
        self.source.commit({_tp(s.topic, a.partition): a.new for a in batch.advances})
        r.add_time("commit", time.monotonic() - t)
        self._log_cycle(
            batch.cycle,
            len(batch.messages),
            result.loaded,
            result.rejected,
            batch.duplicates + result.already_loaded,
        )
        return True

    def _discard(self, batch: _Batch, *, conflict: bool = False) -> None:
        """Un-count a batch that will not load; unless another run took its partitions (``conflict``,
        whose re-seek follows), seek them back so the batch is read again."""
        r = self.report
        r.cycles -= 1  # its messages are read again, in another cycle
        r.read -= len(batch.messages)
        r.duplicates -= batch.duplicates
        if conflict:
            r.conflicts += 1
        else:
            log.info(
                "cycle %d: read while the cycle before it was loading, which another run overtook: "
                "its %d messages will be read again",
                batch.cycle,
                len(batch.messages),
            )
        assert self.source is not None
        assigned = {tp.partition: tp for tp in self.source.assigned()}
        for p, first, count in zip(*_partition_runs(*batch.positions), strict=True):
            pr = r.partitions[p]
            pr.read -= count
            if not conflict:
                pr.end = self.expected.get(p)
                if p in assigned:
                    with contextlib.suppress(ValueError):  # revoked meanwhile: its next owner seeks it
                        self.source.seek(assigned[p], first)

    def _end_inflight(self, exc: BaseException) -> None:
        """The run is ending on ``exc``: finish the load in flight, or on an interrupt cancel it."""
        inflight = self._inflight
        if inflight is None:
            return
        if isinstance(exc, KeyboardInterrupt):
            self._inflight = None
            self._abort.set()
            self.stop.set()  # no retries for the cancelled load
            for connection in inflight.connections[-1:]:
                with contextlib.suppress(Exception):
                    connection.cancel()  # PostgreSQL rolls the transaction back
            wait_for([inflight.future], timeout=ABORT_WAIT_S)
            return
        try:
            self._complete()
        except Exception as error:  # the first failure is the one to report
            log.warning("the cycle being loaded failed too: %s", store.scrub(str(error), self.s))

    def _split_duplicates(
        self, messages: list[RawMessage], positions: tuple[Any, Any]
    ) -> tuple[list[RawMessage], int]:
        """Messages below the stored offset were loaded or rejected before (a rewind): skip them.

        A message twice in one batch (re-fetched after a seek) is kept once. The usual batch has
        neither, which numpy tells at once; only a batch with either is walked message by message.
        """
        import numpy as np

        parts, offsets = positions
        for p, start, count in zip(*_partition_runs(parts, offsets), strict=True):
            pr = self.report.partitions.setdefault(p, PartitionReport(p))
            if pr.start is None:
                pr.start = start
            pr.read += count
        below = np.zeros(len(messages), dtype=bool)
        for p, e in self.expected.items():
            if e is not None:
                below |= (parts == p) & (offsets < e)
        keys = parts << 44 | offsets  # partition < 2**19, offset < 2**44 (17 trillion)
        if not below.any() and len(np.unique(keys)) == len(messages):
            return messages, 0
        seen: set[tuple[int, int]] = set()
        fresh = []
        for m, old in zip(messages, below.tolist(), strict=True):
            if not old and (m.partition, m.offset) not in seen:
                seen.add((m.partition, m.offset))
                fresh.append(m)
        return fresh, len(messages) - len(fresh)

    def _advances(self, positions: tuple[Any, Any]) -> list[load.OffsetAdvance]:
        import numpy as np

        parts, offsets = positions
        out = []
        for p in np.unique(parts).tolist():
            offset = int(offsets[parts == p].max())
            expected = self.expected.get(p)
            if expected is None or offset + 1 > expected:
                incarnation = self._incarnation_of(p)
                out.append(load.OffsetAdvance(p, expected, offset + 1, incarnation, self.topic_id))
            self.report.partitions[p].end = max(offset + 1, expected or 0)
        return out

    def _count(self, loaded: int, rejected: int, rejects: list[dict[str, Any]]) -> None:
        r = self.report
        r.loaded += loaded
        r.rejected += rejected
        for reject in rejects:
            for e in reject["errors"]:
                r.rejects_by_rule[e["rule"]] = r.rejects_by_rule.get(e["rule"], 0) + 1

    def _own_commit(self, advances: list[load.OffsetAdvance]) -> load.LoadResult | None:
        """After a conflict: did this very cycle commit on an earlier attempt? Its result, else None.

        A connection lost during COMMIT leaves the outcome unknown; the retry then finds the
        offsets already advanced, by this run, to exactly this cycle's targets.
        """
        if not advances:
            return None
        r = self.report

        def read(c: Any) -> tuple[dict[int, tuple[int, str | None]], load.LoadResult]:
            owners = load.read_offset_owners(c, self.tables, self.s.group_id, self.s.topic)
            ranges = {a.partition: (a.expected or 0, a.new) for a in advances}
            incarnations = {a.partition: self._incarnation_of(a.partition) for a in advances}
            return owners, load.cycle_outcome(c, self.tables, r.run_id, self.s.topic, ranges, incarnations)

        owners, result = self._db(read, "check the offsets")
        if all(owners.get(a.partition) == (a.new, r.run_id) for a in advances):
            log.warning("the cycle had committed before its connection was lost; not loading it again")
            return result
        return None

    def _yield_to_other_run(self, partitions: list[int], messages: list[RawMessage]) -> None:
        """Another run advanced these partitions first: re-seek every partition of the batch to the truth."""
        assert self.source is not None
        stored = self._stored_offsets()
        log.warning(
            "partitions %s were advanced by another run; re-seeking to the stored offsets", partitions
        )
        assigned = {tp.partition: tp for tp in self.source.assigned()}
        first: dict[int, int] = {}
        for m in messages:
            first[m.partition] = min(m.offset, first.get(m.partition, m.offset))
        for p, offset in first.items():
            self.expected[p] = stored.get(p)
            # No stored offset yet (the other run's row was for another partition): read this
            # batch's messages of the partition again rather than skip them.
            target = stored.get(p, offset)
            if p in assigned:
                with contextlib.suppress(ValueError):  # revoked meanwhile: its next owner seeks it
                    self.source.seek(assigned[p], target)
            pr = self.report.partitions.get(p)
            if pr is not None:
                pr.end = stored.get(p)

    def _log_cycle(self, cycle: int, read: int, loaded: int, rejected: int, duplicates: int) -> None:
        r = self.report
        log.info(
            "cycle %d: read %d, %s %d, rejected %d, duplicates %d",
            cycle,
            read,
            "would load" if self.s.dry_run else "loaded",
            loaded,
            rejected,
            duplicates,
            extra={
                "event": "cycle",
                "run_id": r.run_id,
                "cycle": cycle,
                "read": read,
                "loaded": loaded,
                "rejected": rejected,
                "duplicates": duplicates,
            },
        )

    # -- database calls with retries --------------------------------------------------------------

    def _db(self, fn: Callable[[Any], Any], what: str, *, retry: bool = True) -> Any:
        """Run ``fn(connection)`` in a transaction; retry transient failures until the deadline."""
        assert self.engine is not None
        deadline = time.monotonic() + (self.s.retry_deadline if retry else 0)
        if self.s.max_seconds is not None:  # the time limit bounds the retries too
            deadline = min(deadline, self._clock + self.s.max_seconds)
        delay = 0.5
        while True:
            # A statement waiting for another session's lock names who holds it, halfway to the timeout.
            watch = store.BlockerWatch(
                self.engine, self.s, what, max(1.0, min(10.0, store.lock_timeout_s(self.s) / 2))
            )
            try:
                with self.engine.begin() as conn:
                    watch.watch(conn)
                    try:
                        return fn(conn)
                    finally:
                        watch.stop()
            except (load.OffsetConflict, EtlError):
                raise
            except Exception as exc:
                if store.interrupted(exc):
                    raise KeyboardInterrupt from None
                error = store.classify(exc, what, self.s, blockers=watch.blockers)
                # A password, a certificate, a privilege: the operator's to fix, no retry helps.
                if isinstance(error, ConfigError) or not store.is_transient(exc):
                    raise error from None
                if time.monotonic() + delay > deadline:
                    raise error from None
                log.warning(
                    "%s: PostgreSQL error, retrying in %.1fs: %s%s",
                    what,
                    delay,
                    store.scrub(store.first_line(str(exc)), self.s),
                    f" (blocked by {watch.blockers})" if watch.blockers else "",
                )
                # A stop request ends the retries: the cycle has rolled back, nothing moved.
                if self.stop.wait(delay):
                    raise store.classify(exc, what, self.s) from None
                delay = min(delay * 2, 10)

    # -- the end ----------------------------------------------------------------------------------

    def _finish(self, exc: BaseException | None) -> None:
        r = self.report
        r.finished_at = datetime.now(UTC)
        if exc is None:
            r.status = "dry_run" if self.s.dry_run else "ok"
        elif isinstance(exc, RejectRatioExceeded):
            r.status, r.stop_reason, r.error = "reject_ratio", "reject_ratio", str(exc)
        elif isinstance(exc, KeyboardInterrupt):
            r.status, r.stop_reason, r.error = "interrupted", "signal", "interrupted"
        elif isinstance(exc, TopicChanged):
            r.status, r.stop_reason, r.error = "failed", "topic_changed", store.scrub(str(exc), self.s)
        else:
            r.status, r.stop_reason, r.error = "failed", "error", store.scrub(str(exc), self.s)
        if (
            r.status == "ok"
            and r.stop_reason == "signal"
            and r.committed_cycles == 0
            and r.read == 0
            and not self._service_stop()
        ):
            r.status = "interrupted"
        self._fill_lag()
        if self.s.dry_run or self.engine is None:
            return
        values = {
            "status": r.status,
            "stop_reason": r.stop_reason,
            "start_offsets": {str(p): pr.start for p, pr in r.partitions.items()},
            "end_offsets": {str(p): pr.end for p, pr in r.partitions.items()},
            "error": r.error,
        }
        try:
            self._db(lambda c: load.finish_run(c, self.tables, r.run_id, **values), "finish run", retry=False)
        except Exception as e:  # the database may be what failed; the report still tells the story
            log.warning("could not record the run's outcome in %s: %s", self.s.runs_table, e)
        if r.status == "interrupted" and exc is None:
            raise Interrupted("interrupted before the first cycle committed; nothing was loaded")

    def _service_stop(self) -> bool:
        """A stop request to ``--follow`` other than a Ctrl-C: a service manager stopping a healthy
        service (SIGTERM), which is success even when there was nothing to load."""
        return self.s.follow and getattr(self.stop, "signal_name", None) != "SIGINT"

    def _fill_lag(self) -> None:
        """Lag of every partition of the topic, read by this run or not: the stored offset against the
        end offset; the members holding the partitions it was not given."""
        r = self.report
        if self.source is None or self.source._consumer is None:
            return
        partitions = sorted(set(self.ends_at_start) | set(r.partitions))
        if not partitions:
            return
        tps = [_tp(self.s.topic, p) for p in partitions]
        ends: dict[int, int] = {}
        # Bounded: after a broker failure the report must not wait for the broker to return.
        try:
            ends = {tp.partition: e for tp, e in self.source.end_offsets(tps, timeout_ms=3000).items()}
        except Exception:  # lag is informative only
            log.debug("could not read end offsets for the report", exc_info=True)
            # One partition whose leader is away fails the request for all: ask for each alone.
            for tp in tps:
                try:
                    ends.update({t.partition: e for t, e in self.source.end_offsets([tp], 1000).items()})
                except Exception:
                    log.debug("no end offset for partition %d", tp.partition, exc_info=True)
        try:
            stored: dict[int, int] | None = self._db(
                lambda c: load.read_offsets(c, self.tables, self.s.group_id, self.s.topic),
                "read offsets",
                retry=False,
            )
        except Exception:  # the database may be what failed: this run's own positions will do
            stored = None
        for p in partitions:
            pr = r.partitions.setdefault(p, PartitionReport(p))
            pr.assigned = p in self.ever_assigned or pr.read > 0
            if pr.end is None and pr.assigned:
                pr.end = self.expected.get(p)
            if ends.get(p) is not None:  # a partition without a leader may come back as None
                pr.end_offset = ends[p]
            elif p in self.ends_at_start:
                # No answer now: the end seen when the run started, so the lag shown is a lower bound.
                pr.end_offset, pr.end_offset_at = self.ends_at_start[p], "start"
            if stored is not None:
                pr.stored = stored.get(p)
            if pr.stored is None and pr.end is None:
                pr.log_start = self.begins_at_start.get(p)
        if r.unread:
            try:
                holders = self.source.holders()
            except Exception:  # who holds them is a courtesy; the lag is the point
                log.debug("could not describe the consumer group", exc_info=True)
                holders = {}
            for p, pr in r.unread.items():
                pr.held_by = holders.get(p)
            log.warning(
                "partitions %s were not read by this run: other members of group %r held them (%s); "
                "%d messages wait on them",
                list(r.unread),
                self.s.group_id,
                "; ".join(f"{p}: {pr.held_by or 'unknown'}" for p, pr in r.unread.items()),
                sum(pr.lag or 0 for pr in r.unread.values()),
            )


def _start(future: Future[Any], work: Callable[[], Any]) -> None:
    """Run ``work`` on a daemon thread, its outcome in ``future`` (a stuck database call cannot keep
    the process from exiting, as an executor's thread would)."""

    def target() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(work())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=target, name="metric-etl-load", daemon=True).start()


def _tp(topic: str, partition: int) -> TopicPartition:
    from kafka import TopicPartition

    return TopicPartition(topic, partition)


def _positions(messages: list[RawMessage]) -> tuple[Any, Any]:
    """The partitions and offsets of ``messages`` as two int64 arrays."""
    import numpy as np

    n = len(messages)
    parts = np.fromiter(map(itemgetter(1), messages), dtype=np.int64, count=n)
    offsets = np.fromiter(map(itemgetter(2), messages), dtype=np.int64, count=n)
    return parts, offsets


def _partition_runs(parts: Any, offsets: Any) -> tuple[list[int], list[int], list[int]]:
    """Per partition of a batch, in partition order: its first offset in batch order and its count."""
    import numpy as np

    unique, first, counts = np.unique(parts, return_index=True, return_counts=True)
    return unique.tolist(), offsets[first].tolist(), counts.tolist()


def _resolved(path: str | None) -> str | None:
    """An absolute path: a relative one says nothing without the working directory."""
    from pathlib import Path

    return str(Path(path).resolve()) if path else None
