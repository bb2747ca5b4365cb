"""Sophia: update rule against pytorch_optimizer.SophiaH and the paper's formula, the GNB and
Hutchinson estimators against exact Hessian diagonals, convergence, state_dict resume."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from optim import Sophia
from optim.sophia import gnb_hessian, hutchinson_hessian

po = pytest.importorskip("pytorch_optimizer")


def _params():
    torch.manual_seed(0)
    return [torch.randn(5, 3, requires_grad=True), torch.randn(4, requires_grad=True)]


@pytest.mark.parametrize("foreach", [True, False])
def test_matches_sophiah_with_external_hessian(foreach):
    # ours: lr * clip(m / max(rho h, eps), 1);  SophiaH: lr' * clip(m / max(h, eps), p) = lr' p clip(m/(p h), 1)
    a, b = _params(), _params()
    oa = Sophia(a, lr=0.1, rho=0.5, weight_decay=0.0, update_interval=2, foreach=foreach)
    ob = po.SophiaH(b, lr=0.2, p=0.5, weight_decay=0.0, update_period=2, eps=1e-15, betas=(0.965, 0.99))
    g = torch.Generator().manual_seed(1)
    for _ in range(7):
        grads = [torch.randn(p.shape, generator=g) for p in a]
        hess = [torch.rand(p.shape, generator=g) for p in a]
        for p, x in zip(a, grads):
            p.grad = x.clone()
        for p, x in zip(b, grads):
            p.grad = x.clone()
        if oa.hessian_due():
            oa.update_hessian(hess)
            ob.step(hessian=[h.clone() for h in hess])
        else:
            ob.step()
        oa.step()
        assert max((x - y).abs().max().item() for x, y in zip(a, b)) < 1e-6


@pytest.mark.parametrize("foreach", [True, False])
def test_formula_with_weight_decay_and_schedule(foreach):
    torch.manual_seed(0)
    w = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    lr, b1, b2, rho, wd, eps, k = 0.05, 0.9, 0.95, 0.1, 0.1, 1e-12, 3
    opt = Sophia([w], lr=lr, betas=(b1, b2), rho=rho, weight_decay=wd, eps=eps, update_interval=k, foreach=foreach)
    ref, m, h = w.detach().clone(), torch.zeros_like(w), torch.zeros_like(w)
    g = torch.Generator().manual_seed(3)
    for t in range(1, 9):
        grad = torch.randn(w.shape, generator=g, dtype=torch.float64)
        if (t - 1) % k == 0:  # paper: estimate at t mod k == 1
            assert opt.hessian_due()
            est = torch.rand(w.shape, generator=g, dtype=torch.float64)
            opt.update_hessian([est])
            h = b2 * h + (1 - b2) * est
        else:
            assert not opt.hessian_due()
        w.grad = grad.clone()
        opt.step()
        ref = ref * (1 - lr * wd)
        m = b1 * m + (1 - b1) * grad
        ref = ref - lr * torch.sign(m) * torch.clamp(m.abs() / torch.clamp(rho * h, min=eps), max=1.0)
    assert (w.detach() - ref).abs().max() < 1e-12


def test_gnb_estimator_matches_gauss_newton_diagonal():
    """Softmax regression: E[B * g_hat^2] = mean_i x_ij^2 p_ic (1 - p_ic) (Gauss-Newton diagonal)."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, dtype=torch.float64)
    lin = torch.nn.Linear(3, 4, bias=False).double()
    probs = F.softmax(lin(x), -1).detach()
    exact = ((probs * (1 - probs)).T @ (x**2)) / x.shape[0]  # (4, 3) like the weight
    gen = torch.Generator().manual_seed(1)
    n = 3000
    acc = torch.zeros_like(lin.weight)
    logits = lin(x)
    for i in range(n):
        (h,) = gnb_hessian(logits, [lin.weight], "categorical", retain_graph=True, generator=gen)
        acc += h
    est = acc / n
    assert torch.allclose(est, exact, rtol=0.08, atol=1e-3), (est, exact)


def test_hutchinson_exact_for_diagonal_and_unbiased_for_dense_hessian():
    torch.manual_seed(0)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    d = torch.rand(5, dtype=torch.float64) + 0.5
    (h,) = hutchinson_hessian(0.5 * (d * w * w).sum(), [w])
    assert torch.allclose(h, d)  # u_i^2 = 1: exact for a diagonal Hessian
    a = torch.randn(5, 5, dtype=torch.float64)
    a = a @ a.T + torch.eye(5, dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    (h,) = hutchinson_hessian(0.5 * w @ a @ w, [w], n_samples=4000, generator=gen)
    assert torch.allclose(h, torch.diagonal(a), atol=0.25), (h, torch.diagonal(a))


def test_sophia_gnb_converges_on_logistic_regression():
    torch.manual_seed(0)
    x = torch.randn(512, 8)
    y = (torch.sigmoid(x @ torch.randn(8)) > torch.rand(512)).float()
    lam = 1e-2

    def loss_of(w):
        return F.binary_cross_entropy_with_logits(x @ w, y) + lam / 2 * (w * w).sum()

    # reference optimum by Newton's method in float64
    w_ref = torch.zeros(8, dtype=torch.float64)
    xd, yd = x.double(), y.double()
    for _ in range(30):
        p = torch.sigmoid(xd @ w_ref)
        grad = xd.T @ (p - yd) / 512 + lam * w_ref
        hess = (xd.T * (p * (1 - p))) @ xd / 512 + lam * torch.eye(8, dtype=torch.float64)
        w_ref -= torch.linalg.solve(hess, grad)
    best = float(loss_of(w_ref.float()))

    w = torch.zeros(8, requires_grad=True)
    opt = Sophia([w], lr=0.05, rho=0.05, weight_decay=0.0, update_interval=5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        logits = x @ w
        if opt.hessian_due():
            opt.update_hessian_gnb(logits, "bernoulli", retain_graph=True, generator=gen)
        loss = F.binary_cross_entropy_with_logits(logits, y) + lam / 2 * (w * w).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss_of(w.detach())) < best + 2e-3


def test_state_dict_roundtrip_resumes_identically():
    def run(split):
        w = torch.ones(4, 3, requires_grad=True)
        opt = Sophia([w], lr=0.01, update_interval=2)
        g = torch.Generator().manual_seed(0)
        for t in range(6):
            if t == split:
                buf = io.BytesIO()
                torch.save({"w": w.detach(), "opt": opt.state_dict()}, buf)
                buf.seek(0)
                saved = torch.load(buf)
                w = saved["w"].clone().requires_grad_()
                opt = Sophia([w], lr=0.01, update_interval=2)
                opt.load_state_dict(saved["opt"])
            if opt.hessian_due():
                opt.update_hessian([torch.rand(4, 3, generator=g)])
            w.grad = torch.randn(4, 3, generator=g)
            opt.step()
        return w.detach()

    assert torch.equal(run(split=-1), run(split=3))


def test_changing_rho_between_hessian_updates_takes_effect():
    w1 = torch.ones(3, requires_grad=True)
    w2 = torch.ones(3, requires_grad=True)
    o1 = Sophia([w1], lr=0.1, rho=0.5, weight_decay=0.0)
    o2 = Sophia([w2], lr=0.1, rho=2.0, weight_decay=0.0, foreach=False)
    for o in (o1, o2):
        o.update_hessian([torch.full((3,), 10.0)])
    o1.param_groups[0]["rho"] = 2.0  # e.g. a schedule on rho
    for w, o in ((w1, o1), (w2, o2)):
        w.grad = torch.tensor([0.01, -0.02, 0.5])
        o.step()
    assert torch.allclose(w1, w2)


def test_diagnostics_report_clip_fraction():
    w = torch.ones(4, requires_grad=True)
    opt = Sophia([w], lr=0.1, weight_decay=0.0)
    w.grad = torch.tensor([1.0, -1.0, 1e-3, 2.0])
    opt.step()
    assert opt.diagnostics()["sophia/clip_fraction"] == 1.0  # h = 0: every coordinate clipped
    opt.update_hessian([torch.full((4,), 100.0)])
    opt.step()
    d = opt.diagnostics()
    assert 0.0 <= d["sophia/clip_fraction"] < 1.0 and d["sophia/hessian_mean"] == pytest.approx(1.0)


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_steps_stay_finite_where_momentum_is_zero(foreach, dtype):
    """eps=1e-15 is 0 in float16: 1/max(rho h, eps) was inf and 0 * inf NaN (0/0 per tensor),
    so every coordinate with zero momentum became NaN (until the twenty-fifth session). The
    floor is now at least the dtype's smallest normal number."""
    p = torch.nn.Parameter(torch.ones(2, 3, dtype=dtype))
    opt = Sophia([p], lr=1e-2, weight_decay=0.0, foreach=foreach)
    p.grad = torch.tensor([[0.0, 0.0, 0.0], [1.0, -1.0, 0.5]], dtype=dtype)
    opt.step()
    assert torch.isfinite(p).all() and torch.equal(p[0], torch.ones(3, dtype=dtype))
    assert torch.equal(torch.sign(1 - p[1].float()), torch.tensor([1.0, -1.0, 1.0]))
    assert 0.0 <= opt.diagnostics()["sophia/clip_fraction"] <= 1.0
