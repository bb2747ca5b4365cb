"""LARS: layer-wise adaptive rate scaling (You, Gitman & Ginsburg 2017, arXiv:1708.03888).

For every adapted parameter tensor ("layer") ``w`` with gradient ``g``::

    trust  = eta * ||w|| / (||g|| + wd * ||w|| + eps)      (1 if ||w|| == 0 or the denominator is 0)
    trust  = clamp(trust, *trust_clip)                       (optional trust-ratio clipping)
    d      = lr * trust * (g + wd * w)
    v      = momentum * v + (1 - dampening) * d          (first step: v = d, as torch.optim.SGD)
    w      = w - v                      (or w - (momentum * v + d) with nesterov=True)

The learning rate sits inside the momentum buffer, as in Algorithm 1 of the paper and in the
MLPerf reference; with a constant ``lr`` this equals the "lr outside" form used by
``pytorch_optimizer.LARS``. Parameters excluded from layer adaptation (group flag
``layer_adaptation=False``, or any 1-D/0-D tensor when ``exclude_1d=True`` -- biases and norm
weights) take a plain momentum-SGD step with ``trust = 1``; the 1-D rule also drops their weight
decay. The trust ratios of the last step are kept for logging: :meth:`LARS.diagnostics`.

All hyperparameters live in the param groups, so ``hvd.DistributedOptimizer(LARS(...))`` rebuilds
it faithfully; the norms are then computed on the all-reduced gradient and identical on all ranks.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from ._utils import eval_closure, TrustRatioLogging, bump_steps, check_range, collect, group_tensors, param_name

__all__ = ["LARS", "trust_ratios"]


def trust_ratios(w_norm: torch.Tensor, g_norm: torch.Tensor, coeff: float, wd: float, eps: float, clip):
    """Vectorised LARS trust ratio ``coeff*||w|| / (||g|| + wd*||w|| + eps)`` with the zero guards."""
    denom = g_norm + wd * w_norm + eps
    ratio = torch.where((w_norm > 0) & (denom > 0), coeff * w_norm / denom, torch.ones_like(w_norm))
    if clip is not None:
        lo, hi = clip
        ratio = ratio.clamp(min=lo, max=hi)
    return ratio


class LARS(TrustRatioLogging, Optimizer):
    """Layer-wise Adaptive Rate Scaling with momentum (multi-tensor implementation).

    Args:
        params: parameters, named parameters or param-group dicts.
        lr: global learning rate (``gamma`` in the paper).
        momentum: heavy-ball momentum ``m`` (0.9).
        weight_decay: L2 coefficient ``beta`` added to the gradient and used in the trust ratio.
        dampening: momentum dampening, as in torch.optim.SGD.
        nesterov: Nesterov momentum.
        trust_coefficient: ``eta`` (0.001 in the paper).
        eps: added to the trust-ratio denominator (0 keeps the paper's formula; guarded for 0/0).
        trust_clip: ``(min, max)`` bounds for the trust ratio, or ``None``.
        layer_adaptation: group flag; ``False`` gives plain momentum SGD for the group.
        exclude_1d: tensors with ``ndim <= 1`` get no layer adaptation and no weight decay.
        maximize: ascend instead of descend.
        foreach: ``False`` forces the per-tensor loop (reference path).
    """

    def __init__(
        self,
        params,
        lr: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        trust_coefficient: float = 0.001,
        eps: float = 0.0,
        trust_clip: tuple[float, float] | None = None,
        layer_adaptation: bool = True,
        exclude_1d: bool = True,
        maximize: bool = False,
        foreach: bool | None = None,
    ):
        check_range("lr", lr, 0.0)
        check_range("momentum", momentum, 0.0, 1.0, hi_open=True)
        check_range("weight_decay", weight_decay, 0.0)
        check_range("dampening", dampening, 0.0, 1.0)
        check_range("trust_coefficient", trust_coefficient, 0.0, lo_open=True)
        check_range("eps", eps, 0.0)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov=True requires momentum > 0 and dampening = 0")
        if trust_clip is not None:
            trust_clip = (float(trust_clip[0]), float(trust_clip[1]))
            if not 0 <= trust_clip[0] <= trust_clip[1]:
                raise ValueError(f"invalid trust_clip={trust_clip!r}: expected (min, max) with 0 <= min <= max")
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, dampening=dampening, nesterov=nesterov,
            trust_coefficient=trust_coefficient, eps=eps, trust_clip=trust_clip,
            layer_adaptation=layer_adaptation, exclude_1d=exclude_1d, maximize=maximize, foreach=foreach,
        )
        super().__init__(params, defaults)
        self._last_trust: dict[str, torch.Tensor] = {}

    # -- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _adapted(group, p: torch.Tensor) -> bool:
        return bool(group["layer_adaptation"]) and not (group["exclude_1d"] and p.ndim <= 1)

    def _init_state(self, params, momentum: float) -> list[bool]:
        """Creates missing state; returns per parameter whether its momentum buffer is new. As in
        torch.optim.SGD, a new buffer takes the first update undamped (``v = d``); a buffer in the
        state (also from an old checkpoint) means the parameter has taken a momentum step."""
        fresh = []
        for p in params:
            st = self.state[p]
            if "step" not in st:
                st["step"] = torch.tensor(0.0)
            new = momentum > 0 and "momentum_buffer" not in st
            if new:
                st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            fresh.append(new)
        return fresh

    @torch.no_grad()
    def step(self, closure=None):
        loss = eval_closure(closure)
        self._last_trust = {}
        for gi, group in enumerate(self.param_groups):
            idx, params, grads, _ = collect(group, self.state, ())
            if not params:
                continue
            for g in grads:
                if g.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients; route sparse embeddings to "
                                       "SparseAdam/Adagrad/FTRL (build_optimizer does this for nn.Module inputs)")
            mom = group["momentum"]
            fresh = self._init_state(params, mom)
            bump_steps([self.state[p] for p in params])
            if group["foreach"] is False:
                self._step_single(gi, group, idx, params, grads, fresh)
            else:
                self._step_foreach(gi, group, idx, params, grads, fresh)
        return loss

    # -- multi-tensor path -----------------------------------------------------------------------
    def _step_foreach(self, gi, group, idx, params, grads, fresh):
        """Allocation-free: the per-tensor factor ``lr * trust`` enters through addcmul with 0-d
        tensors, so no scaled copy of the gradient is materialised and nothing syncs with the device."""
        lr, mom, damp, wd = group["lr"], group["momentum"], group["dampening"], group["weight_decay"]
        bufs = [self.state[p].get("momentum_buffer") for p in params] if mom > 0 else list(grads)
        for b_idx, (bp, bg, bb) in group_tensors(params, grads, bufs):
            if group["maximize"]:
                bg = torch._foreach_neg(bg)
            adapted = [self._adapted(group, p) for p in bp]
            wds = [wd if (a or not (group["exclude_1d"] and p.ndim <= 1)) else 0.0 for a, p in zip(adapted, bp)]
            one = bp[0].new_ones(())
            if any(adapted):
                sel = [j for j, a in enumerate(adapted) if a]
                w_norm = torch.stack(torch._foreach_norm([bp[j] for j in sel]))
                g_norm = torch.stack(torch._foreach_norm([bg[j] for j in sel]))
                tr = trust_ratios(w_norm, g_norm, group["trust_coefficient"], wd, group["eps"], group["trust_clip"])
                tr_list = tr.to(bp[0].dtype).unbind()
                trust = [one] * len(bp)
                for j, t in zip(sel, tr_list):
                    trust[j] = t
                    self._last_trust[param_name(group, idx[b_idx[j]], gi)] = tr[sel.index(j)]
            else:
                trust = [one] * len(bp)
            has_wd = any(w != 0 for w in wds)
            wd_trust = [t * w for t, w in zip(trust, wds)] if has_wd else None
            if mom == 0:
                if has_wd:  # w <- w (1 - lr trust wd) - lr trust g
                    torch._foreach_mul_(bp, [1.0 - lr * x for x in wd_trust])
                torch._foreach_addcmul_(bp, bg, trust, value=-lr)
                continue
            # v <- m v + (1 - damp) lr trust (g + wd w); a fresh (zero) buffer takes it undamped, as torch SGD
            torch._foreach_mul_(bb, mom)
            scale = ([lr if fresh[k] else lr * (1.0 - damp) for k in b_idx] if damp and any(fresh[k] for k in b_idx)
                     else lr * (1.0 - damp))
            torch._foreach_addcmul_(bb, bg, trust, scale)
            if has_wd:
                torch._foreach_addcmul_(bb, bp, wd_trust, scale)
            if group["nesterov"]:  # w <- w - (m v + lr trust (g + wd w))
                if has_wd:
                    torch._foreach_mul_(bp, [1.0 - lr * x for x in wd_trust])
                torch._foreach_addcmul_(bp, bg, trust, value=-lr)
                torch._foreach_add_(bp, bb, alpha=-mom)
            else:
                torch._foreach_sub_(bp, bb)

    # -- reference per-tensor path ---------------------------------------------------------------
    def _step_single(self, gi, group, idx, params, grads, fresh):
        lr, mom, damp, wd = group["lr"], group["momentum"], group["dampening"], group["weight_decay"]
        for i, p, g, new in zip(idx, params, grads, fresh):
            if group["maximize"]:
                g = -g
            if self._adapted(group, p):
                w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                trust = trust_ratios(w_norm, g_norm, group["trust_coefficient"], wd, group["eps"],
                                     group["trust_clip"])
                self._last_trust[param_name(group, i, gi)] = trust
                d = (g + wd * p) * (lr * trust)
            else:
                w = 0.0 if (group["exclude_1d"] and p.ndim <= 1) else wd
                d = (g + w * p) * lr
            if mom == 0:
                p.sub_(d)
                continue
            buf = self.state[p]["momentum_buffer"]
            buf.mul_(mom).add_(d, alpha=1.0 if new else 1.0 - damp)
            if group["nesterov"]:
                p.sub_(d + mom * buf)
            else:
                p.sub_(buf)
