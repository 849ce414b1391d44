"""COPY's text format: a DataFrame as the body of a ``COPY ... FROM STDIN`` in text form, for a frame
that has no exact binary form (:mod:`etl.db.copy` sends it). Pure: no database here."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

NULL = "\\N"  # COPY's NULL marker (text format escapes a backslash in a value, so no clash)


def times_as_text(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with each datetime column as its COPY text (None where missing), other columns as they are.

    The text is what :func:`copy_text` writes for the datetime column, and COPY reads it into the same
    ``timestamp`` or ``timestamptz`` value.
    """
    import numpy as np
    import pandas as pd

    times = [i for i, dtype in enumerate(frame.dtypes) if pd.api.types.is_datetime64_any_dtype(dtype)]
    if not times:
        return frame
    out = frame.copy(deep=False)
    for i in times:
        texts, missing = _time_texts(frame.iloc[:, i])
        values = np.array(texts, dtype=object)
        values[missing] = None
        out.isetitem(i, pd.Series(values, index=frame.index, dtype=object, copy=False))
    return out


def copy_text(frame: pd.DataFrame) -> bytes:
    """The frame as the body of a ``COPY ... FROM STDIN`` in text format (UTF-8, one line per row).

    Each column is turned into its field texts in one vectorised pass (timestamps by numpy, not one
    ``strftime`` per value), then the rows are joined. In text format a backslash in a value is
    escaped, so ``\\N`` stays NULL and the text ``\\N`` stays text: no value needs a slower path.
    """
    if frame.empty:
        return b""
    fields = [_copy_fields(frame.iloc[:, i]) for i in range(frame.shape[1])]
    return ("\n".join(map("\t".join, zip(*fields, strict=True))) + "\n").encode()


# COPY text format: backslash starts an escape; tab, newline and carriage return are delimiters.
COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_SEPARATOR = "\x00"  # joins a column's texts to escape them in one pass (PostgreSQL text holds no NUL)


def _copy_fields(series: pd.Series) -> list[str]:
    """One column as COPY text fields, in row order; ``\\N`` for a missing value."""
    import numpy as np
    import pandas as pd

    dtype = series.dtype
    if pd.api.types.is_datetime64_any_dtype(dtype):
        stamps, missing = _time_texts(series)
        for i in np.flatnonzero(missing).tolist():
            stamps[i] = NULL
        return stamps
    missing = series.isna().to_numpy()
    if pd.api.types.is_bool_dtype(dtype):
        out = np.where(series.to_numpy(dtype=bool, na_value=False), "t", "f").astype(object)
    elif pd.api.types.is_integer_dtype(dtype):
        out = int_texts(series.to_numpy(dtype=np.int64, na_value=0))
    elif pd.api.types.is_float_dtype(dtype):
        # repr is the shortest text that reads back as the same double; NaN is a missing value
        out = np.array(
            list(map(repr, series.to_numpy(dtype=np.float64, na_value=np.nan).tolist())), dtype=object
        )
    else:
        texts = series.to_numpy(dtype=object).tolist()
        if missing.any():
            texts = ["" if m else v for v, m in zip(texts, missing.tolist(), strict=True)]
        if set(map(type, texts)) - {str}:
            texts = [v if type(v) is str else str(v) for v in texts]
        out = np.array(escaped(texts), dtype=object)
    out[missing] = NULL
    return out.tolist()


def _time_texts(series: pd.Series) -> tuple[list[str], np.ndarray]:
    """A datetime column as ISO texts to the microsecond, UTC (``Z``) when the column has a zone, naive
    otherwise; and where it is missing (NaT, whose text is left as numpy writes it)."""
    import numpy as np
    import pandas as pd

    values = series.to_numpy(dtype="datetime64[us]")  # UTC when the column has a zone
    zone: Literal["UTC", "naive"] = "UTC" if isinstance(series.dtype, pd.DatetimeTZDtype) else "naive"
    return np.datetime_as_string(values, unit="us", timezone=zone).tolist(), np.isnat(values)


def int_texts(values: np.ndarray) -> np.ndarray:
    """int64 values as decimal texts (an object array). A column of few distinct values (a status
    code, a partition) looks each value up in the texts of its range instead of formatting each one."""
    import numpy as np

    if len(values):
        low, high = int(values.min()), int(values.max())
        if high - low < len(values) // 2:
            return np.array(list(map(str, range(low, high + 1))), dtype=object)[values - low]
    return np.array(list(map(str, values.tolist())), dtype=object)


def escaped(texts: list[str]) -> list[str]:
    """Texts with COPY's escapes: the column is scanned once, and escaped in one pass when it needs it."""
    whole = _SEPARATOR.join(texts)
    if "\\" not in whole and "\t" not in whole and "\n" not in whole and "\r" not in whole:
        return texts
    if whole.count(_SEPARATOR) != len(texts) - 1:  # a value holds the separator: escape one by one
        return [v.translate(COPY_ESCAPES) for v in texts]
    escaped = whole.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return escaped.split(_SEPARATOR)
