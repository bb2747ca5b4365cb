"""Stopping a command cleanly on Ctrl-C or SIGTERM (how Airflow stops a task).

The ``bigopt`` command turns SIGTERM into a KeyboardInterrupt (``jobs.cli.Terminated``), so
the same ``except BaseException`` / ``finally`` clean-up runs as for Ctrl-C: a job's Spark
jobs are cancelled and its write's files deleted. Here: telling a stop apart from other errors,
cancelling the jobs, and holding the signals through stretches a stop must not interrupt.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def held_stop_signals(also: Callable[[], None] | None = None):
    """Note SIGINT / SIGTERM instead of acting on them (calling ``also`` for each), then put the
    previous handlers back and send the first noted signal again, so it reaches them. Outside
    the main thread, where no handler can be set, nothing is held.

    A signal the process ignores on entry (``SIG_IGN``, inherited from a parent that ignores it:
    a background job of a shell, ``trap '' INT``) stays ignored: it is not noted, and it is
    ignored again on exit even where a handler was set for it meanwhile (PySpark's SparkContext
    sets its own SIGINT handler whatever the parent chose). Until the twenty-fourth session the
    hold around a Horovod launch noted it, stopped the ranks (``also``) and sent it again into
    SIG_IGN: "rank -1 failed", exit 1, for a run its parent meant to shield from Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    seen: list[int] = []

    def note(signum, frame):
        seen.append(signum)
        if also is not None:
            also()

    ignored = [s for s in STOP_SIGNALS if signal.getsignal(s) is signal.SIG_IGN]
    previous = {s: signal.signal(s, note) for s in STOP_SIGNALS if s not in ignored}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in ignored:
            signal.signal(s, signal.SIG_IGN)
        if seen:
            os.kill(os.getpid(), seen[0])


def stop_behind(error: BaseException | None) -> KeyboardInterrupt | None:
    """The Ctrl-C / SIGTERM (a KeyboardInterrupt) in ``error``'s chain of causes (an error
    raised while a stop unwound, e.g. py4j's once its connection was cut), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def cancel_jobs_if_stopping(sc, error: BaseException) -> None:
    """On Ctrl-C or SIGTERM while the driver waits for a job: cancel the session's running jobs,
    so their tasks stop writing files before the write is aborted (its files deleted). Other
    errors failed the job already. Best effort: the driver is stopping, and a second signal
    must not skip the abort that follows. Spark's WARN lines for the killed tasks (one per task:
    "Lost task ... TaskKilled (Stage cancelled ...)", after the command's one "stopped" line) are
    not printed: the log level is ERROR from here on."""
    if stop_behind(error) is not None:
        try:
            sc.setLogLevel("ERROR")
            sc.cancelAllJobs()
            wait_for_tasks(sc)
        except BaseException:  # noqa: BLE001 - a gateway already gone: its JVM's tasks go with it
            log.debug("could not cancel the running Spark jobs", exc_info=True)


def wait_for_tasks(sc, timeout: float = 10.0, poll: float = 0.05) -> bool:
    """Wait (at most ``timeout`` s) until no executor runs a task; True when none does.
    ``cancelAllJobs`` returns at once while the killed tasks run on for a moment (a Python
    worker is interrupted, then killed after ``spark.python.task.killTimeout``): files the
    abort deletes meanwhile made them fail reading, and print their tracebacks after the
    command had said it stopped."""
    tracker = sc._jsc.sc().statusTracker()
    deadline = time.monotonic() + timeout
    while True:
        if not sum(int(e.numRunningTasks()) for e in tracker.getExecutorInfos()):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)
