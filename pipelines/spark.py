"""The one place SparkSessions are made.

Local runs get ``local[*]`` bound to 127.0.0.1 with Arrow on, shuffle partitions sized to the
cores, quiet logs and (in tests) no UI. Under spark-submit the master and settings come from
the submit command and are left alone. Every session gets the project's Delta data source
registered (see :mod:`pipelines.lake`).
"""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

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


def _under_spark_submit() -> bool:
    return "SPARK_SUBMIT_OPTS" in os.environ or os.environ.get("SPARK_ENV_LOADED") == "1" or (
        "spark.master" in os.environ.get("PYSPARK_SUBMIT_ARGS", "")
    )


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

    builder = SparkSession.builder.appName(app_name)
    local = master is None and not _under_spark_submit() or (master or "").startswith("local")
    if master is not None:
        builder = builder.master(master)
    elif local:
        builder = builder.master("local[*]")
    if local:
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        # Python workers must run this interpreter (the venv), not whatever python3 is on PATH.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
        builder = builder.config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
        cores = os.cpu_count() or 2
        builder = builder.config("spark.sql.shuffle.partitions", str(max(2, 2 * cores)))
        builder = builder.config("spark.default.parallelism", str(max(2, cores)))
        builder = builder.config("spark.driver.memory", os.environ.get("BIGOPT_DRIVER_MEMORY", "4g"))
        # local workers fork from a daemon that has imported pyarrow/deltalake already (on a
        # cluster, set it in spark.conf once the project is installed on the executors)
        builder = builder.config("spark.python.daemon.module", "pipelines.worker_daemon")
    if ui is None:
        ui = os.environ.get("BIGOPT_SPARK_UI", "1" if not os.environ.get("PYTEST_CURRENT_TEST") else "0") == "1"
    builder = builder.config("spark.ui.enabled", "true" if ui else "false")
    for k, v in _DEFAULTS.items():
        builder = builder.config(k, v)
    for k, v in (conf or {}).items():
        builder = builder.config(k, str(v))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(log_level)
    _register(spark)
    return spark


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
