"""Large-batch toolkit: linear memory/time models recover a known relation, the step-up detector
fires exactly where the gradient-norm rate crosses eta, the noise-scale estimator matches its
analytic value for a known gradient covariance, and a real (tiny) batch-size measurement."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from optim.large_batch import (BatchSizeReport, CriticalPhaseDetector, GradientNoiseScale, GradientStepUp,
                               estimate_noise_scale, fit_linear, measure_batch_size_bounds, noise_scale_estimates)


# ------------------------------------------------------------------------------- batch-size bounds
def test_linear_models_recover_synthetic_relation_and_predict_bounds():
    rng = np.random.default_rng(0)
    bs = np.array([16, 32, 64, 128, 256, 512])
    mem = 300e6 + 1.5e6 * bs + rng.normal(0, 0.2e6, bs.size)      # 300 MB + 1.5 MB/sample
    tim = 0.004 + 0.0001 * bs + rng.normal(0, 1e-5, bs.size)        # 4 ms + 0.1 ms/sample
    rep = BatchSizeReport.from_measurements(bs, mem, tim, memory_budget_bytes=2e9)
    assert rep.memory_fit.slope == pytest.approx(1.5e6, rel=1e-3)
    assert rep.memory_fit.intercept == pytest.approx(300e6, rel=1e-3)
    assert rep.time_fit.slope == pytest.approx(1e-4, rel=2e-2)
    assert rep.time_fit.intercept == pytest.approx(4e-3, rel=2e-2)
    assert rep.memory_fit.r2 > 0.9999 and rep.memory_fit.max_rel_err < 1e-3
    # (2e9 - 300e6) / 1.5e6 = 1133.3
    assert rep.max_batch_for_budget in (1132, 1133, 1134)
    # knee at 90% of 1/t1: b = 9 * t0 / t1 = 360
    assert rep.knee_batch == pytest.approx(360, rel=0.03)
    assert rep.recommended_batch == rep.knee_batch
    assert rep.best_measured_batch == 512
    rows = rep.rows()
    assert [r["kind"] for r in rows] == ["measured"] * 6 + ["max_for_budget", "knee"]
    assert rows[-2]["pred_memory_mb"] == pytest.approx(2e9 / 2**20, rel=2e-3)
    table = rep.to_table()
    assert "memory(b)" in table and "max_for_budget" in table
    assert rep.to_dict()["summary"]["max_batch_for_budget"] == rep.max_batch_for_budget


def test_without_a_knee_the_best_measured_size_within_the_budget_is_recommended():
    """A time fit with a negative intercept (a step time growing faster than linearly, as here
    on a shared CPU) has no knee. Until the twentieth session the recommendation then fell back
    to the memory bound: 41048, at a predicted 588 samples/s, where 256 measured 1347."""
    sizes, mem, tim = [64, 256, 1024], [479e6, 482e6, 493e6], [0.050, 0.190, 1.624]
    rep = BatchSizeReport.from_measurements(sizes, mem, tim, memory_budget_bytes=2**30)
    assert rep.time_fit.intercept < 0 and rep.knee_batch is None and rep.max_batch_for_budget > 40_000
    assert rep.recommended_batch == rep.best_measured_batch == 256
    last = rep.to_table().splitlines()[-1]
    assert last.startswith("recommended 256: the time fit has no positive intercept") and "1347" in last
    assert rep.summary()["recommended_batch"] == 256
    # a budget the best size does not fit: the best of those it fits
    tight = BatchSizeReport.from_measurements(sizes, mem, tim, memory_budget_bytes=480.5e6)
    assert tight.max_batch_for_budget < 256 and tight.recommended_batch == 64
    assert "within the memory bound" in tight.recommended_because
    # no measured size fits: the bound; no budget: the best measured
    assert BatchSizeReport.from_measurements(sizes, mem, tim, memory_budget_bytes=478.5e6).recommended_batch < 64
    assert BatchSizeReport.from_measurements(sizes, mem, tim).recommended_batch == 256
    # a step time falling with the batch (no positive slope): the best measured too, not the bound
    flat = BatchSizeReport.from_measurements(sizes, mem, [0.05, 0.04, 0.03], memory_budget_bytes=2**30)
    assert flat.knee_batch is None and flat.recommended_batch == 1024
    assert "no positive slope" in flat.recommended_because


def test_a_knee_the_fit_does_not_support_is_not_recommended():
    """A real run's step times on a shared 2-core host: the time fit explains 7 % of them, and its
    knee (24737) is 48x the largest size measured. It was recommended, and three identical runs
    gave 24742, 7941 and 592. Now the best measured size, saying why; a knee up to twice the
    largest size is still recommended, marked as extrapolated."""
    mb = 2**20
    noisy = BatchSizeReport.from_measurements([32, 64, 128, 256, 512], [470.6 * mb, 471.3 * mb, 472.3 * mb,
                                                                        474.0 * mb, 477.2 * mb],
                                              [0.07256, 0.08914, 0.04583, 0.06382, 0.08709])
    assert noisy.time_fit.r2 < 0.1 and noisy.knee_batch > 20_000
    assert noisy.recommended_batch == 512  # 5879 samples/s, the most measured
    assert noisy.recommended_because.startswith("the time fit explains little of the step times (R^2 0.07 < 0.8)")
    # a clean fit whose knee is far past the sizes: 4 ms + 0.001 ms/sample -> knee 36000
    sizes = [32, 64, 128, 256]
    far = BatchSizeReport.from_measurements(sizes, [1e9] * 4, [0.004 + 1e-6 * b for b in sizes])
    assert far.knee_batch == 36000 and far.recommended_batch == 256
    assert "lies 141x beyond the largest size measured (256)" in far.recommended_because
    near = BatchSizeReport.from_measurements(sizes, [1e9] * 4, [0.004 + 1e-4 * b for b in sizes])
    assert near.knee_batch == 360 and near.recommended_batch == 360
    assert near.recommended_because == "the knee (beyond the largest size measured, 256: extrapolated)"
    flat = BatchSizeReport.from_measurements(sizes, [1e9] * 4, [0.05, 0.04, 0.03, 0.02])
    assert "; no knee" in flat.to_table() and "inf samples/s" not in flat.to_table()


def test_no_batch_fits_a_budget_the_measurements_are_already_over():
    """A memory fit with a slightly negative slope (RSS noise on a CPU) bounded nothing, so with
    every measured peak over the budget the report recommended 129, predicted at ~2 GB against
    a 1 GB budget; a positive slope whose bound is 0 recommended 1 ("capped by the bound 0")."""
    noisy = BatchSizeReport.from_measurements([64, 128, 256], [2.02e9, 2.01e9, 2.0e9], [0.011, 0.02, 0.038],
                                              memory_budget_bytes=1e9)
    assert noisy.memory_fit.slope < 0 and noisy.max_batch_for_budget == 0
    assert noisy.recommended_batch is None and "no batch size fits the memory budget" in noisy.recommended_because
    assert noisy.to_table().splitlines()[-1].startswith("recommended None: no batch size fits")
    # the same noisy fit under a budget the measurements are within: no bound from the fit
    roomy = BatchSizeReport.from_measurements([64, 128, 256], [2.02e9, 2.01e9, 2.0e9], [0.011, 0.02, 0.038],
                                              memory_budget_bytes=3e9)
    assert roomy.max_batch_for_budget is None and roomy.recommended_batch == roomy.knee_batch
    growing = BatchSizeReport.from_measurements([64, 128, 256], [2.0e9, 2.1e9, 2.3e9], [0.011, 0.02, 0.038],
                                                memory_budget_bytes=1e9)
    assert growing.max_batch_for_budget == 0 and growing.recommended_batch is None


def test_batch_size_cli_refuses_a_budget_that_is_not_positive(capsys):
    import argparse

    from jobs.batch_size import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--memory-budget-gb", "1.5"]).memory_budget_gb == 1.5
    for bad in ("-2", "0", "nan", "lots"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--memory-budget-gb", bad])
        assert "a positive number" in capsys.readouterr().err


def test_fit_linear_exact_and_errors():
    f = fit_linear([1, 2, 3], [5, 7, 9])
    assert (f.slope, f.intercept, f.r2, f.rmse) == pytest.approx((2.0, 3.0, 1.0, 0.0))
    assert f.solve(11) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        fit_linear([4, 4], [1, 2])


def test_measure_batch_size_bounds_on_a_tiny_model():
    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))

    rep = measure_batch_size_bounds(model, lambda b: (torch.randn(b, 64), torch.randint(0, 10, (b,))),
                                    [32, 128, 512], memory_budget=64 * 2**30, device="cpu", timed_steps=2)
    assert [m.batch_size for m in rep.measurements] == [32, 128, 512]
    assert all(m.step_time_s > 0 and m.peak_memory_bytes > 10 * 2**20 for m in rep.measurements)
    assert rep.memory_kind == "process_rss"
    assert rep.max_batch_for_budget is None or rep.max_batch_for_budget > 512
    assert len(rep.rows()) >= 3 and math.isfinite(rep.memory_fit.r2)


# ---------------------------------------------------------------------------------------- step-up
def test_detector_fires_exactly_where_rate_crosses_eta():
    norms = [10.0, 9.0, 8.5, 3.0, 2.9, 2.8, 6.0, 5.9, 5.8, 5.7]
    rates = [math.nan] + [abs(b - a) / a for a, b in zip(norms, norms[1:])]
    for eta in (0.5, 0.8):
        det = CriticalPhaseDetector(eta=eta, interval=1)
        flags = [det.update(n) for n in norms]
        expected = [True] + [r >= eta for r in rates[1:]]
        assert flags == expected
    # 8.5 -> 3.0 is a 65% drop (fires at 0.5, not at 0.8); 2.8 -> 6.0 a 114% jump (fires at both)
    det = CriticalPhaseDetector(eta=0.5)
    assert [det.update(n) for n in norms][3] is True
    assert det.metric == pytest.approx(0.1 / 5.8)  # last: 5.8 -> 5.7


def test_detector_with_intervals_uses_interval_means():
    det = CriticalPhaseDetector(eta=0.5, interval=2)
    flags = [det.update(n) for n in [4, 4, 4, 4, 1, 1, 1, 1.2]]
    # interval means 4, 4, 1, 1.1; decisions at the end of intervals 1 (first: critical), 2 (0%),
    # 3 (75%), each holding for the whole next interval
    assert flags == [True, True, True, True, False, False, True, True]
    assert det.critical is False and det.metric == pytest.approx(0.1)  # interval 4's (10%), for interval 5


def test_an_intervals_decision_holds_for_the_whole_next_interval():
    """As documented and as in Accordion (the level chosen once an epoch is done is used for the
    following epochs): the step that completes an interval used that interval's own decision, which
    then held for only interval - 1 steps of the next."""
    det = CriticalPhaseDetector(eta=0.5, interval=4)
    flags = "".join("C" if det.update(n) else "." for n in [10] * 4 + [1] * 8 + [5] * 4)
    # ends of intervals: 1 (first: critical), 2 (10 -> 1: 90%), 3 (0%), 4 (400%)
    assert flags == "CCCCCCCCCCCC...."
    assert det.critical is True
    su = GradientStepUp(alpha=4.0, eta=0.5, interval=2)
    assert [su.factor_for(1.0) for _ in range(6)] == [1.0, 1.0, 1.0, 1.0, 4.0, 4.0]
    su = GradientStepUp(alpha=4.0, eta=0.5, interval=2)
    for _ in range(4):
        su.factor_for(1.0)
    # step 4 ran critical (interval 1's decision), interval 2's (not critical) is for steps 5-6
    assert su.diagnostics()["step_up/critical"] == 1.0 and su.diagnostics()["step_up/factor"] == 1.0
    assert su.detector.critical is False
    su2 = GradientStepUp(alpha=4.0, eta=0.5, interval=2)
    su2.load_state_dict(su.state_dict())
    assert su2.diagnostics() == su.diagnostics() and su2.factor_for(1.0) == 4.0


def test_step_up_scales_gradients_outside_critical_phases():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=1.0)
    su = GradientStepUp(alpha=8.0, eta=0.5)
    applied = []
    for g in [1.0, 1.0, 0.2, 0.2]:
        w.grad = torch.full((3,), g)
        before = w.detach().clone()
        su.step(opt)
        applied.append(float((before - w.detach())[0]) / g)
    assert applied == pytest.approx([1.0, 8.0, 1.0, 8.0])  # first and the 80% drop are critical
    d = su.diagnostics()
    assert d["step_up/factor"] == 8.0 and d["step_up/critical"] == 0.0 and d["step_up/metric"] == pytest.approx(0.0)
    su2 = GradientStepUp()
    su2.load_state_dict(su.state_dict())
    assert su2.diagnostics() == d
    with pytest.raises(ValueError):
        GradientStepUp(alpha=0.5)


def test_step_up_with_a_closure_applies_the_factor_it_reports():
    """step(optimizer, closure): the closure runs once, before the scaling. Until the
    twenty-fifth session optimizer.step(closure) ran backward again over the scaled gradients:
    factor 4 reported, 1 applied."""
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = torch.optim.SGD([w], lr=0.1)
    su = GradientStepUp(alpha=4.0)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    for _ in range(3):
        before, g = w.detach().clone(), 2 * w.detach()
        loss = su.step(opt, closure)
        assert float(loss.detach()) == pytest.approx(float((before ** 2).sum()))
        torch.testing.assert_close((before - w.detach()) / (0.1 * g), torch.full((2,), su.factor))
    assert len(calls) == 3 and su.factor == 1.0  # once a step; factors 1, 4, 1 as the norm moved


# ------------------------------------------------------------------------------------ noise scale
def test_noise_scale_estimators_are_exact_in_expectation():
    g2, s = 4.0, 200.0  # |G|^2 and tr(Sigma)
    small, big = g2 + s / 8, g2 + s / 128
    assert noise_scale_estimates(small, big, 8, 128) == pytest.approx((g2, s))


def test_noise_scale_with_sparse_embedding_gradients():
    """`sparse_embeddings: auto` gives sgd, adagrad and ftrl sparse embedding gradients:
    estimate_noise_scale and sq_norm raised NotImplementedError (no sparse vector norm). They now
    give what the same model with dense embedding gradients gives."""
    import torch.nn.functional as F

    from optim.large_batch import sq_norm
    from training.models import build_model

    def loss(m, c):
        return F.binary_cross_entropy_with_logits(m(c[0], c[1]), c[2])

    torch.manual_seed(0)
    batch = (torch.rand(64, 13), torch.randint(0, 10, (64, 26)), torch.randint(0, 2, (64,)).float())
    est = {}
    for sparse in (False, True):
        torch.manual_seed(1)
        m = build_model("dlrm", cardinalities=[10] * 26, num_dense=13, sparse=sparse, embedding_dim=8,
                        bottom_mlp=[16], top_mlp=[16])
        est[sparse] = estimate_noise_scale(m, loss, batch, n_chunks=4)
        m.zero_grad()
        loss(m, batch).backward()
        est[sparse]["sq_norm"] = sq_norm([p.grad for p in m.parameters()])
    assert any(p.grad.is_sparse for p in m.parameters())
    for k in ("small_sq", "big_sq", "grad_sq", "trace_cov", "sq_norm"):
        assert est[True][k] == pytest.approx(est[False][k], rel=1e-5), k


def test_noise_scale_matches_analytic_value_for_known_covariance():
    """f_i(w) = |w - x_i|^2 / 2 with x_i ~ N(mu, Sigma): per-example gradient w - x_i, so
    G = w - mu and the gradient covariance is Sigma; B_simple = tr(Sigma) / |w - mu|^2."""
    torch.manual_seed(0)
    d = 10
    a = torch.randn(d, d, dtype=torch.float64)
    sigma = a @ a.T / d + 0.5 * torch.eye(d, dtype=torch.float64)
    mu = torch.randn(d, dtype=torch.float64)
    chol = torch.linalg.cholesky(sigma)
    w = torch.nn.Parameter(mu + 0.3 * torch.randn(d, dtype=torch.float64))
    model = torch.nn.Module()
    model.w = w
    analytic = float(torch.trace(sigma) / ((w.detach() - mu) ** 2).sum())
    gns = GradientNoiseScale(beta=0.999)
    gen = torch.Generator().manual_seed(1)
    for _ in range(1500):
        x = mu + torch.randn(256, d, generator=gen, dtype=torch.float64) @ chol.T
        est = estimate_noise_scale(model, lambda m, c: 0.5 * ((m.w - c[0]) ** 2).sum(1).mean(), (x,), n_chunks=8)
        gns.update(est["small_sq"], est["big_sq"], est["b_small"], est["b_big"])
    assert gns.b_simple == pytest.approx(analytic, rel=0.05)
    assert gns.trace_cov == pytest.approx(float(torch.trace(sigma)), rel=0.05)
