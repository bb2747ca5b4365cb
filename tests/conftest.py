"""Shared test fixtures: ONE SparkSession per test session, the shared real-data samples."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("BIGOPT_SPARK_UI", "0")
os.environ.setdefault("BIGOPT_DRIVER_MEMORY", "3g")
# never reach a remote MLflow server from tests
os.environ.pop("MLFLOW_TRACKING_URI", None)

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("BIGOPT_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def spark():
    from pipelines.spark import get_spark

    s = get_spark("bigopt-tests", master="local[2]", ui=False, log_level="ERROR")
    yield s
    s.stop()


def shared_dir(name: str) -> Path:
    """A folder of ../shared/data, or skip the test with the reason."""
    d = SHARED_DATA / name
    if not d.is_dir():
        pytest.skip(f"real data samples not present at {d} (see DEVELOPERS.md 'Data')")
    return d


@pytest.fixture
def criteo_shared() -> Path:
    return shared_dir("criteo")
