"""DCN-v2 (Wang et al. 2021): explicit feature crosses + a deep network.

    x0 = [dense, flatten(embeddings)]
    cross layer l: x_{l+1} = x0 * (W_l x_l + b_l) + x_l   (W_l full, or U_l V_l^T when low_rank)
    stacked:  logit = w . MLP(cross(x0))
    parallel: logit = w . [cross(x0), MLP(x0)]
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from training.models.embeddings import (
    CategoricalEmbeddings, check_dense_transform, check_dropout, check_size, check_sizes, dense_transform, mlp)


class CrossLayer(nn.Module):
    def __init__(self, dim: int, low_rank: int | None = None):
        super().__init__()
        if low_rank:
            self.v = nn.Linear(dim, low_rank, bias=False)
            self.u = nn.Linear(low_rank, dim)
        else:
            self.v = None
            self.u = nn.Linear(dim, dim)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.u(self.v(x)) if self.v is not None else self.u(x)
        return x0 * h + x


class DCNv2(nn.Module):
    def __init__(
        self,
        num_dense: int,
        cardinalities: Sequence[int],
        *,
        embedding_dim: int = 16,
        cross_layers: int = 3,
        low_rank: int | None = None,
        deep_mlp: Sequence[int] = (128, 64),
        structure: str = "stacked",
        sparse: bool = False,
        dense_transform: str = "none",
        dropout: float = 0.0,
    ):
        super().__init__()
        if structure not in ("stacked", "parallel"):
            raise ValueError(f"structure must be stacked or parallel, not {structure!r}")
        self.dense_transform = check_dense_transform(dense_transform)
        self.structure = structure
        embedding_dim = check_size("embedding_dim", embedding_dim)
        cross_layers = check_size("cross_layers", cross_layers, minimum=0)  # 0: the deep network alone
        if low_rank is not None:  # None: full-rank cross layers (0 was taken for None)
            low_rank = check_size("low_rank", low_rank)
        deep_mlp = check_sizes("deep_mlp", deep_mlp)
        dropout = check_dropout(dropout)
        self.emb = CategoricalEmbeddings(cardinalities, embedding_dim, sparse=sparse)
        d0 = num_dense + self.emb.num_columns * embedding_dim
        self.cross = nn.ModuleList(CrossLayer(d0, low_rank) for _ in range(cross_layers))
        self.deep = mlp([d0, *deep_mlp], dropout=dropout) if deep_mlp else nn.Identity()
        deep_out = deep_mlp[-1] if deep_mlp else d0
        self.head = nn.Linear(deep_out if structure == "stacked" else d0 + deep_out, 1)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        e = self.emb(sparse).flatten(1)
        x0 = torch.cat([dense_transform(dense, self.dense_transform).to(e.dtype), e], dim=1)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        if self.structure == "stacked":
            out = self.deep(x)
        else:
            out = torch.cat([x, self.deep(x0)], dim=1)
        return self.head(out).squeeze(-1)
