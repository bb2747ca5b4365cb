"""Checkpoints that ``torch.load(weights_only=True)`` can read.

One file per checkpoint, ``<dir>/step-00000100.pt``, written by rank 0 atomically
(temp file + rename), the newest ``keep`` kept. Contents - tensors, dicts, lists, ints,
floats, strings and None only::

    {
      "format": 1,
      "step": int, "epoch": int, "micro_step": int,
      "model": model.state_dict(),
      "optimizer": optimizer.state_dict(),        # the wrapped torch optimizer's
      "scheduler": scheduler.state_dict(),
      "compressor": {...} | None,                 # GradientCommunicator state when it has one
      "loaders": [loader.state_dict() per rank],
      "rng": [torch.get_rng_state() per rank],    # + "cuda_rng" when on GPU
      "progress": {"samples": int, "train_s": float, "wall_s": float, "best_auc": float, ...},
      "history": {"train": [...], "eval": [...], "target_auc": float | None},
      "stop_reason": str,                         # "" before the stop; "target_auc" keeps a resume stopped
      "window": [{"loss", "micro", "steps", "train_s", "wait_s", "bytes"} per rank],  # open log window
      "run_id": str | None, "config_hash": str,
      "data_versions": {"train": v, "valid": v, "test": v},
      "train_config": cfg.train as JSON, "seed": run.seed,   # what a resume must keep (below)
    }
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any

import torch

FORMAT = 1
_NAME = re.compile(r"step-(\d+)\.pt$")


class ResumeError(ValueError):
    """``--resume`` cannot continue this checkpoint; the message says why and what to do."""


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"step-{step:08d}.pt"


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.search(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    cps = list_checkpoints(directory)
    return cps[-1] if cps else None


def _plain(obj: Any) -> Any:
    """Coerce to what the weights_only unpickler accepts (tuples -> lists, numpy -> python)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu() if obj.device.type != "cpu" else obj.detach()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if hasattr(obj, "item") and hasattr(obj, "dtype"):  # numpy scalar
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"checkpoint value of type {type(obj).__name__} is not weights_only-safe")


def save_checkpoint(directory: str | os.PathLike, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(d, step)
    tmp = path.with_suffix(".pt.tmp")
    torch.save(_plain({"format": FORMAT, "step": step, **state}), tmp)
    os.replace(tmp, path)
    if keep > 0:
        for old in list_checkpoints(d)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike, *, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint at ``path`` (``mmap``: tensors mapped, not read), or :class:`ResumeError`
    naming the file when it cannot be read (truncated, empty, not a checkpoint) or has another
    format."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, EOFError, UnpicklingError...
        older = [p.name for p in list_checkpoints(path.parent) if p != path]
        what = f"the older {older[-1]} is then the latest" if older else "there is no older one"
        reason = "it is empty" if path.stat().st_size == 0 else f"{type(e).__name__}: {str(e).splitlines()[0]}"
        raise ResumeError(f"checkpoint {path} is damaged ({reason}); remove it to resume from an older "
                          f"checkpoint ({what}), or train without --resume") from None
    if state.get("format") != FORMAT:
        raise ResumeError(f"{path}: checkpoint format {state.get('format')!r}, expected {FORMAT}")
    return state


def checkpoint_data_versions(state: dict[str, Any]) -> dict[str, int] | None:
    """The gold versions the checkpointed run read (``{"train": v, "valid": v, "test": v}``), so a
    resume reads the same data; checkpoints from before they were saved give the train loader's
    version alone (valid and test then follow the train version's build)."""
    if isinstance(state.get("data_versions"), dict):
        return {str(k): int(v) for k, v in state["data_versions"].items()}
    loaders = state.get("loaders") or []
    version = loaders[0].get("version") if loaders and isinstance(loaders[0], dict) else None
    return None if version is None else {"train": int(version)}


# train.* settings a resume may change: they decide when the run stops, what it evaluates and
# logs, and how it is run, not the steps it computes. Every other train.* setting (model,
# optimizer, schedule, batch, ranks, data, compression...) and run.seed must match the
# checkpoint, or the resumed run would silently mix two configurations: a changed lr, say, is
# overridden by the restored scheduler while MLflow records the new config.
RESUMABLE_CHANGES = frozenset({
    "max_steps", "epochs", "eval_every", "eval_batch_size", "eval_max_rows", "target_auc", "early_stop",
    "test_at_end", "checkpoint_dir", "checkpoint_every", "keep_checkpoints", "backend", "threads_per_rank",
    "start_timeout", "stall_shutdown_s", "log_every", "fail_at_step", "prefetch",
})


def resume_conflicts(state: dict[str, Any], train: dict[str, Any], seed: int) -> list[str]:
    """Settings of ``train`` (cfg.train as JSON) and ``seed`` that differ from the checkpoint's,
    as ``"train.lr: 0.002 in the checkpoint, 0.05 now"``; [] when it may be resumed (also for
    checkpoints from before the settings were saved)."""
    saved = state.get("train_config")
    if not isinstance(saved, dict):
        return []
    if isinstance(saved.get("scheduler"), str):  # checkpoints from before the name was lower-cased
        saved = {**saved, "scheduler": saved["scheduler"].strip().lower()}
    out = [f"train.{k}: {saved.get(k)!r} in the checkpoint, {train.get(k)!r} now"
           for k in sorted(set(saved) & set(train))  # a setting added or removed since is not a change
           if k not in RESUMABLE_CHANGES and _plain(saved.get(k)) != _plain(train.get(k))]
    if saved.get("scheduler", "constant") != "constant":  # its length is the run's: a torch schedule
        # restored with its old length does not stretch to a new one (cosine climbs back up)
        out += [f"train.{k}: {saved.get(k)!r} in the checkpoint, {train.get(k)!r} now (the {saved['scheduler']} "
                "schedule's length)" for k in ("max_steps", "epochs")
                if k in saved and k in train and _plain(saved[k]) != _plain(train[k])]
    if "seed" in state and int(state["seed"]) != int(seed):
        out.append(f"run.seed: {state['seed']} in the checkpoint, {seed} now")
    return out


LOCK_NAME = ".bigopt-run.lock"


@contextlib.contextmanager
def folder_lock(directory: str | os.PathLike):
    """Hold an exclusive ``flock`` on ``<directory>/.bigopt-run.lock`` while the block runs; yields
    True, or False when another process holds it (a run training into this folder now: its driver,
    or a rank it forked, outlives nothing but a ``kill -9`` of all of them, which the kernel's
    release of the lock then tells). A folder that cannot be locked (none, read-only, a file system
    without locks) yields None: nothing is known."""
    import fcntl

    try:
        fd = os.open(Path(directory) / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        except OSError:
            yield None
            return
        yield True
    finally:
        os.close(fd)  # releases the lock


def checkpoint_run_ids(paths: list[Path]) -> dict[str, float]:
    """The MLflow run ids ``paths`` (checkpoints) record, each with the mtime of its newest
    checkpoint (seconds); a checkpoint that cannot be read is passed over."""
    out: dict[str, float] = {}
    for p in paths:
        try:
            rid = load_checkpoint(p, mmap=True).get("run_id")
            mtime = p.stat().st_mtime
        except (ResumeError, OSError):
            continue
        if isinstance(rid, str) and rid:
            out[rid] = max(out.get(rid, 0.0), mtime)
    return out
