"""Errors grouped by what the operator should do, and the process exit codes.

Every error the library raises on purpose is an :class:`EtlError`; its ``exit_code`` tells the CLI
(and a scheduler) what kind of failure it was. :func:`exit_code_of` is the one place an exception
becomes an exit code (the CLI's error wrapper and the workers' outcomes use it). Bad messages are
never exceptions: they are rows in the rejects table.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Stable process exit codes (documented in the README, tested in tests/test_exit_codes.py)."""

    OK = 0
    UNEXPECTED = 1
    USAGE = 2
    CONFIG = 3
    UNREACHABLE = 4
    REJECT_RATIO = 5
    LOCKED = 75  # EX_TEMPFAIL from sysexits.h: cron wrappers already treat it as "try later"
    INTERRUPTED = 130


class StatusCode(IntEnum):
    """Exit codes of ``metric-etl status`` (documented in its help and the README).

    0, 3 and 4 mean what they mean for ``run``; 6-8 are the monitor's verdicts. When several apply,
    the lowest non-zero code wins (4 before 6 before 7 before 8).
    """

    OK = 0
    CONFIG = ExitCode.CONFIG  # bad settings, topic missing, tables missing
    UNREACHABLE = ExitCode.UNREACHABLE  # Kafka or PostgreSQL not answering
    LAST_RUN_FAILED = 6  # the most recent finished run did not end ok
    STALE = 7  # no run ended ok within --max-age
    LAG = 8  # total lag above --max-lag
    LOST = 9  # messages lost to retention within LOST_WINDOW above --max-lost
    ROLLUPS_DIFFER = 10  # `rollups check`: the rollups differ from the raw checks


class EtlError(Exception):
    """Base class: a failure the operator can act on."""

    exit_code: ExitCode = ExitCode.UNEXPECTED
    hint: str = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class ConfigError(EtlError):
    """The settings are wrong: fix the config, retrying will not help. Carries every problem found."""

    exit_code = ExitCode.CONFIG

    def __init__(self, problems: list[str] | str, *, hint: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            text = f"invalid configuration: {self.problems[0]}"
        else:
            text = f"invalid configuration ({len(self.problems)} problems):\n" + "\n".join(
                f"  - {p}" for p in self.problems
            )
        super().__init__(text, hint=hint)


class TransientError(EtlError):
    """Kafka or PostgreSQL could not be reached (after retries): try again later."""

    exit_code = ExitCode.UNREACHABLE

    def __init__(self, message: str, *, stage: str = "", hint: str | None = None) -> None:
        self.stage = stage
        super().__init__(f"{stage}: {message}" if stage else message, hint=hint)


class RejectRatioExceeded(EtlError):
    """Too large a share of a cycle was rejected: the cycle was rolled back, offsets did not move."""

    exit_code = ExitCode.REJECT_RATIO
    hint = "inspect the messages (run with --dry-run) or raise --max-reject-ratio"


class LockHeld(EtlError):
    """Another run holds the advisory lock (--lock): nothing was done."""

    exit_code = ExitCode.LOCKED


class Interrupted(EtlError):
    """SIGINT/SIGTERM arrived before any cycle committed."""

    exit_code = ExitCode.INTERRUPTED


class TopicChanged(EtlError):
    """A stored offset is beyond its partition's end, or the topic's id changed: the topic was deleted
    and created again, or truncated. Its new messages would be taken for ones already loaded, so the
    run stops until an operator moves the offsets (``metric-etl offsets reset``)."""

    exit_code = ExitCode.CONFIG


# Codes a failed run can end with, most urgent first: when several workers failed, the run ends with
# the first one present.
URGENCY = (
    ExitCode.UNEXPECTED,
    ExitCode.CONFIG,
    ExitCode.UNREACHABLE,
    ExitCode.REJECT_RATIO,
    ExitCode.LOCKED,
    ExitCode.INTERRUPTED,
)


def exit_code_of(exc: BaseException) -> ExitCode:
    """The exit code a process ends with when ``exc`` stops it: an :class:`EtlError`'s own code (what
    the operator should do), 130 for an interrupt (Ctrl-C), 1 for anything else (a bug)."""
    if isinstance(exc, EtlError):
        return ExitCode(exc.exit_code)
    if isinstance(exc, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    return ExitCode.UNEXPECTED


def urgency(code: int) -> int:
    """Rank of an exit code in :data:`URGENCY` (0 the most urgent)."""
    return URGENCY.index(ExitCode(code))
