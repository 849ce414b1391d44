"""validate: the message contract, good rows ready for PostgreSQL, rejects with every failed rule."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import numpy as np
import orjson
import pandas as pd
import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from etl import checks
from etl.contract import GOOD_COLUMNS, REJECT_COLUMNS, RawMessage
from etl.contract import VALIDATION_STAGES as STAGES
from etl.db import text_copy
from etl.normalise import normalise
from etl.validate import RULES, records, validate

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
OK = {
    "url": "https://example.com/health",
    "status_code": 200,
    "response_time_ms": 123.4,
    "regex_pattern": "ok",
    "regex_matched": True,
    "checked_at": "2026-11-28T10:00:00Z",
    "error": None,
}
GOOD_DTYPES = {
    "topic": "object",
    "partition": "int64",
    "offset": "int64",
    "kafka_timestamp": "datetime64[us, UTC]",
    "url": "object",
    "status_code": "Int16",
    "response_time_ms": "float64",
    "regex_pattern": "object",
    "regex_matched": "boolean",
    "checked_at": "datetime64[us, UTC]",
    "error": "object",
    "extra": "object",
}
REJECT_DTYPES = {
    "topic": "object",
    "partition": "int64",
    "offset": "int64",
    "key": "object",
    "headers": "object",
    "kafka_timestamp": "datetime64[us, UTC]",
    "payload": "object",
    "payload_text": "object",
    "stage": "object",
    "errors": "object",
}


def encode(fields: dict[str, object] | None = None, drop: tuple[str, ...] = (), **changes: object) -> bytes:
    data = {k: v for k, v in {**OK, **(fields or {}), **changes}.items() if k not in drop}
    return orjson.dumps(data)


def run(values: Sequence[bytes | None], now: datetime = NOW) -> tuple[pd.DataFrame, pd.DataFrame]:
    messages = [
        RawMessage("website-metrics", 1, 100 + i, 1_795_860_000_000, None, v) for i, v in enumerate(values)
    ]
    return validate(normalise(messages), now=now)


def rules(values: Sequence[bytes | None], now: datetime = NOW) -> list[set[tuple[object, object]]]:
    """The (field, rule) set of each message, good ones as an empty set."""
    _, rejects = run(values, now)
    by_offset = {r.offset: {(e["field"], e["rule"]) for e in r.errors} for r in rejects.itertuples()}
    return [by_offset.get(100 + i, set()) for i in range(len(values))]


def test_output_columns_and_dtypes() -> None:
    good, rejects = run([encode(), b"nope"])
    assert {c: str(t) for c, t in good.dtypes.items()} == GOOD_DTYPES
    assert tuple(good.columns) == GOOD_COLUMNS
    assert {c: str(t) for c, t in rejects.dtypes.items()} == REJECT_DTYPES
    assert tuple(rejects.columns) == REJECT_COLUMNS


def test_empty_frame_gives_two_empty_frames_with_the_dtypes() -> None:
    good, rejects = validate(normalise([]), now=NOW)
    assert {c: str(t) for c, t in good.dtypes.items()} == GOOD_DTYPES
    assert tuple(rejects.columns) == REJECT_COLUMNS
    assert good.empty and rejects.empty


def test_good_row_values() -> None:
    failed = encode(error="timeout after 10000 ms", drop=("status_code", "response_time_ms", "regex_matched"))
    extra = encode(region="eu", probe={"id": 7})
    good, rejects = run([encode(), failed, extra])
    assert rejects.empty
    first, second, third = (good.iloc[i] for i in range(3))
    assert first["url"] == "https://example.com/health"
    assert first["status_code"] == 200
    assert first["response_time_ms"] == 123.4
    assert first["checked_at"] == pd.Timestamp("2026-11-28T10:00:00Z")
    assert first["error"] is None
    assert first["extra"] is None
    assert first["kafka_timestamp"] == pd.Timestamp("2026-11-28T10:00:00Z")
    assert second["status_code"] is pd.NA
    assert np.isnan(second["response_time_ms"])
    assert second["regex_matched"] is pd.NA
    assert second["error"] == "timeout after 10000 ms"
    assert orjson.loads(third["extra"]) == {"region": "eu", "probe": {"id": 7}}
    assert good["regex_matched"].tolist() == [True, pd.NA, True]


def test_index_labels_are_kept_so_rows_can_be_traced_to_the_input() -> None:
    frame = normalise(
        [RawMessage("t", 0, i, None, None, v) for i, v in enumerate([encode(), b"x", encode()])]
    )
    frame.index = pd.Index([30, 10, 20])
    good, rejects = validate(frame, now=NOW)
    assert good.index.tolist() == [30, 20]
    assert rejects.index.tolist() == [10]
    assert (good["offset"] == frame.loc[good.index, "offset"]).all()


def test_every_row_lands_in_exactly_one_output_and_values_stay_with_their_message() -> None:
    values: list[bytes | None] = []
    for i in range(300):
        if i % 7 == 3:
            values.append(encode(url=f"ftp://site-{i % 5}.example.com/"))
        elif i % 11 == 5:
            values.append(None)
        else:
            values.append(encode(url=f"https://site-{i % 5}.example.com/", status_code=200 + i % 50))
    good, rejects = run(values)
    assert len(good) + len(rejects) == len(values)
    assert sorted([*good["offset"], *rejects["offset"]]) == [100 + i for i in range(300)]
    for row in good.itertuples():
        i = row.offset - 100
        assert row.url == f"https://site-{i % 5}.example.com/"
        assert row.status_code == 200 + i % 50
    for row in rejects.itertuples():
        i = row.offset - 100
        assert row.payload == values[i]
        assert row.stage == ("decode" if values[i] is None else "schema")


def test_every_failed_rule_is_listed_not_only_the_first() -> None:
    [found] = rules(
        [
            encode(
                url="ftp://x y",
                status_code="200",
                checked_at="2026-11-28T10:00:00",
                regex_matched="yes",
                error="",
            )
        ]
    )
    assert found == {
        ("url", "url_scheme"),
        ("url", "url_chars"),
        ("status_code", "type"),
        ("checked_at", "timezone"),
        ("regex_matched", "type"),
        ("error", "empty"),
    }


def test_error_entries_show_the_offending_value_shortly() -> None:
    _, rejects = run([encode(status_code="200", url="https://example.com/" + "a" * 3000)])
    errors = {e["rule"]: e for e in rejects.iloc[0]["errors"]}
    assert errors["type"] == {"field": "status_code", "rule": "type", "value": '"200"'}
    shown = errors["url_length"]["value"]
    assert len(shown) == 101 and shown.startswith('"https://example.com/aaa') and shown.endswith("…")
    _, rejects = run([encode(drop=("url",)), encode(url=None)])
    assert rejects.iloc[0]["errors"] == [{"field": "url", "rule": "required", "value": None}]
    assert rejects.iloc[1]["errors"] == [{"field": "url", "rule": "required", "value": "null"}]


def test_stage_is_the_earliest_that_failed() -> None:
    _, rejects = run([None, b"\xff", b"[]", encode(status_code="1"), b'{"url": 1, "url": 2}'])
    assert rejects["stage"].tolist() == ["decode", "decode", "json", "schema", "json"]
    assert set(rejects["stage"]) <= set(STAGES)
    # a duplicate key is a json-stage fault, and the field rules are still reported
    assert {(e["field"], e["rule"]) for e in rejects.iloc[4]["errors"]} >= {
        ("url", "duplicate_key"),
        ("url", "type"),
    }


def test_rules_are_documented() -> None:
    assert all(name.isidentifier() and name == name.lower() for name in RULES)
    assert all(text.endswith(".") for text in RULES.values())


# -- checked_at --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("2026-11-28T10:00:00Z", "2026-11-28T10:00:00Z"),
        ("2026-11-28T12:00:00+02:00", "2026-11-28T10:00:00Z"),
        ("2026-11-28T05:00:00.250-05:00", "2026-11-28T10:00:00.250Z"),
        ("2026-11-28 10:00:00+00:00", "2026-11-28T10:00:00Z"),
        # The README promises +hh:mm, +hhmm and +hh (issue 14: a zone pattern without the last two
        # passed every test).
        ("2026-11-28T15:30:00+0530", "2026-11-28T10:00:00Z"),
        ("2026-11-28T06:15:00-0345", "2026-11-28T10:00:00Z"),
        ("2026-11-28T13:00:00+03", "2026-11-28T10:00:00Z"),
        ("2026-11-28T02:00:00-08", "2026-11-28T10:00:00Z"),
        ("2026-11-28T13:00+03", "2026-11-28T10:00:00Z"),
        (1_795_860_000, "2026-11-28T10:00:00Z"),
        (1_795_860_000.5, "2026-11-28T10:00:00.500Z"),
        (1_795_860_000_123, "2026-11-28T10:00:00.123Z"),
    ],
)
def test_checked_at_is_stored_as_utc(sent: object, stored: str) -> None:
    good, rejects = run([encode(checked_at=sent)])
    assert rejects.empty, rejects["errors"].tolist()
    assert good.iloc[0]["checked_at"] == pd.Timestamp(stored)


def test_checked_at_formats_mixed_in_one_batch_are_each_parsed() -> None:
    """With and without seconds or fractions, side by side: each value is parsed as ISO-8601 on its
    own (a format inferred from the first value would turn the others into rejects)."""
    sent = ["2026-11-28T10:00:00Z", "2026-11-28T10:00:00.250Z", "2026-11-28T13:00+03"]
    good, rejects = run([encode(checked_at=t) for t in sent])
    assert rejects.empty, rejects["errors"].tolist()
    assert good["checked_at"].tolist() == [
        pd.Timestamp(t) for t in ("2026-11-28T10:00:00Z", "2026-11-28T10:00:00.250Z", "2026-11-28T10:00:00Z")
    ]


def test_checked_at_impossible_dates_and_years_are_rejects_not_errors() -> None:
    """Month 13 passes the zone check but no calendar: a reject (timestamp_format), and the batch's
    other messages still load. Years pandas cannot hold (0, 10000) are out of range."""
    sent = ["2026-13-40T10:00:00Z", "10000-01-01T00:00:00Z", "0000-01-01T00:00:00Z", "2026-11-28T10:00:00Z"]
    assert rules([encode(checked_at=t) for t in sent]) == [
        {("checked_at", "timestamp_format")},
        {("checked_at", "timestamp_range")},
        {("checked_at", "timestamp_range")},
        set(),
    ]


def test_zones_of_every_form_in_one_batch_are_each_converted() -> None:
    """One batch mixing Z, +hh:mm, +hhmm and +hh: each value keeps its own offset (a parser that
    took the first value's zone for the whole column would shift the others)."""
    sent = [
        "2026-11-28T10:00:00Z",
        "2026-11-28T11:00:00+0100",
        "2026-11-28T12:00:00+02",
        "2026-11-28T07:30:00-02:30",
        "2026-11-28T09:00:00-01",
    ]
    good, rejects = run([encode(checked_at=t) for t in sent])
    assert rejects.empty, rejects["errors"].tolist()
    assert good["checked_at"].tolist() == [pd.Timestamp("2026-11-28T10:00:00Z")] * 5


def test_epoch_numbers_below_1e11_are_seconds_and_from_it_milliseconds() -> None:
    seconds_year_5138 = 99_999_999_999
    milliseconds_1973 = 100_000_000_000
    assert rules([encode(checked_at=seconds_year_5138), encode(checked_at=milliseconds_1973)]) == [
        {("checked_at", "timestamp_range")},
        {("checked_at", "timestamp_range")},
    ]


def test_checked_at_may_be_up_to_one_day_ahead_of_now() -> None:
    edge = NOW + timedelta(days=1)
    late = edge + timedelta(seconds=1)
    found = rules([encode(checked_at=edge.isoformat()), encode(checked_at=late.isoformat())])
    assert found == [set(), {("checked_at", "timestamp_range")}]
    assert rules([encode(checked_at="2000-01-01T00:00:00Z"), encode(checked_at="1999-12-31T23:59:59Z")]) == [
        set(),
        {("checked_at", "timestamp_range")},
    ]


def test_now_must_be_timezone_aware() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        validate(normalise([]), now=datetime(2026, 1, 1))


def test_now_defaults_to_the_current_time() -> None:
    soon = datetime.now(UTC) + timedelta(hours=1)
    good, _ = validate(normalise([RawMessage("t", 0, 0, None, None, encode(checked_at=soon.isoformat()))]))
    assert len(good) == 1


# -- status, timing, error ---------------------------------------------------------------------------


def test_success_and_failure_shapes() -> None:
    found = rules(
        [
            encode(status_code=500, error="regex did not match"),  # both: fine
            encode(error="refused", drop=("status_code", "response_time_ms")),
            encode(error="refused", status_code=None, response_time_ms=2000.0),  # timed out after 2 s
            encode(drop=("response_time_ms",)),
            encode(drop=("status_code", "error")),
            encode(status_code=100, response_time_ms=0),
            encode(status_code=599, response_time_ms=86_400_000),
            encode(status_code=600, response_time_ms=86_400_001),
        ]
    )
    assert found == [
        set(),
        set(),
        set(),
        {("response_time_ms", "required")},
        {(None, "status_or_error")},
        set(),
        set(),
        {("status_code", "range"), ("response_time_ms", "range")},
    ]


def test_strict_types() -> None:
    found = rules(
        [
            encode(status_code="200"),
            encode(status_code=200.0),
            encode(status_code=True),
            encode(response_time_ms="12"),
            encode(regex_matched="true"),
            encode(regex_matched=0),
            encode(regex_pattern=1),
            encode(error=False),
        ]
    )
    assert found == [
        {("status_code", "type")},
        {("status_code", "type")},
        {("status_code", "type")},
        {("response_time_ms", "type")},
        {("regex_matched", "type")},
        {("regex_matched", "type")},
        {("regex_pattern", "type")},
        {("error", "type")},
    ]


# -- url -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com",
        "https://example.com:8443/a?b=c#d",
        "HTTPS://Example.COM/",
        "https://user:pw@example.com/",
        "http://[2001:db8::1]:8080/",
        "https://bücher.example/straße",
        "https://example.com/\U0001f600",
        "https://example.com/" + "a" * 2028,  # 2048 characters
    ],
)
def test_accepted_urls(url: str) -> None:
    assert rules([encode(url=url)]) == [set()]


@pytest.mark.parametrize(
    ("url", "rule"),
    [
        ("", "empty"),
        ("example.com", "url_scheme"),
        ("mailto:a@example.com", "url_scheme"),
        ("https://", "url_host"),
        ("https://:80/", "url_host"),
        ("https://example.com:80a/", "url_host"),
        ("https://example.com/" + "a" * 2029, "url_length"),
        ("https://example.com/a b", "url_chars"),
        ("https://example.com/\ta", "url_chars"),
        ("https://example.com/\u00a0", "url_chars"),
        ("https://example.com/\u202e", "url_chars"),
    ],
)
def test_rejected_urls(url: str, rule: str) -> None:
    assert rules([encode(url=url)]) == [{("url", rule)}]


def test_a_bad_url_is_rejected_wherever_it_repeats_in_the_batch() -> None:
    values = [encode(url="ftp://a.example.com/" if i % 3 else "https://a.example.com/") for i in range(30)]
    found = rules(values)
    assert [bool(f) for f in found] == [i % 3 != 0 for i in range(30)]


def test_unknown_fields_are_kept_exactly_big_integers_too() -> None:
    value = (
        encode()[:-1] + b',"big":123456789012345678901234567890,"n":{"x":-99999999999999999999},"f":1.5e300}'
    )
    good, _ = run([value])
    assert (
        good.iloc[0]["extra"]
        == '{"big":123456789012345678901234567890,"n":{"x":-99999999999999999999},"f":1.5e+300}'
    )


# -- structure: duplicate keys, nesting, NUL ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # compact and spaced duplicates, and one that counting `":` alone would miss
        (b'{"error": "a", "error": "b"}', {("error", "duplicate_key")}),
        (b'{"error" : "a", "error": "b"}', {("error", "duplicate_key")}),
        (b'{"error" : "a", "error": "b", "x": "y\\":"}', {("error", "duplicate_key")}),
        (
            b'{"error": "a", "p": {"q": 1, "q": 2}, "error2": [{"r": 1, "r": 1}]}',
            {("q", "duplicate_key"), ("r", "duplicate_key")},
        ),
    ],
)
def test_duplicate_keys_are_found_at_any_depth(text: bytes, expected: set[tuple[str, str]]) -> None:
    base = b'"url": "https://e.com", "checked_at": "2026-11-28T10:00:00Z", '
    value = b"{" + base + text[1:]
    [found] = rules([value])
    assert {f for f in found if f[1] == "duplicate_key"} == expected


def test_escaped_quotes_and_nesting_without_duplicates_are_fine() -> None:
    values = [
        encode(error='upstream said "bad gateway"', status_code=502),
        encode(probe={"tags": ["a", {"b": "c"}], "q": 'x"y'}),
        b'{\n  "url": "https://e.com",\n  "status_code": 200,\n  "response_time_ms": 1,\n'
        b'  "checked_at": "2026-11-28T10:00:00Z"\n}',
    ]
    assert rules(values) == [set(), set(), set()]


def test_nul_characters_are_rejected_wherever_they_are() -> None:
    found = rules(
        [
            encode(error="a\u0000b", drop=("status_code", "response_time_ms")),
            encode(probe={"deep": ["\u0000"]}),
            encode(regex_pattern="\\u0000"),  # the six characters \u0000, not a NUL: fine
        ]
    )
    assert found == [{("error", "nul_character")}, {("probe", "nul_character")}, set()]


# -- ready for the database ------------------------------------------------------------------------


def test_good_rows_go_through_to_sql() -> None:
    good, _ = run(
        [encode(), encode(error="refused", drop=("status_code", "response_time_ms", "regex_matched"))]
    )
    engine = sa.create_engine("sqlite://")
    with engine.begin() as conn:
        good.to_sql("website_metrics", conn, index=False)
        rows = conn.execute(
            sa.text("SELECT url, status_code, response_time_ms, regex_matched, error FROM website_metrics")
        )
        assert [tuple(r) for r in rows] == [
            ("https://example.com/health", 200, 123.4, 1, None),
            ("https://example.com/health", None, None, None, "refused"),
        ]


def test_good_rows_as_copy_text() -> None:
    """The COPY fast path writes the frame as COPY text: integers stay integers, NULL is \\N."""
    good, _ = run(
        [encode(), encode(error="refused", drop=("status_code", "response_time_ms", "regex_matched"))]
    )
    first, second, end = text_copy.copy_text(good).decode().split("\n")
    assert first.startswith(
        "website-metrics\t1\t100\t2026-11-28T10:00:00.000000Z\thttps://example.com/health\t200\t123.4\tok\tt\t"
    )
    assert first.endswith("\t2026-11-28T10:00:00.000000Z\t\\N\t\\N")
    assert "\t\\N\t\\N\t" in second and second.endswith("\trefused\t\\N")
    assert end == ""


url_like = st.one_of(
    st.sampled_from(
        ["https://a", "http://x.y/p?q#f", "https://a/b:c", "https://:1", "https://a@b", "https://?"]
    ),
    st.text(alphabet="htps:/?#@[]1a.\n ", max_size=16).map(lambda s: "http" + s),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(url_like, min_size=1, max_size=60))
def test_the_batch_url_check_agrees_with_the_regex(urls: list[str]) -> None:
    values = np.array(urls, dtype=object)
    expected = [checks.URL_HEAD.match(u) is not None for u in urls]
    assert checks.url_head_ok(values).tolist() == expected


def test_reject_records_are_what_to_dict_gives() -> None:
    def message(offset: int, value: bytes | None, **fields: object) -> RawMessage:
        return RawMessage("t", 0, offset, 1_795_860_000_000, None, value)._replace(**fields)

    messages = [
        message(0, b'{"url": "ftp://x"}'),
        message(1, None, timestamp_ms=None, key=b"k", headers=(("h", b"v"),)),
        message(2, b"\xff"),
        message(3, b"[1]"),
    ]
    _, rejected = validate(normalise(messages), now=NOW)
    assert len(rejected) == 4
    expected = rejected.to_dict("records")
    for row in expected:  # a time as datetime, a missing one as None
        t = row["kafka_timestamp"]
        row["kafka_timestamp"] = None if t is pd.NaT else t.to_pydatetime()
    got = records(rejected)
    assert got == expected
    assert [type(v) for r in got for v in r.values()] == [type(v) for r in expected for v in r.values()]
    assert [r["kafka_timestamp"] for r in got] == [
        datetime(2026, 11, 28, 10, 0, tzinfo=UTC),
        None,
        datetime(2026, 11, 28, 10, 0, tzinfo=UTC),
        datetime(2026, 11, 28, 10, 0, tzinfo=UTC),
    ]
    assert records(rejected.iloc[:0]) == []


def _nested(levels: int, kind: str) -> object:
    """A value that brings a message to ``levels`` nesting levels (the message object is level 1)."""
    value: object = 1
    for i in range(levels - 1):
        value = {"n": value} if (kind == "dict" or (kind == "mixed" and i % 2)) else [value]
    return value


@pytest.mark.parametrize("kind", ["dict", "list", "mixed"])
def test_nesting_up_to_the_limit_loads_one_more_level_is_too_deep(kind: str) -> None:
    """Exactly MAX_DEPTH levels load (kept in extra); MAX_DEPTH + 1 is a reject (too_deep), also when the
    deep branch is not the first value and shallow ones sit beside it."""
    from etl.normalise import MAX_DEPTH

    shallow = {"a": [1, {"b": 2}], "c": 3}
    fine = encode(region=shallow, probe=_nested(MAX_DEPTH, kind), later=[[1]])
    deep = encode(region=shallow, probe=_nested(MAX_DEPTH + 1, kind), later=[[1]])
    good, rejects = run([fine, deep])
    assert good["offset"].tolist() == [100]
    assert [(r.offset, [(e["field"], e["rule"]) for e in r.errors]) for r in rejects.itertuples()] == [
        (101, [(None, "too_deep")])
    ]


def test_checked_at_missing_or_of_another_type_names_the_field_the_rule_and_the_value() -> None:
    """What `metric-etl rejects` shows and `--rule` selects: field, rule and the value as sent."""
    _, rejects = run(
        [
            encode(drop=("checked_at",)),
            encode(checked_at=None),
            encode(checked_at=True),
            encode(checked_at=[1]),
        ]
    )
    assert [r.errors for r in rejects.itertuples()] == [
        [{"field": "checked_at", "rule": "required", "value": None}],  # absent
        [{"field": "checked_at", "rule": "required", "value": "null"}],  # sent as null
        [{"field": "checked_at", "rule": "type", "value": "true"}],
        [{"field": "checked_at", "rule": "type", "value": "[1]"}],
    ]
