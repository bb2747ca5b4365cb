"""Small helpers shared by the optimizers in this package.

Every own optimizer keeps *all* of its hyperparameters in ``param_groups`` (never in instance
attributes). ``hvd.DistributedOptimizer`` re-creates the optimizer as
``cls(optimizer.param_groups)`` and would silently reset anything stored elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

__all__ = [
    "check_range",
    "check_betas",
    "group_tensors",
    "collect",
    "param_name",
    "foreach_ok",
]


def check_range(name: str, value: float, lo: float = 0.0, hi: float = math.inf, *, lo_open=False, hi_open=False):
    """Raise a ValueError with the valid interval when ``value`` is outside it."""
    if isinstance(value, torch.Tensor):
        value = float(value)
    bad_lo = value <= lo if lo_open else value < lo
    bad_hi = value >= hi if hi_open else value > hi
    if not isinstance(value, (int, float)) or math.isnan(value) or bad_lo or bad_hi:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ValueError(f"invalid {name}={value!r}: expected a number in {lb}{lo}, {hi}{rb}")


def check_betas(betas: Sequence[float], n: int = 2, name: str = "betas"):
    if len(betas) != n:
        raise ValueError(f"invalid {name}={betas!r}: expected {n} values in [0, 1)")
    for i, b in enumerate(betas):
        check_range(f"{name}[{i}]", b, 0.0, 1.0, hi_open=True)


def foreach_ok(params: Iterable[torch.Tensor], flag: bool | None) -> bool:
    """Multi-tensor path unless disabled explicitly (works on CPU and CUDA, dense tensors)."""
    if flag is False:
        return False
    return True


def collect(group: dict[str, Any], state, keys: Sequence[str]):
    """Parameters with a gradient in ``group`` and the per-parameter state tensors named ``keys``.

    Returns ``(indices, params, grads, [state lists...])`` where indices are positions in
    ``group['params']`` (used to look up ``param_names`` for diagnostics).
    """
    idx, params, grads = [], [], []
    states: list[list[torch.Tensor]] = [[] for _ in keys]
    for i, p in enumerate(group["params"]):
        if p.grad is None:
            continue
        idx.append(i)
        params.append(p)
        grads.append(p.grad)
        st = state[p]
        for lst, k in zip(states, keys):
            lst.append(st[k])
    return idx, params, grads, states


def group_tensors(*tensor_lists: list[torch.Tensor]):
    """Bucket parallel tensor lists by (device, dtype) so each bucket can use torch._foreach_*.

    Yields ``(index_list, lists)``; index_list maps bucket positions back to input positions.
    """
    if not tensor_lists or not tensor_lists[0]:
        return
    grouped = _group_tensors_by_device_and_dtype([list(t) for t in tensor_lists], with_indices=True)
    for (_device, _dtype), (lists, indices) in grouped.items():
        yield indices, lists


def param_name(group: dict[str, Any], i: int, group_index: int) -> str:
    names = group.get("param_names")
    if names is not None and i < len(names):
        return names[i]
    return f"group{group_index}.param{i}"
