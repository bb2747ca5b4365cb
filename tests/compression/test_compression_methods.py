"""Compressor round trips, QSGD statistics, top-k selection, sign and vote, config errors."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from optim.compression import (
    CompressionConfigError,
    GradientCommunicator,
    available_compressors,
    build_compressor,
)

ALL = ["none", "fp16", "bf16", "qsgd", "topk", "randomk", "signsgd", "efsignsgd", "signum_vote", "powersgd"]


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_registry_lists_all_methods():
    assert set(available_compressors()) == set(ALL)


# --- lossless -------------------------------------------------------------------------------
def test_none_is_exact():
    c = build_compressor("none")
    x = _x(33, 17)
    p, ctx = c.compress(x, "w")
    assert torch.equal(c.decompress(p, ctx), x)


@pytest.mark.parametrize("name,dt", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_casts_exact_on_representable_values_and_bounded_otherwise(name, dt):
    c = build_compressor(name)
    x = _x(1000).to(dt).to(torch.float32)  # representable in the wire dtype
    p, ctx = c.compress(x, "w")
    assert p[0].dtype == dt
    y = c.decompress(p, ctx)
    assert y.dtype == torch.float32 and torch.equal(y, x)
    z = _x(1000, seed=1)
    eps = torch.finfo(dt).eps
    assert torch.all((c.decompress(*c.compress(z, "w")) - z).abs() <= eps * z.abs())


# --- QSGD -------------------------------------------------------------------------------------
@pytest.mark.parametrize("levels,bucket", [(1, None), (4, None), (127, 64)])
def test_qsgd_unbiased_with_bounded_variance(levels, bucket):
    c = build_compressor("qsgd", levels=levels, bucket_size=bucket, seed=3)
    x = _x(256, seed=2)
    draws = 4000
    acc = torch.zeros_like(x, dtype=torch.float64)
    sq = 0.0
    for _ in range(draws):
        y = c.decompress(*c.compress(x, "w")).double()
        acc += y
        sq += float(((y - x.double()) ** 2).sum())
    mean = acc / draws
    d = x.numel() if bucket is None else bucket
    bound = c.variance_bound(d) * float((x.double() ** 2).sum())
    var = sq / draws
    assert var <= bound * 1.05, (var, bound)
    # per-coordinate std of the mean is <= sqrt(var_total / draws); allow 5 sigma on the norm
    err = float((mean - x.double()).norm())
    assert err <= 5 * math.sqrt(var / draws) + 1e-9, (err, var)


def test_qsgd_decodes_to_levels_of_the_bucket_norm():
    c = build_compressor("qsgd", levels=3, bucket_size=None)
    x = _x(50)
    (norms, packed), ctx = c.compress(x, "w")
    y = c.decompress([norms, packed], ctx)
    lv = y / norms[0] * 3
    assert torch.allclose(lv, lv.round(), atol=1e-5)
    assert torch.all(lv.abs() <= 3 + 1e-6)
    assert torch.all((torch.sign(y) == torch.sign(x)) | (y == 0))


def test_qsgd_zero_tensor():
    c = build_compressor("qsgd", bits=4)
    z = torch.zeros(100)
    assert torch.equal(c.decompress(*c.compress(z, "w")), z)


def test_qsgd_rng_state_names_its_device_and_a_mismatch_draws_afresh(caplog):
    """The rounding RNG's state is checkpointed with its device type: a CPU state resumes
    bit-identically; one from before the device was recorded is a CPU state; a CUDA state
    (Philox: 16 bytes) resumed on a CPU-only host cannot feed the CPU generator, so the noise
    is drawn afresh with a warning, not a set_state error. (Until the twenty-fourth session a
    CUDA generator's state was not kept at all.)"""
    import logging

    x = _x(4096)
    c = build_compressor("qsgd", bits=4)
    c.compress(x, "w")
    state = c.state_dict()
    assert state["rng_device"] == "cpu"
    want = c.compress(x, "w")[0][1]
    for saved in (state, {"rng": state["rng"]}):  # with and without the device
        r = build_compressor("qsgd", bits=4)
        r.load_state_dict(saved)
        assert r.state_dict()["rng_device"] == "cpu"  # pending, kept by a checkpoint right after a resume
        assert torch.equal(r.compress(x, "w")[0][1], want)
    fresh = build_compressor("qsgd", bits=4).compress(x, "w")[0][1]
    r = build_compressor("qsgd", bits=4)
    r.load_state_dict({"rng": torch.zeros(16, dtype=torch.uint8), "rng_device": "cuda"})
    with caplog.at_level(logging.WARNING, logger="optim.compression.compressors"):
        got = r.compress(x, "w")[0][1]
    assert torch.equal(got, fresh)
    assert "the checkpoint's rounding RNG is a cuda generator's and this run compresses on cpu" in caplog.text


# --- sparsification ---------------------------------------------------------------------------
@pytest.mark.parametrize("ratio,n", [(0.01, 5000), (0.1, 999), (1.0, 64), (1e-6, 300), (0.07, 100), (0.56, 100)])
def test_topk_keeps_exactly_the_k_largest(ratio, n):
    c = build_compressor("topk", ratio=ratio)
    x = _x(n, seed=5)
    y = c.decompress(*c.compress(x, "w"))
    k = min(n, max(1, math.ceil(Fraction(str(ratio)) * n)))  # exact: 0.07 * 100 = 7 (the doubles give 8)
    kept = (y != 0).nonzero().flatten()
    assert kept.numel() == k
    assert set(kept.tolist()) == set(x.abs().argsort(descending=True)[:k].tolist())
    assert torch.equal(y[kept], x[kept])  # values travel exactly


def test_topk_aggregate_over_different_index_sets_is_the_mean():
    c = build_compressor("topk", ratio=0.05)
    xs = [_x(400, seed=s) for s in range(3)]
    enc = [c.compress(x, "w") for x in xs]
    ctx = enc[0][1]
    agg = c.aggregate_payloads([p for p, _ in enc], ctx)
    ref = sum(c.decompress(p, ctx) for p, _ in enc) / 3
    torch.testing.assert_close(agg, ref)


def test_randomk_indices_shared_across_ranks_and_fresh_each_step():
    a = build_compressor("randomk", ratio=0.1, seed=9)
    b = build_compressor("randomk", ratio=0.1, seed=9)
    a.set_rank(0, 2)
    b.set_rank(1, 2)
    ia1, ib1 = a.compress(_x(500), "w")[1]["idx"], b.compress(_x(500, seed=1), "w")[1]["idx"]
    assert torch.equal(ia1, ib1)
    ia2 = a.compress(_x(500), "w")[1]["idx"]
    assert not torch.equal(ia1, ia2)
    assert ia1.numel() == 50 and ia1.unique().numel() == 50


@pytest.mark.parametrize("ratio,k", [(0.07, 7), (0.14, 14), (0.28, 28), (0.55, 55), (0.56, 56), (0.57, 57)])
def test_k_is_the_ceiling_of_the_ratio_as_written(ratio, k):
    """k = ceil(ratio * n) with ratio the decimal number written: float products such as
    0.07 * 100 = 7.000000000000001 made k one too large until the twentieth session."""
    for name in ("topk", "randomk"):
        c = build_compressor(name, ratio=ratio, error_feedback=False)
        payload, ctx = c.compress(_x(100), "w")
        assert payload[0].numel() == k
        assert c.payload_nbytes((100,)) == sum(t.numel() * t.element_size() for t in payload)


def test_randomk_rescale_is_unbiased():
    c = build_compressor("randomk", ratio=0.1, rescale=True, error_feedback=False)
    x = _x(200)
    acc = torch.zeros(200, dtype=torch.float64)
    for _ in range(3000):
        acc += c.decompress(*c.compress(x, "w")).double()
    assert float((acc / 3000 - x.double()).abs().max()) < 0.35


# --- sign methods -----------------------------------------------------------------------------
def test_signsgd_is_scaled_sign():
    c = build_compressor("efsignsgd")
    x = _x(37, 3)
    y = c.decompress(*c.compress(x, "w"))
    scale = x.abs().mean()
    torch.testing.assert_close(y, torch.where(x >= 0, scale, -scale))


def test_majority_vote():
    c = build_compressor("signum_vote", scaled=False)
    xs = [torch.tensor([1.0, -1, 2, -3, 0.5]), torch.tensor([1.0, 1, -2, -3, -0.5]),
          torch.tensor([-1.0, 1, -2, 3, -0.5])]
    enc = [c.compress(x, "w") for x in xs]
    out = c.aggregate_payloads([p for p, _ in enc], enc[0][1])
    assert torch.equal(out, torch.tensor([1.0, 1, -1, -1, -1]))
    # even number of ranks: ties give 0
    out2 = c.aggregate_payloads([p for p, _ in enc[:2]], enc[0][1])
    assert torch.equal(out2, torch.tensor([1.0, 0, 0, -1, 0]))


def test_signum_momentum_is_local_state():
    c = build_compressor("signum_vote", momentum=0.9)
    c.compress(torch.ones(4), "w")
    p, ctx = c.compress(-0.5 * torch.ones(4), "w")  # m = 0.9*0.1 - 0.05 > 0
    assert torch.all(c.decompress(p, ctx) > 0)


# --- error feedback ---------------------------------------------------------------------------
@pytest.mark.parametrize("name,hp", [
    ("topk", {"ratio": 0.02}), ("randomk", {"ratio": 0.05}), ("efsignsgd", {}),
    ("qsgd", {"bits": 3, "error_feedback": True}), ("powersgd", {"rank": 2}), ("fp16", {"error_feedback": True}),
])
def test_error_feedback_residual_plus_sent_equals_accumulated_gradient(name, hp):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(48, 40))
    comm = GradientCommunicator(build_compressor(name, **hp), [("w", w)], backend=None, min_compress_numel=0)
    total_g = torch.zeros_like(w, dtype=torch.float64)
    total_sent = torch.zeros_like(total_g)
    for t in range(12):
        g = _x(48, 40, seed=100 + t)
        total_g += g.double()
        w.grad = g.clone()
        comm.synchronize()
        total_sent += w.grad.double()
        e = comm.memory.get("w")
        torch.testing.assert_close(total_sent + e.double(), total_g, rtol=0, atol=1e-4)
    assert float(e.abs().sum()) > 0


# --- configuration errors ---------------------------------------------------------------------
@pytest.mark.parametrize("name,hp,match", [
    ("nope", {}, "unknown compressor 'nope'; available: bf16"),
    ("topk", {"k": 5}, r"does not take \['k'\]; accepted"),
    ("topk", {"ratio": 0}, r"ratio must be in \(0, 1\]"),
    ("topk", {"ratio": 1.5}, r"ratio must be in \(0, 1\]"),
    ("randomk", {"ratio": "0.1"}, "ratio must be a number"),
    ("powersgd", {"rank": 0}, "rank must be >= 1"),
    ("powersgd", {"rank": 2.5}, "rank must be an int"),
    ("qsgd", {"bits": 1}, "bits must be >= 2"),
    ("qsgd", {"levels": 0}, "levels must be >= 1"),
    ("signum_vote", {"error_feedback": True}, "not defined for majority vote"),
    ("signum_vote", {"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
    ("none", {"error_feedback": True}, "meaningless"),
    ("topk", {"error_feedback": "yes"}, "must be a bool"),
])
def test_config_errors_are_clear(name, hp, match):
    with pytest.raises(CompressionConfigError, match=match):
        build_compressor(name, **hp)


def test_build_from_config_mapping():
    c = build_compressor({"name": "TopK", "ratio": 0.05})
    assert c.name == "topk" and c.ratio == 0.05 and c.error_feedback
    assert build_compressor("efsignsgd").error_feedback and not build_compressor("signsgd").error_feedback
    with pytest.raises(CompressionConfigError, match="needs a 'name'"):
        build_compressor({"ratio": 0.1})
