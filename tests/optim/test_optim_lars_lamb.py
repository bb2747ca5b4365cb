"""LARS and LAMB: update equations against pytorch_optimizer and written-out formulas, exclusion
rules, trust-ratio diagnostics, state_dict resume, convergence."""

from __future__ import annotations

import io
import math

import pytest
import torch

from optim import LAMB, LARS

po = pytest.importorskip("pytorch_optimizer")


def _params(dtype=torch.float32):
    torch.manual_seed(0)
    return [torch.randn(5, 3, dtype=dtype, requires_grad=True), torch.randn(4, 7, dtype=dtype, requires_grad=True),
            torch.randn(6, dtype=dtype, requires_grad=True)]


def _grads(params, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params] for _ in range(steps)]


def _run(opt_factory, params, grads):
    opt = opt_factory(params)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    return [p.detach().clone() for p in params], opt


def _maxdiff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_matches_pytorch_optimizer(foreach, nesterov):
    grads = _grads(_params(), 6)
    kw = dict(lr=0.1, momentum=0.9, weight_decay=0.01, trust_coefficient=0.02, nesterov=nesterov)
    a, _ = _run(lambda p: LARS(p, foreach=foreach, **kw), _params(), grads)
    b, _ = _run(lambda p: po.LARS(p, **kw), _params(), grads)
    assert _maxdiff(a, b) < 1e-6


def test_lars_formula_lr_inside_momentum_and_exclusions():
    """Paper form v = m v + lr_t * trust * (g + wd w) with a changing lr; 1-D tensors plain SGD."""
    params = _params(torch.float64)
    grads = _grads(params, 5)
    lrs = [0.1, 0.2, 0.3, 0.05, 0.1]
    opt = LARS(params, lr=lrs[0], momentum=0.9, weight_decay=0.01, trust_coefficient=0.02, trust_clip=(0.0, 0.05))
    ref = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    for lr, gs in zip(lrs, grads):
        opt.param_groups[0]["lr"] = lr
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        for i, (w, g) in enumerate(zip(ref, gs)):
            if w.ndim > 1:
                trust = 0.02 * w.norm() / (g.norm() + 0.01 * w.norm())
                trust = min(float(trust), 0.05)
                d = lr * trust * (g + 0.01 * w)
            else:
                d = lr * g
            bufs[i] = 0.9 * bufs[i] + d
            ref[i] = w - bufs[i]
    assert _maxdiff(params, ref) < 1e-12
    diag = opt.diagnostics()
    assert set(k for k in diag if not k.endswith(("min", "mean", "max"))) == {
        "trust_ratio/group0.param0", "trust_ratio/group0.param1"}
    assert diag["trust_ratio/max"] <= 0.05 + 1e-12


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("momentum, dampening, nesterov, weight_decay",
                         [(0.0, 0.0, False, 0.0), (0.0, 0.0, False, 0.01), (0.9, 0.0, False, 0.01),
                          (0.9, 0.5, False, 0.0), (0.9, 0.5, False, 0.01), (0.8, 1.0, False, 0.01),
                          (0.9, 0.0, True, 0.0), (0.9, 0.0, True, 0.01)])
def test_lars_without_layer_adaptation_is_torch_sgd(foreach, momentum, dampening, nesterov, weight_decay):
    """layer_adaptation=False is momentum SGD, dampening as in torch (the first step takes the
    gradient undamped: buf = g; LARS applied (1 - dampening) from the start), over 10 steps with a
    state_dict round trip after 5 (a buffer in the state means the undamped step was taken)."""
    kw = dict(lr=0.1, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay)
    grads = _grads(_params(torch.float64), 10)
    want, _ = _run(lambda p: torch.optim.SGD(p, **kw), _params(torch.float64), grads)
    params = _params(torch.float64)
    _, opt = _run(lambda p: LARS(p, layer_adaptation=False, exclude_1d=False, foreach=foreach, **kw), params, grads[:5])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = LARS(params, layer_adaptation=False, exclude_1d=False, foreach=foreach, **kw)
    opt2.load_state_dict(torch.load(buf))
    got, _ = _run(lambda p: opt2, params, grads[5:])
    assert _maxdiff(got, want) < 1e-12


@pytest.mark.parametrize("foreach", [True, False])
def test_lamb_matches_pytorch_optimizer_without_bias_correction(foreach):
    grads = _grads(_params(), 6)
    a, _ = _run(lambda p: LAMB(p, lr=0.01, weight_decay=0.01, bias_correction=False, weight_norm_clip=(0, 10),
                               exclude_1d=False, foreach=foreach), _params(), grads)
    # pytorch_optimizer.Lamb: adam_debias=True -> no bias correction; weight_decouple=False -> paper's r + wd*w
    b, _ = _run(lambda p: po.Lamb(p, lr=0.01, weight_decay=0.01, weight_decouple=False, adam_debias=True),
                _params(), grads)
    assert _maxdiff(a, b) < 1e-6


@pytest.mark.parametrize("foreach", [True, False])
def test_lamb_formula_with_bias_correction(foreach):
    params = _params(torch.float64)
    grads = _grads(params, 5)
    b1, b2, eps, wd, lr = 0.9, 0.999, 1e-6, 0.01, 0.01
    opt = LAMB(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, foreach=foreach)
    ref = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, gs in enumerate(grads, start=1):
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(gs):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            r = (m[i] / (1 - b1**t)) / ((v[i] / (1 - b2**t)).sqrt() + eps)
            if ref[i].ndim > 1:
                u = r + wd * ref[i]
                ref[i] = ref[i] - lr * (ref[i].norm() / u.norm()) * u
            else:  # excluded: Adam step, no weight decay
                ref[i] = ref[i] - lr * r
    assert _maxdiff(params, ref) < 1e-12
    tr = opt.trust_ratios()
    assert len(tr) == 2 and all(math.isfinite(x) and x > 0 for x in tr.values())


def test_lamb_layer_adaptation_flag_and_mixed_dtypes():
    torch.manual_seed(0)
    w32 = torch.randn(4, 4, requires_grad=True)
    w64 = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    frozen_rule = torch.randn(5, 5, requires_grad=True)
    opt = LAMB([{"params": [w32, w64]}, {"params": [frozen_rule], "layer_adaptation": False, "weight_decay": 0.0}],
               lr=0.01)
    ref = LAMB([{"params": [w32.detach().clone().requires_grad_(), w64.detach().clone().requires_grad_()]},
                {"params": [frozen_rule.detach().clone().requires_grad_()], "layer_adaptation": False,
                 "weight_decay": 0.0}], lr=0.01, foreach=False)
    for _ in range(3):
        for o in (opt, ref):
            for p in (q for g in o.param_groups for q in g["params"]):
                torch.manual_seed(p.numel())
                p.grad = torch.randn(p.shape, dtype=p.dtype)
            o.step()
    got = [p for g in opt.param_groups for p in g["params"]]
    want = [p for g in ref.param_groups for p in g["params"]]
    assert _maxdiff(got, want) < 1e-6
    # adaptation off: an Adam step (first step moves each coordinate by ~lr)
    assert len(opt.trust_ratios()) == 2


def _roundtrip(opt_factory, steps_before=3, steps_after=3):
    params = _params()
    grads = _grads(params, steps_before + steps_after)
    full, _ = _run(opt_factory, params, grads)
    params = _params()
    opt = opt_factory(params)
    for gs in grads[:steps_before]:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    params2 = [p.clone().requires_grad_() for p in saved["params"]]
    opt2 = opt_factory(params2)
    opt2.load_state_dict(saved["opt"])
    for gs in grads[steps_before:]:
        for p, g in zip(params2, gs):
            p.grad = g.clone()
        opt2.step()
    return full, params2


@pytest.mark.parametrize("factory", [lambda p: LARS(p, lr=0.5, weight_decay=1e-3, nesterov=True),
                                     lambda p: LAMB(p, lr=0.01)], ids=["lars", "lamb"])
def test_state_dict_roundtrip_resumes_identically(factory):
    full, resumed = _roundtrip(factory)
    assert _maxdiff(full, resumed) == 0.0


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_converges_on_least_squares(name):
    """Layer-wise normalised steps need the decaying LR they are used with (poly decay, You et al.)."""
    from optim import build_scheduler

    torch.manual_seed(0)
    x = torch.randn(256, 10, dtype=torch.float64)
    w_true = torch.randn(10, 1, dtype=torch.float64)
    y = x @ w_true
    model = torch.nn.Linear(10, 1, bias=False).double()
    if name == "lars":
        opt = LARS(model.parameters(), lr=5.0, momentum=0.9, trust_coefficient=0.01)
    else:
        opt = LAMB(model.parameters(), lr=0.05, weight_decay=0.0)
    sched = build_scheduler(opt, "poly", total_steps=400, power=2.0)
    for _ in range(400):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        sched.step()
    assert (model.weight.detach().T - w_true).abs().max() < 1e-3


def test_fused_adam_direction_equals_foreach_fallback(monkeypatch):
    """LAMB/Shampoo take the Adam direction from torch's fused kernel; the foreach fallback (used
    where the kernel is unavailable) gives the same numbers."""
    import optim._utils as u

    grads = _grads(_params(torch.float64), 4)
    fused, _ = _run(lambda p: LAMB(p, lr=0.01), _params(torch.float64), grads)
    monkeypatch.setattr(u, "_FUSED_ADAM", None)
    fallback, _ = _run(lambda p: LAMB(p, lr=0.01), _params(torch.float64), grads)
    single, _ = _run(lambda p: LAMB(p, lr=0.01, foreach=False), _params(torch.float64), grads)
    assert _maxdiff(fused, fallback) < 1e-12 and _maxdiff(fused, single) < 1e-12
    _, opt = _run(lambda p: LAMB(p, lr=0.01), _params(torch.float64), grads[:1])
    assert all(set(st) == {"step", "exp_avg", "exp_avg_sq"} for st in opt.state.values())  # scratch is not state
