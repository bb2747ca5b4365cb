"""The seed paper's large-batch toolkit ("On Using Large-Batches in Federated Learning").

* :func:`measure_batch_size_bounds` -> :class:`BatchSizeReport`: memory/time linear models, the
  largest batch for a memory budget, the throughput knee (the ``bigopt batch-size`` table);
* :class:`GradientStepUp` / :class:`CriticalPhaseDetector`: scale large-batch gradients by alpha
  outside critical phases detected from the rate of change of the gradient norm;
* :class:`GradientNoiseScale` / :func:`estimate_noise_scale`: McCandlish et al.'s critical batch size.
"""

from .batch_size import BatchMeasurement, BatchSizeReport, LinearFit, fit_linear, measure_batch_size_bounds
from .noise_scale import GradientNoiseScale, estimate_noise_scale, noise_scale_estimates, sq_norm
from .step_up import CriticalPhaseDetector, GradientStepUp

__all__ = [
    "measure_batch_size_bounds",
    "BatchSizeReport",
    "BatchMeasurement",
    "LinearFit",
    "fit_linear",
    "GradientStepUp",
    "CriticalPhaseDetector",
    "GradientNoiseScale",
    "estimate_noise_scale",
    "noise_scale_estimates",
    "sq_norm",
]
