"""A step's Spark failures print as one line that says what happened, not as a lake error."""
from __future__ import annotations

import os
from types import SimpleNamespace

from jobs.config import load_config
from jobs.spark_step import run_spark_step, spark_failure


def test_a_failed_spark_job_is_one_line(spark, capsys):
    """A task whose Python worker dies (killed, out of memory) fails its job: once ~240 lines
    of Py4JJavaError; the traceback is still logged with -v."""
    cfg = load_config(data={"spark": {"master": "local[2]"}})

    def step(start, progress):
        return start().sparkContext.parallelize([1], 1).map(lambda x: os._exit(3)).collect()

    _, result, status = run_spark_step(cfg, "ingest", step, errors=())
    out = capsys.readouterr().err
    assert result is None and status == 1  # the work ran and failed
    line = next(ln for ln in out.splitlines() if ln.startswith("bigopt ingest: "))
    assert "a Spark job failed, nothing of it committed" in line and "Python worker exited unexpectedly" in line
    assert "Traceback" not in out and "Py4JJavaError" not in out
    assert spark.range(3).count() == 3  # the session lives on


def test_a_dead_jvm_is_not_a_lake_error(monkeypatch):
    """py4j answers a call into a JVM that is gone with a refused connection (an OSError): it
    was shown as if the lake could not be reached."""
    from pyspark import SparkContext

    dead = SimpleNamespace(proc=SimpleNamespace(poll=lambda: 137, returncode=137))
    monkeypatch.setattr(SparkContext, "_gateway", dead)
    why = spark_failure(ConnectionRefusedError(111, "Connection refused"))
    assert why.startswith("Spark's JVM exited (exit code 137: killed, or out of memory?)")
    alive = SimpleNamespace(proc=SimpleNamespace(poll=lambda: None, returncode=None))
    monkeypatch.setattr(SparkContext, "_gateway", alive)
    assert spark_failure(ConnectionRefusedError(111, "Connection refused")) is None  # an object store's


def test_a_python_error_in_a_dataframe_task_is_one_line(spark, capsys):
    """A Python exception in a task of a DataFrame job (an input file removed after it was
    listed) surfaces as PythonException, not Py4JJavaError: it printed ~190 lines."""
    cfg = load_config(data={"spark": {"master": "local[2]"}})

    def gone(batches):
        for _ in batches:
            raise FileNotFoundError(2, "No such file or directory", "/raw/day_3")
        yield from ()

    def two_lines(batches):
        for _ in batches:
            raise ValueError("line one\nline two")
        yield from ()

    def step(start, progress):
        return start().range(1, numPartitions=1).mapInArrow(gone, "id long").collect()

    _, result, status = run_spark_step(cfg, "ingest", step, errors=())
    out = capsys.readouterr().err
    assert result is None and status == 1  # the work ran and failed
    line = next(ln for ln in out.splitlines() if ln.startswith("bigopt ingest: "))
    assert "a Spark job failed, nothing of it committed (FileNotFoundError: [Errno 2] No such file or directory: " \
           "'/raw/day_3')" in line, line
    assert "Traceback" not in out
    # an exception of several lines keeps its type and every line (it was only "line two")
    _, result, _ = run_spark_step(cfg, "ingest", lambda start, p: start().range(1, numPartitions=1).mapInArrow(
        two_lines, "id long").collect(), errors=())
    line = next(ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("bigopt ingest: "))
    assert "(ValueError: line one line two)" in line, line

    def table_error(batches):  # the project's own error class: named without its module
        from pipelines.lake.commit import TableWriteError

        for _ in batches:
            raise TableWriteError("/lake/t", "[Errno 28] No space left on device", action="writing a data file of")
        yield from ()

    _, result, _ = run_spark_step(cfg, "ingest", lambda start, p: start().range(1, numPartitions=1).mapInArrow(
        table_error, "id long").collect(), errors=())
    line = next(ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("bigopt ingest: "))
    assert "failed, nothing of it committed (TableWriteError: writing a data file of Delta table /lake/t failed: " \
           "[Errno 28] No space left on device)" in line, line


def test_a_local_session_does_not_print_each_failed_tasks_stack(spark):
    """On a local master at WARN/ERROR, Spark's Executor and TaskSetManager loggers printed each
    failed task's Java and Python stack (~200 lines for a full disk under ingest) before the
    step's one line (hard-failure probe): they are off, unless -v (debug) asks for everything."""
    from pipelines.spark import TASK_ERROR_LOGGERS

    log_manager = spark.sparkContext._jvm.org.apache.logging.log4j.LogManager
    assert {name: log_manager.getLogger(name).getLevel().toString() for name in TASK_ERROR_LOGGERS} == {
        name: "OFF" for name in TASK_ERROR_LOGGERS}
