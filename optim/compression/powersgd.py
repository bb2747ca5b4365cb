"""PowerSGD (Vogels et al. 2019): rank-r power iteration with warm start and error feedback.

Mirrors ``torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook`` per parameter:

    M  = grad.view(n, -1) (+ error)            Q <- previous Q (warm start) or N(0, 1)
    orthogonalise(Q);  P = M Q;  allreduce_sum(P)
    orthogonalise(P);  Q = M^T P;  allreduce_mean(Q)
    approx = P Q^T;    error = M - approx;      keep Q for the next step

A matrix is compressed only when ``(n + m) * r * min_compression_rate < n * m`` (torch's
rule); other tensors (biases, small layers) go in the dense allreduce. Torch draws the
first Q of each bucket from one seeded stream; here each parameter gets its own stream
seeded by (seed, parameter name), identical on every rank. Tests load torch's initial Q to
compare the maths step by step.

Embedding tables (``embedding=``). Low rank is what PowerSGD exploits (Vogels et al. 2019
evaluate it on convolutional and LSTM weight matrices): an n x m matrix costs r(n + m)
numbers, so it compresses at most m/r when n >> m. A DLRM table of 16-wide rows therefore
shrinks at most 16/r = 4x at rank 4, however large it is. Its gradient is row-sparse instead
(only the rows looked up in the batch are non-zero), which sparsification exploits and low
rank does not. The policy says what the communicator does with a table's dense gradient:

* ``"topk"`` (default): top-k (``embedding_ratio``, default 1 %) with error feedback on the
  table, PowerSGD on every other matrix - one allgather for the tables, launched before the
  two PowerSGD allreduces so it overlaps them;
* ``"sparse"``: the table's non-zero rows, exactly (row ids + values, allgathered), densified
  again after the exchange - lossless, so the ratio depends on how many rows a step touches;
* ``"powersgd"``: the table is a matrix like any other (plain PowerSGD, capped at m/r).

Which parameters are tables is the communicator's business
(:func:`optim.compression.embedding_parameter_names`). Tables whose gradient is already sparse
(``nn.Embedding(sparse=True)``) are always sent as exact rows, whatever the policy.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Collective, CompressionConfigError, Compressor, _check_int, _check_ratio, register
from .compressors import _generator, stable_hash

__all__ = ["PowerSGDCompressor", "orthogonalize", "EMBEDDING_POLICIES"]

EMBEDDING_POLICIES = ("topk", "sparse", "powersgd")


def orthogonalize(matrix: torch.Tensor, epsilon: float = 0.0) -> torch.Tensor:
    """Orthonormalise the columns of an (n, r) matrix in place (torch's hook's procedure):
    Gram-Schmidt for r <= 2 or half precision, Householder QR otherwise."""
    m = matrix.unsqueeze(0)
    rank = m.shape[2]
    if rank <= 2 or m.dtype in (torch.float16, torch.bfloat16):
        for i in range(rank):
            col = m[:, :, i : i + 1]
            norm = torch.norm(col, dim=1, keepdim=True)
            if epsilon == 0:
                col /= torch.where(norm > 0, norm, torch.ones_like(norm))  # zero column stays zero
            else:
                col /= norm + epsilon
            if i + 1 < rank:
                rest = m[:, :, i + 1 :]
                rest -= torch.sum(col * rest, dim=1, keepdim=True) * col
    else:
        q, _ = torch.linalg.qr(m)
        m.copy_(q)
    return matrix


@register("powersgd", defaults={"error_feedback": True},
          doc="PowerSGD rank-r low-rank factors P, Q (two allreduces), warm start + EF")
class PowerSGDCompressor(Compressor):
    """PowerSGD with rank ``rank``; ``warmup_steps`` plays the role of torch's
    ``start_powerSGD_iter`` (dense allreduce before it). ``embedding`` / ``embedding_ratio``:
    what happens to embedding tables (module docstring)."""

    name = "powersgd"
    collective = Collective.ALLREDUCE_2PHASE
    adaptive_param = "rank"

    def __init__(
        self,
        *,
        rank: int = 4,
        warm_start: bool = True,
        min_compression_rate: float = 2.0,
        orthogonalization_epsilon: float = 0.0,
        embedding: str = "topk",
        embedding_ratio: float = 0.01,
        error_feedback: bool = True,
        warmup_steps: int = 0,
        seed: int = 0,
    ):
        super().__init__(error_feedback=error_feedback, warmup_steps=warmup_steps, seed=seed)
        _check_int(self.name, "rank", rank, lo=1)
        if not isinstance(warm_start, bool):
            raise CompressionConfigError(f"powersgd: warm_start must be a bool, got {warm_start!r}")
        if isinstance(min_compression_rate, bool) or not isinstance(min_compression_rate, (int, float)) \
                or min_compression_rate < 0:
            raise CompressionConfigError(
                f"powersgd: min_compression_rate must be a number >= 0, got {min_compression_rate!r}")
        if not isinstance(orthogonalization_epsilon, (int, float)) or orthogonalization_epsilon < 0:
            raise CompressionConfigError(
                f"powersgd: orthogonalization_epsilon must be >= 0, got {orthogonalization_epsilon!r}")
        if embedding not in EMBEDDING_POLICIES:
            raise CompressionConfigError(
                f"powersgd: embedding must be one of {list(EMBEDDING_POLICIES)}, got {embedding!r}")
        _check_ratio(self.name, "embedding_ratio", embedding_ratio)
        self.rank = rank
        self.embedding = embedding
        self.embedding_ratio = float(embedding_ratio)
        self.warm_start = warm_start
        self.min_compression_rate = float(min_compression_rate)
        self.orthogonalization_epsilon = float(orthogonalization_epsilon)
        if not hasattr(self, "q_memory"):
            self.q_memory: dict[str, torch.Tensor] = {}
            self._calls: dict[str, int] = {}

    # -- shape rule --------------------------------------------------------------------
    @staticmethod
    def matrix_shape(shape) -> tuple[int, int]:
        if len(shape) == 0:
            return 1, 1
        n = int(shape[0])
        m = int(torch.Size(shape).numel() // max(n, 1)) if n else 0
        return n, m

    def effective_rank(self, shape) -> int:
        n, m = self.matrix_shape(shape)
        return min(n, m, self.rank)

    def should_compress(self, shape) -> bool:
        n, m = self.matrix_shape(shape)
        r = min(n, m, self.rank)
        return n > 0 and m > 0 and (n + m) * r * self.min_compression_rate < n * m

    # -- the two phases ----------------------------------------------------------------
    def _initial_q(self, name: str, m: int, r: int, device, dtype) -> torch.Tensor:
        call = self._calls.get(name, 0)
        key = ("powersgd", self.seed, name) if self.warm_start else ("powersgd", self.seed, name, call)
        g = _generator(torch.device("cpu"), stable_hash(*key))
        return torch.randn(m, r, generator=g, dtype=dtype).to(device)

    def phase1(self, tensor: torch.Tensor, name: str) -> tuple[torch.Tensor, dict[str, Any]]:
        """M Q with the (warm-started) orthogonalised Q. Returns (P, state)."""
        n, m = self.matrix_shape(tensor.shape)
        r = min(n, m, self.rank)
        M = tensor.detach().reshape(n, m)
        q = self.q_memory.get(name) if self.warm_start else None
        if q is None or q.shape != (m, r) or q.dtype != M.dtype:
            q = self._initial_q(name, m, r, M.device, M.dtype)
        else:
            q = q.to(M.device).clone()
            # a column that is zero (a step whose gradient was zero: Gram-Schmidt leaves a zero
            # column at zero, so P = M 0 and Q = M^T P = 0 for good) or not finite (a step with an
            # inf gradient) is drawn again from the first draw; the stored Q is the same on every
            # rank, and so is the redraw. Until the twenty-sixth session such a matrix was never
            # sent again (P = 0) while its error-feedback residual grew.
            dead = (q == 0).all(dim=0) | ~torch.isfinite(q).all(dim=0)
            if dead.any():
                q[:, dead] = self._initial_q(name, m, r, M.device, M.dtype)[:, dead]
        self._calls[name] = self._calls.get(name, 0) + 1
        orthogonalize(q, self.orthogonalization_epsilon)
        p = M @ q
        return p, {"M": M, "shape": tensor.shape, "name": name}

    def phase2(self, p_summed: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """Orthogonalise the summed P and return this rank's Q = M^T P."""
        orthogonalize(p_summed, self.orthogonalization_epsilon)
        state["P"] = p_summed
        return state["M"].t() @ p_summed

    def finish(self, q_mean: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """Store Q for warm start and return the decompressed P Q^T (same on all ranks)."""
        if self.warm_start:
            self.q_memory[state["name"]] = q_mean.detach().clone()
        return (state["P"] @ q_mean.t()).view(state["shape"])

    # -- GRACE interface (single process: the allreduces are identities) ---------------
    def compress(self, tensor, name):
        p, st = self.phase1(tensor, name)
        q = self.phase2(p, st)
        if self.warm_start:
            self.q_memory[name] = q.detach().clone()
        return [st["P"], q], {"shape": tensor.shape, "name": name}

    def decompress(self, payload, ctx):
        p, q = payload
        return (p @ q.t()).view(ctx["shape"])

    def payload_nbytes(self, shape, dtype=torch.float32):
        n, m = self.matrix_shape(shape)
        r = min(n, m, self.rank)
        return (n + m) * r * torch.empty((), dtype=dtype).element_size()

    def state_dict(self):
        return {"q": {k: v.cpu().clone() for k, v in self.q_memory.items()}, "calls": dict(self._calls)}

    def load_state_dict(self, state):
        self.q_memory = {k: v.clone() for k, v in state.get("q", {}).items()}
        self._calls = dict(state.get("calls", {}))
