"""The rejects as the database takes them: a frame for the binary COPY, JSON rows for the INSERT
pages; JSONB cannot hold NUL, so it is spelt out.

The rejects travel as one frame, as validation makes them (:data:`etl.contract.REJECT_COLUMNS`, then
``incarnation``), from validation to the COPY. A reject made one at a time (a row the database
refused, a hand-made one) joins them through :func:`as_frame`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd


def as_frame(rejects: pd.DataFrame | list[dict[str, Any]]) -> pd.DataFrame:
    """Rejects as a frame of :data:`etl.contract.REJECT_COLUMNS` and ``incarnation``; a list of
    rejects (one dict each: a row the database refused) becomes one, absent values None and the
    incarnation 0."""
    import pandas as pd

    if isinstance(rejects, pd.DataFrame):
        return rejects
    from etl.contract import REJECT_COLUMNS

    columns: dict[str, Any] = {
        c: pd.Series([r.get(c) for r in rejects], dtype=object) for c in REJECT_COLUMNS
    }
    columns["incarnation"] = pd.Series([r.get("incarnation", 0) for r in rejects], dtype="int64")
    return pd.DataFrame(columns)


def joined(first: pd.DataFrame, second: pd.DataFrame) -> pd.DataFrame:
    """Two frames of rejects as one (an empty one adds nothing, not even its column types)."""
    import pandas as pd

    if not len(second):
        return first
    if not len(first):
        return second
    return pd.concat([first, second], ignore_index=True)


def rejects_frame(rejects: pd.DataFrame, run_id: str) -> pd.DataFrame:
    """The rejects as a frame for :func:`etl.db.write.copy_rejects`, with the values :func:`reject_rows`
    writes: ``errors`` and ``headers`` as JSON text (no headers: JSON null) with NUL spelt out (JSONB
    cannot hold it), and ``payload_text`` None where it holds a NUL (the payload keeps the bytes)."""
    import numpy as np
    import orjson
    import pandas as pd

    from etl.normalise import objects  # an object column holding the values as they are

    dumps, option = orjson.dumps, orjson.OPT_NON_STR_KEYS
    errors, headers, texts = [], [], []
    for errs, h, text in zip(
        rejects["errors"].tolist(), rejects["headers"].tolist(), rejects["payload_text"].tolist(), strict=True
    ):
        data = dumps(list(errs), option=option)
        if b"\\u0000" in data:
            data = dumps(spell_out_nul(list(errs)), option=option)
        errors.append(data.decode())
        if h is None:
            h = "null"  # JSON null, as the JSON pages store it
        else:
            if not isinstance(h, str):
                h = dumps(h, option=option).decode()
            if "\\u0000" in h:
                h = dumps(spell_out_nul(orjson.loads(h)), option=option).decode()
        headers.append(h)
        texts.append(None if text is not None and "\x00" in text else text)

    n = len(rejects)
    incarnation = (
        rejects["incarnation"].to_numpy(dtype=np.int64) if "incarnation" in rejects else np.zeros(n, np.int64)
    )
    return pd.DataFrame(
        {
            "topic": objects(rejects["topic"].tolist()),
            "partition": rejects["partition"].to_numpy(dtype=np.int64),
            "offset": rejects["offset"].to_numpy(dtype=np.int64),
            "key": objects(rejects["key"].tolist()),
            "headers": objects(headers),
            "kafka_timestamp": _utc_micros(rejects["kafka_timestamp"]),
            "payload": objects(rejects["payload"].tolist()),
            "payload_text": objects(texts),
            "stage": objects(rejects["stage"].tolist()),
            "errors": objects(errors),
            "run_id": objects([run_id] * n),
            "incarnation": incarnation,
        },
        copy=False,
    )


def _utc_micros(times: pd.Series) -> pd.Series:
    """Times (a UTC time column, or ``datetime``, ``Timestamp``, None or NaT values) as int64
    microseconds since 1970, NaT's integer where missing: the form :mod:`etl.db.copy` writes for a
    time column."""
    import numpy as np
    import pandas as pd

    stamps = pd.to_datetime(times.reset_index(drop=True), utc=True).dt.as_unit("us")
    return pd.Series(stamps.to_numpy(dtype="datetime64[us]").view(np.int64), copy=False)


def json_pages(rows: Iterable[bytes], limit: int) -> Iterator[str]:
    """JSON arrays of the given JSON rows, in order, each at most ``limit`` bytes unless one row is more."""
    page: list[bytes] = []
    size = 1  # the opening bracket; each row brings its comma or the closing bracket
    for row in rows:
        if page and size + len(row) + 1 > limit:
            yield _json_array(page)
            page, size = [], 1
        page.append(row)
        size += len(row) + 1
    if page:
        yield _json_array(page)


def _json_array(rows: list[bytes]) -> str:
    return (b"[" + b",".join(rows) + b"]").decode()


def reject_rows(rejects: Iterable[dict[str, Any]], run_id: str) -> Iterator[bytes]:
    """Each reject as a JSON array of its values in ``etl.contract.REJECT_COLUMNS`` order, then run_id
    and incarnation (0 when the reject has none)."""
    from binascii import b2a_base64

    import orjson

    dumps, option = orjson.dumps, orjson.OPT_NON_STR_KEYS
    for r in rejects:
        headers = r.get("headers")
        if isinstance(headers, str):
            headers = orjson.loads(headers)
        text = r.get("payload_text")
        if text is not None and "\x00" in text:  # PostgreSQL text cannot hold NUL; the raw bytes keep it
            text = None
        key, payload = r.get("key"), r.get("payload")
        when = _py_time(r.get("kafka_timestamp"))
        # orjson writes a UTC time as isoformat does; another zone goes as isoformat's text, which keeps
        # the seconds of an offset (orjson drops them)
        stamp = when if when is None or when.tzinfo is UTC else when.isoformat()
        row = [
            r["topic"],
            int(r["partition"]),
            int(r["offset"]),
            None if key is None else b2a_base64(key, newline=False).decode(),
            headers,
            stamp,
            None if payload is None else b2a_base64(payload, newline=False).decode(),
            text,
            r["stage"],
            list(r["errors"]),
            run_id,
            int(r.get("incarnation", 0)),
        ]
        data = dumps(row, option=option)
        if b"\\u0000" in data:  # a NUL somewhere (the check also matches a spelt-out one: harmless)
            row[4], row[9] = spell_out_nul(headers), spell_out_nul(row[9])
            data = dumps(row, option=option)
        yield data


def spell_out_nul(value: Any) -> Any:
    """JSONB cannot hold NUL characters: spell them out."""
    if isinstance(value, str):
        return value.replace("\x00", "\\u0000")
    if isinstance(value, list):
        return [spell_out_nul(v) for v in value]
    if isinstance(value, tuple):
        return [spell_out_nul(v) for v in value]
    if isinstance(value, dict):
        return {spell_out_nul(k): spell_out_nul(v) for k, v in value.items()}
    return value


def _py_time(value: Any) -> datetime | None:
    """A timestamp as a ``datetime``; None when missing or not a time."""
    if value is None or type(value) is datetime:
        return value
    import pandas as pd

    if type(value) is pd.Timestamp:  # the usual case, a column value (NaT is not a Timestamp)
        return value.to_pydatetime()
    try:
        if pd.isna(value):
            return None
        return pd.Timestamp(value).to_pydatetime()
    except (TypeError, ValueError):
        return None
