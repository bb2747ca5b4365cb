"""Shared test fixtures: ONE SparkSession per test session, the shared real-data samples, a
local S3 server for the object-store tests."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("BIGOPT_SPARK_UI", "0")
os.environ.setdefault("BIGOPT_DRIVER_MEMORY", "3g")
# never reach a remote MLflow server from tests
os.environ.pop("MLFLOW_TRACKING_URI", None)
# Commands print as to a log (jobs/console.py), whatever the terminal: a COLUMNS exported by the
# shell, or the COLUMNS=80 pytest-xdist gives its workers, would re-wrap the tables tests read.
for _v in ("COLUMNS", "LINES"):
    os.environ.pop(_v, None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Object stores: every s3:// access in the test session goes to a local server on 127.0.0.1
# (the `s3` fixture starts it), never to AWS. The endpoint is fixed here, before any Spark
# session exists, because Spark's Python workers inherit the driver's environment at start.
S3_ENDPOINT = f"http://127.0.0.1:{_free_port()}"
os.environ.update(
    AWS_ENDPOINT_URL=S3_ENDPOINT, AWS_ALLOW_HTTP="true", AWS_ACCESS_KEY_ID="bigopt-test",
    AWS_SECRET_ACCESS_KEY="bigopt-test", AWS_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
)
for _v in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_v, None)

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
        pytest.skip(f"real data samples not present at {d} (the samples in ../shared/data beside the checkout: README, 'Development')")
    return d


@contextmanager
def _spark_forbidden(what: str):
    import pipelines.spark

    def no_spark(*a, **k):
        raise AssertionError(f"{what} started Spark")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipelines.spark, "spark_from_config", no_spark)
        yield


@pytest.fixture
def spark_forbidden():
    """``with spark_forbidden("what it is"):`` a ``bigopt`` command run in the block that starts
    its SparkSession (``pipelines.spark.spark_from_config``) fails the test."""
    return _spark_forbidden


def _delta_rs_os_error(*causes: str) -> OSError:
    lines = ["Generic LocalFileSystem error"] + [f"{' ' * (10 + i)}\x1b[31m↳\x1b[0m {c}" for i, c in enumerate(causes)]
    return OSError("\n".join(lines))


@pytest.fixture
def delta_rs_os_error():
    """``delta_rs_os_error("Unable to walk dir", "Permission denied (os error 13)")``: an
    ``OSError`` as delta-rs raises it for a local filesystem error, each cause on a line of its
    own after a red ``↳``. Tests raise it where a permission error is meant: the tests run as
    root, whom chmod does not stop."""
    return _delta_rs_os_error


@pytest.fixture
def criteo_shared() -> Path:
    return shared_dir("criteo")


@dataclass
class S3Server:
    """A moto S3 server on 127.0.0.1 (the endpoint every s3:// URI of the session resolves to)."""

    endpoint: str
    pid: int

    def filesystem(self):
        import pyarrow.fs as pafs

        host = self.endpoint.split("://", 1)[1]
        return pafs.S3FileSystem(endpoint_override=host, scheme="http", access_key="bigopt-test",
                                 secret_key="bigopt-test", region="us-east-1", allow_bucket_creation=True)

    @property
    def storage_options(self) -> dict[str, str]:
        """The server's credentials as explicit storage options (delta-rs and filesystem_for)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "bigopt-test",
                "AWS_SECRET_ACCESS_KEY": "bigopt-test", "AWS_REGION": "us-east-1"}

    def bucket(self, name: str) -> str:
        """Create bucket ``name`` (if new); its ``s3://`` URI."""
        self.filesystem().create_dir(name)
        return f"s3://{name}"

    def upload(self, local: Path, uri: str) -> str:
        """Copy a local file to ``uri`` (``s3://bucket/key``)."""
        # compression=None: by default pyarrow gzips a stream whose name ends in .gz
        with self.filesystem().open_output_stream(uri.split("://", 1)[1], compression=None) as out:
            out.write(Path(local).read_bytes())
        return uri


@pytest.fixture(scope="session")
def s3():
    """Start moto's S3 server (a subprocess, stopped by its PID at the end of the session).
    Not in-process: delta-rs holds the GIL while it waits on a request, so a server thread in
    the test process would never answer it."""
    pytest.importorskip("moto", reason="moto (requirements.lock) provides the local S3 server")
    port = S3_ENDPOINT.rsplit(":", 1)[1]
    log = tempfile.TemporaryFile()  # the server logs every request: a pipe nobody reads would fill
    proc = subprocess.Popen(
        [sys.executable, "-c", f"from moto.server import main; main(['-H', '127.0.0.1', '-p', '{port}'])"],
        stdout=subprocess.DEVNULL, stderr=log,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", int(port)), timeout=1):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                log.seek(0)
                err = log.read().decode(errors="replace")[-2000:]
                pytest.fail(f"the moto S3 server did not start on {S3_ENDPOINT}: {err}")
            time.sleep(0.1)
    try:
        yield S3Server(S3_ENDPOINT, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
