"""SAGA (Defazio, Bach & Lacoste-Julien 2014, NeurIPS) as a training strategy for finite-sum
(convex) models, with its proximal step for L1.

The objective is ``F(w) = (1/m) sum_j f_j(w)`` over ``m = num_components`` components -- single
examples, or fixed minibatches (component j = batch j of an unshuffled-composition loader). A table
keeps the last gradient ``a_j`` seen for every component; a step on component j uses::

    v    = grad f_j(w) - a_j + mean(a)
    mean = mean + (grad f_j(w) - a_j) / m;   a_j = grad f_j(w)
    w    = prox_{lr * l1}(w - lr * (v + wd * w))

The table starts at zero, which keeps ``v`` unbiased (only the first pass has a larger variance).
Memory is ``m x (number of parameters)``: SAGA is meant for linear/GLM-sized models.

Loop contract (also in docs/optim.md)::

    opt = SAGA(model.parameters(), lr=0.05, num_components=len(loader))
    for epoch in range(E):
        opt.on_epoch_start(model)            # re-syncs the running mean (drift), counts epochs
        for j, (x, y) in enumerate(loader):
            opt.step(lambda: loss_fn(model(x), y), index=j)
            # Horovod-friendly alternative: opt.step(lambda: (loss_fn(model(x), y), j))

Gradients come from ``torch.autograd.grad`` on the closure's loss and are averaged across Horovod
ranks (so j must name the same global component on every rank).
"""

from __future__ import annotations

import torch

from ._vr import VarianceReduced

__all__ = ["SAGA"]


class SAGA(VarianceReduced):
    """SAGA with a per-component gradient table.

    Args:
        params: parameters, named parameters or param-group dicts.
        lr: constant step size (theory: 1/(3 L)).
        num_components: m, the number of components of the finite sum (required).
        weight_decay: L2 term added to the direction.
        l1: L1 strength handled by a proximal step.
    """

    def __init__(self, params, lr: float = 0.01, num_components: int = 0, weight_decay: float = 0.0,
                 l1: float = 0.0):
        if int(num_components) != num_components or num_components < 1:
            raise ValueError(f"invalid num_components={num_components!r}: SAGA needs the number of components "
                             "(examples or fixed minibatches) of the finite sum, an integer >= 1")
        super().__init__(params, dict(lr=lr, num_components=int(num_components), weight_decay=weight_decay, l1=l1))

    def _table(self, p, m):
        st = self.state[p]
        if "table" not in st:
            st["table"] = p.new_zeros((m, *p.shape))
            st["mean"] = torch.zeros_like(p)
        return st

    def on_epoch_start(self, model=None, full_grad_fn=None) -> bool:
        """Epoch-boundary hook: recomputes ``mean(a)`` from the table (removes floating-point drift of
        the running mean). SAGA needs no full gradient; ``full_grad_fn`` is accepted and ignored."""
        params = self._params()
        self._bump("epochs", params)
        with torch.no_grad():
            for p in params:
                st = self.state[p]
                if "table" in st:
                    st["mean"].copy_(st["table"].mean(dim=0))
        return False

    def step(self, closure=None, index: int | None = None):
        if closure is None:
            raise RuntimeError("SAGA.step needs a closure returning the minibatch loss (no backward())")
        params = self._params()
        loss, grads, extra = self._loss_and_grads(closure, params)
        j = index if index is not None else extra
        m = self.param_groups[0]["num_components"]
        if j is None:
            raise RuntimeError("SAGA.step needs the component index: step(closure, index=j) or a closure "
                               "returning (loss, j)")
        j = int(j)
        if not 0 <= j < m:
            raise IndexError(f"SAGA component index {j} outside [0, {m})")
        directions = {}
        with torch.no_grad():
            for p, g in zip(params, grads):
                st = self._table(p, m)
                old = st["table"][j]
                delta = g - old
                directions[p] = delta + st["mean"]          # v = g - a_j + mean(a)
                st["mean"].add_(delta, alpha=1.0 / m)
                old.copy_(g)
        self._bump("step", params)
        self._apply(directions)
        return loss
