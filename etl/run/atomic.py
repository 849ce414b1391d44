"""``--atomic``: a bounded run whose every cycle commits in ONE transaction at the run's end, or none does.

The run opens one connection and one transaction before it reads (:func:`claim`). Each cycle's load
(the offset advances, the rows by COPY, the rejects) goes into that transaction as the cycle is
read, on the load thread as usual, so memory stays bounded by one cycle. The Kafka offsets and the
run's totals wait for the COMMIT at the end (:meth:`AtomicRun.commit`). Whatever else ends the run
rolls all of it back (:meth:`AtomicRun.end`): a failure (no retry: a lost transaction cannot be
retried one cycle at a time), a reject ratio above the bound, SIGTERM/SIGINT, a SIGKILL (PostgreSQL
rolls back with the connection). The ``etl_runs`` row is written outside the transaction, so it
says what happened either way.

Overlapping runs meet at the group's and topic's load lock (:func:`etl.db.store.take_load_lock`):
an atomic run holds it alone for its whole transaction, an ordinary run takes it shared in each
cycle (and checks it before it reads), so neither waits on the other's offset rows. See docs/atomic.md.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from etl.db import offsets as db_offsets
from etl.db import runs as db_runs
from etl.db import store
from etl.errors import EtlError, Interrupted, LockHeld, TransientError

if TYPE_CHECKING:
    from kafka import TopicPartition
    from sqlalchemy.engine import Connection, RootTransaction

    from etl.run.loader import Run

log = logging.getLogger(__name__)

NO_RETRY = (
    "an atomic run cannot retry one cycle inside its one transaction: nothing of it was kept; "
    "run it again when the service is back"
)


def claim(run: Run, engine: Any, stack: ExitStack) -> AtomicRun | None:
    """Before a run that writes records itself: an atomic run opens its transaction and takes the
    load lock alone (None for an ordinary run, which checks that no atomic run holds it).

    Raises LockHeld (exit 75, nothing done; the report says ``skipped``) when the lock is taken.
    """
    r = run.report
    try:
        if not run.s.atomic:
            run.transact(
                lambda c: store.share_load_lock(c, run.s, "nothing was done"), "check for an atomic run"
            )
            return None
        atomic = AtomicRun(run, engine)
        stack.callback(atomic.close)
        return atomic
    except LockHeld:
        r.status, r.stop_reason = "skipped", "atomic_run"
        r.finished_at = datetime.now(UTC)
        raise


class AtomicRun:
    """The one connection and transaction of an atomic run; one statement at a time on it."""

    def __init__(self, run: Run, engine: Any) -> None:
        self.s = run.s
        self.run_id = run.report.run_id
        self.lock = threading.Lock()  # the load thread and the run's thread share the connection
        self.kafka_offsets: dict[TopicPartition, int] = {}  # committed to Kafka after the COMMIT
        self.committed = False
        self.staged_cycles = 0
        self.broken = False  # a statement failed: the transaction can only roll back
        self.conn: Connection | None = None
        self.tx: RootTransaction | None = None
        try:
            self.conn = engine.connect()
            self.tx = self.conn.begin()
            store.take_load_lock(self.conn, self.s)
        except BaseException as exc:
            self.close()
            if isinstance(exc, EtlError):
                raise
            raise store.classify(exc, "open the atomic run's transaction", self.s) from None
        log.info("atomic run: one transaction until the run ends; nothing is kept unless it commits")

    def execute(self, fn: Callable[[Any], Any], what: str) -> Any:
        """``fn(connection)`` inside the run's transaction. No retry: any failure fails the run."""
        with self.lock:
            if self.broken or self.conn is None or self.tx is None or not self.tx.is_active:
                raise TransientError("the atomic run's transaction has ended", stage=what, hint=NO_RETRY)
            try:
                return fn(self.conn)
            except BaseException as exc:
                self.broken = True  # PostgreSQL refuses every statement after a failed one
                raise self._failure(exc, what) from None

    def _failure(self, exc: BaseException, what: str) -> BaseException:
        """What a failed statement of the run's transaction ends the run with."""
        if isinstance(exc, (EtlError, KeyboardInterrupt)):
            return exc
        if isinstance(exc, db_offsets.OffsetConflict):
            # Only something outside the load lock (`offsets reset`, an older version) gets here.
            return TransientError(
                f"{exc}, outside the load lock, while this atomic run held it", stage=what, hint=NO_RETRY
            )
        if store.interrupted(exc):
            return KeyboardInterrupt()
        error = store.classify(exc, what, self.s)
        if isinstance(error, TransientError):
            error.hint = NO_RETRY
        return error

    def cycle_loaded(self, run: Run, offsets: dict[TopicPartition, int], read: int) -> None:
        """A cycle is in the transaction: keep its Kafka offsets for after the COMMIT, and show the
        progress in the run's row (outside the transaction; a failure to is harmless)."""
        self.kafka_offsets.update(offsets)
        self.staged_cycles += 1
        try:
            run.transact(
                lambda c: db_runs.progress(c, run.tables, self.run_id, read), "heartbeat", retry=False
            )
            run.heartbeat_at = time.monotonic()
        except Exception as exc:  # the next cycle says it again; the COMMIT is what counts
            log.debug("could not record the atomic run's progress: %s", exc)

    def commit(self, run: Run) -> None:
        """The run read what it was asked to: COMMIT everything, then the Kafka offsets.

        A stop request (SIGTERM/SIGINT) is no reason to keep a part: it rolls back (Interrupted).
        """
        r = run.report
        if r.stop_reason == "signal":
            raise Interrupted(
                f"stopped by {getattr(run.stop, 'signal_name', 'a signal')} before the atomic run ended"
            )
        self.execute(
            lambda c: db_runs.totals(c, run.tables, self.run_id, r.loaded, r.rejected, r.duplicates),
            "record the run's totals",
        )
        t = time.monotonic()
        with self.lock:
            assert self.tx is not None
            try:
                self.tx.commit()
            except Exception as exc:
                if not self._committed_anyway(run):
                    error = store.classify(exc, "commit the atomic run", self.s)
                    if isinstance(error, TransientError):
                        error.hint = NO_RETRY
                    raise error from None
                log.warning("the COMMIT's answer was lost, but it committed (the offsets are this run's)")
            finally:
                self._close_connection()
        self.committed = True
        r.committed_cycles = self.staged_cycles
        r.add_time("commit", time.monotonic() - t)
        if self.kafka_offsets:
            assert run.source is not None
            run.source.commit(self.kafka_offsets)  # lag monitoring only: after the database, never before
        log.info("atomic run: committed %d cycles in one transaction", self.staged_cycles)

    def _committed_anyway(self, run: Run) -> bool:
        """After a COMMIT whose answer was lost: is every stored offset this run's final one?"""
        if not self.kafka_offsets:
            return False
        try:
            owners = run.transact(
                lambda c: db_offsets.read_offset_owners(c, run.tables, self.s.group_id, self.s.topic),
                "check the offsets",
            )
        except Exception:  # unknown: say it failed; the next run's conditional advance keeps it right
            return False
        return all(owners.get(tp.partition) == (o, self.run_id) for tp, o in self.kafka_offsets.items())

    def end(self, run: Run, exc: BaseException | None) -> None:
        """The run ends without its COMMIT: roll everything back, and make the report say so."""
        if self.committed:
            return
        self.close()
        r = run.report
        r.status = "rolled_back"
        if isinstance(exc, (Interrupted, KeyboardInterrupt)):
            r.stop_reason = "signal"
        r.rolled_back, r.loaded, r.rejected = r.loaded + r.rejected, 0, 0
        r.rejects_by_rule, r.committed_cycles, r.default_partition = {}, 0, 0
        for pr in r.partitions.values():
            pr.end = None  # the stored offsets did not move: the report's lag is read from them
        run.book.expected.clear()
        note = (
            f"the atomic run rolled back its {self.staged_cycles} cycles: nothing of it was kept, "
            "the next run reads the same messages"
        )
        r.error = f"{r.error}; {note}" if r.error else note
        if isinstance(exc, EtlError) and exc.args:  # the CLI's `Error:` line says it too
            exc.args = (f"{exc.args[0]}; {note}", *exc.args[1:])
        log.warning("%s", note)

    def close(self) -> None:
        """Roll back whatever is open (a no-op after the COMMIT)."""
        tx = self.tx
        # Not under the lock: after a second Ctrl-C the load thread may still hold it in a cancelled
        # statement; rolling back from here is what ends that statement.
        if tx is not None and tx.is_active:
            with contextlib.suppress(Exception):
                tx.rollback()
        self._close_connection()

    def _close_connection(self) -> None:
        self.tx = None
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None
