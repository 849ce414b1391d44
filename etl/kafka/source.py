"""Kafka: connect (TLS/SASL), join the group, seek from stored offsets, poll raw messages, commit.

Offsets are never auto-committed. Where each assigned partition starts is decided by the caller
(``start_for``), because the database, not Kafka, is the source of truth; Kafka only receives a
commit after the database has committed, for lag monitoring.

kafka-python 3 calls the rebalance listener on its network thread, so the listener does no I/O:
it pauses newly assigned partitions and remembers them. :meth:`KafkaSource.settle`, called by
the pipeline between cycles on the caller's thread, reads their stored offsets (with the database
retries), seeks and resumes them. A paused partition returns no records, so nothing is read from a
position that was not decided by the database, and a batch never mixes offsets from before and
after a rebalance's seek.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

from etl.contract import RawMessage
from etl.errors import ConfigError, TransientError
from etl.kafka.client import (
    BOOTSTRAP_ATTEMPT_S,
    CLOSE_TIMEOUT_MS,
    COMMIT_TIMEOUT_MS,
    HEARTBEAT_INTERVAL_MS,
    POSITION_TIMEOUT_MS,
    SESSION_TIMEOUT_MS,
    codec_error,
    kafka_client_config,
    kafka_error_text,
)
from etl.normalise import paused_gc

if TYPE_CHECKING:
    from kafka import KafkaConsumer, TopicPartition

    from etl.config import Settings
    from etl.kafka.fast_records import JoinWatch

log = logging.getLogger(__name__)

JOIN_POLL_S = 0.02  # wait_for_group's polls: each returns only at its end, joined or not

# tp -> offset to seek to, or None to let Kafka decide (the group's commit, else auto_offset_reset)
StartFor = Callable[[list["TopicPartition"]], dict["TopicPartition", int | None]]


class KafkaSource:
    """One consumer in the settings' group, subscribed to one topic."""

    def __init__(self, settings: Settings, start_for: StartFor) -> None:
        self.settings = settings
        self._start_for = start_for
        self._consumer: KafkaConsumer | None = None
        self.assignment_changes = 0
        # Assigned but not yet positioned from the database; paused until settle() seeks them.
        self._pending: set[TopicPartition] = set()
        self._lock = threading.Lock()
        self._join: JoinWatch | None = None  # kafka-python 3.0's unfinished joins (open() sets it)
        self._polls_raw = False  # poll() returns RawMessages already (the fast record reader)
        # Offsets committed without waiting (commit(wait=False)) since the last commit that waited:
        # close() commits them again, waiting, so that the run's last offsets reach Kafka.
        self._unconfirmed: dict[TopicPartition, int] = {}

    # -- connecting -------------------------------------------------------------------------------

    def open(self) -> None:
        """Connect (retrying until ``retry_deadline``) and subscribe; partitions arrive on first poll."""
        import kafka

        from etl.kafka.diagnose import connect
        from etl.kafka.fast_records import JoinWatch, install_fast_records

        s = self.settings
        deadline = time.monotonic() + s.retry_deadline

        def make(bootstrap_timeout_ms: int) -> kafka.KafkaConsumer:
            return kafka.KafkaConsumer(
                group_id=s.group_id,
                enable_auto_commit=False,
                auto_offset_reset=s.auto_offset_reset,
                # read_committed: aborted transactions are skipped, and end_offsets() gives
                # the last stable offset, where a run that is caught up stops.
                isolation_level=s.isolation_level,
                max_partition_fetch_bytes=s.max_partition_fetch_bytes,
                fetch_max_bytes=max(52_428_800, s.max_partition_fetch_bytes),
                max_poll_records=s.max_poll_records,
                # A cycle may take a while to load; leave the group only if truly stuck.
                max_poll_interval_ms=max(300_000, int(s.retry_deadline * 1000) * 3),
                session_timeout_ms=SESSION_TIMEOUT_MS,
                allow_auto_create_topics=False,  # a misspelt topic is an error, not a new topic
                heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS,
                bootstrap_timeout_ms=bootstrap_timeout_ms,
                **kafka_client_config(s),
            )

        def retrying(reason: str, delay: float) -> None:
            log.warning("Kafka not reachable yet (%s); retrying in %.1fs", reason, delay)

        # Short attempts, each diagnosed: a refused certificate or password is exit 3 at once (the
        # client's bootstrap wait would hide it), a broker that does not answer is retried.
        try:
            self._consumer = connect(
                s, make, deadline_s=s.retry_deadline, attempt_s=BOOTSTRAP_ATTEMPT_S, retry_log=retrying
            )
        except TransientError as exc:
            raise TransientError(
                f"no Kafka broker reachable at {s.bootstrap_servers} after {s.retry_deadline:g}s: "
                f"{str(exc).removeprefix(exc.stage + ': ')}",
                stage="connect to Kafka",
                hint=exc.hint,
            ) from None

        self._polls_raw = install_fast_records(self._consumer)
        self._join = JoinWatch(self._consumer)
        # Subscribed before the metadata is read: kafka-python joins the group with the partitions its
        # last refresh saw for the subscription, and joins a second time when a later one finds more.
        # Nothing is joined before the first poll, and the consumer never creates the topic.
        self._consumer.subscribe([s.topic], listener=_listener(self))
        partitions = self._topic_partitions(deadline)
        if not partitions:
            self.close()
            raise ConfigError(f"topic {s.topic!r} does not exist on {s.bootstrap_servers}")

    def _topic_partitions(self, deadline: float) -> set[int] | None:
        """The topic's partitions from the cluster's metadata, retried until ``deadline``: the
        client may ask a broker that is down (one of three lost) before it tries one that is up."""
        import kafka.errors as kerr

        delay = 0.5
        while True:
            try:
                self.consumer.topics()  # a refresh of every topic's metadata, the subscription's too
                return self.consumer.partitions_for_topic(self.settings.topic)
            except kerr.KafkaError as exc:
                failure = kafka_error_text(exc)
                if time.monotonic() + delay > deadline:
                    self.close()
                    raise TransientError(
                        f"no metadata for topic {self.settings.topic!r} from Kafka at "
                        f"{self.settings.bootstrap_servers} ({failure})",
                        stage="connect to Kafka",
                        hint="are the brokers up? nothing was read; the next run resumes",
                    ) from None
            log.warning("Kafka metadata not available yet (%s); retrying in %.1fs", failure, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10)

    def close(self) -> None:
        if self._consumer is not None:
            self.flush_commits()
            try:
                # Bounded: a JoinGroup still waiting on the broker would otherwise hold close() for
                # request_timeout_ms; leaving the group is a courtesy, the session expires anyway.
                self._consumer.close(autocommit=False, timeout_ms=CLOSE_TIMEOUT_MS)
            except Exception:  # closing is best effort; the run's outcome is already decided
                log.debug("error closing the consumer", exc_info=True)
            self._consumer = None
            self._join = None

    @property
    def is_open(self) -> bool:
        """Opened and not closed yet."""
        return self._consumer is not None

    @property
    def consumer(self) -> KafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("KafkaSource.open() was not called")
        return self._consumer

    # -- offsets ----------------------------------------------------------------------------------

    def partitions(self) -> list[TopicPartition]:
        from kafka import TopicPartition

        ids = self.consumer.partitions_for_topic(self.settings.topic) or set()
        return [TopicPartition(self.settings.topic, p) for p in sorted(ids)]

    def assigned(self) -> set[TopicPartition]:
        return set(self.consumer.assignment())

    def end_offsets(
        self, tps: Iterable[TopicPartition], timeout_ms: int | None = None
    ) -> dict[TopicPartition, int]:
        return self._call(
            lambda: self.consumer.end_offsets(list(tps), timeout_ms=timeout_ms), "read end offsets"
        )

    def beginning_offsets(self, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        return self._call(lambda: self.consumer.beginning_offsets(list(tps)), "read beginning offsets")

    def offsets_for_time(self, tps: Iterable[TopicPartition], ms: int) -> dict[TopicPartition, int]:
        """First offset at or after ``ms``; the end offset where no message is that new."""
        tps = list(tps)
        found = self._call(
            lambda: self.consumer.offsets_for_times(dict.fromkeys(tps, ms)), "offsets for time"
        )
        ends = self.end_offsets(tps)
        return {tp: (found[tp].offset if found.get(tp) is not None else ends[tp]) for tp in tps}

    def committed(self, tp: TopicPartition) -> int | None:
        return self._call(lambda: self.consumer.committed(tp), "read committed offset")

    def position(self, tp: TopicPartition) -> int:
        def read() -> int:
            offset = self.consumer.position(tp, timeout_ms=POSITION_TIMEOUT_MS)
            if offset is None:
                raise TransientError(f"no position for partition {tp.partition} yet", stage="Kafka")
            return offset

        return self._call(read, "read position")

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.consumer.seek(tp, offset)

    def commit(self, offsets: dict[TopicPartition, int], *, wait: bool = True) -> bool:
        """Commit to Kafka after the database did. Failure is logged, not raised: it is only for lag.

        ``wait=False`` sends the commit and returns at once, so that the run's next load does not wait
        for the broker's answer; a failure is logged when the answer comes, and :meth:`close` commits
        the last of those offsets again, waiting.
        """
        from kafka import OffsetAndMetadata

        if not offsets:
            return True
        metadata = {tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()}
        try:
            if not wait:
                self._unconfirmed.update(offsets)
                self.consumer.commit_async(metadata, callback=_log_commit_failure)
                return True
            # kafka-python retries a commit forever without a timeout: a broker that is away must
            # not hold up a run whose work is already safe in the database.
            self.consumer.commit(metadata, timeout_ms=COMMIT_TIMEOUT_MS)
            for tp, o in offsets.items():
                if self._unconfirmed.get(tp, o) <= o:
                    self._unconfirmed.pop(tp, None)
            return True
        except Exception as exc:  # a rebalance or a broker blip; the database holds the truth
            _log_commit_failure(offsets, exc)
            return False

    def flush_commits(self) -> None:
        """Commit again, waiting, what was committed without waiting to partitions still assigned."""
        if not self._unconfirmed or self._consumer is None:
            return
        try:
            assigned = self.assigned()
        except Exception:  # closing after a failure: nothing more to say to Kafka
            return
        self.commit({tp: o for tp, o in self._unconfirmed.items() if tp in assigned})
        self._unconfirmed.clear()

    def _call(self, fn: Callable[[], Any], what: str) -> Any:
        import kafka.errors as kerr

        try:
            return fn()
        except kerr.KafkaError as exc:
            raise TransientError(f"{what}: {kafka_error_text(exc)}", stage="Kafka") from None

    # -- reading ----------------------------------------------------------------------------------

    def poll(self, max_records: int, timeout_ms: int, caught_up: Callable[[], bool]) -> list[RawMessage]:
        """Up to ``max_records`` raw messages: keeps polling while records keep arriving.

        Returns early when nothing more arrives within ``timeout_ms`` or the run has caught up.
        The cyclic garbage collector is paused meanwhile: each record makes a few container objects
        that all stay alive until the cycle ends, and re-walking them took a third of the poll.
        """
        import kafka.errors as kerr

        out: list[RawMessage] = []
        deadline = time.monotonic() + timeout_ms / 1000
        with paused_gc():
            while len(out) < max_records:
                remaining = int((deadline - time.monotonic()) * 1000)
                if remaining <= 0:
                    break
                try:
                    batch = self.consumer.poll(timeout_ms=remaining, max_records=max_records - len(out))
                except kerr.UnsupportedCodecError as exc:
                    raise codec_error(exc, self.settings.topic) from None
                if not batch:
                    break
                if self._polls_raw:  # a list of RawMessages a partition: no step per message
                    for found in batch.values():
                        out.extend(found)
                else:
                    out.extend(raw_messages(batch))
                if caught_up():
                    break
        return out

    # -- the group ----------------------------------------------------------------------------------

    def joined(self) -> bool:
        """True when this consumer is a stable member of its group (its assignment is final)."""
        from kafka.structs import MemberState

        return self.consumer.group_metadata().state == MemberState.STABLE

    def holders(self) -> dict[int, str]:
        """partition -> the member of the group holding it, as the group coordinator describes the group:
        ``member id (client id at host)``. Partitions nobody holds are missing."""
        from kafka.admin import KafkaAdminClient

        s = self.settings
        admin = KafkaAdminClient(**kafka_client_config(s), request_timeout_ms=5_000)
        try:
            group = admin.describe_groups([s.group_id]).get(s.group_id) or {}
        finally:
            admin.close()
        out: dict[int, str] = {}
        for member in group.get("members") or ():
            assignment = member.get("member_assignment")
            if not isinstance(assignment, dict):  # not a consumer protocol assignment
                continue
            host = str(member.get("client_host") or "?").lstrip("/")
            who = f"{member.get('member_id')} ({member.get('client_id')} at {host})"
            for topic in assignment.get("assigned_partitions") or ():
                if topic.get("topic") == s.topic:
                    out.update(dict.fromkeys(topic.get("partitions") or (), who))
        return out

    def unstick_join(self) -> None:
        """Finish a group join kafka-python 3.0 left unfinished (see
        :class:`~etl.kafka.fast_records.JoinWatch`; nothing under a kafka-python version not checked)."""
        if self._join is not None:
            self._join.check()

    def pending(self) -> bool:
        """True while some assigned partition still waits for :meth:`settle`."""
        with self._lock:
            return bool(self._pending)

    def wait_for_group(self, timeout_s: float) -> bool:
        """Poll until the group join completes (all partitions are paused meanwhile); True if joined.

        Joining waits for every member of the group to rejoin, and for a member that died without
        leaving to time out, so the first poll of a run often returns before the assignment does.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                paused_all = self._pending >= self.assigned()
            if self.joined() and paused_all:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            # Every assigned partition is paused until settle(), so this poll cannot return records.
            wait_ms = int(min(remaining, JOIN_POLL_S) * 1000)
            records = self._call(partial(self.consumer.poll, timeout_ms=wait_ms), "join the group")
            if records:  # pragma: no cover - would mean a partition was fetched before settle()
                raise RuntimeError("records arrived before the partitions were positioned")
            self.unstick_join()

    def settle(self) -> list[TopicPartition]:
        """Position newly assigned partitions at their stored offsets, then resume them.

        Runs on the caller's thread, so the database reads may retry without stalling heartbeats.
        Returns the partitions settled.
        """
        with self._lock:
            todo = sorted(self._pending & self.assigned())
            self._pending &= set(todo)
        if not todo:
            return []
        starts = self._start_for(list(todo))
        done: list[TopicPartition] = []
        with self._lock:
            for tp in todo:
                if tp not in self._pending:  # revoked while the database was read
                    continue
                offset = starts.get(tp)
                try:
                    if offset is not None:
                        self.consumer.seek(tp, offset)
                    self.consumer.resume(tp)
                except (ValueError, KeyError):  # no longer assigned
                    pass
                self._pending.discard(tp)
                done.append(tp)
        log.info(
            "positioned partitions %s at %s",
            [tp.partition for tp in done],
            {tp.partition: starts.get(tp) for tp in done},
        )
        return done

    def on_assigned(self, tps: list[TopicPartition]) -> None:
        """Listener (network thread): no I/O here, only pause and remember."""
        self.assignment_changes += 1
        with self._lock:
            self._pending |= set(tps)
            self.consumer.pause(*tps)
        log.info("assigned partitions %s", sorted(tp.partition for tp in tps))

    def on_revoked(self, tps: list[TopicPartition]) -> None:
        with self._lock:
            self._pending -= set(tps)
        if tps:
            log.info("partitions revoked: %s", sorted(tp.partition for tp in tps))


def _log_commit_failure(offsets: Any, response: Any) -> None:
    """kafka-python's commit callback (and the failure of a commit that waited): a warning on failure."""
    if isinstance(response, Exception):
        log.warning(
            "Kafka offset commit failed (harmless, the database has the offsets): %s",
            kafka_error_text(response, COMMIT_TIMEOUT_MS, "the group coordinator"),
        )


def _listener(source: KafkaSource) -> Any:
    """A rebalance listener that hands newly assigned partitions to :meth:`KafkaSource.settle`."""
    from kafka import ConsumerRebalanceListener

    class Listener(ConsumerRebalanceListener):
        def on_partitions_revoked(self, revoked: Any) -> None:
            source.on_revoked(list(revoked))

        def on_partitions_lost(self, lost: Any) -> None:
            source.on_revoked(list(lost))

        def on_partitions_assigned(self, assigned: Any) -> None:
            if assigned:
                source.on_assigned(list(assigned))

    return Listener()


def raw_messages(batch: dict[Any, list[Any]]) -> Iterator[RawMessage]:
    """kafka-python's ``poll()`` result as RawMessages (raw bytes, no deserialisation).

    A consumer with :func:`~etl.kafka.fast_records.install_fast_records` returns RawMessages already;
    they pass as they are.
    """
    for found in batch.values():
        for r in found:
            if type(r) is RawMessage:
                yield r
            else:
                yield RawMessage(
                    r.topic,
                    r.partition,
                    r.offset,
                    r.timestamp if r.timestamp is not None and r.timestamp >= 0 else None,
                    r.key,
                    r.value,
                    tuple(r.headers) if r.headers else (),
                )
