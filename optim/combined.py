"""One torch.optim.Optimizer over several inner optimizers (dense + sparse-embedding routing).

Each param group carries a ``route`` key naming the registry optimizer that owns it; the inner
optimizers are built on the *same* group dicts, so ``combined.param_groups`` is the list LR
schedulers and Horovod see, and an LR change reaches the inner optimizer directly.

It is rebuildable from its ``param_groups`` alone (``CombinedOptimizer(opt.param_groups)``), which
is what ``hvd.DistributedOptimizer`` does, and its ``state_dict`` is the standard torch format over
all parameters (``load_state_dict`` splits it back per inner optimizer).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch
from torch.optim import Optimizer

from ._utils import eval_closure

__all__ = ["CombinedOptimizer"]


class _MergedState(MutableMapping):
    """Live view over the inner optimizers' ``state`` dicts, keyed by parameter."""

    def __init__(self, owner: "CombinedOptimizer"):
        self._owner = owner

    def _inner_state(self, p):
        inner = self._owner._owner_of.get(p)
        if inner is None:
            raise KeyError(p)
        return inner.state

    def __getitem__(self, p):
        return self._inner_state(p)[p]

    def __setitem__(self, p, value):
        self._inner_state(p)[p] = value

    def __delitem__(self, p):
        del self._inner_state(p)[p]

    def __iter__(self):
        seen = set()
        for inner in self._owner.optimizers:
            for p in list(inner.state.keys()):
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def __len__(self):
        return sum(1 for _ in self)

    def __contains__(self, p):
        inner = self._owner._owner_of.get(p) if isinstance(p, torch.Tensor) else None
        return inner is not None and p in inner.state


class CombinedOptimizer(Optimizer):
    """Optimizer whose param groups are served by different inner optimizers (``group['route']``)."""

    def __init__(self, params, defaults: dict[str, Any] | None = None):
        from .registry import _construct, constructor_args  # local import: registry imports this module

        groups = list(params)
        if not groups or not all(isinstance(g, dict) and "route" in g for g in groups):
            raise ValueError("CombinedOptimizer needs param-group dicts that each name their optimizer in 'route'")
        super().__init__(groups, defaults or {})
        self.optimizers: list[Optimizer] = []
        self.routes: list[str] = []
        self._owner_of: dict = {}
        for route in dict.fromkeys(g["route"] for g in self.param_groups):
            mine = [g for g in self.param_groups if g["route"] == route]
            # the groups hold every hyperparameter, but some optimizers use a constructor argument
            # in __init__ itself (Adagrad fills its state with initial_accumulator_value): built
            # from the groups alone, the sums started at 0 (until the twenty-fifth session)
            inner = _construct(route, mine, **constructor_args(route, mine[0]))
            # torch re-uses the given dicts as its param_groups: check the sharing we rely on
            assert all(a is b for a, b in zip(inner.param_groups, mine))
            self.optimizers.append(inner)
            self.routes.append(route)
            for g in mine:
                for p in g["params"]:
                    self._owner_of[p] = inner
        self.state = _MergedState(self)

    def __setstate__(self, state):  # used by torch's load/copy paths
        super().__setstate__(state)

    def __repr__(self):
        inner = ", ".join(f"{r}: {type(o).__name__}" for r, o in zip(self.routes, self.optimizers))
        return f"CombinedOptimizer({inner})"

    @torch.no_grad()
    def step(self, closure=None):
        loss = eval_closure(closure)
        for g in self.param_groups:
            for p in g["params"]:
                grad = p.grad
                if grad is not None and grad.is_sparse and grad.is_cuda and not grad.is_coalesced():
                    # on CUDA, adding an uncoalesced gradient (duplicate rows: one id seen twice in
                    # a batch) uses atomics, so two runs differ in the last bits; coalescing sums the
                    # duplicates in a fixed order. (On the CPU that add is already deterministic.)
                    p.grad = grad.coalesce()
        for inner in self.optimizers:
            inner.step()
        return loss

    def state_dict(self):
        return super().state_dict()

    def load_state_dict(self, state_dict):
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        # saved param ids -> (inner optimizer, inner param id)
        per_inner: dict[int, dict] = {id(o): {"state": {}, "param_groups": []} for o in self.optimizers}
        counters = {id(o): 0 for o in self.optimizers}
        for saved, current in zip(groups, self.param_groups):
            inner = self._owner_of[current["params"][0]] if current["params"] else self.optimizers[0]
            sd = per_inner[id(inner)]
            new_ids = []
            for pid in saved["params"]:
                nid = counters[id(inner)]
                counters[id(inner)] += 1
                new_ids.append(nid)
                if pid in state_dict["state"]:
                    sd["state"][nid] = state_dict["state"][pid]
            g = {k: v for k, v in saved.items() if k != "params"}
            g["params"] = new_ids
            sd["param_groups"].append(g)
        for inner in self.optimizers:
            inner.load_state_dict(per_inner[id(inner)])
        # torch rebuilt the inner group dicts: share them again, in this optimizer's order
        order = []
        idx = {id(o): 0 for o in self.optimizers}
        for current in list(self.param_groups):
            inner = self._owner_of[current["params"][0]] if current["params"] else self.optimizers[0]
            order.append(inner.param_groups[idx[id(inner)]])
            idx[id(inner)] += 1
        self.param_groups = order
        self.state = _MergedState(self)

    def diagnostics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for route, inner in zip(self.routes, self.optimizers):
            diag = getattr(inner, "diagnostics", None)
            if diag is not None:
                out.update({f"{route}/{k}": v for k, v in diag().items()})
        return out
