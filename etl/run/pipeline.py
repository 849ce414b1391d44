"""Runs the cycles: poll -> normalise -> validate -> load in one transaction -> commit to Kafka.

The run stops at the first of: ``cycles`` polls, ``max_messages`` read, ``max_seconds`` elapsed,
caught up with the end offsets captured at start, or a stop request (SIGTERM/SIGINT finish the
current cycle). ``follow`` polls until stopped.

A cycle's load runs on the load thread (:mod:`etl.run.loader`) while the next cycle is polled,
normalised and validated; :mod:`etl.run.book` keeps where each partition stands.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from etl.db import offsets as db_offsets
from etl.db import runs as db_runs
from etl.db import schema, store, write
from etl.db.partitions import PartitionKeeper
from etl.errors import (
    EtlError,
    Interrupted,
    LockHeld,
    RejectRatioExceeded,
    TopicChanged,
    TransientError,
)
from etl.report import PartitionReport, RunReport
from etl.run.atomic import AtomicRun, claim
from etl.run.book import OffsetBook, distinct
from etl.run.book import positions as batch_positions
from etl.run.collector import Collector
from etl.run.loader import Batch, Loader, log_cycle, topic_partition
from etl.run.partitions import HeldPartitions, fill_lag, stop_if_stalled
from etl.run.topic import check_topic

if TYPE_CHECKING:
    import pandas as pd
    from kafka import TopicPartition
    from sqlalchemy.engine import Engine

    from etl.config import Settings
    from etl.contract import RawMessage
    from etl.kafka.source import KafkaSource

log = logging.getLogger(__name__)

SILENCE_MIN_S = 30.0  # the least time a partition with messages left may give none before a run stops


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
        self.partitions = PartitionKeeper(settings, self.tables)
        self.report = RunReport(
            run_id=uuid.uuid4().hex[:16],
            topic=settings.topic,
            group_id=settings.group_id,
            started_at=datetime.now(UTC),
            dry_run=settings.dry_run,
            config_file=_resolved(settings.config_file),
            atomic=settings.atomic,
        )
        self.book = OffsetBook()
        self.rewind: dict[int, int] = {}
        self.ends_at_start: dict[int, int] = {}  # every partition of the topic
        self.begins_at_start: dict[int, int] = {}
        self.ever_assigned: set[int] = set()
        self.held = HeldPartitions()  # partitions with messages left that other members hold
        self.engine: Engine | None = None
        self.source: KafkaSource | None = None
        self.atomic: AtomicRun | None = None  # --atomic: the run's one transaction (etl.run.atomic)
        self.collector = Collector()  # the cyclic GC: off in the cycles, run every few
        self._clock = time.monotonic()
        self.heartbeat_at = time.monotonic()  # the last heartbeat written
        self.loader = Loader(self)

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
                    self.atomic = claim(self, self.engine, stack)
                    self._close_abandoned()
                    self.transact(
                        lambda c: db_runs.start_run(c, self.tables, r.run_id, self.s, "running"), "start run"
                    )
                    self.heartbeat_at = time.monotonic()
                try:
                    self._open_source(stack)
                    stack.enter_context(self.collector)
                    self._loop()
                    if self.atomic is not None:
                        self.atomic.commit(self)
                except BaseException as exc:
                    self.loader.end(exc)
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
        self.transact(
            lambda c: db_runs.close_abandoned(c, self.tables, self.s, by=by), "close abandoned runs"
        )

    def _heartbeat(self) -> None:
        """An idle run says it is alive every HEARTBEAT_EVERY_S (a cycle's load says it anyway)."""
        if self.s.dry_run or time.monotonic() - self.heartbeat_at < db_runs.HEARTBEAT_EVERY_S:
            return
        try:
            self.transact(
                lambda c: db_runs.heartbeat(c, self.tables, self.report.run_id), "heartbeat", retry=False
            )
            self.heartbeat_at = time.monotonic()
        except Exception as exc:  # the next cycle's load or heartbeat tries again
            log.debug("heartbeat failed: %s", exc)

    def _prepare_database(self) -> None:
        if self.s.dry_run:
            return
        self.transact(lambda c: schema.ensure_tables(c, self.tables), "create tables")

    def _open_source(self, stack: ExitStack) -> None:
        from etl.kafka.source import KafkaSource

        t = time.monotonic()
        self.source = KafkaSource(self.s, self._start_for)
        self.source.open()
        stack.callback(self.source.close)
        check_topic(self)
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

    def _start_for(self, tps: list[TopicPartition]) -> dict[TopicPartition, int | None]:
        """Where newly assigned partitions start: the stored offset (or an earlier rewind target)."""
        stored = self.stored_offsets()
        starts: dict[TopicPartition, int | None] = {}
        for tp in tps:
            p = tp.partition
            self.ever_assigned.add(p)
            known = stored.get(p)
            self.book.expected[p] = known
            candidates = [o for o in (known, self.rewind.get(p)) if o is not None]
            starts[tp] = min(candidates) if candidates else None
        return starts

    def stored_offsets(self) -> dict[int, int]:
        """partition -> stored next offset; notes each partition's incarnation on the way."""

        def read(c: Any) -> dict[int, db_offsets.StoredOffset]:
            return db_offsets.read_stored(c, self.tables, self.s.group_id, self.s.topic)

        if self.s.dry_run:
            try:
                rows = self.transact(read, "read offsets", retry=False)
            except Exception:  # no tables yet: a dry run creates nothing
                rows = {}
        else:  # an atomic run sees its own advances
            rows = self.write(read, "read offsets")
        return self.book.note_stored(rows)

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
        last_step, last_waited = time.monotonic(), self.loader.waited
        while True:
            # Partitions assigned by a rebalance start where the database says, before any poll;
            # the database says it once the load in flight is done.
            if self.loader.inflight is not None and self.source.pending():
                self.loader.complete()
            for tp in self.source.settle():
                silent[tp.partition] = 0.0
            reason = self._stop_reason(started)
            if reason and self.loader.inflight is not None:
                self.loader.complete()  # the reason may not hold after it (a conflict re-seeks)
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
            self.collector.cycle()
            messages = self._poll(limit)
            r.add_time("consume", time.monotonic() - t)
            if not messages and self.loader.inflight is not None:
                self.loader.complete()  # nothing to read meanwhile: account for the load now
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
                last_step, last_waited = time.monotonic(), self.loader.waited  # this bound is not silence
                continue
            out_of_group_since = None
            # A cycle is a poll that read messages (one load transaction, as etl_runs counts them);
            # an empty poll is not a cycle.
            if messages:
                r.cycles += 1
            else:
                r.empty_polls += 1
            got: set[int] = set()
            if messages:
                positions = batch_positions(messages)
                got.update(distinct(positions[0]))
                batch = self._prepare(messages, positions)
                if batch is not None and self.loader.complete(discard=batch):
                    self.loader.submit(batch)
            now = time.monotonic()
            step = now - last_step - (self.loader.waited - last_waited)
            last_step, last_waited = now, self.loader.waited
            for p in silent:
                silent[p] = 0.0 if p in got else silent[p] + step
            if not s.follow and max(silent.values(), default=0.0) > bound:
                stop_if_stalled(self, {p: v for p, v in silent.items() if v > bound}, self._resume_hint())
            if not messages:
                self._heartbeat()
            if self.on_cycle is not None:
                self.on_cycle(r)
            if s.sleep and not self._stop_reason(started):
                self.stop.wait(s.sleep)

    def _resume_hint(self) -> str:
        """What a run stopping on a transient error leaves behind: the truth about its offsets."""
        r = self.report
        if (r.committed_cycles == 0 or self.atomic is not None) and self.loader.inflight is None:
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
        if self.s.dry_run or self.loader.inflight is not None or self.source is None or not self._in_group():
            return
        moves: list[db_offsets.OffsetAdvance] = []
        try:
            for tp in sorted(self.source.assigned()):
                stored = self.book.expected.get(tp.partition)
                if stored is not None and (at := self.source.position(tp)) > stored:
                    moves.append(db_offsets.OffsetAdvance(tp.partition, stored, at))
        except (EtlError, ValueError) as exc:  # the broker is away or a partition was revoked: later
            log.debug("could not read positions: %s", exc)
            return
        if not moves:
            return
        r, s = self.report, self.s
        try:
            self.write(
                lambda c: db_offsets.advance_offsets(c, self.tables, s.group_id, s.topic, r.run_id, moves),
                "store offsets past transaction markers",
            )
        except db_offsets.OffsetConflict:  # another run moved them meanwhile; it read at least as far
            return
        for a in moves:
            self.book.expected[a.partition] = a.new
            r.partitions.setdefault(a.partition, PartitionReport(a.partition)).end = a.new
        offsets = {topic_partition(s.topic, a.partition): a.new for a in moves}
        if self.atomic is not None:  # for Kafka after the COMMIT
            self.atomic.kafka_offsets.update(offsets)
        else:
            self.source.commit(offsets)

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
                return None if self.held.waiting(self) else "no_partitions"
            # Before the first poll too: a caught-up run need not wait out a poll that cannot read.
            if self._caught_up():
                return None if self.held.waiting(self) else "caught_up"
        return None

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

    def _prepare(self, messages: list[RawMessage], positions: tuple[Any, Any]) -> Batch | None:
        """Count, de-duplicate, normalise and validate a poll's messages (``positions``: their
        partitions and offsets); None in a dry run (counted)."""
        from etl.typed import split

        r, s = self.report, self.s
        r.read += len(messages)
        fresh, duplicates = self.book.split_duplicates(messages, positions, r)
        r.duplicates += duplicates
        good, rejected = split(fresh, seconds=r.timings)  # adds its normalise and validate time
        good, rejects = self.book.with_incarnation(good, rejected)

        if fresh and len(rejects) / len(fresh) > s.max_reject_ratio:
            r.stop_reason = "reject_ratio"
            raise RejectRatioExceeded(
                f"{len(rejects)} of {len(fresh)} messages in cycle {r.cycles} were rejected "
                f"({len(rejects) / len(fresh):.0%} > max_reject_ratio {s.max_reject_ratio:.0%}); "
                "the cycle was rolled back and no offset moved"
            )

        advances = self.book.advances(positions, r)
        if s.dry_run:
            self.count(len(good), len(rejects), rejects)
            self.book.moved(advances)
            log_cycle(self, r.cycles, len(messages), len(good), len(rejects), duplicates)
            return None
        # Made here, while the cycle before loads, so that the load thread mostly waits on PostgreSQL
        t = time.monotonic()
        made = write.made_ahead(self.tables, good, r.run_id, rejects) if len(good) else None
        r.add_time("load", time.monotonic() - t)
        # A refused row's reject takes its key, headers and payload from its message (good's labels
        # are positions in ``fresh``).
        return Batch(r.cycles, messages, positions, duplicates, good, rejects, fresh, advances, made)

    def count(self, loaded: int, rejected: int, rejects: pd.DataFrame) -> None:
        r = self.report
        r.loaded += loaded
        r.rejected += rejected
        for errors in rejects["errors"].tolist():
            for e in errors:
                r.rejects_by_rule[e["rule"]] = r.rejects_by_rule.get(e["rule"], 0) + 1

    # -- database calls with retries --------------------------------------------------------------

    def transact(self, fn: Callable[[Any], Any], what: str, *, retry: bool = True) -> Any:
        """Run ``fn(connection)`` in a transaction; retry transient failures until the deadline."""
        assert self.engine is not None
        deadline = time.monotonic() + (self.s.retry_deadline if retry else 0)
        if self.s.max_seconds is not None:  # the time limit bounds the retries too
            deadline = min(deadline, self._clock + self.s.max_seconds)
        # A conflict is the exactly-once protocol at work: the load thread handles it.
        passing = (db_offsets.OffsetConflict,)
        return store.transaction(
            self.engine, self.s, fn, what, deadline=deadline, stop=self.stop, passing=passing
        )

    def write(self, fn: Callable[[Any], Any], what: str) -> Any:
        """A write of the run's data (or a read that must see it): in an atomic run inside its one
        transaction, without retries; else :meth:`transact`."""
        if self.atomic is not None:
            return self.atomic.execute(fn, what)
        return self.transact(fn, what)

    # -- the end ----------------------------------------------------------------------------------

    def _finish(self, exc: BaseException | None) -> None:
        r = self.report
        r.finished_at = datetime.now(UTC)
        if exc is None:
            r.status = "dry_run" if self.s.dry_run else "ok"
        elif isinstance(exc, LockHeld):  # an atomic run took the group and topic (etl.run.atomic)
            r.status, r.stop_reason, r.error = "skipped", "atomic_run", store.scrub(str(exc), self.s)
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
        if self.atomic is not None:  # not committed: all of it rolls back, before the run row says so
            self.atomic.end(self, exc)
        fill_lag(self)
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
            self.transact(
                lambda c: db_runs.finish_run(c, self.tables, r.run_id, **values), "finish run", retry=False
            )
        except Exception as e:  # the database may be what failed; the report still tells the story
            log.warning("could not record the run's outcome in %s: %s", self.s.runs_table, e)
        if r.status == "interrupted" and exc is None:
            raise Interrupted("interrupted before the first cycle committed; nothing was loaded")

    def _service_stop(self) -> bool:
        """A stop request to ``--follow`` other than a Ctrl-C: a service manager stopping a healthy
        service (SIGTERM), which is success even when there was nothing to load."""
        return self.s.follow and getattr(self.stop, "signal_name", None) != "SIGINT"


def _resolved(path: str | None) -> str | None:
    """An absolute path: a relative one says nothing without the working directory."""
    from pathlib import Path

    return str(Path(path).resolve()) if path else None
