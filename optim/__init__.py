"""bigopt optimizers: registry, own large-batch / second-order / proximal / variance-reduced
methods, schedules and the large-batch toolkit (``optim.large_batch``).

    from optim import build_optimizer, available_optimizers, build_scheduler
    opt = build_optimizer("lamb", model, lr=2e-3, weight_decay=0.01)
    sched = build_scheduler(opt, "cosine", warmup_steps=500, total_steps=10_000)

See docs/optim.md.
"""

from .combined import CombinedOptimizer
from .ftrl import FTRL
from .lamb import LAMB
from .lars import LARS
from .proximal import FISTA, ISTA
from .registry import REGISTRY_OPTIONS, available_optimizers, build_optimizer, param_groups_for
from .saga import SAGA
from .schedules import available_schedulers, build_scheduler, clip_grad_norm_, global_grad_norm, scale_lr
from .shampoo import Shampoo
from .sophia import Sophia
from .svrg import SVRG

__all__ = [
    "build_optimizer",
    "available_optimizers",
    "param_groups_for",
    "REGISTRY_OPTIONS",
    "build_scheduler",
    "available_schedulers",
    "scale_lr",
    "clip_grad_norm_",
    "global_grad_norm",
    "CombinedOptimizer",
    "LARS",
    "LAMB",
    "Sophia",
    "Shampoo",
    "FTRL",
    "ISTA",
    "FISTA",
    "SVRG",
    "SAGA",
]
