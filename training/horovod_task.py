"""What runs in the Spark task that hosts a Horovod rank (imported there: keep it light).

The launcher (:func:`training.launch._launch_horovod`) wraps Horovod's Spark mapper in
:func:`mapper_with_task_fixes`, so two fixes to Horovod 0.28.1 run in each task before Horovod's
own code:

* :func:`lifetime_from_command_start`: ``SparkTaskService`` keeps each Spark task alive at least
  ``MINIMUM_COMMAND_LIFETIME_S`` (3 s) "after the command started", so that the driver's client,
  which started the rank's command, has time to connect again for its exit code. It starts that
  clock when the command has *ended* (``_run_command`` runs the command to its end, then sets
  the timer), so every Horovod-on-Spark launch waited 3 s more after its ranks were done: a
  quarter of a two-rank launch's ~12 s here. The clock now starts when the command starts, as
  Horovod's docstring says; a command shorter than 3 s still keeps the task 3 s.
* :func:`semaphores_released_after_each_command`: ``safe_shell_exec.execute`` makes a
  spawn-context ``multiprocessing.Event`` per command (five named POSIX semaphores) and leaves
  its clean-up to garbage collection. A Spark Python worker that ends without running
  finalizers (Spark stops its workers with a signal) left them to the resource tracker, which
  printed "UserWarning: resource_tracker: There appear to be 5 leaked semaphore objects to clean
  up at shutdown" under a run that went well (after 0 to 2 of a launch's 2 tasks here). Each
  command's event is now released as the command returns.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any


def mapper_with_task_fixes(mapper: Callable[[int, Iterable], Iterator[Any]], index: int,
                           rows: Iterable) -> Iterator[Any]:
    """Horovod's Spark mapper (``horovod.spark.runner._make_mapper``), run after this module's
    fixes in the task's process."""
    lifetime_from_command_start()
    semaphores_released_after_each_command()
    yield from mapper(index, rows)


def lifetime_from_command_start() -> None:
    """Make ``SparkTaskService`` start its minimum-lifetime clock as the command starts (once
    per process; a Python worker that Spark reuses keeps it)."""
    from horovod.runner.common.service.task_service import BasicTaskService
    from horovod.runner.common.util import timeout
    from horovod.spark.task.task_service import SparkTaskService

    if getattr(SparkTaskService, "_lifetime_from_command_start", False):
        return

    def _run_command(self, command, env, event, stdout=None, stderr=None, index=None,
                     prefix_output_with_timestamp=False):
        if self._minimum_command_lifetime_s is not None:
            self._minimum_command_lifetime = timeout.Timeout(self._minimum_command_lifetime_s,
                                                             message="Just measuring runtime")
        BasicTaskService._run_command(self, command, env, event, stdout, stderr, index,
                                      prefix_output_with_timestamp)

    SparkTaskService._run_command = _run_command
    SparkTaskService._lifetime_from_command_start = True


def semaphores_released_after_each_command() -> None:
    """Release the semaphores of the exit event ``safe_shell_exec.execute`` makes for a command
    once the command has returned (its middleman process has ended by then), instead of at
    garbage collection, which a Spark worker may never reach (once per process)."""
    from horovod.runner.common.util import safe_shell_exec

    if getattr(safe_shell_exec, "_semaphores_released", False):
        return
    create_event, execute = safe_shell_exec._create_event, safe_shell_exec.execute
    made = threading.local()  # execute calls _create_event in its own thread

    def _create_event(ctx):
        event = create_event(ctx)
        getattr(made, "events", []).append(event)
        return event

    def _execute(*args, **kwargs):
        made.events = []
        try:
            return execute(*args, **kwargs)
        finally:
            events, made.events = made.events, []
            for event in events:
                release_semaphores(event)

    safe_shell_exec._create_event, safe_shell_exec.execute = _create_event, _execute
    safe_shell_exec._semaphores_released = True


def release_semaphores(event: Any) -> int:
    """Run now the finalizers that unlink the named semaphores of a spawn-context
    ``multiprocessing`` Event (its flag and its condition's lock and counters) and unregister
    them from the resource tracker; each runs once, so garbage collection later does nothing.
    Returns how many ran. A Python whose ``multiprocessing`` internals differ releases none
    (the tracker then cleans up, with its warning), never fails the command."""
    from multiprocessing import synchronize, util

    cond = getattr(event, "_cond", None)
    parts = [getattr(event, "_flag", None), cond] + [getattr(cond, a, None) for a in
                                                     ("_lock", "_sleeping_count", "_woken_count", "_wait_semaphore")]
    locks = [p for p in parts if isinstance(p, synchronize.SemLock)]
    try:
        finalizers = [f for f in list(util._finalizer_registry.values())
                      if f._weakref is not None and any(f._weakref() is lock for lock in locks)]
    except Exception:  # noqa: BLE001 - a clean-up must not fail the command
        return 0
    for f in finalizers:
        f()
    return len(finalizers)
