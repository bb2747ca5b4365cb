"""Config helper for the training tests (importable as ``train_helpers``)."""
from __future__ import annotations

import functools
import shutil
from pathlib import Path


@functools.lru_cache(maxsize=1)
def _migrated_store() -> str:
    """An empty MLflow sqlite store with its schema made, once per test process: making the
    schema (MLflow's migrations) costs ~3 s per new store, copying this one ~0.1 s."""
    import atexit
    import tempfile

    import mlflow

    folder = tempfile.mkdtemp(prefix="bigopt-mlflow-template-")
    atexit.register(shutil.rmtree, folder, True)  # one per test process, not left in /tmp
    path = Path(folder) / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return str(path)


def fresh_store(tmp_path) -> tuple[str, str]:
    """A new, empty MLflow store under ``tmp_path`` (uri, artifact dir), its schema already made."""
    db = Path(tmp_path) / "mlflow.db"
    if not db.exists():
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_migrated_store(), db)
    return f"sqlite:///{db}", f"{tmp_path}/mlruns"


def train_cfg(gold: dict, tmp_path, *overrides: str, tracking=False):
    """A root config training on ``gold`` with everything written under ``tmp_path``.

    ``tracking``: False, True (a store under ``tmp_path``) or ``(uri, artifact_dir)``.
    """
    from jobs.config import load_config

    return load_config(None, train_overrides(gold, tmp_path, *overrides, tracking=tracking))


def train_overrides(gold: dict, tmp_path, *overrides: str, tracking=False) -> list[str]:
    """:func:`train_cfg`'s ``key=value`` overrides, for a ``bigopt`` command line."""
    if isinstance(tracking, tuple):
        store = tracking
    elif tracking:
        store = fresh_store(tmp_path)
    else:
        store = (f"sqlite:///{tmp_path}/mlflow.db", f"{tmp_path}/mlruns")
    return [
        f"train.train_table={gold['train']}",
        f"train.valid_table={gold['valid']}",
        f"train.test_table={gold['test']}",
        f"train.checkpoint_dir={tmp_path}/ckpt",
        "train.model=dlrm",
        "train.model_params={embedding_dim: 8, bottom_mlp: [32], top_mlp: [32]}",
        "train.optimizer=adam",
        "train.lr=0.003",
        "train.batch_size=256",
        "train.max_steps=60",
        "train.eval_every=0",
        "train.log_every=5",
        "train.threads_per_rank=1",
        "train.shuffle_buffer_rows=4096",
        f"lake.root={tmp_path}/lake",
        f"tracking.enabled={'true' if tracking else 'false'}",
        f"tracking.tracking_uri={store[0]}",
        f"tracking.artifact_location={store[1]}",
        "tracking.model_format=pickle",
        *overrides,
    ]


def interrupted_and_full(gold: dict, tmp_path, *variant: str):
    """(uninterrupted run, run stopped at step 17 of 30 then resumed from its step-10
    checkpoint) of the same config: a correct resume ends with the same parameters."""
    import pytest

    from training.api import run_training
    from training.loop import InjectedFailure

    common = ["train.max_steps=30", "train.checkpoint_every=10", "train.eval_every=15", *variant]
    full = run_training(train_cfg(gold, tmp_path / "a", *common))
    cfg_b = train_cfg(gold, tmp_path / "b", *common)
    with pytest.raises(InjectedFailure):
        run_training(cfg_b.model_copy(update={"train": cfg_b.train.model_copy(update={"fail_at_step": 17})}))
    return full, run_training(cfg_b, resume=True)


def probe_rank(job: dict, dist) -> dict:
    """A per-rank function for the launcher tests: rank, world size and a collective's result;
    raises on ``job["fail_rank"]`` after the collective. On ``job["exit_rank"]`` the process
    ends with ``job["exit_code"]``: at once (``job["exit_when"] == "now"``: no report), or after
    reporting, as a crash in Horovod's C++ teardown does (an exit handler that runs first)."""
    import atexit
    import os

    import torch

    total = dist.allreduce_mean(torch.tensor([float(dist.rank + 1)])).item() * dist.size
    if dist.rank == job.get("exit_rank"):
        if job.get("exit_when") == "now":
            os._exit(job["exit_code"])
        atexit.register(os._exit, job["exit_code"])
    if dist.rank == job.get("fail_rank"):
        raise RuntimeError(f"probe failure on rank {dist.rank}")
    return {"rank": dist.rank, "size": dist.size, "sum": total, "x": job["x"],
            "stall_env": os.environ.get("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS")}
