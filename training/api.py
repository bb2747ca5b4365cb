"""Driver side of a training job: resolve data, open the MLflow run, launch ranks, summarise.

    from training.api import run_training
    res = run_training(cfg, spark=spark)          # cfg from jobs.config.load_config
    res.valid["auc"], res.run_id, res.samples_per_s
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.checkpoint import (
    ResumeError,
    checkpoint_data_versions,
    checkpoint_run_ids,
    folder_lock,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resume_conflicts,
)
from training.dataspec import DataSpec, resolve_data
from training.launch import launch
from training.loop import (
    TrainSettingsError,
    check_settings,
    make_job,
    run_steps,
    total_steps_of,
    train_rank,
    unused_settings,
)
from training.tracking import (
    check_artifact_location,
    check_store,
    end_run,
    experiment_name,
    failed_on_error,
    kill_abandoned_run,
    library_versions,
    repeat_group,
    source_tags,
    start_run,
    tracking_uri,
    ui_command,
)

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    ranks: list[dict[str, Any]]
    spec: DataSpec
    run_id: str | None = None
    tracking_uri: str | None = None
    experiment: str | None = None
    checkpoint_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rank0(self) -> dict[str, Any]:
        return self.ranks[0]

    @property
    def valid(self) -> dict[str, float]:
        return self.rank0.get("valid") or {}

    @property
    def test(self) -> dict[str, float]:
        return self.rank0.get("test") or {}

    @property
    def samples_per_s(self) -> float:
        return float(self.rank0["samples_per_s"])

    @property
    def tta(self) -> dict[str, float] | None:
        return self.rank0.get("tta")

    @property
    def ui(self) -> str | None:
        return ui_command(self.tracking_uri) if self.tracking_uri else None


def checkpoint_dir_for(cfg) -> str:
    return str(Path(cfg.train.checkpoint_dir.format(run=cfg.run.name)).expanduser().resolve())


def check_checkpoint_dir(cfg) -> None:
    """When the run writes checkpoints (``train.checkpoint_every``), make their folder and try
    a write there, on the driver, before Spark and MLflow start: an uncreatable or unwritable
    ``train.checkpoint_dir`` failed only at the first checkpoint, after training, in every
    rank's traceback (until the twenty-eighth session). Checkpoints are local files (a
    cluster's rank 0 writes the same path on its executor). Raises TrainSettingsError."""
    from pipelines.lake.fs import check_writable

    if not cfg.train.checkpoint_every:
        return
    try:
        check_writable(checkpoint_dir_for(cfg))  # makes the folder; its probe is no step-*.pt
    except PermissionError as e:
        raise TrainSettingsError(f"train.checkpoint_dir={cfg.train.checkpoint_dir!r}: {e}; set it to a folder this "
                                 "user may write") from None


def check_destinations(cfg) -> None:
    """Where the run will write, checked before anything runs: the tracking store (reachable,
    writable) and a new experiment's artifact folder when tracking is on, and the checkpoint
    folder. Raises TrackingStoreError or TrainSettingsError, each one line."""
    if cfg.tracking.enabled:  # an unreachable store is one line, not minutes of retries
        check_store(tracking_uri(cfg.tracking))
        check_artifact_location(cfg)
    check_checkpoint_dir(cfg)


def run_training(cfg, *, spark=None, resume: bool = False, local: bool = False,
                 store_checked: bool = False) -> TrainResult:
    """Train per ``cfg.train``; returns every rank's result (rank 0 first). ``spark``: a
    SparkSession or a callable that starts one (:func:`pipelines.spark.session_of`), used only
    when the ranks run on Horovod-on-Spark; None: the session ``cfg.spark`` describes.
    ``store_checked``: the caller already ran :func:`check_destinations` (``bigopt run``, before
    ingest)."""
    from jobs.config import config_dict, config_hash, flatten

    if local and cfg.train.num_proc != 1:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"num_proc": 1})})
    if not store_checked:
        check_destinations(cfg)
    t = cfg.train
    ckpt_dir = checkpoint_dir_for(cfg)
    run_id = None
    data_versions = None  # a resumed run reads the data versions it started with
    if resume:
        last = latest_checkpoint(ckpt_dir)
        if last is None:
            log.warning("--resume: no checkpoint in %s, starting from scratch", ckpt_dir)
            resume = False
        else:  # every refusal comes before the MLflow run is reopened (it stays as it was)
            head = load_checkpoint(last, mmap=True)
            conflicts = resume_conflicts(head, cfg.train.model_dump(mode="json"), cfg.run.seed)
            if conflicts:
                raise ResumeError(f"cannot resume {last} with changed settings: " + "; ".join(conflicts)
                                  + ". Resume with the checkpoint's settings (only when to stop, evaluate, log "
                                  "and checkpoint may change), or train without --resume")
            run_id = head.get("run_id")
            data_versions = checkpoint_data_versions(head)
            log.info("resuming from %s (step %s, MLflow run %s, data versions %s)", last, head.get("step"), run_id,
                     data_versions)

    spec = resolve_data(cfg, versions=data_versions)
    # the ranks' own step count, from the table's metadata: a table too small for one step and a
    # schedule longer than the epochs allow are said here, before the ranks and the MLflow run
    try:
        steps_per_epoch = run_steps(t, spec)
    except TrainSettingsError as e:
        from training.launch import local_task_slots

        slots = local_task_slots(cfg.spark.master or "") if t.num_proc > 1 and t.backend == "horovod" else None
        if slots is None or t.num_proc <= slots:
            raise
        # the data is judged first (no Spark yet), but here the ranks could not all run either:
        # the remedy that answers both is fewer ranks, which the task-slot check would have said
        raise TrainSettingsError(f"{e}. Also, spark.master={cfg.spark.master} runs {slots} Spark task(s) at a time, "
                                 f"fewer than train.num_proc={t.num_proc}: lower train.num_proc (--num-proc) to "
                                 f"{slots} or less") from None
    check_settings(t, len(spec.cardinalities), spec.num_dense, steps_per_epoch=steps_per_epoch)
    for unused in unused_settings(t):
        log.warning("%s", unused)
    if data_versions and "train" in data_versions and spec.versions.get("train") != data_versions["train"]:
        # resolve_data reads a compacted-and-vacuumed pinned version at the latest one, whose
        # rows are the same but whose files, and so the loaders' positions, are not
        raise ResumeError(
            f"cannot resume {last}: its data position is in gold train v{data_versions['train']}, whose files were "
            f"compacted and vacuumed since (the same rows are at v{spec.versions.get('train')}, in other files, "
            "where that position means other rows). Train without --resume, or keep checkpointed runs' versions "
            "out of vacuum (`bigopt lake --action vacuum` keeps 7 days by default)")
    if t.num_proc > 1 and t.backend == "horovod":  # Spark before MLflow: too few task slots is one line
        from pipelines.spark import session_of, spark_from_config
        from training.launch import check_task_slots

        spark = spark_from_config(cfg.spark) if spark is None else session_of(spark)
        check_task_slots(spark.sparkContext, t.num_proc)
    chash = config_hash(cfg)
    uri = None
    if cfg.tracking.enabled:
        params: dict[str, Any] = dict(flatten(config_dict(cfg)))
        params.update({
            "data.train_table": spec.train,
            "data.valid_table": spec.valid,
            "data.test_table": spec.test,
            "data.vocabulary": spec.vocabulary,
            "data.num_dense": spec.num_dense,
            "data.num_sparse": len(spec.cardinalities),
            "data.embedding_rows": sum(spec.cardinalities),
            "data.train_rows": spec.train_rows,
            "world_size_requested": t.num_proc,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps_of(t, steps_per_epoch),  # a resume may change it (max_steps, epochs)
            "config_hash": chash,
            "repeat_group": repeat_group(t, spec),  # the same for repeats that differ only in seed, name...
            **{f"data.{k}_version": v for k, v in spec.versions.items()},
            **{f"data.{k}_version_requested": v for k, v in spec.requested.items()},  # read at another (compacted)
            **{f"data.{k}_table_id": v for k, v in spec.table_ids.items()},
            **{f"data.gold.{k}": v for k, v in spec.gold.items()},  # what built the gold read (its commit)
            **{f"lib.{k}": v for k, v in library_versions().items()},
        })
        tags = {"bigopt.model": t.model, "bigopt.optimizer": t.optimizer, "bigopt.config_hash": chash,
                "bigopt.compression": t.compression.name, "bigopt.repeat_group": params["repeat_group"]}
        tags.update(source_tags(params))  # what the MLflow UI shows as the run's code
        uri, run_id = start_run(cfg, params, tags, run_id=run_id if resume else None,
                                resume_step=head.get("step") if resume else None)
        log.info("MLflow run %s (%s)", run_id, uri)

    # from here on the MLflow run is open: whatever stops the command ends it (KILLED or FAILED).
    # The checkpoint folder is locked until the run is ended (see abandoned_runs)
    with folder_lock(ckpt_dir) if Path(ckpt_dir).is_dir() else contextlib.nullcontext(None) as locked:
        with failed_on_error(uri, run_id) if uri and run_id else contextlib.nullcontext():
            if not resume and (old := list_checkpoints(ckpt_dir)):  # once the settings, data and run are known
                # good: a refused command (a bad setting, an unreachable tracking store) must not
                # destroy the checkpoints an earlier run could be resumed from
                abandoned = abandoned_runs(old, uri, run_id, locked, ckpt_dir)
                log.info("fresh run: removing %d old checkpoints in %s", len(old), ckpt_dir)
                for p in old:
                    p.unlink(missing_ok=True)
                for rid in abandoned:
                    log.warning("MLflow run %s was left RUNNING by a run that died (its checkpoints in %s were "
                                "removed); marked KILLED", rid, ckpt_dir)
            job = make_job(cfg, spec, checkpoint_dir=ckpt_dir, resume=resume, tracking_uri=uri, run_id=run_id,
                           config_hash=chash)
            kw: dict[str, Any] = {}
            backend = t.backend
            if t.num_proc > 1 and backend == "horovod":
                kw = {"spark": spark, "start_timeout": t.start_timeout, "stall_shutdown_s": t.stall_shutdown_s,
                      "check_slots": False}
            ranks = launch(train_rank, job, num_proc=t.num_proc, backend=backend, **kw)
        if uri and run_id:
            end_run(uri, run_id, "FINISHED")
    return TrainResult(ranks=ranks, spec=spec, run_id=run_id, tracking_uri=uri,
                       experiment=experiment_name(cfg) if uri else None, checkpoint_dir=ckpt_dir,
                       extra={"model": f"{t.model} / {t.optimizer} (compression {t.compression.name})"})


def abandoned_runs(old: list[Path], uri: str | None, run_id: str | None, locked: bool | None,
                   ckpt_dir: str) -> list[str]:
    """The MLflow runs that ``old`` (the checkpoints a fresh run is about to remove) record and
    that the store at ``uri`` still has RUNNING, now marked KILLED: a driver killed by ``kill -9``,
    the OOM killer or a power loss ended nothing, and its run showed RUNNING forever. Only when
    this run holds the checkpoint folder's lock (``locked``), which every run holds while it
    trains there and the kernel releases when its processes die: a run still training there is
    left as it is, and said."""
    if not uri:
        return []
    ids = {k: v for k, v in checkpoint_run_ids(old).items() if k != run_id}
    if not ids:
        return []
    if not locked:
        log.warning("%s: %s; MLflow run(s) %s of its checkpoints are left as they are",
                    ckpt_dir, "another bigopt run is training in this folder now" if locked is False else
                    "this folder cannot be locked, so whether a run still trains there is not known",
                    ", ".join(ids))
        return []
    return [rid for rid, seen in ids.items() if kill_abandoned_run(uri, rid, seen)]


def summary_rows(res: TrainResult) -> list[tuple[str, str]]:
    """(name, value) rows of the summary table printed by ``bigopt train`` / ``bigopt run``."""
    r = res.rank0

    def f(v, fmt="{:.4f}"):
        return "-" if v is None or v != v else fmt.format(v)

    rows = [
        ("model / optimizer", f"{res.extra.get('model', '')}"),
        ("ranks x device", f"{r['world_size']} x {r['device']}"),
        ("steps (stop)", f"{r['step']} ({r['stop_reason']})"),
        ("samples", f"{r['samples']:,}"),
        ("train seconds", f(r["train_s"], "{:.1f}")),
        ("samples/s", f(r["samples_per_s"], "{:,.0f}")),
        ("valid AUC", f(res.valid.get("auc"))),
        ("valid logloss", f(res.valid.get("logloss"))),
        ("valid accuracy", f(res.valid.get("accuracy"))),
    ]
    if res.test:
        rows += [("test AUC", f(res.test.get("auc"))), ("test logloss", f(res.test.get("logloss"))),
                 ("test rows", f"{int(res.test.get('rows', 0)):,}")]
    tta = res.tta
    target = (r.get("history") or {}).get("target_auc")
    rows.append((f"time to AUC {target}" if target is not None else "time to target AUC",  # 0 is a target
                 "no train.target_auc set" if target is None else "not reached" if not tta else
                 f"{tta['tta_wall_s']:.1f} s wall / {int(tta['tta_samples']):,} samples"))
    rows.append(("bytes sent / step", f"{r['bytes_sent_per_step']:,.0f}"))
    mem = r.get("memory", {})
    rows.append(("memory / rank", f"params {mem.get('param_mb', 0):.1f} MB (embeddings {mem.get('embedding_mb', 0):.1f}),"
                 f" optimizer {mem.get('optimizer_state_mb', 0):.1f} MB, peak RSS {mem.get('peak_rss_mb', 0):.0f} MB"))
    rows.append(("train table version", str(res.spec.versions.get("train"))))
    if res.run_id:
        rows.append(("MLflow run", f"{res.run_id} (experiment {res.experiment})"))
        rows.append(("open the UI", res.ui or ""))
    return rows


def print_summary(res: TrainResult, title: str = "bigopt train") -> None:
    from rich.table import Table

    from jobs.console import make_console

    table = Table(title=title, show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for k, v in summary_rows(res):
        table.add_row(k, v)
    console = make_console()
    console.print(table)
    if res.ui:
        print(f"MLflow UI: {res.ui}")  # plain line: copy-pasteable, not wrapped by the table
