"""Numerical edge cases of the compressors and the communicator: zero, inf and extreme
gradients, half-precision averages, empty tensors, and error feedback around steps sent
exactly. Each was wrong until the twenty-sixth session (compression probe)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from optim.compression import CompressionConfigError, GradientCommunicator, build_compressor
from optim.compression.backends import AVERAGE, Backend


class _MirrorBackend(Backend):
    """Two ranks in one process, the peer sending exactly what this rank sends: an allreduce
    sums in the tensor's own dtype, then divides for an average (Horovod's order)."""

    name = "mirror"

    def __init__(self) -> None:
        self.size, self.rank = 2, 0

    def allreduce_async(self, tensor, op, name):
        out = tensor + tensor
        return out / 2 if op == AVERAGE else out

    def allgather_async(self, tensor, name):
        return torch.cat([tensor, tensor])

    def synchronize(self, handle):
        return handle


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8))


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_powersgd_sends_a_layer_again_after_a_step_with_a_zero_gradient(rank):
    """A zero-initialised last layer gives the first layer a zero gradient at step 1: Gram-Schmidt
    (rank <= 2) kept Q's zero columns at zero, so P = M 0 and the layer was never sent again (its
    residual grew); the QR path (rank 4) recovered. A zero column is now drawn again."""
    m = _mlp()
    nn.init.zeros_(m[2].weight)
    comm = GradientCommunicator(build_compressor("powersgd", rank=rank), m, min_compress_numel=0)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w0 = m[0].weight.detach().clone()
    x, y = torch.randn(256, 32), torch.randn(256, 8)
    for _ in range(50):
        opt.zero_grad()
        nn.functional.mse_loss(m(x), y).backward()
        comm.synchronize()
        opt.step()
    assert (m[0].weight - w0).norm() > 0.05
    assert comm.compressor.q_memory["0.weight"].norm() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_powersgd_after_a_missing_gradient_in_half_precision(dtype):
    """A step where the parameter has no gradient (the communicator zero-fills it) in bf16, which
    always takes the Gram-Schmidt path: every later gradient came out all zero."""
    p = nn.Parameter(torch.zeros(64, 32, dtype=dtype))
    comm = GradientCommunicator(build_compressor("powersgd", rank=4), [("w", p)], min_compress_numel=0)
    p.grad = None
    comm.synchronize()
    for _ in range(3):
        p.grad = torch.randn(64, 32).to(dtype)
        comm.synchronize()
        assert p.grad.float().norm() > 0


@pytest.mark.parametrize("method,wire", [("fp16", torch.float32), ("none", torch.float16)])
def test_half_precision_average_overflows_only_where_a_rank_does(method, wire):
    """Horovod averages by summing, then dividing: two ranks' 40,000 summed in fp16 was inf, though
    each fits. Half-precision payloads (fp16 compression, fp16 parameters sent dense) are divided
    first, then summed, as torch's fp16 hook does."""
    p = nn.Parameter(torch.zeros(4, dtype=wire))
    comm = GradientCommunicator(build_compressor(method), [("w", p)], backend=_MirrorBackend())
    p.grad = torch.full((4,), 40000.0, dtype=wire)
    st = comm.synchronize()
    assert p.grad.tolist() == [40000.0] * 4
    assert st.bytes_sent == 4 * 2  # fp16 on the wire, as before


def test_randomk_rescale_with_error_feedback_is_refused():
    """Rescaled random-k is not a contraction: with error feedback (its default) the residual
    reached inf within 300 steps, and the config was accepted."""
    with pytest.raises(CompressionConfigError, match=r"rescale=true .* diverges with error feedback"):
        build_compressor("randomk", rescale=True)
    c = build_compressor("randomk", rescale=True, error_feedback=False)
    p = nn.Parameter(torch.zeros(1000))
    comm = GradientCommunicator(c, [("w", p)])
    for _ in range(20):
        p.grad = torch.randn(1000)
        comm.synchronize()
        assert torch.isfinite(p.grad).all()


@pytest.mark.parametrize("method,params", [("topk", {}), ("efsignsgd", {}), ("powersgd", {"rank": 2}),
                                           ("qsgd", {"error_feedback": True}),
                                           ("signum_vote", {"momentum": 0.9, "scaled": True})])
def test_one_inf_gradient_does_not_poison_later_steps(method, params):
    """An inf in one step's gradient: that step is not finite (so a loss scaler can skip it), the
    next ones are. The error-feedback residual (and signum's momentum) took it in for good: every
    later step was inf or NaN."""
    p = nn.Parameter(torch.zeros(64, 64))
    comm = GradientCommunicator(build_compressor(method, **params), [("w", p)], min_compress_numel=0)
    torch.manual_seed(0)
    finite = []
    for t in range(6):
        p.grad = torch.randn(64, 64)
        if t == 1:
            p.grad[0, 0] = float("inf")
        comm.synchronize()
        finite.append(bool(torch.isfinite(p.grad).all()))
        r = comm.memory.get("w")
        assert r is None or torch.isfinite(r).all()
    assert finite == [True, False, True, True, True, True]


def test_a_residual_goes_with_a_step_sent_exactly():
    """Adaptive PowerSGD at a higher rank sends a matrix too small for it dense (exact): its
    residual was neither sent nor cleared, then added back once compressed again. Now it goes with
    the exact step, so what was sent plus what is held equals the gradients' sum at every step."""
    p = nn.Parameter(torch.zeros(40, 40))
    comm = GradientCommunicator(build_compressor("powersgd", rank=4), [("w", p)], min_compress_numel=0,
                                adaptive={"interval": 1, "eta": 0.5, "start_critical": False})
    torch.manual_seed(0)
    total, sent, kinds = torch.zeros(40, 40), torch.zeros(40, 40), []
    for scale in (1, 1, 1, 10, 10, 10, 1, 1):
        g = scale * torch.randn(40, 40)
        total += g
        p.grad = g.clone()
        st = comm.synchronize()
        kinds.append("compressed" if st.n_compressed else "dense")
        sent += p.grad
        held = comm.memory.get("w")
        if kinds[-1] == "dense":
            assert held is None
        assert torch.allclose(sent + (torch.zeros_like(sent) if held is None else held), total, atol=1e-3)
    assert "dense" in kinds and kinds[0] == "compressed"


@pytest.mark.parametrize("values,dtype", [([3e19, -4e19, 1.0], torch.float32), ([3e-24, -4e-24, 1e-24], torch.float32),
                                          ([1e-50, 2e-50, -3e-50], torch.float64)])
def test_qsgd_is_unbiased_at_extreme_magnitudes(values, dtype):
    """QSGD squared the entries in float32: 4e19 overflowed (NaN everywhere), 3e-24 underflowed
    (a norm of 0: all zero, so E[Q(v)] = 0 != v), and float64 gradients were cut to float32."""
    c = build_compressor("qsgd", bits=8)
    v = torch.tensor(values, dtype=dtype)
    draws = torch.stack([c.decompress(*c.compress(v, "x")) for _ in range(2000)])
    assert draws.dtype == dtype and torch.isfinite(draws).all()
    assert (draws.mean(0) - v).abs().max() <= 0.01 * torch.linalg.vector_norm(v.double())  # E[Q(v)] = v


def test_qsgd_of_a_non_finite_bucket_is_nan_not_a_flipped_sign():
    """[1, inf, 3] decoded as [nan, -inf, nan]: the inf's NaN code cast to 0, which decodes to
    minus the norm. A bucket with an inf or NaN decodes to NaN throughout; other buckets are
    untouched."""
    c = build_compressor("qsgd", bits=8, bucket_size=3)
    out = c.decompress(*c.compress(torch.tensor([1.0, float("inf"), 3.0, 1.0, 2.0, 2.0]), "x"))
    assert torch.isnan(out[:3]).all() and torch.isfinite(out[3:]).all()


def test_an_empty_parameter_is_sent_dense():
    """top-k of a zero-element tensor failed with "n_values must be >= 1, got 0"."""
    e, w = nn.Parameter(torch.zeros(0, 5)), nn.Parameter(torch.zeros(10))
    comm = GradientCommunicator(build_compressor("topk"), [("e", e), ("w", w)], min_compress_numel=0)
    e.grad, w.grad = torch.zeros(0, 5), torch.ones(10)
    st = comm.synchronize()
    assert st.n_uncompressed == 1 and st.n_compressed == 1 and e.grad.shape == (0, 5)
