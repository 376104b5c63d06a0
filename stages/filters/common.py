"""What every filter stage does around its scorer: sort out bad input, put scores back in place.

Bad input never reaches a scorer: a row whose text is null, not valid UTF-8 (lone surrogates
included), holds NUL bytes, or is empty/whitespace gets a ``quarantine_reason``; scorers only
see valid texts and their results are scattered back to the batch's row order with nulls for
the quarantined rows. Every input row comes out exactly once, with either a decision or a
quarantine reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.stage import DROP_REASON, QUARANTINE_REASON
from stages.columns import set_column

MISSING_TEXT = "missing_text"
INVALID_UTF8 = "invalid_utf8"
NUL_BYTES = "nul_bytes"
EMPTY_TEXT = "empty_text"


@dataclass
class Prepared:
    index: np.ndarray  # row numbers (in the batch) of the valid texts
    texts: pa.Array  # the valid texts, as a plain StringArray
    quarantine: np.ndarray  # object array over the whole batch: reason or None
    num_rows: int


def _as_string_array(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.string())
    return arr


def _utf8_problems(arr: pa.Array) -> np.ndarray:
    """Rows whose bytes are not valid UTF-8 (Arrow string arrays can hold them if built unsafely)."""
    try:
        arr.validate(full=True)
        return np.zeros(len(arr), bool)
    except pa.ArrowInvalid:
        bad = np.zeros(len(arr), bool)
        for i, raw in enumerate(arr.cast(pa.binary()).to_pylist()):
            if raw is not None:
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    bad[i] = True
        return bad


def prepare(batch: pa.Table, column: str = "text") -> Prepared:
    arr = _as_string_array(batch.column(column))
    n = len(arr)
    reasons = np.full(n, None, dtype=object)
    null = arr.is_null().to_numpy(zero_copy_only=False)
    reasons[null] = MISSING_TEXT
    invalid = _utf8_problems(arr)
    reasons[invalid & ~null] = INVALID_UTF8
    if invalid.any():  # keep kernels away from the invalid bytes
        arr = pc.if_else(pa.array(invalid), pa.scalar(None, pa.string()), arr)
    ok = reasons == None  # noqa: E711
    if n:
        nul = pc.fill_null(pc.match_substring(arr, "\x00"), False).to_numpy(zero_copy_only=False)
        reasons[ok & nul] = NUL_BYTES
        ok = reasons == None  # noqa: E711
        blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(arr), ""), False).to_numpy(zero_copy_only=False)
        reasons[ok & blank] = EMPTY_TEXT
    index = np.flatnonzero(reasons == None)  # noqa: E711
    texts = arr.take(pa.array(index, pa.int64())) if len(index) != n else arr
    return Prepared(index, texts, reasons, n)


def scatter(prep: Prepared, values, dtype: pa.DataType) -> pa.Array:
    """Values for the valid rows -> a column over the whole batch (null for the others)."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = values.to_pylist() if len(prep.index) != prep.num_rows else values
        if isinstance(values, (pa.Array, pa.ChunkedArray)):
            return values.cast(dtype) if values.type != dtype else values
    if len(prep.index) == prep.num_rows:
        return pa.array(values, dtype, from_pandas=True)
    full: list = [None] * prep.num_rows
    vals = values.tolist() if isinstance(values, np.ndarray) else list(values)
    for i, v in zip(prep.index.tolist(), vals):
        full[i] = v
    return pa.array(full, dtype, from_pandas=True)


def finish(
    batch: pa.Table,
    prep: Prepared,
    columns: dict[str, tuple[object, pa.DataType]],
    drop: Optional[np.ndarray],
    text: Optional[object] = None,
) -> pa.Table:
    """Attach attribute columns, the (possibly rewritten) text, drop_reason and quarantine_reason."""
    out = batch
    if text is not None:
        out = set_column(out, "text", scatter(prep, text, pa.string()))
    for name, (values, dtype) in columns.items():
        out = set_column(out, name, scatter(prep, values, dtype))
    reasons = np.full(prep.num_rows, None, dtype=object)
    if drop is not None:
        reasons[prep.index] = drop
    out = set_column(out, DROP_REASON, pa.array(reasons.tolist(), pa.string()))
    return set_column(out, QUARANTINE_REASON, pa.array(prep.quarantine.tolist(), pa.string()))
