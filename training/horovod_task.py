"""What runs in the Spark task that hosts a Horovod rank (imported there: keep it light).

Horovod 0.28.1's ``SparkTaskService`` keeps each Spark task alive at least
``MINIMUM_COMMAND_LIFETIME_S`` (3 s) "after the command started", so that the driver's client,
which started the rank's command, has time to connect again for its exit code. It starts that
clock when the command has *ended* (``_run_command`` runs the command to its end, then sets
the timer), so every Horovod-on-Spark launch waited 3 s more after its ranks were done: a
quarter of a two-rank launch's ~12 s here. :func:`lifetime_from_command_start` starts the clock
when the command starts, as Horovod's docstring says; a command shorter than 3 s still keeps
the task 3 s. The launcher (:func:`training.launch._launch_horovod`) wraps Horovod's Spark
mapper in :func:`mapper_with_lifetime_from_start`, so this runs in each task before Horovod's.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any


def mapper_with_lifetime_from_start(mapper: Callable[[int, Iterable], Iterator[Any]], index: int,
                                    rows: Iterable) -> Iterator[Any]:
    """Horovod's Spark mapper (``horovod.spark.runner._make_mapper``), run after
    :func:`lifetime_from_command_start` in the task's process."""
    lifetime_from_command_start()
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
