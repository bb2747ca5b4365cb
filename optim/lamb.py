"""LAMB: layer-wise adaptive moments for large-batch training (You et al. 2020, arXiv:1904.00962).

Algorithm 2 of the paper, per parameter tensor ("layer") ``w`` with gradient ``g`` at step t::

    m = b1 * m + (1 - b1) * g                 ((1 - b1) -> 1 with grad_averaging=False)
    v = b2 * v + (1 - b2) * g^2
    r = m_hat / (sqrt(v_hat) + eps)           (m_hat, v_hat bias corrected unless bias_correction=False)
    u = r + wd * w
    trust = phi(||w||) / ||u||                (1 when ||w|| == 0 or ||u|| == 0)
    trust = clamp(trust, *trust_clip)         (optional trust-ratio clipping)
    w = w - lr * trust * u

``phi`` is the identity, or ``clamp(., *weight_norm_clip)`` (``(0, 10)`` reproduces the common
open-source LAMB / ``pytorch_optimizer.Lamb``). Excluded tensors (group flag
``layer_adaptation=False``, or ``ndim <= 1`` with ``exclude_1d=True``) use ``trust = 1`` -- an
Adam step -- and the 1-D rule also drops their weight decay, as in BERT's LAMB.

Multi-tensor: all arithmetic is ``torch._foreach_*`` per (device, dtype) bucket; the bias
corrections are folded into scalars so the update costs a few passes more than torch's Adam.
Hyperparameters live in ``param_groups`` (Horovod rebuilds the optimizer from them).
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

from ._utils import (eval_closure, TrustRatioLogging, ScratchBuffers, adam_direction_, bump_steps, check_betas,
                     check_range, collect, group_tensors, param_name, split_by_step)

__all__ = ["LAMB"]


def _clip_pair(name, value):
    if value is None:
        return None
    lo, hi = float(value[0]), float(value[1])
    if not 0 <= lo <= hi:
        raise ValueError(f"invalid {name}={value!r}: expected (min, max) with 0 <= min <= max")
    return (lo, hi)


class LAMB(TrustRatioLogging, Optimizer):
    """Layer-wise Adaptive Moments optimizer for Batch training.

    Args:
        params: parameters, named parameters or param-group dicts.
        lr: learning rate (1e-3).
        betas: ``(b1, b2)`` moment decay rates ((0.9, 0.999)).
        eps: added to ``sqrt(v_hat)`` (1e-6, as in the paper's BERT runs).
        weight_decay: ``wd`` added to the update (not to the gradient) before the trust ratio (0.01).
        bias_correction: Adam bias correction of m and v (True).
        grad_averaging: use ``(1 - b1)`` for the gradient in m (True).
        weight_norm_clip: ``(lo, hi)`` clamp of ``||w||`` (the paper's phi) or ``None`` (identity).
        trust_clip: ``(min, max)`` clamp of the trust ratio, or ``None``.
        layer_adaptation: group flag; ``False`` gives an Adam(+decoupled L2) step for the group.
        exclude_1d: tensors with ``ndim <= 1`` get no layer adaptation and no weight decay (True).
        maximize: ascend instead of descend.
        foreach: ``False`` forces the per-tensor reference loop.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        bias_correction: bool = True,
        grad_averaging: bool = True,
        weight_norm_clip: tuple[float, float] | None = None,
        trust_clip: tuple[float, float] | None = None,
        layer_adaptation: bool = True,
        exclude_1d: bool = True,
        maximize: bool = False,
        foreach: bool | None = None,
    ):
        check_range("lr", lr, 0.0)
        check_betas(betas)
        check_range("eps", eps, 0.0)
        check_range("weight_decay", weight_decay, 0.0)
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
            grad_averaging=grad_averaging, weight_norm_clip=_clip_pair("weight_norm_clip", weight_norm_clip),
            trust_clip=_clip_pair("trust_clip", trust_clip), layer_adaptation=layer_adaptation,
            exclude_1d=exclude_1d, maximize=maximize, foreach=foreach,
        )
        super().__init__(params, defaults)
        self._last_trust: dict[str, torch.Tensor] = {}
        self._scratch = ScratchBuffers()

    @staticmethod
    def _adapted(group, p) -> bool:
        return bool(group["layer_adaptation"]) and not (group["exclude_1d"] and p.ndim <= 1)

    def _init_state(self, params):
        for p in params:
            st = self.state[p]
            if "step" not in st:
                st["step"] = torch.tensor(0.0)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    @staticmethod
    def _trust(w_norm, u_norm, group):
        if group["weight_norm_clip"] is not None:
            w_norm = w_norm.clamp(*group["weight_norm_clip"])
        ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
        if group["trust_clip"] is not None:
            ratio = ratio.clamp(*group["trust_clip"])
        return ratio

    @torch.no_grad()
    def step(self, closure=None):
        loss = eval_closure(closure)
        self._last_trust = {}
        for gi, group in enumerate(self.param_groups):
            idx, params, grads, _ = collect(group, self.state, ())
            if not params:
                continue
            if any(g.is_sparse for g in grads):
                raise RuntimeError("LAMB does not support sparse gradients; route sparse embeddings to "
                                   "SparseAdam/Adagrad/FTRL (build_optimizer does this for nn.Module inputs)")
            self._init_state(params)
            # each tensor's own step count: one whose grad was None on some steps lags behind the others
            bump_steps([self.state[p] for p in params])
            if group["foreach"] is False:
                self._step_single(gi, group, idx, params, grads)
            else:
                self._step_foreach(gi, group, idx, params, grads)
        return loss

    # -- multi-tensor path -----------------------------------------------------------------------
    def _step_foreach(self, gi, group, idx, params, grads):
        lr, wd = group["lr"], group["weight_decay"]
        m_list = [self.state[p]["exp_avg"] for p in params]
        v_list = [self.state[p]["exp_avg_sq"] for p in params]
        u_list = self._scratch.many(params)
        steps = [float(self.state[p]["step"]) for p in params]
        for b_idx, (bp, bg, bm, bv, bu) in group_tensors(params, grads, m_list, v_list, u_list):
            # bias corrections from each tensor's own step: one sub-bucket per distinct step count
            for t, (sg, sm, sv, su) in split_by_step(steps, b_idx, bg, bm, bv, bu):
                self._direction_(group, su, sg, sm, sv, t)
            adapted = [self._adapted(group, p) for p in bp]
            wds = [wd if (a or not (group["exclude_1d"] and p.ndim <= 1)) else 0.0 for a, p in zip(adapted, bp)]
            # u <- r + wd * w
            for w in set(wds):
                if w:
                    sel = [j for j, x in enumerate(wds) if x == w]
                    torch._foreach_add_([bu[j] for j in sel], [bp[j] for j in sel], alpha=w)
            if any(adapted):
                w_norm = torch.stack(torch._foreach_norm(bp))
                u_norm = torch.stack(torch._foreach_norm(bu))
                trust = self._trust(w_norm, u_norm, group)
                if not all(adapted):
                    mask = torch.tensor(adapted, device=trust.device)
                    trust = torch.where(mask, trust, torch.ones_like(trust))
                for j, k in enumerate(b_idx):
                    if adapted[j]:
                        self._last_trust[param_name(group, idx[k], gi)] = trust[j]
                # w <- w - lr * trust * u   (one pass, trust stays on the device)
                torch._foreach_addcmul_(bp, bu, trust.to(bp[0].dtype).unbind(), value=-lr)
            else:
                torch._foreach_add_(bp, bu, alpha=-lr)

    @staticmethod
    def _direction_(group, u, grads, m, v, t):
        """u <- r = m_hat / (sqrt(v_hat) + eps) for one bucket at step t, moments updated in the same (fused) pass."""
        b1, b2 = group["betas"]
        eps = group["eps"]
        if group["grad_averaging"]:
            adam_direction_(u, grads, m, v, t, b1, b2, eps, maximize=group["maximize"],
                            bias_correction=group["bias_correction"])
            return
        g = torch._foreach_neg(grads) if group["maximize"] else grads
        torch._foreach_mul_(m, b1)
        torch._foreach_add_(m, g)
        bc1 = 1.0 - b1**t if group["bias_correction"] else 1.0
        bc2_sqrt = math.sqrt(1.0 - b2**t) if group["bias_correction"] else 1.0
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, g, g, 1.0 - b2)
        torch._foreach_copy_(u, v)
        torch._foreach_sqrt_(u)
        torch._foreach_add_(u, eps * bc2_sqrt)
        torch._foreach_reciprocal_(u)
        torch._foreach_mul_(u, m)
        torch._foreach_mul_(u, bc2_sqrt / bc1)

    # -- reference per-tensor path ---------------------------------------------------------------
    def _step_single(self, gi, group, idx, params, grads):
        b1, b2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        for i, p, g in zip(idx, params, grads):
            if group["maximize"]:
                g = -g
            st = self.state[p]
            t = float(st["step"])
            m, v = st["exp_avg"], st["exp_avg_sq"]
            m.mul_(b1).add_(g, alpha=(1.0 - b1) if group["grad_averaging"] else 1.0)
            v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
            bc1 = 1.0 - b1**t if group["bias_correction"] else 1.0
            bc2 = 1.0 - b2**t if group["bias_correction"] else 1.0
            r = (m / bc1) / ((v / bc2).sqrt() + eps)
            adapted = self._adapted(group, p)
            w = wd if (adapted or not (group["exclude_1d"] and p.ndim <= 1)) else 0.0
            u = r + w * p
            if adapted:
                trust = self._trust(torch.linalg.vector_norm(p), torch.linalg.vector_norm(u), group)
                self._last_trust[param_name(group, i, gi)] = trust
                p.sub_(u * (lr * trust))
            else:
                p.sub_(u, alpha=lr)
