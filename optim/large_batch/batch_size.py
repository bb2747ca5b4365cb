"""Batch-size bounds: measure peak memory and step time at a few batch sizes, fit linear models
``memory(b) = m0 + m1 * b`` and ``time(b) = t0 + t1 * b``, and predict

* the largest batch whose predicted peak memory fits a budget (``max_batch_for_budget``),
* the measured batch with the highest samples/s (``best_measured_batch``) and the throughput
  "knee" -- the smallest batch reaching 90% of the asymptotic throughput ``1 / t1``
  (``knee_batch``; a linear time model has monotone throughput, so past the knee larger batches
  buy little speed and cost memory and generalisation),

with the fit errors (R^2, RMSE, largest relative error) that tell how far to trust them. This is
the measurement side of the seed paper's large-batch recipe ("On Using Large-Batches in Federated
Learning"): the memory bound caps the batch, the time model says how much a larger batch helps.

Memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the process RSS sampled every 0.5 ms
by a background thread during the timed steps (freed heap is returned with ``malloc_trim`` between
batch sizes so one size does not inherit another's peak). Time: median of the timed steps.

    report = measure_batch_size_bounds(lambda: Net(), lambda b: (torch.randn(b, 64), torch.randint(0, 10, (b,))),
                                       batch_sizes=[32, 64, 128, 256], memory_budget=2 * 2**30)
    print(report.to_table())          # the `bigopt batch-size <conf>` table
    report.rows()                     # list of dicts (one per measured batch + the predictions)
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["LinearFit", "BatchMeasurement", "BatchSizeReport", "fit_linear", "measure_batch_size_bounds"]

# a knee is recommended only from a time fit with at least this R^2, and at most this many times
# the largest size measured (else the measured size with the most samples/s, saying why)
MIN_TIME_R2 = 0.8
MAX_EXTRAPOLATION = 2


@dataclass(frozen=True)
class LinearFit:
    """Least-squares line ``y = intercept + slope * x`` and its fit errors on the data."""

    slope: float
    intercept: float
    r2: float
    rmse: float
    max_rel_err: float

    def predict(self, x):
        return self.intercept + self.slope * np.asarray(x, dtype=float)

    def solve(self, y: float) -> float:
        """x with predict(x) == y (inf when the slope is not positive)."""
        if self.slope <= 0:
            return math.inf
        return (y - self.intercept) / self.slope


def fit_linear(x: Sequence[float], y: Sequence[float]) -> LinearFit:
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.size < 2 or np.ptp(x) == 0:
        raise ValueError("a linear fit needs at least two distinct batch sizes")
    a = np.vstack([np.ones_like(x), x]).T
    (c0, c1), *_ = np.linalg.lstsq(a, y, rcond=None)
    pred = c0 + c1 * x
    resid = y - pred
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else 1.0
    rel = np.abs(resid) / np.maximum(np.abs(y), 1e-300)
    return LinearFit(float(c1), float(c0), r2, float(np.sqrt((resid**2).mean())), float(rel.max()))


@dataclass(frozen=True)
class BatchMeasurement:
    batch_size: int
    peak_memory_bytes: float
    step_time_s: float
    step_times_s: tuple = ()

    @property
    def samples_per_s(self) -> float:
        return self.batch_size / self.step_time_s if self.step_time_s > 0 else math.inf


@dataclass
class BatchSizeReport:
    measurements: list[BatchMeasurement]
    memory_budget_bytes: float | None = None
    memory_kind: str = "process_rss"
    device: str = "cpu"
    knee_fraction: float = 0.9
    memory_fit: LinearFit = field(init=False)
    time_fit: LinearFit = field(init=False)

    def __post_init__(self):
        self.measurements = sorted(self.measurements, key=lambda m: m.batch_size)
        bs = [m.batch_size for m in self.measurements]
        self.memory_fit = fit_linear(bs, [m.peak_memory_bytes for m in self.measurements])
        self.time_fit = fit_linear(bs, [m.step_time_s for m in self.measurements])

    @classmethod
    def from_measurements(cls, batch_sizes, peak_memory_bytes, step_time_s, memory_budget_bytes=None, **kw):
        ms = [BatchMeasurement(int(b), float(m), float(t)) for b, m, t in zip(batch_sizes, peak_memory_bytes, step_time_s)]
        return cls(ms, memory_budget_bytes, **kw)

    # -- predictions -----------------------------------------------------------------------------
    @property
    def max_batch_for_budget(self) -> int | None:
        """Largest b with predicted peak memory <= budget (None without budget, or if unbounded;
        0: none fits). A memory fit without a positive slope (RSS noise on a CPU, where a few
        hundred samples' activations are lost in the process's size) bounds nothing, unless
        the measured peaks are already over the budget: then no size fits (until the twentieth
        session that was "unbounded", and a batch predicted at twice the budget was recommended)."""
        if self.memory_budget_bytes is None:
            return None
        if self.memory_fit.slope <= 0:
            over = all(m.peak_memory_bytes > self.memory_budget_bytes for m in self.measurements)
            return 0 if over else None
        b = self.memory_fit.solve(self.memory_budget_bytes)
        return max(int(math.floor(b)), 0)

    @property
    def best_measured_batch(self) -> int:
        return self._best_measured().batch_size

    def _best_measured(self, bound: int | None = None) -> BatchMeasurement | None:
        """The measurement with the most samples/s among sizes <= ``bound`` (None: all)."""
        within = [m for m in self.measurements if bound is None or m.batch_size <= bound]
        return max(within, key=lambda m: m.samples_per_s) if within else None

    def predicted_samples_per_s(self, b: float) -> float | None:
        t = float(self.time_fit.predict(b))
        return b / t if t > 0 else None

    @property
    def asymptotic_samples_per_s(self) -> float:
        return 1.0 / self.time_fit.slope if self.time_fit.slope > 0 else math.inf

    @property
    def knee_batch(self) -> int | None:
        """Smallest b whose predicted throughput reaches ``knee_fraction`` of ``1/t1``:
        ``b = f/(1-f) * t0/t1`` (None when the time model has no positive slope/intercept)."""
        t0, t1, f = self.time_fit.intercept, self.time_fit.slope, self.knee_fraction
        if t1 <= 0 or t0 <= 0:
            return None
        return int(math.ceil(f / (1.0 - f) * t0 / t1))

    @property
    def recommended_batch(self) -> int | None:
        """What to try first: the knee capped by the memory bound; without a knee, or one the
        time fit does not support (R^2 below ``MIN_TIME_R2``, more than ``MAX_EXTRAPOLATION``
        times the largest size measured), the measured size with the highest samples/s among
        those within the bound (:attr:`recommended_because`). None when no batch size fits the
        memory budget. Per rank and micro-step, as the sizes measured."""
        return self._recommendation()[0]

    @property
    def recommended_because(self) -> str:
        """Why :attr:`recommended_batch` is what it is, in words (the printed report's last line)."""
        return self._recommendation()[1]

    def _recommendation(self) -> tuple[int | None, str]:
        knee, bound = self.knee_batch, self.max_batch_for_budget
        if bound == 0:
            need = self.memory_fit.predict(1) if self.memory_fit.slope > 0 else \
                min(m.peak_memory_bytes for m in self.measurements)
            return None, (f"no batch size fits the memory budget ({self.memory_budget_bytes / 2**20:.0f} MB): "
                          f"{need / 2**20:.0f} MB predicted or measured at the smallest")
        largest = self.measurements[-1].batch_size
        if knee is not None and self.time_fit.r2 < MIN_TIME_R2:
            why = (f"the time fit explains little of the step times (R^2 {self.time_fit.r2:.2f} < {MIN_TIME_R2}), "
                   f"so its knee ({knee}) is no guide; measure with more --steps")
        elif knee is not None and knee > MAX_EXTRAPOLATION * largest and (bound is None or bound > largest):
            why = (f"the knee {knee} lies {knee / largest:.0f}x beyond the largest size measured ({largest}), too far "
                   f"to trust the fit; measure sizes up to it with --sizes")
        elif knee is not None:
            if bound is not None and bound < knee:
                return bound, f"the knee {knee} capped by the memory bound {bound}"
            past = f" (beyond the largest size measured, {largest}: extrapolated)" if knee > largest else ""
            return knee, "the knee" + past + ("" if bound is None else f", within the memory bound {bound}")
        else:
            # No knee: the time fit is no model of a fixed cost plus a cost per sample, and its
            # predictions (a budget bound's throughput among them) are no better than the
            # measurements (until the twentieth session the budget bound was recommended: 41048
            # at a predicted 588 samples/s where 256 measured 1347).
            t0, t1 = self.time_fit.intercept, self.time_fit.slope
            why = (f"the time fit has no positive slope ({t1 * 1e3:.5f} ms/sample)" if t1 <= 0 else
                   f"the time fit has no positive intercept ({t0 * 1e3:.3f} ms)") + ", so no knee"
        # until the twenty-sixth session a knee from any fit was recommended: 24737 from an R^2 of
        # 0.07, 48x the largest size measured, and 592 to 24742 over three identical runs
        best = self._best_measured(bound)
        if best is None:
            return bound, f"{why}, and no measured size is within the memory bound: the bound"
        where = "" if bound is None else " within the memory bound"
        return best.batch_size, f"{why}: the measured size with the most samples/s{where} ({best.samples_per_s:.0f})"

    # -- presentation --------------------------------------------------------------------------------
    def rows(self) -> list[dict]:
        """One dict per measured batch size, then the predicted rows (budget bound, knee)."""
        out = []
        for m in self.measurements:
            out.append({
                "kind": "measured",
                "batch_size": m.batch_size,
                "peak_memory_mb": m.peak_memory_bytes / 2**20,
                "pred_memory_mb": float(self.memory_fit.predict(m.batch_size)) / 2**20,
                "step_time_ms": m.step_time_s * 1e3,
                "pred_time_ms": float(self.time_fit.predict(m.batch_size)) * 1e3,
                "samples_per_s": m.samples_per_s,
            })
        for kind, b in (("max_for_budget", self.max_batch_for_budget), ("knee", self.knee_batch)):
            if b is None or b <= 0:
                continue
            out.append({
                "kind": kind,
                "batch_size": b,
                "peak_memory_mb": None,
                "pred_memory_mb": float(self.memory_fit.predict(b)) / 2**20,
                "step_time_ms": None,
                "pred_time_ms": float(self.time_fit.predict(b)) * 1e3,
                "samples_per_s": self.predicted_samples_per_s(b),
            })
        return out

    def summary(self) -> dict:
        return {
            "device": self.device,
            "memory_kind": self.memory_kind,
            "memory_budget_mb": None if self.memory_budget_bytes is None else self.memory_budget_bytes / 2**20,
            "memory_model": {"intercept_mb": self.memory_fit.intercept / 2**20,
                             "mb_per_sample": self.memory_fit.slope / 2**20, "r2": self.memory_fit.r2,
                             "rmse_mb": self.memory_fit.rmse / 2**20, "max_rel_err": self.memory_fit.max_rel_err},
            "time_model": {"intercept_ms": self.time_fit.intercept * 1e3, "ms_per_sample": self.time_fit.slope * 1e3,
                           "r2": self.time_fit.r2, "rmse_ms": self.time_fit.rmse * 1e3,
                           "max_rel_err": self.time_fit.max_rel_err},
            "max_batch_for_budget": self.max_batch_for_budget,
            "best_measured_batch": self.best_measured_batch,
            "knee_batch": self.knee_batch,
            "asymptotic_samples_per_s": self.asymptotic_samples_per_s,
            "recommended_batch": self.recommended_batch,
            "recommended_because": self.recommended_because,
        }

    def to_table(self) -> str:
        def f(v, fmt):
            width = int(fmt.split(".")[0])
            return f"{'-':>{width}}" if v is None or not math.isfinite(v) else format(v, fmt)

        head = f"{'kind':<15}{'batch':>9}{'peak MB':>11}{'pred MB':>11}{'step ms':>11}{'pred ms':>11}{'samples/s':>12}"
        lines = [head, "-" * len(head)]
        for r in self.rows():
            lines.append(f"{r['kind']:<15}{r['batch_size']:>9d}{f(r['peak_memory_mb'], '11.1f')}"
                         f"{f(r['pred_memory_mb'], '11.1f')}{f(r['step_time_ms'], '11.2f')}"
                         f"{f(r['pred_time_ms'], '11.2f')}{f(r['samples_per_s'], '12.1f')}")
        s = self.summary()
        mm, tm = s["memory_model"], s["time_model"]
        lines.append("")
        lines.append(f"memory(b) = {mm['intercept_mb']:.1f} MB + {mm['mb_per_sample']:.4f} MB*b   "
                     f"(R^2 {mm['r2']:.4f}, RMSE {mm['rmse_mb']:.2f} MB, max rel err {mm['max_rel_err']:.2%}; "
                     f"{self.memory_kind} on {self.device})")
        lines.append(f"time(b)   = {tm['intercept_ms']:.3f} ms + {tm['ms_per_sample']:.5f} ms*b   "
                     f"(R^2 {tm['r2']:.4f}, RMSE {tm['rmse_ms']:.3f} ms, max rel err {tm['max_rel_err']:.2%})")
        budget = "-" if s["memory_budget_mb"] is None else f"{s['memory_budget_mb']:.0f} MB"
        knee = (f"knee ({self.knee_fraction:.0%} of {s['asymptotic_samples_per_s']:.0f} samples/s) {s['knee_batch']}"
                if s["knee_batch"] is not None else "no knee")
        lines.append(f"budget {budget}: max batch {s['max_batch_for_budget']}; best measured {s['best_measured_batch']}; "
                     f"{knee}")
        lines.append(f"recommended {s['recommended_batch']}: {s['recommended_because']}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "rows": self.rows(),
                "measurements": [asdict(m) for m in self.measurements]}


# -- measurement -------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim_heap(collect: bool = True) -> None:
    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - non-glibc
        pass


class _RssSampler:
    def __init__(self, period_s: float = 5e-4):
        self.period = period_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.period)

    def __enter__(self):
        self.peak = _rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _default_loss(model, batch):
    x, y = batch
    out = model(x)
    if not y.is_floating_point():
        return F.cross_entropy(out, y)
    return F.mse_loss(out.reshape(y.shape), y)


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def measure_batch_size_bounds(
    model_factory: Callable[[], torch.nn.Module],
    batch_factory: Callable[[int], object],
    batch_sizes: Sequence[int],
    memory_budget: float | None = None,
    *,
    loss_fn: Callable | None = None,
    optimizer_factory: Callable | None = None,
    device: str | torch.device | None = None,
    warmup_steps: int = 1,
    timed_steps: int = 3,
    knee_fraction: float = 0.9,
) -> BatchSizeReport:
    """Measure a full training step (forward, backward, optimizer step) at each batch size.

    Args:
        model_factory: ``() -> nn.Module``; called once per batch size (fresh weights/state).
        batch_factory: ``b -> batch``; default loss expects ``(inputs, targets)``.
        batch_sizes: at least two distinct sizes (more give a meaningful fit error).
        memory_budget: bytes available (device memory on CUDA, RAM on CPU) or None.
        loss_fn: ``(model, batch) -> scalar loss``; default cross-entropy for integer targets, MSE otherwise.
        optimizer_factory: ``model -> optimizer`` (its state counts toward memory); default SGD(momentum=0.9).
        device: default CUDA if available, else CPU.
    """
    if len(set(batch_sizes)) < 2:
        raise ValueError("measure_batch_size_bounds needs at least two distinct batch sizes")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loss_fn = loss_fn or _default_loss
    optimizer_factory = optimizer_factory or (lambda m: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9))
    cuda = dev.type == "cuda"
    results = []
    for b in sorted(set(int(x) for x in batch_sizes)):
        _trim_heap()
        if cuda:
            torch.cuda.empty_cache()
        model = model_factory().to(dev)
        model.train()
        opt = optimizer_factory(model)
        batch = _to(batch_factory(b), dev)

        def one_step(model=model, opt=opt, batch=batch):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            loss.backward()
            opt.step()
            if cuda:
                torch.cuda.synchronize(dev)

        for _ in range(warmup_steps):
            one_step()
        times = []
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
            for _ in range(timed_steps):
                t = time.perf_counter()
                one_step()
                times.append(time.perf_counter() - t)
            peak = float(torch.cuda.max_memory_allocated(dev))
        else:
            _trim_heap(collect=False)
            with _RssSampler() as sampler:
                for _ in range(timed_steps):
                    t = time.perf_counter()
                    one_step()
                    times.append(time.perf_counter() - t)
            peak = float(sampler.peak)
        results.append(BatchMeasurement(b, peak, statistics.median(times), tuple(times)))
        del model, opt, batch, one_step  # free before the next size is measured
    return BatchSizeReport(results, memory_budget, "cuda_max_allocated" if cuda else "process_rss", str(dev),
                           knee_fraction)
