"""Hostile input: a corpus of fixture files named after the fault, and property-based tests.

Fixture format (``tests/data``): ``*.jsonl`` holds one message per line (the line's bytes without
the newline), ``*.bin`` is one message (the whole file, byte for byte), ``*.none`` is a tombstone
(its text only explains that). ``valid_*`` files must load; every other file is listed in
:data:`FAULTS` with the stage and the exact set of ``(field, rule)`` its messages must be rejected with.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from etl.contract import VALIDATION_STAGES as STAGES
from etl.contract import RawMessage
from etl.normalise import normalise
from etl.validate import RULES, validate

DATA = Path(__file__).parent / "data"
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)

Expected = tuple[str, set[tuple[str | None, str]]]
FAULTS: dict[str, Expected] = {
    # the bytes
    "invalid_utf8.bin": ("decode", {(None, "invalid_utf8")}),
    "invalid_utf8_overlong.bin": ("decode", {(None, "invalid_utf8")}),
    "invalid_utf8_surrogate.bin": ("decode", {(None, "invalid_utf8")}),
    "invalid_utf8_truncated.bin": ("decode", {(None, "invalid_utf8")}),
    "latin1_text.bin": ("decode", {(None, "invalid_utf8")}),
    "tombstone.none": ("decode", {(None, "tombstone")}),
    # the text
    "empty.bin": ("json", {(None, "empty")}),
    "whitespace_only.bin": ("json", {(None, "empty")}),
    "truncated_json.jsonl": ("json", {(None, "invalid_json")}),
    "not_json_text.jsonl": ("json", {(None, "invalid_json")}),
    "trailing_garbage.jsonl": ("json", {(None, "invalid_json")}),
    "two_objects.jsonl": ("json", {(None, "invalid_json")}),
    "trailing_comma.jsonl": ("json", {(None, "invalid_json")}),
    "single_quotes.jsonl": ("json", {(None, "invalid_json")}),
    "byte_order_mark.bin": ("json", {(None, "invalid_json")}),
    "raw_nul_byte.bin": ("json", {(None, "invalid_json")}),
    "lone_surrogate_escape.jsonl": ("json", {(None, "invalid_json")}),
    "json_array.jsonl": ("json", {(None, "not_object")}),
    "json_string.jsonl": ("json", {(None, "not_object")}),
    "json_number.jsonl": ("json", {(None, "not_object")}),
    "json_null.jsonl": ("json", {(None, "not_object")}),
    "json_boolean.jsonl": ("json", {(None, "not_object")}),
    "duplicate_key.jsonl": ("json", {("url", "duplicate_key")}),
    "duplicate_key_spaced.jsonl": ("json", {("url", "duplicate_key")}),
    "duplicate_key_nested.jsonl": ("json", {("region", "duplicate_key")}),
    "deeply_nested.jsonl": ("json", {(None, "too_deep")}),
    "nested_65_levels.jsonl": ("json", {(None, "too_deep")}),
    "nan_response_time.jsonl": ("json", {("response_time_ms", "not_finite")}),
    "infinity_status_code.jsonl": ("json", {("status_code", "not_finite"), ("status_code", "type")}),
    "huge_exponent.jsonl": ("json", {("response_time_ms", "not_finite")}),
    "nan_in_extra.jsonl": ("json", {("score", "not_finite")}),
    # read leniently, the key holds a lone surrogate: named storably, and extra cannot be JSON text
    "nan_under_lone_surrogate_key.jsonl": ("json", {("\\ud800", "not_finite"), ("extra", "invalid_json")}),
    # url
    "missing_url.jsonl": ("schema", {("url", "required")}),
    "null_url.jsonl": ("schema", {("url", "required")}),
    "url_not_string.jsonl": ("schema", {("url", "type")}),
    "url_as_object.jsonl": ("schema", {("url", "type")}),
    "url_empty.jsonl": ("schema", {("url", "empty")}),
    "url_ftp_scheme.jsonl": ("schema", {("url", "url_scheme")}),
    "url_without_scheme.jsonl": ("schema", {("url", "url_scheme")}),
    "url_javascript.jsonl": ("schema", {("url", "url_scheme")}),
    "url_without_host.jsonl": ("schema", {("url", "url_host")}),
    "url_bad_port.jsonl": ("schema", {("url", "url_host")}),
    "url_2049_chars.jsonl": ("schema", {("url", "url_length")}),
    "url_with_space.jsonl": ("schema", {("url", "url_chars")}),
    "url_with_newline.jsonl": ("schema", {("url", "url_chars")}),
    "url_with_control_character.jsonl": ("schema", {("url", "url_chars")}),
    "url_with_zero_width_space.jsonl": ("schema", {("url", "url_chars")}),
    # checked_at
    "missing_checked_at.jsonl": ("schema", {("checked_at", "required")}),
    "null_checked_at.jsonl": ("schema", {("checked_at", "required")}),
    "timestamp_without_zone.jsonl": ("schema", {("checked_at", "timezone")}),
    "date_only.jsonl": ("schema", {("checked_at", "timezone")}),
    "timestamp_not_a_date.jsonl": ("schema", {("checked_at", "timestamp_format")}),
    "timestamp_year_0.jsonl": ("schema", {("checked_at", "timestamp_range")}),
    "timestamp_year_10000.jsonl": ("schema", {("checked_at", "timestamp_range")}),
    "timestamp_before_2000.jsonl": ("schema", {("checked_at", "timestamp_range")}),
    "timestamp_far_future.jsonl": ("schema", {("checked_at", "timestamp_range")}),
    "timestamp_year_with_5000_digits.jsonl": ("schema", {("checked_at", "timestamp_range")}),
    "timestamp_month_13.jsonl": ("schema", {("checked_at", "timestamp_format")}),
    "timestamp_as_boolean.jsonl": ("schema", {("checked_at", "type")}),
    "timestamp_as_list.jsonl": ("schema", {("checked_at", "type")}),
    "epoch_microseconds.jsonl": ("schema", {("checked_at", "timestamp_range")}),
    "epoch_negative.jsonl": ("schema", {("checked_at", "timestamp_range")}),
    "epoch_zero.jsonl": ("schema", {("checked_at", "timestamp_range")}),
    # status, timing, error, regex
    "status_as_string.jsonl": ("schema", {("status_code", "type")}),
    "status_as_float.jsonl": ("schema", {("status_code", "type")}),
    "status_as_boolean.jsonl": ("schema", {("status_code", "type")}),
    "status_zero.jsonl": ("schema", {("status_code", "range")}),
    "status_999.jsonl": ("schema", {("status_code", "range")}),
    "status_u64_max.jsonl": ("schema", {("status_code", "range")}),
    # orjson reads integers beyond 64 bits as floats: not an integer, and out of range
    "status_huge_integer.jsonl": ("schema", {("status_code", "type"), ("status_code", "range")}),
    "response_time_negative.jsonl": ("schema", {("response_time_ms", "range")}),
    "response_time_absurd.jsonl": ("schema", {("response_time_ms", "range")}),
    "response_time_as_string.jsonl": ("schema", {("response_time_ms", "type")}),
    "response_time_as_boolean.jsonl": ("schema", {("response_time_ms", "type")}),
    "status_without_response_time.jsonl": ("schema", {("response_time_ms", "required")}),
    "neither_status_nor_error.jsonl": ("schema", {(None, "status_or_error")}),
    "nulls_instead_of_status_and_error.jsonl": ("schema", {(None, "status_or_error")}),
    "error_empty_string.jsonl": ("schema", {("error", "empty")}),
    "error_whitespace_only.jsonl": ("schema", {("error", "empty")}),
    "error_not_string.jsonl": ("schema", {("error", "type")}),
    "regex_matched_as_string.jsonl": ("schema", {("regex_matched", "type")}),
    "regex_matched_as_number.jsonl": ("schema", {("regex_matched", "type")}),
    "regex_pattern_not_string.jsonl": ("schema", {("regex_pattern", "type")}),
    # NUL characters
    "nul_character.jsonl": ("schema", {("error", "nul_character")}),
    "nul_character_in_url.jsonl": ("schema", {("url", "nul_character"), ("url", "url_chars")}),
    "nul_character_in_regex_pattern.jsonl": ("schema", {("regex_pattern", "nul_character")}),
    "nul_character_in_extra_key.jsonl": ("schema", {("re\\u0000gion", "nul_character")}),
    "nul_character_in_extra_nested.jsonl": ("schema", {("probe", "nul_character")}),
    # every failed rule of a message is listed, not only the first
    "many_faults.jsonl": (
        "schema",
        {
            ("url", "url_scheme"),
            ("url", "url_chars"),
            ("status_code", "type"),
            ("response_time_ms", "range"),
            ("regex_pattern", "type"),
            ("regex_matched", "type"),
            ("checked_at", "timezone"),
            ("error", "empty"),
        },
    ),
}
VALID = sorted(p.name for p in DATA.glob("valid_*"))


def read_fixture(name: str) -> list[bytes | None]:
    """The messages a fixture file holds (see the module docstring for the format)."""
    path = DATA / name
    if path.suffix == ".none":
        return [None]
    if path.suffix == ".bin":
        return [path.read_bytes()]
    return [line for line in path.read_bytes().split(b"\n") if line]


def run(values: list[bytes | None], **kw: object) -> tuple[pd.DataFrame, pd.DataFrame]:
    messages = [RawMessage("website-metrics", 0, i, 1_795_860_000_000, b"k", v) for i, v in enumerate(values)]
    return validate(normalise(messages), now=NOW)


def rules_of(errors: list[dict[str, object]]) -> set[tuple[object, object]]:
    return {(e["field"], e["rule"]) for e in errors}


def test_the_corpus_covers_at_least_40_faults_and_every_file_is_listed() -> None:
    files = {p.name for p in DATA.iterdir()}
    assert len(FAULTS) >= 40
    assert files == set(FAULTS) | set(VALID)
    assert len(VALID) >= 5


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_fault_is_rejected_with_its_rules_and_raw_bytes(name: str) -> None:
    stage, expected = FAULTS[name]
    values = read_fixture(name)
    good, rejects = run(values)
    assert good.empty
    assert len(rejects) == len(values)
    for value, reject in zip(values, rejects.itertuples(), strict=True):
        assert rules_of(reject.errors) == expected
        assert reject.stage == stage
        assert reject.payload == value  # byte for byte
        assert reject.key == b"k"
        orjson.dumps(reject.errors)  # valid UTF-8 throughout: storable as JSONB
        for err in reject.errors:
            assert err["rule"] in RULES
            assert err["value"] is None or (isinstance(err["value"], str) and len(err["value"]) <= 101)


@pytest.mark.parametrize("name", VALID)
def test_valid_fixture_loads(name: str) -> None:
    values = read_fixture(name)
    good, rejects = run(values)
    assert rejects.empty, rejects["errors"].tolist()
    assert len(good) == len(values)


def test_the_whole_corpus_in_one_batch_keeps_each_message_with_its_own_reasons() -> None:
    names = sorted(FAULTS) + VALID
    values: list[bytes | None] = []
    origin: list[str] = []
    for name in names:
        for value in read_fixture(name):
            values.append(value)
            origin.append(name)
    good, rejects = run(values)
    assert len(good) + len(rejects) == len(values)
    assert set(good["offset"]).isdisjoint(rejects["offset"])
    for reject in rejects.itertuples():
        name = origin[reject.offset]
        assert name in FAULTS
        assert reject.payload == values[reject.offset]
        assert (reject.stage, rules_of(reject.errors)) == FAULTS[name]
    assert {origin[o] for o in good["offset"]} == set(VALID)


def test_one_mib_messages_never_crash() -> None:
    base = orjson.loads(read_fixture("valid_success.jsonl")[0] or b"")
    big_extra = orjson.dumps({**base, "body": "x" * (1 << 20)})
    big_url = orjson.dumps({**base, "url": "https://example.com/" + "a" * (1 << 20)})
    garbage = b"{" * (1 << 20)
    good, rejects = run([big_extra, big_url, garbage])
    assert good["offset"].tolist() == [0]
    assert len(good["extra"].iloc[0]) > 1 << 20
    by_offset = {r.offset: r for r in rejects.itertuples()}
    assert rules_of(by_offset[1].errors) == {("url", "url_length")}
    assert by_offset[1].errors[0]["value"].endswith("…")
    assert by_offset[2].stage == "json"
    assert by_offset[2].payload == garbage


def test_emoji_and_sql_looking_text_are_stored_as_sent() -> None:
    values = read_fixture("valid_sql_looking_strings.jsonl") + read_fixture("valid_emoji.jsonl")
    good, _ = run(values)
    assert good["regex_pattern"].iloc[0] == "'; DROP TABLE website_metrics; --"
    assert good["error"].iloc[0] == "1' OR '1'='1"
    assert good["url"].iloc[2] == "https://example.com/\U0001f600"
    assert good["error"].iloc[2] == "\U0001f525 partial outage"


# -- property-based ----------------------------------------------------------------------------------

VALID_MESSAGE = {
    "url": "https://example.com/health",
    "status_code": 200,
    "response_time_ms": 12.5,
    "regex_pattern": None,
    "regex_matched": None,
    "checked_at": "2026-11-28T10:00:00Z",
    "error": None,
}


def json_values(ints: st.SearchStrategy[int], floats: st.SearchStrategy[float]) -> st.SearchStrategy[object]:
    return st.recursive(
        st.none() | st.booleans() | ints | floats | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
        max_leaves=8,
    )


def near_misses(values: st.SearchStrategy[object]) -> st.SearchStrategy[bytes]:
    """Valid messages with fields replaced, added or dropped: the near misses real producers send."""
    return st.builds(
        lambda changes, dropped: json.dumps(
            {k: v for k, v in {**VALID_MESSAGE, **changes}.items() if k not in dropped}
        ).encode(),
        st.dictionaries(st.sampled_from([*VALID_MESSAGE, "extra", "x\x00", ""]), values, max_size=3),
        st.sets(st.sampled_from(list(VALID_MESSAGE)), max_size=2),
    )


# anything json.dumps writes, huge integers and Infinity included
loose = near_misses(json_values(st.integers(), st.floats()))
# values that must come back exactly (integers of any size orjson can read; no NaN or Infinity)
exact = near_misses(
    json_values(
        st.integers(min_value=-(10**300), max_value=10**300), st.floats(allow_nan=False, allow_infinity=False)
    )
)
payloads = st.one_of(st.none(), st.binary(max_size=300), loose)
headers = st.lists(
    st.tuples(st.text(max_size=10), st.one_of(st.none(), st.binary(max_size=20))), max_size=3
).map(tuple)


def check_partition(values: list[bytes | None], good: pd.DataFrame, rejects: pd.DataFrame) -> None:
    """Every message is in exactly one output, good rows are loadable, rejects say why."""
    assert sorted([*good["offset"], *rejects["offset"]]) == list(range(len(values)))
    assert good["url"].map(type).eq(str).all()
    assert good["checked_at"].notna().all()
    # Each good row is a successful check (a status code) or a failed one (an error text), row by row.
    assert (good["status_code"].notna() | good["error"].notna()).all()
    for reject in rejects.itertuples():
        assert reject.stage in STAGES
        assert reject.errors
        assert all(e["rule"] in RULES for e in reject.errors)
        assert reject.payload == values[reject.offset]
        orjson.dumps(reject.errors)  # storable as JSONB text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(payloads, max_size=40), st.lists(headers, min_size=40, max_size=40), st.binary(max_size=8))
def test_any_bytes_land_in_exactly_one_output(
    values: list[bytes | None], header_sets: list[tuple[tuple[str, bytes | None], ...]], key: bytes
) -> None:
    messages = [
        RawMessage(
            "website-metrics",
            i % 3,
            i,
            None if i % 5 == 0 else 1_795_860_000_000,
            key or None,
            v,
            header_sets[i],
        )
        for i, v in enumerate(values)
    ]
    frame = normalise(messages)
    good, rejects = validate(frame, now=NOW)
    check_partition(values, good, rejects)
    assert (frame["headers"].isna() == [not h for h in header_sets[: len(values)]]).all()


@settings(max_examples=200, deadline=None)
@given(st.lists(exact, min_size=1, max_size=30))
def test_good_rows_hold_exactly_what_was_sent(values: list[bytes]) -> None:
    good, rejects = run(list(values))
    check_partition(list(values), good, rejects)
    for row in good.itertuples():
        sent = json.loads(values[row.offset])
        assert row.url == sent["url"]
        assert row.error == sent.get("error")
        assert row.regex_pattern == sent.get("regex_pattern")
        extra = {k: v for k, v in sent.items() if k not in VALID_MESSAGE}
        assert (json.loads(row.extra) if row.extra is not None else {}) == extra
