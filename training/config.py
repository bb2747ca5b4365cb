"""Config sections of the training layer: ``train:`` and ``tracking:``.

Composed into the root config by :mod:`jobs.config` (``cfg.train``, ``cfg.tracking``).
Every field has a default so ``bigopt train conf.yaml`` works with an empty section.

Batch sizes are *global*: ``train.batch_size`` is the number of samples behind one optimizer
step summed over all ranks and accumulation micro-steps, so a 1-process and a 2-process run
with the same config see the same optimisation problem. Per rank and micro-step:
``batch_size // (num_proc * grad_accum_steps)`` (must divide exactly).
"""
from __future__ import annotations

import posixpath
import re
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from pipelines.config import Section


class CompressionSection(Section):
    """Gradient compression hook (``optim.compression``). ``none`` = ``hvd.DistributedOptimizer``."""

    name: str = Field("none", description="none | fp16 | bf16 | topk | randomk | qsgd | signsgd | powersgd ...")
    params: dict[str, Any] = Field(default_factory=dict, description="compressor hyper-parameters")
    min_compress_numel: int = Field(1024, ge=0)
    sparse_as_dense: bool = Field(False, description="densify sparse embedding gradients for the exchange "
                                  "(none: hvd.DistributedOptimizer's sparse_as_dense; else the communicator's)")


# schedules whose decay spans max_steps - warmup_steps (optim.schedules.build_scheduler)
_DECAYING = ("cosine", "poly", "linear")


class TrainConfig(Section):
    model_config = ConfigDict(protected_namespaces=())  # and Section's

    # --- model --------------------------------------------------------------------------
    model: Literal["logreg", "dlrm", "dcnv2"] = "dlrm"
    model_params: dict[str, Any] = Field(
        default_factory=dict,
        description="model hyper-parameters, e.g. embedding_dim, bottom_mlp, top_mlp, cross_layers",
    )
    sparse_embeddings: bool | Literal["auto"] = Field(
        "auto",
        description="sparse embedding gradients: auto = when the optimizer's own update supports them "
        "(sgd without momentum, adagrad, ftrl; no weight decay); true = also route to "
        "optimizer_params.sparse_optimizer (momentum/nesterov only with one named)",
    )
    # --- data ---------------------------------------------------------------------------
    train_table: str | None = Field(None, description="gold train table (default: <lake.root>/<criteo.name>/gold/train)")
    valid_table: str | None = None
    test_table: str | None = None
    vocabulary: str | None = Field(None, description="vocabulary JSON (default: found next to the gold tables)")
    table_version: int | None = Field(None, ge=0, description="pin the train table's Delta version")
    shuffle_buffer_rows: int = Field(200_000, ge=0)
    data_seed: int | None = Field(
        None, ge=0, description="seed of the data order (the loaders' shuffle); default run.seed, which also seeds "
        "the model's initialisation: set it to vary one of the two across repeats and keep the other")
    prefetch: int = Field(2, ge=0, description="batches kept ready per loader (0: none)")
    # --- optimisation -------------------------------------------------------------------
    optimizer: str = Field("adam", description="sgd | momentum | nesterov | adagrad | adam | adamw | ... (optim/)")
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer_params: dict[str, Any] = Field(default_factory=dict, description="extra optimizer kwargs")
    scheduler: str = Field("constant", description="constant | cosine | linear | poly | step | multistep | exponential")
    scheduler_params: dict[str, Any] = Field(default_factory=dict, description="e.g. step_size, gamma, power")
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    batch_size: int = Field(512, ge=1, description="GLOBAL samples per optimizer step (all ranks x accumulation)")
    grad_accum_steps: int = Field(1, ge=1)
    clip_grad_norm: float | None = Field(None, ge=0, description="global L2 norm to clip to (None or 0: off)")
    bf16: bool = False
    max_steps: int = Field(1000, ge=1)
    epochs: int | None = Field(None, ge=1, description="stop after this many passes (None: max_steps only)")
    compression: CompressionSection = Field(default_factory=CompressionSection)
    # --- evaluation / stopping ----------------------------------------------------------
    eval_every: int = Field(200, ge=0, description="evaluate on the valid split every N steps (0: only at the end)")
    eval_batch_size: int = Field(8192, ge=1)
    eval_max_rows: int | None = Field(None, ge=1, description="cap rows per evaluation, over all ranks together (None: the whole split)")
    target_auc: float | None = Field(None, ge=0, le=1, description="time-to-accuracy target on valid AUC")
    early_stop: bool = Field(True, description="stop when target_auc is reached")
    test_at_end: bool = Field(False, description="evaluate the test split after training")
    # --- checkpoints --------------------------------------------------------------------
    checkpoint_dir: str = Field("artifacts/checkpoints/{run}", description="{run} = run.name")
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints (0: none)")
    keep_checkpoints: int = Field(2, ge=0, description="newest checkpoints kept (0: all)")
    # --- launch -------------------------------------------------------------------------
    backend: Literal["horovod", "local"] = Field("horovod", description="horovod = horovod.spark.run")
    num_proc: int = Field(1, ge=1, description="ranks; 1 runs in-process without Horovod")
    threads_per_rank: int | None = Field(None, ge=1, description="torch threads per rank "
                                         "(None: cores / num_proc - 1, at least 1)")
    start_timeout: int = Field(180, ge=1, description="seconds for every rank to start")
    stall_shutdown_s: int = Field(900, ge=0, description="Horovod stall shutdown: a collective not joined by every "
                                  "rank within this many seconds fails the job instead of hanging (0: off)")
    log_every: int = Field(10, ge=1, description="log train metrics every N steps")
    fail_at_step: int | None = Field(None, description="testing: raise in rank 0 at this step")

    @field_validator("checkpoint_dir")
    @classmethod
    def _only_the_run_placeholder(cls, path: str) -> str:
        """``{run}`` is the one placeholder (run.name); another, or a lone brace, was a KeyError
        or ValueError traceback when training started (until the twenty-eighth session)."""
        try:
            path.format(run="run")
        except (KeyError, IndexError, ValueError) as e:
            raise PydanticCustomError("checkpoint_dir", "{run} (run.name) is its one placeholder, and a brace that "
                                      "is none is written twice ({braces}): {why}",
                                      {"run": "{run}", "braces": "{{ }}", "why": f"{type(e).__name__} {e}"}) from None
        return path

    @field_validator("scheduler")
    @classmethod
    def _canonical_scheduler(cls, name: str) -> str:
        """The schedule's name as every comparison downstream spells it (``Cosine`` -> ``cosine``):
        ``min_lr_ratio`` was applied, and a resume's new ``max_steps`` accepted for ``constant``,
        only when written in lower case, while ``optim`` took any case."""
        return name.strip().lower()

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.batch_size % (self.num_proc * self.grad_accum_steps):
            raise ValueError(
                f"batch_size {self.batch_size} must be divisible by num_proc*grad_accum_steps "
                f"= {self.num_proc * self.grad_accum_steps}"
            )
        if self.backend == "local" and self.num_proc != 1:
            raise ValueError(f"backend 'local' runs exactly one rank in this process: num_proc must be 1, not "
                             f"{self.num_proc} (backend 'horovod' runs several)")
        if self.scheduler in _DECAYING and self.max_steps <= self.warmup_steps:
            # caught here, not after ingest and featurize have run (`bigopt run`)
            raise ValueError(f"scheduler {self.scheduler!r} decays over the steps after warmup: max_steps "
                             f"({self.max_steps}) must be greater than warmup_steps ({self.warmup_steps})")
        return self

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // (self.num_proc * self.grad_accum_steps)


class TrackingConfig(Section):
    enabled: bool = True
    tracking_uri: str | None = Field(
        None, description="None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db"
    )
    artifact_location: str | None = Field(None, description="for new experiments (None: <cwd>/mlruns)")
    experiment: str | None = Field(None, description="None: one experiment per dataset (bigopt-<dataset>)")
    run_name: str | None = None
    log_model: bool = True
    model_format: Literal["pt2", "pickle"] = Field(
        "pt2", description="pt2: torch.export graph (safe to load, ~10 s to export); pickle: fast"
    )
    flush_every_s: float = Field(5.0, ge=0, description="metrics are buffered and sent with log_batch")
    tags: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _mlflow_names(self):
        """The tag keys and the experiment name MLflow would refuse, said here: a bad tag key was
        MLflow's traceback once the run existed, leaving it RUNNING without params."""
        for key in self.tags:
            if why := bad_tag_key(key):
                raise ValueError(f"tracking.tags key {key!r}: {why}")
        if self.experiment is not None and len(self.experiment) > _MLFLOW_EXPERIMENT_NAME_MAX:
            raise ValueError(f"tracking.experiment is {len(self.experiment)} characters; MLflow takes at most "
                             f"{_MLFLOW_EXPERIMENT_NAME_MAX}")
        return self

    @model_validator(mode="after")
    def _no_file_store(self):
        """MLflow 3 refuses its file store unless MLFLOW_ALLOW_FILE_STORE=true: say so here, not
        in a traceback once training (after ingest and featurize, in `bigopt run`) starts. The
        store is ``tracking_uri``, else ``$MLFLOW_TRACKING_URI`` (checked the same way)."""
        import os

        from training.tracking import tracking_uri

        if not self.enabled:
            return self
        env = not self.tracking_uri and bool(os.environ.get("MLFLOW_TRACKING_URI"))
        uri = tracking_uri(self)  # the store MLflow will be given (the default sqlite one is no file store)
        allowed = os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true")
        if uri and is_file_store(uri) and not allowed:
            what = f"$MLFLOW_TRACKING_URI={uri!r}" if env else repr(uri)
            raise ValueError(f"{what} is MLflow's file store, which MLflow 3 refuses unless "
                             "MLFLOW_ALLOW_FILE_STORE=true: use a database, e.g. sqlite:///mlflow.db")
        return self


# MLflow's rules (mlflow.utils.validation, not imported here: it imports all of mlflow, seconds)
_MLFLOW_KEY = re.compile(r"[/\w.\- :]*")
_MLFLOW_KEY_MAX = 250
_MLFLOW_EXPERIMENT_NAME_MAX = 500


def bad_tag_key(key: str) -> str | None:
    """Why MLflow refuses ``key`` as a run tag's key (None: it takes it), as
    ``mlflow.utils.validation._validate_tag_name`` and its length limit decide."""
    if not _MLFLOW_KEY.fullmatch(key):
        return ("MLflow's keys may only contain alphanumerics, underscores (_), dashes (-), periods (.), "
                "spaces ( ), colons (:) and slashes (/)")
    norm = posixpath.normpath(key)
    if norm != key or norm == "." or norm.startswith(("..", "/")):
        return f"MLflow refuses a key that is empty, starts with / or .., or reads as another path ({norm!r})"
    if len(key) > _MLFLOW_KEY_MAX:
        return f"{len(key)} characters; MLflow takes at most {_MLFLOW_KEY_MAX}"
    return None


def is_file_store(uri: str) -> bool:
    """Whether MLflow reads ``uri`` as its file store: ``file:`` or no scheme at all, i.e. a path
    (``mlruns``, ``./mlruns``, ``/x/mlruns``, ``~/mlruns``; a Windows drive letter is no scheme),
    as ``mlflow.utils.uri.get_uri_scheme`` does. ``databricks`` (and ``databricks-uc``, ``uc``)
    alone is MLflow's name of a store, not a path."""
    from urllib.parse import urlparse

    if uri in ("databricks", "databricks-uc", "uc"):
        return False
    scheme = urlparse(uri).scheme.lower()
    return len(scheme) <= 1 or scheme == "file"
