"""Minimal Horovod awareness for optimizers that reduce tensors other than gradients.

``hvd.DistributedOptimizer`` averages ``p.grad`` before ``step()``; everything computed from the
averaged gradient (layer-wise norms, Shampoo statistics) is then identical on every rank. A few
methods need *other* tensors averaged too -- Sophia's Hessian estimates, the SVRG snapshot
gradient, the gradient-noise-scale statistics -- and use :func:`allreduce_mean_` for it. When
Horovod is not imported/initialised, or runs with one process, these helpers are no-ops, so the
optimizers never import Horovod themselves.
"""

from __future__ import annotations

import sys

import torch

__all__ = ["world_size", "allreduce_mean_", "synchronize_grads"]


def _hvd():
    hvd = sys.modules.get("horovod.torch")
    if hvd is None:
        return None
    try:
        if not hvd.is_initialized():
            return None
    except Exception:  # pragma: no cover - old horovod without is_initialized
        return None
    return hvd


def world_size() -> int:
    hvd = _hvd()
    return int(hvd.size()) if hvd is not None else 1


def allreduce_mean_(tensors: list[torch.Tensor], name: str = "bigopt.optim") -> list[torch.Tensor]:
    """Average ``tensors`` in place across Horovod ranks (no-op for a single process)."""
    hvd = _hvd()
    if hvd is None or hvd.size() == 1 or not tensors:
        return tensors
    dense = [t for t in tensors if not t.is_sparse]
    if dense:
        hvd.grouped_allreduce_(dense, name=name, op=hvd.Average)
    return tensors


def synchronize_grads(optimizer) -> None:
    """If ``optimizer`` is a ``hvd.DistributedOptimizer``, finish the pending gradient allreduces.

    Leaves the optimizer ready for an ordinary ``step()`` (no "synchronize() before step()" warning).
    """
    sync = getattr(optimizer, "synchronize", None)
    if sync is not None and hasattr(optimizer, "_handles"):
        sync()
        optimizer._synchronized = False
