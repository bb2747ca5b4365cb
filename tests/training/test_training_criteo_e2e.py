"""The whole first slice on the real Criteo samples: raw -> bronze -> gold -> train -> test -> MLflow.

Two of the shared Kaggle sample files (1,900 labelled rows) keep it short: Spark ingest and
featurize dominate the time. Training runs in-process here; the 2-rank Horovod-on-Spark path
(same SparkSession fixture) is covered by test_training_horovod.py.
"""
from __future__ import annotations

import argparse
import importlib.util

import pytest

pytestmark = [pytest.mark.spark, pytest.mark.slow]

if importlib.util.find_spec("pipelines.criteo.featurize") is None:  # before the Spark fixture starts
    pytest.skip("pipelines.criteo.featurize not written yet", allow_module_level=True)


def test_run_command_on_shared_criteo(spark, criteo_shared, tmp_path, mlflow_store, capsys, spark_forbidden):
    from mlflow import MlflowClient

    from jobs import run as job
    from jobs.config import load_config

    cfg = load_config(None, [
        f"criteo.inputs=[{criteo_shared / 'kaggle_dac_train_head1000_trailing_tabs_stripped.txt'}, "
        f"{criteo_shared / 'kaggle_dac_train_head900.txt'}]",
        "criteo.ingest.verify=false",
        f"criteo.raw_dir={tmp_path}/raw",
        f"lake.root={tmp_path}/lake",
        "criteo.featurize.row_group_rows=1024",  # several row groups: both ranks get a shard
        f"train.checkpoint_dir={tmp_path}/ckpt",
        "train.model=dlrm",
        "train.model_params={embedding_dim: 8, bottom_mlp: [16], top_mlp: [16]}",
        "train.batch_size=128",
        "train.num_proc=1",
        "train.epochs=2",
        "train.max_steps=1000",
        "train.eval_every=0",
        "train.log_every=2",
        f"tracking.tracking_uri={mlflow_store[0]}",
        f"tracking.artifact_location={mlflow_store[1]}",
        "tracking.experiment=criteo-e2e",
        "tracking.model_format=pickle",
    ])
    parser = argparse.ArgumentParser()
    job.add_arguments(parser)  # the command's own flags and defaults
    args = parser.parse_args(["--no-generate"])
    assert job.run(cfg, args) == 0
    out = capsys.readouterr().out
    assert "test AUC" in out and "mlflow ui --backend-store-uri" in out
    client = MlflowClient(tracking_uri=mlflow_store[0])
    exp = client.get_experiment_by_name("criteo-e2e")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["world_size"] == "1" and "data.train_version" in run.data.params
    assert run.data.params["data.vocabulary"].endswith("features.json")  # embeddings sized from the vocabulary
    m = run.data.metrics
    assert 0.0 <= m["test_auc"] <= 1.0 and 0.0 < m["test_logloss"]
    assert "final_valid_auc" in m and "train_loss" in m

    # again, with ingest and featurize up to date and one in-process rank: Spark is not started
    with spark_forbidden("bigopt run with nothing to ingest or featurize"):
        assert job.run(cfg, args) == 0
    out = capsys.readouterr().out
    assert "0 file(s) ingested, 2 skipped" in out and "up to date" in out and "test AUC" in out
    assert len(client.search_runs([exp.experiment_id])) == 2


def test_run_command_stops_clearly_on_a_bad_input(tmp_path, capsys, spark_forbidden):
    """A raw file ingest cannot read stops ``bigopt run`` with the step's own message (file,
    reason, fix) and exit code 1, not a traceback; here found before Spark is needed."""
    from jobs import run as job
    from jobs.config import load_config

    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "day_0.gz").write_bytes(b"not gzip at all\n")
    cfg = load_config(None, [f"criteo.raw_dir={tmp_path}/raw", f"lake.root={tmp_path}/lake"])
    parser = argparse.ArgumentParser()
    job.add_arguments(parser)
    with spark_forbidden("bigopt run on an input it cannot read"):
        assert job.run(cfg, parser.parse_args(["--no-generate"])) == 1
    out = capsys.readouterr().out
    assert "bigopt run: 1 input file(s) cannot be ingested, nothing was committed" in out
    assert "day_0.gz: named .gz but not gzip content" in out
