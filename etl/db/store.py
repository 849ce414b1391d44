"""The database connection: the engine, the one place a driver error becomes the operator's kind of
error (transient, configuration or data), the run's advisory lock, and :func:`database`, the context
manager every operations command opens the database with.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC
from typing import TYPE_CHECKING, Any

from etl.errors import ConfigError, EtlError, LockHeld, TransientError

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

    from etl.config import Settings

log = logging.getLogger(__name__)

# -- engines and errors ---------------------------------------------------------------------------


def make_engine(settings: Settings, *, application_name: str = "metric-etl") -> Engine:
    """An engine for ``db_url`` with the password and TLS settings applied (never in the URL text)."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from etl.config import mask_url

    try:
        url = make_url(settings.db_url)
    except (ArgumentError, ValueError) as exc:  # e.g. a port that is not a number
        raise ConfigError(f"db_url: {mask_url(settings.db_url)} is not a valid URL: {exc}") from None
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg2")
    if settings.db_password:
        url = url.set(password=settings.db_password)
    connect_args: dict[str, Any] = {}
    if url.drivername.startswith("postgresql"):
        connect_args["connect_timeout"] = 10
        connect_args["application_name"] = application_name[:63]
        if settings.db_sslmode:
            connect_args["sslmode"] = settings.db_sslmode
        if settings.db_sslrootcert:
            connect_args["sslrootcert"] = settings.db_sslrootcert
    engine = create_engine(url, connect_args=connect_args, pool_pre_ping=True, pool_size=2, max_overflow=2)
    if url.drivername.startswith("postgresql"):
        _set_lock_timeout(engine, lock_timeout_s(settings))
    return engine


def lock_timeout_s(settings: Settings) -> float:
    """How long a statement waits for another session's lock: ``db_lock_timeout``, and never more than
    ``max_seconds``, so a run's time limit bounds a run blocked by a lock too."""
    if settings.max_seconds is not None:
        return min(settings.db_lock_timeout, settings.max_seconds)
    return settings.db_lock_timeout


def _set_lock_timeout(engine: Engine, seconds: float) -> None:
    """``SET lock_timeout`` on every new connection (a SET, not a startup option: PgBouncer refuses
    unknown startup options), committed so that no rollback takes it back."""
    from sqlalchemy import event

    milliseconds = max(1, int(seconds * 1000))

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, record: Any) -> None:
        with dbapi_connection.cursor() as cursor:
            cursor.execute(f"SET lock_timeout = {milliseconds}")
        dbapi_connection.commit()


def is_lock_timeout(exc: BaseException) -> bool:
    return sqlstate(exc) == "55P03"


class BlockerWatch:
    """While a statement runs, looks once (after ``after_s``) for the sessions blocking it and logs them.

    PostgreSQL's ``pg_blocking_pids`` only answers while the statement waits, so the look happens
    then, from another connection; ``blockers`` keeps what it saw for the error that may follow.
    """

    def __init__(self, engine: Engine, settings: Settings, what: str, after_s: float) -> None:
        self.engine, self.settings, self.what, self.after_s = engine, settings, what, after_s
        self.blockers: str | None = None
        self._timer: Any = None
        self._pid: int | None = None

    def watch(self, conn: Connection) -> None:
        import threading

        try:
            driver: Any = conn.connection.driver_connection
            self._pid = int(driver.get_backend_pid())
        except Exception:  # not psycopg2 (e.g. SQLite): nothing to watch
            return
        self._timer = threading.Timer(self.after_s, self._look)
        self._timer.daemon = True
        self._timer.start()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _look(self) -> None:
        try:
            found = blocking_sessions(self.engine, self._pid or 0)
        except Exception as exc:  # diagnosis only; never in the way of the run
            log.debug("could not look for blocking sessions: %s", exc)
            return
        if found:
            self.blockers = scrub("; ".join(found), self.settings)
            log.warning(
                "%s: waiting %.0fs for a lock held by %s (lock timeout %.0fs)",
                self.what,
                self.after_s,
                self.blockers,
                lock_timeout_s(self.settings),
            )


def blocking_sessions(engine: Engine, pid: int) -> list[str]:
    """The sessions that block backend ``pid`` (``pg_blocking_pids``), one description each.

    State, query start and query text of another role's session need ``pg_read_all_stats`` (or the
    same role); without it PostgreSQL shows them as null, and the description says so.
    """
    from sqlalchemy import text

    sql = text(
        "SELECT a.pid, a.usename, a.application_name, a.state, a.query_start, a.xact_start, "
        "left(regexp_replace(a.query, '\\s+', ' ', 'g'), 120) "
        "FROM pg_stat_activity a WHERE a.pid = ANY(pg_blocking_pids(:pid)) ORDER BY a.pid"
    )
    with engine.connect() as conn:
        rows = conn.execute(sql, {"pid": pid}).all()
    out = []
    for bpid, user, app, state, query_start, xact_start, query in rows:
        if state is None:
            out.append(f"pid {bpid} (user {user}, application {app!r}; its state needs pg_read_all_stats)")
            continue
        started = query_start.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if query_start else "-"
        since = xact_start.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if xact_start else "-"
        out.append(
            f"pid {bpid} (user {user}, application {app!r}, state {state}, transaction since {since}, "
            f"query started {started}: {query})"
        )
    return out


_TRANSIENT_SQLSTATE_CLASSES = ("08", "53", "57", "58", "40")  # connection, resources, shutdown, I/O, rollback
_TRANSIENT_SQLSTATES = ("55P03",)  # lock not available
# Data exceptions, integrity violations and program limits (a JSON value nested or sized past what
# PostgreSQL takes): reproducible with the one row alone, so bisection isolates it.
_DATA_SQLSTATE_CLASSES = ("22", "23", "54")


def dbapi_error(exc: BaseException) -> BaseException:
    """The driver's own exception inside ``exc``: SQLAlchemy keeps it in ``orig``, and pandas wraps
    SQLAlchemy's in its own ``DatabaseError`` (``to_sql`` without COPY), keeping it as the cause."""
    seen: list[BaseException] = []
    while exc not in seen and len(seen) < 8:
        seen.append(exc)
        if getattr(exc, "pgcode", None) is not None or type(exc).__module__.startswith("psycopg2"):
            return exc
        inner = getattr(exc, "orig", None) or exc.__cause__
        if inner is None:
            break
        exc = inner
    return exc


def sqlstate(exc: BaseException) -> str | None:
    return getattr(dbapi_error(exc), "pgcode", None)


def is_data_error(exc: BaseException) -> bool:
    """A value the database refuses: isolate the row, never retry."""
    code = sqlstate(exc)
    return code is not None and code[:2] in _DATA_SQLSTATE_CLASSES


def scrub(text: str, settings: Settings) -> str:
    """``text`` with every secret of the settings, and a password written in ``db_url``, as ``***``."""
    from etl.config import mask, secrets_of

    return mask(text, secrets_of(settings))


def classify(exc: BaseException, what: str, settings: Settings, *, blockers: str | None = None) -> Exception:
    """Turn a database exception into the operator's kind of error, without echoing secrets.

    ``blockers``: the sessions a lock wait was seen blocked by (:class:`BlockerWatch`).
    """
    code = sqlstate(exc)
    orig = dbapi_error(exc)
    message = scrub(first_line(str(orig)), settings)
    where = f"PostgreSQL at {scrub(_host_of(settings.db_url), settings)}"  # a password pasted in the name
    if code == "55P03":
        return TransientError(
            f"{where}: waited {lock_timeout_s(settings):g}s (the lock timeout) for a lock held by "
            f"{blockers or 'another session'}; nothing was written",
            stage=what,
            hint="the offsets did not move and the next run resumes; the session named holds a lock on "
            "the job's tables (a LOCK TABLE, a migration, VACUUM FULL): end it, or raise db_lock_timeout",
        )
    if code in ("28P01", "28000") or "password authentication failed" in message:
        return ConfigError(f"{where}: authentication failed: {message}", hint="check METRIC_ETL_DB_PASSWORD")
    if "no password supplied" in message:  # libpq's own refusal, before any SQLSTATE: no retry helps
        return ConfigError(
            f"{where}: the server asks for a password and none is set ({message})",
            hint="set METRIC_ETL_DB_PASSWORD or METRIC_ETL_DB_PASSWORD_FILE (or db_password_file)",
        )
    if code == "42501":
        return ConfigError(
            f"{where}: permission denied: {message}",
            hint="grant the job's role the privileges listed in the README (Security)",
        )
    if code == "3D000":
        return ConfigError(f"{where}: {message}", hint="create the database or fix db_url")
    if "certificate" in message.lower() or ("SSL" in message and "verify" in message.lower()):
        return ConfigError(f"{where}: TLS: {message}", hint="check db_sslmode and db_sslrootcert")
    if is_transient(exc):
        return TransientError(f"{where}: {message}", stage=what)
    return exc if isinstance(exc, Exception) else RuntimeError(message)


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: the connection, the server's resources or a lock, never the data.

    The COPY fast path talks to psycopg2 directly, so its errors arrive unwrapped by SQLAlchemy: a
    connection lost mid-COPY is a bare ``psycopg2.OperationalError`` without a SQLSTATE.
    """
    import psycopg2
    from sqlalchemy import exc as sa_exc

    code = sqlstate(exc)
    if code is not None:
        return code[:2] in _TRANSIENT_SQLSTATE_CLASSES or code in _TRANSIENT_SQLSTATES
    chain = [exc, dbapi_error(exc), exc.__cause__]
    if any(isinstance(e, sa_exc.DBAPIError) and e.connection_invalidated for e in chain):
        return True
    return any(
        isinstance(
            e,
            (
                sa_exc.OperationalError,
                sa_exc.InterfaceError,
                sa_exc.DisconnectionError,
                psycopg2.OperationalError,
                psycopg2.InterfaceError,
            ),
        )
        for e in chain
    )


def interrupted(exc: BaseException) -> bool:
    """psycopg2 turns a KeyboardInterrupt raised while it reads the COPY data (a second Ctrl-C lands
    there more often than anywhere) into 'COPY from stdin failed': still an interrupt, not a
    database failure to retry."""
    return "error in .read() call: KeyboardInterrupt" in str(dbapi_error(exc))


def first_line(text: str) -> str:
    """The first line of ``text`` (stripped); ``text`` itself when it is blank."""
    return text.strip().splitlines()[0] if text.strip() else text


def _host_of(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        u = make_url(url)
        return f"{u.host or 'localhost'}:{u.port or 5432}/{u.database or ''}"
    except Exception:
        return "<db_url>"


@contextmanager
def advisory_lock(engine: Engine, settings: Settings) -> Iterator[None]:
    """Hold a session advisory lock for the group and topic; raise LockHeld if another run has it."""
    from sqlalchemy import text

    key = f"metric-etl:{settings.group_id}:{settings.topic}"
    with engine.connect() as conn:
        got = conn.execute(text("SELECT pg_try_advisory_lock(hashtext(:k))"), {"k": key}).scalar()
        conn.commit()
        if not got:
            raise LockHeld(
                f"another run holds the lock for group {settings.group_id!r} and topic {settings.topic!r}",
                hint="nothing was done; the other run is still going (see `metric-etl status`)",
            )
        try:
            yield
        finally:
            try:
                conn.execute(text("SELECT pg_advisory_unlock(hashtext(:k))"), {"k": key})
                conn.commit()
            except Exception as exc:  # the connection died (a restart): the lock went with it
                log.warning(
                    "could not release the run lock (it ends with its connection): %s",
                    first_line(str(dbapi_error(exc))),
                )


# -- the load lock: ordinary runs against an atomic run --------------------------------------------
#
# Every run that writes takes the group's and topic's load lock in each cycle's transaction: shared by
# an ordinary run (runs share a group as they always did), exclusive by an atomic run for its whole
# run (etl.run.atomic). So an ordinary run never waits on the offset rows an atomic run holds: it
# finds the lock taken and stops at once. Transaction locks end with their transaction (and with a
# killed run's connection), and they work through PgBouncer's transaction pooling.


def _lock_key(kind: str, settings: Settings) -> str:
    return f"metric-etl-{kind}:{settings.group_id}:{settings.topic}"


def _try_xact_lock(conn: Connection, key: str, *, shared: bool) -> bool:
    from sqlalchemy import text

    if conn.dialect.name != "postgresql":  # one process at a time on SQLite anyway
        return True
    fn = "pg_try_advisory_xact_lock_shared" if shared else "pg_try_advisory_xact_lock"
    return bool(conn.execute(text(f"SELECT {fn}(hashtext(:k))"), {"k": key}).scalar())


def atomic_run_lock_held(what: str, settings: Settings) -> LockHeld:
    """The error of a run that finds an atomic run loading its group and topic."""
    return LockHeld(
        f"an atomic run (`metric-etl run --atomic`) is loading group {settings.group_id!r} and topic "
        f"{settings.topic!r}; {what}",
        hint="the atomic run loads these messages, or the next run does once it has ended "
        "(see `metric-etl status`)",
    )


def share_load_lock(conn: Connection, settings: Settings, what: str) -> None:
    """An ordinary run's cycle (or its check before it reads): take the load lock shared for the
    transaction; raise LockHeld, without waiting, while an atomic run holds it (or waits for it)."""
    if not _try_xact_lock(conn, _lock_key("load", settings), shared=True):
        raise atomic_run_lock_held(what, settings)


def take_load_lock(conn: Connection, settings: Settings) -> None:
    """An atomic run: the load lock alone, for its transaction. Raises LockHeld at once when another
    atomic run has it; waits (at most the lock timeout) for ordinary runs' cycles in flight, whose
    next cycles then find it taken. The waiting request goes before any new shared one, so a busy
    ordinary run cannot starve it."""
    from sqlalchemy import text

    if conn.dialect.name != "postgresql":
        return
    if not _try_xact_lock(conn, _lock_key("atomic", settings), shared=False):
        raise atomic_run_lock_held("nothing was done", settings)
    try:
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": _lock_key("load", settings)})
    except Exception as exc:
        if not is_lock_timeout(exc):
            raise
        raise LockHeld(
            f"ordinary runs of group {settings.group_id!r} and topic {settings.topic!r} kept loading for "
            f"{lock_timeout_s(settings):g}s (the lock timeout); the atomic run did nothing",
            hint="run it when they have ended, or with --lock in the same schedule",
        ) from None


# -- database access shared by the operations commands --------------------------------------------


@contextmanager
def database(settings: Settings, what: str) -> Iterator[Engine]:
    """An engine for the settings; database errors inside the block become EtlErrors with a fix."""
    engine = make_engine(settings)
    try:
        yield engine
    except EtlError:
        raise
    except Exception as exc:
        raise db_error(exc, what, settings) from None
    finally:
        engine.dispose()


def db_error(exc: BaseException, what: str, settings: Settings) -> BaseException:
    """The operator's version of a database exception (the original one when it is a bug)."""
    code = sqlstate(exc)
    if code in ("42P01", "3F000"):  # undefined table / schema
        return ConfigError(
            f"{what}: the tables are missing in schema {settings.db_schema!r} "
            f"({first_line(str(getattr(exc, 'orig', exc)))})",
            hint="create them with `metric-etl init-db` (or let a first `metric-etl run` do it)",
        )
    if code == "42703":  # undefined column: tables from an older version
        return ConfigError(
            f"{what}: the tables are older than this version ({first_line(str(getattr(exc, 'orig', exc)))})",
            hint="upgrade them with `metric-etl init-db`",
        )
    return classify(exc, what, settings)


def transaction(
    engine: Engine,
    settings: Settings,
    fn: Callable[[Connection], Any],
    what: str,
    *,
    deadline: float,
    stop: threading.Event | None = None,
    passing: tuple[type[BaseException], ...] = (),
) -> Any:
    """Run ``fn(connection)`` in a transaction; retry transient failures until ``deadline``
    (``time.monotonic()``), doubling the wait from 0.5 s to 10 s. A ``stop`` request ends the
    retries (the transaction has rolled back); the exceptions in ``passing`` and the job's own
    errors pass as they are, any other becomes the operator's kind (:func:`classify`)."""
    delay = 0.5
    while True:
        # A statement waiting for another session's lock names who holds it, halfway to the timeout.
        watch = BlockerWatch(engine, settings, what, max(1.0, min(10.0, lock_timeout_s(settings) / 2)))
        try:
            with engine.begin() as conn:
                watch.watch(conn)
                try:
                    return fn(conn)
                finally:
                    watch.stop()
        except EtlError:
            raise
        except Exception as exc:
            if isinstance(exc, passing):
                raise
            if interrupted(exc):
                raise KeyboardInterrupt from None
            error = classify(exc, what, settings, blockers=watch.blockers)
            # A password, a certificate, a privilege: the operator's to fix, no retry helps.
            if isinstance(error, ConfigError) or not is_transient(exc):
                raise error from None
            if time.monotonic() + delay > deadline:
                raise error from None
            log.warning(
                "%s: PostgreSQL error, retrying in %.1fs: %s%s",
                what,
                delay,
                scrub(first_line(str(exc)), settings),
                f" (blocked by {watch.blockers})" if watch.blockers else "",
            )
            if stop is not None and stop.wait(delay):
                raise classify(exc, what, settings) from None
            if stop is None:
                time.sleep(delay)
            delay = min(delay * 2, 10)
