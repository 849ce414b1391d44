"""``metric-etl check``: can a run work with these settings? Broker, topic, group, database, tables,
privileges; each failure says what to fix.

Changes nothing (the run's table set-up is tried in a transaction that is rolled back). Kafka
connection failures are diagnosed (TLS, SASL, wrong port) from what the client logged
(:mod:`etl.kafka.diagnose`), because kafka-python itself only says "Unable to bootstrap".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from etl.db import schema
from etl.db.store import db_error, first_line, make_engine
from etl.errors import EtlError, ExitCode, exit_code_of
from etl.kafka.client import kafka_consumer
from etl.kafka.topics import topic_offsets

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from etl.config import Settings


# What each table needs, and for what (table setting name, or the metrics table's name plus a
# rollup's suffix -> privileges).
RUN_PRIVILEGES = {
    "metrics_table": "SELECT, INSERT",
    "rejects_table": "SELECT, INSERT",
    "offsets_table": "SELECT, INSERT, UPDATE",
    "runs_table": "SELECT, INSERT, UPDATE",
    "metrics_table+_hourly": "SELECT, INSERT, UPDATE",  # the rollups each cycle keeps
    "metrics_table+_daily": "SELECT, INSERT, UPDATE",
    "metrics_table+_latest": "SELECT, INSERT, UPDATE",
}
OPS_PRIVILEGES = {"rejects_table": "UPDATE, DELETE"}  # rejects replay/ignore (UPDATE), purge (DELETE)


def _table_name(settings: Settings, key: str) -> str:
    setting, _, suffix = key.partition("+")
    return f"{getattr(settings, setting)}{suffix}"


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
    return Check(name, "fail", str(exc), exc.hint, config=exit_code_of(exc) == ExitCode.CONFIG)


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
        qualified = f'"{schema_name}"."{_table_name(settings, key)}"'
        lacking = [
            p.strip()
            for p in privileges.split(",")
            if not conn.execute(
                text("SELECT has_table_privilege(:t, :p)"), {"t": qualified, "p": p.strip()}
            ).scalar()
        ]
        if lacking:
            out.append(f"{', '.join(lacking)} on {schema_name}.{_table_name(settings, key)}")
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


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"
