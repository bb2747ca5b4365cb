"""SVRG: stochastic variance-reduced gradient (Johnson & Zhang 2013, NeurIPS), as a training
strategy for finite-sum (convex) models, with the proximal variant of Xiao & Zhang 2014 for L1.

Every ``snapshot_interval`` epochs the training loop calls :meth:`SVRG.on_epoch_start`, which stores
the snapshot ``w~ = w`` and its full gradient ``mu = grad F(w~)``. Each step on a minibatch i then
uses the variance-reduced direction::

    v = grad f_i(w) - grad f_i(w~) + mu
    w = prox_{lr * l1}(w - lr * (v + wd * w))

(option I of the paper: the snapshot is the last iterate of the previous stage).

Loop contract (also in docs/optim.md)::

    opt = SVRG(model.parameters(), lr=0.05)
    for epoch in range(E):
        opt.on_epoch_start(model, lambda m: ((loss_fn(m(x), y), len(x)) for x, y in loader))
        for x, y in loader:
            opt.step(lambda: loss_fn(model(x), y))     # the closure returns the loss, no backward()

The closure is evaluated twice per step (at w and at w~); gradients come from
``torch.autograd.grad`` and are averaged across Horovod ranks, so every rank takes the same step.
"""

from __future__ import annotations

import torch

from ._vr import VarianceReduced

__all__ = ["SVRG"]


class SVRG(VarianceReduced):
    """Stochastic variance-reduced gradient with snapshot hook ``on_epoch_start(model, full_grad_fn)``.

    Args:
        params: parameters, named parameters or param-group dicts.
        lr: constant step size (SVRG's theory: about 1/(10 L) for an L-smooth loss).
        weight_decay: L2 term ``wd * w`` added to the (deterministic) direction.
        l1: L1 strength handled by a proximal step (Prox-SVRG).
        snapshot_interval: epochs between snapshots (1; the paper uses m = 2n inner steps ~ 2 epochs).
    """

    def __init__(self, params, lr: float = 0.01, weight_decay: float = 0.0, l1: float = 0.0,
                 snapshot_interval: int = 1):
        if int(snapshot_interval) != snapshot_interval or snapshot_interval < 1:
            raise ValueError(f"invalid snapshot_interval={snapshot_interval!r}: expected an integer >= 1")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, l1=l1,
                                      snapshot_interval=int(snapshot_interval)))

    def on_epoch_start(self, model=None, full_grad_fn=None) -> bool:
        """Epoch-boundary hook. Takes a new snapshot (and its full gradient) every
        ``snapshot_interval`` epochs; returns True when it did."""
        params = self._params()
        epochs_before = int(self.state[params[0]].get("epochs", torch.tensor(0.0))) if params else 0
        self._bump("epochs", params)
        if epochs_before % self.param_groups[0]["snapshot_interval"] != 0:
            return False
        if full_grad_fn is None:
            raise ValueError("SVRG.on_epoch_start needs full_grad_fn(model) -> loss or iterable of "
                             "(loss, weight) over the whole (local) dataset")
        mu = self._full_gradient(full_grad_fn, model, params)
        with torch.no_grad():
            for p, g in zip(params, mu):
                st = self.state[p]
                st["snapshot"] = p.detach().clone(memory_format=torch.preserve_format)
                st["full_grad"] = g
        return True

    def step(self, closure=None):
        if closure is None:
            raise RuntimeError("SVRG.step needs a closure returning the minibatch loss (no backward())")
        params = self._params()
        if not params or "snapshot" not in self.state[params[0]]:
            raise RuntimeError("SVRG: call on_epoch_start(model, full_grad_fn) before the first step")
        loss, g_w, _ = self._loss_and_grads(closure, params)
        with torch.no_grad():
            current = [p.detach().clone() for p in params]
            torch._foreach_copy_(params, [self.state[p]["snapshot"] for p in params])
        try:
            _, g_s, _ = self._loss_and_grads(closure, params)
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, current)
        with torch.no_grad():
            torch._foreach_sub_(g_w, g_s)
            torch._foreach_add_(g_w, [self.state[p]["full_grad"] for p in params])
        self._bump("step", params)
        self._apply(dict(zip(params, g_w)))
        return loss
