"""Log set-up: one line per cycle and one summary line, as text or JSON, secrets scrubbed."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

# Fields a JSON log line may carry beside the standard ones (a stable set, documented in the README).
EXTRA_FIELDS = (
    "event",  # "cycle" or "summary"
    "run_id",
    "cycle",
    "cycles",
    "read",
    "loaded",
    "rejected",
    "duplicates",
    "lost_to_retention",
    "partition",
    "lost",
    "lag",
    "status",
    "stop_reason",
    "duration_s",
    "worker",  # the worker process (--workers), from 1
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in EXTRA_FIELDS:
            if hasattr(record, key):
                data[key] = getattr(record, key)
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


class ScrubSecrets(logging.Filter):
    """Replace any secret value that slipped into a log message by ``***``."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            from etl.config import mask

            record.msg, record.args = mask(record.getMessage(), self.secrets), None
        return True


def configure(
    *, verbose: int = 0, quiet: int = 0, fmt: str = "text", secrets: list[str] | None = None
) -> None:
    """Send logs to stderr at the level -v/-q ask for; the Kafka client stays quiet unless -vv."""
    level = logging.INFO - 10 * verbose + 10 * quiet
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S"))
    handler.addFilter(ScrubSecrets(secrets or []))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(level, logging.DEBUG))
    # The Kafka client logs every refused connection as an error; the job reports what matters itself.
    kafka_logger = logging.getLogger("kafka")
    kafka_logger.setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING if verbose else logging.CRITICAL)
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
