"""Sophia: second-order clipped stochastic optimization (Liu et al. 2023, arXiv:2305.14342).

Per coordinate, with gradient ``g`` and a diagonal Hessian EMA ``h``::

    w = w * (1 - lr * wd)                                   (decoupled weight decay)
    m = b1 * m + (1 - b1) * g
    w = w - lr * clip(m / max(rho * h, eps), 1)             (= lr * sign(m) * min(|m| / (rho h + eps), 1))

Every ``update_interval`` (k) steps the training loop refreshes ``h = b2 * h + (1 - b2) * h_hat``
with one of the paper's estimators (Algorithm 1 and 2), computed here by
:meth:`Sophia.update_hessian_gnb` or :meth:`Sophia.update_hessian_hutchinson`:

* Gauss-Newton-Bartlett (SophiaG): sample labels ``y_hat`` from the model's own predictive
  distribution, take the gradient ``g_hat`` of the mean loss on ``(x, y_hat)`` over the B examples;
  ``h_hat = B * g_hat * g_hat``.
* Hutchinson (SophiaH): ``u ~ Rademacher``, ``h_hat = u * (H u)`` from a Hessian-vector product.

Both use ``torch.autograd.grad`` (they never touch ``p.grad``, so Horovod's gradient hooks do not
fire) and average ``h_hat`` across Horovod ranks, so ``h`` stays identical everywhere. Before the
first estimate ``h = 0`` and the step is ``lr * sign(m)`` (the clip is active), as in the paper.

The paper folds the batch size B of the official code's ``rho * bs * h`` into ``h_hat``; ``rho`` has
the paper's meaning (0.03-0.05 for GPT-2 with SophiaG).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.optim import Optimizer

from ._utils import eval_closure, bump_steps, check_betas, check_range, collect, group_tensors
from .distributed import allreduce_mean_

__all__ = ["Sophia", "gnb_hessian", "hutchinson_hessian"]


def _trainable(params):
    return [p for p in params if p.requires_grad]


def gnb_hessian(logits: torch.Tensor, params, kind: str = "categorical", *, retain_graph: bool = False,
                generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Gauss-Newton-Bartlett diagonal estimate ``B * g_hat**2`` (Liu et al. 2023, Algorithm 2).

    ``logits``: model outputs with autograd graph, shape ``(B, C)`` (categorical), ``(B,)``/``(B,1)``
    (bernoulli: binary logistic) or ``(B, ...)`` (gaussian: squared error with unit variance).
    """
    params = list(params)
    if not logits.requires_grad:
        raise ValueError("gnb_hessian needs logits with autograd graph (compute them with grad enabled)")
    flat = logits.reshape(-1, logits.shape[-1]) if kind == "categorical" else logits
    with torch.no_grad():
        if kind == "categorical":
            y_hat = torch.multinomial(F.softmax(flat.detach().float(), dim=-1), 1, generator=generator).squeeze(-1)
        elif kind == "bernoulli":
            y_hat = torch.bernoulli(torch.sigmoid(logits.float()), generator=generator).to(logits.dtype)
        elif kind == "gaussian":
            noise = torch.randn(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
            y_hat = logits.detach() + noise
        else:
            raise ValueError(f"unknown GNB kind {kind!r}: expected 'categorical', 'bernoulli' or 'gaussian'")
    if kind == "categorical":
        batch = flat.shape[0]
        loss = F.cross_entropy(flat, y_hat, reduction="mean")
    elif kind == "bernoulli":
        batch = logits.shape[0]
        loss = F.binary_cross_entropy_with_logits(logits, y_hat, reduction="sum") / batch
    else:
        batch = logits.shape[0]
        loss = 0.5 * (logits - y_hat).pow(2).sum() / batch
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach().square().mul_(batch) for p, g in zip(params, grads)]


def hutchinson_hessian(loss: torch.Tensor, params, n_samples: int = 1, *, retain_graph: bool = False,
                       generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Hutchinson diagonal estimate ``mean_s u_s * (H u_s)`` with Rademacher ``u_s`` (Algorithm 1)."""
    params = list(params)
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    pairs = [(p, g) for p, g in zip(params, grads) if g is not None]
    out = {id(p): torch.zeros_like(p) for p in params}
    for s in range(n_samples):
        us = [torch.randint(0, 2, p.shape, generator=generator, device=p.device).to(p.dtype).mul_(2).sub_(1)
              for p, _ in pairs]
        hvs = torch.autograd.grad([g for _, g in pairs], [p for p, _ in pairs], grad_outputs=us,
                                  retain_graph=retain_graph or s < n_samples - 1, allow_unused=True)
        for (p, _), u, hv in zip(pairs, us, hvs):
            if hv is not None:
                out[id(p)].add_(u * hv.detach(), alpha=1.0 / n_samples)
    return [out[id(p)] for p in params]


def _floor(eps: float, dtype: torch.dtype) -> float:
    """The denominator's floor ``eps``, at least the dtype's smallest normal number: in float16
    the default 1e-15 is 0, and ``m / max(rho h, 0)`` was 0/0 = NaN wherever m was 0 (until the
    twenty-fifth session every float16 step wrote NaN into such weights)."""
    return max(eps, torch.finfo(dtype).tiny) if dtype.is_floating_point else eps


class Sophia(Optimizer):
    """Sophia with an external diagonal Hessian EMA refreshed every ``update_interval`` steps.

    Args:
        params: parameters, named parameters or param-group dicts.
        lr: learning rate; it is also the largest per-coordinate step (clip at 1). (1e-4)
        betas: ``(b1, b2)``: momentum and Hessian-EMA decay ((0.965, 0.99)).
        rho: clipping scale ``gamma`` of the paper (0.04).
        weight_decay: decoupled weight decay (0.1).
        eps: floor of the denominator ``rho * h`` (1e-15).
        update_interval: k, steps between Hessian estimates (10).
        estimator: ``'gnb'`` or ``'hutchinson'``: documentation/validation of the intended estimator.
        maximize, foreach: as in torch.optim.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        eps: float = 1e-15,
        update_interval: int = 10,
        estimator: str = "gnb",
        maximize: bool = False,
        foreach: bool | None = None,
    ):
        check_range("lr", lr, 0.0)
        check_betas(betas)
        check_range("rho", rho, 0.0, lo_open=True)
        check_range("weight_decay", weight_decay, 0.0)
        check_range("eps", eps, 0.0, lo_open=True)
        if int(update_interval) != update_interval or update_interval < 1:
            raise ValueError(f"invalid update_interval={update_interval!r}: expected an integer >= 1")
        if estimator not in ("gnb", "hutchinson"):
            raise ValueError(f"invalid estimator={estimator!r}: expected 'gnb' or 'hutchinson'")
        defaults = dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, eps=eps,
                        update_interval=int(update_interval), estimator=estimator, maximize=maximize,
                        foreach=foreach)
        super().__init__(params, defaults)
        self._inv_cache: dict = {}  # param -> (rho, eps, 1/max(rho*h, eps)); not part of state_dict
        self._scratch: dict = {}

    # -- state ---------------------------------------------------------------------------------------
    def _state_for(self, p):
        st = self.state[p]
        if "step" not in st:
            st["step"] = torch.tensor(0.0)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._inv_cache.clear()
        self._scratch.clear()

    @property
    def steps_done(self) -> int:
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if st and "step" in st:
                    return int(st["step"])
        return 0

    def hessian_due(self) -> bool:
        """True when the next ``step()`` is ``t = 1, k+1, 2k+1, ...`` (paper: ``t mod k == 1``)."""
        k = self.param_groups[0]["update_interval"]
        return self.steps_done % k == 0

    def _hessian_params(self):
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    @torch.no_grad()
    def update_hessian(self, estimates, params=None) -> None:
        """``h = b2 * h + (1 - b2) * h_hat`` for each parameter; ``estimates`` aligned with ``params``
        (default: all trainable parameters in group order). Averaged across Horovod ranks first."""
        params = self._hessian_params() if params is None else list(params)
        estimates = [e.detach() for e in estimates]
        if len(estimates) != len(params):
            raise ValueError(f"got {len(estimates)} Hessian estimates for {len(params)} parameters")
        allreduce_mean_(estimates, name="bigopt.sophia.hessian")
        by_param = {p: e for p, e in zip(params, estimates)}
        for group in self.param_groups:
            b2 = group["betas"][1]
            hs, es = [], []
            for p in group["params"]:
                if p in by_param:
                    hs.append(self._state_for(p)["hessian"])
                    es.append(by_param[p].to(dtype=p.dtype))
                    c = self._inv_cache.get(p)
                    if c is not None:  # stale: keep the buffer, force a recompute
                        self._inv_cache[p] = (None, None, c[2])
            for _, (bh, be) in group_tensors(hs, es):
                torch._foreach_lerp_(bh, be, 1.0 - b2)
            # refresh 1/max(rho h, eps) now, so regular steps only read it
            self._inv_denoms([p for p in group["params"] if p in by_param], group["rho"], group["eps"])

    def update_hessian_gnb(self, logits, kind: str = "categorical", *, retain_graph: bool = False,
                           generator=None) -> None:
        """Refresh ``h`` with the Gauss-Newton-Bartlett estimator from the model's ``logits``."""
        params = self._hessian_params()
        self.update_hessian(gnb_hessian(logits, params, kind, retain_graph=retain_graph, generator=generator),
                            params)

    def update_hessian_hutchinson(self, loss, n_samples: int = 1, *, retain_graph: bool = False,
                                  generator=None) -> None:
        """Refresh ``h`` with Hutchinson's estimator from a scalar ``loss`` (with graph)."""
        params = self._hessian_params()
        self.update_hessian(hutchinson_hessian(loss, params, n_samples, retain_graph=retain_graph,
                                               generator=generator), params)

    # -- step -----------------------------------------------------------------------------------------
    def _inv_denoms(self, params, rho, eps):
        """Cached ``1 / max(rho * h, eps)`` per parameter (recomputed in place when h, rho or eps change)."""
        out = []
        for p in params:
            c = self._inv_cache.get(p)
            if c is None or c[0] != rho or c[1] != eps:
                h = self._state_for(p)["hessian"]
                inv = c[2] if c is not None else torch.empty_like(h)
                torch.mul(h, rho, out=inv).clamp_(min=_floor(eps, h.dtype)).reciprocal_()
                c = (rho, eps, inv)
                self._inv_cache[p] = c
            out.append(c[2])
        return out

    def _scratch_for(self, params):
        out = []
        for p in params:
            s = self._scratch.get(p)
            if s is None or s.shape != p.shape:
                s = torch.empty_like(p, memory_format=torch.preserve_format)
                self._scratch[p] = s
            out.append(s)
        return out

    @torch.no_grad()
    def step(self, closure=None):
        loss = eval_closure(closure)
        for group in self.param_groups:
            _, params, grads, _ = collect(group, self.state, ())
            if not params:
                continue
            if any(g.is_sparse for g in grads):
                raise RuntimeError("Sophia does not support sparse gradients")
            bump_steps([self._state_for(p) for p in params])
            lr, wd, rho, eps = group["lr"], group["weight_decay"], group["rho"], group["eps"]
            b1 = group["betas"][0]
            if group["maximize"]:
                grads = torch._foreach_neg(grads)
            ms = [self.state[p]["exp_avg"] for p in params]
            if group["foreach"] is False:
                for p, g, m in zip(params, grads, ms):
                    if wd:
                        p.mul_(1.0 - lr * wd)
                    m.lerp_(g, 1.0 - b1)
                    h = self.state[p]["hessian"]
                    ratio = (m.abs() / (rho * h).clamp(min=_floor(eps, h.dtype))).clamp(max=1.0)
                    p.addcmul_(m.sign(), ratio, value=-lr)
                continue
            invs = self._inv_denoms(params, rho, eps)
            us = self._scratch_for(params)
            for _, (bp, bg, bm, bi, bu) in group_tensors(params, grads, ms, invs, us):
                if wd:
                    torch._foreach_mul_(bp, 1.0 - lr * wd)
                torch._foreach_lerp_(bm, bg, 1.0 - b1)
                # u = clamp(m / max(rho h, eps), -1, 1) = sign(m) * min(|m|/max(rho h, eps), 1)
                torch._foreach_copy_(bu, bm)
                torch._foreach_mul_(bu, bi)
                torch._foreach_clamp_min_(bu, -1.0)
                torch._foreach_clamp_max_(bu, 1.0)
                torch._foreach_add_(bp, bu, alpha=-lr)
        return loss

    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        """On demand (one pass over the state): fraction of coordinates whose step is clipped
        (``|m| >= max(rho h, eps)``; the paper tracks it to tune rho) and the mean Hessian estimate."""
        clipped = total = 0
        h_sum = 0.0
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if not st or "exp_avg" not in st:
                    continue
                denom = (st["hessian"] * group["rho"]).clamp_(min=_floor(group["eps"], st["hessian"].dtype))
                clipped += int((st["exp_avg"].abs() >= denom).sum())
                total += p.numel()
                h_sum += float(st["hessian"].sum())
        if not total:
            return {}
        return {"sophia/clip_fraction": clipped / total, "sophia/hessian_mean": h_sum / total}
