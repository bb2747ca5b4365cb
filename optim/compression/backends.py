"""Collective backends for :class:`~optim.compression.GradientCommunicator`.

* :class:`LocalBackend` - world size 1 (``backend=None``): collectives are identities, but
  the payloads still go through compress -> pack -> unpack -> decompress.
* :class:`HorovodBackend` - wraps the ``horovod.torch`` module: ``allreduce_async`` /
  ``allgather_async`` + ``synchronize``. Horovod 0.28 (gloo, CPU) allreduces only float16/32/64
  and int32/64 and allgathers uint8/int8/int16/int32/int64/float16/32/64; tensors of other
  dtypes (bfloat16) are routed by the communicator through a bit-preserving allgather.

Any object with the same five members (size, rank, allreduce_async, allgather_async,
synchronize, supports_allreduce, supports_allgather) can be passed as a backend.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["Backend", "LocalBackend", "HorovodBackend", "make_backend", "SUM", "AVERAGE"]

SUM = "sum"
AVERAGE = "average"


class Backend:
    size: int = 1
    rank: int = 0
    name: str = "backend"

    def allreduce_async(self, tensor: torch.Tensor, op: str, name: str) -> Any:
        raise NotImplementedError

    def allgather_async(self, tensor: torch.Tensor, name: str) -> Any:
        raise NotImplementedError

    def synchronize(self, handle: Any) -> torch.Tensor:
        raise NotImplementedError

    def supports_allreduce(self, dtype: torch.dtype) -> bool:
        return True

    def supports_allgather(self, dtype: torch.dtype) -> bool:
        return True


class LocalBackend(Backend):
    """Single process: every collective returns its input."""

    name = "local"

    def __init__(self) -> None:
        self.size = 1
        self.rank = 0

    def allreduce_async(self, tensor, op, name):
        return tensor

    def allgather_async(self, tensor, name):
        return tensor

    def synchronize(self, handle):
        return handle


class HorovodBackend(Backend):
    """``horovod.torch`` collectives (asynchronous handles, synchronized by the caller)."""

    name = "horovod"

    def __init__(self, hvd: Any) -> None:
        if not hvd.is_initialized():
            raise RuntimeError("horovod is not initialised: call hvd.init() before building the communicator")
        self.hvd = hvd
        self.size = int(hvd.size())
        self.rank = int(hvd.rank())
        self._ops = {SUM: hvd.Sum, AVERAGE: hvd.Average}
        self._lib = getattr(hvd, "mpi_lib_v2", None)

    def _has(self, prefix: str, dtype: torch.dtype) -> bool:
        if self._lib is None:
            return dtype in (torch.float16, torch.float32, torch.float64, torch.int32, torch.int64)
        tname = torch.empty(0, dtype=dtype).type().replace(".", "_")
        return hasattr(self._lib, f"horovod_torch_{prefix}_async_{tname}")

    def supports_allreduce(self, dtype):
        return self._has("allreduce", dtype)

    def supports_allgather(self, dtype):
        return self._has("allgather", dtype)

    def allreduce_async(self, tensor, op, name):
        return self.hvd.allreduce_async(tensor.contiguous(), name=name, op=self._ops[op])

    def allgather_async(self, tensor, name):
        return self.hvd.allgather_async(tensor.contiguous(), name=name)

    def synchronize(self, handle):
        return self.hvd.synchronize(handle)


def make_backend(backend: Any) -> Backend:
    if backend is None:
        return LocalBackend()
    if isinstance(backend, Backend):
        return backend
    if all(hasattr(backend, a) for a in ("allreduce_async", "allgather_async", "synchronize", "Sum", "Average")):
        return HorovodBackend(backend)
    raise TypeError(
        f"backend must be None, the horovod.torch module or a Backend instance, got {type(backend).__name__}"
    )
