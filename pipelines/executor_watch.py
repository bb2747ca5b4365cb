"""Say so when a cluster job waits with no executor alive.

On a cluster (``spark://``, YARN, Kubernetes) a job whose only worker is lost does not fail:
Spark logs the lost executor once and its tasks wait, in silence, until a worker registers
again (the twenty-third session's standalone-cluster probe saw 45 s of nothing). A daemon thread
started with a non-local session polls the driver's status tracker every few seconds and logs

- a warning once no executor has been alive for ``after_s`` while a stage is active, naming
  the master and what the tasks wait for;
- an info line when executors are back.

It reads only the driver's own bookkeeping (no job, no network), and ends with the
SparkContext or the JVM. Local masters are never watched: their executor is the driver.

    watch_executors(spark)   # get_spark does it for non-local masters
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

POLL_S = 5.0
AFTER_S = 15.0


@dataclass
class ExecutorWatch:
    """The watch's state: :meth:`tick` takes one observation and returns what to log, if
    anything, as ``(level, message)``."""

    master: str
    after_s: float = AFTER_S
    idle_since: float | None = None  # since when no executor and a stage active
    warned: bool = False

    def tick(self, now: float, executors: int, active_stages: int) -> tuple[int, str] | None:
        if executors > 0:
            self.idle_since = None
            if self.warned:
                self.warned = False
                return logging.INFO, f"{executors} executor(s) on {self.master} again: the job goes on"
            return None
        if not active_stages:  # nothing waits (between jobs): not an outage worth a line yet
            self.idle_since = None
            return None
        if self.idle_since is None:
            self.idle_since = now
        if not self.warned and now - self.idle_since >= self.after_s:
            self.warned = True
            return logging.WARNING, (
                f"no executor has been alive on {self.master} for {now - self.idle_since:.0f} s: the job's "
                "tasks wait until a worker registers with free cores (the master's web UI lists its workers; "
                "a lost worker's log says why it went); Ctrl-C stops the run")
        return None


def _probes(sc) -> tuple[Callable[[], int], Callable[[], int], Callable[[], bool]]:
    """(executors alive, active stages, stopped) read from the driver's status tracker."""
    jsc = sc._jsc.sc()
    tracker = sc.statusTracker()
    # getExecutorInfos lists the driver too
    return (lambda: max(0, len(jsc.statusTracker().getExecutorInfos()) - 1),
            lambda: len(tracker.getActiveStageIds()), jsc.isStopped)


def watch_executors(spark, *, poll_s: float = POLL_S, after_s: float = AFTER_S,
                    probes=None) -> threading.Thread:
    """Start the watch (a daemon thread) over ``spark``'s context; returns the thread."""
    sc = spark.sparkContext
    executors, stages, stopped = probes or _probes(sc)
    watch = ExecutorWatch(sc.master, after_s)

    def loop() -> None:
        while True:
            time.sleep(poll_s)
            try:
                if stopped():
                    return
                said = watch.tick(time.monotonic(), executors(), stages())
            except Exception:  # noqa: BLE001 - the JVM went (the run ends): nothing to watch
                return
            if said:
                log.log(*said)

    thread = threading.Thread(target=loop, name="bigopt-executor-watch", daemon=True)
    thread.start()
    return thread
