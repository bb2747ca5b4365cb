"""Logistic regression: the convex baseline.

logit = w_dense . x_dense + sum_c w_c[id_c] + b, i.e. a linear model over the dense
features and the one-hot encoded categorical columns (one weight per category, stored as
a 1-wide embedding). Convex in its parameters, so optimizers can be compared on a problem
with a unique optimum.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from training.models.embeddings import CategoricalEmbeddings, check_dense_transform, dense_transform


class LogisticRegression(nn.Module):
    def __init__(
        self,
        num_dense: int,
        cardinalities: Sequence[int],
        *,
        sparse: bool = False,
        dense_transform: str = "none",
    ):
        super().__init__()
        self.dense_transform = check_dense_transform(dense_transform)
        self.dense = nn.Linear(num_dense, 1) if num_dense else None
        self.emb = CategoricalEmbeddings(cardinalities, 1, sparse=sparse, init_scale=0.0) if cardinalities else None
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        out = self.bias.expand(dense.shape[0] if dense.numel() else sparse.shape[0])
        if self.dense is not None:
            out = out + self.dense(dense_transform(dense, self.dense_transform)).squeeze(-1)
        if self.emb is not None:
            out = out + self.emb(sparse).sum(dim=(1, 2))
        return out
