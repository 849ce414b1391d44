"""The message contract: what a message is, which fields it carries, and the columns it becomes.

The one place these lists live. Adding a field to the contract starts here (:data:`FIELDS`), then the
table (:mod:`etl.db.schema`'s columns) and the rule that checks it (:mod:`etl.validate`).
"""

from __future__ import annotations

from typing import Any, Final, NamedTuple


class RawMessage(NamedTuple):
    """One Kafka record as read from the broker.

    A named tuple, not a frozen dataclass: the source makes one per record, and
    :mod:`etl.kafka.fast_records` builds it with ``tuple.__new__`` (0.16 us on these machines; the named
    tuple's own constructor takes 0.7 us, a frozen dataclass about twice that), a small part of the
    ~4 us a record takes.
    """

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None  # Kafka record timestamp
    key: bytes | None
    value: bytes | None  # None = tombstone
    headers: tuple[tuple[str, bytes | None], ...] = ()


# The fields of the JSON object a producer sends (see the README's message contract).
FIELDS: Final = (
    "url",
    "status_code",
    "response_time_ms",
    "regex_pattern",
    "regex_matched",
    "checked_at",
    "error",
)

# The normalised frame (etl.normalise): one row per message, before validation.
COLUMNS: Final = (
    "topic",
    "partition",
    "offset",
    "kafka_timestamp",
    "key",
    "headers",
    "payload",
    "payload_text",
    *FIELDS,
    "extra",
    "errors",
    "stage",
    "parsed",
)

# Validation's two frames: the rows to load, and the rejects with their raw bytes and reasons.
GOOD_COLUMNS: Final = (
    "topic",
    "partition",
    "offset",
    "kafka_timestamp",
    *FIELDS,
    "extra",
)
REJECT_COLUMNS: Final = (
    "topic",
    "partition",
    "offset",
    "key",
    "headers",
    "kafka_timestamp",
    "payload",
    "payload_text",
    "stage",
    "errors",
)

# Where a message can be rejected: the validation stages, then the database refusing a row.
STAGES: Final = ("decode", "json", "schema", "database")
VALIDATION_STAGES: Final = STAGES[:3]

# The metrics table's columns, in table order.
METRIC_COLUMNS: Final = (
    *FIELDS,
    "extra",
    "topic",
    "partition",
    "incarnation",
    "offset",
    "kafka_timestamp",
    "run_id",
)

# What tells one Kafka message from another: the metrics table's primary key and the rejects table's
# unique key. The load finds messages already stored (another group's, a rewind's, a replay's) by
# these columns, so a change of the key is made here, once. A topic deleted and created again, or a
# partition truncated, numbers its messages from the start again: ``incarnation`` (0 until
# `metric-etl offsets reset` gives a partition a new one) tells them apart. Between partition and
# offset it fills the alignment padding before the bigint in the index.
MESSAGE_KEY: Final = ("topic", "partition", "incarnation", "offset")
# The metrics table's primary key: the message key and its check's time, which the table is
# partitioned on (a key of a partitioned table must hold the partition column). A message always
# carries the same checked_at, so this key still holds one row per message.
METRICS_KEY: Final = (*MESSAGE_KEY, "checked_at")
# The key before incarnations (tables made up to 5cc9f5c); `init-db` replaces it (upgrade_keys).
OLD_MESSAGE_KEY: Final = ("topic", "partition", "offset")

# A reject's review status (`metric-etl rejects replay|ignore`).
REJECT_STATUSES: Final = ("new", "replayed", "ignored")

# The fields of `metric-etl rejects export` (JSON lines and CSV), in order.
EXPORT_FIELDS: Final = (
    "id",
    "topic",
    "partition",
    "offset",
    "kafka_timestamp",
    "key_base64",
    "headers",
    "payload_base64",
    "payload_text",
    "stage",
    "errors",
    "run_id",
    "rejected_at",
    "status",
    "status_note",
    "status_changed_at",
)

# When a check counts as "up": a status from 200 to 399, no error, and the regex not failed. The
# one definition, in the two forms it is used in: on the good frame's columns (the rollups a cycle
# writes, :func:`up_mask`) and in SQL over the metrics table (a rebuild, the views). A test holds
# the two to the same answer.
UP_STATUS_MIN: Final = 200
UP_STATUS_MAX: Final = 399
UP_SQL: Final = (
    f"(COALESCE(status_code BETWEEN {UP_STATUS_MIN} AND {UP_STATUS_MAX}, false) AND error IS NULL "
    "AND regex_matched IS DISTINCT FROM false)"
)


def up_mask(status_code: Any, error: Any, regex_matched: Any) -> Any:
    """Which checks are up (see :data:`UP_SQL`), from the good frame's columns (pandas Series)."""
    import numpy as np

    status = status_code.to_numpy(dtype="float64", na_value=np.nan)
    with np.errstate(invalid="ignore"):
        in_range = (status >= UP_STATUS_MIN) & (status <= UP_STATUS_MAX)
    failed = regex_matched.eq(False).fillna(False).to_numpy(dtype=bool)
    return in_range & error.isna().to_numpy() & ~failed
