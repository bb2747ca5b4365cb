"""MLflow tracking: one experiment per dataset, one run per training job, rank 0 logs.

Layout of a run::

    params     the resolved config flattened (train.lr, criteo.days, ...), data.train_version,
               data.valid_version, data.vocabulary, world_size, micro_batch_size, lib.<name>
               versions, model.params_total / embedding_mb (memory per rank)
    metrics    per logging window (step = optimizer step): train_loss, lr, samples_per_s,
               step_time_s, bytes_sent_per_step, comm/* (compression) ...
               per evaluation: valid_auc, valid_logloss, valid_accuracy
               once: tta_wall_s, tta_train_s, tta_samples, tta_step, tta_bytes_sent (valid AUC >= target)
               at the end: final_valid_*, test_* (``train.test_at_end``), total_train_s,
               total_bytes_sent, tta_reached (with a target)
    artifacts  plots/loss_auc_vs_time.png, history.json, and the model (``mlflow.pytorch``)

Where: ``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``
with artifacts in ``<cwd>/mlruns``; ``mlflow ui --backend-store-uri <uri> --host 127.0.0.1``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_PARAM_MAX = 6000  # MLflow's param value limit


def tracking_uri(tcfg) -> str:
    if tcfg.tracking_uri:
        return tcfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def artifact_location(tcfg) -> str:
    if tcfg.artifact_location:
        return tcfg.artifact_location
    return (Path.cwd().resolve() / "mlruns").as_uri()


def experiment_name(cfg) -> str:
    return cfg.tracking.experiment or f"bigopt-{cfg.run.dataset}"


def ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


class TrackingStoreError(Exception):
    """The tracking store cannot be opened or reached, or MLflow refused to start the run there:
    one line (exit 2), said before a checkpoint is removed or, in `bigopt run`, ingest starts."""


_CHECK_TIMEOUT_S = 10  # one request / connection attempt, no retries


def check_store(uri: str, timeout_s: float = _CHECK_TIMEOUT_S) -> None:
    """A cheap check that MLflow can use the store at ``uri``, so that an unreachable one is one
    line up front and not minutes of MLflow's retries and a traceback (its sqlite engine retries
    for ~110 s, its REST client ~260 s): a sqlite database is opened (created, with its folder,
    as MLflow would) and a write lock tried; another database gets one connection attempt; an
    http(s) server one request (``GET /api/2.0/mlflow/experiments/search``) without retries.
    Raises :class:`TrackingStoreError`."""
    from urllib.parse import urlparse

    scheme = urlparse(uri).scheme.lower()
    if scheme == "sqlite":
        _check_sqlite(uri, timeout_s)
    elif scheme.split("+")[0] in ("postgresql", "mysql", "mssql"):
        _check_database(uri, scheme.split("+")[0], timeout_s)
    elif scheme in ("http", "https"):
        _check_http(uri, timeout_s)
    else:  # databricks, a plugin's scheme: only whether MLflow has a store for it
        try:
            from mlflow.exceptions import MlflowException
            from mlflow.tracking._tracking_service.utils import _tracking_store_registry
        except ImportError:  # pragma: no cover - MLflow moved it: leave the check to MLflow
            return
        try:
            _tracking_store_registry.get_store_builder(uri)
        except MlflowException:
            raise TrackingStoreError(f"MLflow has no tracking store for {uri!r} (scheme {scheme!r}): use sqlite:///"
                                     "<path>.db, postgresql://..., http(s)://<server> or databricks") from None


def check_artifact_location(cfg) -> None:
    """The run's artifacts go to its experiment's folder: for a new experiment
    ``tracking.artifact_location`` (unset: ``<cwd>/mlruns``), for an existing one the location
    it was created with. Where that is a local folder, make it and try a write there now, as the
    store is checked. Until the twenty-eighth session one that could not be made (``/proc/x``)
    failed when the model was logged, after training, with only ``[Errno 2] No such file or
    directory`` and the MLflow run left FAILED; until the twenty-ninth an existing experiment's
    own location was not checked, so an experiment made by another user, or from a checkout
    since moved, failed the same way. Raises :class:`TrackingStoreError`."""
    from pipelines.lake.fs import check_writable

    name = experiment_name(cfg)
    existing = _client(tracking_uri(cfg.tracking)).get_experiment_by_name(name)
    location = existing.artifact_location if existing is not None else artifact_location(cfg.tracking)
    folder = _local_folder(location)
    if folder is None:  # s3://, mlflow-artifacts:, ...: MLflow's to reach
        return
    try:
        check_writable(str(folder))  # makes the folder, as MLflow would
    except PermissionError as e:
        if existing is not None:
            raise TrackingStoreError(f"the MLflow experiment {name!r} keeps its artifacts in {location}: {e}; make it "
                                     "writable for this user, or train under another experiment "
                                     "(tracking.experiment)") from None
        what = (f"tracking.artifact_location={cfg.tracking.artifact_location!r}" if cfg.tracking.artifact_location
                else f"tracking.artifact_location (unset: {location})")
        raise TrackingStoreError(f"{what}, the new MLflow experiment {name!r}'s artifact folder: {e}; set it to a "
                                 "folder this user may write") from None


def _local_folder(location: str) -> Path | None:
    """The local folder an artifact location names (a path or a ``file:`` URI); None for a
    remote one."""
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    parsed = urlparse(location)
    if len(parsed.scheme) > 1 and parsed.scheme.lower() != "file":  # one letter: a Windows drive
        return None
    return Path(url2pathname(parsed.path) if parsed.scheme.lower() == "file" else location).expanduser()


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:`` tracking store URI (None: another store, or in memory)."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    db = make_url(uri).database
    return Path(db) if db and db != ":memory:" else None


def _check_sqlite(uri: str, timeout_s: float) -> None:
    import sqlite3

    path = sqlite_file(uri)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # as MLflow does before it opens the file
    except OSError as e:
        raise TrackingStoreError(f"cannot create the folder of the MLflow tracking store {uri}: {_said(e)}") from None
    try:
        con = sqlite3.connect(path, timeout=timeout_s)
    except sqlite3.Error as e:
        raise TrackingStoreError(f"cannot open the MLflow tracking store {uri}: {_said(e)}") from None
    try:
        con.execute("PRAGMA schema_version")  # reads the header: a file that is no database fails
        con.execute("BEGIN IMMEDIATE")  # a write lock: a read-only file or folder fails
        con.rollback()
    except sqlite3.OperationalError as e:
        if "locked" not in str(e):  # another process writing it: it works
            raise TrackingStoreError(f"cannot write the MLflow tracking store {uri}: {_said(e)}") from None
    except sqlite3.Error as e:
        raise TrackingStoreError(f"cannot use the MLflow tracking store {uri}: {_said(e)}") from None
    finally:
        con.close()


def _check_database(uri: str, dialect: str, timeout_s: float) -> None:
    import sqlalchemy

    args = {"connect_timeout": int(timeout_s)} if dialect in ("postgresql", "mysql") else {}
    try:
        engine = sqlalchemy.create_engine(uri, connect_args=args)
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except Exception as e:  # noqa: BLE001 - the driver's own errors (missing, refused, denied)
        raise TrackingStoreError(f"cannot connect to the MLflow tracking store {_no_password(uri)}: "
                                 f"{_said(e)}") from None


def _check_http(uri: str, timeout_s: float) -> None:
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    endpoint = "/api/2.0/mlflow/experiments/search"
    try:
        resp = http_request(get_default_host_creds(uri), endpoint, "GET", max_retries=0, backoff_factor=0,
                            timeout=timeout_s, raise_on_status=False, params={"max_results": 1})
    except Exception as e:  # noqa: BLE001 - refused, timed out, TLS, DNS: all one line
        raise TrackingStoreError(f"cannot reach the MLflow tracking server {_no_password(uri)}: {_said(e)} "
                                 f"(one request, {timeout_s:g} s timeout)") from None
    if resp.status_code != 200:
        answer = f"{resp.status_code} {resp.reason}" if resp.reason else str(resp.status_code)
        raise TrackingStoreError(f"the MLflow tracking server {_no_password(uri)} answered {answer} to GET {endpoint}: "
                                 "is it an MLflow server, and may this user use it?")


def _said(e: BaseException) -> str:
    """An error's gist in one line: the OS's or driver's words (``[Errno 111] Connection
    refused``, ``unable to open database file``), not the wrappers' repr chains."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    text = str(e)
    if m := re.search(r"\[Errno -?\d+\] [^'\")\]]+", text):
        return m.group(0).strip()
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _no_password(uri: str) -> str:
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", uri)


# train settings that do not decide a run's result: how it is checkpointed, logged, watched,
# where its tables are named (the data is named by what was read: versions and table ids)
NOT_RESULT = frozenset({
    "train_table", "valid_table", "test_table", "vocabulary", "table_version", "checkpoint_dir", "checkpoint_every",
    "keep_checkpoints", "start_timeout", "stall_shutdown_s", "log_every", "fail_at_step", "test_at_end",
    "threads_per_rank", "prefetch", "data_seed",  # (a seed, as run.seed: repeats vary it)
})


def repeat_group(train: Any, spec: Any) -> str:
    """A hash of what decides a run's result but its seed: the train settings (less
    :data:`NOT_RESULT`) and the data read (each split's version and Delta table id, the
    featurize build, and the embedding sizes and dense width the model is built with). Runs with
    one ``repeat_group`` are repeats of one experiment, whatever their ``run.name``,
    ``run.seed``, tracking or checkpoint settings; ``config_hash`` covers all of those and tells
    two repeats apart. (Until the twenty-sixth session the embedding sizes were left out: a run
    given another ``train.vocabulary``, a model 3x the size, was grouped as a repeat.)"""
    from jobs.config import doc_hash

    settings = {k: v for k, v in train.model_dump(mode="json").items() if k not in NOT_RESULT}
    data = {"versions": dict(spec.versions), "table_ids": dict(spec.table_ids), "build": spec.gold.get("build"),
            "cardinalities": [int(c) for c in spec.cardinalities], "num_dense": int(spec.num_dense)}
    return doc_hash({"train": settings, "data": data})


def library_versions() -> dict[str, str]:
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for name in ("torch", "horovod", "pyspark", "mlflow", "deltalake", "pyarrow", "numpy", "bigopt"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    if commit := code_version():
        out["bigopt_git"] = commit
    return out


def source_tags(params: Mapping[str, Any]) -> dict[str, str]:
    """The MLflow tag the UI shows as a run's code (``mlflow.source.git.commit``), from the
    ``lib.bigopt_git`` param of :func:`library_versions` (none outside a git checkout)."""
    git = params.get("lib.bigopt_git")
    return {"mlflow.source.git.commit": str(git).removesuffix("-dirty")} if git else {}


def code_version() -> str | None:
    """The git commit of the bigopt checkout running, ``-dirty`` with uncommitted changes to
    tracked files; None outside a git checkout (an installed wheel). The package version alone
    does not tell two sessions' code apart, and their metrics may differ."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if head and dirty else head or None


def start_run(cfg, params: Mapping[str, Any], tags: Mapping[str, str] | None = None, run_id: str | None = None,
              resume_step: int | None = None) -> tuple[str, str]:
    """Create (or reopen, for ``--resume`` from the checkpoint of ``resume_step``) the run on the
    driver; returns ``(uri, run_id)``. A reopened run keeps its params (MLflow's are immutable)
    and gets the resume's: :func:`resume_params`."""
    from mlflow.entities import Param, RunTag

    uri = tracking_uri(cfg.tracking)
    client = _client(uri)
    if run_id:
        from mlflow.exceptions import MlflowException

        from training.checkpoint import ResumeError

        try:
            existing = client.get_run(run_id).data.params
        except MlflowException:
            raise ResumeError(f"cannot resume: the checkpoint's MLflow run {run_id} is not in the tracking store "
                              f"{uri}; resume with the store it was logged to (tracking.tracking_uri)") from None
        client.update_run(run_id, status="RUNNING")
        with failed_on_error(uri, run_id):
            _log_params(client, run_id, [Param(k, v) for k, v in resume_params(existing, params, resume_step).items()])
            if tags:  # tags are mutable: they say what the run is now (a resume to more steps is another
                # repeat_group; a run from before a tag existed gets it)
                client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        return uri, run_id
    from mlflow.exceptions import MlflowException

    name = experiment_name(cfg)
    all_tags = {"bigopt.dataset": cfg.run.dataset, **(tags or {}), **cfg.tracking.tags}
    try:  # MLflow's refusal (a deleted experiment of that name, a tag it will not take): one line
        exp = client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else client.create_experiment(
            name, artifact_location=artifact_location(cfg.tracking))
        run = client.create_run(exp_id, run_name=cfg.tracking.run_name or cfg.run.name, tags=all_tags)
    except MlflowException as e:
        raise TrackingStoreError(f"MLflow did not start the run (experiment {name!r}) in {_no_password(uri)}: "
                                 f"{e.message}") from None
    rid = run.info.run_id
    with failed_on_error(uri, rid):
        _log_params(client, rid, [Param(k, _param_value(v)) for k, v in sorted(params.items())])
        client.log_batch(rid, tags=[RunTag(k, str(v)) for k, v in all_tags.items()])
    return uri, rid


@contextlib.contextmanager
def failed_on_error(uri: str, run_id: str):
    """The run exists (RUNNING): whatever stops the block ends it, never left RUNNING. A stop
    (Ctrl-C, or SIGTERM: how Airflow stops a task) marks it KILLED, MLflow's status for a run
    its user stopped; any other error FAILED. Until the twenty-eighth session a stop marked it
    FAILED too, so the MLflow UI and ``bigopt compare`` showed a run stopped on purpose, which
    ``--resume`` continues, as one that broke."""
    from pipelines.stopping import stop_behind

    try:
        yield
    except BaseException as e:
        end_run(uri, run_id, "KILLED" if stop_behind(e) is not None else "FAILED")
        raise


def _log_params(client, run_id: str, items: list) -> None:
    """Log ``Param`` items in batches of 100 (MLflow's limit per ``log_batch``)."""
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


_RESUME_KEY = re.compile(r"resume\.(\d+)\.(.+)")


def resume_params(existing: Mapping[str, str], params: Mapping[str, Any], step: int | None) -> dict[str, str]:
    """The params that record the ``n``-th resume of a run whose params are ``existing``:
    ``resume.<n>.from_step`` (the checkpoint's step) and ``resume.<n>.<key>`` for each of the
    resumed command's ``params`` whose value differs from the run's until then (its first
    command's, as earlier resumes changed them), e.g. ``resume.1.train.max_steps = 45``."""
    current = dict(existing)
    done = sorted((int(m.group(1)), m.group(2), v) for k, v in existing.items() if (m := _RESUME_KEY.fullmatch(k)))
    for _, key, v in done:  # in resume order: each resume's values replace the earlier ones
        current[key] = v
    n = (done[-1][0] if done else 0) + 1
    out = {f"resume.{n}.from_step": str(step)}
    out.update({f"resume.{n}.{k}": _param_value(v) for k, v in sorted(params.items())
                if current.get(k) != _param_value(v)})
    return out


def _param_value(v: Any) -> str:
    s = "None" if v is None else str(v)
    return s if len(s) <= _PARAM_MAX else s[: _PARAM_MAX - 3] + "..."


def end_run(uri: str, run_id: str, status: str) -> None:
    try:
        _client(uri).set_terminated(run_id, status=status)
    except Exception as e:  # noqa: BLE001 - never mask the training error
        log.warning("could not mark MLflow run %s %s: %s", run_id, status, e)


def kill_abandoned_run(uri: str, run_id: str, last_seen_s: float) -> bool:
    """Mark KILLED the run ``run_id`` of the store at ``uri`` when it is still RUNNING there: the
    caller knows no process runs it any more (a driver killed by ``kill -9``, the OOM killer or a
    power loss never ended it, and ``bigopt compare`` counted it as running forever). Its end time
    is the later of ``last_seen_s`` (its newest checkpoint's time) and its last metric's, never
    after now. True when it was marked; a run not in this store, or not RUNNING, is left alone."""
    import time

    try:
        client = _client(uri)
        run = client.get_run(run_id)
        if run.info.status != "RUNNING":
            return False
        last_ms = max([int(last_seen_s * 1000), run.info.start_time or 0]
                      + [m.timestamp for m in getattr(run.data, "_metric_objs", []) or []])
        client.set_terminated(run_id, status="KILLED", end_time=min(last_ms, int(time.time() * 1000)))
        return True
    except Exception as e:  # noqa: BLE001 - a run of another store, or a store hiccup: not this run's concern
        log.debug("MLflow run %s left as it was: %s", run_id, e)
        return False


class MetricLogger:
    """Buffers metrics and sends them with ``log_batch`` (<= 1000 per call) every few seconds."""

    def __init__(self, uri: str | None, run_id: str | None, flush_every_s: float = 5.0, resumed: bool = False):
        self.enabled = bool(uri and run_id)
        self.uri, self.run_id = uri, run_id
        self.flush_every_s = flush_every_s
        self._buf: list = []
        self._last = time.monotonic()
        self._client = _client(uri) if self.enabled else None
        # a resumed run restarts at its checkpoint, but the run may hold later steps already
        # (flushed before a crash, or a finished run's end): those are not logged again, per
        # metric. A flush is timed, so it can split one step's metrics: until the twenty-sixth
        # session the whole step was skipped up to the run's latest step of any metric, so a
        # `tta_*` still buffered at a crash, next to its flushed `valid_*`, was lost for good
        self.logged_through: dict[str, int] = self._last_steps() if self.enabled and resumed else {}

    def _last_steps(self) -> dict[str, int]:
        data = self._client.get_run(self.run_id).data
        return {k: max(m.step for m in self._client.get_metric_history(self.run_id, k)) for k in data.metrics}

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        for k, v in metrics.items():
            if v is None or step <= self.logged_through.get(k, -1):
                continue
            fv = float(v)
            if fv != fv:  # NaN: MLflow accepts it but plots poorly; skip
                continue
            self._buf.append(Metric(k, fv, ts, int(step)))
        if time.monotonic() - self._last >= self.flush_every_s or len(self._buf) >= 1000:
            self.flush()

    def flush(self) -> None:
        if not self.enabled or not self._buf:
            self._last = time.monotonic()
            return
        buf, self._buf = self._buf, []
        for i in range(0, len(buf), 1000):
            self._client.log_batch(self.run_id, metrics=buf[i:i + 1000])
        self._last = time.monotonic()

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        existing = self._client.get_run(self.run_id).data.params
        _log_params(self._client, self.run_id, [Param(k, _param_value(v)) for k, v in params.items()
                                                 if k not in existing])

    def log_dict(self, d: dict, artifact_file: str) -> None:
        if self.enabled:
            self._client.log_dict(self.run_id, d, artifact_file)

    def log_plot(self, history: dict, artifact_file: str = "plots/loss_auc_vs_time.png") -> None:
        if not self.enabled:
            return
        fig = loss_auc_figure(history)
        try:
            self._client.log_figure(self.run_id, fig, artifact_file)
        finally:
            import matplotlib.pyplot as plt

            plt.close(fig)

    def log_model(self, model, example: tuple | None = None, fmt: str = "pt2", name: str = "model") -> str | None:
        """``mlflow.pytorch.log_model`` into this run; returns the model URI.

        ``pt2`` (torch.export graph, loads without unpickling code) needs an ``example``
        ``(dense, sparse)`` batch; if export fails the pickle format is used instead.
        """
        if not self.enabled:
            return None
        import mlflow
        import mlflow.pytorch
        import torch

        mlflow.set_tracking_uri(self.uri)
        reqs = [f"torch=={torch.__version__.split('+')[0]}"]
        active = mlflow.active_run()
        if active is None or active.info.run_id != self.run_id:
            mlflow.start_run(run_id=self.run_id)
        model = model.cpu().eval()
        info = None
        if fmt == "pt2" and example is not None:
            try:
                info = mlflow.pytorch.log_model(model, name=name, pip_requirements=reqs, input_example=tuple(example),
                                                signature=_signature(example), serialization_format="pt2")
            except Exception as e:  # noqa: BLE001 - fall back to the pickle format
                log.warning("pt2 model export failed (%s); logging the pickled model", e)
        if info is None:
            info = mlflow.pytorch.log_model(model, name=name, pip_requirements=reqs, serialization_format="pickle")
        mlflow.end_run()  # the driver sets the final status (FINISHED / FAILED) afterwards
        return info.model_uri


def _signature(example: tuple):
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    dense, sparse = example
    return ModelSignature(
        inputs=Schema([
            TensorSpec(np.dtype(str(dense.dtype).removeprefix("torch.")), (-1, int(dense.shape[1])), "dense"),
            TensorSpec(np.dtype(str(sparse.dtype).removeprefix("torch.")), (-1, int(sparse.shape[1])), "sparse"),
        ]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1,), "logit")]),
    )


def loss_auc_figure(history: dict):
    """Train loss and valid AUC against training wall-clock seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    tr = history.get("train", [])
    ev = history.get("eval", [])
    if tr:
        a1.plot([r["wall_s"] for r in tr], [r["loss"] for r in tr], lw=1)
    a1.set_xlabel("wall seconds")
    a1.set_ylabel("train loss (logloss)")
    a1.set_title("train loss vs time")
    if ev:
        a2.plot([r["wall_s"] for r in ev], [r["auc"] for r in ev], marker="o")
    target = history.get("target_auc")
    if target is not None:  # 0 is a target (every AUC reaches it), not "none set"
        a2.axhline(target, color="gray", ls="--", lw=1, label=f"target {target}")
        a2.legend()
    a2.set_xlabel("wall seconds")
    a2.set_ylabel("valid AUC")
    a2.set_title("valid AUC vs time")
    fig.tight_layout()
    return fig
