"""Which parameters are embedding tables (for PowerSGD's ``embedding`` policy).

An embedding table's gradient is row-sparse - only the rows looked up in the batch are non-zero
- and narrow (rows x dim, dim often 16-128), so it is the one kind of matrix low rank cannot
compress well. The communicator treats the parameters named here differently when its
compressor has an embedding policy (see :mod:`optim.compression.powersgd`).

* Given a module (what the training loop passes): the ``weight`` of every ``nn.Embedding`` /
  ``nn.EmbeddingBag`` - exact.
* Given only ``(name, parameter)`` pairs: every 2-D parameter
  whose name has a component ``emb``, ``embed``, ``embeds``, ``embedding``, ``embeddings``,
  alone or joined with ``_`` (``emb.table.weight``, ``tok_emb.weight``,
  ``embeddings.word_embeddings.weight``; not ``member.weight``). All models in
  ``training/models`` keep their tables in ``emb.table.weight``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

__all__ = ["EMBEDDING_NAME_PATTERN", "embedding_parameter_names", "resolve_embedding_names"]

EMBEDDING_NAME_PATTERN = re.compile(r"(^|[._])emb(ed|eds|edding|eddings)?([._]|$)", re.IGNORECASE)


def embedding_parameter_names(model: nn.Module, *, sparse_only: bool = False) -> set[str]:
    """Names (as in ``model.named_parameters()``) of the weights of every embedding module;
    ``sparse_only``: only those built with ``sparse=True`` (their gradients are sparse)."""
    names: set[str] = set()
    for mname, m in model.named_modules():
        if isinstance(m, nn.Embedding | nn.EmbeddingBag) and (m.sparse or not sparse_only):
            names.add(f"{mname}.weight" if mname else "weight")
    return names


def resolve_embedding_names(
    params: list[tuple[str, nn.Parameter]],
    embedding_names: Iterable[str] | Callable[[str, nn.Parameter], bool] | str | None,
    module: nn.Module | None = None,
) -> set[str]:
    """The subset of ``params``' names that are embedding tables.

    ``embedding_names``: None (from ``module`` when given, else :data:`EMBEDDING_NAME_PATTERN`
    on the names of 2-D parameters), a regex string, a predicate ``(name, parameter) -> bool``,
    or an explicit collection of names (each must be one of ``params``).
    """
    known = {n for n, _ in params}
    if embedding_names is None:
        if module is not None:
            return embedding_parameter_names(module) & known
        return {n for n, p in params if p.dim() == 2 and EMBEDDING_NAME_PATTERN.search(n)}
    if isinstance(embedding_names, str):
        rx = re.compile(embedding_names)
        return {n for n, _ in params if rx.search(n)}
    if callable(embedding_names):
        pred: Callable[[str, Any], bool] = embedding_names
        return {n for n, p in params if pred(n, p)}
    names = set(embedding_names)
    unknown = sorted(names - known)
    if unknown:
        raise ValueError(f"embedding_names {unknown} are not among the communicator's parameters")
    return names
