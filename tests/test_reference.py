"""The fast path against a plain reference: for random messages (valid, invalid, every type of field
and encoding), :func:`etl.typed.split` (what a run calls: the typed lane, then the exact path for the
rest) gives the same good rows and the same rejects, with the same stage and the same reasons, as
tests/reference.py, which checks one message at a time with the standard library; and the same
frames, dtypes included, as :func:`etl.normalise.normalise` then :func:`etl.validate.validate` alone.

Whatever makes the fast path faster (typed decoding, column-wise checks) must keep this green.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pandas as pd
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from etl import typed
from etl.contract import FIELDS, RawMessage
from etl.normalise import normalise
from etl.typed import split
from etl.validate import validate
from tests.reference import DESCRIBED, reference

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)

TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=10)
INTS = st.integers(-(2**63), 2**63 - 1)
FLOATS = st.floats(allow_nan=True, allow_infinity=True)
SCALAR = st.none() | st.booleans() | INTS | st.floats(allow_nan=False, allow_infinity=False) | TEXT
JSON = st.recursive(
    SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3), max_leaves=6
)
WRONG = st.one_of(
    st.booleans(), INTS, FLOATS, TEXT, st.lists(SCALAR, max_size=2), st.dictionaries(TEXT, SCALAR)
)
ABSENT = st.sampled_from(["<absent>", None])

VALID_URLS = [
    "https://example.com/health",
    "http://example.com",
    "HTTPS://EXAMPLE.COM:8443/x?y=1#z",
    "https://user:pw@example.com/",
    "http://[::1]:8080/",
    "https://bücher.example/😀",
    "https://example.com/a'; DROP TABLE x;--",
]
URLS = st.one_of(
    st.sampled_from(
        [
            *VALID_URLS,
            "ftp://example.com/",
            "example.com/health",
            "https://",
            "https:///path",
            "https://example.com:port/",
            "https://exa mple.com/",
            "https://example.com/\n",
            "https://example.com/\u200b",
            "https://example.com/\x00",
            "",
            "   ",
            "https://example.com/" + "a" * 2100,
        ]
    ),
    st.builds(lambda s, path: f"{s}://{path}", st.sampled_from(["http", "https", "HtTp", "gopher"]), TEXT),
)
STATUS = st.one_of(st.integers(-5, 1000), st.sampled_from([99, 100, 599, 600, 200.0, "200", True, 10**18]))
TIMING = st.one_of(
    st.floats(-10, 1e8, allow_nan=False),
    st.integers(-5, 10**9),
    st.sampled_from([0, 0.0, 86_400_000, 86_400_000.5, -0.0, "12.5", False]),
    FLOATS,
)
ZONES = st.sampled_from(["Z", "z", "+00:00", "+02:00", "-0530", "+05", "-11:45"])
FRACTIONS = st.sampled_from(["", ".1", ".123", ".123456", ",5"])


@st.composite
def iso(draw: Any) -> str:
    moment = draw(st.datetimes(datetime(1995, 1, 1), datetime(2030, 1, 1)))
    moment = draw(
        st.sampled_from([moment, NOW.replace(tzinfo=None) + timedelta(hours=draw(st.integers(0, 60)))])
    )
    text = moment.strftime("%Y-%m-%dT%H:%M:%S") + draw(FRACTIONS)
    return text + draw(st.sampled_from([draw(ZONES), draw(ZONES), ""]))  # "": no zone


CHECKED_AT = st.one_of(
    iso(),
    st.sampled_from(
        [
            "2026-02-30T10:00:00Z",
            "1500-13-01T00:00:00Z",
            "yesterday",
            "2026-11-28",
            "Z",
            "10000-01-01T00:00:00Z",
        ]
    ),
    st.integers(0, 2 * 10**12),
    st.floats(9e8, 1.9e12),
    st.sampled_from(
        [1_764_331_200, 1_764_331_200_000, 946_684_799, 1e11, math.nan, math.inf, True, "1764331200"]
    ),
    TEXT,
)
VALUES = {
    "url": URLS,
    "status_code": STATUS,
    "response_time_ms": TIMING,
    "regex_pattern": st.one_of(TEXT, INTS, st.just("ok")),
    "regex_matched": st.one_of(st.booleans(), st.sampled_from(["true", 1, 0])),
    "checked_at": CHECKED_AT,
    "error": st.one_of(TEXT, st.sampled_from(["timeout", "", "  \t", "dns\x00fail"]), INTS),
}


@st.composite
def message_object(draw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for name in FIELDS:
        kind = draw(st.sampled_from(["good", "good", "good", "absent", "wrong"]))
        if kind == "good":
            body[name] = draw(VALUES[name])
        elif kind == "wrong":
            body[name] = draw(WRONG)
        elif (value := draw(ABSENT)) != "<absent>":
            body[name] = value
    for key, value in draw(st.dictionaries(TEXT.filter(lambda k: k not in FIELDS), JSON, max_size=3)).items():
        body[key] = value
    return body


@st.composite
def payload(draw: Any) -> bytes | None:
    """A message as its producer may have sent it: mostly JSON objects, written in several ways, or broken."""
    body = draw(message_object())
    text = json.dumps(
        body, allow_nan=True, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 2]))
    )
    how = draw(
        st.sampled_from(
            ["plain"] * 6
            + ["duplicate", "tombstone", "bad_utf8", "bom", "truncated", "blank", "array", "scalar"]
        )
    )
    data = text.encode()
    if how == "duplicate":  # a key twice (the fields' own, or a nested one)
        key = draw(st.sampled_from(["url", "status_code", "x"]))
        return data.replace(b"{", b'{"%s": 1, ' % key.encode(), 1) if len(body) else data
    if how == "tombstone":
        return None
    if how == "bad_utf8":
        at = draw(st.integers(0, len(data)))
        return data[:at] + b"\xff" + data[at:]
    if how == "bom":
        return b"\xef\xbb\xbf" + data
    if how == "truncated":
        return data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    if how == "blank":
        return draw(st.sampled_from([b"", b"  ", b"\n\t", "\u00a0".encode()]))
    if how == "array":
        return json.dumps([body], allow_nan=True).encode()
    if how == "scalar":
        return json.dumps(draw(SCALAR | FLOATS), allow_nan=True).encode()
    return data


GOOD_URLS = st.sampled_from(
    [
        *VALID_URLS,
        'https://example.com/"quoted"',
        "https://example.com/back\\slash",
        "https://example.com:port/",
        "https:///path",
        "https://example.com/\u200b",
        "https://example.com/" + "a" * 2030,
        "https://example.com/" + "a" * 2029,
    ]
)
# (forms the reference knows: a date, "T", a time; pandas reads a few more, such as a space for "T")
GOOD_TIMES = st.one_of(
    st.builds(
        lambda hours, fraction, zone: (
            (NOW + timedelta(hours=hours)).strftime("%Y-%m-%dT%H:%M:%S") + fraction + zone
        ),
        st.integers(-24 * 400, 30),
        FRACTIONS,
        st.sampled_from(["Z", "z", "+00:00", "+02:00", "-0530", ""]),
    ),
    st.sampled_from(
        [
            "2000-01-01T00:00:00Z",
            "1999-12-31T23:59:59.999999Z",
            "2026-11-29T12:00:00Z",
            "2026-11-29T12:00:00.000001Z",
            "2026-02-29T10:00:00Z",
            "2024-02-29T10:00:00Z",
            "2026-11-28T10:00Z",
        ]
    ),
    st.integers(946_684_700, 1_764_500_000),
    st.integers(1e11, 1_764_500_000_000),
    st.floats(946_684_700, 1_764_500_000),
    st.sampled_from([946_684_800, 946_684_799.9999, 1_764_417_600, 1_764_417_600.5, 99_999_999_999, 10**11]),
)
NEAR = {
    "url": st.sampled_from(["https://example.com/health", "http://a.example/x?y=1"]) | GOOD_URLS,
    # (beyond 64 bits orjson reads an integer as a float: the exact path says "type" and "range" of
    # such a status, the reference "range" only, a difference this test leaves to test_validate)
    "status_code": st.sampled_from([200, 301, 503]) | st.integers(95, 605) | st.integers(-(2**63), 2**63 - 1),
    "response_time_ms": st.one_of(
        st.sampled_from([12.5, 230.0, 7]),
        st.floats(0, 1e5),
        st.integers(0, 10**5),
        st.sampled_from([0, -0.0, -1e-9, 86_400_000, 86_400_000.0, 86_400_000.01, 1e308, 2**63 - 1]),
    ),
    "regex_pattern": st.just("ok|healthy") | st.sampled_from(["", '"q"', "\\d+", "a\u0000b", "😀"]),
    "regex_matched": st.booleans(),
    "checked_at": st.builds(
        lambda minutes: (NOW - timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
        st.integers(0, 10_000),
    )
    | GOOD_TIMES,
    "error": st.just("timeout") | st.sampled_from(["dns failure", "", " ", "\t", '"q"', "é", "a\u0000"]),
}


@st.composite
def near_valid(draw: Any) -> bytes:
    """A message that is valid or nearly so: the typed lane's cases, each field's edges, written in
    the ways producers write them (escapes, spacing, null for absent, keys in any order)."""
    body: dict[str, Any] = {"url": draw(NEAR["url"]), "checked_at": draw(NEAR["checked_at"])}
    failed = draw(st.booleans())
    optional = ["status_code", "response_time_ms", "regex_pattern", "regex_matched", "error"]
    for name in optional:
        wanted = name == "error" if failed else name != "error"
        kind = draw(
            st.sampled_from(
                ["value"] * 8 + ["null", "absent"] if wanted else ["null", "absent"] * 4 + ["value"]
            )
        )
        if kind == "value":
            body[name] = draw(NEAR[name])
        elif kind == "null":
            body[name] = None
    names = draw(st.permutations(list(body)))
    body = {k: body[k] for k in names}
    text = json.dumps(body, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, None, 2])))
    text = text.replace("\\\\", "\\")  # keep the strategy's escapes as JSON escapes
    how = draw(st.sampled_from(["plain"] * 8 + ["extra", "duplicate", "null_url", "spaces"]))
    if how == "extra":
        text = text[:-1] + ', "region": "eu"}'
    elif how == "duplicate":
        text = text[:-1] + f', "url": {json.dumps(body["url"])}}}'
    elif how == "null_url":
        text = text.replace('"url":', '"url": null, "was":', 1)
    elif how == "spaces":
        text = " \n" + text.replace(":", " : ") + "\t"
    return text.encode()


def fast(values: list[bytes | None]) -> tuple[dict[int, dict[str, Any]], dict[int, tuple[str, list[Any]]]]:
    """Good rows and rejects by offset, from the package's own path."""
    messages = [RawMessage("t", 0, i, 1_764_331_200_000, None, v) for i, v in enumerate(values)]
    good, rejects = split(messages, now=NOW)
    exact_good, exact_rejects = validate(normalise(messages), now=NOW)
    pd.testing.assert_frame_equal(good, exact_good, check_index_type=False)
    pd.testing.assert_frame_equal(rejects, exact_rejects, check_index_type=False)
    rows = {}
    for r in good.to_dict("records"):
        checked = r["checked_at"]
        rows[r["offset"]] = {
            "url": r["url"],
            "status_code": None
            if r["status_code"] is None or r["status_code"] != r["status_code"]
            else int(r["status_code"]),
            "response_time_ms": None if math.isnan(r["response_time_ms"]) else r["response_time_ms"],
            "regex_pattern": r["regex_pattern"],
            "regex_matched": None
            if r["regex_matched"] is None or r["regex_matched"] != r["regex_matched"]
            else bool(r["regex_matched"]),
            "checked_at_us": checked.value // 1000,
            "error": r["error"],
            "extra": None if r["extra"] is None else orjson.loads(r["extra"]),
        }
    out = {}
    for offset, stage, errors in zip(rejects["offset"], rejects["stage"], rejects["errors"], strict=True):
        shown = [(e["field"], e["rule"], None if e["rule"] in DESCRIBED else e["value"]) for e in errors]
        out[int(offset)] = (stage, sorted(shown, key=repr))
    return rows, out


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(values=st.lists(payload() | near_valid(), min_size=1, max_size=25))
@example(
    values=[
        b'{"url": "https://a.example", "status_code": 200, "response_time_ms": 1,'
        b' "checked_at": "2026-11-28T10:00:00Z"}'
    ]
)
@pytest.mark.parametrize("lane", ["c", "msgspec"])
def test_fast_path_matches_the_reference(lane: str, values: list[bytes | None]) -> None:
    """Both ways into the typed lane: etl.native's parser first, and msgspec alone (a host where the
    C extension was not built)."""
    built = typed.native
    typed.native = built if lane == "c" else None
    try:
        rows, rejects = fast(values)
    finally:
        typed.native = built
    for i, value in enumerate(values):
        expected = reference(RawMessage("t", 0, i, 1_764_331_200_000, None, value), NOW)
        if expected.stage is None:
            assert i in rows, (value, rejects.get(i))
            assert rows[i] == expected.row, value
        else:
            assert i in rejects, (value, expected.errors)
            stage, errors = rejects[i]
            assert (stage, errors) == (expected.stage, sorted(expected.errors, key=repr)), value
