"""The collective operations the loop needs, for one process or Horovod ranks.

``LocalDist`` is the single-process (debug, ``num_proc: 1``) implementation; ``HorovodDist``
wraps ``horovod.torch``. A torch.distributed implementation (for Spark's TorchDistributor)
would be a third class with the same methods.
"""
from __future__ import annotations

from typing import Any

import torch


class LocalDist:
    name = "local"
    rank = 0
    size = 1
    local_rank = 0
    hvd = None

    def allreduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def allgather(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def allgather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast_object(self, obj: Any, root_rank: int = 0) -> Any:
        return obj

    def broadcast_parameters(self, model: torch.nn.Module) -> None:
        pass

    def broadcast_optimizer_state(self, optimizer, model: torch.nn.Module) -> None:
        pass

    def barrier(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


class HorovodDist(LocalDist):
    name = "horovod"

    def __init__(self) -> None:
        import horovod.torch as hvd

        hvd.init()
        self.hvd = hvd
        self.rank = hvd.rank()
        self.size = hvd.size()
        self.local_rank = hvd.local_rank()

    def allreduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.hvd.allreduce(t, op=self.hvd.Average, name=None)

    def allgather(self, t: torch.Tensor) -> torch.Tensor:
        # first dimension may differ between ranks
        return self.hvd.allgather(t)

    # Horovod matches collectives by name, and the *_object helpers default the name to
    # type(obj).__name__: a root sending a dict while the others pass None would never match.
    def allgather_object(self, obj: Any) -> list[Any]:
        return self.hvd.allgather_object(obj, name="bigopt.allgather_object")

    def broadcast_object(self, obj: Any, root_rank: int = 0) -> Any:
        return self.hvd.broadcast_object(obj, root_rank=root_rank, name="bigopt.broadcast_object")

    def broadcast_parameters(self, model: torch.nn.Module) -> None:
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    def broadcast_optimizer_state(self, optimizer, model: torch.nn.Module) -> None:
        """Rank 0's optimizer state (after a resume) onto every rank.

        Not ``hvd.broadcast_optimizer_state``: on ranks whose optimizer is fresh it takes a
        zero-gradient step first (moving AdamW weights and step counters) and it fails with
        ``KeyError: 'initial_lr.0'`` once an LR scheduler has added group keys on rank 0 only.
        The whole ``state_dict`` goes as one object instead (Horovod's advice for such cases).
        """
        state = self.broadcast_object(optimizer.state_dict() if self.rank == 0 else None)
        if self.rank != 0:
            optimizer.load_state_dict(state)

    def barrier(self) -> None:
        self.hvd.barrier()

    def shutdown(self) -> None:
        try:
            self.hvd.shutdown()
        except Exception:  # noqa: BLE001 - best effort on the error path
            pass
