"""training.launch: N local Horovod ranks (horovod.runner.run, gloo) without Spark, and how the
Horovod-on-Spark launch reports ranks whose processes exit non-zero."""
from __future__ import annotations

import io
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


def _horovod_spark_thread_fails_with(error: Exception) -> None:
    """Run Horovod's own ``run_spark`` thread (horovod.spark.runner) on a stand-in SparkContext
    whose ``collect`` raises ``error``, as Spark's does for a job the launcher cancelled."""
    from types import SimpleNamespace

    from horovod.spark import runner

    def collect():
        raise error

    ctx = SimpleNamespace(setJobGroup=lambda *a, **k: None,
                          range=lambda *a, **k: SimpleNamespace(mapPartitionsWithIndex=lambda f: SimpleNamespace(
                              collect=collect)))
    driver = SimpleNamespace(addresses=lambda: {}, notify_spark_job_failed=lambda: None)
    settings = SimpleNamespace(key=b"k", elastic=False, num_proc=2, max_num_proc=2)
    runner._make_spark_thread(ctx, "horovod.spark.run.0", driver, None, settings, True, False).join(10)


def test_a_stopped_launch_does_not_print_horovods_cancelled_spark_job(monkeypatch):
    """On Ctrl-C / SIGTERM Horovod cancels its Spark job group, and its run_spark thread died of
    the cancelled job: Python printed that Py4JJavaError, ~35 lines of Java stack, before the
    command's one "stopped" line. That error of that thread is not printed (nor when Horovod
    cancels the job because the ranks' tasks did not start in time: the launch raises its own
    error then, found by the standalone-cluster probe); other errors and other threads' still
    are, and the hook is put back after the launch."""
    import signal
    import threading

    from training.launch import _stop_signals_passed_on

    pytest.importorskip("horovod.spark")
    call = "An error occurred while calling o55.collectAndServe.\n: org.apache.spark.SparkException: "
    cancelled = call + "[SPARK_JOB_CANCELLED] Job 0 cancelled part of cancelled job group horovod.spark.run.0"
    failed = call + "Job aborted due to stage failure: Task 1 in stage 0.0 failed 1 times"  # a rank's task died
    printed: list[str] = []

    def recorder(args):
        printed.append(str(args.exc_value))

    monkeypatch.setattr(threading, "excepthook", recorder)
    with _stop_signals_passed_on():  # not stopped (the start timed out): the launch raises its own error
        _horovod_spark_thread_fails_with(RuntimeError(cancelled))  # py4j's Py4JJavaError, as str() gives it
        _horovod_spark_thread_fails_with(RuntimeError(failed))
    assert printed == [failed]

    printed.clear()
    stops: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stops.append(signum))
    try:
        with _stop_signals_passed_on():
            os.kill(os.getpid(), signal.SIGTERM)  # held: noted, Horovod's shutdown event set
            _horovod_spark_thread_fails_with(RuntimeError(cancelled))  # the stop's own consequence: not said
            _horovod_spark_thread_fails_with(RuntimeError(failed))  # another error: said

            def elsewhere():
                raise RuntimeError(cancelled)

            other = threading.Thread(target=elsewhere)  # another thread's: said
            other.start()
            other.join(10)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stops == [signal.SIGTERM]  # sent again to the handler the launch found
    assert printed == [failed, cancelled]
    assert threading.excepthook is recorder


@pytest.mark.spark
@pytest.mark.parametrize("case", ["failed, then died in teardown", "succeeded, then died in teardown",
                                  "died without reporting"])
def test_a_rank_process_exiting_non_zero_keeps_what_the_ranks_reported(spark, helpers_importable, case, caplog):
    """A rank that reported its error and then died in Horovod's C++ teardown (gloo's "terminate
    called without an active exception", exit 134: seen in the full suite) was said as "rank -1
    failed", its error lost: Horovod's launcher raised for the exit code and cancelled the Spark
    job that carried the reports. Now the failing rank and its error are said; a run whose ranks
    all reported success returns their results with a warning; a rank that never reported is
    named by its rank."""
    job = {"x": 1, "exit_rank": 1, "exit_code": 134}
    if case.startswith("failed"):
        job["fail_rank"] = 1
    elif case.startswith("died"):
        job.update(exit_when="now", exit_code=137)
    if case.startswith("succeeded"):
        res = launch(probe_rank, job, num_proc=2, backend="horovod", spark=spark, start_timeout=60)
        assert [r["rank"] for r in res] == [0, 1] and [r["sum"] for r in res] == [3.0, 3.0]
        assert "rank process exited non-zero" in caplog.text and "Exit code: 134" in caplog.text
        return
    with pytest.raises(RankFailure) as ei:
        launch(probe_rank, job, num_proc=2, backend="horovod", spark=spark, start_timeout=60)
    assert ei.value.rank == 1
    if case.startswith("failed"):
        assert ei.value.error == "RuntimeError: probe failure on rank 1"
        assert "probe failure on rank 1" in ei.value.rank_traceback
    else:
        assert "exited with non-zero status" in ei.value.error and "Exit code: 137" in ei.value.error


def test_horovods_spark_task_counts_its_minimum_lifetime_from_the_commands_start(monkeypatch):
    """Horovod's SparkTaskService keeps a task at least 3 s "after the command started" (so the
    driver can fetch the exit code) but set that clock when the command had ended: every launch
    waited 3 s more after its ranks were done. Patched in each task (training.horovod_task), the
    clock runs from the start; the launcher wraps Horovod's mapper only during a launch."""
    pytest.importorskip("horovod.spark")
    from horovod.runner.common.service.task_service import BasicTaskService
    from horovod.spark import runner
    from horovod.spark.task.task_service import SparkTaskService

    from training.horovod_task import lifetime_from_command_start, mapper_with_task_fixes
    from training.launch import _horovod_task_fixes

    monkeypatch.setattr(SparkTaskService, "_run_command", SparkTaskService._run_command)  # put back afterwards
    monkeypatch.setattr(SparkTaskService, "_lifetime_from_command_start", False, raising=False)
    clock_while_running: list = []
    monkeypatch.setattr(BasicTaskService, "_run_command",
                        lambda self, *a, **k: clock_while_running.append(self._minimum_command_lifetime))
    lifetime_from_command_start()
    task = SparkTaskService.__new__(SparkTaskService)  # no service started: only the two attributes
    task._minimum_command_lifetime_s, task._minimum_command_lifetime = 3, None
    task._run_command(["rank"], {}, None)
    assert clock_while_running[0] is not None and clock_while_running[0] is task._minimum_command_lifetime

    original = runner._make_mapper
    with _horovod_task_fixes():
        wrapped = runner._make_mapper({}, type("S", (), {"key": b"k"})(), True, False)
    assert runner._make_mapper is original
    assert wrapped.func is mapper_with_task_fixes


def _semaphore_files(event) -> list[Path]:
    cond = event._cond
    locks = (event._flag, cond._lock, cond._sleeping_count, cond._woken_count, cond._wait_semaphore)
    return [Path("/dev/shm") / f"sem.{lock._semlock.name.lstrip('/')}" for lock in locks]


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="named POSIX semaphores are not under /dev/shm here")
def test_horovods_command_event_releases_its_semaphores_when_the_command_returns(monkeypatch):
    """Horovod's safe_shell_exec.execute makes a spawn-context Event (5 named semaphores) per
    rank command and leaves them to garbage collection, which a Spark worker stopped by a signal
    never reaches: the resource tracker then printed "There appear to be 5 leaked semaphore
    objects to clean up at shutdown" under a launch that went well (3 times in 4 two-rank
    launches here; none in 5 with the fix). Patched in each task, the event is released as
    the command returns, and the event still works."""
    import multiprocessing

    pytest.importorskip("horovod.spark")
    from horovod.runner.common.util import safe_shell_exec

    from training.horovod_task import release_semaphores, semaphores_released_after_each_command

    event = multiprocessing.get_context("spawn").Event()
    files = _semaphore_files(event)
    assert all(f.exists() for f in files)
    assert release_semaphores(event) == 5
    assert not any(f.exists() for f in files)
    assert release_semaphores(event) == 0  # each finalizer ran once: garbage collection does nothing more
    event.set()
    assert event.is_set()

    for name in ("_create_event", "execute", "_semaphores_released"):
        monkeypatch.setattr(safe_shell_exec, name, getattr(safe_shell_exec, name, False), raising=False)
    made = []
    create_event = safe_shell_exec._create_event
    monkeypatch.setattr(safe_shell_exec, "_create_event", lambda ctx: made.append(create_event(ctx)) or made[-1])
    semaphores_released_after_each_command()
    semaphores_released_after_each_command()  # once per process
    assert safe_shell_exec.execute("exit 3", stdout=io.StringIO(), stderr=io.StringIO()) == 3
    assert len(made) == 1 and not any(f.exists() for f in _semaphore_files(made[0]))


def test_ranks_find_the_submitted_py_files_first_and_a_cluster_rank_s_stderr_is_placed():
    """spark-submit --py-files bigopt.zip on a cluster without bigopt: Horovod replaces the
    executor's PYTHONPATH with the ranks' (the driver's paths), so the ranks found no
    `training` module, and the failure said "see the rank's stderr above", which only a local
    master prints (both found by the standalone-cluster probe)."""
    from training.launch import REPO_ROOT, _process_died, rank_env, stderr_where

    env = rank_env(0, ["/home/u/dist/bigopt.zip", "hdfs://nn/lib/deps.zip", " "])
    assert env["PYTHONPATH"].split(os.pathsep)[:3] == ["bigopt.zip", "deps.zip", str(REPO_ROOT)]
    assert rank_env(0)["PYTHONPATH"].split(os.pathsep)[0] == str(REPO_ROOT)
    assert stderr_where("local[2]") == "see the rank's stderr above"
    cluster = stderr_where("spark://10.0.0.1:7077")
    assert cluster.startswith("its stderr is in its executor's log: the Spark UI's Executors tab")
    assert str(_process_died(None, 1, stderr_at=cluster)).endswith(f"(no Python traceback: the rank process exited; "
                                                                   f"{cluster})")


@pytest.mark.spark
def test_ranks_that_never_get_a_task_slot_are_one_clear_error(spark, monkeypatch):
    """More ranks than a cluster's free cores: Horovod's start timed out and the command said
    "rank -1 failed: TimeoutException ... the rank process exited", with a 25-line traceback of
    the cancelled job before it. Now one error naming the settings to change."""
    horovod_spark = pytest.importorskip("horovod.spark")
    from horovod.runner.common.util.timeout import TimeoutException

    from training.launch import RanksNotStartedError, _launch_horovod

    def timed_out(*args, **kwargs):
        raise TimeoutException("Timed out waiting for Spark tasks to start. Please check that you have enough "
                               "resources to run all Horovod processes.")

    monkeypatch.setattr(horovod_spark, "run", timed_out)
    with pytest.raises(RanksNotStartedError, match=r"^the 4 ranks did not all get a Spark task slot within "
                                                   r"train.start_timeout=30 s \(spark.master=local\[2\].*no rank ran: "
                                                   r"lower train.num_proc \(--num-proc\)"):
        _launch_horovod(print, None, 4, spark=spark, start_timeout=30, check_slots=False)
