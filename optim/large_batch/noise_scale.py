"""Gradient noise scale (McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of
Large-Batch Training", arXiv:1812.06162, Appendix A.1).

For per-example gradients with mean ``G`` and covariance ``Sigma``, a batch-B gradient satisfies
``E|G_B|^2 = |G|^2 + tr(Sigma) / B``. Two batch sizes ``B_small < B_big`` give unbiased estimates::

    |G|^2  ~  (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    S      ~  (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)            (S = tr Sigma)

and the "simple" noise scale ``B_simple = S / |G|^2``, the critical batch size: below it larger
batches cut the number of steps almost linearly, above it returns diminish. Because the ratio of
noisy estimates is biased, :class:`GradientNoiseScale` keeps separate exponential moving averages
of ``|G|^2`` and ``S`` and divides the averages (as the paper recommends).

Data-parallel training gets both norms for free: ``B_small`` = per-worker batch (mean over workers
of the local ``|g|^2``) and ``B_big`` = global batch (norm of the all-reduced gradient) --
:meth:`GradientNoiseScale.update_distributed`. On one process, :func:`estimate_noise_scale` splits
a batch into micro-batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..distributed import allreduce_mean_, world_size

__all__ = ["noise_scale_estimates", "GradientNoiseScale", "estimate_noise_scale", "sq_norm"]


def sq_norm(tensors: Sequence[torch.Tensor]) -> float:
    """Squared L2 norm of a list of tensors, multi-tensor; a sparse tensor (a sparse embedding's
    gradient) counts its coalesced values (until the twenty-sixth session it raised
    NotImplementedError: no sparse ``linalg_vector_norm``)."""
    tensors = [(t.coalesce().values() if t.is_sparse else t).detach() for t in tensors if t is not None]
    if not tensors:
        return 0.0
    norms = torch._foreach_norm(tensors)
    return float(torch.stack([n.double() for n in norms]).square().sum())


def noise_scale_estimates(small_sq: float, big_sq: float, b_small: float, b_big: float) -> tuple[float, float]:
    """Unbiased ``(|G|^2, tr Sigma)`` estimates from squared gradient norms at two batch sizes."""
    if not b_big > b_small > 0:
        raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
    g2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    s = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return g2, s


class GradientNoiseScale:
    """EMA-smoothed ``B_simple = S / |G|^2`` (bias-corrected EMAs, as Adam's)."""

    def __init__(self, beta: float = 0.99):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.reset()

    def reset(self) -> None:
        self._g2 = 0.0
        self._s = 0.0
        self.n = 0
        self.last_g2 = math.nan
        self.last_s = math.nan

    def update(self, small_sq_norm: float, big_sq_norm: float, b_small: float, b_big: float) -> float:
        g2, s = noise_scale_estimates(small_sq_norm, big_sq_norm, b_small, b_big)
        self.last_g2, self.last_s = g2, s
        self.n += 1
        self._g2 = self.beta * self._g2 + (1 - self.beta) * g2
        self._s = self.beta * self._s + (1 - self.beta) * s
        return self.b_simple

    def update_distributed(self, local_grads: Sequence[torch.Tensor], global_grads: Sequence[torch.Tensor],
                           local_batch: int) -> float:
        """Under Horovod: ``local_grads`` before averaging (per-worker batch), ``global_grads`` after.

        Capture the local gradient norm before ``optimizer.synchronize()`` (e.g. compute
        ``sq_norm`` of ``p.grad`` right after ``backward()`` with ``backward_passes_per_step`` hooks
        not yet fired, or from a local copy) and pass the synchronised ``p.grad`` as ``global_grads``.
        """
        n = world_size()
        if n < 2:
            raise RuntimeError("update_distributed needs >= 2 Horovod workers (use update/estimate_noise_scale)")
        local = torch.tensor([sq_norm(local_grads)], dtype=torch.float64)
        allreduce_mean_([local], name="bigopt.gns.local")
        return self.update(float(local), sq_norm(global_grads), local_batch, local_batch * n)

    @property
    def grad_sq(self) -> float:
        return self._g2 / (1 - self.beta**self.n) if self.n else math.nan

    @property
    def trace_cov(self) -> float:
        return self._s / (1 - self.beta**self.n) if self.n else math.nan

    @property
    def b_simple(self) -> float:
        g2 = self.grad_sq
        return self.trace_cov / g2 if self.n and g2 > 0 else math.nan

    def diagnostics(self) -> dict[str, float]:
        return {"gns/b_simple": self.b_simple, "gns/grad_sq": self.grad_sq, "gns/trace_cov": self.trace_cov}


def estimate_noise_scale(model: torch.nn.Module, loss_fn: Callable, batch, n_chunks: int,
                         split: Callable | None = None) -> dict[str, float]:
    """One-shot estimate on a single process: split ``batch`` into ``n_chunks`` equal micro-batches
    (size ``b``), take ``|G_small|^2`` as the mean squared norm of the micro-batch gradients (B_small
    = b) and ``|G_big|^2`` from their average (B_big = n_chunks * b).

    ``loss_fn(model, micro_batch)`` returns the mean loss of a micro-batch; ``split(batch, n)``
    defaults to ``torch.chunk`` of every tensor in a tuple/list batch.
    """
    if n_chunks < 2:
        raise ValueError("n_chunks must be >= 2")
    params = [p for p in model.parameters() if p.requires_grad]
    if split is None:
        def split(b, n):
            parts = [torch.chunk(t, n) for t in b]
            return list(zip(*parts))
    chunks = split(batch, n_chunks)
    sizes = {len(c[0]) if isinstance(c, (tuple, list)) else len(c) for c in chunks}
    if len(sizes) != 1:
        raise ValueError("micro-batches must have equal sizes (make the batch divisible by n_chunks)")
    b = sizes.pop()
    acc = [torch.zeros_like(p) for p in params]
    small = 0.0
    for c in chunks:
        grads = torch.autograd.grad(loss_fn(model, c), params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        small += sq_norm(grads)
        for a, g in zip(acc, grads):  # a sparse gradient (sparse embeddings) added into a dense sum
            a.add_(g)
    small /= len(chunks)
    torch._foreach_div_(acc, float(len(chunks)))
    big = sq_norm(acc)
    g2, s = noise_scale_estimates(small, big, b, b * len(chunks))
    return {"grad_sq": g2, "trace_cov": s, "b_simple": s / g2 if g2 > 0 else math.nan,
            "small_sq": small, "big_sq": big, "b_small": b, "b_big": b * len(chunks)}
