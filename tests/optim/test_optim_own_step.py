"""Bias corrections and Shampoo's statistics/root schedule follow each parameter's own step count: a
parameter whose grad is None on some steps (a late-joining or conditionally used layer) lags behind
the others, and the parameter order in the group must not matter."""

from __future__ import annotations

import pytest
import torch

from optim import LAMB, Shampoo

D = torch.float64
FACTORIES = {
    # 1-D tensors: LAMB excludes them (an Adam step, no weight decay), Shampoo grafts them (an AdamW step)
    "lamb-foreach": (lambda ps: LAMB(ps, lr=0.1, weight_decay=0.01, foreach=True),
                     lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.0, eps=1e-6)),
    "lamb-single": (lambda ps: LAMB(ps, lr=0.1, weight_decay=0.01, foreach=False),
                    lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.0, eps=1e-6)),
    "shampoo": (lambda ps: Shampoo(ps, lr=0.1, weight_decay=0.01, precondition_interval=3),
                lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.01, eps=1e-8)),
}


def _run(factory, shapes, late_order, steps=6, join=3):
    """Params built from ``shapes``; ``late_order[i]`` True: grad None before step ``join``."""
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=gen, dtype=D).requires_grad_() for s in shapes]
    opt = factory(ps)
    gen = torch.Generator().manual_seed(1)
    for t in range(1, steps + 1):
        for p, late in zip(ps, late_order):
            g = torch.randn(p.shape, generator=gen, dtype=D)
            p.grad = None if (late and t < join) else g
        opt.step()
    return [p.detach() for p in ps], opt


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("late_first", [True, False])
def test_1d_params_with_skipped_steps_match_adamw(name, late_first):
    ours, ref = FACTORIES[name]
    late = [late_first, not late_first]
    got, _ = _run(ours, [(5,), (4,)], late)
    want, _ = _run(ref, [(5,), (4,)], late)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("late_first", [True, False])
def test_each_param_steps_as_if_alone(name, late_first):
    """2-D tensors (trust ratios, Shampoo statistics and roots every 3 of the tensor's own steps): each
    parameter of a mixed group ends where the same parameter with the same grads ends in its own optimizer."""
    ours, _ = FACTORIES[name]
    shapes, late = [(5, 3), (4, 6)], [late_first, not late_first]
    got, opt = _run(ours, shapes, late, steps=8)
    for i in range(2):
        gen = torch.Generator().manual_seed(0)
        ps = [torch.randn(s, generator=gen, dtype=D).requires_grad_() for s in shapes]
        solo = ours([ps[i]])
        gen = torch.Generator().manual_seed(1)
        for t in range(1, 9):
            for j, p in enumerate(ps):
                g = torch.randn(p.shape, generator=gen, dtype=D)
                if j == i and not (late[i] and t < 3):
                    p.grad = g
                    solo.step()
        torch.testing.assert_close(got[i], ps[i].detach(), rtol=0, atol=1e-12)
        mine = opt.param_groups[0]["params"][i]
        assert int(opt.state[mine]["step"]) == int(solo.state[ps[i]]["step"]) == (6 if late[i] else 8)
