"""What an array on the wire declares, checked before a byte of it is decoded.

Flower's ``Array`` carries ``stype``, ``dtype`` and ``shape`` beside its ``data`` (the ``np.save``
bytes). ``Array.numpy()`` decodes ``data`` into a new array whatever those fields say, so a
200 MB payload under an expected name cost its full size again before a shape check could drop
it. ``declared_problem`` compares the three fields and the payload's length with what the
receiver expects, reading no data: a reply whose declaration does not fit is refused at the cost
of a few comparisons, and one that fits is at most the size the receiver expects. The decoded
array is still checked afterwards (its header could disagree with the declaration).
"""

from __future__ import annotations

import io
import math

import numpy as np
from flwr.app import Array
from flwr.common.constant import SType


def npy_size(shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Bytes ``np.save`` writes for a C-order array of ``shape`` and ``dtype`` (header + values)."""
    header = io.BytesIO()
    fields = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    try:
        np.lib.format.write_array_header_1_0(header, fields)
    except ValueError:  # a header over 64 KiB: np.save switches to format 2.0
        header = io.BytesIO()
        np.lib.format.write_array_header_2_0(header, fields)
    return header.tell() + math.prod(shape) * dtype.itemsize


def _declared_dtype(array: Array) -> np.dtype | None:
    """The declared dtype, or None when the string names no numpy dtype."""
    try:
        return np.dtype(str(array.dtype))
    except (TypeError, ValueError, SyntaxError):
        return None


def declared_problem(
    name: str, array: Array, shape: tuple[int, ...], dtypes: tuple[str, ...] | None = ("float32",)
) -> str | None:
    """Why ``array``'s declaration is not a numpy array of ``shape`` (one of ``dtypes``; None:
    any float dtype) with a payload of exactly that size, as one line; None when it is.

    Reads ``stype``, ``dtype``, ``shape`` and ``len(data)`` only: nothing is decoded or copied.
    """
    if array.stype != SType.NUMPY:
        return f"adapter array {name!r} is serialised as {str(array.stype)[:40]!r}, expected a numpy array"
    dtype = _declared_dtype(array)
    wanted = dtype is not None and (
        str(dtype) in dtypes if dtypes is not None else np.issubdtype(dtype, np.floating)
    )
    if dtype is None or not wanted:
        expected = " or ".join(dtypes) if dtypes is not None else "a float dtype"
        return f"adapter array {name!r} has dtype {str(array.dtype)[:40]}, expected {expected}"
    declared = tuple(array.shape)
    if declared != tuple(shape):
        return f"adapter array {name!r} has shape {str(declared)[:80]}, expected {tuple(shape)}"
    expected_bytes = npy_size(tuple(shape), dtype)
    if len(array.data) != expected_bytes:
        return (
            f"adapter array {name!r} cannot be read: its payload is {len(array.data)} bytes, a {dtype} "
            f"array of shape {tuple(shape)} takes {expected_bytes}"
        )
    return None
