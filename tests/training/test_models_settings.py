"""Model hyper-parameters are checked when the model is built, so that ``check_settings`` (which
builds a tiny one before anything starts) refuses a bad one as one line, exit 2, instead of a
traceback from the ranks after the MLflow run has started."""
from __future__ import annotations

import argparse

import pytest

from train_helpers import train_cfg
from training.models import build_model


@pytest.fixture(scope="module")
def tiny_gold(tmp_path_factory):
    from training.synthetic import make_gold

    root = tmp_path_factory.mktemp("tiny_gold")
    return make_gold(root, rows={"train": 1_024, "valid": 256, "test": 256}, cardinalities=[7] * 26,
                     files_per_table=1)


def refused_before_the_run(gold, tmp_path, capsys, *overrides: str) -> str:
    """``bigopt train --local`` with ``overrides``: asserts it is one ``train settings:`` line,
    exit 2, and that no MLflow run was made; returns the line."""
    import mlflow

    from jobs.train import run as train_command
    from training.tracking import experiment_name

    cfg = train_cfg(gold, tmp_path, "run.name=bad-model-params", "train.max_steps=5", *overrides, tracking=True)
    rc = train_command(cfg, argparse.Namespace(resume=False, local=True, num_proc=None))
    err = capsys.readouterr().err
    assert rc == 2 and "bigopt train: train settings: " in err and "Traceback" not in err, err
    client = mlflow.MlflowClient(cfg.tracking.tracking_uri)
    exp = client.get_experiment_by_name(experiment_name(cfg))
    assert exp is None or not client.search_runs([exp.experiment_id])
    return err


@pytest.mark.parametrize("name", ["logreg", "dlrm", "dcnv2"])
def test_a_misspelled_dense_transform_is_refused_when_the_model_is_built(name):
    # it was stored as given and refused at the first forward pass, in every rank
    with pytest.raises(ValueError, match=r"dense_transform must be none or log1p, not 'log'"):
        build_model(name, cardinalities=[3, 3], num_dense=2, dense_transform="log")
    assert build_model(name, cardinalities=[3, 3], num_dense=2, dense_transform="log1p").dense_transform == "log1p"


def test_bigopt_train_refuses_a_misspelled_dense_transform_before_the_run(tiny_gold, tmp_path, capsys):
    err = refused_before_the_run(tiny_gold, tmp_path, capsys, "train.model_params.dense_transform=log")
    assert "dense_transform must be none or log1p, not 'log'" in err
