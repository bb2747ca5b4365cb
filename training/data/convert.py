"""Arrow columns -> torch tensors, without a Python loop over rows.

* numeric / bool scalar column            -> 1-D tensor ``(n,)``
* fixed-length list (``list``, ``large_list`` where every row has the same length, or
  ``fixed_size_list``)                    -> 2-D tensor ``(n, k)``
* variable-length list                    -> error, unless ``pad=(max_len, value)`` is given:
  then ``(n, max_len)``, longer rows truncated, shorter ones filled with ``value``.

Numeric arrays without nulls are wrapped zero-copy (``torch.frombuffer`` over the Arrow
buffer, which the tensor keeps alive); a cast to another ``dtype`` is the only copy.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

_ARROW_TO_TORCH: dict[pa.DataType, torch.dtype] = {
    pa.float16(): torch.float16,
    pa.float32(): torch.float32,
    pa.float64(): torch.float64,
    pa.int8(): torch.int8,
    pa.int16(): torch.int16,
    pa.int32(): torch.int32,
    pa.int64(): torch.int64,
    pa.uint8(): torch.uint8,
    pa.bool_(): torch.bool,
}
# no (fully supported) torch counterpart: widen
_WIDEN: dict[pa.DataType, pa.DataType] = {
    pa.uint16(): pa.int32(),
    pa.uint32(): pa.int64(),
    pa.uint64(): pa.int64(),
}

_STR_DTYPES = {
    "float16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
    "float32": torch.float32, "float": torch.float32, "float64": torch.float64, "double": torch.float64,
    "int8": torch.int8, "int16": torch.int16, "int32": torch.int32, "int": torch.int32,
    "int64": torch.int64, "long": torch.int64, "uint8": torch.uint8, "bool": torch.bool,
}


class UnsupportedColumnError(TypeError):
    """A column that cannot become a dense tensor (strings, nested lists, ragged lists, nulls)."""


def torch_dtype(d: torch.dtype | str | np.dtype | None) -> torch.dtype | None:
    if d is None or isinstance(d, torch.dtype):
        return d
    if isinstance(d, str):
        key = d.removeprefix("torch.")
        if key in _STR_DTYPES:
            return _STR_DTYPES[key]
    return torch.from_numpy(np.empty(0, dtype=np.dtype(d))).dtype


def element_type(t: pa.DataType) -> pa.DataType:
    """The scalar type of a column: itself, or the value type of a (one-level) list."""
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return t.value_type
    return t


def _scalar_arrow_type(t: pa.DataType, column: str) -> pa.DataType:
    """The Arrow type the values are cast to before wrapping (temporal -> int64 etc.)."""
    if t in _ARROW_TO_TORCH:
        return t
    if t in _WIDEN:
        return _WIDEN[t]
    if pa.types.is_timestamp(t) or pa.types.is_date64(t) or pa.types.is_duration(t) or pa.types.is_time64(t):
        return pa.int64()
    if pa.types.is_date32(t) or pa.types.is_time32(t):
        return pa.int32()
    raise UnsupportedColumnError(f"column {column!r} has type {t}, which has no tensor counterpart")


def default_torch_dtype(t: pa.DataType, column: str = "?") -> torch.dtype:
    """The torch dtype a column of Arrow type ``t`` becomes when no ``dtypes`` entry is given."""
    et = element_type(t)
    if pa.types.is_list(et) or pa.types.is_large_list(et) or pa.types.is_fixed_size_list(et) or pa.types.is_struct(et):
        raise UnsupportedColumnError(f"column {column!r} is nested deeper than one list level ({t})")
    return _ARROW_TO_TORCH[_scalar_arrow_type(et, column)]


def _flat_to_tensor(arr: pa.Array, column: str, fill_null: Any) -> torch.Tensor:
    """A flat (non-list) Arrow array -> 1-D tensor, zero-copy where possible."""
    if arr.null_count:
        if fill_null is None:
            raise UnsupportedColumnError(
                f"column {column!r} has {arr.null_count} null value(s); fill them upstream or pass fill_null="
            )
        arr = pc.fill_null(arr, pa.scalar(fill_null).cast(arr.type))
    target = _scalar_arrow_type(arr.type, column)
    if target != arr.type:
        arr = arr.cast(target)
    n = len(arr)
    dt = _ARROW_TO_TORCH[target]
    if n == 0:
        return torch.empty((0,), dtype=dt)
    if dt is torch.bool:  # bit-packed in Arrow: one unpacking copy
        return torch.from_numpy(arr.to_numpy(zero_copy_only=False))
    itemsize = target.bit_width // 8
    return torch.frombuffer(arr.buffers()[1], dtype=dt, count=n, offset=arr.offset * itemsize)


def _ragged_pad(offs: np.ndarray, values: torch.Tensor, n: int, max_len: int, value: Any) -> torch.Tensor:
    """Vectorized ragged -> dense ``(n, max_len)``: truncate long rows, fill short ones."""
    vals = values.numpy()
    out = np.full((n, max_len), value, dtype=vals.dtype)
    lens = np.minimum(np.diff(offs), max_len)
    total = int(lens.sum())
    if total:
        rows = np.repeat(np.arange(n), lens)
        pos = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens)
        src = np.repeat(offs[:-1] - offs[0], lens) + pos
        out[rows, pos] = vals[src]
    return torch.from_numpy(out)


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` through numpy where possible: single-threaded, so it never stalls on
    an oversubscribed CPU the way torch's intra-op thread pool can."""
    if t.dtype == dtype:
        return t
    try:
        np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        return torch.from_numpy(t.numpy().astype(np_dtype))
    except TypeError:  # bfloat16 etc.: no numpy counterpart
        return t.to(dtype)


def column_to_tensor(
    arr: pa.Array | pa.ChunkedArray,
    column: str = "?",
    dtype: torch.dtype | None = None,
    pad: tuple[int, Any] | None = None,
    fill_null: Any = None,
) -> torch.Tensor:
    """One Arrow column -> one tensor (see module doc)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    t = arr.type
    n = len(arr)
    if pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
        if arr.null_count:
            raise UnsupportedColumnError(f"list column {column!r} has {arr.null_count} null row(s)")
        if pa.types.is_list(t.value_type) or pa.types.is_large_list(t.value_type) or pa.types.is_fixed_size_list(t.value_type):
            raise UnsupportedColumnError(f"column {column!r} is nested deeper than one list level ({t})")
        values = _flat_to_tensor(arr.flatten(), column, fill_null)
        if pa.types.is_fixed_size_list(t):
            k = t.list_size
            out = values.view(n, k)
            if pad is not None and pad[0] != k:
                out = _ragged_pad(np.arange(n + 1, dtype=np.int64) * k, values, n, int(pad[0]), pad[1])
        else:
            offs = arr.offsets.to_numpy()
            lens = np.diff(offs)
            k = int(lens[0]) if n else 0
            if n and (lens != k).any():
                if pad is None:
                    raise UnsupportedColumnError(
                        f"list column {column!r} has rows of different lengths ({int(lens.min())}..{int(lens.max())}); "
                        f"pass pad={{{column!r}: (max_len, pad_value)}} to pad/truncate them"
                    )
                out = _ragged_pad(offs, values, n, int(pad[0]), pad[1])
            elif pad is not None and pad[0] != k:
                out = _ragged_pad(offs, values, n, int(pad[0]), pad[1])
            else:
                out = values.view(n, k)
    else:
        out = _flat_to_tensor(arr, column, fill_null)
    if dtype is not None and out.dtype != dtype:
        out = cast(out, dtype)
    return out


def table_to_tensors(
    table: pa.Table,
    columns: list[str] | None = None,
    dtypes: Mapping[str, torch.dtype] | None = None,
    pad: Mapping[str, tuple[int, Any]] | None = None,
    fill_null: Any = None,
) -> dict[str, torch.Tensor]:
    """Every (or the named) column(s) of an Arrow table -> ``{name: tensor}``."""
    dtypes = dtypes or {}
    pad = pad or {}
    names = columns if columns is not None else table.column_names
    return {
        c: column_to_tensor(table.column(c), c, dtypes.get(c), pad.get(c), fill_null) for c in names
    }
