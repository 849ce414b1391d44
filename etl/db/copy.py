"""COPY: a DataFrame as the body of PostgreSQL's ``COPY ... FROM STDIN`` in binary form, and the COPY
itself, binary or text (:func:`to_sql`; the text body is :mod:`etl.db.text_copy`'s).

Binary COPY sends each value in the server's own representation: the server does not parse a
timestamp or a float from text, and the client builds each fixed-width column with one numpy cast
instead of formatting value by value. Each column is encoded for the SQL type of the column it goes
into (:func:`codec_for`); a frame with a column it cannot encode exactly (a type without a codec, an
integer out of the column's range, a naive time for a ``timestamptz``) gets ``None`` from
:func:`encoder`, and the caller sends it as text instead.

The encoders are pure: only :func:`to_sql` and :func:`run_copy` talk to the database. The binary
format is that of PostgreSQL's documentation, "COPY: Binary Format": a header, then per row a 16-bit
field count and per field a 32-bit length (-1 for NULL) and the bytes, all big-endian, then a 16-bit -1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from etl.db.text_copy import copy_text, times_as_text

try:
    import etl.native as native
except ImportError:  # built without a C compiler: the numpy encoder
    native = None  # type: ignore[assignment]

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    from sqlalchemy.engine import Connection

HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags 0, header extension length 0
TRAILER = b"\xff\xff"
_PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01 in microseconds since 1970: PostgreSQL's time zero
_NAT = -(2**63)  # numpy's NaT as an int64

# (lengths, data): lengths[i] is the byte length of row i's value, -1 for NULL; data is an (n, width)
# uint8 matrix for a fixed-width column, or every non-NULL value's bytes back to back for a text one.
Encoded = tuple["np.ndarray", "np.ndarray"]
Codec = Callable[["pd.Series"], Encoded]


def codec_for(sql_type: Any, dtype: Any) -> Codec | None:
    """How to encode a column of ``dtype`` for a column of SQLAlchemy type ``sql_type``; None if
    binary COPY cannot take it exactly (the caller then uses text COPY)."""
    import pandas as pd
    from sqlalchemy import types as t
    from sqlalchemy.dialects.postgresql import JSONB

    if isinstance(sql_type, JSONB):
        return _jsonb if _is_text(dtype) else None
    if isinstance(sql_type, t.JSON):
        return None  # json's binary form is its text, but nothing here writes one: keep it simple
    if isinstance(sql_type, t.Boolean):
        return _bool if pd.api.types.is_bool_dtype(dtype) else None
    if isinstance(sql_type, t.Integer):  # SmallInteger and BigInteger are Integers too
        if pd.api.types.is_integer_dtype(dtype) and not pd.api.types.is_unsigned_integer_dtype(dtype):
            dtype_name = f">i{_width(sql_type)}"
            return lambda s: _int(s, dtype_name)
        return None
    if isinstance(sql_type, t.Float):  # Double is a Float; a 4-byte REAL is not encoded
        return _double if pd.api.types.is_float_dtype(dtype) and _is_double(sql_type) else None
    if isinstance(sql_type, t.DateTime):
        if str(dtype) == "int64":
            return _micros  # a time column already as integers: see times_as_micros
        if not pd.api.types.is_datetime64_any_dtype(dtype):
            return None
        aware = isinstance(dtype, pd.DatetimeTZDtype)
        # a timestamptz needs the instant (an aware column); a timestamp takes the UTC wall time, as
        # text COPY writes it; a naive column into a timestamptz depends on the session's zone: text
        return _time if aware or not sql_type.timezone else None
    if isinstance(sql_type, (t.Text, t.String)) and not isinstance(sql_type, t.Enum):
        return _text if _is_text(dtype) else None
    if isinstance(sql_type, t.LargeBinary):
        return _bytea if pd.api.types.is_object_dtype(dtype) else None
    return None


def encoder(frame: pd.DataFrame, sql_types: list[Any]) -> Callable[[pd.DataFrame], bytes] | None:
    """A function turning row slices of ``frame`` into binary COPY rows (wrap them in :data:`HEADER`
    and :data:`TRAILER`), or None when a column has no exact binary form: a type without a codec, or
    an integer out of its column's range (text COPY then lets the server refuse those rows alone)."""
    codecs = _codecs(frame, sql_types)
    if codecs is None:
        return None

    def rows(part: pd.DataFrame) -> bytes:
        return encode_rows([codec(part.iloc[:, i]) for i, codec in enumerate(codecs)])

    return rows


def _codecs(frame: pd.DataFrame, sql_types: list[Any]) -> list[Codec] | None:
    """Each column's codec, or None when one has no exact binary form (see :func:`encoder`)."""
    codecs = [codec_for(sql_type, dtype) for sql_type, dtype in zip(sql_types, frame.dtypes, strict=True)]
    ready = [c for c in codecs if c is not None]
    if len(ready) < len(codecs) or not _integers_fit(frame, sql_types):
        return None
    return ready


def stream(frame: pd.DataFrame, sql_types: list[Any], rows: int = 5_000) -> Iterator[bytes] | None:
    """The binary COPY body of ``frame`` in pieces of ``rows`` rows, or None (see :func:`encoder`).

    Each column is encoded once, whole (a few numpy operations a column); the rows of each piece
    are laid out when it is asked for, so a piece is laid out while the server stores the one
    before it.
    """
    codecs = _codecs(frame, sql_types)
    if codecs is None:
        return None
    columns = [_Sliceable(codec(frame.iloc[:, i])) for i, codec in enumerate(codecs)]

    def pieces() -> Iterator[bytes]:
        yield HEADER
        for start in range(0, len(frame), rows):
            stop = min(start + rows, len(frame))
            yield encode_rows([column.rows(start, stop) for column in columns])
        yield TRAILER

    return pieces()


class _Sliceable:
    """A column's (lengths, data), from which the (lengths, data) of a range of rows is cut."""

    def __init__(self, encoded: Encoded) -> None:
        import numpy as np

        self.lengths, self.data = encoded
        if self.data.ndim == 1:  # text: where each row's bytes start in the blob
            self.starts = np.zeros(len(self.lengths) + 1, dtype=np.int64)
            np.cumsum(np.maximum(self.lengths, 0), out=self.starts[1:])

    def rows(self, start: int, stop: int) -> Encoded:
        if self.data.ndim == 2:
            return self.lengths[start:stop], self.data[start:stop]
        return self.lengths[start:stop], self.data[self.starts[start] : self.starts[stop]]


def _integers_fit(frame: pd.DataFrame, sql_types: list[Any]) -> bool:
    """Every integer column's values fit the width of its SQL type."""
    import pandas as pd
    from sqlalchemy import types as t

    for i, sql_type in enumerate(sql_types):
        if isinstance(sql_type, t.Integer) and len(frame):
            column = frame.iloc[:, i]
            low, high = column.min(), column.max()  # missing when every value is
            limit = 2 ** (8 * _width(sql_type) - 1)
            if not pd.isna(low) and not (-limit <= int(low) and int(high) < limit):
                return False
    return True


def _width(sql_type: Any) -> int:
    from sqlalchemy import types as t

    return 2 if isinstance(sql_type, t.SmallInteger) else 8 if isinstance(sql_type, t.BigInteger) else 4


def encode_rows(columns: list[Encoded]) -> bytes:
    """Binary COPY rows (no header or trailer) from each column's (lengths, data): etl.native's
    loop in C where it was built, else :func:`encode_rows_numpy`, which gives the same bytes."""
    if native is not None:
        return native.encode_rows(columns)
    return encode_rows_numpy(columns)


def encode_rows_numpy(columns: list[Encoded]) -> bytes:
    """Binary COPY rows (no header or trailer) from each column's (lengths, data), with numpy.

    A run of adjacent columns whose values all have one length in these rows (a column without
    NULLs of a fixed-width type, text of one length such as a topic or a run id, a column all NULL)
    is one block of the same bytes in every row, laid out as an (n, width) matrix and written with
    one scatter; the other columns are written one by one.
    """
    import numpy as np

    n = len(columns[0][0])
    if n == 0:
        return b""
    count = np.full(n, len(columns), dtype=">i2").view(np.uint8).reshape(n, 2)
    parts: list[np.ndarray | Encoded] = [count]  # a block (an (n, width) matrix) or a column
    for lengths, data in columns:
        first = int(lengths[0])
        if not (lengths == first).all():
            parts.append((lengths, data))
            continue
        cells: list[np.ndarray] = [np.full(n, first, dtype=">i4").view(np.uint8).reshape(n, 4)]
        if first > 0:
            cells.append(data if data.ndim == 2 else data.reshape(n, first))
        previous = parts[-1]
        if isinstance(previous, np.ndarray):  # the run goes on: one block
            parts.pop()
            cells.insert(0, previous)
        parts.append(np.concatenate(cells, axis=1) if len(cells) > 1 else cells[0])
    sizes = np.zeros(n, dtype=np.int64)
    for part in parts:
        sizes += part.shape[1] if isinstance(part, np.ndarray) else 4 + np.maximum(part[0], 0)
    starts = np.zeros(n, dtype=np.int64)
    np.cumsum(sizes[:-1], out=starts[1:])
    out = np.empty(int(sizes.sum()), dtype=np.uint8)
    at = starts
    for part in parts:
        if isinstance(part, np.ndarray):
            _put(out, at, part)
            at = at + part.shape[1]
            continue
        lengths, data = part
        _put(out, at, lengths.astype(">i4").view(np.uint8).reshape(n, 4))
        at = at + 4
        size = np.maximum(lengths, 0)
        if data.ndim == 2:  # fixed width: the present values' bytes
            present = lengths >= 0
            _put(out, at[present], data[present])
        elif len(data):  # text: each value's bytes from the column's blob
            sources = np.zeros(n, dtype=np.int64)
            np.cumsum(size[:-1], out=sources[1:])
            out[np.repeat(at - sources, size) + np.arange(len(data))] = data
        at = at + size
    return out.tobytes()


def _put(out: np.ndarray, at: np.ndarray, values: np.ndarray) -> None:
    """Write row i of the (n, width) ``values`` at ``out[at[i]:at[i] + width]``."""
    import numpy as np

    if len(at):
        out[at[:, None] + np.arange(values.shape[1])] = values


# -- codecs: a Series to (lengths, data) ----------------------------------------------------------


def _fixed(values: np.ndarray, missing: np.ndarray, dtype: str) -> Encoded:
    import numpy as np

    data = np.ascontiguousarray(values.astype(dtype))
    width = data.dtype.itemsize
    lengths = np.full(len(data), width, dtype=np.int64)
    lengths[missing] = -1
    return lengths, data.view(np.uint8).reshape(len(data), width)


def _int(series: pd.Series, dtype: str) -> Encoded:
    """Big-endian integers of ``dtype``'s width (the caller checked that they fit)."""
    import numpy as np

    return _fixed(series.to_numpy(dtype=np.int64, na_value=0), series.isna().to_numpy(), dtype)


def _double(series: pd.Series) -> Encoded:
    import numpy as np

    values = series.to_numpy(dtype=np.float64, na_value=np.nan)
    return _fixed(values, np.isnan(values), ">f8")  # NaN is a missing value, as in text COPY


def _bool(series: pd.Series) -> Encoded:
    return _fixed(series.to_numpy(dtype=bool, na_value=False), series.isna().to_numpy(), "u1")


def _time(series: pd.Series) -> Encoded:
    """Microseconds since 2000-01-01: UTC for an aware column, the wall time of a naive one."""
    import numpy as np

    return _since_2000(series.to_numpy(dtype="datetime64[us]").view(np.int64))  # UTC with a zone


def _micros(series: pd.Series) -> Encoded:
    """A time column already as int64 microseconds since 1970 (see :func:`times_as_micros`)."""
    import numpy as np

    return _since_2000(series.to_numpy(dtype=np.int64))


def _since_2000(micros: np.ndarray) -> Encoded:
    """Microseconds since 1970 (NaT's integer when missing) as PostgreSQL's: since 2000-01-01."""
    return _fixed(micros - _PG_EPOCH_US, micros == _NAT, ">i8")


def times_as_micros(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with each datetime column as int64 microseconds since 1970 (UTC for a column with a
    zone; NaT's integer where missing), the other columns as they are: a form that costs nothing to
    carry through ``DataFrame.to_sql``, which would build a ``datetime`` per value, and that
    :func:`encoder` writes exactly as it writes the datetime column for a timestamp column."""
    import numpy as np
    import pandas as pd

    times = [i for i, dtype in enumerate(frame.dtypes) if pd.api.types.is_datetime64_any_dtype(dtype)]
    if not times:
        return frame
    out = frame.copy(deep=False)
    for i in times:
        micros = frame.iloc[:, i].to_numpy(dtype="datetime64[us]").view(np.int64)
        out.isetitem(i, pd.Series(micros, index=frame.index, copy=False))
    return out


def _text(series: pd.Series) -> Encoded:
    return _utf8(series, "")


def _jsonb(series: pd.Series) -> Encoded:
    return _utf8(series, "\x01")  # jsonb's binary form: version 1, then the JSON text


def _utf8(series: pd.Series, prefix: str) -> Encoded:
    """Each present value's UTF-8 bytes after ``prefix``; a value that is not text as its ``str``, as
    text COPY writes it.

    A lone surrogate goes as the bytes Python would write for it: the server refuses them as invalid
    UTF-8, so the row is isolated like any other value the database refuses.
    """
    import numpy as np

    values = series.to_numpy(dtype=object)
    try:  # the usual column: None for missing, text otherwise (a pd.NA raises TypeError)
        missing = values == None if series.dtype == object else None  # noqa: E711 (elementwise)
    except TypeError:
        missing = None
    if missing is None:  # a string dtype, or pd.NA
        missing = series.isna().to_numpy()
    texts = (values[~missing] if missing.any() else values).tolist()
    try:
        whole = "".join(texts)
    except TypeError:  # NaN (missing too), or a value that is not text: as its str
        missing = series.isna().to_numpy()
        texts = [v if type(v) is str else str(v) for v in (values[~missing] if missing.any() else values)]
        whole = "".join(texts)
    if texts and texts.count(texts[0]) == len(texts):  # one value throughout: a topic, a run id
        one = (prefix + texts[0]).encode("utf-8", "surrogatepass")
        sizes = np.full(len(texts), len(one), dtype=np.int64)
        blob = one * len(texts)
    elif whole.isascii():  # the usual case: one encode, and a value's length in bytes is its length
        if prefix and texts:
            whole = prefix + prefix.join(texts)  # each value after its prefix
        sizes = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)) + len(prefix)
        blob = whole.encode("ascii")
    else:
        encoded = [(prefix + v).encode("utf-8", "surrogatepass") for v in texts]
        sizes = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        blob = b"".join(encoded)
    lengths = np.full(len(missing), -1, dtype=np.int64)
    lengths[~missing] = sizes
    return lengths, np.frombuffer(blob, dtype=np.uint8)


def _bytea(series: pd.Series) -> Encoded:
    """Each present value's bytes as they are (``bytea``'s binary form); None is NULL.

    A value that is not bytes-like raises TypeError, as it has no exact ``bytea`` form.
    """
    import numpy as np

    values = series.to_numpy(dtype=object).tolist()
    present = [v if type(v) is bytes else memoryview(v).tobytes() for v in values if v is not None]
    lengths = np.full(len(values), -1, dtype=np.int64)
    lengths[[v is not None for v in values]] = np.fromiter(
        map(len, present), dtype=np.int64, count=len(present)
    )
    return lengths, np.frombuffer(b"".join(present), dtype=np.uint8)


def _is_text(dtype: Any) -> bool:
    import pandas as pd

    return pd.api.types.is_object_dtype(dtype) or pd.api.types.is_string_dtype(dtype)


def _is_double(sql_type: Any) -> bool:
    """A Float PostgreSQL stores in 8 bytes: ``Double``, ``Float()``, ``Float(precision=25)`` and up."""
    from sqlalchemy import types as t

    precision = getattr(sql_type, "precision", None)
    return not isinstance(sql_type, t.REAL) and (precision is None or precision > 24)


# -- the COPY, binary or text ---------------------------------------------------------------------


def body(frame: pd.DataFrame, table: Any) -> list[bytes] | None:
    """The binary COPY body that :func:`to_sql` sends for ``frame`` into ``table``, made ahead of the
    COPY (pure: a run makes it on the thread that reads, while the load before it runs); None when
    ``frame`` has no binary form."""
    pieces = stream(times_as_micros(frame), [table.c[str(name)].type for name in frame.columns])
    return None if pieces is None else list(pieces)


def to_sql(
    conn: Connection,
    table: Any,
    frame: pd.DataFrame,
    ahead: list[bytes] | None = None,
    *,
    copying: Callable[[], object] | None = None,
) -> None:
    """Append ``frame`` to ``table`` with ``DataFrame.to_sql``: its ``method`` is one COPY on PostgreSQL,
    batched INSERTs elsewhere; ``ahead`` is ``frame``'s :func:`body` when it was made ahead.
    ``copying`` is called as the COPY starts (after pandas' own work on the frame).

    On PostgreSQL the COPY is binary (:func:`encoder`) when every column has an exact binary form
    for its column of ``table``, and text otherwise. ``to_sql`` converts every column to Python
    objects before it calls the method, which the COPY methods do not use (they encode
    ``pd_table.frame`` column by column); the dear part is a ``datetime`` per timestamp, so the time
    columns go in already in the form the method writes: microseconds for binary
    (:func:`times_as_micros`), COPY text for text (:func:`times_as_text`). Elsewhere the
    frame goes in as it is.
    """
    from functools import partial

    method: Any = None
    types = [table.c[str(name)].type for name in frame.columns]
    if conn.dialect.name == "postgresql":
        if ahead is not None or encoder(frame, types) is not None:
            frame, method = times_as_micros(frame), partial(_binary_copy_method, table, ahead, copying)
        else:
            frame, method = times_as_text(frame), partial(_copy_method, copying)
    frame.to_sql(
        table.name,
        conn,
        schema=table.schema,
        if_exists="append",
        index=False,
        method=method,
        chunksize=None if method else 5000,
        # The table's own types: pandas would otherwise infer one from each column's values
        dtype=dict(zip(map(str, frame.columns), types, strict=True)),
    )


def _copy_method(
    copying: Callable[[], object] | None, pd_table: Any, conn: Connection, keys: list[str], data_iter: Any
) -> int:
    """``to_sql`` method: the whole frame in one ``COPY ... FROM STDIN`` (text format)."""
    if copying is not None:
        copying()
    return copy_frame(conn, pd_table.table, pd_table.frame[list(keys)])


def _binary_copy_method(
    table: Any,
    ahead: list[bytes] | None,
    copying: Callable[[], object] | None,
    pd_table: Any,
    conn: Connection,
    keys: list[str],
    data_iter: Any,
) -> int:
    """``to_sql`` method: the whole frame in one ``COPY ... FROM STDIN (FORMAT binary)``: the body made
    ahead (:func:`body`), or each column encoded now for its column of ``table``."""
    if copying is not None:
        copying()
    if ahead is not None:
        return run_copy(conn, table, list(keys), CopyStream(iter(ahead)), " (FORMAT binary)")
    frame = pd_table.frame[list(keys)]
    pieces = stream(frame, [table.c[key].type for key in keys])
    if pieces is None:  # to_sql checked the frame; only a changed frame can get here
        raise ValueError(f"the frame has no binary COPY form for {table.name}")
    return run_copy(conn, table, list(keys), CopyStream(pieces), " (FORMAT binary)")


def run_copy(conn: Connection, table: Any, columns: list[str], stream: Any, options: str = "") -> int:
    """``COPY table (columns) FROM STDIN`` with ``options``, reading ``stream``; the rows copied."""
    preparer = conn.dialect.identifier_preparer
    target = preparer.format_table(table)
    names = ", ".join(preparer.quote(c) for c in columns)
    dbapi = conn.connection.driver_connection
    with dbapi.cursor() as cur:  # type: ignore[union-attr]
        cur.copy_expert(f"COPY {target} ({names}) FROM STDIN{options}", stream)
        return int(cur.rowcount)


def copy_frame(conn: Connection, table: Any, frame: pd.DataFrame) -> int:
    """``COPY table (columns) FROM STDIN`` in text format, the frame serialised column by column.

    The rows go in slices: the server parses and indexes one slice (on another core) while the next
    is serialised, instead of waiting for the whole text.
    """
    slices = (copy_text(frame.iloc[i : i + 5_000]) for i in range(0, len(frame), 5_000))
    return run_copy(conn, table, [str(c) for c in frame.columns], CopyStream(slices))


class CopyStream:
    """A file for ``copy_expert`` whose ``read`` hands over the next piece, encoded when asked for."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._pieces = pieces

    def read(self, size: int = -1) -> bytes:
        return next(self._pieces, b"")  # psycopg2 sends whatever comes back; empty ends the COPY
