"""The load thread: a cycle's load runs while the run reads the next cycle.

PostgreSQL stores one batch while Python reads the next. Loads stay one at a time and in order, and
everything Kafka is done on the run's thread. The next batch's conditional offset advances start from
where the batch in flight will leave them; if that batch yields to another run instead, the next one
is put back unread (its partitions re-seeked) before anything is retried.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from etl.db import offsets as db_offsets
from etl.db import store, write
from etl.run.book import partition_runs

if TYPE_CHECKING:
    import pandas as pd
    from kafka import TopicPartition
    from sqlalchemy.engine import Engine

    from etl.config import Settings
    from etl.contract import RawMessage
    from etl.db import schema
    from etl.db.partitions import PartitionKeeper
    from etl.kafka.source import KafkaSource
    from etl.report import RunReport
    from etl.run.book import OffsetBook

log = logging.getLogger(__name__)

ABORT_WAIT_S = 30.0  # after a second Ctrl-C, how long the load in flight gets to roll back
# How long the run's thread may leave the interpreter to a load that has not started its COPY yet
COPY_START_WAIT_S = 0.1


@dataclass
class Batch:
    """One cycle read and transformed, ready to load."""

    cycle: int  # the poll that read it
    messages: list[RawMessage]
    positions: tuple[Any, Any]
    duplicates: int
    good: pd.DataFrame
    rejects: pd.DataFrame
    source: list[RawMessage]  # the messages good's labels index, for refused rows' rejects
    advances: list[db_offsets.OffsetAdvance]
    made: write.Made | None = None  # good made ready for the load, while the load before it ran


@dataclass
class InFlight:
    """A batch whose load runs on the load thread."""

    batch: Batch
    future: Future[tuple[write.LoadResult, float]]
    connections: list[Any] = field(default_factory=list)  # the driver connection of each attempt
    to_default: int = 0  # its checks that go to the metrics table's default partition
    copying: threading.Event = field(default_factory=threading.Event)  # its COPY started, or it ended


class RunTransaction(Protocol):
    """The one transaction of an atomic run (:class:`etl.run.atomic.AtomicRun`)."""

    def cycle_loaded(self, run: Run, offsets: dict[TopicPartition, int], read: int) -> None: ...


class Run(Protocol):
    """What the load thread (and the report's lag) need of the run (:class:`etl.run.pipeline.Pipeline`)."""

    s: Settings
    tables: schema.Tables
    partitions: PartitionKeeper
    engine: Engine | None
    report: RunReport
    book: OffsetBook
    source: KafkaSource | None
    stop: threading.Event
    heartbeat_at: float
    ends_at_start: dict[int, int]  # every partition of the topic
    begins_at_start: dict[int, int]
    ever_assigned: set[int]

    @property
    def atomic(self) -> RunTransaction | None: ...

    def transact(self, fn: Callable[[Any], Any], what: str, *, retry: bool = True) -> Any: ...

    def write(self, fn: Callable[[Any], Any], what: str) -> Any: ...

    def stored_offsets(self) -> dict[int, int]: ...

    def count(self, loaded: int, rejected: int, rejects: pd.DataFrame) -> None: ...


class Loader:
    """Loads one batch at a time on a thread of its own, and accounts for it when it is done."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.inflight: InFlight | None = None
        self.abort = threading.Event()  # a second Ctrl-C: the load in flight must roll back
        self.waited = 0.0  # seconds the run loop spent waiting for loads (the silence bound)

    def submit(self, batch: Batch) -> None:
        """Start loading ``batch`` on the load thread; the next batch starts from its offsets."""
        assert self.inflight is None
        run = self.run
        inflight = InFlight(batch, Future())
        cycle = write.CycleLoad(
            run_id=run.report.run_id,
            good=batch.good,
            rejects=batch.rejects,
            advances=batch.advances,
            source=batch.source,
            read=len(batch.messages),
            duplicates=batch.duplicates,
            count_run=run.atomic is None,  # an atomic run's row is written outside its transaction
            made=batch.made,
            copying=inflight.copying.set,
        )

        def attempt(conn: Any) -> write.LoadResult:
            inflight.connections.append(conn.connection.driver_connection)
            if self.abort.is_set():
                raise KeyboardInterrupt
            if run.atomic is None:  # an atomic run that took the group meanwhile: stop (etl.run.atomic)
                store.share_load_lock(conn, run.s, "this run stopped; this cycle was rolled back")
            result = write.load_cycle(conn, run.tables, run.s, cycle)
            if self.abort.is_set():  # interrupted between statements: no COMMIT
                raise KeyboardInterrupt
            return result

        def work() -> tuple[write.LoadResult, float]:
            t = time.monotonic()
            try:
                if len(batch.good) and run.engine is not None:  # in a short transaction of its own
                    inflight.to_default = run.partitions.ensure(run.engine, batch.good["checked_at"])
                return run.write(attempt, "load"), time.monotonic() - t
            finally:
                inflight.copying.set()

        self.inflight = inflight  # before the thread starts: end() must see any load that runs
        try:
            _start(inflight.future, work)
        except Exception:  # no thread (an interrupt keeps it: the thread may have started)
            self.inflight = None
            raise
        run.book.moved(batch.advances)
        # The load's statements before its COPY are Python work while PostgreSQL waits for them:
        # this thread (which would parse the next batch meanwhile, holding the interpreter) waits
        # until the COPY is under way, a few tens of milliseconds, then reads while the server stores.
        waiting = time.monotonic()
        inflight.copying.wait(COPY_START_WAIT_S)
        self.waited += time.monotonic() - waiting

    def complete(self, discard: Batch | None = None) -> bool:
        """Wait for the load in flight and account for it; False if it yielded to another run.

        A batch prepared meanwhile (``discard``) read past offsets that are not this run's after
        all: on False it is put back unread.
        """
        inflight = self.inflight
        if inflight is None:
            return True
        run = self.run
        r, s, batch = run.report, run.s, inflight.batch
        waiting = time.monotonic()
        try:
            result, took = inflight.future.result()
        except KeyboardInterrupt:
            raise
        except db_offsets.OffsetConflict as conflict:
            self.inflight = None
            own = self.own_commit(batch.advances)
            if own is None:
                if discard is not None:
                    self.discard(discard)
                self.discard(batch, conflict=True)
                self.yield_to_other_run(conflict.partitions, batch.messages)
                return False
            # Known from the database by totals: what it neither loaded nor rejected was stored before.
            own.already_loaded = len(batch.messages) - batch.duplicates - own.loaded - own.rejected
            result, took = own, 0.0
        except BaseException:
            self.inflight = None
            raise
        finally:
            self.waited += time.monotonic() - waiting
        self.inflight = None
        run.heartbeat_at = time.monotonic()  # the load wrote it
        r.add_time("load", took)
        r.committed_cycles += 1
        r.default_partition += inflight.to_default
        r.duplicates += result.already_loaded
        # result.rejected, not len(rejects): a cycle found committed after a lost connection knows
        # its totals from the database, not its rejects one by one.
        written = result.rejects if result.rejects is not None else batch.rejects
        run.count(result.loaded, result.rejected, written)
        t = time.monotonic()
        assert run.source is not None
        offsets = {topic_partition(s.topic, a.partition): a.new for a in batch.advances}
        if run.atomic is not None:  # Kafka hears of it after the run's one COMMIT
            run.atomic.cycle_loaded(run, offsets, len(batch.messages))
        else:  # without waiting for the broker's answer: the next load need not wait for it
            run.source.commit(offsets, wait=False)
        r.add_time("commit", time.monotonic() - t)
        log_cycle(
            run,
            batch.cycle,
            len(batch.messages),
            result.loaded,
            result.rejected,
            batch.duplicates + result.already_loaded,
        )
        return True

    def discard(self, batch: Batch, *, conflict: bool = False) -> None:
        """Un-count a batch that will not load; unless another run took its partitions (``conflict``,
        whose re-seek follows), seek them back so the batch is read again."""
        run = self.run
        r = run.report
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
        assert run.source is not None
        assigned = {tp.partition: tp for tp in run.source.assigned()}
        for p, first, count in zip(*partition_runs(*batch.positions), strict=True):
            pr = r.partitions[p]
            pr.read -= count
            if not conflict:
                pr.end = run.book.expected.get(p)
                if p in assigned:
                    with contextlib.suppress(ValueError):  # revoked meanwhile: its next owner seeks it
                        run.source.seek(assigned[p], first)

    def end(self, exc: BaseException) -> None:
        """The run is ending on ``exc``: finish the load in flight, or on an interrupt cancel it."""
        inflight = self.inflight
        if inflight is None:
            return
        if isinstance(exc, KeyboardInterrupt):
            self.inflight = None
            self.abort.set()
            self.run.stop.set()  # no retries for the cancelled load
            inflight.future.cancel()  # a load whose thread has not begun: it never will
            for connection in inflight.connections[-1:]:
                with contextlib.suppress(Exception):
                    connection.cancel()  # PostgreSQL rolls the transaction back
            wait_for([inflight.future], timeout=ABORT_WAIT_S)
            return
        try:
            self.complete()
        except Exception as error:  # the first failure is the one to report
            log.warning("the cycle being loaded failed too: %s", store.scrub(str(error), self.run.s))

    def own_commit(self, advances: list[db_offsets.OffsetAdvance]) -> write.LoadResult | None:
        """After a conflict: did this very cycle commit on an earlier attempt? Its result, else None.

        A connection lost during COMMIT leaves the outcome unknown; the retry then finds the
        offsets already advanced, by this run, to exactly this cycle's targets.
        """
        run = self.run
        if not advances or run.atomic is not None:  # an atomic run commits once, at its end
            return None
        r = run.report

        def read(c: Any) -> tuple[dict[int, tuple[int, str | None]], write.LoadResult]:
            owners = db_offsets.read_offset_owners(c, run.tables, run.s.group_id, run.s.topic)
            ranges = {a.partition: (a.expected or 0, a.new) for a in advances}
            incarnations = {a.partition: run.book.incarnation_of(a.partition) for a in advances}
            return owners, write.cycle_outcome(c, run.tables, r.run_id, run.s.topic, ranges, incarnations)

        owners, result = run.transact(read, "check the offsets")
        if all(owners.get(a.partition) == (a.new, r.run_id) for a in advances):
            log.warning("the cycle had committed before its connection was lost; not loading it again")
            return result
        return None

    def yield_to_other_run(self, partitions: list[int], messages: list[RawMessage]) -> None:
        """Another run advanced these partitions first: re-seek every partition of the batch to the truth."""
        run = self.run
        assert run.source is not None
        stored = run.stored_offsets()
        log.warning(
            "partitions %s were advanced by another run; re-seeking to the stored offsets", partitions
        )
        assigned = {tp.partition: tp for tp in run.source.assigned()}
        first: dict[int, int] = {}
        for m in messages:
            first[m.partition] = min(m.offset, first.get(m.partition, m.offset))
        for p, offset in first.items():
            run.book.expected[p] = stored.get(p)
            # No stored offset yet (the other run's row was for another partition): read this
            # batch's messages of the partition again rather than skip them.
            target = stored.get(p, offset)
            if p in assigned:
                with contextlib.suppress(ValueError):  # revoked meanwhile: its next owner seeks it
                    run.source.seek(assigned[p], target)
            pr = run.report.partitions.get(p)
            if pr is not None:
                pr.end = stored.get(p)


def log_cycle(run: Run, cycle: int, read: int, loaded: int, rejected: int, duplicates: int) -> None:
    """The cycle's line in the log (with its numbers as fields for JSON logs)."""
    r = run.report
    log.info(
        "cycle %d: read %d, %s %d, rejected %d, duplicates %d",
        cycle,
        read,
        "would load" if run.s.dry_run else "staged" if run.atomic is not None else "loaded",
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


def topic_partition(topic: str, partition: int) -> TopicPartition:
    """kafka-python's TopicPartition (imported when first needed)."""
    from kafka import TopicPartition

    return TopicPartition(topic, partition)
