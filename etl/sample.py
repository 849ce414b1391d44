"""Realistic sample metrics, some of them corrupted, for trying the job out and for benchmarks."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from etl.config import Settings

SITES = (
    "https://example.com/health",
    "https://shop.example.com/",
    "https://api.example.org/v1/status",
    "http://intranet.example.net/login",
    "https://status.example.io/ping",
    "https://blog.example.com/feed.xml",
)
ERRORS = ("DNS lookup failed", "connection refused", "timed out after 10s", "TLS handshake failed")

# A few kinds of corruption, each rejected for a different reason.
CORRUPT = (
    b'{"url": "https://example.com/health", "status_code": 200, "response_time_ms": 12.5',  # truncated JSON
    b"\xff\xfe not utf-8 at all",  # undecodable bytes
    b'{"url": "ftp://example.com/", "status_code": 200, "response_time_ms": 3.1,'
    b' "checked_at": "2026-11-28T10:00:00Z"}',  # not http(s)
    b'{"url": "https://example.com/health", "status_code": "200", "response_time_ms": -5,'
    b' "checked_at": "2026-11-28T10:00:00"}',  # status as text, negative time, no zone
    b'["https://example.com/health", 200]',  # not an object
    # no url, status out of range
    b'{"status_code": 999, "response_time_ms": 80.0, "checked_at": "2026-11-28T10:00:00Z"}',
)


def messages(
    n: int, *, corrupt_ratio: float = 0.01, seed: int = 7, start: datetime | None = None
) -> Iterator[bytes]:
    """``n`` JSON messages (about 200 bytes each); ``corrupt_ratio`` of them are corrupted."""
    rng = random.Random(seed)
    start = start or datetime.now(UTC) - timedelta(hours=1)
    for i in range(n):
        if rng.random() < corrupt_ratio:
            yield CORRUPT[i % len(CORRUPT)]
            continue
        when = (start + timedelta(milliseconds=i * 37)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        url = SITES[rng.randrange(len(SITES))]
        if rng.random() < 0.03:
            yield (
                f'{{"url": "{url}", "status_code": null, "response_time_ms": null, "regex_pattern": null, '
                f'"regex_matched": null, "checked_at": "{when}", "error": "{ERRORS[i % len(ERRORS)]}"}}'
            ).encode()
            continue
        status = 200 if rng.random() < 0.95 else rng.choice((301, 404, 500, 503))
        matched = "true" if status == 200 else "false"
        yield (
            f'{{"url": "{url}", "status_code": {status}, "response_time_ms": {rng.uniform(5, 900):.1f}, '
            f'"regex_pattern": "ok|healthy", "regex_matched": {matched}, "checked_at": "{when}", '
            f'"error": null}}'
        ).encode()


def produce(settings: Settings, n: int, *, corrupt_ratio: float = 0.01, seed: int = 7) -> int:
    """Write ``n`` sample messages to the settings' topic; returns how many were acknowledged."""
    from kafka import KafkaProducer

    from etl.kafka.client import kafka_client_config

    producer = KafkaProducer(linger_ms=20, batch_size=256 * 1024, acks="all", **kafka_client_config(settings))
    try:
        futures = [
            producer.send(settings.topic, value=value, key=str(i % 64).encode())
            for i, value in enumerate(messages(n, corrupt_ratio=corrupt_ratio, seed=seed))
        ]
        producer.flush(timeout=120)
        return sum(1 for f in futures if f.succeeded())
    finally:
        producer.close()
