"""FTRL-Proximal, ISTA and FISTA: update equations against pytorch_optimizer / the paper's
formulas, sparse (lazy) updates, and convergence to reference optima (sklearn Lasso and L1
logistic regression)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from optim import FISTA, FTRL, ISTA

po = pytest.importorskip("pytorch_optimizer")
sklm = pytest.importorskip("sklearn.linear_model")


# ---------------------------------------------------------------------------------------- FTRL
@pytest.mark.parametrize("foreach", [True, False])
def test_ftrl_matches_pytorch_optimizer_from_zero_init(foreach):
    a = [torch.zeros(6, 3, requires_grad=True), torch.zeros(4, requires_grad=True)]
    b = [torch.zeros(6, 3, requires_grad=True), torch.zeros(4, requires_grad=True)]
    oa = FTRL(a, lr=0.5, beta=1.0, l1=0.3, l2=0.1, foreach=foreach)
    ob = po.FTRL(b, lr=0.5, beta=1.0, lambda_1=0.3, lambda_2=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        grads = [torch.randn(p.shape, generator=g) for p in a]
        for p, x in zip(a, grads):
            p.grad = x.clone()
        for p, x in zip(b, grads):
            p.grad = x.clone()
        oa.step()
        ob.step()
        assert max((x - y).abs().max().item() for x, y in zip(a, b)) < 1e-6
    assert 0 < oa.sparsity() < 1


def test_ftrl_formula_with_warm_start():
    """McMahan et al. Algorithm 1 written out, z0 chosen so that w(z0, n=0) = w0."""
    torch.manual_seed(0)
    w0 = torch.randn(10, dtype=torch.float64)
    w = w0.clone().requires_grad_()
    a, beta, l1, l2 = 0.3, 1.0, 0.05, 0.01
    opt = FTRL([w], lr=a, beta=beta, l1=l1, l2=l2)
    z = -(beta / a + l2) * w0 - np.sign(w0.numpy()) * l1
    z = torch.as_tensor(z)
    n = torch.zeros(10, dtype=torch.float64)
    ref = w0.clone()
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        grad = torch.randn(10, generator=g, dtype=torch.float64)
        w.grad = grad.clone()
        opt.step()
        sigma = ((n + grad**2).sqrt() - n.sqrt()) / a
        z = z + grad - sigma * ref
        n = n + grad**2
        ref = torch.where(z.abs() <= l1, torch.zeros_like(z),
                          -(z - torch.sign(z) * l1) / ((beta + n.sqrt()) / a + l2))
    assert (w.detach() - ref).abs().max() < 1e-12


def test_ftrl_sparse_gradients_equal_dense_and_touch_only_rows():
    torch.manual_seed(0)
    e_sparse = torch.nn.Embedding(20, 4, sparse=True)
    e_dense = torch.nn.Embedding(20, 4)
    e_dense.weight.data.copy_(e_sparse.weight.data)
    init = e_sparse.weight.detach().clone()
    o1 = FTRL(e_sparse.parameters(), lr=0.5, l1=0.01, l2=0.01)
    o2 = FTRL(e_dense.parameters(), lr=0.5, l1=0.01, l2=0.01)
    gen = torch.Generator().manual_seed(0)
    touched = set()
    for _ in range(5):
        ids = torch.randint(0, 10, (6,), generator=gen)  # rows 10..19 never touched
        touched.update(ids.tolist())
        for e, o in ((e_sparse, o1), (e_dense, o2)):
            o.zero_grad()
            (e(ids) ** 2).sum().backward()
            o.step()
    assert e_sparse.weight.grad.is_sparse
    assert torch.allclose(e_sparse.weight, e_dense.weight, atol=1e-6)
    assert torch.equal(e_sparse.weight[10:], init[10:])


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("l1", [0.0, 0.05])
def test_ftrl_beta0_keeps_untouched_coordinates_and_is_the_small_beta_limit(foreach, l1):
    """beta = l2 = 0 makes the denominator (beta + sqrt(n))/alpha + l2 zero where n = 0: coordinates
    never touched keep their initial value (no 0/0 NaN), dense and sparse; touched ones equal the
    beta -> 0 limit of the warm-started update."""
    torch.manual_seed(0)
    w0 = torch.randn(6, 3, dtype=torch.float64)
    w0[1] = 0.0
    runs = {}
    for beta in (0.0, 1e-9):
        e_sparse = torch.nn.Embedding(6, 3, sparse=True, dtype=torch.float64)
        e_dense = torch.nn.Embedding(6, 3, dtype=torch.float64)
        for e in (e_sparse, e_dense):
            e.weight.data.copy_(w0)
        opts = [FTRL(e.parameters(), lr=0.3, beta=beta, l1=l1, foreach=foreach) for e in (e_sparse, e_dense)]
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            ids = torch.randint(0, 4, (5,), generator=gen)  # rows 4, 5 never touched
            for e, o in zip((e_sparse, e_dense), opts):
                o.zero_grad()
                (e(ids) * torch.arange(1.0, 4.0, dtype=torch.float64)).sum().backward()
                o.step()
        assert e_sparse.weight.grad.is_sparse
        for e in (e_sparse, e_dense):
            assert torch.isfinite(e.weight).all()
            torch.testing.assert_close(e.weight.detach()[4:], w0[4:], rtol=0, atol=0 if beta == 0 else 1e-6)
        torch.testing.assert_close(e_sparse.weight.detach(), e_dense.weight.detach(), rtol=0, atol=1e-8)
        runs[beta] = e_dense.weight.detach()
    torch.testing.assert_close(runs[0.0], runs[1e-9], rtol=0, atol=1e-6)


def test_ftrl_l1_logistic_regression_recovers_support():
    """Sparse logistic regression: the L1 term zeroes the irrelevant features, loss approaches the fit."""
    rng = np.random.default_rng(0)
    n, d = 1000, 30
    x = rng.standard_normal((n, d))
    w_true = np.zeros(d)
    w_true[:4] = [2.0, -2.0, 1.5, -1.5]
    y = (rng.random(n) < 1 / (1 + np.exp(-x @ w_true))).astype(np.float32)
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    w = torch.zeros(d, requires_grad=True)
    opt = FTRL([w], lr=0.5, beta=1.0, l1=40.0)  # l1 acts on the cumulative (summed) gradients
    for epoch in range(2):
        for i in range(0, n, 50):  # online, minibatches of 50
            opt.zero_grad()
            F.binary_cross_entropy_with_logits(xt[i:i + 50] @ w, yt[i:i + 50], reduction="sum").backward()
            opt.step()
    support = set(torch.nonzero(w.detach()).flatten().tolist())
    assert support == {0, 1, 2, 3}, support
    assert np.sign(w.detach().numpy()[:4]).tolist() == [1, -1, 1, -1]


# ------------------------------------------------------------------------------------ ISTA / FISTA
def _lasso_problem(cond=False):
    rng = np.random.default_rng(0)
    n, d = 100, 20
    x = rng.standard_normal((n, d))
    if cond:
        x = x * np.logspace(0, 1, d)
    w = np.zeros(d)
    w[:5] = rng.standard_normal(5) * 3
    y = x @ w + 0.5 * rng.standard_normal(n)
    return x, y


def _run_prox(cls, x, y, alpha, iters, **kw):
    xt, yt = torch.tensor(x), torch.tensor(y)
    big_l = np.linalg.eigvalsh(x.T @ x / len(y)).max()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = cls([w], lr=kw.pop("lr", 1.0 / big_l), l1=alpha, **kw)

    def closure():
        opt.zero_grad()
        loss = 0.5 * ((xt @ w - yt) ** 2).mean()
        loss.backward()
        return loss

    for _ in range(iters):
        opt.step(closure)
    return opt.primal_iterates()[0].numpy(), opt


@pytest.mark.parametrize("cls,kw", [(ISTA, {}), (FISTA, {}), (FISTA, {"restart": True})])
def test_prox_reaches_sklearn_lasso_optimum(cls, kw):
    x, y = _lasso_problem()
    alpha = 0.1
    ref = sklm.Lasso(alpha=alpha, fit_intercept=False, tol=1e-12, max_iter=100_000).fit(x, y).coef_
    w, _ = _run_prox(cls, x, y, alpha, 400, **kw)
    np.testing.assert_allclose(w, ref, atol=1e-7)
    assert np.array_equal(w == 0, ref == 0)  # exact zeros from the prox, same support


def test_fista_is_faster_than_ista_and_line_search_recovers_from_big_step():
    x, y = _lasso_problem(cond=True)
    alpha = 0.05
    ref = sklm.Lasso(alpha=alpha, fit_intercept=False, tol=1e-14, max_iter=1_000_000).fit(x, y).coef_
    w_ista, _ = _run_prox(ISTA, x, y, alpha, 150)
    w_fista, _ = _run_prox(FISTA, x, y, alpha, 150)
    assert np.abs(w_fista - ref).max() < 0.1 * np.abs(w_ista - ref).max()
    big_l = np.linalg.eigvalsh(x.T @ x / len(y)).max()
    w_ls, opt = _run_prox(FISTA, x, y, alpha, 1500, lr=50.0 / big_l, line_search=True, restart=True)
    assert opt.param_groups[0]["lr"] <= 1.0 / big_l * 1.0001  # backtracked below 1/L
    np.testing.assert_allclose(w_ls, ref, atol=1e-6)


def test_fista_l1_logistic_regression_matches_sklearn():
    rng = np.random.default_rng(1)
    n, d = 300, 15
    x = rng.standard_normal((n, d))
    w_true = np.zeros(d)
    w_true[:3] = [1.5, -2.0, 1.0]
    y = (rng.random(n) < 1 / (1 + np.exp(-x @ w_true))).astype(float)
    lam = 0.02
    # sklearn: min ||w||_1 + C sum log-loss  <=>  mean log-loss + (1/(C n)) ||w||_1
    ref = sklm.LogisticRegression(l1_ratio=1.0, C=1 / (lam * n), solver="liblinear", fit_intercept=False,
                                  tol=1e-10, max_iter=10_000).fit(x, y).coef_.ravel()
    xt, yt = torch.tensor(x), torch.tensor(y)
    w = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    big_l = 0.25 * np.linalg.eigvalsh(x.T @ x / n).max()
    opt = FISTA([w], lr=1.0 / big_l, l1=lam, restart=True)

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(xt @ w, yt)
        loss.backward()
        return loss

    for _ in range(600):
        opt.step(closure)
    np.testing.assert_allclose(opt.primal_iterates()[0].numpy(), ref, atol=2e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fista_state_dict_roundtrip(dtype):
    """Bit-identical in float32 too: torch's load_state_dict casts state to the parameter's
    dtype, and FISTA's float64 `t` came back float32 (until the twenty-fifth session)."""
    x, y = _lasso_problem()
    xt, yt = torch.tensor(x, dtype=dtype), torch.tensor(y, dtype=dtype)

    def run(split):
        w = torch.zeros(20, dtype=dtype, requires_grad=True)
        opt = FISTA([w], lr=0.01, l1=0.1)
        for t in range(10):
            if t == split:
                buf = io.BytesIO()
                torch.save({"w": w.detach(), "opt": opt.state_dict()}, buf)
                buf.seek(0)
                saved = torch.load(buf)
                w = saved["w"].clone().requires_grad_()
                opt = FISTA([w], lr=0.01, l1=0.1)
                opt.load_state_dict(saved["opt"])
                t = opt.state[w]["t"]
                assert t.dtype == torch.float64 and float(t) == float(saved["opt"]["state"][0]["t"])
            opt.zero_grad()
            (0.5 * ((xt @ w - yt) ** 2).mean()).backward()
            opt.step()
        return w.detach()

    assert torch.equal(run(-1), run(6))


@pytest.mark.parametrize("line_search", [False, True])
def test_fista_t_and_restart_are_the_whole_iterates(line_search):
    """FISTA over parameter groups (build_optimizer makes decay/no_decay groups for any model
    with a bias) is FISTA over the concatenated vector: one t and one restart test, as in
    O'Donoghue & Candes. Until the twenty-fifth session each group had its own t and restart:
    on this problem the bias's group never restarted, t 16.7 and 1.0 against the reference's 13.65."""
    from torch import nn

    from optim import build_optimizer

    d = torch.tensor([1.0, 0.001, 0.3], dtype=torch.float64)
    c = torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64)

    def f(v):
        return 0.5 * (d * (v - c) ** 2).sum()

    runs = []
    for group_rules in (True, False):
        m = nn.Linear(2, 1).double()
        nn.init.zeros_(m.weight)
        nn.init.zeros_(m.bias)
        opt = build_optimizer("fista", m, lr=1.0, restart=True, line_search=line_search, group_rules=group_rules)
        assert len(opt.param_groups) == (2 if group_rules else 1)

        def closure():
            opt.zero_grad()
            loss = f(torch.cat([m.weight[0], m.bias]))
            loss.backward()
            return loss

        for _ in range(30):
            opt.step(closure)
        runs.append((torch.cat([p.reshape(-1) for p in opt.primal_iterates()]),
                     [float(opt.state[p]["t"]) for p in m.parameters()]))
    (x2, t2), (x1, t1) = runs
    assert torch.equal(x2, x1) and t2 == t1 and len(set(t2)) == 1
    # the reference: gradient restart on the full vector (w1, w2, b)
    xo, yv, t = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 1.0
    for _ in range(30):
        xn = yv - d * (yv - c)
        tn = (1 + (1 + 4 * t * t) ** 0.5) / 2
        if float((yv - xn) @ (xn - xo)) > 0:
            tn, yv = 1.0, xn.clone()
        else:
            yv = xn + (t - 1) / tn * (xn - xo)
        xo, t = xn, tn
    if not line_search:  # (the line search may shrink lr below 1/L = 1: another sequence)
        torch.testing.assert_close(x2, xo, rtol=0, atol=1e-12)
        assert t2[0] == pytest.approx(t)
