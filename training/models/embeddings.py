"""Per-column categorical embeddings stored as one fused table (one lookup per batch).

Column ``c`` owns rows ``[offset[c], offset[c] + cardinality[c])`` of a single
``nn.Embedding`` - mathematically the same as 26 separate tables, but one gather/scatter
instead of 26 on CPU, and one (optionally sparse) gradient tensor for the optimizer and
the allreduce.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class CategoricalEmbeddings(nn.Module):
    def __init__(self, cardinalities: Sequence[int], dim: int, *, sparse: bool = False, init_scale: float | None = None):
        super().__init__()
        cards = [max(1, int(c)) for c in cardinalities]
        if not cards:
            raise ValueError("CategoricalEmbeddings needs at least one column")
        self.cardinalities = cards
        self.dim = int(dim)
        offsets = torch.tensor([0, *cards[:-1]], dtype=torch.long).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        self.register_buffer("limits", torch.tensor(cards, dtype=torch.long), persistent=False)
        self.table = nn.Embedding(sum(cards), self.dim, sparse=sparse)
        scale = init_scale if init_scale is not None else 1.0 / max(1.0, self.dim) ** 0.5
        nn.init.uniform_(self.table.weight, -scale, scale)

    @property
    def num_columns(self) -> int:
        return len(self.cardinalities)

    @property
    def sparse(self) -> bool:
        return bool(self.table.sparse)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """``idx``: [B, C] integer ids per column (int32 or int64) -> [B, C, dim]."""
        if idx.dtype not in (torch.int32, torch.int64):
            idx = idx.long()
        if idx.dtype == torch.int32 and self.table.num_embeddings >= 2**31:
            idx = idx.long()
        self._check_ids(idx)
        return self.table(idx + self.offsets.to(idx.dtype))

    def _check_ids(self, idx: torch.Tensor) -> None:
        """An id outside its column's ``[0, cardinality)`` would silently read another
        column's rows of the fused table (a gold table built with other vocabulary sizes than
        the model's): fail instead. On CPU the check is a per-column min/max (0.2-0.5 ms for
        2048 x 26 ids, under 1 % of a DLRM step); on CUDA it is asserted asynchronously, without a host sync."""
        if idx.dim() != 2 or idx.shape[1] != self.num_columns:
            raise ValueError(f"categorical ids must be [batch, {self.num_columns}], got {list(idx.shape)}")
        if idx.shape[0] == 0 or torch.compiler.is_compiling() or torch.jit.is_tracing():
            return  # a traced or exported graph (the pt2 model artifact) keeps no data-dependent branch
        lo, hi = torch.aminmax(idx, dim=0)  # per column: 20x cheaper than an elementwise mask
        limits = self.limits.to(idx.dtype)
        bad_col = (lo < 0) | (hi >= limits)
        if idx.is_cuda:
            torch._assert_async(~bad_col.any(), "categorical id outside its column's vocabulary")
            return
        if bool(bad_col.any()):
            bad = (idx < 0) | (idx >= limits)
            row, col = (int(v) for v in bad.nonzero()[0])
            raise IndexError(
                f"categorical column {col + 1} of {self.num_columns} (C{col + 1} in Criteo's naming) has id "
                f"{int(idx[row, col])} outside [0, {self.cardinalities[col]}): "
                "the model's vocabulary sizes do not match the data (features.json / vocab_sizes "
                "of another gold build?)")

    def extra_repr(self) -> str:
        return f"columns={self.num_columns}, rows={sum(self.cardinalities)}, dim={self.dim}, sparse={self.sparse}"


def mlp(sizes: Sequence[int], *, final_activation: bool = True, dropout: float = 0.0) -> nn.Sequential:
    """Linear+ReLU stack: ``sizes = [in, h1, ..., out]``."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        last = i == len(sizes) - 2
        if not last or final_activation:
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


DENSE_TRANSFORMS = ("none", "log1p")


def check_dense_transform(kind: Any) -> str:
    """``kind`` when it is one of :data:`DENSE_TRANSFORMS`: checked when the model is built
    (``check_settings`` builds it before a run starts), not at its first forward pass."""
    if not isinstance(kind, str) or kind not in DENSE_TRANSFORMS:
        raise ValueError(f"dense_transform must be none or log1p, not {kind!r}")
    return kind


def _is_count(value: Any, minimum: int) -> bool:
    return (not isinstance(value, bool) and isinstance(value, numbers.Real)
            and (isinstance(value, numbers.Integral) or float(value).is_integer()) and value >= minimum)


def check_size(name: str, value: Any, *, minimum: int = 1) -> int:
    """``value`` as an ``int >= minimum``, else a ValueError naming ``name``: a bool, a string,
    a float with a fraction (``int()`` truncated 4.5 to 4 while MLflow recorded 4.5) or a
    smaller number (torch refuses a negative size with a RuntimeError and takes 0 silently, as a
    model without embeddings; a negative count of layers was none)."""
    if not _is_count(value, minimum):
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what}, not {value!r}")
    return int(value)


def check_sizes(name: str, value: Any) -> list[int]:
    """Layer widths: a list (possibly empty) of positive integers, else a ValueError naming ``name``."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence) or not all(_is_count(v, 1) for v in value):
        raise ValueError(f"{name} must be a list of positive integers, not {value!r}")
    return [int(v) for v in value]


def check_dropout(value: Any) -> float:
    """A dropout probability in ``[0, 1)`` (a negative one was silently no dropout)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(f"dropout must be a number in [0, 1), not {value!r}")
    return float(value)


def dense_transform(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "log1p":
        return torch.log1p(torch.clamp(x, min=0.0))
    if kind == "none":
        return x
    raise ValueError(f"dense_transform must be none or log1p, not {kind!r}")
