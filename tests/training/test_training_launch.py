"""training.launch.run_local: N local Horovod ranks (horovod.runner.run, gloo) without Spark."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from train_helpers import probe_rank
from training.launch import RankFailure, launch, run_local

pytestmark = pytest.mark.horovod

HELPERS = Path(__file__).resolve().parents[1]  # tests/: train_helpers.py


@pytest.fixture
def helpers_importable(monkeypatch):
    """The ranks import ``probe_rank`` by module name: put its folder on their PYTHONPATH."""
    pytest.importorskip("horovod.torch")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(HELPERS), os.environ.get("PYTHONPATH")])))


def test_run_local_runs_every_rank_and_returns_results_in_rank_order(helpers_importable):
    before = os.environ.get("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS")
    res = run_local(probe_rank, {"x": 7}, num_proc=2, stall_shutdown_s=77)
    assert [r["rank"] for r in res] == [0, 1] and {r["size"] for r in res} == {2}
    assert [r["sum"] for r in res] == [3.0, 3.0]  # a real allreduce across the two processes: 1 + 2
    assert {r["x"] for r in res} == {7} and {r["stall_env"] for r in res} == {"77"}
    assert os.environ.get("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS") == before  # the driver's env is restored


def test_run_local_names_the_failing_rank(helpers_importable):
    with pytest.raises(RankFailure) as ei:
        launch(probe_rank, {"x": 1, "fail_rank": 1}, num_proc=2, backend="runner")
    assert ei.value.rank == 1
    assert "probe failure on rank 1" in ei.value.error and "probe_rank" in ei.value.rank_traceback
