"""Horovod-on-Spark (gloo, 2 ranks on local[2]) runs of the real per-rank loop."""
from __future__ import annotations

import numpy as np
import pytest

from train_helpers import train_cfg
from training.api import run_training
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
