"""FTRL-Proximal (McMahan et al. 2013, "Ad Click Prediction: a View from the Trenches", Algorithm 1).

Per coordinate i, with gradient ``g``::

    sigma = (sqrt(n + g^2) - sqrt(n)) / alpha
    z     = z + g - sigma * w
    n     = n + g^2
    w     = 0                                                   if |z| <= l1
          = -(z - sign(z) * l1) / ((beta + sqrt(n)) / alpha + l2)   otherwise

``alpha`` is ``lr``. The L1 term produces exact zeros, which is the point of FTRL for sparse logistic
regression. Sparse gradients (``nn.Embedding(sparse=True)``/``EmbeddingBag``, or a COO gradient of
a hashed feature weight vector) update only the touched rows -- the lazy form of the algorithm:
untouched coordinates keep ``(z, n)`` and therefore ``w`` (with ``beta = l2 = 0`` the formula is 0/0 at
``n = 0``: such coordinates keep ``w``). Dense gradients go through a
multi-tensor path with persistent scratch buffers.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from ._utils import eval_closure, check_range, collect, group_tensors

__all__ = ["FTRL"]


class FTRL(Optimizer):
    """FTRL-Proximal with L1/L2 regularisation; supports dense and sparse gradients.

    Args:
        params: parameters, named parameters or param-group dicts.
        lr: ``alpha`` of the per-coordinate rate ``alpha / (beta + sqrt(n))`` (0.1).
        beta: ``beta`` (1.0, the paper's recommendation).
        l1: L1 strength ``lambda_1`` (0).
        l2: L2 strength ``lambda_2`` (0).
        maximize, foreach: as in torch.optim.
    """

    def __init__(self, params, lr: float = 0.1, beta: float = 1.0, l1: float = 0.0, l2: float = 0.0,
                 maximize: bool = False, foreach: bool | None = None):
        check_range("lr", lr, 0.0, lo_open=True)
        check_range("beta", beta, 0.0)
        check_range("l1", l1, 0.0)
        check_range("l2", l2, 0.0)
        super().__init__(params, dict(lr=lr, beta=beta, l1=l1, l2=l2, maximize=maximize, foreach=foreach))
        self._scratch: dict = {}

    def _state(self, p, group):
        st = self.state[p]
        if "step" not in st:
            st["step"] = torch.tensor(0.0)
            # warm start: z0 with w(z0, n=0) == p, so the first iterate is the initialisation and
            # coordinates never touched by a (sparse) gradient keep it (z0 = 0 for p = 0)
            # (beta = l2 = 0: no z0 gives w(z0, 0) = p; z0 = -sign(p) * l1 is the limit beta -> 0)
            c = group["beta"] / group["lr"] + group["l2"]
            st["z"] = (p * c + torch.sign(p) * group["l1"]).neg_()
            st["n"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st

    def _bufs(self, p, k):
        bufs = self._scratch.get(p)
        if bufs is None or bufs[0].shape != p.shape:
            bufs = [torch.empty_like(p, memory_format=torch.preserve_format) for _ in range(2)]
            self._scratch[p] = bufs
        return bufs[k]

    @staticmethod
    def _weights(z, sqrt_n, w, lr, beta, l1, l2):
        """w from (z, sqrt(n)) for one tensor (reference formula, also used for sparse rows). With
        ``beta = l2 = 0`` the denominator is 0 where ``n = 0`` (never touched): those keep ``w``."""
        denom = (beta + sqrt_n) / lr + l2
        new = (z.clamp(-l1, l1) - z) / denom
        return torch.where(denom > 0, new, w) if not (beta or l2) else new

    @torch.no_grad()
    def step(self, closure=None):
        loss = eval_closure(closure)
        for group in self.param_groups:
            _, params, grads, _ = collect(group, self.state, ())
            lr, beta, l1, l2 = group["lr"], group["beta"], group["l1"], group["l2"]
            dense_p, dense_g = [], []
            for p, g in zip(params, grads):
                st = self._state(p, group)
                st["step"] += 1
                if group["maximize"]:
                    g = -g
                if g.is_sparse:
                    self._sparse_update(p, g, st, lr, beta, l1, l2)
                elif group["foreach"] is False:
                    z, n = st["z"], st["n"]
                    sqrt_old = n.sqrt()
                    n.addcmul_(g, g)
                    sqrt_new = n.sqrt()
                    sigma = (sqrt_new - sqrt_old) / lr
                    z.add_(g).sub_(sigma * p)
                    p.copy_(self._weights(z, sqrt_new, p, lr, beta, l1, l2))
                else:
                    dense_p.append(p)
                    dense_g.append(g)
            if dense_p:
                self._dense_foreach(group, dense_p, dense_g)
        return loss

    def _dense_foreach(self, group, params, grads):
        lr, beta, l1, l2 = group["lr"], group["beta"], group["l1"], group["l2"]
        zs = [self.state[p]["z"] for p in params]
        ns = [self.state[p]["n"] for p in params]
        s_old = [self._bufs(p, 0) for p in params]
        s_new = [self._bufs(p, 1) for p in params]
        for _, (bp, bg, bz, bn, so, sn) in group_tensors(params, grads, zs, ns, s_old, s_new):
            torch._foreach_copy_(so, bn)
            torch._foreach_sqrt_(so)                       # sqrt(n_old)
            torch._foreach_addcmul_(bn, bg, bg)            # n += g^2
            torch._foreach_copy_(sn, bn)
            torch._foreach_sqrt_(sn)                       # sqrt(n_new)
            torch._foreach_sub_(so, sn)                    # -(sqrt(n_new) - sqrt(n_old)) = -lr * sigma
            torch._foreach_add_(bz, bg)
            torch._foreach_mul_(so, bp)
            torch._foreach_add_(bz, so, alpha=1.0 / lr)    # z += g - sigma * w
            # w = (clamp(z, -l1, l1) - z) / ((beta + sqrt(n)) / lr + l2)
            torch._foreach_add_(sn, beta)
            torch._foreach_mul_(sn, 1.0 / lr)
            if l2:
                torch._foreach_add_(sn, l2)
            torch._foreach_copy_(so, bz)
            torch._foreach_clamp_min_(so, -l1)
            torch._foreach_clamp_max_(so, l1)
            torch._foreach_sub_(so, bz)
            torch._foreach_div_(so, sn)
            if beta or l2:
                torch._foreach_copy_(bp, so)
                continue
            for w, w_new, d in zip(bp, so, sn):  # beta = l2 = 0: coordinates with n = 0 keep w (0/0 otherwise)
                torch.where(d > 0, w_new, w, out=w)

    def _sparse_update(self, p, g, st, lr, beta, l1, l2):
        g = g.coalesce()
        idx = g.indices()
        vals = g.values()
        if idx.shape[0] != 1:
            # COO over several dims (rare): fall back to the dense formula on the touched entries
            g = g.to_dense()
            mask = g != 0
            z, n = st["z"], st["n"]
            sqrt_old = n[mask].sqrt()
            n[mask] += g[mask] ** 2
            sqrt_new = n[mask].sqrt()
            z[mask] += g[mask] - (sqrt_new - sqrt_old) / lr * p[mask]
            p[mask] = self._weights(z[mask], sqrt_new, p[mask], lr, beta, l1, l2)
            return
        rows = idx[0]
        z_r = st["z"].index_select(0, rows)
        n_r = st["n"].index_select(0, rows)
        w_r = p.index_select(0, rows)
        sqrt_old = n_r.sqrt()
        n_r.addcmul_(vals, vals)
        sqrt_new = n_r.sqrt()
        z_r.add_(vals).sub_((sqrt_new - sqrt_old).div_(lr).mul_(w_r))
        st["z"].index_copy_(0, rows, z_r)
        st["n"].index_copy_(0, rows, n_r)
        p.index_copy_(0, rows, self._weights(z_r, sqrt_new, w_r, lr, beta, l1, l2))

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._scratch.clear()

    def sparsity(self) -> float:
        """Fraction of exactly-zero weights across all parameters (the FTRL selling point)."""
        zeros = total = 0
        for group in self.param_groups:
            for p in group["params"]:
                zeros += int((p == 0).sum())
                total += p.numel()
        return zeros / max(total, 1)

    def diagnostics(self) -> dict[str, float]:
        return {"ftrl/sparsity": self.sparsity()}
