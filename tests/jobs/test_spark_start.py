"""Starting Spark: what spark-submit sets wins over the config; no Java is a one-line error."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyspark
import pytest

REPO = Path(__file__).resolve().parents[2]
SPARK_HOME = Path(pyspark.__file__).parent

_PROBE = """
import json
import logging
logging.basicConfig(level=logging.INFO, format="LOG %(message)s")
from pipelines.spark import get_spark
spark = get_spark("from-config", master="local[2]", ui=False,
                  conf={"spark.sql.shuffle.partitions": 3, "spark.sql.session.timeZone": "Asia/Tokyo"})
conf = spark.sparkContext.getConf()
keys = ["spark.master", "spark.app.name", "spark.sql.shuffle.partitions", "spark.sql.session.timeZone",
        "spark.python.daemon.module"]
got = {k: conf.get(k, None) for k in keys}
got["sum"] = spark.sparkContext.parallelize(range(10), 2).map(lambda x: 2 * x).sum()
print("PROBE", json.dumps(got))
"""


def _env(**extra) -> dict:
    env = {**os.environ, "SPARK_HOME": str(SPARK_HOME), "PYSPARK_PYTHON": sys.executable,
           "PYSPARK_DRIVER_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1", "PYTHONPATH": str(REPO)}
    env.pop("PYSPARK_SUBMIT_ARGS", None)
    return {**env, **extra}


def test_spark_submit_flags_win_over_the_config(tmp_path):
    """The config's master once replaced spark-submit's --master (and bigopt's defaults its
    --conf); with code shipped by --py-files, the local worker daemon (pipelines.worker_daemon,
    not on the daemon's path then) once killed every Python task."""
    script = tmp_path / "probe.py"
    script.write_text(_PROBE)
    shipped = tmp_path / "shipped.py"
    shipped.write_text("X = 1\n")
    out = subprocess.run(
        [str(SPARK_HOME / "bin" / "spark-submit"), "--master", "local[1]", "--name", "from-submit",
         "--conf", "spark.sql.session.timeZone=Europe/Paris", "--py-files", str(shipped), str(script)],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("PROBE ")), None)
    assert out.returncode == 0 and line, out.stderr[-3000:]
    got = json.loads(line.removeprefix("PROBE "))
    assert got == {
        "spark.master": "local[1]", "spark.app.name": "from-submit",  # the submit command's
        "spark.sql.session.timeZone": "Europe/Paris",
        "spark.sql.shuffle.partitions": "3",  # the config's, which the submit command left unset
        "spark.python.daemon.module": None,  # Spark's own daemon: the code came with --py-files
        "sum": 90,
    }
    # the log names every config setting the submit command overrode, the master too (it once
    # compared the master with itself)
    assert ("LOG spark-submit's settings win over the config's for spark.app.name, spark.master, "
            "spark.sql.session.timeZone\n") in out.stdout + out.stderr, out.stderr[-3000:]


def test_no_java_is_a_one_line_error(tmp_path):
    env = _env(JAVA_HOME=str(tmp_path / "no-java"))
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "lake", "--action", "roundtrip", f"lake.root={tmp_path}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert f"bigopt lake: Spark 4 needs Java 17+: JAVA_HOME={tmp_path / 'no-java'} has no bin/java" in text
    assert "Traceback" not in text



def test_a_jvm_that_dies_while_starting_is_one_line_without_py4js_traceback(tmp_path):
    """Spark's JVM exiting as the SparkContext starts (its UI cannot bind SPARK_LOCAL_IP) printed
    py4j's "INFO Exception while sending command." and a Py4JNetworkError traceback on stdout
    (py4j logs it through the root logger, past the `py4j` logger's level), then blamed a JVM
    "killed, or out of memory?". Now: one line saying it exited while starting, pointing at its
    own output (which names the address it could not bind)."""
    env = _env(SPARK_LOCAL_IP="10.254.254.254")
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "lake", "--action", "roundtrip", f"lake.root={tmp_path}",
                          "spark.master=local[1]", "spark.ui=true"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr[-3000:]
    assert "Exception while sending command" not in out.stdout and "Traceback" not in out.stdout, out.stdout
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("bigopt lake: Spark's JVM exited while starting (exit code 1); its output above says why:")
    assert "an address it cannot bind (SPARK_LOCAL_IP, spark.driver.host)" in last
    assert "10.254.254.254" in out.stderr  # Spark's own line, above


def test_py4j_records_on_the_root_logger_are_shown_only_with_verbose():
    """py4j's java_gateway.py logs "Exception while sending command." with ``logging.info`` (the
    root logger): the CLI's handler drops it, and keeps it under -v; other records stay."""
    import logging

    import py4j.java_gateway

    from jobs.cli import Py4jNoise

    def record(name: str, level: int, path: str) -> logging.LogRecord:
        try:
            raise OSError("Answer from Java side is empty")
        except OSError:
            return logging.LogRecord(name, level, path, 1056, "Exception while sending command.", (), sys.exc_info())

    gateway = py4j.java_gateway.__file__
    assert not Py4jNoise().filter(record("root", logging.INFO, gateway))
    assert Py4jNoise(verbose=True).filter(record("root", logging.INFO, gateway))
    assert Py4jNoise().filter(record("root", logging.ERROR, gateway))  # as the py4j logger's WARNING level
    assert Py4jNoise().filter(record("root", logging.INFO, "/repo/jobs/ingest.py"))


def test_a_setting_spark_refuses_is_a_one_line_error_for_the_roundtrip_too(tmp_path):
    """A setting the SparkContext refuses as it starts: `bigopt ingest` said it in one line, the
    roundtrip (which started Spark itself, outside ``run_spark_step``) printed the whole
    Py4JJavaError traceback. (``spark.master=local[0]`` was the case until the twenty-eighth
    session, when the config began refusing it.)"""
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "lake", "--action", "roundtrip", f"lake.root={tmp_path}",
                          "spark.master=local[1]", "spark.conf.spark.scheduler.mode=FOO"], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert ("bigopt lake: a Spark job failed, nothing of it committed (org.apache.spark.SparkIllegalArgumentException: "
            "[INVALID_CONF_VALUE.OUT_OF_RANGE_OF_OPTIONS] The value 'FOO' in the config \"spark.scheduler.mode\" is "
            "invalid.") in out.stderr, text
    assert "Traceback" not in text and "Py4JJavaError" not in text


def test_a_process_spawned_by_a_worker_does_not_warm_up_again(spark):
    """The worker daemon warms its workers up (imports pyarrow/deltalake, loads the kernels).
    A process spawned from a worker re-runs the daemon's module as ``__mp_main__``: the warm-up
    must not run there (it made each Horovod rank start ~5 s later)."""

    def spawn_from_a_worker(_):
        """Which daemon forked this worker, is it warm, and does a process it starts with
        multiprocessing's "spawn" (as Horovod's launcher starts each rank's command) import
        deltalake before it runs anything? The child's exit code says: 3 = it does."""
        import multiprocessing
        import sys

        main = sys.modules["__main__"]
        child = multiprocessing.get_context("spawn").Process(
            target=exec, args=("import sys; sys.exit(3 if 'deltalake' in sys.modules else 4)",))
        child.start()
        child.join()
        yield (main.__spec__.name if main.__spec__ else None, "deltalake" in sys.modules, child.exitcode)

    got = spark.sparkContext.parallelize([0, 1], 2).mapPartitions(spawn_from_a_worker).collect()
    assert got == [("pipelines.worker_daemon", True, 4)] * 2


def test_stop_signals_during_spark_start_wait_for_it_and_a_second_sigterm_is_ignored():
    """A SIGTERM while PySpark launches the JVM used to be raised inside ``launch_gateway``,
    whose clean-up deleted the folder of the JVM's connection file: the JVM ran on, orphaned.
    Now it is delivered once the launch is done. After the first SIGTERM, more are ignored (they
    cut the write's abort short, leaving Parquet files). An error raised while a stop unwound
    (py4j's, its connection cut) counts as the stop."""
    import signal

    from jobs.cli import Terminated, _stop_cleanly_on_sigterm
    from pipelines.stopping import held_stop_signals, stop_behind

    previous = _stop_cleanly_on_sigterm()
    try:
        went_on = []
        try:
            with held_stop_signals():
                os.kill(os.getpid(), signal.SIGTERM)
                went_on.append(True)
        except Terminated:
            went_on.append("stopped after")
        assert went_on == [True, "stopped after"]
        os.kill(os.getpid(), signal.SIGTERM)  # the second: ignored, no exception
    finally:
        signal.signal(signal.SIGTERM, previous)
    cut = RuntimeError("Answer from Java side is empty")
    cut.__context__ = Terminated()
    assert isinstance(stop_behind(cut), Terminated) and stop_behind(RuntimeError("other")) is None


def test_an_ignored_stop_signal_stays_ignored_while_held():
    """A command started by a parent that ignores SIGINT (a shell's background job, ``trap ''
    INT``) inherits SIG_IGN. A launch's hold noted a Ctrl-C anyway (stopping the Horovod ranks
    through ``also``) and sent it again: `bigopt run` said "rank -1 failed", exit 1 (checked by
    hand with ``kill -INT``: now the run goes on to its end). An ignored signal is not noted, and
    is ignored again after the hold even where a handler was set meanwhile, as PySpark's
    SparkContext sets one inside get_spark's hold (left in place, its handler's job
    cancellation over py4j, from inside the main thread's py4j call, logged a 15-line
    "reentrant call" ERROR traceback on every Ctrl-C). A handled signal is still held."""
    import signal

    from pipelines.stopping import held_stop_signals

    stopped, previous = [], signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with held_stop_signals(also=lambda: stopped.append(True)):
            os.kill(os.getpid(), signal.SIGINT)
        assert stopped == [] and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        with held_stop_signals():  # as SparkContext does inside get_spark's hold
            signal.signal(signal.SIGINT, signal.default_int_handler)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with pytest.raises(KeyboardInterrupt):
            with held_stop_signals(also=lambda: stopped.append(True)):
                os.kill(os.getpid(), signal.SIGINT)
        assert stopped == [True]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_cancelling_on_a_stop_waits_for_the_killed_tasks(spark):
    """``cancelAllJobs`` returns while the killed tasks still run: the abort that follows then
    deleted files they were reading, and their tracebacks came after the command's "stopped"
    line. On a stop, the jobs are cancelled and their tasks waited for; other errors cancel
    nothing."""
    import threading
    import time

    from jobs.cli import Terminated
    from pipelines.stopping import cancel_jobs_if_stopping

    sc = spark.sparkContext
    tracker = sc._jsc.sc().statusTracker()

    def running() -> int:
        return sum(int(e.numRunningTasks()) for e in tracker.getExecutorInfos())

    ended = []
    job = threading.Thread(target=lambda: ended.append(
        _fails(lambda: sc.parallelize(range(2), 2).map(lambda x: time.sleep(60)).collect())))
    job.start()
    deadline = time.monotonic() + 60
    while running() < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running() == 2
    cancel_jobs_if_stopping(sc, RuntimeError("a task failed"))  # not a stop: nothing cancelled
    assert running() == 2
    level = sc._jvm.org.apache.logging.log4j.LogManager.getRootLogger().getLevel
    was = str(level())
    sc.setLogLevel("WARN")  # a command's default (the tests' session logs errors only)
    try:
        cancel_jobs_if_stopping(sc, Terminated())
        assert running() == 0
        assert str(level()) == "ERROR"  # the killed tasks' WARN lines, one each, are not printed
    finally:
        sc.setLogLevel(was)
    job.join(30)
    assert ended == [True]


def _fails(fn) -> bool:
    try:
        fn()
    except Exception:  # noqa: BLE001 - the cancelled job's error
        return True
    return False


def _closed_port() -> int:
    import socket

    with socket.socket() as s:  # bound, never listening: a connection to it is refused
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_standalone_master_nothing_answers_at_is_one_line_in_seconds(tmp_path):
    """``spark.master=spark://host:port`` with no master there: Spark's client retried its
    registration for a minute, printed a Java stack trace per try, and the step failed with
    "Cannot call methods on a stopped SparkContext". Now one TCP connection per address says
    it before the JVM starts."""
    import time

    port = _closed_port()
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "lake", "--action", "roundtrip", f"lake.root={tmp_path}",
                          f"spark.master=spark://127.0.0.1:{port},nosuchhost.invalid:7077"],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert out.stderr.strip().splitlines()[-1] == (
        f"bigopt lake: no Spark master answers at spark://127.0.0.1:{port},nosuchhost.invalid:7077 "
        f"(127.0.0.1:{port}: Connection refused; nosuchhost.invalid: unknown host (Name or service not known)): "
        "is the master running, and is spark.master (the config's, or spark-submit's --master) its address?"), text
    assert "Traceback" not in text and "Exception" not in text
    assert time.monotonic() - t0 < 30  # no JVM was started (it took ~70 s)


_NOT_REGISTERED = """
import socket, sys
import pyspark.sql
from pipelines.spark import SparkStartError, get_spark
server = socket.create_server(("127.0.0.1", 0))  # accepts, as a proxy or another service would
port = server.getsockname()[1]
def stopped(self):  # what getOrCreate raises once Spark gave up registering (after ~60 s)
    raise RuntimeError("An error occurred while calling None.org.apache.spark.sql.classic.SparkSession.\\n"
                       ": java.lang.IllegalStateException: Cannot call methods on a stopped SparkContext.")
pyspark.sql.SparkSession.Builder.getOrCreate = stopped
try:
    get_spark("x", master=f"spark://127.0.0.1:{port}")
except SparkStartError as e:
    print("ERROR", str(e).replace(str(port), "PORT"))
"""


def test_a_master_that_never_registers_the_application_is_named(tmp_path):
    out = subprocess.run([sys.executable, "-c", _NOT_REGISTERED], cwd=tmp_path, env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert ("ERROR the Spark master at spark://127.0.0.1:PORT never registered this application (Spark gave up "
            "after its 3 tries of 20 s; its log above says why)") in out.stdout, out.stdout + out.stderr[-3000:]


def test_master_addresses():
    from pipelines.spark import SparkStartError, _master_addresses

    assert _master_addresses("spark://a:7077,b:7078") == [("a", 7077), ("b", 7078)]
    assert _master_addresses("spark://host") == [("host", 7077)]
    assert _master_addresses("spark://[::1]:7000") == [("::1", 7000)]
    assert _master_addresses("spark://[::1]") == [("::1", 7077)]
    with pytest.raises(SparkStartError, match="'x7' is not a port number"):
        _master_addresses("spark://a:x7")


_EXECUTOR_PYTHON = """
import os, socket, sys
import pyspark.sql
from pipelines.spark import get_spark
server = socket.create_server(("127.0.0.1", 0))
def started(self):  # the JVM would start here: what it is given
    print("PYSPARK_PYTHON", os.environ.get("PYSPARK_PYTHON"))
    raise SystemExit(0)
pyspark.sql.SparkSession.Builder.getOrCreate = started
conf = {"spark.pyspark.python": sys.argv[1]} if len(sys.argv) > 1 else {}
get_spark("x", master=f"spark://127.0.0.1:{server.getsockname()[1]}", conf=conf)
"""


def test_a_cluster_s_executors_run_the_venv_s_python_or_the_configured_one(tmp_path):
    """`bigopt ingest ... spark.master=spark://...`: PYSPARK_PYTHON was set for local masters
    only, so the executors ran `python3` on their PATH ("No module named 'pyarrow'"), and the
    config's spark.pyspark.python did nothing (pyspark reads the environment variable only;
    found by the standalone-cluster probe)."""
    env = _env()
    env.pop("PYSPARK_PYTHON")
    for extra, want in (([], sys.executable), (["/opt/conda/bin/python"], "/opt/conda/bin/python")):
        out = subprocess.run([sys.executable, "-c", _EXECUTOR_PYTHON, *extra], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
        assert f"PYSPARK_PYTHON {want}\n" in out.stdout, out.stdout + out.stderr[-2000:]
    out = subprocess.run([sys.executable, "-c", _EXECUTOR_PYTHON], cwd=tmp_path, env={**env, "PYSPARK_PYTHON": "/x/py"},
                         capture_output=True, text=True, timeout=120)
    assert "PYSPARK_PYTHON /x/py\n" in out.stdout  # the user's own setting stays
