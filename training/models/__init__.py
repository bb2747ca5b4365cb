"""Model registry: ``build_model(name, num_dense=13, cardinalities=[...], **hp)``.

Every model maps ``(dense [B, num_dense] float, sparse [B, C] int) -> logits [B]``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from optim.compression.embeddings import embedding_parameter_names
from training.models.dcnv2 import DCNv2
from training.models.dlrm import DLRM
from training.models.embeddings import CategoricalEmbeddings
from training.models.logreg import LogisticRegression

MODELS: dict[str, Callable[..., nn.Module]] = {
    "logreg": LogisticRegression,
    "dlrm": DLRM,
    "dcnv2": DCNv2,
}

__all__ = ["MODELS", "DCNv2", "DLRM", "LogisticRegression", "build_model", "memory_report", "sparse_parameters"]


def build_model(name: str, *, cardinalities: Sequence[int], num_dense: int = 13, **hp: Any) -> nn.Module:
    try:
        cls = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}") from None
    try:
        return cls(num_dense, list(cardinalities), **hp)
    except TypeError as e:
        raise ValueError(f"model {name}: bad hyper-parameters {sorted(hp)}: {e}") from None
    except ValueError as e:  # a value the model refuses (its constructor names the parameter)
        raise ValueError(f"model {name}: {e}") from None


def sparse_parameters(model: nn.Module) -> set[str]:
    """Names of parameters that receive sparse gradients (``sparse=True`` embedding tables)."""
    return embedding_parameter_names(model, sparse_only=True)


def memory_report(model: nn.Module) -> dict[str, float]:
    """Parameter counts and bytes (per rank: every rank holds a full replica)."""
    emb = dense = 0
    emb_bytes = dense_bytes = 0
    for m in model.modules():
        if isinstance(m, CategoricalEmbeddings):
            w = m.table.weight
            emb += w.numel()
            emb_bytes += w.numel() * w.element_size()
    total = sum(p.numel() for p in model.parameters())
    total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    dense = total - emb
    dense_bytes = total_bytes - emb_bytes
    return {
        "params_total": float(total),
        "params_embedding": float(emb),
        "params_dense": float(dense),
        "param_mb": total_bytes / 2**20,
        "embedding_mb": emb_bytes / 2**20,
        "dense_param_mb": dense_bytes / 2**20,
    }
