"""Run a per-rank function on N ranks: in-process, Horovod-on-Spark, or local Horovod (gloo).

    results = launch(train_rank, job, num_proc=2, backend="horovod", spark=spark)
    results = run_local(bench_rank, job, num_proc=2)     # N local processes, no Spark

``fn(job, dist) -> result`` must be a module-level (importable) function; ``job`` plain
values. Backends:

* ``local`` (or ``num_proc == 1``): ``fn(job, LocalDist())`` in this process - no Horovod,
  exceptions propagate as they are (use it with a debugger: ``--local``).
* ``horovod``: ``horovod.spark.run`` with ``use_gloo=True`` on the active SparkSession -
  ``num_proc`` Spark tasks each start one rank (local[N] here, executors on a cluster).
  A failing rank returns its traceback instead of dying, so the driver raises
  :class:`RankFailure` naming the rank with its traceback.
* ``runner`` (:func:`run_local`): ``horovod.runner.run`` with gloo on ``num_proc`` local
  processes - no Spark, same rank wrapper and errors. For benchmarks and tools that want
  Horovod ranks without a SparkSession.

A second backend (Spark's ``TorchDistributor``) is one more entry in :data:`BACKENDS` whose
rank wrapper builds a ``torch.distributed`` ``Dist``.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys
import traceback
import unittest.mock
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipelines.stopping import held_stop_signals
from training.dist import HorovodDist, LocalDist

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent


class RanksNotStartedError(RuntimeError):
    """Horovod-on-Spark gave up waiting for every rank's Spark task to start: too few task
    slots on the cluster (no rank ran)."""


class RankFailure(RuntimeError):
    """A rank raised; ``.rank`` and ``.rank_traceback`` say where and why."""

    def __init__(self, rank: int, error: str, rank_traceback: str, others: list[dict] | None = None):
        self.rank, self.error, self.rank_traceback = rank, error, rank_traceback
        self.others = others or []
        super().__init__(f"rank {rank} failed: {error}\n--- rank {rank} traceback ---\n{rank_traceback}")


def _rank_entry(fn: Callable, job: Any) -> dict[str, Any]:
    """Runs inside each Horovod rank: never raises, so every rank reports back."""
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>` dumps every thread's stack
    dist = None
    try:
        dist = HorovodDist()
        return {"ok": True, "rank": dist.rank, "result": fn(job, dist)}
    except BaseException as e:  # noqa: BLE001 - reported to the driver
        tb = traceback.format_exc()
        rank = dist.rank if dist is not None else int(os.environ.get("HOROVOD_RANK", "-1"))
        print(f"[rank {rank}] {type(e).__name__}: {e}\n{tb}", file=sys.stderr, flush=True)
        if dist is not None:
            dist.shutdown()  # peers blocked in a collective get an error instead of hanging
        return {"ok": False, "rank": rank, "error": f"{type(e).__name__}: {e}", "traceback": tb,
                "secondary": _is_secondary(e)}


def _is_secondary(e: BaseException) -> bool:
    """Errors that are consequences of another rank failing (collectives aborted)."""
    name = type(e).__name__
    text = str(e)
    return name == "HorovodInternalError" or "shut down" in text or "Connection closed by peer" in text


def rank_env(stall_shutdown_s: int = 0, py_files: Sequence[str] = ()) -> dict[str, str]:
    """Environment added to every rank: the repo on PYTHONPATH, thread counts left to the loop,
    and Horovod's stall shutdown (a collective some ranks never join fails after that long
    instead of hanging; 0 = off).

    ``py_files``: spark-submit's ``--py-files`` (``spark.submit.pyFiles``). Horovod replaces
    the executor's PYTHONPATH with this one, whose paths are the driver's: on a cluster
    without bigopt installed the ranks found no ``training`` module. Spark copies those files
    into the executor's working folder, the ranks' too, so their names come first."""
    paths = [os.path.basename(p.rstrip("/")) for p in py_files if p.strip()] + [str(REPO_ROOT)]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    env = {"PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}
    if stall_shutdown_s:
        env["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] = str(int(stall_shutdown_s))
    for k in ("BIGOPT_SHARED_DATA", "MLFLOW_TRACKING_URI", "OMP_NUM_THREADS"):
        if os.environ.get(k):
            env[k] = os.environ[k]
    return env


class _QuietHorovod(logging.Filter):
    """Drop INFO chatter during a launch: Horovod's rendezvous key bookkeeping and py4j's
    retried "Exception while sending command" (a pooled connection reset), both logged on
    the root logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return not any(f"{os.sep}{m}{os.sep}" in record.pathname for m in ("horovod", "py4j"))


def _launch_local(fn: Callable, job: Any, num_proc: int, **_: Any) -> list[Any]:
    if num_proc != 1:
        raise ValueError("the local backend runs exactly one rank (num_proc: 1)")
    return [fn(job, LocalDist())]


def local_task_slots(master: str) -> int | None:
    """How many tasks a local master runs at once (``local``: 1, ``local[N]`` / ``local[N,F]``:
    N, ``local[*]``: the cores, ``local-cluster[W,C,M]``: W x C); None for a cluster manager,
    whose executors can come and go."""
    if m := re.fullmatch(r"local(?:\[(\*|\d+)(?:,\s*\d+)?\])?", master.strip()):
        n = m.group(1)
        return 1 if n is None else (os.cpu_count() or 1) if n == "*" else int(n)
    if m := re.fullmatch(r"local-cluster\[\s*(\d+)\s*,\s*(\d+)\s*,\s*\d+\s*\]", master.strip()):
        return int(m.group(1)) * int(m.group(2))
    return None


def check_task_slots(sc, num_proc: int) -> None:
    """Horovod-on-Spark runs each rank as a Spark task, and every rank must be running before
    any can train: on a local master with fewer task slots than ranks they never all start
    (Horovod waited ``start_timeout``, then failed with Spark's stack traces), so that is a
    :class:`~training.loop.TrainSettingsError` at once. A cluster manager may add executors:
    there it is a warning."""
    slots = local_task_slots(sc.master)
    if slots is not None and num_proc > slots:
        from training.loop import TrainSettingsError

        raise TrainSettingsError(
            f"train.num_proc={num_proc} ranks need {num_proc} Spark tasks running at once, but spark.master="
            f"{sc.master} runs {slots} at a time: lower train.num_proc (--num-proc) to {slots} or less, or give "
            f"the master more task slots (e.g. spark.master=local[{num_proc}])")
    if slots is None and num_proc > sc.defaultParallelism:
        log.warning("num_proc=%d > spark.default.parallelism=%d: ranks may wait for task slots",
                    num_proc, sc.defaultParallelism)


def _launch_horovod(fn: Callable, job: Any, num_proc: int, *, spark=None, start_timeout: int = 180,
                    stall_shutdown_s: int = 0, verbose: int = 1, check_slots: bool = True, **_: Any) -> list[Any]:
    import horovod.spark

    if spark is None:
        from pyspark.sql import SparkSession

        spark = SparkSession.getActiveSession()
        if spark is None:
            raise RuntimeError("the horovod backend needs an active SparkSession (pipelines.spark.get_spark)")
    sc = spark.sparkContext
    stderr_at = stderr_where(sc.master)
    if check_slots:  # run_training checked them before the MLflow run opened
        check_task_slots(sc, num_proc)
    quiet = _QuietHorovod()
    logging.getLogger().addFilter(quiet)
    for h in logging.getLogger().handlers:
        h.addFilter(quiet)
    try:
        with _stop_signals_passed_on() as stopping, _reports_kept_after_a_failed_exit(stopping) as exited, \
                _horovod_task_fixes():
            reports = horovod.spark.run(
                _rank_entry, args=(fn, job), num_proc=num_proc, use_gloo=True,
                env=rank_env(stall_shutdown_s, submitted_py_files(sc)), start_timeout=start_timeout, verbose=verbose,
            )
    except Exception as e:  # a rank process died without reporting (killed, segfault, OOM)
        if type(e).__name__ == "TimeoutException" and "tasks to start" in str(e):
            raise RanksNotStartedError(
                f"the {num_proc} ranks did not all get a Spark task slot within train.start_timeout={start_timeout} s "
                f"(spark.master={sc.master}, spark.default.parallelism={sc.defaultParallelism}); no rank ran: lower "
                "train.num_proc (--num-proc), give the cluster more executor cores, or raise train.start_timeout"
            ) from e
        raise _process_died(e, stderr_at=stderr_at) from e
    finally:
        logging.getLogger().removeFilter(quiet)
        for h in logging.getLogger().handlers:
            h.removeFilter(quiet)
    if exited and len(reports) != num_proc:  # a rank died before it told the driver its rank
        raise _process_died(exited[0], stderr_at=stderr_at) from exited[0]
    return _results(reports, exited, stderr_at=stderr_at)


def submitted_py_files(sc) -> list[str]:
    """spark-submit's ``--py-files`` of this application (``spark.submit.pyFiles``)."""
    return [p.strip() for p in (sc.getConf().get("spark.submit.pyFiles") or "").split(",") if p.strip()]


def stderr_where(master: str) -> str:
    """Where a rank process's stderr went: this terminal on a local master, its executor's log
    on a cluster."""
    if local_task_slots(master) is not None:
        return "see the rank's stderr above"
    return ("its stderr is in its executor's log: the Spark UI's Executors tab (stderr), or on a standalone worker "
            "<worker work dir>/<app id>/<executor id>/stderr")


@contextlib.contextmanager
def _horovod_task_fixes():
    """Horovod's Spark tasks, each wrapped in :func:`training.horovod_task.mapper_with_task_fixes`:
    a task then waits 3 s from its rank's start, not from its end (3 s less per launch), and
    releases its command's semaphores as the command returns."""
    from horovod.spark import runner

    from training.horovod_task import mapper_with_task_fixes

    make_mapper = runner._make_mapper

    def make(*args, **kwargs):
        return functools.partial(mapper_with_task_fixes, make_mapper(*args, **kwargs))

    with unittest.mock.patch.object(runner, "_make_mapper", make):
        yield


_EXITED_NONZERO = "Horovod detected that one or more processes exited with non-zero status"


@contextlib.contextmanager
def _reports_kept_after_a_failed_exit(stopping):
    """Keep the ranks' reports when a rank process exits non-zero. Horovod's launcher waits for
    every rank process, then raises if one exited non-zero and cancels its Spark job, whose
    tasks were about to return what each rank reported: a failing rank that reported its error
    and then died in Horovod's C++ teardown (gloo: "terminate called without an active
    exception", exit 134) was said as "rank -1 failed", its error lost. Here that one error is
    noted instead (yielded list), the tasks return the reports, and :func:`_results` says the
    rank that failed; a rank that never reported is named by its place. Not while stopping: a
    stop's ended ranks go on as before (the job cancelled, the stop passed on)."""
    from horovod.spark import runner

    launch_job, exited = runner._launch_job, []

    def reported(*args, **kwargs):
        try:
            return launch_job(*args, **kwargs)
        except RuntimeError as e:
            if stopping.is_set() or _EXITED_NONZERO not in str(e):
                raise
            exited.append(e)  # every rank process has ended here: the Spark tasks return their reports

    with unittest.mock.patch.object(runner, "_launch_job", reported):
        yield exited


@contextlib.contextmanager
def _stop_signals_passed_on():
    """Horovod's launcher replaces the SIGINT/SIGTERM handlers with its own, which set an event
    that stops the ranks, and never puts the old ones back: a stopped launch looked like a rank
    failure (exit 1) and later signals reached only Horovod. Here the signals are held (noted,
    and the launcher's event set), then sent again to our handlers (the `bigopt` command stops
    with one line, exit 143 / 130)."""
    import threading

    from horovod.runner import gloo_run

    event, register = threading.Event(), gloo_run.register_shutdown_event
    gloo_run.register_shutdown_event = lambda: event
    try:
        with held_stop_signals(also=event.set), _cancelled_spark_job_unsaid():
            yield event  # set once a stop came
    finally:
        gloo_run.register_shutdown_event = register


_CANCELLED_JOB = re.compile(r"SPARK_JOB_CANCELLED|\bJob \d+ cancelled\b")


@contextlib.contextmanager
def _cancelled_spark_job_unsaid():
    """On a stop, or when its ranks' tasks did not all start in time, ``horovod.spark.run``
    cancels its Spark job group, and its ``run_spark`` thread (whose ``collect`` waited for the
    ranks' tasks) dies of the cancelled job: Python's ``threading.excepthook`` printed that
    Py4JJavaError with ~35 lines of Java stack before the command's one line. That one error of
    that one thread is not printed (the launch raises its own: the stop, or
    :class:`RanksNotStartedError`); any other thread's error, and any other error, still reach
    the previous hook. ``horovod.spark.run`` joins the thread before it returns, so the hook is
    back before the launch's error is acted on."""
    import threading

    previous = threading.excepthook

    def hook(args) -> None:
        if not (_in_horovod_spark_thread(args.exc_traceback) and _CANCELLED_JOB.search(_text_of(args.exc_value))):
            previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


def _in_horovod_spark_thread(tb) -> bool:
    """Whether a thread's traceback passes through Horovod's ``run_spark`` (horovod.spark.runner)."""
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "run_spark" and tb.tb_frame.f_globals.get("__name__") == "horovod.spark.runner":
            return True
        tb = tb.tb_next
    return False


def _text_of(error: BaseException | None) -> str:
    try:
        return str(error)
    except Exception:  # noqa: BLE001 - a Py4JJavaError asks the JVM for its text
        return ""


def _process_died(e: Exception | None, rank: int = -1, others: list[dict] | None = None,
                  stderr_at: str = "see the rank's stderr above") -> RankFailure:
    """A rank whose process ended without a report (``rank`` -1: which one is not known);
    ``stderr_at``: where its stderr is (:func:`stderr_where`)."""
    why = "it ended without reporting" if e is None else f"{type(e).__name__}: {e}"
    return RankFailure(rank, why, f"(no Python traceback: the rank process exited; {stderr_at})", others)


def _results(reports: list[dict[str, Any] | None], exited: list[Exception] | None = None,
             stderr_at: str = "see the rank's stderr above") -> list[Any]:
    """The ranks' results in rank order, or :class:`RankFailure` for the rank that failed first
    (not a peer whose collective was aborted because of it). ``reports`` come in rank order;
    None is a rank whose process ended without reporting (killed, OOM, a crash) and ``exited``
    the launcher's error for a rank process's non-zero exit: a rank that reported an error
    comes first, then one that never reported, then a peer's aborted collective. When every
    rank reported success a non-zero exit came after the work (Horovod's teardown): a warning."""
    silent = [rank for rank, r in enumerate(reports) if r is None]
    reports = sorted((r for r in reports if r is not None), key=lambda r: r.get("rank", 0))
    failed = [r for r in reports if not r["ok"]]
    primary = next((r for r in failed if not r.get("secondary")), None)
    if primary is None and silent:
        raise _process_died(exited[0] if exited else None, silent[0], failed, stderr_at)
    if failed:
        primary = primary or failed[0]
        raise RankFailure(primary["rank"], primary["error"], primary["traceback"],
                          [r for r in failed if r is not primary])
    if exited:
        log.warning("every rank reported its result, then a rank process exited non-zero (Horovod's shutdown): %s",
                    " ".join(str(exited[0]).split()))
    return [r["result"] for r in reports]


def run_local(fn: Callable, job: Any, num_proc: int, *, start_timeout: int = 120, stall_shutdown_s: int = 0,
              verbose: int = 0, **_: Any) -> list[Any]:
    """Run ``fn(job, dist)`` on ``num_proc`` local Horovod ranks (``horovod.runner.run``, gloo,
    no Spark); returns the per-rank results in rank order, raises :class:`RankFailure`.

    ``fn`` must be importable by module name in a fresh interpreter (the repository is put on
    the ranks' ``PYTHONPATH``). The ranks inherit this process's environment plus
    :func:`rank_env`, which is set only for the duration of the call.
    """
    import horovod.runner

    if num_proc < 1:
        raise ValueError(f"num_proc must be >= 1, got {num_proc}")
    # horovod.runner.run has no env argument: its ranks inherit ours
    with unittest.mock.patch.dict(os.environ, rank_env(stall_shutdown_s)):
        try:
            reports = horovod.runner.run(_rank_entry, args=(fn, job), np=num_proc, hosts=f"localhost:{num_proc}",
                                         use_gloo=True, start_timeout=start_timeout, verbose=verbose)
        except Exception as e:  # a rank process died without reporting (killed, segfault, OOM)
            raise _process_died(e) from e
    return _results(reports)


BACKENDS: dict[str, Callable[..., list[Any]]] = {"local": _launch_local, "horovod": _launch_horovod,
                                                 "runner": run_local}


def launch(fn: Callable, job: Any, *, num_proc: int = 1, backend: str = "horovod", **kw: Any) -> list[Any]:
    """Run ``fn(job, dist)`` on ``num_proc`` ranks; returns the per-rank results in rank order."""
    if num_proc == 1:
        backend = "local"
    try:
        impl = BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown launch backend {backend!r}: {sorted(BACKENDS)}") from None
    return impl(fn, job, num_proc, **kw)
