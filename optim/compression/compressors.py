"""The compression methods. Byte counts are exact payload sizes (see docs/compression.md).

=============  ==========  ===========================================================
name           collective  payload per tensor of n elements
=============  ==========  ===========================================================
none           allreduce   the tensor                                 4n (fp32)
fp16 / bf16    allreduce   cast                                        2n
qsgd           allgather   fp32 norm per bucket + packed codes         4*ceil(n/B) + ceil(n*b/8)
topk           allgather   values + bit-packed indices                 4k + ceil(k*ceil(log2 n)/8)
randomk        allreduce   values at shared-seed indices               4k
signsgd        allgather   fp32 scale + 1 bit per element              4 + ceil(n/8)
efsignsgd      allgather   same as signsgd, error feedback on
signum_vote    allgather   same as signsgd; aggregated by majority vote
powersgd       2x allreduce  P (n x r) and Q (m x r) per matrix           4r(n+m)
=============  ==========  ===========================================================
"""

from __future__ import annotations

import functools
import logging
import math
import zlib
from typing import Any

import torch

from .base import (
    Collective,
    CompressionConfigError,
    Compressor,
    _check_int,
    _check_ratio,
    _exact_ratio,
    keep_finite,
    register,
)
from .packing import bits_for, pack_bits, packed_nbytes, unpack_bits

log = logging.getLogger(__name__)

__all__ = [
    "NoneCompressor",
    "CastCompressor",
    "QSGDCompressor",
    "TopKCompressor",
    "RandomKCompressor",
    "SignSGDCompressor",
    "SignumVoteCompressor",
    "stable_hash",
]


def stable_hash(*parts: Any) -> int:
    """Process-independent 31-bit hash (Python's hash() is salted per process)."""
    return zlib.crc32("\x1f".join(map(str, parts)).encode()) & 0x7FFFFFFF


def _generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def _numel(shape) -> int:
    return int(math.prod(shape))


@register("none", doc="no compression: dense allreduce of the gradient (the baseline)")
class NoneCompressor(Compressor):
    """No compression (dense average)."""

    name = "none"
    collective = Collective.ALLREDUCE
    lossless = True
    respects_threshold = False

    def __init__(self, *, error_feedback: bool = False, warmup_steps: int = 0, seed: int = 0):
        if error_feedback:
            raise CompressionConfigError("none: error_feedback is meaningless without compression")
        super().__init__(error_feedback=False, warmup_steps=warmup_steps, seed=seed)

    def compress(self, tensor, name):
        return [tensor], {}

    def decompress(self, payload, ctx):
        return payload[0]

    def payload_nbytes(self, shape, dtype=torch.float32):
        return _numel(shape) * torch.empty((), dtype=dtype).element_size()


class CastCompressor(Compressor):
    """Cast to a 16-bit float for the wire, back to the gradient dtype after."""

    collective = Collective.ALLREDUCE
    respects_threshold = False
    wire_dtype = torch.float16

    def __init__(self, *, error_feedback: bool = False, warmup_steps: int = 0, seed: int = 0):
        super().__init__(error_feedback=error_feedback, warmup_steps=warmup_steps, seed=seed)

    def compress(self, tensor, name):
        return [tensor.to(self.wire_dtype)], {"dtype": tensor.dtype}

    def decompress(self, payload, ctx):
        return payload[0].to(ctx["dtype"])

    def payload_nbytes(self, shape, dtype=torch.float32):
        return 2 * _numel(shape)


@register("fp16", doc="cast to float16 (2 bytes/element), allreduce")
class FP16Compressor(CastCompressor):
    """Cast to float16."""

    name = "fp16"
    wire_dtype = torch.float16


@register("bf16", doc="cast to bfloat16 (2 bytes/element); allreduce where the backend supports bf16")
class BF16Compressor(CastCompressor):
    """Cast to bfloat16."""

    name = "bf16"
    wire_dtype = torch.bfloat16


@register("qsgd", doc="QSGD stochastic quantisation to s levels, norm + sign + level bit-packed (allgather)")
class QSGDCompressor(Compressor):
    """QSGD (Alistarh et al. 2017): unbiased stochastic rounding of |x_i|/||x|| to s levels.

    ``bits`` is the total code width per element (sign included): s = 2**(bits-1) - 1 levels,
    or give ``levels`` (s) directly and the width is 1 + ceil(log2(s+1)). Each element is
    encoded as ``sign*level + s`` in [0, 2s] and bit-packed; one fp32 norm per bucket of
    ``bucket_size`` elements (None: one norm for the whole tensor). E[decode] = x and
    E||decode - x||^2 <= min(d/s^2, sqrt(d)/s) ||x||^2 per bucket of d elements.
    """

    name = "qsgd"
    collective = Collective.ALLGATHER
    adaptive_param = "bits"

    def __init__(
        self,
        *,
        bits: int = 8,
        levels: int | None = None,
        bucket_size: int | None = 512,
        error_feedback: bool = False,
        warmup_steps: int = 0,
        seed: int = 0,
    ):
        super().__init__(error_feedback=error_feedback, warmup_steps=warmup_steps, seed=seed)
        if levels is not None:
            _check_int(self.name, "levels", levels, lo=1, hi=2**30)
            s = levels
        else:
            _check_int(self.name, "bits", bits, lo=2, hi=31)
            s = 2 ** (bits - 1) - 1
        if bucket_size is not None:
            _check_int(self.name, "bucket_size", bucket_size, lo=1)
        self.levels = levels
        self.s = s
        self.code_bits = bits_for(2 * s + 1)  # == 1 + ceil(log2(s + 1))
        self.bits = self.code_bits if levels is not None else bits
        self.bucket_size = bucket_size
        self._gen: torch.Generator | None = None
        self._gen_state: tuple[str, torch.Tensor] | None = None  # (device type, state) loaded, not used yet

    def set_rank(self, rank, world_size):
        super().set_rank(rank, world_size)
        self._gen = None  # re-seed: rounding noise must be independent across ranks

    def _rng(self, device) -> torch.Generator:
        if self._gen is None or self._gen.device != torch.device(device):
            self._gen = _generator(device, stable_hash("qsgd", self.seed, self.worker_rank))
            if self._gen_state is not None:
                kind, state = self._gen_state
                self._gen_state = None
                if kind == self._gen.device.type:  # a CPU state (Mersenne Twister) is no CUDA one (Philox)
                    self._gen.set_state(state)
                else:
                    log.warning("qsgd: the checkpoint's rounding RNG is a %s generator's and this run compresses "
                                "on %s: its noise is drawn afresh (the resumed run is not bit-identical to an "
                                "uninterrupted one)", kind, self._gen.device.type)
        return self._gen

    def _buckets(self, n: int) -> tuple[int, int]:
        b = n if self.bucket_size is None else min(self.bucket_size, n)
        b = max(b, 1)
        return b, (n + b - 1) // b

    @staticmethod
    def _math_dtype(dtype: torch.dtype) -> torch.dtype:
        """float64 for float64 gradients (their norms, sent as float64, too), float32 otherwise."""
        return torch.float64 if dtype == torch.float64 else torch.float32

    def compress(self, tensor, name):
        dt = self._math_dtype(tensor.dtype)
        flat = tensor.detach().reshape(-1).to(dt)
        n = flat.numel()
        b, nb = self._buckets(n)
        if nb * b == n:
            mat = flat.view(nb, b)
        else:
            mat = torch.zeros(nb * b, dtype=dt, device=flat.device)
            mat[:n] = flat
            mat = mat.view(nb, b)
        # the norm of each bucket scaled by its largest entry, so that squares neither overflow
        # (3e19 gave inf, then NaN everywhere) nor underflow (3e-24 gave a norm of 0, all zero)
        amax = mat.abs().amax(dim=1, keepdim=True)
        unit = torch.where(amax > 0, amax, torch.ones_like(amax))
        norms = (torch.linalg.vector_norm(mat / unit, dim=1) * unit.squeeze(1))
        # a bucket with an inf or NaN decodes to NaN (its values were a sign-flipped inf and NaN):
        # not finite, so the step can be skipped, and no finite-looking value
        norms = torch.where(torch.isfinite(norms), norms, torch.full_like(norms, math.nan))
        scale = (self.s / torch.where(norms > 0, norms, torch.ones_like(norms))).unsqueeze(1)
        r = mat.abs().mul_(scale)  # in [0, s]
        level = torch.floor(r)
        frac = r.sub_(level)
        u = torch.rand(frac.shape, generator=self._rng(frac.device), device=frac.device, dtype=dt)
        level += u < frac  # round up with probability frac: E[level] = |x| s / ||x||
        level = torch.nan_to_num_(level, nan=0.0).clamp_(min=0, max=self.s)
        code = torch.where(mat < 0, -level, level).add_(self.s).reshape(-1)[:n]  # in [0, 2s]
        code = code.to(torch.uint8 if self.code_bits <= 8 else torch.int64)
        packed = pack_bits(code, self.code_bits)
        return [norms, packed], {"shape": tensor.shape, "dtype": tensor.dtype, "n": n}

    def decompress(self, payload, ctx):
        norms, packed = payload
        n = ctx["n"]
        b, nb = self._buckets(n)
        dt = self._math_dtype(ctx["dtype"])
        level = (unpack_bits(packed, self.code_bits, n) - self.s).to(dt)
        padded = torch.zeros(nb * b, dtype=dt, device=level.device)
        padded[:n] = level
        out = padded.view(nb, b) * (norms.to(dt) / self.s).unsqueeze(1)
        return out.reshape(-1)[:n].view(ctx["shape"]).to(ctx["dtype"])

    def payload_nbytes(self, shape, dtype=torch.float32):
        n = _numel(shape)
        _, nb = self._buckets(n)
        return torch.empty((), dtype=self._math_dtype(dtype)).element_size() * nb + packed_nbytes(n, self.code_bits)

    def variance_bound(self, d: int) -> float:
        """QSGD Lemma 3.1: E||Q(v)-v||^2 <= min(d/s^2, sqrt(d)/s) ||v||^2 (per bucket of d)."""
        return min(d / self.s**2, math.sqrt(d) / self.s)

    def state_dict(self):
        g = self._gen
        if g is not None:  # a CUDA generator's state too (its seed and offset): until the twenty-fourth
            # session only the CPU's was kept, so a resumed GPU run drew other rounding noise
            return {"rng": g.get_state(), "rng_device": g.device.type}
        # loaded but not used yet (the generator is created at the first compress()): the pending
        # state is the RNG's state, so a checkpoint written right after a resume, and configure()
        # (the adaptive controller re-initialises the compressor), keep it
        if self._gen_state is None:
            return {}
        return {"rng": self._gen_state[1].clone(), "rng_device": self._gen_state[0]}

    def load_state_dict(self, state):
        if "rng" in state:
            self._gen = None
            # a checkpoint from before the device was recorded holds a CPU state; set_state takes a
            # CPU tensor whatever the generator's device (a checkpoint may be loaded to a GPU)
            self._gen_state = (state.get("rng_device", "cpu"), state["rng"].detach().cpu().clone())


@functools.lru_cache(maxsize=4096)  # per tensor per step: the same few (ratio, size) pairs
def _k_for(ratio: float, n: int) -> int:
    """k = ceil(ratio * n) in exact arithmetic (:func:`_exact_ratio`), at least 1, at most n: the one
    count the payload (compress) and its size (payload_nbytes) both use."""
    return min(n, max(1, math.ceil(_exact_ratio(ratio) * n)))


@register("topk", defaults={"error_feedback": True},
          doc="top-k sparsification (k = ceil(ratio*n)), values + bit-packed indices (allgather), EF on")
class TopKCompressor(Compressor):
    """Top-k by magnitude (Stich et al. 2018 with error feedback).

    Payload: the k values in the gradient dtype and the k indices bit-packed to
    ceil(log2 n) bits each. Ranks select different index sets, so the payloads are
    allgathered and scatter-added; the result is divided by the world size (the true
    average of the ranks' sparse tensors, not an average over the ranks that chose an index).
    """

    name = "topk"
    collective = Collective.ALLGATHER
    adaptive_param = "ratio"

    def __init__(self, *, ratio: float = 0.01, error_feedback: bool = True, warmup_steps: int = 0, seed: int = 0):
        super().__init__(error_feedback=error_feedback, warmup_steps=warmup_steps, seed=seed)
        _check_ratio(self.name, "ratio", ratio)
        self.ratio = float(ratio)

    def compress(self, tensor, name):
        flat = tensor.detach().reshape(-1)
        n = flat.numel()
        k = _k_for(self.ratio, n)
        _, idx = torch.topk(flat.abs(), k, sorted=False)
        values = flat[idx]
        packed = pack_bits(idx, bits_for(n))
        return [values, packed], {"shape": tensor.shape, "dtype": tensor.dtype, "n": n, "k": k}

    def _indices(self, packed, ctx):
        return unpack_bits(packed, bits_for(ctx["n"]), ctx["k"])

    def decompress(self, payload, ctx):
        values, packed = payload
        out = torch.zeros(ctx["n"], dtype=ctx["dtype"], device=values.device)
        out.index_put_((self._indices(packed, ctx),), values.to(ctx["dtype"]))
        return out.view(ctx["shape"])

    def aggregate_payloads(self, payloads, ctx):
        out = torch.zeros(ctx["n"], dtype=ctx["dtype"], device=payloads[0][0].device)
        for values, packed in payloads:
            out.index_add_(0, self._indices(packed, ctx), values.to(ctx["dtype"]))
        return out.div_(len(payloads)).view(ctx["shape"])

    def payload_nbytes(self, shape, dtype=torch.float32):
        n = _numel(shape)
        k = _k_for(self.ratio, n)
        return k * torch.empty((), dtype=dtype).element_size() + packed_nbytes(k, bits_for(n))


@register("randomk", defaults={"error_feedback": True},
          doc="random-k sparsification with a seed shared by all ranks: values only (allreduce), EF on")
class RandomKCompressor(Compressor):
    """Random-k: every rank picks the same k indices (seed, parameter name, step), so only the
    values travel and they can be allreduced. ``rescale=True`` multiplies by n/k (unbiased,
    only without error feedback: with it the residual grows by 1 - n/k a step, and is refused)."""

    name = "randomk"
    collective = Collective.ALLREDUCE
    adaptive_param = "ratio"

    def __init__(
        self,
        *,
        ratio: float = 0.01,
        rescale: bool = False,
        error_feedback: bool = True,
        warmup_steps: int = 0,
        seed: int = 0,
    ):
        super().__init__(error_feedback=error_feedback, warmup_steps=warmup_steps, seed=seed)
        _check_ratio(self.name, "ratio", ratio)
        if not isinstance(rescale, bool):
            raise CompressionConfigError(f"randomk: rescale must be a bool, got {rescale!r}")
        if rescale and error_feedback:  # accepted until the twenty-sixth session: inf in ~300 steps
            raise CompressionConfigError(
                "randomk: rescale=true (values times n/k, unbiased) diverges with error feedback: the residual of a "
                "sent entry is (1 - n/k) times it, -99x at 1 %; give error_feedback: false with rescale, or leave "
                "rescale out")
        self.ratio = float(ratio)
        self.rescale = rescale
        if not hasattr(self, "_calls"):
            self._calls: dict[str, int] = {}

    def indices(self, name: str, n: int, device) -> torch.Tensor:
        """k distinct indices, uniformly random, identical on every rank (seed, name, call)."""
        call = self._calls.get(name, 0)
        self._calls[name] = call + 1
        g = _generator(torch.device("cpu"), stable_hash("randomk", self.seed, name, call))
        k = _k_for(self.ratio, n)
        if 4 * k < n:  # O(k): draw with replacement, keep a random k-subset of the distinct draws
            cand = torch.unique(torch.randint(n, (k + k // 4 + 32,), generator=g))
            if cand.numel() >= k:
                return cand[torch.randperm(cand.numel(), generator=g)[:k]].to(device)
        return torch.randperm(n, generator=g)[:k].to(device)

    def compress(self, tensor, name):
        flat = tensor.detach().reshape(-1)
        n = flat.numel()
        idx = self.indices(name, n, flat.device)
        values = flat[idx]
        if self.rescale:
            values = values * (n / idx.numel())
        return [values], {"shape": tensor.shape, "dtype": tensor.dtype, "n": n, "idx": idx}

    def decompress(self, payload, ctx):
        out = torch.zeros(ctx["n"], dtype=ctx["dtype"], device=payload[0].device)
        out.index_put_((ctx["idx"],), payload[0].to(ctx["dtype"]))
        return out.view(ctx["shape"])

    def payload_nbytes(self, shape, dtype=torch.float32):
        return _k_for(self.ratio, _numel(shape)) * torch.empty((), dtype=dtype).element_size()

    def state_dict(self):
        return {"calls": dict(self._calls)}

    def load_state_dict(self, state):
        self._calls = dict(state.get("calls", {}))


def _sign_payload(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale = ||x||_1 / n as fp32[1], packed bits with 1 for x >= 0)."""
    flat = x.detach().reshape(-1)
    scale = flat.abs().to(torch.float32).mean().reshape(1)
    bits = (flat >= 0).to(torch.int64)
    return scale, pack_bits(bits, 1)


def _unpack_signs(packed: torch.Tensor, n: int) -> torch.Tensor:
    return unpack_bits(packed, 1, n).to(torch.float32) * 2.0 - 1.0


@register("signsgd", defaults={"error_feedback": False},
          doc="scaled sign (||x||_1/n * sign(x)), 1 bit/element + fp32 scale (allgather), no EF")
@register("efsignsgd", defaults={"error_feedback": True},
          doc="EF-signSGD (Karimireddy et al. 2019): scaled sign with error feedback (allgather)")
class SignSGDCompressor(Compressor):
    """Scaled sign compression C(x) = (||x||_1 / n) sign(x); zeros are sent as +scale
    (error feedback corrects them). Aggregation is the average of the ranks' decoded tensors."""

    name = "signsgd"
    collective = Collective.ALLGATHER

    def __init__(self, *, error_feedback: bool = False, warmup_steps: int = 0, seed: int = 0):
        super().__init__(error_feedback=error_feedback, warmup_steps=warmup_steps, seed=seed)

    def compress(self, tensor, name):
        scale, packed = _sign_payload(tensor)
        return [scale, packed], {"shape": tensor.shape, "dtype": tensor.dtype, "n": tensor.numel()}

    def decompress(self, payload, ctx):
        scale, packed = payload
        out = _unpack_signs(packed, ctx["n"]) * scale.to(torch.float32)
        return out.view(ctx["shape"]).to(ctx["dtype"])

    def payload_nbytes(self, shape, dtype=torch.float32):
        return 4 + packed_nbytes(_numel(shape), 1)


@register("signum_vote", defaults={"error_feedback": False},
          doc="signSGD/Signum with majority vote (Bernstein et al. 2018), 1 bit/element (allgather)")
class SignumVoteCompressor(Compressor):
    """Majority vote: each rank sends sign(m) where m is its local momentum
    (m = beta m + (1-beta) g; beta = ``momentum``, 0 gives plain signSGD), the aggregate is
    sign(sum of the ranks' signs) - 0 where the vote ties - times the mean of the ranks'
    scales ||m||_1/n when ``scaled`` (so any optimizer on top sees a gradient-sized step).
    Not an average, so error feedback is not offered."""

    name = "signum_vote"
    collective = Collective.ALLGATHER

    def __init__(
        self,
        *,
        momentum: float = 0.0,
        scaled: bool = True,
        error_feedback: bool = False,
        warmup_steps: int = 0,
        seed: int = 0,
    ):
        if error_feedback:
            raise CompressionConfigError(
                "signum_vote: error feedback is not defined for majority vote (use efsignsgd)"
            )
        super().__init__(error_feedback=False, warmup_steps=warmup_steps, seed=seed)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise CompressionConfigError(f"signum_vote: momentum must be in [0, 1), got {momentum!r}")
        if not isinstance(scaled, bool):
            raise CompressionConfigError(f"signum_vote: scaled must be a bool, got {scaled!r}")
        self.momentum = float(momentum)
        self.scaled = scaled
        if not hasattr(self, "_m"):
            self._m: dict[str, torch.Tensor] = {}

    def compress(self, tensor, name):
        x = tensor.detach()
        if self.momentum > 0:
            old = self._m.get(name)
            x = (1 - self.momentum) * x if old is None else self.momentum * old + (1 - self.momentum) * x
            # what is sent keeps an inf or NaN (so a step can be skipped on it); the momentum keeps
            # its last finite values there (else one such gradient poisoned it for good)
            self._m[name] = keep_finite(x, old)
        scale, packed = _sign_payload(x)
        return [scale, packed], {"shape": tensor.shape, "dtype": tensor.dtype, "n": tensor.numel()}

    def decompress(self, payload, ctx):
        scale, packed = payload
        s = _unpack_signs(packed, ctx["n"])
        if self.scaled:
            s = s * scale.to(torch.float32)
        return s.view(ctx["shape"]).to(ctx["dtype"])

    def aggregate_payloads(self, payloads, ctx):
        votes = torch.zeros(ctx["n"], dtype=torch.float32, device=payloads[0][1].device)
        scale = torch.zeros(1, dtype=torch.float32, device=votes.device)
        for sc, packed in payloads:
            votes += _unpack_signs(packed, ctx["n"])
            scale += sc.to(torch.float32)
        out = torch.sign(votes)
        if self.scaled:
            out = out * (scale / len(payloads))
        return out.view(ctx["shape"]).to(ctx["dtype"])

    def payload_nbytes(self, shape, dtype=torch.float32):
        return 4 + packed_nbytes(_numel(shape), 1)

    def state_dict(self):
        return {"momentum": {k: v.cpu().clone() for k, v in self._m.items()}}

    def load_state_dict(self, state):
        self._m = {k: v.clone() for k, v in state.get("momentum", {}).items()}
