"""Learning-rate schedules, large-batch scaling rules and gradient clipping.

* :func:`scale_lr` -- linear scaling with the batch size (Goyal et al. 2017, "Accurate, Large
  Minibatch SGD") or square-root scaling (Krizhevsky 2014; Hoffer et al. 2017), the usual rule for
  adaptive methods (Adam/LAMB).
* :func:`build_scheduler` -- gradual linear warmup (Goyal et al.) followed by cosine / step /
  multistep / polynomial / exponential / constant decay, composed from ``torch.optim.lr_scheduler``
  (``LinearLR`` warmup + the decay scheduler inside ``SequentialLR``).
* :func:`clip_grad_norm_` -- clipping by the global gradient norm, multi-tensor, sparse-aware.
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer, lr_scheduler

__all__ = ["scale_lr", "build_scheduler", "available_schedulers", "clip_grad_norm_", "global_grad_norm"]

_SCHEDULES = ("constant", "cosine", "step", "multistep", "poly", "linear", "exponential")


def available_schedulers() -> list[str]:
    return list(_SCHEDULES)


def scale_lr(base_lr: float, batch_size: int, base_batch_size: int, rule: str = "linear") -> float:
    """LR for ``batch_size`` given ``base_lr`` tuned at ``base_batch_size``.

    ``rule='linear'``: ``base_lr * b / b0`` (SGD, Goyal et al.); ``'sqrt'``: ``base_lr * sqrt(b / b0)``
    (adaptive methods); ``'none'``: unchanged.
    """
    if batch_size <= 0 or base_batch_size <= 0:
        raise ValueError(f"batch sizes must be positive, got batch_size={batch_size}, base_batch_size={base_batch_size}")
    k = batch_size / base_batch_size
    if rule == "linear":
        return base_lr * k
    if rule == "sqrt":
        return base_lr * math.sqrt(k)
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown scaling rule {rule!r}; valid: linear, sqrt, none")


class _CosineToFloor(lr_scheduler.LRScheduler):
    """Cosine decay of every param group from its initial LR to ``min_lr_ratio`` times it, over
    ``T_max`` steps (then held there): ``lr_g * (r + (1 - r) * (1 + cos(pi * min(s, T) / T)) / 2)``.

    One multiplicative factor for all groups, so an ``embedding_lr`` below ``lr`` decays to its own
    floor; ``CosineAnnealingLR``'s single absolute ``eta_min`` drew every group to the same LR (a
    lower group's LR rose). Closed form, so a restored state continues exactly; a
    ``CosineAnnealingLR`` state (checkpoints from before this class) loads too, its ``eta_min``
    left aside for the ratio the schedule is built with.
    """

    def __init__(self, optimizer: Optimizer, T_max: int, min_lr_ratio: float = 0.0, last_epoch: int = -1):
        self.T_max = int(T_max)
        self.min_lr_ratio = float(min_lr_ratio)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        s = min(max(self.last_epoch, 0), self.T_max)
        r = self.min_lr_ratio
        factor = r + (1.0 - r) * (1.0 + math.cos(math.pi * s / self.T_max)) / 2.0
        return [base * factor for base in self.base_lrs]

    _get_closed_form_lr = get_lr

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "eta_min"})


def _hp(schedule: str, key: str, value, ok, what: str, integer: bool = False):
    """``value`` of the schedule option ``key`` as a float (``integer``: an int) when it is a
    finite number (integral with ``integer``) for which ``ok`` holds, else a ValueError saying
    it must be ``what`` - not a ZeroDivisionError at some later step, or a negative LR."""
    good = (not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
            and (not integer or value == int(value)) and ok(value))
    if not good:
        raise ValueError(f"schedule {schedule!r}: {key} must be {what}, got {value!r}")
    return int(value) if integer else float(value)


def _gamma(schedule: str, hp: dict) -> float:
    return _hp(schedule, "gamma", hp.get("gamma", 0.1), lambda g: 0 < g <= 1,
               "a number in (0, 1], the factor of each decay")


def _milestones(hp: dict) -> list[int]:
    ms = hp["milestones"]
    if not isinstance(ms, list | tuple) or not ms:
        raise ValueError(f"schedule 'multistep': milestones must be a list of steps, got {ms!r}")
    out = [_hp("multistep", "milestones", m, lambda m: m >= 1, "integers >= 1 (steps after warmup)", integer=True)
           for m in ms]
    if any(b <= a for a, b in zip(out, out[1:])):
        raise ValueError(f"schedule 'multistep': milestones must be increasing, got {list(ms)!r}")
    return out


def _cosine_floor_ratio(optimizer: Optimizer, hp: dict, base_lr: float | None) -> float:
    """The cosine schedule's floor as a fraction of each group's initial LR: ``min_lr_ratio``, or
    ``min_lr`` (the floor of the base LR) over the base LR."""
    if "min_lr" in hp and "min_lr_ratio" in hp:
        raise ValueError("schedule 'cosine' takes min_lr or min_lr_ratio, not both")
    if "min_lr_ratio" in hp:
        return _hp("cosine", "min_lr_ratio", hp["min_lr_ratio"], lambda r: 0 <= r <= 1, "a number in [0, 1]")
    min_lr = _hp("cosine", "min_lr", hp.get("min_lr", 0.0), lambda v: v >= 0, "a number >= 0")
    if min_lr == 0:
        return 0.0
    if base_lr is None:
        base_lr = optimizer.defaults.get("lr")  # every torch Optimizer has its defaults dict
        if not isinstance(base_lr, int | float):
            base_lr = optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"])
    if not 0 < min_lr <= base_lr:
        raise ValueError(f"schedule 'cosine': min_lr ({min_lr}) must be at most the base LR ({base_lr}), "
                         "the LR it decays from")
    return min_lr / base_lr


def build_scheduler(optimizer: Optimizer, name: str, *, warmup_steps: int = 0, total_steps: int | None = None,
                    warmup_start_factor: float | None = None, base_lr: float | None = None,
                    **hp) -> lr_scheduler.LRScheduler:
    """LR scheduler stepped once per optimizer step.

    Warmup (``warmup_steps = W > 1``): step t < W uses ``lr * (start + (1 - start) * t / (W - 1))``
    with ``start = warmup_start_factor``; the default ``start = 1/W`` gives Goyal et al.'s gradual
    warmup ``lr * (t + 1) / W``, reaching ``lr`` at t = W - 1. ``W = 1``: step 0 uses ``lr * start``
    (``lr`` by default); ``W = 0``: no warmup.
    After warmup, with ``s = t - W`` and ``T = total_steps - W``:

    * ``constant``: ``lr``
    * ``cosine``: ``lr * (r + (1 - r) * (1 + cos(pi * min(s, T) / T)) / 2)``  (hp: ``min_lr_ratio=r``, or ``min_lr``)
    * ``step``: ``lr * gamma ** (s // step_size)``                               (hp: ``step_size``, ``gamma=0.1``)
    * ``multistep``: ``lr * gamma ** (number of milestones <= s)``             (hp: ``milestones``, ``gamma=0.1``)
    * ``poly``: ``lr * (1 - min(s, T) / T) ** power``                           (hp: ``power=1.0``)
    * ``linear``: ``poly`` with power 1
    * ``exponential``: ``lr * gamma ** s``                                       (hp: ``gamma``)

    ``cosine``, ``poly`` and ``linear`` need ``total_steps``; milestones count post-warmup steps.
    Options are checked here (ValueError): ``step_size`` an integer >= 1, ``gamma`` in (0, 1] (a
    decay; <= 0 flips or zeroes the LR), ``milestones`` increasing integers >= 1, ``power`` >= 0,
    ``min_lr`` >= 0 and at most the base LR, ``min_lr_ratio`` in [0, 1].

    Each param group follows these with its own initial ``lr`` (e.g. ``embedding_lr``): the cosine
    floor is ``r`` times each group's LR, ``min_lr_ratio=r``; ``min_lr`` is the floor of the base
    LR (``base_lr``: by default the optimizer's ``lr``, else the first group's), so
    ``r = min_lr / base_lr`` for every group.
    """
    key = name.strip().lower()
    if key not in _SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid: {', '.join(_SCHEDULES)}")
    if warmup_steps < 0 or int(warmup_steps) != warmup_steps:
        raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    needs_total = key in ("cosine", "poly", "linear")
    if needs_total and (total_steps is None or total_steps <= warmup_steps):
        raise ValueError(f"schedule {key!r} needs total_steps > warmup_steps (got total_steps={total_steps}, "
                         f"warmup_steps={warmup_steps})")
    decay_steps = (total_steps - warmup_steps) if total_steps is not None else None
    allowed = {"constant": set(), "cosine": {"min_lr", "min_lr_ratio"}, "step": {"step_size", "gamma"},
               "multistep": {"milestones", "gamma"}, "poly": {"power"}, "linear": set(),
               "exponential": {"gamma"}}[key]
    unknown = set(hp) - allowed
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for schedule {key!r}; valid: "
                         f"{sorted(allowed) or 'none'} plus warmup_steps, total_steps, warmup_start_factor")

    if key == "constant":
        main = lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    elif key == "cosine":
        main = _CosineToFloor(optimizer, T_max=decay_steps, min_lr_ratio=_cosine_floor_ratio(optimizer, hp, base_lr))
    elif key == "step":
        if "step_size" not in hp:
            raise ValueError("schedule 'step' needs step_size")
        step_size = _hp("step", "step_size", hp["step_size"], lambda n: n >= 1, "an integer >= 1", integer=True)
        main = lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=_gamma(key, hp))
    elif key == "multistep":
        if "milestones" not in hp:
            raise ValueError("schedule 'multistep' needs milestones")
        main = lr_scheduler.MultiStepLR(optimizer, milestones=_milestones(hp), gamma=_gamma(key, hp))
    elif key in ("poly", "linear"):
        power = 1.0 if key == "linear" else _hp(key, "power", hp.get("power", 1.0), lambda p: p >= 0, "a number >= 0")
        main = lr_scheduler.PolynomialLR(optimizer, total_iters=decay_steps, power=power)
    else:
        if "gamma" not in hp:
            raise ValueError("schedule 'exponential' needs gamma")
        main = lr_scheduler.ExponentialLR(optimizer, gamma=_gamma(key, hp))

    if warmup_steps == 0:
        return main
    start = 1.0 / warmup_steps if warmup_start_factor is None else float(warmup_start_factor)
    if not 0.0 < start <= 1.0:
        raise ValueError(f"warmup_start_factor must be in (0, 1], got {start}")
    # W = 1 is one warmup step too: the decay above spans total_steps - W and must start at t = W
    if warmup_steps == 1:
        warm = lr_scheduler.ConstantLR(optimizer, factor=start, total_iters=1)
    else:
        warm = lr_scheduler.LinearLR(optimizer, start_factor=start, end_factor=1.0, total_iters=warmup_steps - 1)
    return lr_scheduler.SequentialLR(optimizer, schedulers=[warm, main], milestones=[warmup_steps])


def _grads(parameters) -> list[torch.Tensor]:
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    return [p.grad for p in parameters if p.grad is not None]


@torch.no_grad()
def global_grad_norm(parameters, norm_type: float = 2.0) -> torch.Tensor:
    """Norm of all gradients as one vector (dense via torch._foreach_norm, sparse via their values)."""
    grads = _grads(parameters)
    if not grads:
        return torch.tensor(0.0)
    dense = [g for g in grads if not g.is_sparse]
    sparse = [g.coalesce()._values() for g in grads if g.is_sparse]
    norms = []
    by_dev: dict = {}
    for g in dense + sparse:
        by_dev.setdefault((g.device, g.dtype), []).append(g)
    for (dev, _), gs in by_dev.items():
        norms.extend(n.to(grads[0].device) for n in torch._foreach_norm(gs, norm_type))
    stacked = torch.stack([n.float() for n in norms])
    if math.isinf(norm_type):
        return stacked.max()
    return torch.linalg.vector_norm(stacked, norm_type)


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach: bool = True) -> torch.Tensor:
    """Scale all gradients so their global norm is at most ``max_norm``; returns the norm before.

    Dense gradients: ``torch.nn.utils.clip_grad_norm_(..., foreach=True)``. With sparse gradients
    (sparse embeddings) the norm includes their values and they are scaled in place as well.
    """
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    grads = _grads(params)
    if not any(g.is_sparse for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type,
                                              error_if_nonfinite=error_if_nonfinite, foreach=foreach)
    total = global_grad_norm(params, norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite")
    coef = float(max_norm) / (float(total) + 1e-6)
    if coef < 1.0:
        dense = [g for g in grads if not g.is_sparse]
        if dense:
            torch._foreach_mul_(dense, coef)
        for g in grads:
            if g.is_sparse:
                g.mul_(coef)
    return total
