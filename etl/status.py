"""Operating the job: ``status`` (offsets, lag, last runs) and ``check`` (can it run?).

Read-only (``init-db`` is :func:`etl.db.schema.init_db`). Every database problem comes out as an
:class:`~etl.errors.EtlError` that says what to fix; Kafka connection failures are diagnosed (TLS, SASL,
wrong port) from what the client logged (:mod:`etl.kafka.diagnose`), because kafka-python itself only
says "Unable to bootstrap".
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from etl.db import schema
from etl.db.store import database, db_error, first_line, make_engine
from etl.errors import EtlError, ExitCode
from etl.kafka.client import kafka_consumer
from etl.kafka.topics import topic_offsets
from etl.lag import PartitionLag

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from etl.config import Settings

log = logging.getLogger(__name__)

FAILED_STATUSES = ("failed", "reject_ratio", "interrupted", "abandoned")


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


LOST_WINDOW = timedelta(hours=24)  # how far back --max-lost adds up lost_to_retention


# -- status ---------------------------------------------------------------------------------------


@dataclass
class RunSummary:
    run_id: str
    status: str
    stop_reason: str | None
    started_at: datetime
    finished_at: datetime | None
    cycles: int
    read: int
    loaded: int
    rejected: int
    duplicates: int
    host: str
    error: str | None
    lost_to_retention: int = 0

    @property
    def duration_s(self) -> float | None:
        return (self.finished_at - self.started_at).total_seconds() if self.finished_at else None


@dataclass
class StatusReport:
    """Where the job stands; ``exit_code`` is the monitor's verdict (see :class:`StatusCode`)."""

    topic: str
    group_id: str
    checked_at: datetime
    partitions: list[PartitionLag] = field(default_factory=list)
    runs: list[RunSummary] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    exit_code: int = StatusCode.OK
    max_lag: int | None = None
    max_age_s: float | None = None
    max_lost: int | None = None
    lost_recently: int = 0  # lost_to_retention of the runs started within LOST_WINDOW

    @property
    def lag(self) -> int | None:
        if not self.partitions or any(p.lag is None for p in self.partitions):
            return None
        return sum(p.lag or 0 for p in self.partitions)

    @property
    def last_finished(self) -> RunSummary | None:
        return next((r for r in self.runs if r.finished_at is not None), None)

    @property
    def last_success_at(self) -> datetime | None:
        return next((r.finished_at for r in self.runs if r.status == "ok" and r.finished_at), None)

    def as_dict(self) -> dict[str, Any]:
        def run(r: RunSummary) -> dict[str, Any]:
            d = asdict(r)
            d["started_at"] = _iso(r.started_at)
            d["finished_at"] = _iso(r.finished_at)
            d["duration_s"] = None if r.duration_s is None else round(r.duration_s, 3)
            return d

        return {
            "topic": self.topic,
            "group_id": self.group_id,
            "checked_at": _iso(self.checked_at),
            "exit_code": int(self.exit_code),
            "ok": self.exit_code == StatusCode.OK,
            "problems": self.problems,
            "lag": self.lag,
            "max_lag": self.max_lag,
            "max_age_s": self.max_age_s,
            "max_lost": self.max_lost,
            "lost_to_retention_24h": self.lost_recently,
            "last_success_at": _iso(self.last_success_at),
            "partitions": [asdict(p) for p in self.partitions],
            "runs": [run(r) for r in self.runs],
        }

    def to_text(self) -> str:
        verdict = "OK" if self.exit_code == StatusCode.OK else f"PROBLEM (exit {int(self.exit_code)})"
        lines = [f"metric-etl status: {verdict}", f"  topic {self.topic}, group {self.group_id}"]
        lines += [f"  ! {p}" for p in self.problems]
        lines.append("")
        lines.append(f"  {'partition':>9}  {'stored':>12}  {'end':>12}  {'lag':>10}")
        for p in self.partitions:
            lines.append(f"  {p.partition:>9}  {_n(p.stored):>12}  {_n(p.end):>12}  {_n(p.lag):>10}")
        if not self.partitions:
            lines.append("  (no partitions known)")
        lines.append(f"  {'total':>9}  {'':>12}  {'':>12}  {_n(self.lag):>10}")
        if self.lost_recently:
            lines.append(
                f"  lost to retention in the last 24h: {self.lost_recently:,} messages deleted upstream "
                "before the group read them"
            )
        lines.append("")
        if not self.runs:
            lines.append("  no runs recorded yet")
        else:
            lines.append(
                f"  {'started (UTC)':<20} {'status':<12} {'why it stopped':<14} {'secs':>7} "
                f"{'read':>9} {'loaded':>9} {'rejected':>9} {'dups':>6}"
            )
            for r in self.runs:
                secs = "-" if r.duration_s is None else f"{r.duration_s:.1f}"
                lines.append(
                    f"  {r.started_at.astimezone(UTC):%Y-%m-%d %H:%M:%S}  {r.status:<12} "
                    f"{r.stop_reason or '-':<14} {secs:>7} {r.read:>9,} {r.loaded:>9,} {r.rejected:>9,} "
                    f"{r.duplicates:>6,}"
                )
                if r.error and r.status in FAILED_STATUSES:
                    lines.append(f"    error: {first_line(r.error)[:200]}")
                if r.lost_to_retention:
                    lines.append(f"    lost to retention: {r.lost_to_retention:,}")
        return "\n".join(lines)


def status(
    settings: Settings,
    *,
    runs: int = 5,
    max_lag: int | None = None,
    max_age: timedelta | None = None,
    max_lost: int | None = None,
    now: datetime | None = None,
) -> StatusReport:
    """Stored offsets, end offsets and lag per partition, and the last ``runs`` runs, with a verdict.

    The database must answer (else TransientError / ConfigError is raised). Kafka may not: then the
    report has no end offsets, and its exit code is 4.
    """
    from sqlalchemy import func, select

    from etl.db.offsets import read_offsets

    now = now or datetime.now(UTC)
    report = StatusReport(
        settings.topic,
        settings.group_id,
        now,
        max_lag=max_lag,
        max_age_s=max_age.total_seconds() if max_age is not None else None,
        max_lost=max_lost,
    )
    tables = schema.tables_for(settings)
    u = tables.runs
    with database(settings, "status") as engine, engine.connect() as conn:
        _close_abandoned(conn, tables, settings)
        stored = read_offsets(conn, tables, settings.group_id, settings.topic)
        shown = [c for c in u.columns if c.name != "heartbeat_at"]  # a table not upgraded yet lacks it
        rows = conn.execute(
            select(*shown)
            .where(u.c.group_id == settings.group_id, u.c.topic == settings.topic)
            .order_by(u.c.started_at.desc())
            .limit(runs)
        ).mappings()
        report.runs = [
            RunSummary(
                run_id=r["run_id"],
                status=r["status"],
                stop_reason=r["stop_reason"],
                started_at=r["started_at"],
                finished_at=r["finished_at"],
                cycles=int(r["cycles"]),
                read=int(r["read"]),
                loaded=int(r["loaded"]),
                rejected=int(r["rejected"]),
                duplicates=int(r["duplicates"]),
                host=r["host"],
                error=r["error"],
                lost_to_retention=int(r["lost_to_retention"]),
            )
            for r in rows
        ]
        mine = (u.c.group_id == settings.group_id, u.c.topic == settings.topic)
        report.lost_recently = int(
            conn.execute(
                select(func.coalesce(func.sum(u.c.lost_to_retention), 0)).where(
                    *mine, u.c.started_at >= now - LOST_WINDOW
                )
            ).scalar_one()
        )
        if max_age is not None:
            # The last success may be older than the runs shown: ask for it directly.
            last_ok = conn.execute(
                select(u.c.finished_at)
                .where(u.c.group_id == settings.group_id, u.c.topic == settings.topic, u.c.status == "ok")
                .order_by(u.c.finished_at.desc())
                .limit(1)
            ).scalar()
        else:
            last_ok = None

    codes: list[StatusCode] = []
    try:
        with kafka_consumer(settings) as consumer:
            begins, ends = topic_offsets(consumer, settings.topic)
    except EtlError as exc:
        report.problems.append(str(exc) + (f" ({exc.hint})" if exc.hint else ""))
        codes.append(StatusCode.CONFIG if exc.exit_code == ExitCode.CONFIG else StatusCode.UNREACHABLE)
        report.partitions = [PartitionLag(p, o, None, None) for p, o in sorted(stored.items())]
    else:
        report.partitions = [PartitionLag.of(p, stored.get(p), begins.get(p), ends[p]) for p in sorted(ends)]

    last = report.last_finished
    if last is not None and last.status in FAILED_STATUSES:
        report.problems.append(
            f"the last run ({last.run_id}, finished {_iso(last.finished_at)}) ended {last.status}"
            + (f": {first_line(last.error)[:200]}" if last.error else "")
        )
        codes.append(StatusCode.LAST_RUN_FAILED)
    if max_age is not None and (last_ok is None or now - last_ok > max_age):
        when = f"the last one finished {_iso(last_ok)}" if last_ok else "there is none"
        report.problems.append(f"no run ended ok within the last {_age(max_age)} ({when})")
        codes.append(StatusCode.STALE)
    if max_lag is not None and report.lag is not None and report.lag > max_lag:
        report.problems.append(f"lag {report.lag:,} is above --max-lag {max_lag:,}")
        codes.append(StatusCode.LAG)
    if max_lost is not None and report.lost_recently > max_lost:
        report.problems.append(
            f"{report.lost_recently:,} messages were deleted upstream (retention) before the group read "
            f"them in the last 24h, above --max-lost {max_lost:,}"
        )
        codes.append(StatusCode.LOST)
    report.exit_code = min(codes) if codes else StatusCode.OK
    return report


def _close_abandoned(conn: Connection, tables: schema.Tables, settings: Settings) -> None:
    """Runs that were killed are shown as ``abandoned``, not ``running`` (see etl.db.runs.close_abandoned).

    Best effort: a role that may not update the runs table, or a table a run has not upgraded
    yet, shows the rows as they are.
    """
    from etl.db.runs import close_abandoned

    try:
        with conn.begin():
            close_abandoned(conn, tables, settings, by="metric-etl status")
    except Exception as exc:
        log.info("could not close abandoned runs: %s", first_line(str(exc)))
        conn.rollback()


# -- check ----------------------------------------------------------------------------------------

# What each table needs, and for what (table setting name -> [(privileges, needed by)]).
RUN_PRIVILEGES = {
    "metrics_table": "SELECT, INSERT",
    "rejects_table": "SELECT, INSERT",
    "offsets_table": "SELECT, INSERT, UPDATE",
    "runs_table": "SELECT, INSERT, UPDATE",
}
OPS_PRIVILEGES = {"rejects_table": "UPDATE, DELETE"}  # rejects replay/ignore (UPDATE), purge (DELETE)


@dataclass
class Check:
    """One check: ``state`` is ok, fail, warn (does not fail the command) or skip."""

    name: str
    state: str
    detail: str
    hint: str = ""
    config: bool = False  # a failure retrying will not fix (exit 3, else 4)


@dataclass
class CheckReport:
    checks: list[Check] = field(default_factory=list)
    settings_from: str = ""  # which config file the settings came from (config.config_source)
    config_file: str | None = None

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.state == "fail"]

    @property
    def exit_code(self) -> int:
        """0 all passed; 3 a setting or grant must change; 4 only unreachable services."""
        if not self.failed:
            return ExitCode.OK
        return ExitCode.CONFIG if any(c.config for c in self.failed) else ExitCode.UNREACHABLE

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": not self.failed,
            "exit_code": int(self.exit_code),
            "config_file": str(Path(self.config_file).resolve()) if self.config_file else None,
            "settings_from": self.settings_from,
            "checks": [asdict(c) for c in self.checks],
        }

    def to_text(self) -> str:
        width = max((len(c.name) for c in self.checks), default=10)
        lines = [f"settings: {self.settings_from}"] if self.settings_from else []
        for c in self.checks:
            lines.append(f"{c.state.upper():<5} {c.name:<{width}}  {c.detail}")
            if c.hint and c.state in ("fail", "warn"):
                for i, hint_line in enumerate(c.hint.splitlines()):
                    lines.append(f"{'':<5} {'':<{width}}  {'fix: ' if i == 0 else '     '}{hint_line}")
        failed = len(self.failed)
        lines.append("all checks passed" if not failed else f"{failed} of {len(self.checks)} checks failed")
        return "\n".join(lines)


def check(settings: Settings) -> CheckReport:
    """Can ``metric-etl run`` work with these settings? Each check says what to fix."""
    from etl.config import config_source

    report = CheckReport(settings_from=config_source(settings), config_file=settings.config_file)
    _check_kafka(settings, report)
    try:
        _check_database(settings, report)
    except Exception as exc:  # the connection broke half-way: report it like the others
        err = db_error(exc, "check", settings)
        if not isinstance(err, EtlError):
            raise
        report.checks.append(_failed("database", err))
    return report


def _failed(name: str, exc: EtlError) -> Check:
    return Check(name, "fail", str(exc), exc.hint, config=exc.exit_code == ExitCode.CONFIG)


def _check_kafka(settings: Settings, report: CheckReport) -> None:
    from kafka import TopicPartition
    from kafka.errors import KafkaError

    names = ("kafka: connect", "kafka: topic", "kafka: consumer group")
    tls = "with TLS" if "SSL" in settings.security_protocol else "without TLS"
    sasl = f", SASL {settings.sasl_mechanism} as {settings.sasl_username}" if settings.sasl_mechanism else ""
    try:
        with kafka_consumer(settings, group=True) as consumer:
            report.checks.append(
                Check(
                    names[0],
                    "ok",
                    f"{settings.bootstrap_servers} over {settings.security_protocol} ({tls}{sasl})",
                )
            )
            try:
                begins, ends = topic_offsets(consumer, settings.topic)
            except EtlError as exc:
                report.checks.append(_failed(names[1], exc))
                report.checks.append(Check(names[2], "skip", "needs the topic"))
                return
            except KafkaError as exc:
                report.checks.append(_kafka_access(names[1], exc, f"describe topic {settings.topic!r}"))
                report.checks.append(Check(names[2], "skip", "needs the topic"))
                return
            held = sum(ends[p] - begins[p] for p in ends)
            report.checks.append(
                Check(
                    names[1],
                    "ok",
                    f"{settings.topic!r}: {_plural(len(ends), 'partition')}, {held:,} messages held",
                )
            )
            try:
                first = TopicPartition(settings.topic, min(ends))
                consumer.committed(first)  # needs READ/DESCRIBE on the group
            except KafkaError as exc:
                report.checks.append(_kafka_access(names[2], exc, f"read group {settings.group_id!r}"))
            else:
                report.checks.append(Check(names[2], "ok", f"{settings.group_id!r} can be read"))
    except EtlError as exc:
        report.checks.append(_failed(names[0], exc))
        report.checks.extend(Check(n, "skip", "needs a connection to Kafka") for n in names[1:])


def _kafka_access(name: str, exc: BaseException, what: str) -> Check:
    text = f"{type(exc).__name__}: {exc}"
    if "Authorization" in type(exc).__name__:
        return Check(
            name,
            "fail",
            f"not allowed to {what}: {text}",
            "grant the SASL user the Kafka ACLs: READ and DESCRIBE on the topic, READ on the group",
            config=True,
        )
    return Check(name, "fail", f"could not {what}: {text}", "retry; is the broker healthy?")


def _check_database(settings: Settings, report: CheckReport) -> None:
    from sqlalchemy import inspect, text

    from etl.config import mask_url

    names = (
        "database: connect",
        "database: tables",
        "database: privileges",
        "database: run set-up",
        "database: rejects commands",
    )
    tables = schema.tables_for(settings)
    engine = make_engine(settings)
    try:
        try:
            conn = engine.connect()
        except Exception as exc:
            err = db_error(exc, "connect", settings)
            if not isinstance(err, EtlError):
                raise
            report.checks.append(_failed(names[0], err))
            report.checks.extend(Check(n, "skip", "needs a connection to PostgreSQL") for n in names[1:])
            return
        with conn:
            info = conn.execute(
                text(
                    "SELECT current_user, current_database(), current_setting('server_version'), "
                    "coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)"
                )
            ).one()
            user, dbname, version, ssl = info
            report.checks.append(
                Check(
                    names[0],
                    "ok",
                    f"{mask_url(settings.db_url)} as {user}, PostgreSQL {version}, "
                    f"{'TLS' if ssl else 'no TLS'}",
                )
            )
            conn.commit()
            missing = _missing_columns(inspect(conn), tables)
            run_missing = [] if missing else _missing_privileges(conn, settings, RUN_PRIVILEGES)
            ops_missing = [] if missing else _missing_privileges(conn, settings, OPS_PRIVILEGES)
            conn.commit()  # the set-up check needs a transaction of its own
            setup = _check_setup(conn, tables, settings, dbname, user, names[3])
        if missing:
            report.checks.append(
                Check(
                    names[1],
                    "fail",
                    "; ".join(missing),
                    "run `metric-etl init-db` (creates or upgrades them; a first run creates them too)",
                    config=True,
                )
            )
            report.checks.append(Check(names[2], "skip", "needs the tables"))
        else:
            listed = ", ".join(t.name for t in tables.metadata.sorted_tables)
            report.checks.append(Check(names[1], "ok", f"schema {settings.db_schema}: {listed}"))
            if run_missing:
                report.checks.append(
                    Check(
                        names[2],
                        "fail",
                        f"{user} lacks " + "; ".join(run_missing),
                        _grants(run_missing, user),
                        config=True,
                    )
                )
            else:
                report.checks.append(Check(names[2], "ok", f"{user} may read and write what a run writes"))
        report.checks.append(setup)
        if missing:
            report.checks.append(Check(names[4], "skip", "needs the tables"))
        elif ops_missing:
            report.checks.append(
                Check(
                    names[4],
                    "warn",
                    f"{user} lacks " + "; ".join(ops_missing) + " (only `rejects replay/ignore/purge` "
                    "need them; a least-privilege run role may go without)",
                    _grants(ops_missing, user),
                )
            )
        else:
            report.checks.append(Check(names[4], "ok", f"{user} may replay, ignore and purge rejects"))
    finally:
        engine.dispose()


def _missing_columns(inspector: Any, tables: schema.Tables) -> list[str]:
    present = set(inspector.get_table_names(schema=tables.schema))
    out = []
    for table in tables.metadata.sorted_tables:
        if table.name not in present:
            out.append(f"table {tables.schema}.{table.name} is missing")
            continue
        have = {c["name"] for c in inspector.get_columns(table.name, schema=tables.schema)}
        lacking = [c.name for c in table.columns if c.name not in have]
        if lacking:
            out.append(f"table {tables.schema}.{table.name} lacks columns {', '.join(lacking)}")
    return out


def _missing_privileges(conn: Connection, settings: Settings, wanted: dict[str, str]) -> list[str]:
    """Privileges the current user lacks, as ``PRIV on schema.table`` texts."""
    from sqlalchemy import text

    out = []
    schema_name = settings.db_schema
    if not conn.execute(text("SELECT has_schema_privilege(:s, 'USAGE')"), {"s": schema_name}).scalar():
        out.append(f"USAGE on schema {schema_name}")
    for key, privileges in wanted.items():
        qualified = f'"{schema_name}"."{getattr(settings, key)}"'
        lacking = [
            p.strip()
            for p in privileges.split(",")
            if not conn.execute(
                text("SELECT has_table_privilege(:t, :p)"), {"t": qualified, "p": p.strip()}
            ).scalar()
        ]
        if lacking:
            out.append(f"{', '.join(lacking)} on {schema_name}.{getattr(settings, key)}")
        # Checked whether or not INSERT itself is lacking, so that one `check` prints every GRANT the
        # README lists (the rejects sequence too), not one more after each fix.
        if "INSERT" not in privileges or key not in ("metrics_table", "rejects_table"):
            continue
        # An INSERT draws from the sequence of each serial column: the rejects table's id, and the
        # metrics table's id on a table created before the message became its key. Asked column by
        # column: pg_get_serial_sequence raises for a column the table lacks.
        sequences = conn.execute(
            text(
                "SELECT pg_get_serial_sequence(:t, attname) FROM pg_attribute "
                "WHERE attrelid = CAST(:t AS regclass) AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
            ),
            {"t": qualified},
        ).scalars()
        for seq in [s for s in sequences if s]:
            if not conn.execute(text("SELECT has_sequence_privilege(:s, 'USAGE')"), {"s": seq}).scalar():
                out.append(f"USAGE on sequence {seq}")
    return out


def _grants(missing: list[str], user: str) -> str:
    """GRANT statements for ``missing`` (as an admin would run them)."""
    lines = []
    for item in missing:
        privileges, _, target = item.partition(" on ")
        if target.startswith("schema "):
            lines.append(f"GRANT {privileges} ON SCHEMA {target.removeprefix('schema ')} TO {user};")
        elif target.startswith("sequence "):
            lines.append(f"GRANT {privileges} ON SEQUENCE {target.removeprefix('sequence ')} TO {user};")
        else:
            lines.append(f"GRANT {privileges} ON {target} TO {user};")
    return "as an admin:\n" + "\n".join(lines)


def _check_setup(
    conn: Connection, tables: schema.Tables, settings: Settings, dbname: str, user: str, name: str
) -> Check:
    """Every run starts with schema.create_all; try it in a transaction that is rolled back."""
    from sqlalchemy import text

    trans = conn.begin()
    try:
        conn.execute(text("SET LOCAL lock_timeout = '5s'"))
        schema.create_all(conn, tables)
    except Exception as exc:
        err = db_error(exc, "create tables", settings)
        if "permission denied for database" in str(err):
            return Check(
                name,
                "fail",
                f"a run starts with CREATE SCHEMA IF NOT EXISTS {settings.db_schema}, which PostgreSQL "
                f"refuses without CREATE on database {dbname}, even when the schema exists",
                f"as an admin: GRANT CREATE ON DATABASE {dbname} TO {user};",
                config=True,
            )
        if isinstance(err, EtlError):
            return _failed(name, err)
        return Check(name, "fail", f"{type(exc).__name__}: {first_line(str(exc))}", config=True)
    finally:
        trans.rollback()
    return Check(name, "ok", "a run can create or confirm its schema and tables")


# -- formatting -----------------------------------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _n(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _age(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
