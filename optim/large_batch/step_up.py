"""Gradient step-up with critical-phase detection (seed paper: "On Using Large-Batches in
Federated Learning"; detector after Accordion, Agarwal et al. 2021, arXiv:2010.16248).

Training has *critical* phases (early training, after LR decays) where the gradient norm changes
fast and large-batch steps must stay conservative, and long non-critical stretches where a large
batch wastes its lower gradient noise. The detector compares the gradient norm of consecutive
intervals::

    metric_k = | N_k - N_{k-1} | / N_{k-1}        N_k: mean gradient norm over interval k
    critical_k = metric_k >= eta                   (eta = 0.5 in Accordion; 0.8 is more permissive)

and the step-up multiplies the large-batch gradient by ``alpha`` (2-16) outside critical phases and
leaves it unchanged inside them. The first interval (no history) counts as critical. With
``interval=1`` the decision for step t uses the norm of step t's own gradient; with ``interval > 1``
the decision made at the end of an interval holds for the next one: every step of interval k+1,
and none of interval k, whose last step completes N_k (so intervals 1 and 2 are critical). That is
Accordion's Algorithm 1: the level is chosen once an epoch's gradients have been accumulated and
applied, and used for the following ``k`` epochs. (Accordion takes the norm of the gradient
accumulated over the interval; the mean per-step norm used here needs no extra memory and equals
it for ``interval=1``.)

Under Horovod the norm must be the one of the averaged gradient (identical on all ranks):
:meth:`GradientStepUp.step` synchronises a ``hvd.DistributedOptimizer`` first.
"""

from __future__ import annotations

import math

import torch

from ..schedules import global_grad_norm

__all__ = ["CriticalPhaseDetector", "GradientStepUp"]


class CriticalPhaseDetector:
    """Accordion-style detector over a stream of gradient norms."""

    def __init__(self, eta: float = 0.5, interval: int = 1):
        if not eta > 0:
            raise ValueError(f"eta must be > 0, got {eta}")
        if int(interval) != interval or interval < 1:
            raise ValueError(f"interval must be an integer >= 1, got {interval}")
        self.eta = float(eta)
        self.interval = int(interval)
        self.reset()

    def reset(self) -> None:
        self.prev_norm: float | None = None   # N_{k-1}
        self._acc = 0.0
        self._count = 0
        self.metric: float = math.nan          # last completed metric_k
        self.critical: bool = True             # decision in force for the steps to come
        self.steps = 0

    def update(self, grad_norm: float) -> bool:
        """Feed one step's gradient norm; returns whether this step is in a critical phase: by its
        own norm with ``interval=1``, else by the decision of the last completed interval (the
        step that completes one still uses the one before; its own decision holds from the next
        step on, for a whole interval)."""
        self.steps += 1
        self._acc += float(grad_norm)
        self._count += 1
        in_force = self.critical
        if self._count == self.interval:
            n_k = self._acc / self._count
            if self.prev_norm is None:
                self.metric = math.nan
                self.critical = True
            else:
                self.metric = abs(n_k - self.prev_norm) / max(self.prev_norm, 1e-30)
                self.critical = self.metric >= self.eta
            self.prev_norm = n_k
            self._acc, self._count = 0.0, 0
            if self.interval == 1:
                in_force = self.critical
        return in_force

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("eta", "interval", "prev_norm", "_acc", "_count", "metric",
                                                "critical", "steps")}

    def load_state_dict(self, sd: dict) -> None:
        for k, v in sd.items():
            setattr(self, k, v)


class GradientStepUp:
    """Scale gradients by ``alpha`` outside critical phases.

    Typical loop::

        step_up = GradientStepUp(alpha=4.0, eta=0.5)
        loss.backward()
        step_up.step(optimizer)           # = synchronize (Horovod) -> scale grads -> optimizer.step()
        logger.log(step_up.diagnostics())
    """

    def __init__(self, alpha: float = 4.0, eta: float = 0.5, interval: int = 1,
                 detector: CriticalPhaseDetector | None = None):
        if not alpha >= 1.0:
            raise ValueError(f"alpha must be >= 1 (2-16 in the paper), got {alpha}")
        self.alpha = float(alpha)
        self.detector = detector or CriticalPhaseDetector(eta, interval)
        self.factor = 1.0
        self.grad_norm = math.nan
        self.critical = True  # the last step's decision (the detector's may already be the next one's)

    def factor_for(self, grad_norm: float) -> float:
        """Update the detector with ``grad_norm`` and return the factor for this step."""
        self.grad_norm = float(grad_norm)
        self.critical = self.detector.update(self.grad_norm)
        self.factor = 1.0 if self.critical else self.alpha
        return self.factor

    @torch.no_grad()
    def scale_(self, parameters) -> float:
        """Measure the global gradient norm of ``parameters``, decide, scale ``p.grad`` in place."""
        params = [p for p in parameters if p.grad is not None]
        factor = self.factor_for(float(global_grad_norm(params)))
        if factor != 1.0:
            dense = [p.grad for p in params if not p.grad.is_sparse]
            if dense:
                torch._foreach_mul_(dense, factor)
            for p in params:
                if p.grad.is_sparse:
                    p.grad.mul_(factor)
        return factor

    def step(self, optimizer, closure=None):
        """Synchronise (hvd.DistributedOptimizer), scale the averaged gradient, then step.

        A ``closure`` is evaluated here, once, before the scaling, and the optimizer steps
        without it: given to ``optimizer.step`` it ran backward again and overwrote the scaled
        gradients (until the twenty-fifth session ``factor`` said 4 and 1 was applied). An
        optimizer whose step must evaluate the closure itself (LBFGS, a line search) cannot
        take scaled gradients."""
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            self.step(optimizer)
            return loss
        params = [p for g in optimizer.param_groups for p in g["params"]]
        sync = getattr(optimizer, "synchronize", None)
        if sync is not None and hasattr(optimizer, "skip_synchronize"):
            sync()
            self.scale_(params)
            with optimizer.skip_synchronize():
                return optimizer.step()
        self.scale_(params)
        return optimizer.step()

    def diagnostics(self) -> dict[str, float]:
        return {
            "step_up/factor": self.factor,
            "step_up/metric": self.detector.metric,
            "step_up/critical": float(self.critical),
            "step_up/grad_norm": self.grad_norm,
        }

    def state_dict(self) -> dict:
        return {"alpha": self.alpha, "factor": self.factor, "grad_norm": self.grad_norm, "critical": self.critical,
                "detector": self.detector.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.alpha, self.factor, self.grad_norm = sd["alpha"], sd["factor"], sd["grad_norm"]
        self.critical = sd.get("critical", sd["detector"]["critical"])  # older states: the detector's was it
        self.detector.load_state_dict(sd["detector"])
