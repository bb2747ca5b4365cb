"""The per-rank training loop.

:func:`train_rank` is a plain importable function ``(job: dict, dist) -> dict``: the launcher
runs it in-process (``num_proc: 1``, ``dist = LocalDist()``) or in every Horovod rank
(``dist = HorovodDist()``). ``job`` holds only plain values (see :func:`make_job`), so it
pickles to Spark executors.

Per optimizer step: ``grad_accum_steps`` micro-batches of ``batch_size / (world *
accum)`` rows, forward (optionally under bf16 autocast), BCE-with-logits / accum, backward;
then the gradient exchange - ``hvd.DistributedOptimizer`` (``compression.name: none``, with
``compression.sparse_as_dense``) or ``GradientCommunicator.synchronize()`` (any other compressor);
clipping; step; LR schedule.
"""
from __future__ import annotations

import contextlib
import logging
import os
import resource
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

from training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from training.config import TrainConfig
from training.dataspec import DataSpec, batch_to_inputs
from training.loaders import make_loader
from training.metrics import binary_metrics
from training.models import build_model, memory_report
from training.optimizers import build_optimizer, build_scheduler, can_route_sparse, supports_sparse
from training.tracking import MetricLogger

log = logging.getLogger(__name__)


class InjectedFailure(RuntimeError):
    """Raised by ``train.fail_at_step`` (tests of resume and error reporting)."""


def make_job(
    cfg,
    spec: DataSpec,
    *,
    checkpoint_dir: str,
    resume: bool = False,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    config_hash: str = "",
) -> dict[str, Any]:
    """Everything a rank needs, as plain values (picklable, no pydantic/Spark objects)."""
    return {
        "train": cfg.train.model_dump(mode="json"),
        "seed": int(cfg.run.seed),
        "spec": spec.to_dict(),
        "checkpoint_dir": checkpoint_dir,
        "resume": bool(resume),
        "tracking_uri": tracking_uri,
        "run_id": run_id,
        "flush_every_s": float(cfg.tracking.flush_every_s),
        "log_model": bool(cfg.tracking.log_model),
        "model_format": cfg.tracking.model_format,
        "config_hash": config_hash,
    }


def default_threads(ranks_per_host: int) -> int:
    """Intra-op threads per rank: the rank's share of the cores minus one left to the loader's
    decode/prefetch threads. Oversubscribing is very costly: on this 2-core box a DLRM step ran
    15x slower with 2 torch threads than with 1 while the loader and Spark were also running."""
    return max(1, (os.cpu_count() or 1) // max(1, ranks_per_host) - 1)


def pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        idx = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(idx)
        return torch.device("cuda", idx)
    return torch.device("cpu")


def resolve_sparse(t: TrainConfig) -> bool:
    if t.sparse_embeddings == "auto":
        return supports_sparse(t.optimizer, t.weight_decay, t.optimizer_params)
    if t.sparse_embeddings and not can_route_sparse(t.optimizer, t.optimizer_params):
        why = ("momentum has no sparse form (its buffer decays every row at every step); name "
               "train.optimizer_params.sparse_optimizer to route the embeddings elsewhere, or"
               if t.optimizer.lower() != "lbfgs" else "it needs a single dense parameter group;")
        raise ValueError(
            f"train.sparse_embeddings: optimizer {t.optimizer!r} cannot train sparse embeddings: {why} "
            "use sgd/adagrad/ftrl, or set sparse_embeddings to false/auto"
        )
    return bool(t.sparse_embeddings)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Global L2 clipping that also handles sparse (COO) gradients. Returns the pre-clip norm."""
    sq = []
    for p in params:
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            g = g.coalesce()
            p.grad = g
            sq.append(g._values().float().pow(2).sum())
        else:
            sq.append(g.float().pow(2).sum())
    if not sq:
        return 0.0
    total = torch.stack(sq).sum().sqrt()
    coef = max_norm / (float(total) + 1e-6)
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
    return float(total)


def param_fingerprint(model: torch.nn.Module) -> str:
    """Hash of all parameters' bytes: equal on every rank after a correct data-parallel run."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 2**20


def _optimizer_state_mb(opt: torch.optim.Optimizer) -> float:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += (v._values().numel() if v.is_sparse else v.numel()) * v.element_size()
    return total / 2**20


def evaluate(model, loader, spec: DataSpec, dist, device, *, bf16: bool = False, max_rows: int | None = None) -> dict[str, float]:
    """Exact metrics over the split: every rank scores its shard, scores/labels are allgathered
    (the ranks' counts may differ). ``max_rows`` caps the total over all ranks at the split's
    first ``max_rows`` rows (``loader.global_positions()``): the same rows, so the same metrics,
    on any number of ranks. Until the twenty-sixth session each rank scored the first rows of its
    own shard (a share proportional to it), so which rows were scored, and a capped AUC,
    depended on the rank count (0.4945 on 1 rank, 0.5140 on 2, for one model and a cap of 1001)."""
    was_training = model.training
    model.eval()
    keep = None  # per row of this rank's shard, in the order it is read: among the first max_rows?
    if max_rows is not None and sum(loader.rank_rows) > max_rows:
        keep = torch.from_numpy(loader.global_positions() < max_rows)
    end = None if keep is None else (int(keep.nonzero().max()) + 1 if bool(keep.any()) else 0)
    zs, ys, pos = [], [], 0
    loader.set_epoch(0)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for batch in loader if end != 0 else ():
            dense, sparse, label, mask = batch_to_inputs(batch, spec, device)
            z = model(dense, sparse).float()
            if mask is not None:
                z, label = z[mask], label[mask]
            if keep is not None:
                k = keep[pos:pos + z.shape[0]].to(z.device)
                pos += z.shape[0]
                z, label = z[k], label[k]
            zs.append(z.cpu())
            ys.append(label.cpu())
            if end is not None and pos >= end:
                break
    z = torch.cat(zs) if zs else torch.zeros(0)
    y = torch.cat(ys) if ys else torch.zeros(0)
    z, y = dist.allgather(z), dist.allgather(y)
    if was_training:
        model.train()
    return binary_metrics(z.numpy(), y.numpy())


def model_for(t: TrainConfig, cardinalities, num_dense: int) -> torch.nn.Module:
    """The model ``t`` describes (``t.model`` with ``t.model_params``, sparse embeddings as
    :func:`resolve_sparse` decides), on the CPU. With sparse embeddings, PyTorch's sparse
    invariant checks are explicitly off, as they are by default: torch 2.13 warned "Sparse
    invariant checks are implicitly disabled. Memory errors (e.g. SEGFAULT) will occur..." once
    per process (driver and each rank) at Adagrad's first sparse step."""
    if sparse := resolve_sparse(t):
        torch.sparse.check_sparse_tensor_invariants.disable()
    return build_model(t.model, cardinalities=cardinalities, num_dense=num_dense, sparse=sparse,
                       **t.model_params)


def optimizer_for(t: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    return build_optimizer(t.optimizer, model, lr=t.lr, weight_decay=t.weight_decay, params=t.optimizer_params)


def scheduler_for(t: TrainConfig, opt: torch.optim.Optimizer, total_steps: int):
    return build_scheduler(opt, name=t.scheduler, total_steps=total_steps, warmup_steps=t.warmup_steps,
                           min_lr_ratio=t.min_lr_ratio, params=t.scheduler_params, base_lr=t.lr)


def sophia_of(opt: torch.optim.Optimizer):
    """The Sophia optimizer inside ``opt`` (itself, Horovod's wrapper of it, or the dense route
    of a combined optimizer), whose Hessian estimate the loop refreshes; None for others."""
    from optim.sophia import Sophia

    return next((o for o in (opt, *getattr(opt, "optimizers", ())) if isinstance(o, Sophia)), None)


def refresh_hessian(sophia, logits: torch.Tensor, loss: torch.Tensor) -> None:
    """Sophia's diagonal Hessian estimate with its configured estimator, on this forward pass
    (its graph kept for the backward that follows): Gauss-Newton-Bartlett with labels sampled
    from the model's own click probabilities, or Hutchinson's on the loss."""
    if sophia.param_groups[0]["estimator"] == "hutchinson":
        sophia.update_hessian_hutchinson(loss, retain_graph=True)
    else:
        sophia.update_hessian_gnb(logits.float(), "bernoulli", retain_graph=True)


class TrainSettingsError(ValueError):
    """train.* settings the model, optimizer, compressor or scheduler builders refuse."""


def steps_per_epoch_of(t: TrainConfig, micro_per_epoch: int, world: int) -> int:
    """Optimizer steps per epoch for a training loader of ``micro_per_epoch`` micro-batches per
    rank; :class:`TrainSettingsError` when that is not one step."""
    steps = micro_per_epoch // t.grad_accum_steps
    if steps <= 0:
        shards = ("The loader shards whole row groups across ranks: a table with fewer (or very unequal) row "
                  "groups than ranks leaves a rank (almost) empty - use fewer ranks (train.num_proc, --num-proc), "
                  "write smaller row groups (criteo.featurize.row_group_rows) or lower train.batch_size" if world > 1
                  else "Lower train.batch_size")
        raise TrainSettingsError(
            f"train table too small for {world} rank(s): {micro_per_epoch} micro-batches of {t.micro_batch_size} "
            f"rows (train.batch_size={t.batch_size}) on the smallest rank's shard, need >= "
            f"grad_accum_steps={t.grad_accum_steps}. {shards}")
    return steps


def total_steps_of(t: TrainConfig, steps_per_epoch: int) -> int:
    """The run's length in optimizer steps: ``max_steps``, or fewer when ``epochs`` end it first."""
    return t.max_steps if t.epochs is None else min(t.max_steps, t.epochs * steps_per_epoch)


def length_stop_reason(t: TrainConfig, total_steps: int) -> str:
    """Why a run that reached ``total_steps`` stopped: its ``epochs`` when they end it before ``max_steps``."""
    return "epochs" if total_steps < t.max_steps else "max_steps"


def resume_stop_reason(t: TrainConfig, meta: dict[str, Any] | None, step: int, total_steps: int) -> str:
    """Why a run restored at ``step`` (from checkpoint ``meta``) has nothing left to do, "" when
    it goes on. A run that stopped early at ``target_auc`` stays stopped while this command would
    still stop there (``early_stop`` on, the target set and reached by the best AUC): resumed
    from its last checkpoint it trained on to ``max_steps``, since the target had been logged
    already and never fired again. A resume that turns ``early_stop`` off goes on, as one that
    raises ``max_steps`` does."""
    if meta is not None and meta.get("stop_reason") == "target_auc" and t.early_stop and t.target_auc is not None:
        best = (meta.get("progress") or {}).get("best_auc")
        if best is not None and best >= t.target_auc:
            return "target_auc"
    return length_stop_reason(t, total_steps) if step >= total_steps else ""


def run_steps(t: TrainConfig, spec: DataSpec) -> int:
    """Optimizer steps per epoch of a run of ``t`` on ``spec``, exactly as each rank's loader
    will count them (from the train table's metadata): :class:`TrainSettingsError` when the
    table holds no step, so that is said on the driver before the ranks or an MLflow run start."""
    from training.loaders import train_batches_per_rank

    micro = train_batches_per_rank(spec.train, spec.columns, t.micro_batch_size, version=spec.versions.get("train"),
                                   world_size=t.num_proc)
    return steps_per_epoch_of(t, micro, t.num_proc)


def unused_settings(t: TrainConfig) -> list[str]:
    """Settings given (in the YAML or an override, not defaults) that the run does not use, each
    said with why: the run goes on (a sweep's shared YAML may set them for every method)."""
    from optim.compression import build_compressor

    unused = []
    if "min_compress_numel" in t.compression.model_fields_set:
        if t.compression.name == "none":
            unused.append(f"train.compression.min_compress_numel={t.compression.min_compress_numel} has no effect with "
                          "train.compression.name=none: every gradient is allreduced uncompressed")
        elif not build_compressor(t.compression.name, **t.compression.params).respects_threshold:
            unused.append(f"train.compression.min_compress_numel={t.compression.min_compress_numel} has no effect with "
                          f"train.compression.name={t.compression.name}: a cast has no per-tensor overhead, so every "
                          "gradient is cast (docs/compression.md, Small layers)")
    return unused


def check_settings(t: TrainConfig, num_sparse: int, num_dense: int, steps_per_epoch: int | None = None) -> None:
    """Build what each rank builds from ``t`` (model, optimizer, compressor, scheduler), on a
    tiny model on the CPU, and take one optimizer step with it as a rank does, so a bad setting
    (an unknown optimizer, model hyper-parameters of another model, a bad compressor parameter,
    optimizer settings its first step refuses...) is one error before anything starts, not a
    traceback from every rank after the Spark job and the MLflow run have started.
    ``steps_per_epoch`` (known once the data is): the schedule spans the run's real length,
    which ``epochs`` may make shorter than ``max_steps``."""
    total = t.max_steps if steps_per_epoch is None else total_steps_of(t, steps_per_epoch)
    try:
        # forked: the tiny model's init and the step's sampling (Sophia's labels, Hutchinson's
        # probes) leave the caller's random state as it was
        with torch.random.fork_rng(devices=[]):
            model = model_for(t, [2] * num_sparse, num_dense)
            opt = _settings_optimizer(t, model)
            if needs := _needs_a_closure(opt):
                raise ValueError(f"train.optimizer={t.optimizer} {needs}, which bigopt train's loop (one step per "
                                 "batch, from backward's gradients) does not drive: use it from your own loop "
                                 "(docs/optim.md), or choose another optimizer")
            if any("lr" not in g for g in opt.param_groups):
                raise ValueError(f"train.optimizer={t.optimizer} has no learning rate in its param groups (it sets "
                                 "its own step size), which train.lr and train.scheduler drive: choose another "
                                 "optimizer")
            _first_step(t, num_sparse)
        from optim.compression import build_compressor

        # `none` too: its params are the library's (error_feedback is refused there, an unknown
        # key such as ratio is not taken), not silently dropped for hvd.DistributedOptimizer
        build_compressor(t.compression.name, **t.compression.params)
        try:
            scheduler_for(t, opt, total)
        except ValueError as e:
            if total == t.max_steps:
                raise
            raise ValueError(f"{e}: the run is {total} steps, train.epochs={t.epochs} x {steps_per_epoch} steps "
                             f"per epoch (global batches of {t.batch_size} rows), fewer than "
                             f"train.max_steps={t.max_steps}") from None
    except (ValueError, TypeError, KeyError, RuntimeError) as e:  # RuntimeError: torch refusing a size
        raise TrainSettingsError(f"train settings: {e}") from None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


def _settings_optimizer(t: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """``optimizer_for``, with whatever a third-party optimizer's constructor raises (an
    AttributeError, a missing optional package...) said as a settings error naming it."""
    try:
        return optimizer_for(t, model)
    except (ValueError, TypeError, KeyError, RuntimeError):
        raise
    except Exception as e:  # noqa: BLE001 - one line instead of every rank's traceback
        raise ValueError(f"train.optimizer={t.optimizer} cannot be built: {_one_line(e)}") from None


class _StandIn(torch.nn.Module):
    """A few dozen parameters of every kind the optimizer registry groups (an embedding table,
    sparse when the run's are; linear weights; biases; a norm layer's weight and bias), whose
    one step costs milliseconds for any optimizer, where the run's model (its MLP widths are
    the run's even with 2-row tables) made some first steps take minutes (po:kron)."""

    def __init__(self, num_sparse: int, sparse: bool):
        super().__init__()
        self.emb = torch.nn.Embedding(4, 3, sparse=sparse) if num_sparse else None
        self.lin = torch.nn.Linear(2 + (3 if num_sparse else 0), 4)
        self.norm = torch.nn.LayerNorm(4)
        self.out = torch.nn.Linear(4, 1)

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        x = dense if self.emb is None else torch.cat([dense, self.emb(ids).mean(1)], dim=1)
        return self.out(torch.relu(self.norm(self.lin(x)))).squeeze(-1)


def _first_step(t: TrainConfig, num_sparse: int) -> None:
    """One optimizer step of ``t``'s optimizer as a rank takes it (forward under the run's
    autocast, BCE loss, Sophia's Hessian refresh, backward, clipping, ``step()``), on a
    :class:`_StandIn` and 4 fixed rows: settings that only fail when the optimizer first updates
    (three ``betas`` for Adam, an optimizer that needs ``backward(create_graph=True)`` or only
    takes 2-D parameters) are refused here, with the optimizer and the cause."""
    model = _StandIn(num_sparse, resolve_sparse(t))
    opt = _settings_optimizer(t, model)
    dense = torch.linspace(0.0, 1.0, 8).reshape(4, 2)
    ids = (torch.arange(8) % 4).reshape(4, 2)
    label = torch.tensor([0.0, 1.0, 1.0, 0.0])
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=t.bf16):
            logits = model(dense, ids)
        loss = F.binary_cross_entropy_with_logits(logits.float(), label)
        sophia = sophia_of(opt)
        if sophia is not None and sophia.hessian_due():
            refresh_hessian(sophia, logits, loss)
        (loss / t.grad_accum_steps).backward()
        if t.clip_grad_norm:
            clip_grad_norm(list(model.parameters()), t.clip_grad_norm)
        opt.step()
    except Exception as e:  # noqa: BLE001 - whatever the optimizer raises is its settings' fault here
        hint = ("; it differentiates the gradients again, which needs backward(create_graph=True): bigopt train's "
                "loop does not keep that graph" if "does not require grad" in str(e) else "")
        raise ValueError(f"train.optimizer={t.optimizer} (optimizer_params {t.optimizer_params}) fails at its first "
                         f"step: {_one_line(e)}{hint}") from None


def none_exchange_bytes(params: list[torch.nn.Parameter], sparse_as_dense: bool) -> int:
    """Bytes one rank hands to collectives when ``hvd.DistributedOptimizer`` exchanges these
    gradients (``compression.name: none``), as Horovod sends them: every dense gradient allreduced
    (a missing one as zeros of the parameter's size); a sparse gradient's indices (int64) and values
    allgathered as they are (uncoalesced), or, with ``sparse_as_dense``, densified and allreduced."""
    total = 0
    for p in params:
        g = p.grad
        if g is not None and g.is_sparse and not sparse_as_dense:
            total += g._indices().nbytes + g._values().nbytes
        else:
            total += p.numel() * (g if g is not None else p).element_size()
    return total


def _needs_a_closure(opt: torch.optim.Optimizer) -> str | None:
    """What ``opt`` needs beyond ``step()`` after ``backward()``, or None: the variance-reduced
    strategies (SVRG, SAGA) evaluate the loss themselves and need an epoch hook; L-BFGS (and
    any optimizer whose ``step`` has no default closure) re-evaluates the loss in ``step``, and
    so do ISTA/FISTA with ``line_search=True`` (they backtrack on the loss)."""
    import inspect

    from optim._vr import VarianceReduced

    if isinstance(opt, VarianceReduced):
        return "needs a loss closure at every step and a full-gradient pass at every epoch"
    closure = inspect.signature(opt.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        return "needs a closure that re-evaluates the loss inside step()"
    if any(g.get("line_search") for g in opt.param_groups):
        return "with line_search=True needs a closure that re-evaluates the loss inside step() (to backtrack the lr)"
    return None


def horovod_optimizer(hvd, opt: torch.optim.Optimizer, model: torch.nn.Module, **kw) -> torch.optim.Optimizer:
    """``hvd.DistributedOptimizer(opt)`` (``kw``: ``backward_passes_per_step``, ``sparse_as_dense``:
    sparse embedding gradients allreduced dense), with ``opt``'s state. Horovod re-runs the
    optimizer's ``__init__`` on its param groups alone, so state that an ``__init__`` fills from
    its arguments was lost: Adagrad's sums restarted from 0 whatever ``initial_accumulator_value``
    said (until the twenty-fifth session)."""
    made = opt.state_dict()
    wrapped = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), **kw)
    wrapped.load_state_dict(made)
    return wrapped


def train_rank(job: dict[str, Any], dist) -> dict[str, Any]:
    """Train on this rank; returns a small result dict (rank 0's carries the history)."""
    t = TrainConfig.model_validate(job["train"])
    spec = DataSpec.from_dict(job["spec"])
    rank, world = dist.rank, dist.size
    threads = t.threads_per_rank or default_threads(world)
    torch.set_num_threads(threads)
    device = pick_device(dist.local_rank)
    torch.manual_seed(job["seed"])
    if world * t.micro_batch_size * t.grad_accum_steps != t.batch_size:
        raise ValueError(f"world size {world} does not match train.num_proc {t.num_proc}")

    # ---- model, optimizer (wrapped for Horovod), resume ------------------------------------
    sparse = resolve_sparse(t)
    model = model_for(t, spec.cardinalities, spec.num_dense).to(device)
    opt = optimizer_for(t, model)
    comm = None
    hvd_opt = False
    from optim.compression import GradientCommunicator, build_compressor

    compressor = build_compressor(t.compression.name, **t.compression.params)  # `none`'s params checked too
    if t.compression.name != "none":  # the compression hook: plain optimizer + communicator
        comm = GradientCommunicator(
            compressor,
            model,  # the module itself: embedding tables are found by type (nn.Embedding*), not by name
            backend=dist.hvd,
            min_compress_numel=t.compression.min_compress_numel,
            sparse_as_dense=t.compression.sparse_as_dense,
        )
    elif dist.hvd is not None:
        opt = horovod_optimizer(dist.hvd, opt, model, backward_passes_per_step=t.grad_accum_steps,
                                sparse_as_dense=t.compression.sparse_as_dense)
        hvd_opt = True
    sophia = sophia_of(opt)

    meta: dict[str, Any] | None = None
    ckpt_dir = job["checkpoint_dir"]
    if job["resume"]:
        if rank == 0:
            path = latest_checkpoint(ckpt_dir)
            if path is not None:
                state = load_checkpoint(path)
                model.load_state_dict(state.pop("model"))
                opt.load_state_dict(state.pop("optimizer"))
                meta = state
                print(f"[rank 0] resuming from {path} (step {state['step']})", file=sys.stderr, flush=True)
        meta = dist.broadcast_object(meta)
        if meta is not None:
            # fresh optimizers are identical on every rank; only restored state must be sent
            dist.broadcast_optimizer_state(opt, model)
    dist.broadcast_parameters(model)

    # ---- data ----------------------------------------------------------------------------
    micro = t.micro_batch_size
    loader = make_loader(spec.train, spec.columns, micro, version=spec.versions.get("train"), rank=rank,
                         world_size=world, train=True, seed=job["seed"] if t.data_seed is None else t.data_seed,
                         shuffle_buffer_rows=t.shuffle_buffer_rows,
                         prefetch=t.prefetch, pin_memory=device.type == "cuda")
    steps_per_epoch = steps_per_epoch_of(t, len(loader), world)
    total_steps = total_steps_of(t, steps_per_epoch)

    def eval_loader_for(split: str):
        uri = spec.table(split)
        if not uri:
            return None
        return make_loader(uri, spec.columns, t.eval_batch_size, version=spec.versions.get(split), rank=rank,
                           world_size=world, train=False, prefetch=t.prefetch)

    valid_loader = eval_loader_for("valid")

    sched = scheduler_for(t, opt, total_steps)
    if meta is not None:
        sched.load_state_dict(meta["scheduler"])
        for g, lr in zip(opt.param_groups, sched.get_last_lr()):
            g["lr"] = lr
        if comm is not None and meta.get("compressor"):
            comm.load_state_dict(meta["compressor"][rank])  # error-feedback residuals are per rank

    # ---- state ---------------------------------------------------------------------------
    step, epoch = 0, 0
    progress: dict[str, Any] = {"samples": 0, "train_s": 0.0, "wall_s": 0.0, "tta": None, "best_auc": None}
    history: dict[str, Any] = {"train": [], "eval": [], "target_auc": t.target_auc}
    if meta is not None:
        step, epoch = int(meta["step"]), int(meta["epoch"])
        progress = meta["progress"]
        history = meta.get("history") or history
        loader.load_state_dict(meta["loaders"][rank])
        epoch = int(getattr(loader, "epoch", epoch))  # the loader's position is authoritative
        torch.set_rng_state(meta["rng"][rank])
        if device.type == "cuda" and meta.get("cuda_rng"):
            torch.cuda.set_rng_state(meta["cuda_rng"][rank])

    tracker = (MetricLogger(job["tracking_uri"], job["run_id"], job["flush_every_s"], resumed=meta is not None)
               if rank == 0 else MetricLogger(None, None))
    trainable = [p for p in model.parameters() if p.requires_grad]
    full_grad_bytes = sum(p.numel() * p.element_size() for p in trainable)
    mem = memory_report(model)
    if rank == 0 and meta is None:
        tracker.log_params({
            "world_size": world,
            "micro_batch_size": micro,
            "device": str(device),
            "threads_per_rank": threads,
            "sparse_embeddings_resolved": sparse,
            "gradient_exchange": "communicator" if comm is not None else "hvd.DistributedOptimizer" if hvd_opt else "local",
            **{f"model.{k}": (int(v) if k.startswith("params") else round(v, 3)) for k, v in mem.items()},
        })

    def log_eval(ev: dict[str, float], prefix: str = "valid") -> None:
        tracker.log({f"{prefix}_{k}": v for k, v in ev.items() if k != "rows"}, step)

    last_ckpt = {"step": -1}

    def checkpoint() -> None:
        last_ckpt["step"] = step
        loaders = dist.allgather_object(loader.state_dict())
        rngs = dist.allgather_object(torch.get_rng_state())
        cuda_rngs = dist.allgather_object(torch.cuda.get_rng_state()) if device.type == "cuda" else None
        comms = dist.allgather_object(comm.state_dict()) if comm is not None else None
        # the open train_loss window, per rank (each sums its own losses): a resume continues it
        windows = dist.allgather_object({"loss": float(win_loss), "micro": win_micro, "steps": win_steps,
                                         "train_s": win_train_s, "wait_s": win_wait_s, "bytes": win_bytes})
        if rank == 0:
            state = {
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "compressor": comms,
                "loaders": loaders,
                "rng": rngs,
                "cuda_rng": cuda_rngs,
                "progress": progress,
                "history": history,
                "window": windows,
                "stop_reason": stop_reason,  # "" before the stop; target_auc keeps a resume stopped
                "run_id": job["run_id"],
                "config_hash": job["config_hash"],
                "data_versions": dict(spec.versions),  # a resume reads these (training/api.py)
                "train_config": job["train"], "seed": job["seed"],  # and keeps these (checkpoint.py)
            }
            # what was logged up to the checkpoint reaches MLflow before the checkpoint exists: a
            # resume restarts there and logs only later steps, so metrics still buffered when the
            # process died just after the rename were never logged (flushed first, a death between
            # the two costs nothing: the resume restarts at the older checkpoint and skips the
            # steps the run already holds)
            tracker.flush()
            save_checkpoint(ckpt_dir, step, state, keep=t.keep_checkpoints)

    # ---- loop ----------------------------------------------------------------------------
    wall0 = time.perf_counter() - float(progress["wall_s"])
    model.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.bf16)
    win_loss = torch.zeros((), dtype=torch.float64, device=device)  # on device: no per-step host sync
    win_micro = win_steps = 0
    win_train_s = win_wait_s = 0.0
    win_bytes = 0.0
    if meta is not None and meta.get("window"):  # the log window the checkpoint cut (older ones: none)
        w = meta["window"][rank]
        win_loss.fill_(float(w["loss"]))  # a float64 sum restored exactly: the next log is bit-identical
        win_micro, win_steps = int(w["micro"]), int(w["steps"])
        win_train_s, win_wait_s, win_bytes = float(w["train_s"]), float(w["wait_s"]), float(w["bytes"])
    last_comm: dict[str, float] = {}
    last_lr: float | None = None

    def log_window(lr: float) -> None:
        """Log the window of steps since the last log (train loss over ranks and micro-batches,
        throughput, bytes) at ``step``, and start a new one."""
        nonlocal win_micro, win_steps, win_train_s, win_wait_s, win_bytes
        loss_avg = float(dist.allreduce_mean(torch.tensor([float(win_loss) / max(1, win_micro)]))[0])
        wall = time.perf_counter() - wall0
        m = {
            "train_loss": loss_avg,
            "lr": lr,
            "samples_per_s": win_steps * t.batch_size / max(win_train_s, 1e-9),
            "step_time_s": win_train_s / win_steps,
            "data_wait_frac": win_wait_s / max(win_train_s, 1e-9),
            "bytes_sent_per_step": win_bytes / win_steps,
            "dense_grad_bytes": float(full_grad_bytes),
            "epoch": float(epoch),
            **last_comm,
        }
        tracker.log(m, step)
        history["train"].append({"step": step, "wall_s": wall, "train_s": progress["train_s"],
                                 "samples": progress["samples"], "loss": loss_avg, "samples_per_s": m["samples_per_s"]})
        win_loss.zero_()
        win_micro = win_steps = 0
        win_train_s = win_wait_s = win_bytes = 0.0

    def tta_now(wall: float) -> dict[str, float]:
        """The time-to-accuracy metrics, now: wall and train seconds, global samples, the step,
        and the bytes this rank has sent (the gradient exchange's, per rank)."""
        return {"tta_wall_s": wall, "tta_train_s": progress["train_s"], "tta_samples": float(progress["samples"]),
                "tta_step": float(step), "tta_bytes_sent": float(progress.get("bytes_sent", 0.0))}

    # a resume at the last step (nothing left to train) has its final evaluation in the history
    # already: evaluating again would append it twice
    last_eval_step = int(history["eval"][-1]["step"]) if history["eval"] else -1
    resumed_mid_epoch = meta is not None
    example = None
    stop_reason = resume_stop_reason(t, meta, step, total_steps)
    done = bool(stop_reason)

    while not done:
        if not resumed_mid_epoch:
            loader.set_epoch(epoch)
        resumed_mid_epoch = False
        it = iter(loader)
        while True:
            # one optimizer step = grad_accum_steps micro-batches
            t_step = time.perf_counter()
            wait = 0.0
            opt.zero_grad()
            got = 0
            hessian_due = sophia is not None and sophia.hessian_due()
            for _ in range(t.grad_accum_steps):
                tw = time.perf_counter()
                batch = next(it, None)
                wait += time.perf_counter() - tw
                if batch is None:
                    break
                dense, sparse_ids_t, label, _ = batch_to_inputs(batch, spec, device)
                if example is None:
                    example = (dense[:4].cpu(), sparse_ids_t[:4].cpu())
                with autocast:
                    logits = model(dense, sparse_ids_t)
                loss = F.binary_cross_entropy_with_logits(logits.float(), label)
                if hessian_due:  # Sophia's h, from this step's first micro-batch (averaged over the ranks)
                    refresh_hessian(sophia, logits, loss)
                    hessian_due = False
                (loss / t.grad_accum_steps).backward()
                win_loss += loss.detach().double()
                win_micro += 1
                got += 1
            if got < t.grad_accum_steps:
                if got and hvd_opt:
                    # drop the partial accumulation (can only happen with len % accum != 0)
                    opt.synchronize()
                break  # epoch exhausted
            if comm is not None:
                stats = comm.synchronize()
                sent = float(stats.bytes_sent)
                last_comm = {k: float(v) for k, v in stats.as_metrics().items()}
            else:  # what hvd.DistributedOptimizer sends (counted with one rank too)
                sent = float(none_exchange_bytes(trainable, t.compression.sparse_as_dense))
            if t.clip_grad_norm:
                if hvd_opt:
                    opt.synchronize()
                clip_grad_norm(trainable, t.clip_grad_norm)
                with opt.skip_synchronize() if hvd_opt else contextlib.nullcontext():
                    opt.step()
            else:
                opt.step()
            last_lr = opt.param_groups[0]["lr"]  # the LR this step used: sched.step() sets the next one
            sched.step()
            step += 1
            progress["samples"] += t.batch_size
            dt = time.perf_counter() - t_step
            progress["train_s"] += dt
            win_train_s += dt
            win_wait_s += wait
            win_bytes += sent
            win_steps += 1
            progress["bytes_sent"] = progress.get("bytes_sent", 0.0) + sent
            progress["steps_done"] = progress.get("steps_done", 0) + 1

            if t.fail_at_step is not None and step == t.fail_at_step and rank == world - 1:
                raise InjectedFailure(f"train.fail_at_step={t.fail_at_step} reached on rank {rank}")

            if step % t.log_every == 0 or step >= total_steps:
                log_window(last_lr)

            if valid_loader is not None and t.eval_every and step % t.eval_every == 0:
                ev = evaluate(model, valid_loader, spec, dist, device, bf16=t.bf16, max_rows=t.eval_max_rows)
                last_eval_step = step
                wall = time.perf_counter() - wall0
                history["eval"].append({"step": step, "wall_s": wall, "train_s": progress["train_s"],
                                        "samples": progress["samples"], **ev})
                log_eval(ev)
                auc = ev["auc"]
                if auc == auc and (progress["best_auc"] is None or auc > progress["best_auc"]):
                    progress["best_auc"] = auc
                if t.target_auc is not None and progress["tta"] is None and auc == auc and auc >= t.target_auc:
                    progress["tta"] = tta_now(wall)
                    tracker.log(progress["tta"], step)
                    if t.early_stop:
                        done, stop_reason = True, "target_auc"

            progress["wall_s"] = time.perf_counter() - wall0
            if t.checkpoint_every and step % t.checkpoint_every == 0:
                checkpoint()
            if step >= total_steps:
                done, stop_reason = True, stop_reason or length_stop_reason(t, total_steps)
            if done:
                break
        if not done:
            epoch += 1
            if t.epochs is not None and epoch >= t.epochs:
                done, stop_reason = True, "epochs"

    if win_steps:  # the steps since the last log (an early stop between two logs: until the
        # twenty-sixth session they were never logged)
        log_window(float(opt.param_groups[0]["lr"]) if last_lr is None else last_lr)

    # ---- end: final evaluation, test split, checkpoint, artifacts --------------------------
    final: dict[str, float] = {}
    if valid_loader is not None:
        if last_eval_step == step and history["eval"]:
            final = {k: v for k, v in history["eval"][-1].items() if k not in ("step", "wall_s", "train_s", "samples")}
        else:
            final = evaluate(model, valid_loader, spec, dist, device, bf16=t.bf16, max_rows=t.eval_max_rows)
            wall = time.perf_counter() - wall0
            history["eval"].append({"step": step, "wall_s": wall, "train_s": progress["train_s"],
                                    "samples": progress["samples"], **final})
            log_eval(final)
            if t.target_auc is not None and progress["tta"] is None and final["auc"] >= t.target_auc:
                progress["tta"] = tta_now(wall)
                tracker.log(progress["tta"], step)
    test: dict[str, float] = {}
    if t.test_at_end:
        test_loader = eval_loader_for("test")
        if test_loader is not None:
            test = evaluate(model, test_loader, spec, dist, device, bf16=t.bf16)
            log_eval(test, "test")
            if hasattr(test_loader, "close"):
                test_loader.close()
    progress["wall_s"] = time.perf_counter() - wall0
    if t.checkpoint_every and last_ckpt["step"] != step:
        checkpoint()

    for ld in (loader, valid_loader):
        if ld is not None and hasattr(ld, "close"):
            ld.close()  # stop prefetch threads
    rss = dist.allgather_object(_peak_rss_mb())
    fingerprint = param_fingerprint(model)
    result: dict[str, Any] = {
        "rank": rank,
        "world_size": world,
        "step": step,
        "epoch": epoch,
        "stop_reason": stop_reason or "max_steps",
        "samples": progress["samples"],
        "train_s": progress["train_s"],
        "wall_s": progress["wall_s"],
        "samples_per_s": progress["samples"] / max(progress["train_s"], 1e-9),
        "valid": final,
        "test": test,
        "tta": progress["tta"],
        "best_auc": progress["best_auc"],
        # run average of what this rank sent (sparse embedding rows included), not the last step's
        "bytes_sent_per_step": float(progress.get("bytes_sent", 0.0)) / max(int(progress.get("steps_done", 0)), 1),
        "bytes_sent_total": float(progress.get("bytes_sent", 0.0)),
        "fingerprint": fingerprint,
        "memory": {**mem, "optimizer_state_mb": _optimizer_state_mb(opt), "peak_rss_mb": max(rss)},
        "table_version": spec.versions.get("train"),
        "device": str(device),
    }
    if rank == 0:
        summary = {
            "total_train_s": progress["train_s"],
            "total_wall_s": progress["wall_s"],
            "total_samples": float(progress["samples"]),
            "avg_samples_per_s": result["samples_per_s"],
            "total_bytes_sent": result["bytes_sent_total"],  # this rank's gradient exchange, the whole run
            **{f"final_valid_{k}": v for k, v in final.items() if k != "rows"},
            # with a target: 1/0, so averages of tta_* over repeats can count the runs that missed
            # it (they log no tta_*: a mean over the others alone is biased; until the twenty-fifth session)
            **({"tta_reached": float(progress["tta"] is not None)} if t.target_auc is not None else {}),
            "mem.optimizer_state_mb": result["memory"]["optimizer_state_mb"],
            "mem.param_mb": mem["param_mb"],
            "mem.embedding_mb": mem["embedding_mb"],
            **{f"mem.peak_rss_mb_rank{r}": v for r, v in enumerate(rss)},
        }
        tracker.log(summary, step)
        tracker.flush()
        if tracker.enabled:
            tracker.log_dict(history, "history.json")
            tracker.log_plot(history)
            if job["log_model"]:
                result["model_uri"] = tracker.log_model(model, example=example, fmt=job["model_format"])
        result["history"] = history
    return result
