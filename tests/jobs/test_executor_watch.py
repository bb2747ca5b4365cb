"""The executor watch: a cluster job waiting with no executor alive is said, once, and so is
its end (the twenty-third session's cluster probe saw 45 s of silence with its only worker lost)."""
from __future__ import annotations

import logging
import threading

from pipelines.executor_watch import ExecutorWatch, watch_executors


def test_tick_warns_once_per_outage_and_says_when_executors_are_back():
    w = ExecutorWatch("spark://m:7077", after_s=15)
    assert w.tick(0, executors=2, active_stages=1) is None
    assert w.tick(5, executors=0, active_stages=1) is None  # the outage starts
    assert w.tick(15, executors=0, active_stages=1) is None  # 10 s: not yet
    level, msg = w.tick(20, executors=0, active_stages=1)
    assert level == logging.WARNING
    assert msg.startswith("no executor has been alive on spark://m:7077 for 15 s: the job's tasks wait until a "
                          "worker registers")
    assert w.tick(60, executors=0, active_stages=1) is None  # said once
    assert w.tick(65, executors=1, active_stages=1) == (
        logging.INFO, "1 executor(s) on spark://m:7077 again: the job goes on")
    assert w.tick(70, executors=1, active_stages=1) is None


def test_tick_is_quiet_with_no_active_stage():
    """Between jobs a cluster may hold no executor (dynamic allocation): nothing waits."""
    w = ExecutorWatch("yarn", after_s=15)
    assert all(w.tick(t, executors=0, active_stages=0) is None for t in range(0, 100, 5))
    assert w.tick(100, executors=0, active_stages=1) is None  # the clock starts with the stage
    assert w.tick(110, executors=0, active_stages=0) is None
    assert w.tick(120, executors=0, active_stages=1) is None  # a new wait, not 20 s old
    assert w.tick(135, executors=0, active_stages=1)[0] == logging.WARNING


def test_watch_thread_logs_and_ends_with_the_context(caplog):
    class Session:
        class sparkContext:  # noqa: N801 - the attribute pyspark's session has
            master = "spark://m:7077"

    seen = iter([2, 0, 0, 0, 0, 3])
    stop = threading.Event()

    def executors():
        try:
            return next(seen)
        except StopIteration:
            stop.set()
            return 3

    with caplog.at_level(logging.INFO, logger="pipelines.executor_watch"):
        thread = watch_executors(Session, poll_s=0.01, after_s=0.02, probes=(executors, lambda: 1, stop.is_set))
        thread.join(5)
    assert not thread.is_alive()
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and said[0].startswith("no executor has been alive on spark://m:7077")
    assert said[1] == "3 executor(s) on spark://m:7077 again: the job goes on"


def test_watch_thread_ends_when_the_jvm_is_gone():
    class Session:
        class sparkContext:  # noqa: N801
            master = "spark://m:7077"

    def gone():
        raise ConnectionRefusedError("py4j: the JVM is gone")

    thread = watch_executors(Session, poll_s=0.01, probes=(gone, lambda: 1, lambda: False))
    thread.join(5)
    assert not thread.is_alive()
