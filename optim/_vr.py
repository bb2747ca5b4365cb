"""Shared machinery of the variance-reduced training strategies (SVRG, SAGA).

Both evaluate minibatch gradients themselves with ``torch.autograd.grad`` from a closure that
returns the minibatch loss (no ``backward()`` in the closure), and average them across Horovod
ranks with :func:`optim.distributed.allreduce_mean_`. They therefore never depend on ``p.grad``
and stay correct whether or not they are wrapped in ``hvd.DistributedOptimizer`` (the wrapper's
own gradient allreduce is simply unused).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.optim import Optimizer

from ._utils import check_range, group_tensors
from .distributed import allreduce_mean_
from .proximal import soft_threshold_

__all__ = ["VarianceReduced"]


def _as_loss(out):
    if isinstance(out, tuple):
        return out[0], (out[1] if len(out) > 1 else None)
    return out, None


class VarianceReduced(Optimizer):
    """Base class: parameter bookkeeping, gradient evaluation and the proximal update."""

    def __init__(self, params, defaults):
        check_range("lr", defaults["lr"], 0.0, lo_open=True)
        check_range("weight_decay", defaults.get("weight_decay", 0.0), 0.0)
        check_range("l1", defaults.get("l1", 0.0), 0.0)
        super().__init__(params, defaults)

    # -- parameters ----------------------------------------------------------------------------------
    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _loss_and_grads(self, closure: Callable, params: list[torch.Tensor]):
        """Evaluate ``closure()`` and its gradient w.r.t. ``params`` (averaged across ranks)."""
        with torch.enable_grad():
            out = closure()
        loss, extra = _as_loss(out)
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            raise RuntimeError(f"{type(self).__name__}.step(closure): the closure must return the minibatch "
                               "loss as a tensor with autograd graph (and must not call backward())")
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]
        allreduce_mean_(grads, name=f"bigopt.{type(self).__name__.lower()}.grad")
        return loss.detach(), grads, extra

    def _full_gradient(self, full_grad_fn: Callable, model, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Weighted mean gradient over what ``full_grad_fn(model)`` returns: a scalar loss, or an
        iterable of losses / ``(loss, weight)`` pairs (e.g. per-batch mean loss and batch size)."""
        with torch.enable_grad():
            out = full_grad_fn(model)
            items: Iterable = [out] if isinstance(out, torch.Tensor) else out
            acc = [torch.zeros_like(p) for p in params]
            total = torch.zeros((), dtype=torch.float64)
            for item in items:
                loss, w = (item if isinstance(item, tuple) else (item, 1.0))
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for a, g in zip(acc, grads):
                    if g is not None:
                        a.add_(g.detach(), alpha=float(w))
                total += float(w)
        if float(total) <= 0:
            raise RuntimeError("full_grad_fn produced no loss (empty dataset?)")
        allreduce_mean_(acc, name=f"bigopt.{type(self).__name__.lower()}.full")
        allreduce_mean_([total], name=f"bigopt.{type(self).__name__.lower()}.weight")
        torch._foreach_div_(acc, float(total))
        return acc

    # -- update ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _apply(self, directions: dict) -> None:
        """``w <- prox_{lr*l1}(w - lr * (v + wd * w))`` per group, multi-tensor."""
        for group in self.param_groups:
            ps = [p for p in group["params"] if p in directions]
            if not ps:
                continue
            vs = [directions[p] for p in ps]
            lr, wd, l1 = group["lr"], group.get("weight_decay", 0.0), group.get("l1", 0.0)
            for _, (bp, bv) in group_tensors(ps, vs):
                if wd:
                    torch._foreach_mul_(bp, 1.0 - lr * wd)
                torch._foreach_add_(bp, bv, alpha=-lr)
                if l1:
                    soft_threshold_(bp, lr * l1)

    def _bump(self, key: str, params) -> int:
        n = 0
        for p in params:
            st = self.state[p]
            if key not in st:
                st[key] = torch.tensor(0.0)
            st[key] += 1
            n = int(st[key])
        return n
