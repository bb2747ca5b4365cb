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


def split_by_step(steps: Sequence[float], indices: Sequence[int], *lists: list[torch.Tensor]):
    """Split one ``group_tensors`` bucket by step count (``steps[indices[j]]``): yields ``(t, lists)``.

    Bias corrections depend on each parameter's own step; a parameter whose gradient was ``None``
    on some steps lags behind the others. When all steps agree (the usual case) the bucket is
    yielded whole, so the multi-tensor fast path is unchanged.
    """
    ts = [steps[i] for i in indices]
    if all(t == ts[0] for t in ts):
        yield ts[0], lists
        return
    for t in dict.fromkeys(ts):
        sel = [j for j, x in enumerate(ts) if x == t]
        yield t, tuple([lst[j] for j in sel] for lst in lists)


def bump_steps(states) -> None:
    """``state['step'] += 1`` for many parameters in one multi-tensor call."""
    steps = [st["step"] for st in states]
    if steps:
        torch._foreach_add_(steps, 1.0)


def param_name(group: dict[str, Any], i: int, group_index: int) -> str:
    names = group.get("param_names")
    if names is not None and i < len(names):
        return names[i]
    return f"group{group_index}.param{i}"


# -- fused Adam direction ---------------------------------------------------------------------------
_FUSED_ADAM = getattr(torch, "_fused_adam_", None)
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_fused_broken = False


def _fused_ok(tensors: list[torch.Tensor]) -> bool:
    if _FUSED_ADAM is None or _fused_broken or not tensors:
        return False
    t = tensors[0]
    return t.device.type in ("cpu", "cuda") and t.dtype in _FUSED_DTYPES


def adam_direction_(out: list[torch.Tensor], grads, exp_avgs, exp_avg_sqs, step: float, beta1: float,
                    beta2: float, eps: float, *, maximize: bool = False, bias_correction: bool = True) -> None:
    """Adam moment update plus its direction, in place, for one (device, dtype) bucket::

        m <- b1 m + (1-b1) g;   v <- b2 v + (1-b2) g^2;   out <- m_hat / (sqrt(v_hat) + eps)

    ``step`` is the (already incremented) step count used for the bias corrections. Uses torch's
    fused multi-tensor Adam kernel (one pass over g, m, v, out) by running it on ``out`` zeroed
    with ``lr = -1``; falls back to in-place ``torch._foreach_*`` ops (no allocations) when the
    kernel is unavailable for the device/dtype.
    """
    global _fused_broken
    t_eff = float(step) if bias_correction else 1e12  # b**1e12 == 0: bias corrections become 1
    if _fused_ok(out):
        steps = [torch.full((), t_eff, dtype=torch.float32, device=out[0].device)] * len(out)
        torch._foreach_zero_(out)
        try:
            _FUSED_ADAM(out, list(grads), list(exp_avgs), list(exp_avg_sqs), [], steps, amsgrad=False, lr=-1.0,
                        beta1=beta1, beta2=beta2, weight_decay=0.0, eps=eps, maximize=maximize,
                        grad_scale=None, found_inf=None)
            return
        except (RuntimeError, TypeError):  # pragma: no cover - kernel signature/dtype not supported here
            _fused_broken = True
    g = torch._foreach_neg(grads) if maximize else grads
    bc1 = 1.0 - beta1**t_eff
    bc2_sqrt = math.sqrt(1.0 - beta2**t_eff)
    torch._foreach_lerp_(exp_avgs, g, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, g, g, 1.0 - beta2)
    torch._foreach_copy_(out, exp_avg_sqs)
    torch._foreach_sqrt_(out)
    torch._foreach_add_(out, eps * bc2_sqrt)      # sqrt(v) + eps*sqrt(bc2) = sqrt(bc2) (sqrt(v_hat) + eps)
    torch._foreach_reciprocal_(out)
    torch._foreach_mul_(out, exp_avgs)
    torch._foreach_mul_(out, bc2_sqrt / bc1)      # = m_hat / (sqrt(v_hat) + eps)


class ScratchBuffers:
    """Persistent per-parameter work buffers: allocating a fresh parameter-sized tensor every step
    costs page faults that dominate a memory-bound optimizer step on CPU. Not part of state_dict."""

    def __init__(self):
        self._bufs: dict = {}

    def get(self, p: torch.Tensor, tag: str = "u") -> torch.Tensor:
        key = (p, tag)
        b = self._bufs.get(key)
        if b is None or b.shape != p.shape or b.dtype != p.dtype or b.device != p.device:
            b = torch.empty_like(p, memory_format=torch.contiguous_format)
            self._bufs[key] = b
        return b

    def put(self, p: torch.Tensor, tag: str, buf: torch.Tensor) -> None:
        self._bufs[(p, tag)] = buf

    def many(self, params, tag: str = "u") -> list[torch.Tensor]:
        return [self.get(p, tag) for p in params]

    def clear(self) -> None:
        self._bufs.clear()

    def __deepcopy__(self, memo):
        return ScratchBuffers()

    def __getstate__(self):
        return {"_bufs": {}}


class TrustRatioLogging:
    """Per-layer trust ratios of the last step, for layer-adaptive optimizers (LARS, LAMB).

    The optimizer stores ``self._last_trust[name] = trust`` (a 0-d tensor) while stepping;
    reading them costs one device sync, only when the training loop asks."""

    _last_trust: dict[str, torch.Tensor]

    def trust_ratios(self) -> dict[str, float]:
        """Per-layer trust ratios of the last step (adapted tensors only)."""
        if not self._last_trust:
            return {}
        names = list(self._last_trust)
        vals = torch.stack([self._last_trust[n].detach().float().reshape(()) for n in names]).cpu().tolist()
        return dict(zip(names, vals))

    def diagnostics(self) -> dict[str, float]:
        """Flat ``{metric: value}`` for the training loop's logger (trust ratios and their summary)."""
        tr = self.trust_ratios()
        out = {f"trust_ratio/{k}": v for k, v in tr.items()}
        if tr:
            vals = list(tr.values())
            out["trust_ratio/min"] = min(vals)
            out["trust_ratio/mean"] = sum(vals) / len(vals)
            out["trust_ratio/max"] = max(vals)
        return out


def eval_closure(closure):
    """The torch.optim closure convention: re-evaluate the loss (with grad enabled) if given."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
