"""Proximal gradient methods for L1-regularised problems: ISTA and FISTA (Beck & Teboulle 2009,
"A Fast Iterative Shrinkage-Thresholding Algorithm for Linear Inverse Problems").

Minimise ``f(x) + l1 * ||x||_1 + (l2 / 2) * ||x||^2`` with ``f`` smooth (the model loss)::

    ISTA:   x_{k+1} = prox(x_k - lr * grad f(x_k))
    FISTA:  x_{k+1} = prox(y_k - lr * grad f(y_k))
            t_{k+1} = (1 + sqrt(1 + 4 t_k^2)) / 2
            y_{k+1} = x_{k+1} + ((t_k - 1) / t_{k+1}) * (x_{k+1} - x_k)

    prox(v) = soft_threshold(v, lr * l1) / (1 + lr * l2),   soft_threshold(v, a) = sign(v) max(|v| - a, 0)

``lr`` should be ``1/L`` for an L-smooth ``f``; with ``line_search=True`` and a closure, the
backtracking of Beck & Teboulle shrinks ``lr`` by ``ls_factor`` until
``f(x+) <= f(y) + <g, x+ - y> + ||x+ - y||^2 / (2 lr)``. FISTA's optional adaptive restart
(O'Donoghue & Candes 2015, gradient scheme) resets the momentum when
``<y_k - x_{k+1}, x_{k+1} - x_k> > 0``.

The model parameters hold the point where the gradient is evaluated (``y`` for FISTA); the last
proximal iterate ``x`` is in ``state['x']`` and returned by :meth:`FISTA.primal_iterates`.
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

from ._utils import ScratchBuffers, check_range, collect, eval_closure, group_tensors

__all__ = ["ISTA", "FISTA", "soft_threshold_"]


def _scalar(x) -> float:
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def _prox_(xs: list[torch.Tensor], clip: list[torch.Tensor], thresh: float, shrink: float) -> None:
    """In place ``xs <- soft_threshold(xs, thresh) / shrink`` using ``clip`` as work space."""
    if thresh > 0:
        torch._foreach_copy_(clip, xs)
        torch._foreach_clamp_min_(clip, -thresh)
        torch._foreach_clamp_max_(clip, thresh)
        torch._foreach_sub_(xs, clip)
    if shrink != 1.0:
        torch._foreach_div_(xs, shrink)


def soft_threshold_(tensors: list[torch.Tensor], thresh: float, shrink: float = 1.0) -> None:
    """In place ``sign(v) * max(|v| - thresh, 0) / shrink`` on a list of same-device/dtype tensors."""
    if thresh > 0:
        clipped = torch._foreach_clamp_min(tensors, -thresh)
        torch._foreach_clamp_max_(clipped, thresh)
        torch._foreach_sub_(tensors, clipped)  # v - clamp(v, -a, a)
    if shrink != 1.0:
        torch._foreach_div_(tensors, shrink)


class ISTA(Optimizer):
    """Proximal gradient descent (ISTA) with optional backtracking line search.

    Args:
        params: parameters, named parameters or param-group dicts.
        lr: step size, ideally 1/L (required).
        l1: L1 strength (group key; 0 for unpenalised parameters such as an intercept).
        l2: L2 strength handled in the prox (elastic net); 0 by default.
        line_search: backtracking on ``lr`` (needs a closure that returns the smooth loss f).
        ls_factor: multiplicative decrease of ``lr`` during backtracking (0.5).
        maximize is not supported (minimisation problems only).
    """

    _momentum = False

    def __init__(self, params, lr: float = 1e-2, l1: float = 0.0, l2: float = 0.0, line_search: bool = False,
                 ls_factor: float = 0.5, restart: bool = False, foreach: bool | None = None):
        check_range("lr", lr, 0.0, lo_open=True)
        check_range("l1", l1, 0.0)
        check_range("l2", l2, 0.0)
        check_range("ls_factor", ls_factor, 0.0, 1.0, lo_open=True, hi_open=True)
        defaults = dict(lr=lr, l1=l1, l2=l2, line_search=line_search, ls_factor=ls_factor, restart=restart,
                        foreach=foreach)
        super().__init__(params, defaults)
        self._scratch = ScratchBuffers()

    # -- helpers ---------------------------------------------------------------------------------------
    def _state(self, p):
        st = self.state[p]
        if "step" not in st:
            st["step"] = torch.tensor(0.0)
            if self._momentum:
                st["x"] = p.detach().clone(memory_format=torch.preserve_format)
                st["t"] = torch.tensor(1.0, dtype=torch.float64)
        return st

    def _prox_step(self, group, ys, grads):
        """x_new = prox(y - lr g) for one group; returns the list of new tensors."""
        lr = group["lr"]
        out: list = [None] * len(ys)
        for indices, (by, bg) in group_tensors(ys, grads):
            x = torch._foreach_add(by, bg, alpha=-lr)
            soft_threshold_(x, lr * group["l1"], 1.0 + lr * group["l2"])
            for i, xi in zip(indices, x):
                out[i] = xi
        return out

    @torch.no_grad()
    def step(self, closure=None):
        groups = []
        for group in self.param_groups:
            _, params, grads, _ = collect(group, self.state, ())
            if any(g.is_sparse for g in grads):
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            groups.append((group, params))
        needs_ls = any(g["line_search"] for g, _ in groups)
        if needs_ls and closure is None:
            raise RuntimeError("line_search=True needs a closure that returns the smooth loss f (and calls backward)")
        loss = eval_closure(closure)
        if closure is not None:  # the closure's backward decides which parameters have a gradient
            groups = [(g, [p for p in g["params"] if p.grad is not None]) for g, _ in groups]
        for (group, ps) in groups:
            for p in ps:
                self._state(p)["step"] += 1
        if not needs_ls:
            self._fast_step([(group, ps) for group, ps in groups if ps])
            return loss
        ys = [[p.detach().clone() for p in ps] for _, ps in groups]
        gs = [[p.grad.detach().clone() for p in ps] for _, ps in groups]

        while True:
            xs = [self._prox_step(group, y, g) for (group, _), y, g in zip(groups, ys, gs)]
            if not needs_ls:
                break
            # evaluate f at x_new and test the quadratic upper bound
            for (_, ps), x in zip(groups, xs):
                if ps:
                    torch._foreach_copy_(ps, x)
            with torch.enable_grad():
                f_new = _scalar(closure())
            f_y = _scalar(loss)
            bound = f_y
            for (group, _), x, y, g in zip(groups, xs, ys, gs):
                if not x:
                    continue
                diff = torch._foreach_sub(x, y)
                bound += sum(float((d * gg).sum()) for d, gg in zip(diff, g))
                bound += sum(float(n) ** 2 for n in torch._foreach_norm(diff)) / (2.0 * group["lr"])
            if f_new <= bound + 1e-12 * max(1.0, abs(f_y)):
                break
            for group, _ in groups:
                if group["line_search"]:
                    group["lr"] *= group["ls_factor"]
            if all(group["lr"] < 1e-20 for group, _ in groups):
                raise RuntimeError("line search failed: step size underflow (is the closure's loss smooth?)")

        if not self._momentum:
            for (_, ps), x in zip(groups, xs):
                if ps:
                    torch._foreach_copy_(ps, x)
            return loss
        self._fista_update([(ps, x, y) for (_, ps), x, y in zip(groups, xs, ys) if ps],
                           any(g["restart"] for g, ps in groups if ps))
        return loss

    def _fast_step(self, groups):
        """Allocation-free step without line search (persistent scratch buffers, x swapped in).
        FISTA's momentum sequence ``t`` and its restart test belong to the whole iterate, every
        group's parameters together (until the twenty-fifth session each group had its own, so
        the biases' group, which ``build_optimizer`` always makes, restarted on its own)."""
        x_new_of = []
        for group, ps in groups:
            lr, l1, l2 = group["lr"], group["l1"], group["l2"]
            grads = [p.grad for p in ps]
            clip = self._scratch.many(ps, "clip")
            if not self._momentum:
                for _, (bp, bg, bc) in group_tensors(ps, grads, clip):
                    torch._foreach_add_(bp, bg, alpha=-lr)
                    _prox_(bp, bc, lr * l1, 1.0 + lr * l2)
                continue
            x_old = [self.state[p]["x"] for p in ps]
            x_new = self._scratch.many(ps, "x_new")
            for _, (by, bg, bc, bxo, bxn) in group_tensors(ps, grads, clip, x_old, x_new):
                torch._foreach_copy_(bxn, by)
                torch._foreach_add_(bxn, bg, alpha=-lr)
                _prox_(bxn, bc, lr * l1, 1.0 + lr * l2)
            x_new_of.append((ps, x_new, x_old))
        if not self._momentum:
            return
        coef, t_next = self._extrapolation(any(group["restart"] for group, _ in groups), x_new_of)
        for ps, x_new, x_old in x_new_of:
            for _, (by, bxo, bxn) in group_tensors(ps, x_old, x_new):
                torch._foreach_copy_(by, bxn)            # y = x_new + coef (x_new - x_old)
                if coef:
                    torch._foreach_mul_(by, 1.0 + coef)
                    torch._foreach_add_(by, bxo, alpha=-coef)
            for p, xn, xo in zip(ps, x_new, x_old):
                self.state[p]["x"] = xn                   # swap buffers instead of copying
                self._scratch.put(p, "x_new", xo)
        self._set_t(t_next)

    def _extrapolation(self, restart_on: bool, iterates) -> tuple[float, float]:
        """(the extrapolation coefficient, the next ``t``) of the whole iterate (``iterates``:
        ``(y, x_new, x_old)`` lists per group), with the gradient restart
        ``<y - x_new, x_new - x_old> > 0`` when ``restart_on``: then ``(0, 1)``."""
        t = self._t()
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        if restart_on:
            dot = sum(float(torch.dot((y - xn).flatten(), (xn - xo).flatten()))
                      for ys, x_new, x_old in iterates for y, xn, xo in zip(ys, x_new, x_old))
            if dot > 0:
                return 0.0, 1.0
        return (t - 1.0) / t_next, t_next

    def _t(self) -> float:
        """FISTA's ``t``, one for the whole iterate (kept in every parameter's state: a parameter
        whose state is new this step starts at 1, below the others)."""
        return max((float(st["t"]) for st in self.state.values() if "t" in st), default=1.0)

    def _set_t(self, value: float) -> None:
        for st in self.state.values():
            if "t" in st:
                st["t"].fill_(value)

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._scratch.clear()
        # torch casts every state tensor but `step` to its parameter's dtype: FISTA's float64 `t`
        # came back float32 (resumed runs differed from uninterrupted ones in the 8th digit)
        saved = [i for g in state_dict["param_groups"] for i in g["params"]]
        mine = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved, mine):
            t = state_dict["state"].get(i, {}).get("t")
            if t is not None and p in self.state:
                self.state[p]["t"] = torch.as_tensor(t).detach().clone().to(torch.float64)

    def _fista_update(self, groups, restart_on: bool):
        """The line-search path's momentum step over every group (``(params, x_new, y)``), with
        one ``t`` and one restart test, as :meth:`_fast_step`."""
        coef, t_next = self._extrapolation(restart_on, [(y, x_new, [self.state[p]["x"] for p in ps])
                                                   for ps, x_new, y in groups])
        for ps, x_new, _ in groups:
            x_old = [self.state[p]["x"] for p in ps]
            if coef:  # y = x_new + coef (x_new - x_old)
                y_new = torch._foreach_sub(x_new, x_old)
                torch._foreach_mul_(y_new, coef)
                torch._foreach_add_(y_new, x_new)
                torch._foreach_copy_(ps, y_new)
            else:  # a restart (or t = 1): y = x_new
                torch._foreach_copy_(ps, x_new)
            torch._foreach_copy_(x_old, x_new)
        self._set_t(t_next)

    def primal_iterates(self) -> list[torch.Tensor]:
        """The proximal iterates x (sparse; equal to the parameters for ISTA)."""
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p, {})
                out.append(st["x"] if "x" in st else p.detach())
        return out

    def diagnostics(self) -> dict[str, float]:
        xs = self.primal_iterates()
        nnz = sum(int((x != 0).sum()) for x in xs)
        tot = sum(x.numel() for x in xs)
        return {"prox/nonzero_fraction": nnz / max(tot, 1), "prox/lr": float(self.param_groups[0]["lr"])}


class FISTA(ISTA):
    """Accelerated proximal gradient (FISTA), optional adaptive restart (``restart=True``)."""

    _momentum = True
