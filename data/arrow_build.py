"""Arrow arrays from Python lists without pyarrow's first-call pandas import.

``pa.array`` imports pandas the first time it runs: pyarrow 26 probes every input for pandas types, and has
no switch to skip the probe. That import costs 0.2 s, a fifteenth of a 3 s indexer start-up, so the
start-up path (planning, the work list, catalog lookups) builds its arrays from buffers instead. Values the
buffer path does not handle (nulls, nested or temporal types) go through ``pa.array`` as before.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa

_FIXED = {pa.int8(): np.int8, pa.int16(): np.int16, pa.int32(): np.int32, pa.int64(): np.int64,
          pa.uint8(): np.uint8, pa.uint16(): np.uint16, pa.uint32(): np.uint32, pa.uint64(): np.uint64,
          pa.float32(): np.float32, pa.float64(): np.float64}


def strings(values: Sequence[str], type: pa.DataType = pa.string()) -> pa.Array:
    """A ``string`` or ``large_string`` array of ``values`` (no nulls), built from an offsets and a data buffer."""
    enc = [v.encode("utf-8") for v in values]
    off = np.zeros(len(enc) + 1, np.int64 if pa.types.is_large_string(type) else np.int32)
    if enc:
        lengths = np.fromiter(map(len, enc), np.int64, len(enc))
        if off.dtype == np.int32 and int(lengths.sum()) >= 2**31:
            raise OverflowError(f"{int(lengths.sum())} bytes of strings do not fit a 32-bit string array; "
                                "use pa.large_string()")
        np.cumsum(lengths, out=off[1:])
    return pa.Array.from_buffers(type, len(enc), [None, pa.py_buffer(off), pa.py_buffer(b"".join(enc))])


def infer_type(values) -> pa.DataType | None:
    """The type ``pa.array`` infers for a list of one kind of Python scalar (str, bool, int, float); None
    otherwise. numpy scalars count as their Python kind, so they widen to 64 bits (pyarrow keeps ``float32``)."""
    kinds = {bool if isinstance(v, (bool, np.bool_)) else int if isinstance(v, (int, np.integer)) else
             float if isinstance(v, (float, np.floating)) else str if isinstance(v, str) else object for v in values}
    if len(kinds) != 1:
        return None
    return {str: pa.string(), bool: pa.bool_(), int: pa.int64(), float: pa.float64()}.get(kinds.pop())


def column(values, type: pa.DataType | None = None) -> pa.Array:
    """``pa.array(values, type)`` for strings, booleans and fixed-width numbers, without importing pandas.

    Args:
        values: a list (or numpy array) of Python values of ``type``.
        type: the Arrow type of the column; None infers it as ``pa.array`` does for a list of one kind of
            Python scalar (str, bool, int, float; see ``infer_type``) and leaves anything else to ``pa.array``.

    Returns:
        The array; equal to ``pa.array(values, type)``.

    Raises:
        TypeError, ValueError, OverflowError: as ``pa.array`` or numpy would, for values that do not fit ``type``.

    Example:
        >>> column(["a", "b"], pa.string()).to_pylist()
        ['a', 'b']
    """
    if type is None:
        type = infer_type(values)
        if type is None:
            return pa.array(values)
    if isinstance(values, np.ndarray) and values.dtype == object or \
            not isinstance(values, np.ndarray) and any(v is None for v in values):
        return pa.array(values, type)  # nulls need a validity bitmap: pyarrow's own path
    if pa.types.is_string(type) or pa.types.is_large_string(type):
        if all(isinstance(v, str) for v in values):
            return strings(values, type)
        return pa.array(values, type)
    if pa.types.is_boolean(type):
        arr = np.asarray(values) if len(values) else np.zeros(0, np.bool_)
        if arr.dtype != np.bool_:
            return pa.array(values, type)
        return pa.Array.from_buffers(type, len(arr), [None, pa.py_buffer(np.packbits(arr, bitorder="little"))])
    dtype = _FIXED.get(type)
    if dtype is None:
        return pa.array(values, type)
    arr = np.asarray(values) if len(values) else np.zeros(0, dtype)
    if arr.dtype.kind not in "biuf" or (arr.dtype.kind == "f" and np.dtype(dtype).kind != "f"):
        return pa.array(values, type)  # let pyarrow raise its own error (or convert) for mixed or float->int input
    if arr.size and np.dtype(dtype).kind in "iu" and (arr.min() < np.iinfo(dtype).min or arr.max() > np.iinfo(dtype).max):
        raise OverflowError(f"values {arr.min()}..{arr.max()} do not fit {type}")
    return pa.Array.from_buffers(type, len(arr), [None, pa.py_buffer(np.ascontiguousarray(arr, dtype))])


def values(arr: pa.Array) -> np.ndarray:
    """A numpy view of a fixed-width numeric Arrow array without nulls (``arr.to_numpy()`` imports pandas)."""
    dtype = _FIXED.get(arr.type)
    if dtype is None or arr.null_count:
        return arr.to_numpy(zero_copy_only=False)
    return np.frombuffer(arr.buffers()[1], dtype, len(arr), arr.offset * np.dtype(dtype).itemsize)
