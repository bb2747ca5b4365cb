"""Loader construction for the loop, and an in-memory loader with the same interface.

:func:`make_loader` returns ``training.data.DeltaTorchLoader`` (the streaming Delta -> torch
loader). :class:`TensorLoader` serves tensors already in memory with the same contract
(``len`` equal on every rank, ``set_epoch``, ``state_dict``/``load_state_dict``, eval mode
that yields every row once); it is the in-memory baseline of the throughput benchmark and
the fallback used while ``training.data`` has no ``DeltaTorchLoader``.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def table_to_tensors(uri: str, version: int | None, columns: Sequence[str], max_rows: int | None = None) -> dict[str, torch.Tensor]:
    """Read a Delta table (pinned version) into tensors, all of it or its first ``max_rows`` rows
    (read only as far as they go); list columns become 2-D."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipelines.lake import DeltaSnapshot

    snap = DeltaSnapshot(uri, version)
    if max_rows is None:
        table = snap.to_table(list(columns))
    else:  # until the twenty-sixth session the whole table was read, then sliced
        table = snap.dataset(columns).head(max_rows, columns=list(columns))
    out: dict[str, torch.Tensor] = {}
    n = table.num_rows
    for c in columns:
        col = table.column(c).combine_chunks()
        t = col.type
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            arr = pc.list_flatten(col).to_numpy(zero_copy_only=False)
            arr = arr.reshape(n, -1) if n else arr.reshape(0, 0)
        else:
            arr = col.to_numpy(zero_copy_only=False)
        out[c] = torch.from_numpy(np.array(arr, copy=True))
    return out


class TensorLoader:
    """Batches of in-memory tensors, sharded over ranks like the Delta loader: the fallback where
    ``training.data`` cannot be imported. Unlike the Delta loader, its eval mode
    (``drop_last=False``) does not pad: ``len()`` may differ by one between ranks."""

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        version: int | None = None,
    ):
        self.tensors = tensors
        self.n = int(next(iter(tensors.values())).shape[0]) if tensors else 0
        self.batch_size = int(batch_size)
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.version = version
        self.epoch = 0
        self.position = 0  # batches already yielded in this epoch

    def _rows(self) -> torch.Tensor:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            perm = torch.randperm(self.n, generator=g)
        else:
            perm = torch.arange(self.n)
        if self.drop_last:
            per = self.n // self.world_size
            return perm[self.rank * per:(self.rank + 1) * per] if self.shuffle else perm[self.rank::self.world_size][:per]
        return perm[self.rank::self.world_size]

    @property
    def rank_rows(self) -> list[int]:
        """Rows each rank's shard yields per epoch (the Delta loader's attribute of that name)."""
        if self.drop_last:
            return [self.n // self.world_size] * self.world_size
        return [len(range(r, self.n, self.world_size)) for r in range(self.world_size)]

    def global_positions(self):
        """The rows an unshuffled epoch of this rank yields, as positions in the tensors (the
        Delta loader's method of that name)."""
        if self.shuffle:
            raise ValueError("global_positions: the loader is shuffled (its order changes every epoch)")
        return self._rows().numpy().astype(np.int64)

    def __len__(self) -> int:
        if self.drop_last:
            return (self.n // self.world_size) // self.batch_size
        rows = len(range(self.rank, self.n, self.world_size))
        return -(-rows // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rows = self._rows()
        nb = len(self)
        start = self.position
        for b in range(start, nb):
            idx = rows[b * self.batch_size:(b + 1) * self.batch_size]
            self.position = b + 1
            yield {k: v[idx] for k, v in self.tensors.items()}
        self.position = 0
        self.epoch += 1


_warned = False


def _delta_loader():
    """``training.data.DeltaTorchLoader``, or None where it is not available."""
    try:
        from training.data import DeltaTorchLoader  # noqa: PLC0415
    except ImportError:
        return None
    return DeltaTorchLoader


def train_batches_per_rank(uri: str, columns: Sequence[str], batch_size: int, *, version: int | None,
                           world_size: int) -> int:
    """``len()`` of the training loader :func:`make_loader` gives each of ``world_size`` ranks
    (equal on every rank): from the table's metadata (the Parquet footers that shard it), no rows
    read, so the driver knows a run's steps per epoch before any rank starts."""
    import warnings

    if _delta_loader() is None:  # TensorLoader: an equal share of the rows per rank, full batches
        from pipelines.lake import DeltaSnapshot

        return DeltaSnapshot(uri, version).num_rows // world_size // batch_size
    with warnings.catch_warnings():  # "every epoch is empty": the caller says it in its own words
        warnings.simplefilter("ignore")
        loader = make_loader(uri, columns, batch_size, version=version, rank=0, world_size=world_size, train=True,
                             prefetch=0)
    try:
        return len(loader)
    finally:
        loader.close()


def make_loader(
    uri: str,
    columns: Sequence[str],
    batch_size: int,
    *,
    version: int | None,
    rank: int,
    world_size: int,
    train: bool,
    seed: int = 0,
    shuffle_buffer_rows: int = 200_000,
    prefetch: int = 2,
    pin_memory: bool = False,
):
    """The training (shuffled, equal ``len`` per rank) or eval (every row once) loader;
    ``pin_memory`` for a CUDA device (asynchronous host-to-GPU copies)."""
    global _warned
    DeltaTorchLoader = _delta_loader()  # noqa: N806
    if DeltaTorchLoader is not None:
        kw: dict[str, Any] = dict(version=version, rank=rank, world_size=world_size, seed=seed, prefetch=prefetch,
                                  pin_memory=pin_memory)
        if train:
            kw.update(shuffle=True, drop_last=True, shuffle_buffer_rows=shuffle_buffer_rows)
        else:
            kw.update(shuffle=False, drop_last=False)
        return DeltaTorchLoader(uri, list(columns), batch_size, **kw)
    if DeltaTorchLoader is None and not _warned:
        log.warning("training.data.DeltaTorchLoader not available: using the in-memory TensorLoader")
        _warned = True
    tensors = table_to_tensors(uri, version, columns)
    if train:
        return TensorLoader(tensors, batch_size, rank=rank, world_size=world_size, shuffle=True, seed=seed,
                            drop_last=True, version=version)
    return TensorLoader(tensors, batch_size, rank=rank, world_size=world_size, shuffle=False, drop_last=False,
                        version=version)
