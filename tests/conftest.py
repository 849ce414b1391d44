"""Fixtures for tests against the local stack (scripts/stack.sh): a real Kafka broker and PostgreSQL.

Where the stack is comes from the environment (``. .stack/env``, as ``make test`` does) or else from
``.stack/env`` itself. When the services are not reachable, tests that need them are skipped, except
under CI (``CI=true``), where they fail: CI must never pass by skipping.
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from kafka import KafkaAdminClient

REPO = Path(__file__).resolve().parent.parent
ENV_FILE = (
    Path(os.environ.get("STACK_DIR") or os.environ.get("METRIC_ETL_STACK_DIR") or REPO / ".stack") / "env"
)

# Test modules import their helpers as ``tests.support``.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

STACK_KEYS = (
    "METRIC_ETL_BOOTSTRAP_SERVERS",
    "METRIC_ETL_DB_URL",
    "METRIC_ETL_DB_PASSWORD",
    "STACK_CA_FILE",
    "STACK_WRONG_CA_FILE",
    "STACK_KAFKA_PLAINTEXT",
    "STACK_KAFKA_SSL",
    "STACK_KAFKA_SASL_SSL",
    "STACK_KAFKA_SASL_PLAINTEXT",
    "STACK_KAFKA_MTLS",
    "STACK_CLIENT_CERT",
    "STACK_CLIENT_KEY",
    "STACK_CLIENT_KEY_ENCRYPTED",
    "STACK_CLIENT_KEY_PASSWORD",
    "STACK_SASL_USER",
    "STACK_SASL_PASSWORD",
    "STACK_SASL_MECHANISMS",
    "STACK_KAFKA_PID_FILE",
    "STACK_PG_HOST",
    "STACK_PG_PORT",
    "STACK_PG_DATABASE",
    "STACK_PG_USER",
    "STACK_PG_ADMIN_URL",
    "STACK_PG_TLS",
    "STACK_DIR",
)
REQUIRED_KEYS = (
    "METRIC_ETL_BOOTSTRAP_SERVERS",
    "METRIC_ETL_DB_URL",
    "METRIC_ETL_DB_PASSWORD",
    "STACK_CA_FILE",
    "STACK_PG_HOST",
    "STACK_PG_PORT",
    "STACK_PG_ADMIN_URL",
)

# Kafka client timeouts for tests: long enough for a loaded 2-core machine, short enough to fail fast.
KAFKA_TIMEOUTS = {"request_timeout_ms": 10_000, "bootstrap_timeout_ms": 10_000}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "services: needs the local Kafka broker and PostgreSQL (make stack-up)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Whatever needs the stack is a services test, so `pytest -m "not services"` runs without it.
    for item in items:
        if "stack" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.services)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def read_env_file(path: Path) -> dict[str, str]:
    """The ``export NAME=value`` lines of the stack's env file."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        name, sep, value = line.partition("=")
        if sep:
            words = shlex.split(value)
            values[name.strip()] = words[0] if words else ""
    return values


class Stack(dict[str, str]):
    """Where the local stack is: the env file's values by name, plus client settings built from them."""

    def kafka_config(
        self, protocol: str = "PLAINTEXT", mechanism: str = "SCRAM-SHA-512", **extra: Any
    ) -> dict:
        """kafka-python keyword arguments for one listener of the broker (PLAINTEXT, SSL, SASL_SSL,
        SASL_PLAINTEXT), verifying the stack's CA and authenticating as the stack's SASL user."""
        listeners = {
            "PLAINTEXT": self.plaintext,
            "SSL": self["STACK_KAFKA_SSL"],
            "SASL_SSL": self["STACK_KAFKA_SASL_SSL"],
            "SASL_PLAINTEXT": self["STACK_KAFKA_SASL_PLAINTEXT"],
        }
        config: dict[str, Any] = {
            "bootstrap_servers": listeners[protocol],
            "security_protocol": protocol,
            **KAFKA_TIMEOUTS,
        }
        if protocol in ("SSL", "SASL_SSL"):
            config["ssl_cafile"] = self["STACK_CA_FILE"]
        if protocol.startswith("SASL_"):
            config["sasl_mechanism"] = mechanism
            config["sasl_plain_username"] = self["STACK_SASL_USER"]
            config["sasl_plain_password"] = self["STACK_SASL_PASSWORD"]
        config.update(extra)
        return config

    @property
    def plaintext(self) -> str:
        """The broker's PLAINTEXT bootstrap servers."""
        return self.get("STACK_KAFKA_PLAINTEXT") or self["METRIC_ETL_BOOTSTRAP_SERVERS"]

    def app_db_url(self) -> sa.URL:
        """The app's database URL (role etl) with its password, for SQLAlchemy with psycopg2."""
        return psycopg2_url(self["METRIC_ETL_DB_URL"]).set(password=self["METRIC_ETL_DB_PASSWORD"])


def psycopg2_url(url: str) -> sa.URL:
    """``url`` with the psycopg2 driver named: SQLAlchemy 2.1 reads a bare ``postgresql://`` as psycopg 3,
    which is not installed."""
    parsed = sa.make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg2")
    return parsed


def load_stack() -> Stack:
    from_file = read_env_file(ENV_FILE)
    return Stack({key: os.environ.get(key) or from_file.get(key, "") for key in STACK_KEYS})


def unreachable(stack: Stack) -> list[str]:
    """What is missing or not answering, in words."""
    missing = [key for key in REQUIRED_KEYS if not stack.get(key)]
    if missing:
        return [f"not set (no {ENV_FILE} and not in the environment): {', '.join(missing)}"]
    problems = []
    host, _, port = stack.plaintext.split(",")[0].rpartition(":")
    targets = [
        ("Kafka", host, int(port)),
        ("PostgreSQL", stack["STACK_PG_HOST"], int(stack["STACK_PG_PORT"])),
    ]
    for name, host, port in targets:
        try:
            socket.create_connection((host, port), timeout=3).close()
        except OSError as exc:
            problems.append(f"{name} at {host}:{port}: {exc}")
    return problems


@pytest.fixture(scope="session")
def stack() -> Stack:
    """The local stack's settings (a dict of the env file's names); skips, or fails under CI, when the
    services are not reachable."""
    found = load_stack()
    problems = unreachable(found)
    if problems:
        message = "the local stack is not reachable (run `make stack-up`): " + "; ".join(problems)
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return found


@pytest.fixture
def unique_name() -> str:
    """A fresh lowercase identifier, usable as a topic, schema or group name: ``t_<hex8>``."""
    return f"t_{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def kafka_admin(stack: Stack) -> Iterator[KafkaAdminClient]:
    """One admin client on the PLAINTEXT listener for the whole session."""
    admin = KafkaAdminClient(**stack.kafka_config("PLAINTEXT", client_id="metric-etl-tests"))
    yield admin
    admin.close()


@pytest.fixture
def make_topic(kafka_admin: KafkaAdminClient) -> Iterator[Callable[..., str]]:
    """``make_topic(partitions=1) -> name``: creates a fresh topic, ready to use (a leader for every
    partition), and deletes it after the test."""
    created: list[str] = []

    def make(partitions: int = 1) -> str:
        from kafka.errors import KafkaError, TopicAlreadyExistsError

        name = f"t_{uuid.uuid4().hex[:8]}"
        # The session's admin client outlives a broker restart made by a test before this one: its
        # first request may meet the old connection (NodeNotReadyError) until it reconnects.
        deadline = time.monotonic() + 60
        while True:
            try:
                kafka_admin.create_topics(
                    {name: {"num_partitions": partitions, "replication_factor": 1}},
                    timeout_ms=10_000,
                    wait_for_metadata=True,
                )
                break
            except TopicAlreadyExistsError:  # an attempt that failed late had created it
                break
            except KafkaError as exc:
                if not getattr(exc, "retriable", False) or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        created.append(name)
        return name

    yield make
    if created:
        try:
            kafka_admin.delete_topics(created, timeout_ms=10_000)
        except Exception as exc:  # a leftover topic must not fail the test that made it
            print(f"could not delete topics {created}: {exc!r}", file=sys.stderr)


@pytest.fixture(scope="session")
def admin_engine(stack: Stack) -> Iterator[sa.Engine]:
    """SQLAlchemy engine as the stack's admin role, on the database ``metrics``."""
    engine = sa.create_engine(psycopg2_url(stack["STACK_PG_ADMIN_URL"]), pool_pre_ping=True, pool_size=2)
    yield engine
    engine.dispose()


@pytest.fixture
def pg_schema(admin_engine: sa.Engine, stack: Stack) -> Iterator[str]:
    """A fresh schema in ``metrics`` owned by the app role ``etl``; dropped (CASCADE) after the test."""
    name = f"t_{uuid.uuid4().hex[:8]}"
    owner = stack.get("STACK_PG_USER") or sa.make_url(stack["METRIC_ETL_DB_URL"]).username
    quote = admin_engine.dialect.identifier_preparer.quote
    with admin_engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {quote(name)} AUTHORIZATION {quote(owner)}"))
    yield name
    deadline = time.monotonic() + 30
    while True:
        try:
            with admin_engine.begin() as conn:
                conn.execute(sa.text("SET LOCAL lock_timeout = '5s'"))
                conn.execute(sa.text(f"DROP SCHEMA IF EXISTS {quote(name)} CASCADE"))
            return
        except sa.exc.OperationalError:
            # A connection the test left open may still hold a lock for a moment.
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture(scope="session")
def built_dist(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``python -m build`` of the checkout, once per session: the finished process; the wheel, the
    sdist and the copied source tree are in ``built_dist.outdir``."""
    from tests.installs import build

    outdir = tmp_path_factory.mktemp("dist")
    done = build(outdir)
    assert done.returncode == 0, done.stdout + done.stderr
    done.outdir = outdir  # type: ignore[attr-defined]
    return done


@pytest.fixture(autouse=True)
def _subprocess_mutant_hits(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """``make mutants`` only (mutmut's stats pass): credit this test with the mutated functions its
    ``python -m etl`` processes ran (see tests/mutmut_site/sitecustomize.py)."""
    if os.environ.get("MUTANT_UNDER_TEST") != "stats":
        yield
        return
    hits = tmp_path_factory.mktemp("mutmut-hits")
    site = str(Path(__file__).resolve().parent / "mutmut_site")
    saved = {k: os.environ.get(k) for k in ("MUTMUT_SUBPROCESS_HITS", "PYTHONPATH")}
    os.environ["MUTMUT_SUBPROCESS_HITS"] = str(hits)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [site, saved["PYTHONPATH"]]))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        from mutmut.state import state

        for name in {n for f in hits.glob("*.txt") for n in f.read_text().split()}:
            state().tests_by_mangled_function_name[name].add(request.node.nodeid)
