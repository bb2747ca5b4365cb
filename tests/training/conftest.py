"""Fixtures of the training tests: small gold-shaped Delta tables and configs around them."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def synth_gold(tmp_path_factory):
    """train 16k / valid 4k / test 4k rows, array layout, 4 files per table, learnable label."""
    from training.synthetic import make_gold

    root = tmp_path_factory.mktemp("synth_gold")
    return make_gold(root, rows={"train": 16_000, "valid": 4_000, "test": 4_000}, files_per_table=4, seed=1)


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory):
    """One sqlite store for the session (creating the schema costs seconds): (uri, artifacts)."""
    d = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{d}/mlflow.db", str(d / "mlruns")
