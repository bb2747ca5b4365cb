"""Communication accounting: per-step :class:`CommStats`, run totals, MLflow logging and
time/bytes-to-accuracy bookkeeping.

``bytes_sent`` is the exact number of payload bytes this rank hands to collectives in the
step (the sum of ``tensor.nbytes`` of every buffer passed to allreduce/allgather, metadata
such as QSGD norms and packed indices included). ``wire_bytes`` is the textbook estimate of
what the ring algorithms then put on this rank's link: ``2 (N-1)/N * B`` for an allreduce
of B bytes, ``(N-1) * B`` for an allgather (each rank receives everyone else's payload).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["CommStats", "CommTotals", "log_mlflow", "log_comm_summary", "AccuracyVsBytes"]


@dataclass
class CommStats:
    """What one rank did in one ``GradientCommunicator.synchronize()`` call."""

    step: int = 0
    bytes_sent: int = 0
    dense_bytes: int = 0
    wire_bytes: float = 0.0
    t_compress: float = 0.0  # seconds
    t_communicate: float = 0.0
    t_decompress: float = 0.0
    n_collectives: int = 0
    n_compressed: int = 0
    n_uncompressed: int = 0
    n_sparse: int = 0
    critical: bool | None = None  # adaptive mode: inside a critical phase
    level: float | None = None  # adaptive mode: value of the switched hyperparameter
    by_collective: dict[str, int] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """dense_bytes / bytes_sent (1.0 when nothing was sent)."""
        return self.dense_bytes / self.bytes_sent if self.bytes_sent else 1.0

    @property
    def t_total(self) -> float:
        return self.t_compress + self.t_communicate + self.t_decompress

    def as_metrics(self, prefix: str = "comm/") -> dict[str, float]:
        m = {
            f"{prefix}bytes_sent": float(self.bytes_sent),
            f"{prefix}dense_bytes": float(self.dense_bytes),
            f"{prefix}ratio": float(self.ratio),
            f"{prefix}wire_bytes": float(self.wire_bytes),
            f"{prefix}t_compress_ms": 1e3 * self.t_compress,
            f"{prefix}t_communicate_ms": 1e3 * self.t_communicate,
            f"{prefix}t_decompress_ms": 1e3 * self.t_decompress,
        }
        if self.critical is not None:
            m[f"{prefix}critical"] = float(self.critical)
        if self.level is not None:
            m[f"{prefix}level"] = float(self.level)
        return m

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        return d


@dataclass
class CommTotals:
    steps: int = 0
    bytes_sent: int = 0
    dense_bytes: int = 0
    wire_bytes: float = 0.0
    t_compress: float = 0.0
    t_communicate: float = 0.0
    t_decompress: float = 0.0
    critical_steps: int = 0

    def add(self, s: CommStats) -> None:
        self.steps += 1
        self.bytes_sent += s.bytes_sent
        self.dense_bytes += s.dense_bytes
        self.wire_bytes += s.wire_bytes
        self.t_compress += s.t_compress
        self.t_communicate += s.t_communicate
        self.t_decompress += s.t_decompress
        self.critical_steps += int(bool(s.critical))

    def as_dict(self) -> dict[str, float]:
        n = max(self.steps, 1)
        return {
            "steps": self.steps,
            "bytes_sent": self.bytes_sent,
            "dense_bytes": self.dense_bytes,
            "wire_bytes": self.wire_bytes,
            "ratio": self.dense_bytes / self.bytes_sent if self.bytes_sent else 1.0,
            "t_compress": self.t_compress,
            "t_communicate": self.t_communicate,
            "t_decompress": self.t_decompress,
            "bytes_sent_per_step": self.bytes_sent / n,
            "t_compress_ms_per_step": 1e3 * self.t_compress / n,
            "t_communicate_ms_per_step": 1e3 * self.t_communicate / n,
            "t_decompress_ms_per_step": 1e3 * self.t_decompress / n,
            "critical_steps": self.critical_steps,
        }

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for k, v in d.items():
            setattr(self, k, v)


def log_mlflow(stats: CommStats, step: int | None = None, prefix: str = "comm/") -> None:
    """Log one step's stats to the active MLflow run (no-op without an active run)."""
    import mlflow

    if mlflow.active_run() is None:
        return
    mlflow.log_metrics(stats.as_metrics(prefix), step=stats.step if step is None else step)


def log_comm_summary(totals: dict[str, float], prefix: str = "comm_total/") -> None:
    """Log a run summary (``GradientCommunicator.totals()``) to the active MLflow run."""
    import mlflow

    if mlflow.active_run() is None:
        return
    mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in totals.items()})


class AccuracyVsBytes:
    """Records (step, cumulative bytes, cumulative seconds, metric) to answer
    "how many bytes / seconds until the metric reached X" (time-to-accuracy vs bytes)."""

    def __init__(self, higher_is_better: bool = True) -> None:
        self.higher_is_better = higher_is_better
        self.points: list[dict[str, float]] = []

    def record(self, step: int, total_bytes: float, seconds: float, metric: float) -> None:
        self.points.append({"step": step, "bytes": float(total_bytes), "seconds": float(seconds),
                            "metric": float(metric)})

    def _reached(self, p: dict[str, float], target: float) -> bool:
        return p["metric"] >= target if self.higher_is_better else p["metric"] <= target

    def to_reach(self, target: float) -> dict[str, float] | None:
        """First recorded point at which the metric reached ``target`` (None if never)."""
        for p in self.points:
            if self._reached(p, target):
                return dict(p)
        return None

    def summary(self, target: float) -> dict[str, float]:
        hit = self.to_reach(target)
        nan = math.nan
        return {
            "target": target,
            "steps_to_target": hit["step"] if hit else nan,
            "bytes_to_target": hit["bytes"] if hit else nan,
            "seconds_to_target": hit["seconds"] if hit else nan,
        }
