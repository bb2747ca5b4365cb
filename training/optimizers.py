"""Optimizer and LR-schedule construction for the loop - the one place that talks to ``optim/``.

``build_optimizer`` uses the project's registry (``from optim import build_optimizer``) when it
exists and knows the name, and falls back to ``torch.optim`` by name otherwise, so the loop
never depends on which of the two is present.

Names understood by the fallback: ``sgd``, ``momentum`` (SGD, momentum 0.9), ``nesterov``,
``adagrad``, ``adam``, ``adamw``, ``sparse_adam``, ``rmsprop``, plus ``lars``/``lamb`` from
``optim/`` when importable.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import torch

log = logging.getLogger(__name__)

# optimizer name -> may its parameters receive sparse (COO) gradients?
_SPARSE_OK = {"sgd", "momentum", "nesterov", "adagrad", "sparse_adam"}


def supports_sparse(name: str, weight_decay: float = 0.0) -> bool:
    """Whether ``torch.optim``'s implementation accepts sparse embedding gradients."""
    return name.lower() in _SPARSE_OK and not weight_decay


def _torch_optimizer(name: str, params: Iterable, lr: float, weight_decay: float, hp: dict[str, Any]):
    n = name.lower()
    o = torch.optim
    if n == "sgd":
        return o.SGD(params, lr=lr, weight_decay=weight_decay, **hp)
    if n == "momentum":
        return o.SGD(params, lr=lr, weight_decay=weight_decay, **{"momentum": 0.9, **hp})
    if n == "nesterov":
        return o.SGD(params, lr=lr, weight_decay=weight_decay, **{"momentum": 0.9, "nesterov": True, **hp})
    if n == "adagrad":
        return o.Adagrad(params, lr=lr, weight_decay=weight_decay, **hp)
    if n == "adam":
        return o.Adam(params, lr=lr, weight_decay=weight_decay, **hp)
    if n == "adamw":
        return o.AdamW(params, lr=lr, weight_decay=weight_decay, **hp)
    if n == "sparse_adam":
        return o.SparseAdam(params, lr=lr, **hp)
    if n == "rmsprop":
        return o.RMSprop(params, lr=lr, weight_decay=weight_decay, **hp)
    if n == "lars":
        from optim.lars import LARS  # noqa: PLC0415

        return LARS(params, lr=lr, weight_decay=weight_decay, **hp)
    if n == "lamb":
        from optim.lamb import LAMB  # noqa: PLC0415

        return LAMB(params, lr=lr, weight_decay=weight_decay, **hp)
    raise ValueError(
        f"unknown optimizer {name!r}: sgd, momentum, nesterov, adagrad, adam, adamw, sparse_adam, rmsprop, lars, lamb"
    )


def build_optimizer(
    name: str, model: torch.nn.Module, *, lr: float, weight_decay: float = 0.0, params: dict[str, Any] | None = None
) -> torch.optim.Optimizer:
    hp = dict(params or {})
    try:
        from optim import build_optimizer as registry  # noqa: PLC0415
    except ImportError:
        registry = None
    if registry is not None:
        try:
            return registry(name, model.parameters(), lr=lr, weight_decay=weight_decay, **hp)
        except (KeyError, NotImplementedError) as e:
            log.debug("optim registry has no %s (%s); using torch.optim", name, e)
    return _torch_optimizer(name, model.parameters(), lr, weight_decay, hp)


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the base LR after ``step`` optimizer steps: linear warmup, then decay."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, max(0.0, (step - warmup_steps) / span))
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - t)
    if schedule == "step":  # x0.1 at 50% and 75% of the post-warmup steps
        return 1.0 if t < 0.5 else 0.1 if t < 0.75 else 0.01
    raise ValueError(f"unknown scheduler {schedule!r}: constant, cosine, linear, step")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    name: str,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` (its ``state_dict`` is plain ints/floats: checkpoint-safe)."""
    lr_factor(0, total_steps=total_steps, warmup_steps=warmup_steps, schedule=name)  # validate the name
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, total_steps=total_steps, warmup_steps=warmup_steps, schedule=name, min_ratio=min_lr_ratio),
    )
