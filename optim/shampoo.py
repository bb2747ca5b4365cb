"""Shampoo: preconditioned stochastic tensor optimization (Gupta, Koren & Singer 2018, arXiv:1802.09568),
with the practical extensions of Anil et al. 2020 ("Scalable Second Order Optimization for Deep
Learning", arXiv:2002.09018): block-diagonal preconditioners, inverse roots every k steps and
layer-wise grafting.

For a parameter viewed as a matrix ``W`` (m x n; tensors of order > 2 are flattened to
``(shape[0], prod(shape[1:]))``) and its gradient ``G``::

    L = b * L + a * G G^T            R = b * R + a * G^T G         (a = 1 and b = 1: Gupta's sums)
    every k steps:  L_inv = L^(-1/p_L),  R_inv = R^(-1/p_R)         (eigendecomposition, relative ridge)
    S = L_inv @ M @ R_inv             M = bias-corrected EMA of G (beta1), = G for beta1 = 0
    S <- S * ||D|| / ||S||            grafting: D is the Adam/AdaGrad/SGD direction (per block)
    W = W * (1 - lr * wd) - lr * S

With both sides preconditioned ``p_L = p_R = 4`` (Gupta's ``-1/(2k)`` for order k = 2); with one side
``p = 2`` (full-matrix AdaGrad on that side).

* Block-diagonal preconditioners: a dimension larger than ``block_size`` is cut into blocks of
  ``block_size`` (the last one zero-padded; padding decouples exactly, so it equals a smaller
  block); each block has its own L and R, and all blocks of a tensor go through one batched
  ``bmm``/``eigh``.
* A dimension larger than ``max_precond_dim`` (embedding rows) is not preconditioned (identity on
  that side), so a ``(V, d)`` embedding gets ``G @ R^(-1/2)`` with a single small ``d x d`` factor.
* 1-D tensors (biases, norms) take the graft direction alone (``precondition_1d=False``), which
  with ``graft='adam'`` is exactly an AdamW step.
* Until the first inverse roots exist (``step < start_preconditioning_step``) every tensor takes
  the graft direction.

Distributed: statistics and roots are computed from the (Horovod-averaged) gradient with
deterministic kernels, so preconditioners are identical on every rank; all hyperparameters live in
param groups and all preconditioner tensors in ``state`` (state_dict round trip, broadcast).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim import Optimizer

from ._utils import (eval_closure, ScratchBuffers, adam_direction_, bump_steps, check_betas, check_range, collect,
                     group_tensors, split_by_step)

__all__ = ["Shampoo", "matrix_inverse_root"]

_GRAFTS = ("adam", "adagrad", "sgd", "none")


def matrix_inverse_root(mats: torch.Tensor, p: float, eps: float, dtype=torch.float64) -> torch.Tensor:
    """Batched ``A^(-1/p)`` of symmetric PSD matrices ``(..., n, n)`` through ``eigh`` with the ridge
    ``eps * lambda_max`` (relative, Anil et al.) added to every eigenvalue (floored at 1e-30)."""
    a = mats.to(dtype)
    a = 0.5 * (a + a.transpose(-1, -2))
    lam, q = torch.linalg.eigh(a)
    lam_max = lam.amax(dim=-1, keepdim=True).clamp(min=0.0)
    ridge = (eps * lam_max).clamp(min=1e-30)
    lam = lam.clamp(min=0.0) + ridge
    inv = (q * lam.pow(-1.0 / p).unsqueeze(-2)) @ q.transpose(-1, -2)
    return inv.to(mats.dtype)


def _refresh_root_(inv: torch.Tensor, stats: torch.Tensor, p: float, eps: float) -> None:
    """``inv <- stats^(-1/p)`` per block; blocks with non-finite statistics or a failed
    eigendecomposition keep their previous inverse root (as the reference implementations do),
    and so do blocks whose statistics are all zero (no gradient seen yet): their root would be
    the ridge's, ``(1e-30)^(-1/p) I``."""
    flat = stats.flatten(1)
    finite = torch.isfinite(flat).all(dim=1) & (flat.abs().amax(dim=1) > 0)
    if bool(finite.all()):
        try:
            inv.copy_(matrix_inverse_root(stats, p, eps))
            return
        except torch.linalg.LinAlgError:
            pass
    for i in range(stats.shape[0]):
        if not bool(finite[i]):
            continue
        try:
            inv[i].copy_(matrix_inverse_root(stats[i], p, eps))
        except torch.linalg.LinAlgError:
            continue


@dataclass(frozen=True)
class _Plan:
    m: int
    n: int
    row: bool  # rows preconditioned (L)
    col: bool  # columns preconditioned (R)
    rb: int
    cb: int
    n_rb: int
    n_cb: int
    p_l: float
    p_r: float

    @property
    def nblk(self) -> int:
        return self.n_rb * self.n_cb

    @property
    def padded(self) -> bool:
        return self.n_rb * self.rb != self.m or self.n_cb * self.cb != self.n

    @property
    def any(self) -> bool:
        return self.row or self.col

    def blocks(self, x2d: torch.Tensor, pad_buf: torch.Tensor | None = None) -> torch.Tensor:
        """(m, n) -> (nblk, rb, cb), zero padded (into ``pad_buf``, whose padding must be zero)."""
        if self.padded:
            buf = pad_buf if pad_buf is not None else x2d.new_zeros(self.n_rb * self.rb, self.n_cb * self.cb)
            buf[: self.m, : self.n].copy_(x2d)
            x2d = buf
        if self.n_cb == 1:
            return x2d.reshape(self.n_rb, self.rb, self.cb)
        x = x2d.reshape(self.n_rb, self.rb, self.n_cb, self.cb).permute(0, 2, 1, 3)
        return x.reshape(self.nblk, self.rb, self.cb)

    def unblock(self, xb: torch.Tensor) -> torch.Tensor:
        """(nblk, rb, cb) -> (m, n)."""
        if self.n_cb == 1:
            x = xb.reshape(self.n_rb * self.rb, self.cb)
        else:
            x = xb.reshape(self.n_rb, self.n_cb, self.rb, self.cb).permute(0, 2, 1, 3)
            x = x.reshape(self.n_rb * self.rb, self.n_cb * self.cb)
        return x[: self.m, : self.n] if self.padded else x


class Shampoo(Optimizer):
    """Block-diagonal Shampoo with grafting (multi-tensor elementwise part, batched block algebra).

    Args:
        params: parameters, named parameters or param-group dicts.
        lr: learning rate (1e-3; with grafting the step size is that of the graft optimizer).
        betas: ``(b1, b2)``: EMA of the gradient that gets preconditioned (momentum) and the
            Adam-graft second moment ((0.9, 0.999)).
        eps: graft denominator epsilon (1e-8).
        weight_decay: decoupled weight decay (0).
        stat_decay: ``b`` for L/R; 1.0 accumulates sums as in Gupta et al., < 1 uses an EMA
            ``L = b L + (1-b) G G^T``.
        matrix_eps: relative ridge ``eps * lambda_max`` for the inverse roots (1e-6).
        block_size: largest preconditioner block (128). The per-step cost of a preconditioned
            tensor is about ``8 * block_size`` flops per element (two statistics products and two
            preconditioning products per block), the root refresh ``O(block_size)`` per element.
        max_precond_dim: dimensions larger than this are not preconditioned (4096; the reference
            implementation's ``skip_preconditioning_dim_size_gt``).
        precondition_interval: k, steps between inverse-root refreshes (100; Anil et al. refresh
            every few hundred steps -- stale roots cost little, eigendecompositions a lot).
        statistics_interval: steps between L/R statistics updates (1).
        start_preconditioning_step: first step that computes roots; before it the graft direction is
            used (1 = from the first step).
        graft: ``'adam'`` (default), ``'adagrad'``, ``'sgd'`` or ``'none'`` (pure Shampoo).
        inv_root_override: use ``A^(-1/r)`` for every factor instead of ``p_L, p_R``.
        precondition_1d: precondition 1-D tensors with a full-matrix (blocked) factor.
        maximize, foreach: as in torch.optim.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        stat_decay: float = 1.0,
        matrix_eps: float = 1e-6,
        block_size: int = 128,
        max_precond_dim: int = 4096,
        precondition_interval: int = 100,
        statistics_interval: int = 1,
        start_preconditioning_step: int = 1,
        graft: str = "adam",
        inv_root_override: int | None = None,
        precondition_1d: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
    ):
        check_range("lr", lr, 0.0)
        check_betas(betas)
        check_range("eps", eps, 0.0)
        check_range("weight_decay", weight_decay, 0.0)
        check_range("stat_decay", stat_decay, 0.0, 1.0, lo_open=True)
        check_range("matrix_eps", matrix_eps, 0.0)
        for name, v in (("block_size", block_size), ("max_precond_dim", max_precond_dim),
                        ("precondition_interval", precondition_interval), ("statistics_interval", statistics_interval),
                        ("start_preconditioning_step", start_preconditioning_step)):
            if int(v) != v or v < 1:
                raise ValueError(f"invalid {name}={v!r}: expected an integer >= 1")
        if graft not in _GRAFTS:
            raise ValueError(f"invalid graft={graft!r}: expected one of {', '.join(_GRAFTS)}")
        if inv_root_override is not None and (int(inv_root_override) != inv_root_override or inv_root_override < 1):
            raise ValueError(f"invalid inv_root_override={inv_root_override!r}: expected None or an integer >= 1")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, stat_decay=stat_decay,
                        matrix_eps=matrix_eps, block_size=int(block_size), max_precond_dim=int(max_precond_dim),
                        precondition_interval=int(precondition_interval),
                        statistics_interval=int(statistics_interval),
                        start_preconditioning_step=int(start_preconditioning_step), graft=graft,
                        inv_root_override=inv_root_override, precondition_1d=precondition_1d,
                        maximize=maximize, foreach=foreach)
        super().__init__(params, defaults)
        self._plans: dict = {}
        self._scratch = ScratchBuffers()
        self._rooted: set = set()  # parameters whose inverse roots exist (mirror of state['has_roots'])

    # -- planning --------------------------------------------------------------------------------------
    def _plan(self, p: torch.Tensor, group) -> _Plan:
        key = (p, group["block_size"], group["max_precond_dim"], group["precondition_1d"],
               group["inv_root_override"])
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        if p.ndim == 0:
            m, n = 1, 1
        elif p.ndim == 1:
            m, n = 1, p.shape[0]
        else:
            m, n = p.shape[0], p.numel() // p.shape[0]
        bs, mx = group["block_size"], group["max_precond_dim"]
        if p.ndim <= 1:
            row, col = False, bool(group["precondition_1d"]) and 1 < n <= mx
        else:
            row, col = 1 < m <= mx, 1 < n <= mx
        rb, n_rb = (min(bs, m), math.ceil(m / min(bs, m))) if row else (m, 1)
        cb, n_cb = (min(bs, n), math.ceil(n / min(bs, n))) if col else (n, 1)
        k = int(row) + int(col)
        if group["inv_root_override"]:
            p_l = p_r = float(group["inv_root_override"])
        else:
            p_l = p_r = 2.0 * k if k else 1.0
        plan = _Plan(m, n, row, col, rb, cb, n_rb, n_cb, p_l, p_r)
        self._plans[key] = plan
        return plan

    def _init_state(self, p, group, plan: _Plan):
        st = self.state[p]
        if "step" in st:
            return st
        st["step"] = torch.tensor(0.0)
        st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["graft"] in ("adam", "adagrad"):
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if plan.row:
            st["L"] = p.new_zeros(plan.nblk, plan.rb, plan.rb)
            st["L_inv"] = p.new_zeros(plan.nblk, plan.rb, plan.rb)
        if plan.col:
            st["R"] = p.new_zeros(plan.nblk, plan.cb, plan.cb)
            st["R_inv"] = p.new_zeros(plan.nblk, plan.cb, plan.cb)
        if plan.any:
            st["has_roots"] = torch.tensor(0.0)
        return st

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._scratch.clear()
        self._rooted = set()

    # -- step ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = eval_closure(closure)
        for group in self.param_groups:
            _, params, grads, _ = collect(group, self.state, ())
            if not params:
                continue
            if any(g.is_sparse for g in grads):
                raise RuntimeError("Shampoo does not support sparse gradients")
            if group["maximize"]:
                grads = torch._foreach_neg(grads)
            plans = [self._plan(p, group) for p in params]
            states = [self._init_state(p, group, pl) for p, pl in zip(params, plans)]
            bump_steps(states)
            self._step_group(group, params, grads, plans, states)
        return loss

    def _step_group(self, group, params, grads, plans, states):
        b1, b2 = group["betas"]
        lr, eps, wd, graft = group["lr"], group["eps"], group["weight_decay"], group["graft"]
        steps = [int(st["step"]) for st in states]
        # 1) elementwise part (multi-tensor, in place): momentum, graft statistics and graft direction D
        ms = [st["exp_avg"] for st in states]
        ds = self._scratch.many(params, "d")
        vs = [st["exp_avg_sq"] for st in states] if graft in ("adam", "adagrad") else ms
        for b_idx, bucket in group_tensors(grads, ms, vs, ds):
            # bias corrections from each tensor's own step (a tensor whose grad was None on some steps lags)
            for t, (bg, bm, bv, bd) in split_by_step(steps, b_idx, *bucket):
                bc1 = 1.0 - b1**t if b1 > 0 else 1.0
                if graft == "adam":  # D = m_hat / (sqrt(v_hat) + eps): one fused pass
                    adam_direction_(bd, bg, bm, bv, t, b1, b2, eps)
                    continue
                torch._foreach_lerp_(bm, bg, 1.0 - b1)
                if graft == "adagrad":  # D = m_hat / (sqrt(sum g^2) + eps)
                    torch._foreach_addcmul_(bv, bg, bg, 1.0)
                    torch._foreach_copy_(bd, bv)
                    torch._foreach_sqrt_(bd)
                    torch._foreach_add_(bd, eps)
                    torch._foreach_reciprocal_(bd)
                    torch._foreach_mul_(bd, bm)
                    if bc1 != 1.0:
                        torch._foreach_mul_(bd, 1.0 / bc1)
                else:  # sgd / none: D = m_hat
                    torch._foreach_copy_(bd, bm)
                    if bc1 != 1.0:
                        torch._foreach_mul_(bd, 1.0 / bc1)
        # 2) statistics, 3) inverse roots every k steps, 4) preconditioned + grafted direction, written
        #    into D (batched over the blocks of a tensor; no parameter-sized allocation when unpadded)
        a = 1.0 if group["stat_decay"] == 1.0 else 1.0 - group["stat_decay"]
        beta = group["stat_decay"]
        k, start = group["precondition_interval"], group["start_preconditioning_step"]
        for p, g, plan, st, d, t in zip(params, grads, plans, states, ds, steps):
            if not plan.any:
                continue
            # statistics and roots are due by the tensor's own step count
            stats_due = t % group["statistics_interval"] == 0
            # due every k steps from `start`; and at each step until the tensor has roots (a root
            # refused for want of statistics is tried again as soon as there are some)
            roots_due = t >= start and ((t - start) % k == 0 or (p not in self._rooted and not bool(st["has_roots"])))
            bc1 = 1.0 - b1**t if b1 > 0 else 1.0
            pad = self._pad_buffer(p, plan) if plan.padded else None
            if stats_due:
                gb = plan.blocks(g.reshape(plan.m, plan.n), pad)
                if plan.row:
                    st["L"].baddbmm_(gb, gb.transpose(1, 2), beta=beta, alpha=a)
                if plan.col:
                    st["R"].baddbmm_(gb.transpose(1, 2), gb, beta=beta, alpha=a)
            if roots_due:
                self._refresh(p, st, plan, group)
            if p not in self._rooted:
                if not bool(st["has_roots"]):
                    continue
                self._rooted.add(p)  # e.g. after load_state_dict
            direct = not plan.padded and plan.n_cb == 1  # blocks of D are a contiguous view of D
            db = plan.blocks(d.reshape(plan.m, plan.n), pad)
            d_norm = torch.linalg.vector_norm(db, dim=(1, 2)) if graft != "none" else None
            mb = plan.blocks(st["exp_avg"].reshape(plan.m, plan.n), pad)
            out = db if direct else None
            if plan.row and plan.col:
                s = torch.bmm(torch.bmm(st["L_inv"], mb), st["R_inv"], out=out)
            elif plan.row:
                s = torch.bmm(st["L_inv"], mb, out=out)
            else:
                s = torch.bmm(mb, st["R_inv"], out=out)
            if graft != "none":
                s_norm = torch.linalg.vector_norm(s, dim=(1, 2))
                s.mul_(d_norm.div_(s_norm).nan_to_num_(0.0, 0.0, 0.0).view(-1, 1, 1))
            elif bc1 != 1.0:
                s.mul_(1.0 / bc1)
            if not direct:
                d.copy_(plan.unblock(s).reshape(p.shape))
        # 5) apply (multi-tensor)
        for _, (bp, bd) in group_tensors(params, ds):
            if wd:
                torch._foreach_mul_(bp, 1.0 - lr * wd)
            torch._foreach_add_(bp, bd, alpha=-lr)

    def _refresh(self, p, st, plan: _Plan, group) -> None:
        if not bool(st["has_roots"]) and any(
                bool((st[side].flatten(1).abs().amax(dim=1) == 0).any()) for side in ("L", "R") if side in st):
            # a block without statistics yet (a zero gradient so far, or statistics_interval > 1 at the first
            # root): no root, and the step stays grafted until one exists. Until the twenty-fifth session its
            # root was the ridge's (1e-30)^(-1/p) I, kept as valid until the next refresh: with graft=none a
            # step of lr=0.01 took the weights to ~1e13, with the Adam graft nothing was preconditioned
            return
        if plan.row:
            _refresh_root_(st["L_inv"], st["L"], plan.p_l, group["matrix_eps"])
        if plan.col:
            _refresh_root_(st["R_inv"], st["R"], plan.p_r, group["matrix_eps"])
        st["has_roots"].fill_(1.0)
        self._rooted.add(p)

    def _pad_buffer(self, p, plan: _Plan) -> torch.Tensor:
        key = (p, "pad")
        buf = self._scratch._bufs.get(key)
        if buf is None:
            buf = p.new_zeros(plan.n_rb * plan.rb, plan.n_cb * plan.cb)
            self._scratch.put(p, "pad", buf)
        return buf

    @torch.no_grad()
    def refresh_preconditioners(self) -> None:
        """Recompute every inverse root now from the current statistics (the work ``step()`` does
        every ``precondition_interval`` steps; e.g. after changing ``matrix_eps``)."""
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if st and "has_roots" in st:
                    self._refresh(p, st, self._plan(p, group), group)

    # -- logging ---------------------------------------------------------------------------------------
    def diagnostics(self) -> dict[str, float]:
        n_pre = sum(1 for st in self.state.values() if "has_roots" in st and bool(st["has_roots"]))
        n_blk = sum(int(st["L"].shape[0]) if "L" in st else (int(st["R"].shape[0]) if "R" in st else 0)
                    for st in self.state.values())
        return {"shampoo/preconditioned_tensors": float(n_pre), "shampoo/blocks": float(n_blk)}
