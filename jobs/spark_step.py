"""Run one Spark pipeline step for a ``bigopt`` command, with a live status line.

    console, report, status = run_spark_step(cfg, "ingest", lambda spark, progress: ingest(spark, cfg, progress=progress),
                                             errors=(IngestError,))
    if status:
        return status       # the error was printed: 2 (cannot run as given) or 1 (exit_status)

The step gets a *starter* for the configured SparkSession, not a session: the steps call it
only when they have work (``pipelines.spark.session_of``), so ``bigopt ingest`` with every file
already ingested, or ``bigopt featurize`` with gold up to date, answers in a second or two
without starting a JVM. The status line shows the step's latest progress message and the
elapsed time; every message is also logged, so a run under spark-submit (no terminal) keeps
the same record.
"""
from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def lake_errors() -> tuple[type[BaseException], ...]:
    """The errors any step that writes the lake may raise, each with a message that names the
    table or file and the remedy: a commit conflict; a lake or input that cannot be written or
    reached (OSError: read-only, checked before Spark; an object store that does not answer,
    no credentials). ``bigopt -v`` logs their traceback too."""
    from pipelines.lake.commit import CommitConflictError

    return CommitConflictError, OSError


def exit_status(e: BaseException) -> int:
    """``bigopt``'s exit status for a step that raised ``e`` (README, "Exit status"): 2 when the
    command cannot run as given, found before any work (an input that is not there, a folder it
    may not write: :mod:`pipelines.errors`), as for a bad setting; 1 when the work failed."""
    from pipelines.errors import MissingInputError, UnwritableError

    return 2 if isinstance(e, (MissingInputError, UnwritableError)) else 1


def spark_failure(e: BaseException) -> str | None:
    """What to tell the user when Spark itself failed under a step, else None: its JVM is gone
    (killed, out of memory: py4j then raises a refused connection, which is no lake error), or
    a Spark job failed (a task's Python worker crashed, a task failed on every attempt). The
    step's writes commit only once their job has succeeded, so what it had not committed is
    not in the lake."""
    from py4j.protocol import Py4JError, Py4JJavaError
    from pyspark import SparkContext
    from pyspark.errors import PythonException

    proc = getattr(SparkContext._gateway, "proc", None)  # the JVM this process started
    if isinstance(e, (Py4JError, OSError)) and proc is not None and proc.poll() is not None:
        return (f"Spark's JVM exited (exit code {proc.returncode}: killed, or out of memory?) while the step ran; "
                "what it had not committed is not in the lake: run the command again")
    if isinstance(e, Py4JJavaError):
        first = str(e.java_exception).splitlines()[0] if e.java_exception is not None else str(e)
    elif isinstance(e, PythonException):  # a Python error in a task: the lines after its traceback's frames
        lines = str(e).splitlines()
        i = max((i for i, ln in enumerate(lines) if ln.startswith('  File "')), default=-1) + 1
        while 0 < i < len(lines) and lines[i].startswith("    "):  # the frame's source line and ^^^ marks
            i += 1
        first = " ".join(ln.strip() for ln in lines[i:] if ln.strip()) or str(e)
        # the error's class without its module (pipelines.lake.commit.TableWriteError: ...)
        first = re.sub(r"^(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_]\w*: )", "", first)
    else:
        return None
    return (f"a Spark job failed, nothing of it committed ({first[:600]}); -v shows the whole error. "
            "Run the command again once the cause is fixed")


def step_error(e: BaseException, errors: tuple[type[BaseException], ...]) -> BaseException | None:
    """The error to print as one line (:func:`error_text`) for ``e``, raised by a step whose own
    errors are ``errors``: ``e`` itself, or what :func:`spark_failure` says; None: raise ``e``."""
    if (why := spark_failure(e)) is not None:
        logging.getLogger("bigopt").debug("the Spark error", exc_info=e)
        return RuntimeError(why)
    return e if isinstance(e, (*errors, *lake_errors())) else None  # every step writes through the lake


def error_line(e: BaseException) -> str:
    """``e``'s message as it is to be read, from a delta-rs error too: one line for its error
    chain, without its colour escapes and Rust backtrace (:func:`pipelines.lake.commit.readable_error`;
    a message of the project's own that lists several lines keeps them)."""
    from pipelines.lake.commit import readable_error

    return readable_error(e)


def error_text(command: str, e: BaseException):
    """``bigopt <command>: <error>`` in red, for an error whose message says it all (its
    traceback is logged at debug level: ``bigopt -v``)."""
    from jobs.console import styled

    logging.getLogger("bigopt").debug("bigopt %s failed", command, exc_info=e)
    return styled((f"bigopt {command}: {error_line(e)}", "red"))


def run_spark_step(
    cfg,
    command: str,
    step: Callable[[Any, Callable[[str], None]], T],
    errors: tuple[type[BaseException], ...],
):
    """Call ``step(start_spark, progress)``; ``start_spark()`` starts the configured
    SparkSession on its first call and returns it on every call. Returns ``(console, result,
    status)``: ``status`` 0 with the step's result, or :func:`exit_status` with ``result`` None
    when ``step`` raised one of ``errors`` or of :func:`lake_errors` (printed as
    ``bigopt <command>: <error>``, to stderr)."""
    from jobs.console import make_console, print_error, styled
    from pipelines.spark import spark_from_config

    # log lines: the time and the message (the caller's file:line is noise here); printed text is
    # never hard-wrapped, so a table path or an error naming one stays whole to copy from a log
    console = make_console(log_path=False, soft_wrap=True)
    t0 = time.perf_counter()
    with console.status(command) as status:
        def progress(msg: str) -> None:
            status.update(styled(msg, (f"  ({time.perf_counter() - t0:.0f}s)", "dim")))
            console.log(msg)

        @functools.cache
        def start_spark():
            status.update("starting Spark")
            return spark_from_config(cfg.spark)

        try:
            return console, step(start_spark, progress), 0
        except Exception as e:  # noqa: BLE001 - printed as one line, or raised again
            if (shown := step_error(e, errors)) is None:
                raise
    print_error(error_text(command, shown))  # once the status line is gone
    return console, None, exit_status(shown)
