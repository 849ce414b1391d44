"""`metric-etl rejects ...` against the real broker and database: list, show, export, replay, ignore,
purge."""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import threading
from typing import Any

import pytest
from click.testing import CliRunner, Result

from etl.cli import main
from etl.ops.rejects import RejectFilter, replay
from etl.run import run_batch
from tests.support import cli_env, count, good_message, produce, rows, settings_for

pytestmark = pytest.mark.services

ANSI = b"\x1b[31mred alert\x1b[0m \x1b]0;title\x07"  # colour, and a terminal-title escape
NOT_UTF8 = b"\xff\xfe\x00garbage"
NO_ZONE = good_message(900, checked_at="2026-11-28T10:00:00")  # rule: timezone
FTP = good_message(901, url="ftp://example.com/")  # rule: url_scheme
BAD = [ANSI, NOT_UTF8, NO_ZONE, FTP]


def invoke(args: list[str], env: dict[str, str]) -> Result:
    """The command in-process (fast); restores the log handlers the command replaced."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        return CliRunner().invoke(main, args, env=env, catch_exceptions=False)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


@pytest.fixture
def loaded(stack, make_topic, pg_schema) -> dict[str, Any]:
    """A real run over 3 partitions: 12 good messages and the 4 bad ones, with keys and headers."""
    topic = make_topic(partitions=3)
    values = [good_message(i) for i in range(12)] + BAD
    produce(
        stack,
        topic,
        values,
        partitions=3,
        keys=[f"key-{i}".encode() for i in range(len(values))],
        headers=[("trace", b"abc"), ("raw", b"\x00\x01\xfe")],
    )
    report = run_batch(settings_for(stack, topic, pg_schema))
    assert (report.loaded, report.rejected) == (12, 4)
    return {"topic": topic, "schema": pg_schema, "env": cli_env(stack, topic, pg_schema)}


def reject_ids(engine: Any, schema: str, where: str = "") -> dict[bytes | None, int]:
    found = rows(engine, f'SELECT id, payload FROM "{schema}".website_metrics_rejects {where}')
    return {bytes(r.payload) if r.payload is not None else None: r.id for r in found}


def legacy_reject(
    engine: Any, schema: str, topic: str, offset: int, payload: bytes, partition: int = 0
) -> int:
    """A reject as an older, stricter version of the rules would have left it."""
    from sqlalchemy import text

    with engine.begin() as conn:
        return conn.execute(
            text(
                f'INSERT INTO "{schema}".website_metrics_rejects (topic, partition, "offset", key, '
                "headers, payload, payload_text, stage, errors, run_id) "
                "VALUES (:t, :p, :o, :k, :h, :v, :vt, 'schema', :e, 'an-old-run') RETURNING id"
            ),
            {
                "t": topic,
                "p": partition,
                "o": offset,
                "k": b"legacy",
                "h": json.dumps([["trace", "old"]]),
                "v": payload,
                "vt": payload.decode(),
                "e": json.dumps([{"field": "url", "rule": "old_rule", "value": None}]),
            },
        ).scalar_one()


def test_list_shows_a_readable_table_and_filters(loaded, admin_engine) -> None:
    env = loaded["env"]
    everything = invoke(["rejects", "list"], env)
    assert everything.exit_code == 0, everything.output
    lines = everything.stdout.splitlines()
    assert lines[0].split() == [
        "id",
        "rejected",
        "(UTC)",
        "topic:partition:offset",
        "stage",
        "status",
        "rules",
        "payload",
    ]
    assert len(lines) == 1 + 4
    assert "\x1b" not in everything.stdout  # the ANSI payload is shown escaped
    assert "\\x1b[31mred alert" in everything.stdout
    assert "not UTF-8: ff fe 00" in everything.stdout

    by_rule = invoke(["rejects", "list", "--rule", "timezone", "--output", "json"], env)
    listed = json.loads(by_rule.stdout)
    assert [base64.b64decode(x["payload_base64"]) for x in listed] == [NO_ZONE]
    assert listed[0]["errors"][0]["rule"] == "timezone"
    assert listed[0]["topic"] == loaded["topic"]

    decode = json.loads(invoke(["rejects", "list", "--stage", "decode", "--output", "json"], env).stdout)
    assert [base64.b64decode(x["payload_base64"]) for x in decode] == [NOT_UTF8]
    two_rules = invoke(
        ["rejects", "list", "--rule", "timezone", "--rule", "url_scheme", "--output", "json"], env
    )
    assert len(json.loads(two_rules.stdout)) == 2
    assert len(json.loads(invoke(["rejects", "list", "--limit", "3", "--output", "json"], env).stdout)) == 3
    assert invoke(["rejects", "list", "--status", "ignored"], env).stdout.strip() == "no rejects match"
    assert invoke(["rejects", "list", "--since", "2099-01-01"], env).stdout.strip() == "no rejects match"
    assert len(json.loads(invoke(["rejects", "list", "--since", "1h", "--output", "json"], env).stdout)) == 4
    assert invoke(["rejects", "list", "--topic", "another-topic"], env).stdout.strip() == "no rejects match"

    bad_since = invoke(["rejects", "list", "--since", "yesterday-ish"], env)
    assert bad_since.exit_code == 2
    assert "neither an ISO time" in bad_since.stderr


def test_show_gives_everything_and_is_safe_on_a_terminal(loaded, admin_engine) -> None:
    env, schema = loaded["env"], loaded["schema"]
    ids = reject_ids(admin_engine, schema)

    ansi = invoke(["rejects", "show", str(ids[ANSI])], env)
    assert ansi.exit_code == 0, ansi.output
    out = ansi.stdout
    assert "\x1b" not in out and "\x07" not in out
    assert f"topic {loaded['topic']}, partition " in out and ", offset " in out
    assert 'key:       "key-' in out
    assert '["trace", "abc"]' in out and '["raw", "AAH+", "base64"]' in out
    assert "errors (1):" in out and "invalid_json" in out
    assert f"payload:   {len(ANSI)} bytes, UTF-8 text" in out
    assert "00000000  1b 5b 33 31 6d" in out  # hex dump, because the text holds control characters
    assert "decoded text (escaped):" in out and "\\x1b[31mred alert\\x1b[0m \\x1b]0;title\\x07" in out

    raw = invoke(["rejects", "show", str(ids[NOT_UTF8])], env).stdout
    assert "not UTF-8" in raw and "|...garbage|" in raw and "invalid_utf8" in raw

    plain = invoke(["rejects", "show", str(ids[FTP])], env).stdout
    assert '"url": "ftp://example.com/"' in plain  # readable text is shown as text
    assert 'url: url_scheme  value: "ftp://example.com/"' in plain
    assert "00000000" in invoke(["rejects", "show", str(ids[FTP]), "--hex"], env).stdout

    as_json = json.loads(invoke(["rejects", "show", str(ids[ANSI]), "--output", "json"], env).stdout)
    assert base64.b64decode(as_json["payload_base64"]) == ANSI
    assert as_json["status"] == "new" and as_json["stage"] == "json"

    missing = invoke(["rejects", "show", "999999"], env)
    assert missing.exit_code == 2
    assert missing.stderr.startswith("Error: no reject with id 999999 in ")
    assert "Hint: list them with `metric-etl rejects list`" in missing.stderr


def test_export_keeps_the_exact_bytes_in_jsonl_and_csv(loaded, tmp_path) -> None:
    env = loaded["env"]
    jsonl = invoke(["rejects", "export"], env)
    assert jsonl.exit_code == 0, jsonl.output
    records = [json.loads(line) for line in jsonl.stdout.splitlines()]
    assert sorted(base64.b64decode(r["payload_base64"]) for r in records) == sorted(BAD)
    assert all(base64.b64decode(r["key_base64"]).startswith(b"key-") for r in records)
    assert [r["id"] for r in records] == sorted(r["id"] for r in records)  # oldest first
    assert all(r["headers"] == [["trace", "abc"], ["raw", "AAH+", "base64"]] for r in records)
    assert "\x1b" not in jsonl.stdout  # control characters escaped in JSON

    target = tmp_path / "rejects.csv"
    done = invoke(["rejects", "export", "--format", "csv", "--stage", "schema", "-o", str(target)], env)
    assert done.exit_code == 0, done.output
    assert f"exported 2 rejects to {target}" in done.stderr
    table = list(csv.DictReader(io.StringIO(target.read_text(encoding="utf-8"))))
    assert sorted(base64.b64decode(r["payload_base64"]) for r in table) == sorted([NO_ZONE, FTP])
    assert {json.loads(r["errors"])[0]["rule"] for r in table} == {"timezone", "url_scheme"}
    assert list(table[0]) == [
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
    ]


def test_replay_loads_what_now_passes_once_and_updates_the_rest(stack, loaded, admin_engine) -> None:
    env, schema, topic = loaded["env"], loaded["schema"], loaded["topic"]
    fixed = [legacy_reject(admin_engine, schema, topic, 1000 + i, good_message(1000 + i)) for i in range(3)]
    still_bad = legacy_reject(admin_engine, schema, topic, 1010, good_message(1010, status_code="200"))
    real = sorted(reject_ids(admin_engine, schema, "WHERE run_id <> 'an-old-run'").values())

    dry = invoke(["rejects", "replay", "--dry-run", "--output", "json"], env)
    assert dry.exit_code == 0, dry.output
    summary = json.loads(dry.stdout)
    assert summary["dry_run"] is True
    assert (summary["selected"], summary["loaded"], summary["still_rejected"]) == (8, 3, 5)
    assert summary["ids"]["loaded"] == fixed
    assert count(admin_engine, schema, "website_metrics") == 12  # rolled back
    assert count(admin_engine, schema, "website_metrics_rejects", "WHERE status <> 'new'") == 0
    old_errors = rows(
        admin_engine, f'SELECT errors FROM "{schema}".website_metrics_rejects WHERE id = {still_bad}'
    )
    assert old_errors[0].errors[0]["rule"] == "old_rule"

    done = invoke(["rejects", "replay"], env)
    assert done.exit_code == 0, done.output
    assert "8 selected" in done.stdout
    assert "pass now, loaded and marked replayed:" in done.stdout
    assert count(admin_engine, schema, "website_metrics") == 15
    loaded_rows = rows(
        admin_engine,
        f'SELECT url, "offset", run_id FROM "{schema}".website_metrics WHERE "offset" >= 1000 ORDER BY 2',
    )
    assert [(r.url, r.offset) for r in loaded_rows] == [
        (f"https://example.com/{1000 + i}", 1000 + i) for i in range(3)
    ]
    assert all(r.run_id.startswith("replay-") for r in loaded_rows)
    marked = rows(
        admin_engine,
        f'SELECT id, status, status_note, status_changed_at FROM "{schema}".website_metrics_rejects '
        "WHERE status = 'replayed' ORDER BY id",
    )
    assert [r.id for r in marked] == fixed
    assert all(r.status_note.startswith("loaded by replay-") and r.status_changed_at for r in marked)
    updated = rows(
        admin_engine,
        f'SELECT status, stage, errors FROM "{schema}".website_metrics_rejects WHERE id = {still_bad}',
    )[0]
    assert updated.status == "new" and updated.stage == "schema"
    assert [e["rule"] for e in updated.errors] == ["type"]  # the current rules' verdict, not old_rule
    for reject_id in real:  # the real rejects still fail the same rules, and stay new
        assert (
            rows(
                admin_engine, f'SELECT status FROM "{schema}".website_metrics_rejects WHERE id = {reject_id}'
            )[0].status
            == "new"
        )

    # Replaying again, by filter or by id, loads nothing twice.
    again = json.loads(invoke(["rejects", "replay", "--output", "json"], env).stdout)
    assert (again["selected"], again["loaded"]) == (5, 0)
    by_id = json.loads(invoke(["rejects", "replay", *map(str, fixed), "--output", "json"], env).stdout)
    assert (by_id["selected"], by_id["loaded"], by_id["ids"]["skipped"]) == (0, 0, fixed)
    assert count(admin_engine, schema, "website_metrics") == 15

    unknown = invoke(["rejects", "replay", "999999"], env)
    assert unknown.exit_code == 2 and "no reject with id 999999" in unknown.stderr
    replayed = invoke(["rejects", "replay", "--status", "replayed"], env)
    assert replayed.exit_code == 2 and "replayed rejects are loaded already" in replayed.stderr


def test_replay_marks_a_message_already_in_the_metrics_table_without_loading_it(
    stack, loaded, admin_engine
) -> None:
    schema, topic = loaded["schema"], loaded["topic"]
    present = rows(admin_engine, f'SELECT partition, "offset", url FROM "{schema}".website_metrics LIMIT 1')[
        0
    ]
    twin = legacy_reject(
        admin_engine,
        schema,
        topic,
        present.offset,
        good_message(0, url=present.url),
        partition=present.partition,
    )
    result = replay(settings_for(stack, topic, schema), RejectFilter(ids=(twin,)))
    assert (result.loaded, result.already_loaded) == ([], [twin])
    assert count(admin_engine, schema, "website_metrics") == 12
    status = rows(
        admin_engine, f'SELECT status, status_note FROM "{schema}".website_metrics_rejects WHERE id = {twin}'
    )
    assert status[0].status == "replayed" and "already in website_metrics" in status[0].status_note


def test_two_replays_at_once_load_each_message_once(stack, loaded, admin_engine) -> None:
    schema, topic = loaded["schema"], loaded["topic"]
    fixed = [legacy_reject(admin_engine, schema, topic, 2000 + i, good_message(2000 + i)) for i in range(20)]
    settings = settings_for(stack, topic, schema)
    results: list[Any] = []
    start = threading.Barrier(2)

    def go() -> None:
        start.wait()
        results.append(replay(settings, RejectFilter(rules=("old_rule",))))

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 2
    assert sorted(results[0].loaded + results[1].loaded) == fixed
    assert count(admin_engine, schema, "website_metrics", 'WHERE "offset" >= 2000') == 20


def test_ignore_with_a_reason_all_or_nothing(loaded, admin_engine) -> None:
    env, schema = loaded["env"], loaded["schema"]
    ids = reject_ids(admin_engine, schema)
    pick = sorted([ids[ANSI], ids[NOT_UTF8]])

    unknown = invoke(["rejects", "ignore", str(pick[0]), "999999", "--reason", "x"], env)
    assert unknown.exit_code == 2
    assert "no reject with id 999999" in unknown.stderr and "nothing was changed" in unknown.stderr
    assert count(admin_engine, schema, "website_metrics_rejects", "WHERE status = 'ignored'") == 0

    no_reason = invoke(["rejects", "ignore", str(pick[0])], env)
    assert no_reason.exit_code == 2 and "Missing option '--reason'" in no_reason.stderr

    done = invoke(["rejects", "ignore", *map(str, pick), "--reason", "garbage from a broken probe"], env)
    assert done.exit_code == 0, done.output
    assert done.stdout.startswith(
        f"ignored 2 rejects  (ids {pick[0]}, {pick[1]}): garbage from a broken probe"
    )
    ignored = rows(
        admin_engine,
        f'SELECT id, status_note, status_changed_at FROM "{schema}".website_metrics_rejects '
        "WHERE status = 'ignored' ORDER BY id",
    )
    assert [r.id for r in ignored] == pick
    assert all(r.status_note == "garbage from a broken probe" and r.status_changed_at for r in ignored)
    # Ignored rejects are left out of a plain replay.
    assert (
        json.loads(invoke(["rejects", "replay", "--dry-run", "--output", "json"], env).stdout)["selected"]
        == 2
    )


def test_purge_deletes_only_what_is_older_than_asked(loaded, admin_engine) -> None:
    from sqlalchemy import text

    env, schema = loaded["env"], loaded["schema"]
    ids = reject_ids(admin_engine, schema)
    old = sorted([ids[ANSI], ids[FTP]])
    with admin_engine.begin() as conn:
        conn.execute(
            text(
                f"UPDATE \"{schema}\".website_metrics_rejects SET rejected_at = now() - interval '40 days' "
                "WHERE id = ANY(:ids)"
            ),
            {"ids": old},
        )
        conn.execute(
            text(f"UPDATE \"{schema}\".website_metrics_rejects SET status = 'ignored' WHERE id = :i"),
            {"i": old[0]},
        )

    dry = invoke(["rejects", "purge", "--older-than", "30d", "--dry-run"], env)
    assert dry.exit_code == 0, dry.output
    assert dry.stdout.startswith("would delete 2 rejects rejected before ")
    assert count(admin_engine, schema, "website_metrics_rejects") == 4

    only_new = json.loads(
        invoke(["rejects", "purge", "--older-than", "30d", "--status", "new", "--output", "json"], env).stdout
    )
    assert only_new["deleted"] == 1
    rest = invoke(["rejects", "purge", "--older-than", "4w2d"], env)
    assert rest.stdout.startswith("deleted 1 rejects")
    assert sorted(reject_ids(admin_engine, schema).values()) == sorted(set(ids.values()) - set(old))

    bad = invoke(["rejects", "purge", "--older-than", "a month"], env)
    assert bad.exit_code == 2 and "is not a duration like 30d" in bad.stderr
    assert invoke(["rejects", "purge"], env).exit_code == 2


def test_missing_tables_say_to_run_init_db(stack, make_topic, pg_schema) -> None:
    topic = make_topic(partitions=1)
    result = invoke(["rejects", "list"], cli_env(stack, topic, pg_schema))
    assert result.exit_code == 3
    assert "the tables are missing in schema" in result.stderr
    assert "Hint: create them with `metric-etl init-db`" in result.stderr
    assert stack["METRIC_ETL_DB_PASSWORD"] not in result.output
