"""Gradient compression and communication accounting for Horovod data-parallel training.

Usage (see docs/compression.md)::

    from optim.compression import build_compressor, GradientCommunicator
    comp = build_compressor("topk", ratio=0.01, error_feedback=True)
    comm = GradientCommunicator(comp, model.named_parameters(), backend=hvd)  # or backend=None
    loss.backward()
    stats = comm.synchronize()      # p.grad <- cross-rank average of decompressed grads
    optimizer.step()
"""

from .accounting import AccuracyVsBytes, CommStats, CommTotals, log_comm_summary, log_mlflow
from .adaptive import AccordionController
from .backends import Backend, HorovodBackend, LocalBackend
from .base import (
    Collective,
    CompressionConfigError,
    Compressor,
    ResidualMemory,
    available_compressors,
    build_compressor,
    register,
)
from .communicator import GradientCommunicator
from .embeddings import embedding_parameter_names
from .compressors import (
    CastCompressor,
    NoneCompressor,
    QSGDCompressor,
    RandomKCompressor,
    SignSGDCompressor,
    SignumVoteCompressor,
    TopKCompressor,
)
from .packing import pack_bits, packed_nbytes, unpack_bits
from .powersgd import EMBEDDING_POLICIES, PowerSGDCompressor

__all__ = [
    "AccordionController",
    "EMBEDDING_POLICIES",
    "AccuracyVsBytes",
    "Backend",
    "CastCompressor",
    "Collective",
    "CommStats",
    "CommTotals",
    "CompressionConfigError",
    "Compressor",
    "GradientCommunicator",
    "HorovodBackend",
    "LocalBackend",
    "NoneCompressor",
    "PowerSGDCompressor",
    "QSGDCompressor",
    "RandomKCompressor",
    "ResidualMemory",
    "SignSGDCompressor",
    "SignumVoteCompressor",
    "TopKCompressor",
    "available_compressors",
    "build_compressor",
    "embedding_parameter_names",
    "log_comm_summary",
    "log_mlflow",
    "pack_bits",
    "packed_nbytes",
    "register",
    "unpack_bits",
]
