"""The one place SparkSessions are made.

Local runs get ``local[*]`` bound to 127.0.0.1 with Arrow on, shuffle partitions sized to the
cores, quiet logs and (in tests) no UI. Under spark-submit, what the submit command set
(``--master``, ``--name``, ``--conf``, the cluster's ``spark-defaults.conf``) wins over the YAML's
``spark`` section and bigopt's defaults, which only fill in the settings it left unset. Every
session gets the project's Delta data source registered (see :mod:`pipelines.lake`).
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Mapping
from typing import Any

from pipelines.stopping import held_stop_signals

log = logging.getLogger(__name__)

_DEFAULTS: dict[str, str] = {
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.execution.arrow.pyspark.fallback.enabled": "false",
    "spark.sql.execution.pythonUDF.arrow.enabled": "true",
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.adaptive.enabled": "true",
    "spark.python.worker.reuse": "true",
    "spark.ui.showConsoleProgress": "false",
}


class SparkStartError(RuntimeError):
    """Spark could not start: no Java, its JVM exited while starting (its own output, above
    the error, says why), or no standalone master answers at ``spark.master``."""


MASTER_CONNECT_TIMEOUT_S = 5.0


def _master_addresses(master: str) -> list[tuple[str, int]]:
    """``spark://host:port[,host2:port2...]`` (standalone, with standby masters) as addresses;
    ``[v6]`` hosts unbracketed. The port defaults to 7077, as Spark's own parser has it."""
    out = []
    for part in master[len("spark://"):].split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or host.endswith(":") or "]" in port:  # no port (an IPv6 host alone)
            host, port = part.strip(), "7077"
        try:
            out.append((host.strip("[]"), int(port)))
        except ValueError:
            raise SparkStartError(f"spark.master {master!r}: {port!r} is not a port number") from None
    return out


def _check_master_reachable(master: str, timeout_s: float = MASTER_CONNECT_TIMEOUT_S) -> None:
    """A standalone master that nothing answers at: Spark's client retries its registration
    for about a minute (3 tries of 20 s, fixed in StandaloneAppClient), prints a Java stack
    trace per try, then stops the SparkContext, and the step failed with "Cannot call methods
    on a stopped SparkContext". One TCP connection per address tells the same in seconds."""
    import socket

    problems = []
    for host, port in _master_addresses(master):
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                return  # one live master (the others may be standbys)
        except socket.gaierror as e:
            problems.append(f"{host}: unknown host ({e.strerror})")
        except TimeoutError:
            problems.append(f"{host}:{port}: no answer in {timeout_s:g} s")
        except OSError as e:
            problems.append(f"{host}:{port}: {e.strerror or e}")
    raise SparkStartError(
        f"no Spark master answers at {master} ({'; '.join(problems)}): is the master running, and is "
        "spark.master (the config's, or spark-submit's --master) its address?")


def _check_java() -> None:
    """Spark's launcher runs ``$JAVA_HOME/bin/java``, else ``java`` on PATH: say so clearly
    before it fails with a traceback."""
    home = os.environ.get("JAVA_HOME")
    java = os.path.join(home, "bin", "java") if home else shutil.which("java")
    if not java or not os.access(java, os.X_OK):
        where = f"JAVA_HOME={home} has no bin/java" if home else "'java' is not on PATH and JAVA_HOME is not set"
        raise SparkStartError(f"Spark 4 needs Java 17+: {where} (install openjdk-17-jre-headless, or set "
                              "JAVA_HOME to a Java 17+ installation)")


def _jvm_running() -> bool:
    """spark-submit started this Python process beside its running JVM (else pyspark starts one)."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def _under_spark_submit() -> bool:
    return _jvm_running() or "SPARK_SUBMIT_OPTS" in os.environ or (
        os.environ.get("SPARK_ENV_LOADED") == "1") or "spark.master" in os.environ.get("PYSPARK_SUBMIT_ARGS", "")


def _submitted_settings() -> dict[str, str]:
    """The settings spark-submit gave this application (its JVM is already running and holds
    them as system properties, which a fresh ``SparkConf`` loads); call only when
    :func:`_jvm_running`. spark-submit always sets ``spark.master`` (``local[*]`` without
    ``--master``) and ``spark.app.name`` (the script's name without ``--name``)."""
    from pyspark import SparkConf, SparkContext

    SparkContext._ensure_initialized()  # connects to spark-submit's JVM: SparkConf() reads it
    return dict(SparkConf().getAll())


def get_spark(
    app_name: str = "bigopt",
    master: str | None = None,
    conf: Mapping[str, Any] | None = None,
    *,
    ui: bool | None = None,
    log_level: str = "WARN",
):
    """Return the active SparkSession or build one.

    ``master``: None means "whatever spark-submit said", else ``local[*]``.
    ``conf``: extra Spark settings (from the YAML ``spark.conf`` section).
    """
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        _register(active)
        return active

    attached = _jvm_running()
    submitted = _submitted_settings() if attached else {}
    settings: dict[str, str] = {"spark.app.name": app_name}
    asked, master = master, submitted.get("spark.master", master)
    local = master is None and not _under_spark_submit() or (master or "").startswith("local")
    if master is not None:
        settings["spark.master"] = master
    elif local:
        settings["spark.master"] = "local[*]"
    if local:
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        # Python workers must run this interpreter (the venv), not whatever python3 is on PATH.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
        cores = os.cpu_count() or 2
        settings.update({
            "spark.driver.host": "127.0.0.1",
            "spark.driver.bindAddress": "127.0.0.1",
            "spark.sql.shuffle.partitions": str(max(2, 2 * cores)),
            "spark.default.parallelism": str(max(2, cores)),
        })
        if not attached:  # under spark-submit the driver JVM runs already
            settings["spark.driver.memory"] = os.environ.get("BIGOPT_DRIVER_MEMORY", "4g")
        # local workers fork from a daemon that has imported pyarrow/deltalake already (on a
        # cluster, set it in spark.conf once the project is installed on the executors). Not when
        # the code comes with --py-files: they are not on the daemon's path
        if not submitted.get("spark.submit.pyFiles"):
            settings["spark.python.daemon.module"] = "pipelines.worker_daemon"
    if ui is None:
        from pipelines.env import spark_ui

        ui = spark_ui()
    settings["spark.ui.enabled"] = "true" if ui else "false"
    settings.update(_DEFAULTS)
    settings.update({k: str(v) for k, v in (conf or {}).items()})
    overridden = sorted({k for k in settings if k in submitted and settings[k] != submitted[k]}
                        | ({"spark.master"} if asked is not None and asked != master else set()))
    if overridden:
        log.info("spark-submit's settings win over the config's for %s", ", ".join(overridden))
    builder = SparkSession.builder
    for k, v in settings.items():
        if k not in submitted:
            builder = builder.config(k, v)
    if not attached:  # this process starts the JVM
        _check_java()
        if not local and "PYSPARK_PYTHON" not in os.environ:
            # pyspark takes the executors' Python from PYSPARK_PYTHON only (else `python3` on their
            # PATH, which lacked pyarrow: "No module named 'pyarrow'"): the config's
            # spark.pyspark.python, else this interpreter, whose path the executors must have
            python = settings.get("spark.pyspark.python") or sys.executable
            os.environ["PYSPARK_PYTHON"] = python
            log.info("the executors run %s (PYSPARK_PYTHON; set it, or spark.conf's spark.pyspark.python, where "
                     "their Python is elsewhere)", python)
    master = submitted.get("spark.master") or settings.get("spark.master") or ""
    deploy = submitted.get("spark.submit.deployMode") or settings.get("spark.submit.deployMode") or "client"
    if master.startswith("spark://") and deploy == "client":  # this process's SparkContext registers
        _check_master_reachable(master)
    try:
        # a SIGTERM raised inside launch_gateway made it delete the folder where the JVM was about
        # to write its connection file: the JVM never watched for this process's exit and ran
        # on, orphaned. Held until it is connected, the JVM ends with this process
        with held_stop_signals():
            spark = builder.getOrCreate()
    except Exception as e:  # noqa: BLE001 - pyspark's error for a JVM that died at start
        from py4j.protocol import Py4JJavaError

        if master.startswith("spark://") and "stopped SparkContext" in str(e):
            # something accepted the connection but no master registered the application: Spark
            # gave up ("All masters are unresponsive!") and stopped the context it was making
            raise SparkStartError(
                f"the Spark master at {master} never registered this application (Spark gave up after "
                "its 3 tries of 20 s; its log above says why): is a Spark master of a compatible version "
                "listening there, and is spark.master (the config's, or spark-submit's --master) its "
                "address?") from e
        gateway_exited = "JAVA_GATEWAY_EXITED" in str(e)
        # a Java exception (spark.conf.spark.scheduler.mode=FOO) came from a JVM that is alive and answered:
        # only py4j's own errors (the connection lost) wait for the JVM's exit code
        code = None if gateway_exited or isinstance(e, Py4JJavaError) else _jvm_exit_code()
        if code is None and not gateway_exited:
            raise
        raise SparkStartError(
            "Spark's JVM exited while starting" + ("" if code is None else f" (exit code {code})")
            + "; its output above says why: a wrong JAVA_HOME, a Java older than 17, too little memory for "
            "spark.driver.memory, an address it cannot bind (SPARK_LOCAL_IP, spark.driver.host)") from e
    spark.sparkContext.setLogLevel(log_level)
    _quiet_local_task_errors(spark, log_level)
    _register(spark)
    if not spark.sparkContext.master.startswith("local"):  # a lost worker's wait is said, not silent
        from pipelines.executor_watch import watch_executors

        watch_executors(spark)
    return spark


# the loggers that print a failed task's Java and Python stack, once per task and attempt
TASK_ERROR_LOGGERS = ("org.apache.spark.executor.Executor", "org.apache.spark.scheduler.TaskSetManager")


def _quiet_local_task_errors(spark, log_level: str) -> None:
    """On a local master, at Spark's default WARN (or ERROR), a failed task's stack traces are
    not printed: each task printed its own Java and Python stack (~200 lines for a full disk
    under ingest's two tasks; hard-failure probe) before the step's one line that says what
    failed, and ``bigopt -v`` (debug logging) logs the whole error and keeps these loggers on.
    On a cluster they go to the executors' logs, and the driver's are kept."""
    import logging

    if (not spark.sparkContext.master.startswith("local") or log_level.upper() not in ("WARN", "ERROR")
            or logging.getLogger().isEnabledFor(logging.DEBUG)):
        return
    jvm = spark.sparkContext._jvm
    off = jvm.org.apache.logging.log4j.Level.OFF
    for name in TASK_ERROR_LOGGERS:
        jvm.org.apache.logging.log4j.core.config.Configurator.setLevel(name, off)


def _jvm_exit_code(wait_s: float = 5.0) -> int | None:
    """The exit code of the JVM this process launched, once it has exited (waiting up to
    ``wait_s``: py4j's "Answer from Java side is empty" comes as the JVM goes), else None.
    A JVM that dies while the SparkContext starts (its UI or driver cannot bind
    ``SPARK_LOCAL_IP``) fails ``getOrCreate`` with py4j's network error, not pyspark's
    JAVA_GATEWAY_EXITED: it was reported as a JVM "killed, or out of memory?" in the step."""
    import subprocess

    from pyspark import SparkContext

    proc = getattr(SparkContext._gateway, "proc", None)
    if proc is None:
        return None
    try:
        return proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:  # alive: another error
        return None


def _register(spark) -> None:
    from pipelines.lake.datasource import register

    register(spark)


def spark_from_config(cfg) -> Any:
    """A session from a :class:`pipelines.config.SparkConfig` section."""
    return get_spark(app_name=cfg.app_name, master=cfg.master, conf=cfg.conf, ui=cfg.ui, log_level=cfg.log_level)


def session_of(spark) -> Any:
    """``spark`` itself, or, when it is a zero-argument callable, the session it starts.
    Pipeline steps take either, so a step with nothing to do (every input file already
    ingested, gold already built) returns without starting Spark when given a starter."""
    return spark() if callable(spark) else spark
