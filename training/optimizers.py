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

# optimizers whose own update accepts sparse (COO) gradients (without weight decay) with the
# maths of the dense one. Not momentum/nesterov: exact momentum decays every row of the buffer at
# every step (sparse gradients save nothing), and torch's sparse momentum buffer keeps every
# batch's rows - it held 50 k rows for a 1 k-row table after 50 steps, growing without bound.
_SPARSE_NATIVE = {"sgd", "adagrad", "ftrl", "sparse_adam"}
_MOMENTUM = {"momentum", "nesterov"}


def _has_momentum(name: str, params: dict[str, Any] | None) -> bool:
    p = params or {}
    return name.lower() in _MOMENTUM or bool(p.get("momentum")) or bool(p.get("nesterov"))


def _registry():
    try:
        from optim import build_optimizer as registry  # noqa: PLC0415
    except ImportError:
        return None
    return registry


def supports_sparse(name: str, weight_decay: float = 0.0, params: dict[str, Any] | None = None) -> bool:
    """Whether ``name`` (with ``params``, its ``optimizer_params``) itself updates sparse
    embedding gradients with the same maths as dense ones."""
    return name.lower() in _SPARSE_NATIVE and not weight_decay and not _has_momentum(name, params)


def can_route_sparse(name: str, params: dict[str, Any] | None = None) -> bool:
    """Whether sparse embeddings can be trained at all with ``name``: natively, or by the
    registry routing them to a sparse optimizer (``optimizer_params.sparse_optimizer``; with
    momentum only when one is named, since momentum has no sparse form)."""
    if supports_sparse(name, params=params):
        return True
    if _registry() is None or name.lower() == "lbfgs":
        return False
    return not _has_momentum(name, params) or "sparse_optimizer" in (params or {})


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


def _has_sparse_embeddings(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Embedding | torch.nn.EmbeddingBag) and m.sparse for m in model.modules())


def build_optimizer(
    name: str, model: torch.nn.Module, *, lr: float, weight_decay: float = 0.0, params: dict[str, Any] | None = None
) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``model``: ``optim.build_optimizer`` when present, else torch.optim.

    ``momentum`` is SGD with momentum 0.9. With sparse embeddings and sgd/nesterov/adagrad/ftrl
    (no ``sparse_optimizer`` named), the embeddings are routed to the same update rule, so sparse
    and dense runs optimise the same objective; the registry refuses that route with momentum,
    which has no sparse form.
    """
    hp = dict(params or {})
    key = name.strip().lower()
    if key == "momentum":
        key = "sgd"
        hp.setdefault("momentum", 0.9)
    registry = _registry()
    if registry is None:
        return _torch_optimizer(key, model.parameters(), lr, weight_decay, hp)
    if _has_sparse_embeddings(model) and "sparse_optimizer" not in hp and key in {"sgd", "nesterov", "adagrad", "ftrl"}:
        route = "sgd" if key == "nesterov" else key
        hp["sparse_optimizer"] = route
        if route == "sgd":
            mom = hp.get("momentum", 0.9 if key == "nesterov" else 0.0)
            hp.setdefault("sparse_hp", {"momentum": mom, "nesterov": key == "nesterov"} if mom else {})
    return registry(key, model, lr=lr, weight_decay=weight_decay, **hp)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    name: str,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    params: dict[str, Any] | None = None,
    base_lr: float | None = None,
):
    """LR schedule stepped once per optimizer step: linear warmup, then ``name``.

    ``optim.build_scheduler`` when present (``constant``, ``cosine``, ``linear``, ``poly``,
    ``step``, ``multistep``, ``exponential``; options in ``train.scheduler_params``), else a
    ``LambdaLR`` over :func:`lr_factor`. Both have plain ``state_dict``s (checkpoint-safe).
    ``min_lr_ratio`` (cosine): each param group decays to its own initial LR times the ratio;
    ``scheduler_params.min_lr`` is the floor of ``base_lr`` (``train.lr``), other groups scaled alike.
    """
    hp = dict(params or {})
    name = name.strip().lower()
    try:
        from optim import build_scheduler as registry  # noqa: PLC0415
    except ImportError:
        registry = None
    if registry is not None:
        if min_lr_ratio and name != "cosine":  # before: silently ignored
            raise ValueError(f"train.min_lr_ratio={min_lr_ratio} is the cosine schedule's floor; train.scheduler="
                             f"{name} has none: leave min_lr_ratio at 0 or use scheduler=cosine")
        if name == "cosine" and min_lr_ratio:
            if "min_lr" in hp or "min_lr_ratio" in hp:
                given = "min_lr" if "min_lr" in hp else "min_lr_ratio"
                raise ValueError(f"train.min_lr_ratio={min_lr_ratio} and train.scheduler_params.{given} both set "
                                 "the cosine schedule's floor: give one")
            hp["min_lr_ratio"] = min_lr_ratio  # each group's floor: its own initial lr x the ratio
        return registry(optimizer, name, warmup_steps=warmup_steps, total_steps=total_steps, base_lr=base_lr, **hp)
    lr_factor(0, total_steps=total_steps, warmup_steps=warmup_steps, schedule=name)  # validate the name
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, total_steps=total_steps, warmup_steps=warmup_steps, schedule=name, min_ratio=min_lr_ratio),
    )


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
