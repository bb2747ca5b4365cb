"""Adaptive compression: switch the compression level by critical-phase detection.

Accordion (Agarwal et al. 2021): over each interval of ``interval`` steps accumulate the
gradient; at the end of the interval compare
its norm with the previous interval's:

    critical  <=>  | ||D_prev|| - ||D_curr|| | / ||D_prev||  >=  eta

Inside a critical phase the compressor runs with its *critical* (gentle) setting - e.g.
top-k ratio 10x larger, PowerSGD rank 4x larger - and with its *normal* (aggressive) setting
otherwise. Training starts critical (the first interval has nothing to compare with).

The metric is computed on each rank's *local, uncompressed* gradients (the compressed
output's norm moves with the compression level itself) and averaged over ranks with one
float64 allreduce per interval, so every rank takes the same decision.

``metric="mean_norm"`` uses the mean of the per-step gradient norms over the interval
instead of the norm of the accumulated gradient (no model-sized buffer).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .base import CompressionConfigError, Compressor, _exact_ratio

__all__ = ["AccordionController", "build_adaptive", "default_levels"]


def default_levels(comp: Compressor) -> tuple[dict[str, Any], dict[str, Any]]:
    """(normal, critical) settings derived from the compressor's current hyperparameters."""
    p = comp.adaptive_param
    if p is None:
        raise CompressionConfigError(
            f"adaptive compression is not supported for {comp.name!r}: it has no compression-level "
            "hyperparameter (supported: topk, randomk [ratio], powersgd [rank], qsgd [bits])"
        )
    v = getattr(comp, p)
    if p == "ratio":
        return {p: v}, {p: float(min(1, 10 * _exact_ratio(v)))}  # 10 x 0.07 is 0.7, not 0.7000000000000001
    if p == "rank":
        return {p: v}, {p: 4 * v}
    if p == "bits":
        if getattr(comp, "levels", None) is not None:
            raise CompressionConfigError("adaptive qsgd switches 'bits': build it with bits=, not levels=")
        return {p: v}, {p: min(2 * v, 16)}
    raise CompressionConfigError(f"no default adaptive levels for hyperparameter {p!r}")


class AccordionController:
    def __init__(
        self,
        compressor: Compressor,
        interval: int = 100,
        eta: float = 0.5,
        normal: dict[str, Any] | None = None,
        critical: dict[str, Any] | None = None,
        metric: str = "accumulated",
        start_critical: bool = True,
    ) -> None:
        if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
            raise CompressionConfigError(f"adaptive: interval must be an int >= 1, got {interval!r}")
        if not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta <= 0:
            raise CompressionConfigError(f"adaptive: eta must be a positive number, got {eta!r}")
        if metric not in ("accumulated", "mean_norm"):
            raise CompressionConfigError(f"adaptive: metric must be 'accumulated' or 'mean_norm', got {metric!r}")
        d_normal, d_critical = default_levels(compressor)
        self.comp = compressor
        self.interval = interval
        self.eta = float(eta)
        self.metric = metric
        self.normal = dict(normal) if normal is not None else d_normal
        self.critical_cfg = dict(critical) if critical is not None else d_critical
        # validate both settings now rather than at the first switch
        for cfg in (self.critical_cfg, self.normal):
            compressor.configure(**cfg)
        self.critical = bool(start_critical)
        self.prev: float | None = None
        self.count = 0
        self._acc: torch.Tensor | None = None
        self._norm_sum = 0.0
        self.history: list[dict[str, float]] = []
        self.apply()

    @property
    def level(self) -> float:
        return float(getattr(self.comp, self.comp.adaptive_param))

    def apply(self) -> None:
        self.comp.configure(**(self.critical_cfg if self.critical else self.normal))

    def observe(self, grads: list[torch.Tensor]) -> float | None:
        """Feed one step's *local, uncompressed* dense gradients (before compression: the
        compressed output's norm would move with the compression level itself). At the end
        of an interval return this rank's interval metric, else None. The communicator
        averages the metric over ranks and passes it to :meth:`update`, so every rank takes
        the same decision."""
        with torch.no_grad():
            if self.metric == "accumulated":
                flat = torch.cat([g.reshape(-1).to(torch.float64) for g in grads]) if grads else torch.zeros(1)
                self._acc = flat.clone() if self._acc is None else self._acc.add_(flat)
            else:
                self._norm_sum += float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads))) if grads else 0.0
        self.count += 1
        if self.count < self.interval:
            return None
        norm = float(torch.linalg.vector_norm(self._acc)) if self.metric == "accumulated" else self._norm_sum / self.count
        self._acc, self._norm_sum, self.count = None, 0.0, 0
        return norm

    def update(self, norm: float) -> bool:
        """Decide from the (rank-averaged) interval metric; switch the compressor if needed."""
        if self.prev is None:
            critical, change = self.critical, math.nan
        elif self.prev == 0.0:
            critical, change = True, math.inf
        else:
            change = abs(self.prev - norm) / self.prev
            critical = change >= self.eta
        self.history.append({"norm": norm, "change": change, "critical": float(critical)})
        self.prev = norm
        if critical != self.critical:
            self.critical = critical
            self.apply()
        return critical

    def state_dict(self) -> dict[str, Any]:
        return {"critical": self.critical, "prev": self.prev, "count": self.count,
                "acc": None if self._acc is None else self._acc.cpu().clone(),
                "norm_sum": self._norm_sum, "history": list(self.history)}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.critical = s["critical"]
        self.prev = s["prev"]
        self.count = s["count"]
        self._acc = None if s["acc"] is None else s["acc"].clone()
        self._norm_sum = s["norm_sum"]
        self.history = list(s["history"])
        self.apply()


def build_adaptive(adaptive: Any, comp: Compressor) -> AccordionController | None:
    if adaptive is None or adaptive is False:
        return None
    if isinstance(adaptive, AccordionController):
        return adaptive
    if adaptive is True:
        return AccordionController(comp)
    if isinstance(adaptive, dict):
        cfg = dict(adaptive)
        kind = cfg.pop("kind", cfg.pop("name", "accordion"))
        if kind != "accordion":
            raise CompressionConfigError(f"unknown adaptive mode {kind!r} (available: accordion)")
        allowed = {"interval", "eta", "normal", "critical", "metric", "start_critical"}
        bad = set(cfg) - allowed
        if bad:
            raise CompressionConfigError(f"adaptive: unknown option(s) {sorted(bad)}; allowed: {sorted(allowed)}")
        return AccordionController(comp, **cfg)
    raise CompressionConfigError(f"adaptive must be None, True, a dict or an AccordionController, got {adaptive!r}")
