"""The skip of the offset book (``OffsetBook.split_duplicates``), a pure function of a batch and the
offsets the book expects: what a rewind or a re-fetch gives again is counted once, as a duplicate,
and each partition is judged by its own offset. tests/test_rewind.py shows the same through real runs."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pandas as pd
from hypothesis import given
from hypothesis import strategies as st

from etl.contract import RawMessage
from etl.report import RunReport
from etl.run.book import OffsetBook, distinct, positions


def _batch(*keys: tuple[int, int]) -> list[RawMessage]:
    return [RawMessage("t", p, o, None, None, b"{}") for p, o in keys]


def _split(book: OffsetBook, messages: list[RawMessage]) -> tuple[list[tuple[int, int]], int, RunReport]:
    report = RunReport("r", "t", "g", datetime.now(UTC))
    fresh, duplicates = book.split_duplicates(messages, positions(messages), report)
    return [(m.partition, m.offset) for m in fresh], duplicates, report


def test_a_message_twice_in_one_batch_is_kept_once() -> None:
    """A re-fetch after a seek can hand back what the batch already holds; the same offset on two
    partitions is two messages."""
    fresh, duplicates, report = _split(OffsetBook(), _batch((0, 5), (1, 5), (0, 6), (0, 5), (1, 5)))
    assert (fresh, duplicates) == ([(0, 5), (1, 5), (0, 6)], 2)
    assert {p: (r.partition, r.start, r.read) for p, r in report.partitions.items()} == {
        0: (0, 5, 3),
        1: (1, 5, 2),
    }


def test_each_partition_skips_only_what_is_below_its_own_expected_offset() -> None:
    book = OffsetBook()
    book.expected = {0: 40, 1: 10, 2: None}  # partition 2: nothing stored yet
    batch = _batch((0, 9), (0, 39), (0, 40), (1, 9), (1, 10), (1, 39), (2, 0))
    fresh, duplicates, _ = _split(book, batch)
    assert (fresh, duplicates) == ([(0, 40), (1, 10), (1, 39), (2, 0)], 3)


def test_a_batch_with_nothing_old_or_twice_is_all_fresh() -> None:
    book = OffsetBook()
    book.expected = {0: 3}
    fresh, duplicates, _ = _split(book, _batch((0, 3), (0, 4), (1, 0)))
    assert (fresh, duplicates) == ([(0, 3), (0, 4), (1, 0)], 0)


def test_partitions_that_come_back_later_in_a_batch_advance_and_take_their_incarnation() -> None:
    """A batch is usually partition by partition, but a partition can come back after another one:
    each partition's advance goes past its highest offset, and its rows take its own incarnation."""
    book = OffsetBook()
    book.expected = {0: 5, 1: None}
    book.incarnation = {0: 2, 1: 3}
    batch = _batch((0, 5), (1, 0), (1, 1), (0, 6), (0, 7), (1, 2))
    _, _, report = _split(book, batch)
    advances = book.advances(positions(batch), report)
    assert [(a.partition, a.expected, a.new, a.incarnation) for a in advances] == [
        (0, 5, 8, 2),
        (1, None, 3, 3),
    ]
    frame = pd.DataFrame({"partition": [m.partition for m in batch]})
    assert book.with_incarnation(frame, frame.iloc[:0])[0]["incarnation"].tolist() == [2, 3, 3, 2, 2, 3]


@given(st.lists(st.integers(0, 7), max_size=60))
def test_distinct_partitions_are_the_sorted_set_in_any_order(parts: list[int]) -> None:
    assert distinct(np.array(parts, dtype=np.int64)) == sorted(set(parts))
