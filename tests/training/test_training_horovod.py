"""Horovod-on-Spark (gloo, 2 ranks on local[2]) runs of the real per-rank loop."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from train_helpers import train_cfg
from training.api import run_training
from training.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint
from training.launch import RankFailure

pytestmark = [pytest.mark.spark, pytest.mark.horovod]

COMMON = ("train.max_steps=60", "train.lr=0.01", "train.log_every=5", "train.eval_every=30")


@pytest.fixture(scope="module")
def runs(spark, synth_gold, tmp_path_factory):
    """The same config (global batch 256) on 2 Horovod ranks and in-process on 1."""
    tmp = tmp_path_factory.mktemp("hvd")
    two = run_training(train_cfg(synth_gold, tmp / "two", *COMMON, "train.num_proc=2"), spark=spark)
    one = run_training(train_cfg(synth_gold, tmp / "one", *COMMON, "train.num_proc=1"), spark=spark)
    return one, two


def test_two_ranks_learn_and_end_identical(runs):
    _, two = runs
    assert [r["rank"] for r in two.ranks] == [0, 1] and two.rank0["world_size"] == 2
    assert two.valid["auc"] > 0.68, two.valid  # learnable synthetic label: clearly above 0.5
    assert two.valid["rows"] == 4000  # exact AUC over the whole split, gathered from both ranks
    assert two.ranks[0]["fingerprint"] == two.ranks[1]["fingerprint"]
    assert two.ranks[0]["valid"] == two.ranks[1]["valid"]
    assert two.rank0["step"] == two.ranks[1]["step"] == 60 and two.rank0["samples"] == 60 * 256


def test_sophia_on_two_ranks_keeps_one_hessian(spark, synth_gold, tmp_path):
    """Sophia's Hessian estimate (each rank's own micro-batch and sampled labels) is averaged
    over the ranks, so both end with the same parameters, and it learns."""
    cfg = train_cfg(synth_gold, tmp_path, "train.max_steps=24", "train.eval_every=24", "train.num_proc=2",
                    "train.optimizer=sophia", "train.lr=0.01", "train.weight_decay=0",
                    "train.optimizer_params={update_interval: 10}")
    two = run_training(cfg, spark=spark)
    assert two.ranks[0]["fingerprint"] == two.ranks[1]["fingerprint"]
    assert two.valid["auc"] > 0.6, two.valid


def test_more_ranks_than_local_task_slots_is_one_settings_error(spark, synth_gold, tmp_path):
    """On local[2] four ranks can never all run: a settings error at once, before MLflow opens
    a run or the old checkpoints go. Until the nineteenth session it warned, waited
    start_timeout (180 s), then failed with Spark's stack traces."""
    import mlflow

    from training.launch import local_task_slots
    from training.loop import TrainSettingsError

    assert [local_task_slots(m) for m in ("local", "local[2]", "local[3, 2]", "local-cluster[2,3,1024]",
                                          "yarn", "spark://h:7077")] == [1, 2, 3, 6, None, None]
    assert local_task_slots("local[*]") == os.cpu_count()
    cfg = train_cfg(synth_gold, tmp_path, "train.max_steps=4", "train.num_proc=4", tracking=True)
    with pytest.raises(TrainSettingsError, match=r"train.num_proc=4 ranks need 4 Spark tasks running at once, "
                                                 r"but spark.master=local\[2\] runs 2 at a time"):
        run_training(cfg, spark=spark)
    assert not mlflow.MlflowClient(cfg.tracking.tracking_uri).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(cfg.tracking.tracking_uri).search_experiments()])


def test_one_and_two_ranks_agree_on_the_loss_trajectory(runs):
    one, two = runs
    l1 = np.array([h["loss"] for h in one.rank0["history"]["train"]])
    l2 = np.array([h["loss"] for h in two.rank0["history"]["train"]])
    assert len(l1) == len(l2) == 12
    # same global batch and schedule; only the row order differs (different sharding)
    assert np.abs(l1 - l2).mean() < 0.03, (l1, l2)
    assert abs(l1[-3:].mean() - l2[-3:].mean()) < 0.03
    assert abs(one.valid["auc"] - two.valid["auc"]) < 0.03


def test_rank_error_surfaces_then_resume_matches_uninterrupted(runs, spark, synth_gold, tmp_path):
    """Rank 1 fails at step 25 (checkpoint at 20): the driver gets rank 1's traceback; --resume on
    2 ranks then ends bit-identical to the uninterrupted 2-rank run of the fixture."""
    _, two = runs
    cfg = train_cfg(synth_gold, tmp_path, *COMMON, "train.num_proc=2", "train.checkpoint_every=20")
    failing = cfg.model_copy(update={"train": cfg.train.model_copy(update={"fail_at_step": 25})})
    with pytest.raises(RankFailure) as ei:
        run_training(failing, spark=spark)
    e = ei.value
    assert e.rank == 1  # the failing rank, not the peer whose collective was aborted
    assert "InjectedFailure" in e.error and "train_rank" in e.rank_traceback and "loop.py" in e.rank_traceback
    resumed = run_training(cfg, spark=spark, resume=True)
    assert [r["step"] for r in resumed.ranks] == [60, 60]
    assert {r["fingerprint"] for r in resumed.ranks} == {two.rank0["fingerprint"]}
    assert resumed.valid["auc"] == two.valid["auc"]


def test_compressed_resume_restores_each_ranks_error_feedback(spark, synth_gold, tmp_path):
    """PowerSGD with its default embedding policy (top-k 1 % + error feedback on the table, the
    Adam run's gradients are dense): each rank's residuals differ, and the checkpoint keeps all of
    them. Resuming a copy of the step-20 checkpoint of a 40-step run, each rank restoring its own
    state, ends bit-identical to that run; restoring rank 0's residuals on both would not."""
    common = ("train.max_steps=40", "train.checkpoint_every=20", "train.num_proc=2",
              "train.compression.name=powersgd", "train.compression.params={rank: 2}")
    full = run_training(train_cfg(synth_gold, tmp_path / "full", *common), spark=spark)
    assert [p.name for p in list_checkpoints(full.checkpoint_dir)] == ["step-00000020.pt", "step-00000040.pt"]
    ck20 = checkpoint_path(full.checkpoint_dir, 20)
    per_rank = load_checkpoint(ck20)["compressor"]
    assert len(per_rank) == 2
    res0, res1 = (s["memory"]["emb.table.weight"] for s in per_rank)  # the table went through top-k + EF
    assert res0.abs().sum() > 0 and not torch.equal(res0, res1)
    # the loop built the hybrid from the config: far below the dense gradient's bytes
    dense = 4 * full.rank0["memory"]["params_total"]
    assert full.rank0["bytes_sent_per_step"] < dense / 10

    cfg = train_cfg(synth_gold, tmp_path / "resumed", *common)
    (tmp_path / "resumed" / "ckpt").mkdir(parents=True)
    shutil.copy(ck20, tmp_path / "resumed" / "ckpt" / ck20.name)
    resumed = run_training(cfg, spark=spark, resume=True)
    assert [r["step"] for r in resumed.ranks] == [40, 40]
    assert {r["fingerprint"] for r in resumed.ranks} == {full.rank0["fingerprint"]}
    assert resumed.valid["auc"] == full.valid["auc"]


def test_none_with_sparse_as_dense_allreduces_the_tables_dense(spark, synth_gold, tmp_path):
    """compression.name=none with sparse embedding gradients (adagrad) and sparse_as_dense:
    hvd.DistributedOptimizer densifies and allreduces them, both ranks end identical, the run
    learns, and bytes_sent_per_step is the whole model's gradient (a dense exchange)."""
    cfg = train_cfg(synth_gold, tmp_path, "train.max_steps=20", "train.eval_every=20", "train.num_proc=2",
                    "train.optimizer=adagrad", "train.lr=0.01", "train.compression.sparse_as_dense=true")
    two = run_training(cfg, spark=spark)
    assert two.ranks[0]["fingerprint"] == two.ranks[1]["fingerprint"]
    assert two.valid["auc"] > 0.6, two.valid
    assert [r["bytes_sent_per_step"] for r in two.ranks] == [4.0 * two.rank0["memory"]["params_total"]] * 2
