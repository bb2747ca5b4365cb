"""DLRM (Naumov et al. 2019): bottom MLP, per-column embeddings, dot interaction, top MLP.

    dense [B,13] --bottom MLP--> z [B,D]
    sparse [B,26] --embeddings--> E [B,26,D]
    T = [z; E]  [B,27,D];  pairwise dots T_i . T_j (i < j)  [B,351]
    top MLP([z, dots]) -> logit [B]
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from training.models.embeddings import (
    CategoricalEmbeddings, check_dense_transform, check_dropout, check_size, check_sizes, dense_transform, mlp)


class DLRM(nn.Module):
    def __init__(
        self,
        num_dense: int,
        cardinalities: Sequence[int],
        *,
        embedding_dim: int = 16,
        bottom_mlp: Sequence[int] = (64, 32),
        top_mlp: Sequence[int] = (64, 32),
        sparse: bool = False,
        dense_transform: str = "none",
        dropout: float = 0.0,
    ):
        super().__init__()
        self.dense_transform = check_dense_transform(dense_transform)
        d = check_size("embedding_dim", embedding_dim)
        bottom_mlp, top_mlp = check_sizes("bottom_mlp", bottom_mlp), check_sizes("top_mlp", top_mlp)
        dropout = check_dropout(dropout)
        self.bottom = mlp([num_dense, *bottom_mlp, d])
        self.emb = CategoricalEmbeddings(cardinalities, d, sparse=sparse)
        n = self.emb.num_columns + 1
        iu = torch.triu_indices(n, n, offset=1)
        # own storage each: two views of one tensor make torch.export's packager warn
        self.register_buffer("_iu0", iu[0].clone(), persistent=False)
        self.register_buffer("_iu1", iu[1].clone(), persistent=False)
        self.top = mlp([d + iu.shape[1], *top_mlp, 1], final_activation=False, dropout=dropout)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        z = self.bottom(dense_transform(dense, self.dense_transform))
        e = self.emb(sparse)
        t = torch.cat([z.unsqueeze(1), e.to(z.dtype)], dim=1)
        inter = torch.bmm(t, t.transpose(1, 2))[:, self._iu0, self._iu1]
        return self.top(torch.cat([z, inter], dim=1)).squeeze(-1)
