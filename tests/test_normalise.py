"""normalise: raw Kafka messages -> one DataFrame row per message, failures kept as data."""

from __future__ import annotations

import base64
import pickle
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pytest

from etl.contract import COLUMNS, FIELDS, RawMessage
from etl.normalise import MISSING, headers_json, normalise, show

OK = {
    "url": "https://example.com/health",
    "status_code": 200,
    "response_time_ms": 123.4,
    "regex_pattern": "ok",
    "regex_matched": True,
    "checked_at": "2026-11-28T10:00:00Z",
    "error": None,
}


def message(value: object, offset: int = 0, **kw: Any) -> RawMessage:
    fields: dict[str, Any] = {
        "topic": "website-metrics",
        "partition": 2,
        "offset": offset,
        "timestamp_ms": 1_795_860_000_000,
        "key": b"site-1",
        "value": value,
    }
    fields.update(kw)
    return RawMessage(**fields)


def one(value: object, **kw: Any) -> pd.Series:
    return normalise([message(value, **kw)]).iloc[0]


def test_columns_and_dtypes() -> None:
    frame = normalise([message(orjson.dumps(OK))])
    assert tuple(frame.columns) == COLUMNS
    assert frame["partition"].dtype == np.int64
    assert frame["offset"].dtype == np.int64
    assert str(frame["kafka_timestamp"].dtype) == "datetime64[us, UTC]"
    assert frame["parsed"].dtype == bool
    others = set(COLUMNS) - {"partition", "offset", "kafka_timestamp", "parsed"}
    assert all(frame[c].dtype == object for c in others)


def test_empty_batch_gives_empty_frame_with_the_columns() -> None:
    frame = normalise([])
    assert tuple(frame.columns) == COLUMNS
    assert len(frame) == 0


def test_one_row_per_message_in_input_order() -> None:
    values = [orjson.dumps({**OK, "status_code": 200 + i}) for i in range(5)]
    values[2] = b"not json"
    frame = normalise([message(v, offset=10 + i) for i, v in enumerate(values)])
    assert frame["offset"].tolist() == [10, 11, 12, 13, 14]
    assert frame["status_code"].tolist() == [200, 201, MISSING, 203, 204]
    assert frame["payload"].tolist() == values


def test_clean_message_fields_are_the_parsed_values() -> None:
    row = one(orjson.dumps(OK))
    assert {f: row[f] for f in FIELDS} == OK
    assert type(row["regex_matched"]) is bool
    assert row["extra"] is None
    assert len(row["errors"]) == 0
    assert row["stage"] is None
    assert row["parsed"]
    assert row["payload_text"] == orjson.dumps(OK).decode()


def test_missing_key_is_told_apart_from_json_null() -> None:
    row = one(b'{"url": null, "checked_at": "2026-11-28T10:00:00Z"}')
    assert row["url"] is None
    assert row["status_code"] is MISSING
    assert row["error"] is MISSING
    assert row["extra"] is None


def test_unknown_fields_go_to_extra() -> None:
    row = one(orjson.dumps({**OK, "region": "eu", "probe": {"id": 7}}))
    assert row["extra"] == {"region": "eu", "probe": {"id": 7}}
    row = one(b'{"url": "https://e.com", "zone": "b"}')
    assert row["extra"] == {"zone": "b"}
    assert row["checked_at"] is MISSING


def test_raw_bytes_are_kept_byte_for_byte() -> None:
    value = b'{"url": "https://e.com",   "x": "\xc3\xa9"}\n'
    row = one(value)
    assert row["payload"] == value
    assert row["payload_text"] == value.decode()
    assert row["key"] == b"site-1"


def test_bytearray_and_memoryview_values_are_read_as_bytes() -> None:
    data = orjson.dumps(OK)
    for value in (bytearray(data), memoryview(data)):
        row = one(value)
        assert type(row["payload"]) is bytes
        assert row["payload"] == data
        assert row["parsed"]


def test_tombstone() -> None:
    row = one(None)
    assert row["payload"] is None
    assert row["payload_text"] is None
    assert row["stage"] == "decode"
    assert row["errors"] == [{"field": None, "rule": "tombstone", "value": None}]
    assert not row["parsed"]
    assert row["url"] is MISSING


def test_invalid_utf8_names_the_byte_and_keeps_no_text() -> None:
    row = one(b'{"url": "https://e.com/\xff"}')
    assert row["stage"] == "decode"
    assert row["payload_text"] is None
    [err] = row["errors"]
    assert err["rule"] == "invalid_utf8"
    assert err["value"] == "invalid start byte at byte 23: ff"


@pytest.mark.parametrize(
    ("value", "rule", "shown"),
    [
        (b"", "empty", None),
        (b" \n ", "empty", None),
        (b'{"url": ', "invalid_json", "unexpected end of data: line 1 column 9 (char 8)"),
        (b"[1, 2]", "not_object", "[1,2]"),
        (b'"text"', "not_object", '"text"'),
        (b"null", "not_object", "null"),
        (b"[" * 2000, "too_deep", "nested more than 64 levels"),
    ],
)
def test_text_that_is_not_a_json_object(value: bytes, rule: str, shown: str | None) -> None:
    row = one(value)
    assert row["stage"] == "json"
    assert row["errors"] == [{"field": None, "rule": rule, "value": shown}]
    assert not row["parsed"]
    assert row["payload"] == value


def test_nan_and_infinity_are_named_by_field_and_the_rest_is_still_read() -> None:
    row = one(b'{"url": "https://e.com", "response_time_ms": NaN, "score": -Infinity, "n": 1e999}')
    assert row["stage"] == "json"
    assert row["parsed"]
    assert row["url"] == "https://e.com"
    assert row["errors"] == [
        {"field": "response_time_ms", "rule": "not_finite", "value": "NaN"},
        {"field": "score", "rule": "not_finite", "value": "-Infinity"},
        {"field": "n", "rule": "not_finite", "value": "Infinity"},
    ]


def test_kafka_timestamp_is_utc_and_absent_or_absurd_ones_are_nat() -> None:
    frame = normalise(
        [
            message(b"{}", timestamp_ms=1_795_860_000_123),
            message(b"{}", timestamp_ms=None),
            message(b"{}", timestamp_ms=2**62),
        ]
    )
    stamps = frame["kafka_timestamp"]
    assert stamps.iloc[0] == pd.Timestamp("2026-11-28T10:00:00.123Z")
    assert stamps.iloc[1:].isna().all()


def test_headers_are_readable_json_and_lossless() -> None:
    raw = (
        ("trace", b"abc-1"),
        ("bin", b"\x00\xff\x10"),
        ("none", None),
        ("nul", b"a\x00b"),
        ("emoji", "🙂".encode()),
    )
    text = one(b"{}", headers=raw)["headers"]
    pairs = orjson.loads(text)
    assert pairs == [
        ["trace", "abc-1"],
        ["bin", "AP8Q", "base64"],
        ["none", None],
        ["nul", "YQBi", "base64"],
        ["emoji", "🙂"],
    ]
    decoded = tuple(
        (p[0], None if p[1] is None else base64.b64decode(p[1]) if len(p) == 3 else p[1].encode())
        for p in pairs
    )
    assert decoded == raw
    assert one(b"{}", headers=())["headers"] is None
    assert headers_json([("dup", b"1"), ("dup", b"2")]) == '[["dup","1"],["dup","2"]]'


def test_show_renders_json_and_cuts_long_values() -> None:
    assert show(MISSING) is None
    assert show(None) == "null"
    assert show("200") == '"200"'
    assert show(True) == "true"
    assert show(float("nan")) == "NaN"
    long = show("x" * 500)
    assert long is not None and len(long) == 101 and long.endswith("…")
    assert show("\ud800") == "'\\ud800'"  # lone surrogate: still text that can be stored


def test_missing_is_a_falsy_singleton_that_survives_pickling() -> None:
    assert not MISSING
    assert repr(MISSING) == "MISSING"
    assert pickle.loads(pickle.dumps(MISSING)) is MISSING


def test_a_batch_gives_the_same_rows_as_each_message_alone() -> None:
    """Clean chunks take a faster path than chunks holding a fault: the rows must not differ."""
    values: list[object] = [orjson.dumps({**OK, "status_code": 200 + i % 300}) for i in range(400)]
    values[70] = orjson.dumps({**OK, "region": "eu"})  # extra field in an otherwise clean chunk
    values[75] = orjson.dumps({k: v for k, v in OK.items() if k != "error"})
    values[130] = b"\xff"
    values[131] = None
    values[200] = b'{"url": NaN}'
    values[260] = b"[1]"
    values[399] = bytearray(b"{}")
    batch = normalise([message(v, offset=i) for i, v in enumerate(values)])
    alone = pd.concat([normalise([message(v, offset=i)]) for i, v in enumerate(values)], ignore_index=True)
    pd.testing.assert_frame_equal(batch, alone)


def test_odd_values_and_headers_never_crash() -> None:
    row = one('{"url": "https://e.com"}', headers=(("a", bytearray(b"\x01")), ("", b""), ("\u00e9", "text")))
    assert row["payload"] == b'{"url": "https://e.com"}'
    assert orjson.loads(row["headers"]) == [["a", "\x01"], ["", ""], ["\u00e9", "text"]]
