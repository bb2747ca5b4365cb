"""GRACE-style compressor interface, error-feedback memory and the name registry.

A :class:`Compressor` turns one gradient tensor into a *payload* (a list of tensors whose
sizes depend only on the gradient's shape and the hyperparameters, never on its values, so
every rank sends the same number of bytes for the same parameter) plus a *context* of
rank-independent metadata needed to decode it. Each compressor declares the collective its
payload needs (:class:`Collective`):

* ``ALLREDUCE`` - ``decompress`` is linear in the payload, so payloads can be summed/averaged
  elementwise across ranks and decompressed once (casts, random-k with a shared seed).
* ``ALLGATHER`` - payloads cannot be added (packed codes, per-rank index sets, per-rank
  scales); every rank's payload is gathered, decoded and the decoded tensors aggregated
  (averaged, or majority-voted).
* ``ALLREDUCE_2PHASE`` - PowerSGD: allreduce of the P factors, local orthogonalisation and
  Q = M^T P, allreduce of the Q factors.

Error feedback (:class:`ResidualMemory`) is kept by the communicator per parameter:
``g_t' = g_t + e_t`` is compressed and ``e_{t+1} = g_t' - decompress(compress(g_t'))``.
"""

from __future__ import annotations

import functools
import inspect
import math
from enum import Enum
from fractions import Fraction
from typing import Any, Callable

import torch

__all__ = [
    "Collective",
    "Compressor",
    "ResidualMemory",
    "keep_finite",
    "CompressionConfigError",
    "register",
    "build_compressor",
    "available_compressors",
]


class CompressionConfigError(ValueError):
    """Unknown compressor name, unknown hyperparameter, or invalid hyperparameter value."""


class Collective(str, Enum):
    ALLREDUCE = "allreduce"
    ALLGATHER = "allgather"
    ALLREDUCE_2PHASE = "allreduce_2phase"


Payload = list[torch.Tensor]
Ctx = dict[str, Any]


class Compressor:
    """Base class. Subclasses implement :meth:`compress` / :meth:`decompress`.

    Attributes set by subclasses:
      name, collective,
      lossless: decompress(compress(x)) == x exactly,
      respects_threshold: layers smaller than the communicator's ``min_compress_numel`` are
        sent uncompressed (False for casts: no per-tensor overhead, so everything is cast),
      adaptive_param: the hyperparameter the adaptive controller switches (or None).
    """

    name: str = "base"
    collective: Collective = Collective.ALLREDUCE
    lossless: bool = False
    respects_threshold: bool = True
    adaptive_param: str | None = None

    def __init__(self, *, error_feedback: bool = False, warmup_steps: int = 0, seed: int = 0):
        if not isinstance(error_feedback, bool):
            raise CompressionConfigError(f"{self.name}: error_feedback must be a bool, got {error_feedback!r}")
        _check_int(self.name, "warmup_steps", warmup_steps, lo=0)
        _check_int(self.name, "seed", seed, lo=0)
        self.error_feedback = error_feedback
        self.warmup_steps = warmup_steps
        self.seed = seed
        self.worker_rank = 0
        self.world_size = 1

    # -- core interface -------------------------------------------------------------------
    def compress(self, tensor: torch.Tensor, name: str) -> tuple[Payload, Ctx]:
        raise NotImplementedError

    def decompress(self, payload: Payload, ctx: Ctx) -> torch.Tensor:
        raise NotImplementedError

    def aggregate(self, decoded: list[torch.Tensor], ctx: Ctx) -> torch.Tensor:
        """Combine the decoded tensors of all ranks (allgather compressors): the mean."""
        out = decoded[0].clone()
        for t in decoded[1:]:
            out.add_(t)
        return out.div_(len(decoded))

    def aggregate_payloads(self, payloads: list[Payload], ctx: Ctx) -> torch.Tensor:
        """Decode every rank's payload and aggregate; subclasses may fuse the two."""
        return self.aggregate([self.decompress(p, ctx) for p in payloads], ctx)

    def payload_nbytes(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype = torch.float32) -> int:
        """Analytic payload size in bytes for a tensor of this shape (used by tests/docs)."""
        raise NotImplementedError

    # -- helpers --------------------------------------------------------------------------
    def set_rank(self, rank: int, world_size: int) -> None:
        self.worker_rank = rank
        self.world_size = world_size

    def hparams(self) -> dict[str, Any]:
        sig = inspect.signature(type(self).__init__)
        return {k: getattr(self, k) for k in sig.parameters if k != "self" and hasattr(self, k)}

    def configure(self, **kwargs: Any) -> None:
        """Change hyperparameters in place (used by the adaptive controller); validated."""
        current = self.hparams()
        unknown = set(kwargs) - set(current)
        if unknown:
            raise CompressionConfigError(f"{self.name}: unknown hyperparameter(s) {sorted(unknown)}")
        current.update(kwargs)
        state, name, rank, world = self.state_dict(), self.name, self.worker_rank, self.world_size
        type(self).__init__(self, **current)
        self.name = name
        self.set_rank(rank, world)
        self.load_state_dict(state)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({hp})"


def keep_finite(new: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
    """``new`` where it is finite, else ``old`` (zero without one): state a compressor keeps
    across steps (a residual, a momentum) must not take in one step's inf or NaN gradient,
    which would otherwise stay in it for good, while the step itself (what is sent) keeps it, so
    that it can be skipped (AMP's loss scaler). Elementwise, so no device-to-host sync."""
    new = new.detach()
    return torch.where(torch.isfinite(new), new, torch.zeros_like(new) if old is None else old)


class ResidualMemory:
    """Per-parameter error-feedback residuals (Stich et al. 2018; Karimireddy et al. 2019).

    A residual entry that would be inf or NaN (the step's gradient was) keeps its previous
    value (:func:`keep_finite`): until the twenty-sixth session one such gradient made every
    later step of that parameter inf or NaN, even when the step was skipped."""

    def __init__(self) -> None:
        self.residuals: dict[str, torch.Tensor] = {}

    def compensate(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Return ``tensor + residual`` (a new tensor; the input is not modified)."""
        r = self.residuals.get(name)
        return tensor.clone() if r is None else tensor + r

    def store(self, name: str, residual: torch.Tensor) -> None:
        self.residuals[name] = keep_finite(residual, self.residuals.get(name))

    def pop(self, name: str) -> torch.Tensor | None:
        """Remove and return the residual (a tensor sent exactly this step takes it in)."""
        return self.residuals.pop(name, None)

    def get(self, name: str) -> torch.Tensor | None:
        return self.residuals.get(name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.residuals.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device | None = None) -> None:
        self.residuals = {k: (v.to(device) if device is not None else v.clone()) for k, v in state.items()}


# ---------------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------------

def _check_int(owner: str, key: str, value: Any, lo: int | None = None, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CompressionConfigError(f"{owner}: {key} must be an int, got {value!r}")
    if lo is not None and value < lo:
        raise CompressionConfigError(f"{owner}: {key} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise CompressionConfigError(f"{owner}: {key} must be <= {hi}, got {value}")


@functools.lru_cache(maxsize=256)
def _exact_ratio(value: float) -> Fraction:
    """A ratio as the decimal number it is written as (its shortest repr), exactly: 0.07 is 7/100,
    not the binary double just above it, so 0.07 * 100 is 7 (the double product is
    7.000000000000001, whose ceiling made top-k / random-k send one element too many)."""
    return Fraction(repr(float(value)))


def _check_ratio(owner: str, key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CompressionConfigError(f"{owner}: {key} must be a number in (0, 1], got {value!r}")
    if not 0.0 < float(value) <= 1.0:
        raise CompressionConfigError(f"{owner}: {key} must be in (0, 1], got {value}")


# ---------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------

_REGISTRY: dict[str, tuple[Callable[..., Compressor], dict[str, Any], str]] = {}


def register(name: str, defaults: dict[str, Any] | None = None, doc: str = ""):
    """Register a compressor class (or factory) under ``name`` with default hyperparameters."""

    def deco(cls):
        _REGISTRY[name] = (cls, dict(defaults or {}), doc or (cls.__doc__ or "").strip().splitlines()[0])
        return cls

    return deco


def available_compressors() -> dict[str, str]:
    """Name -> one-line description of every registered compressor."""
    return {k: v[2] for k, v in sorted(_REGISTRY.items())}


def build_compressor(name: str | dict[str, Any], **hparams: Any) -> Compressor:
    """Build a compressor by name, e.g. ``build_compressor("topk", ratio=0.01)``.

    ``name`` may also be a config mapping ``{"name": "topk", "ratio": 0.01, ...}``
    (keys given as keyword arguments override it).
    """
    if isinstance(name, dict):
        cfg = dict(name)
        if "name" not in cfg:
            raise CompressionConfigError("compressor config needs a 'name' key")
        name = cfg.pop("name")
        cfg.update(hparams)
        hparams = cfg
    if not isinstance(name, str):
        raise CompressionConfigError(f"compressor name must be a str, got {name!r}")
    key = name.strip().lower()
    if key not in _REGISTRY:
        raise CompressionConfigError(
            f"unknown compressor {name!r}; available: {', '.join(sorted(_REGISTRY))}"
        )
    cls, defaults, _ = _REGISTRY[key]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        raise CompressionConfigError(
            f"compressor {key!r} does not take {unknown}; accepted hyperparameters: {accepted}"
        )
    kwargs = {**defaults, **hparams}
    comp = cls(**kwargs)
    comp.name = key
    return comp
