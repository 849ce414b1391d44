"""The job runs as the least-privilege role the README documents, and that role can do nothing more.

The GRANTs are read from the README's "A least-privilege role" block (the statements above its
"-- only for" line, which are for other commands), so the documentation and this test cannot drift.
Tables are created beforehand by their owner with the job's own DDL, as ``metric-etl init-db`` does.
"""

from __future__ import annotations

import re
import secrets
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from etl.db.schema import build_tables, ddl
from tests.exactly_once import assert_exactly_once, kafka_ends
from tests.support import REPO, cli_env, good_message, produce, rows, run_cli
from tests.test_faults import backlog

pytestmark = pytest.mark.services


def readme_grants(schema: str, role: str) -> list[str]:
    """The README's GRANT statements for the job, for ``schema`` and ``role``."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("### A least-privilege role") :]
    block = re.search(r"```sql\n(.*?)```", section, re.S)
    assert block, "the README's least-privilege section has no sql block"
    statements = []
    for line in block.group(1).splitlines():
        if line.startswith("-- only for"):
            break
        line = line.split("--", 1)[0].strip()
        if line.startswith("GRANT"):
            statements.append(line.rstrip(";").replace("public.", f'"{schema}".').replace("metric_etl", role))
    statements = [re.sub(r"ON SCHEMA public\b", f'ON SCHEMA "{schema}"', s) for s in statements]
    assert len(statements) >= 6, statements
    return statements


@pytest.fixture
def role(admin_engine: sa.Engine) -> Iterator[tuple[str, str]]:
    """A fresh login role with no privileges of its own: (name, password); dropped afterwards."""
    name, password = f"lp_{uuid.uuid4().hex[:8]}", secrets.token_hex(16)
    with admin_engine.begin() as conn:
        conn.execute(sa.text(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'"))
    yield name, password
    with admin_engine.begin() as conn:
        conn.execute(sa.text(f"REVOKE ALL ON DATABASE metrics FROM {name}"))
        conn.execute(sa.text(f"DROP OWNED BY {name}"))
        conn.execute(sa.text(f"DROP ROLE {name}"))


def owner_creates_tables(stack, schema: str) -> None:
    """The owner (the stack's app role) runs the job's DDL, as ``metric-etl init-db --sql | psql``."""
    engine = sa.create_engine(stack.app_db_url())
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(ddl(build_tables(schema)))
    finally:
        engine.dispose()


def env_as(stack, topic: str, schema: str, role: tuple[str, str]) -> dict[str, str]:
    name, password = role
    url = sa.make_url(stack["METRIC_ETL_DB_URL"]).set(username=name)
    return cli_env(
        stack,
        topic,
        schema,
        METRIC_ETL_DB_URL=url.render_as_string(hide_password=False),
        METRIC_ETL_DB_PASSWORD=password,
    )


def test_the_job_runs_as_the_readme_least_privilege_role(
    stack, make_topic, pg_schema, admin_engine, role
) -> None:
    topic = make_topic(partitions=2)
    owner_creates_tables(stack, pg_schema)
    with admin_engine.begin() as conn:
        for statement in readme_grants(pg_schema, role[0]):
            conn.execute(sa.text(statement))
        # A value only the database refuses: the savepoint path and a stage-database reject.
        table = f'"{pg_schema}".website_metrics'
        conn.execute(sa.text(f"ALTER TABLE {table} ADD CONSTRAINT no_teapots CHECK (status_code <> 418)"))
    produce(stack, topic, [*backlog(200, bad_every=20), good_message(999, status_code=418)], partitions=2)
    env = env_as(stack, topic, pg_schema, role)

    first = run_cli(["run", "--lock", "--output", "json"], env)
    assert first.returncode == 0, first.stderr
    assert '"loaded": 190' in first.stdout and '"rejected": 11' in first.stdout
    produce(stack, topic, [good_message(i) for i in range(40)], partitions=2)
    second = run_cli(["run", "--lock"], env)  # the stored offsets are updated this time
    assert second.returncode == 0, second.stderr
    assert_exactly_once(admin_engine, pg_schema, topic, f"g-{topic}", kafka_ends(stack, topic))
    who = rows(admin_engine, f'SELECT DISTINCT pid > 0 AS ok, status FROM "{pg_schema}".etl_runs')
    assert [(r.ok, r.status) for r in who] == [(True, "ok")]


def test_the_role_can_do_nothing_more(stack, make_topic, pg_schema, admin_engine, role) -> None:
    name = role[0]
    owner_creates_tables(stack, pg_schema)
    with admin_engine.begin() as conn:
        for statement in readme_grants(pg_schema, name):
            conn.execute(sa.text(statement))
    checks = {
        "CREATE on the database": f"has_database_privilege('{name}', current_database(), 'CREATE')",
        "CREATE in the schema": f"has_schema_privilege('{name}', '{pg_schema}', 'CREATE')",
    }
    tables = ("website_metrics", "website_metrics_rejects", "etl_offsets", "etl_runs")
    wrong = [(t, p) for t in tables for p in ("DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")]
    wrong.append(("website_metrics", "UPDATE"))  # a loaded row is never changed
    for table, privilege in wrong:
        relation = f'"{pg_schema}".{table}'
        checks[f"{privilege} on {table}"] = f"has_table_privilege('{name}', '{relation}', '{privilege}')"
    with admin_engine.connect() as conn:
        granted = [what for what, sql in checks.items() if conn.execute(sa.text(f"SELECT {sql}")).scalar()]
    assert granted == []

    # Without the tables the role cannot make them: a configuration error that says what to grant.
    other_schema = f"t_{uuid.uuid4().hex[:8]}"
    topic = make_topic(partitions=1)
    proc = run_cli(["run"], env_as(stack, topic, other_schema, role))
    assert proc.returncode == 3, proc.stderr
    assert "permission denied" in proc.stderr and "Hint: grant the job's role the privileges" in proc.stderr
    made = rows(admin_engine, "SELECT 1 FROM pg_namespace WHERE nspname = :s", s=other_schema)
    assert made == []
