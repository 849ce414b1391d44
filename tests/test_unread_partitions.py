"""A run tells the truth about partitions it did not read: it waits for the partitions a killed member
still holds and loads them; partitions a live member holds are named in its report with their lag."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from tests.exactly_once import Job, assert_exactly_once, kafka_ends, wait_for
from tests.support import cli_env, good_message, produce

# A plain kafka-python consumer in the run's group: it prints its assignment whenever it changes, and
# reads (nothing is committed) until it is killed.
HOLDER = """
import sys
import kafka
from kafka.structs import MemberState

bootstrap, topic, group = sys.argv[1:]
consumer = kafka.KafkaConsumer(
    topic,
    bootstrap_servers=bootstrap,
    group_id=group,
    client_id="holder-test",
    enable_auto_commit=False,
    session_timeout_ms=10000,
    heartbeat_interval_ms=3000,
)
seen, stuck = None, 0
while True:
    consumer.poll(timeout_ms=500)
    now = sorted(tp.partition for tp in consumer.assignment())
    if now != seen:
        print("assigned", now, flush=True)
        seen = now
    # kafka-python 3.0 can leave a join unfinished (see etl.kafka.fast_records.JoinWatch)
    coordinator = consumer._coordinator
    stuck = stuck + 1 if coordinator.state == MemberState.REBALANCING and not coordinator.need_rejoin() else 0
    if stuck > 2:
        coordinator.request_rejoin()
        stuck = 0
"""


class Holder:
    """The plain consumer as a child process."""

    def __init__(self, stack, topic: str, group: str, workdir: Path) -> None:
        self.out = workdir / "holder.out"
        with self.out.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", HOLDER, stack["METRIC_ETL_BOOTSTRAP_SERVERS"], topic, group],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def history(self) -> list[list[int]]:
        """Its assignments, in turn."""
        lines = [x for x in self.out.read_text().splitlines() if x.startswith("assigned ")]
        return [ast.literal_eval(x.removeprefix("assigned ")) for x in lines]

    def assigned(self) -> list[int] | None:
        """Its latest assignment (None before its first)."""
        history = self.history()
        return history[-1] if history else None

    def wait(self, what: str, check) -> None:
        """Wait for ``check()`` on its assignment; on a time-out, say what it printed."""
        try:
            wait_for(what, check, timeout=120)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the holder printed:\n{self.out.read_text()[-3000:]}") from None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def test_partitions_a_killed_member_held_are_waited_for_and_loaded(
    stack, make_topic, pg_schema, admin_engine, tmp_path
) -> None:
    """Right after runs were SIGKILLed their members hold partitions until their sessions expire. A run
    that joined beside such a member read its own partitions, said ok (caught_up) and exited 0 while
    the others' messages waited; now it waits for the group to hand them over, and loads them."""
    topic = make_topic(partitions=2)
    produce(stack, topic, [good_message(i) for i in range(400)], partitions=2)
    env = cli_env(stack, topic, pg_schema)
    holder = Holder(stack, topic, f"g-{topic}", tmp_path)
    try:
        holder.wait("the holder to get both partitions", lambda: holder.assigned() == [0, 1])
        job = Job(env, ["--output", "json"], tmp_path)
        holder.wait("the run to take a partition from the holder", lambda: len(holder.assigned() or []) == 1)
    finally:
        holder.kill()  # no LeaveGroup: the group learns it is gone when its session expires
    assert job.wait(120) == 0, job.stderr
    report = json.loads(job.stdout)
    assert (report["status"], report["read"], report["loaded"]) == ("ok", 400, 400)
    assert {p: (r["assigned"], r["lag"]) for p, r in report["partitions"].items()} == {
        "0": (True, 0),
        "1": (True, 0),
    }
    assert_exactly_once(admin_engine, pg_schema, topic, f"g-{topic}", kafka_ends(stack, topic))


def test_partitions_a_live_member_holds_are_reported_with_their_lag(
    stack, make_topic, pg_schema, admin_engine, tmp_path
) -> None:
    """Scale-out: another live member holds a partition. The run reads its own, exits 0, and its report
    (JSON, text and metrics file) names the partition it did not read, its lag and who held it."""
    topic = make_topic(partitions=2)
    produce(stack, topic, [good_message(i) for i in range(400)], partitions=2)
    env = cli_env(stack, topic, pg_schema)
    metrics = tmp_path / "metrics.prom"
    holder = Holder(stack, topic, f"g-{topic}", tmp_path)
    try:
        holder.wait("the holder to get both partitions", lambda: holder.assigned() == [0, 1])
        job = Job(env, ["--output", "json", "--metrics-file", str(metrics)], tmp_path)
        assert job.wait(120) == 0, job.stderr
        shared = [a for a in holder.history() if len(a) == 1]  # while the run was in the group
    finally:
        holder.kill()
    assert shared
    (unread,) = shared[-1]
    report = json.loads(job.stdout)
    assert (report["status"], report["read"], report["loaded"]) == ("ok", 200, 200)
    other = report["partitions"][str(unread)]
    assert (other["assigned"], other["read"], other["lag"], other["stored"]) == (False, 0, 200, None)
    assert "holder-test" in other["held_by"]
    assert report["partitions"][str(1 - unread)]["lag"] == 0
    assert report["lag"] == 200
    assert any(
        line.startswith("metric_etl_last_run_unread_partitions{") and line.endswith(" 1")
        for line in metrics.read_text().splitlines()
    )
    assert f"partitions [{unread}] were not read by this run" in job.stderr
