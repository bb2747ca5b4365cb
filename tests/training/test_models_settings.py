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


@pytest.mark.parametrize("name,hp,said", [
    # torch refused these with a RuntimeError traceback (build_model converted only TypeError)
    ("dlrm", {"embedding_dim": -1}, "embedding_dim must be a positive integer, not -1"),
    ("dlrm", {"bottom_mlp": [-3]}, "bottom_mlp must be a list of positive integers, not [-3]"),
    ("dlrm", {"top_mlp": [16, -1]}, "top_mlp must be a list of positive integers, not [16, -1]"),
    ("dcnv2", {"low_rank": -2}, "low_rank must be a positive integer, not -2"),
    ("dcnv2", {"deep_mlp": [-8]}, "deep_mlp must be a list of positive integers, not [-8]"),
    # and took these silently: no embeddings (AUC 0.5), int() truncating 4.5 to 4 while MLflow
    # recorded 4.5, no cross layer at all, no dropout, full rank
    ("dlrm", {"embedding_dim": 0}, "embedding_dim must be a positive integer, not 0"),
    ("dlrm", {"embedding_dim": 4.5}, "embedding_dim must be a positive integer, not 4.5"),
    ("dcnv2", {"embedding_dim": 4.5}, "embedding_dim must be a positive integer, not 4.5"),
    ("dlrm", {"embedding_dim": True}, "embedding_dim must be a positive integer, not True"),
    ("dlrm", {"embedding_dim": "16"}, "embedding_dim must be a positive integer, not '16'"),
    ("dlrm", {"bottom_mlp": [32.5]}, "bottom_mlp must be a list of positive integers, not [32.5]"),
    ("dlrm", {"bottom_mlp": "64,32"}, "bottom_mlp must be a list of positive integers, not '64,32'"),
    ("dcnv2", {"cross_layers": -1}, "cross_layers must be an integer >= 0, not -1"),
    ("dcnv2", {"low_rank": 0}, "low_rank must be a positive integer, not 0"),
    ("dlrm", {"dropout": -0.5}, "dropout must be a number in [0, 1), not -0.5"),
    ("dcnv2", {"dropout": 1}, "dropout must be a number in [0, 1), not 1"),
])
def test_a_size_out_of_range_is_a_value_error_naming_it(name, hp, said):
    with pytest.raises(ValueError) as ei:
        build_model(name, cardinalities=[3, 3], num_dense=2, **hp)
    assert str(ei.value) == f"model {name}: {said}"


def test_sizes_in_range_are_taken():
    import numpy as np
    import torch

    m = build_model("dlrm", cardinalities=[3, 3], num_dense=2, embedding_dim=4.0, bottom_mlp=[np.int64(8)],
                    top_mlp=[], dropout=0.5)
    assert m.emb.dim == 4 and m.bottom[0].out_features == 8
    for hp in ({"cross_layers": 0, "deep_mlp": []}, {"low_rank": 2, "deep_mlp": (8,)}, {"low_rank": None}):
        m = build_model("dcnv2", cardinalities=[3, 3], num_dense=2, embedding_dim=4, **hp)
        assert len(m.cross) == hp.get("cross_layers", 3)
        assert m(torch.rand(5, 2), torch.zeros(5, 2, dtype=torch.long)).shape == (5,)


def test_bigopt_train_refuses_a_bad_size_before_the_run(tiny_gold, tmp_path, capsys):
    for i, (overrides, said) in enumerate([
            (["train.model_params.embedding_dim=-1"], "model dlrm: embedding_dim must be a positive integer, not -1"),
            (["train.model_params.bottom_mlp=[-3]"], "model dlrm: bottom_mlp must be a list of positive integers"),
            (["train.model_params.embedding_dim=0"], "model dlrm: embedding_dim must be a positive integer, not 0"),
            (["train.model_params.embedding_dim=4.5"], "embedding_dim must be a positive integer, not 4.5"),
            (["train.model=dcnv2", "train.model_params={low_rank: -2}"], "model dcnv2: low_rank must be a positive"),
            (["train.model=dcnv2", "train.model_params={cross_layers: -1}"], "cross_layers must be an integer >= 0")]):
        err = refused_before_the_run(tiny_gold, tmp_path / str(i), capsys, *overrides)
        assert said in err, err


def test_torch_refusing_a_setting_is_a_settings_error(tiny_gold, tmp_path, monkeypatch):
    """What the models do not check themselves and torch refuses (a RuntimeError) is the same
    one line: check_settings let only ValueError, TypeError and KeyError through as such."""
    from training import models
    from training.loop import TrainSettingsError, check_settings

    def refused(*args, **kwargs):
        raise RuntimeError("Trying to create tensor with negative dimension -3: [-3, 13]")

    monkeypatch.setitem(models.MODELS, "dlrm", refused)
    with pytest.raises(TrainSettingsError, match=r"^train settings: Trying to create tensor with negative dim"):
        check_settings(train_cfg(tiny_gold, tmp_path).train, 26, 13)
