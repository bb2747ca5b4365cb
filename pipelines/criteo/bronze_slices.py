"""Featurize's unit of work: bronze *slices* (a file, or a range of its row groups when it is
large) packed into tasks, and reading them.

    tasks = bronze_tasks(files, sc.defaultParallelism)   # about two tasks per core, by bytes
    for batch in read_slice(sl, schema, dictionary=SPARSE): ...

A bronze file that cannot be read (missing, not Parquet, damaged pages) raises
:class:`BronzeFileError` in the task that reads it; the tasks return it as a result, and the
driver raises :class:`UnreadableBronzeError` naming every such file and the remedy.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipelines.criteo.split import FeaturizeError

BATCH_ROWS = 1 << 18  # rows a task transforms at a time
SLICE_BYTES = 128 << 20  # a bronze file bigger than this (or than its share of the cores) is cut
TASK_BYTES = 512 << 20  # at most this much bronze Parquet per task (a task streams it by batch)


class BronzeFileError(RuntimeError):
    """A bronze data file that cannot be read (missing, not Parquet, damaged pages); its
    message is ``"<uri> (<error>)"``. The tasks that read bronze return it as a result, so
    the job runs to its end, names every such file and Spark neither retries nor logs it."""


def problem_of(uri: str, e: BaseException) -> str:
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{uri} ({type(e).__name__}: {first})"


class UnreadableBronzeError(FeaturizeError):
    """Bronze files that cannot be read: which (``problems``), and what to do about it."""

    def __init__(self, problems: Iterable[str]):
        self.problems = sorted(set(problems))
        n = len(self.problems)
        what = f"bronze file {self.problems[0]}" if n == 1 else f"{n} bronze files"
        them = ("the file", "its source", "that source's") if n == 1 else ("them", "their sources", "those sources'")
        msg = (f"{what} cannot be read; the table is damaged there: restore {them[0]}, or re-ingest {them[1]} "
               f"with `bigopt ingest --force`, which replaces {them[2]} rows")
        super().__init__(msg if n == 1 else msg + ":\n  " + "\n  ".join(self.problems))


@dataclass(frozen=True)
class BronzeSlice:
    """A piece of a task's work: one bronze file, or a contiguous range of its row groups."""

    uri: str
    day: int | None
    row_groups: tuple[int, ...] | None = None  # None: the whole file
    size: int = 0  # Parquet bytes (estimated for a range)


def bronze_slices(files: list, parallelism: int, max_bytes: int = SLICE_BYTES) -> list[BronzeSlice]:
    """Cut ``files`` (:class:`~pipelines.lake.FileEntry`) into slices of at most ``max_bytes``
    and small enough that there are about two per core; a file is cut only at row groups."""
    total = sum(f.size for f in files)
    target = max(1, min(max_bytes, -(-total // (2 * max(1, parallelism)))))
    out, unreadable = [], []
    for f in files:
        day = day_of(f)
        parts = -(-f.size // target)
        if parts <= 1 or f.size <= target * 3 // 2:
            out.append(BronzeSlice(f.uri, day, None, f.size))
            continue
        try:
            md = f.metadata
        except (OSError, pa.ArrowException) as e:
            unreadable.append(problem_of(f.uri, e))
            continue
        rows = np.array([md.row_group(i).num_rows for i in range(md.num_row_groups)], dtype=np.int64)
        if len(rows) <= 1:
            out.append(BronzeSlice(f.uri, day, None, f.size))
            continue
        # contiguous ranges of about equal rows: cut where the running total passes k/parts
        ends = np.cumsum(rows)
        bounds = np.searchsorted(ends, np.arange(1, parts) * ends[-1] / parts, side="left") + 1
        edges = sorted({0, *bounds.tolist(), len(rows)})
        out.extend(
            BronzeSlice(f.uri, day, tuple(range(a, b)), int(f.size * rows[a:b].sum() // ends[-1]))
            for a, b in zip(edges, edges[1:]) if b > a
        )
    if unreadable:
        raise UnreadableBronzeError(unreadable)
    return out


def bronze_tasks(files: list, parallelism: int, task_bytes: int = TASK_BYTES) -> list[list[BronzeSlice]]:
    """The slices of ``files`` packed into tasks: two per core (more if a task would exceed
    ``task_bytes``), balanced by bytes (largest slice first, into the lightest task). Few big
    tasks: a PySpark task costs ~60 ms of CPU to start, and a task's output (gold files,
    vocabulary partials) shrinks with the number of tasks, not of slices."""
    slices = bronze_slices(files, parallelism)
    total = sum(s.size for s in slices)
    n = min(len(slices), max(2 * max(1, parallelism), -(-total // task_bytes)))
    tasks: list[list[BronzeSlice]] = [[] for _ in range(n)]
    load = [0] * n
    for sl in sorted(slices, key=lambda s: -s.size):
        i = load.index(min(load))
        tasks[i].append(sl)
        load[i] += sl.size
    return tasks


def read_slice(sl: BronzeSlice, schema: pa.Schema, dictionary: Iterable[str] = ()) -> Iterator[pa.RecordBatch]:
    """The slice's rows in batches of ``BATCH_ROWS``, columns of ``schema`` (``dictionary``:
    columns read dictionary-encoded, as Parquet stores them)."""
    from pipelines.lake.reader import open_parquet

    try:
        pf = open_parquet(sl.uri, read_dictionary=list(dictionary) or None)
        yield from pf.iter_batches(
            batch_size=BATCH_ROWS, row_groups=list(sl.row_groups) if sl.row_groups is not None else None,
            columns=schema.names, use_threads=False,
        )
    except (OSError, pa.ArrowException) as e:  # missing, not Parquet, damaged pages
        raise BronzeFileError(problem_of(sl.uri, e)) from None


def unreadable_from(e: BronzeFileError, rest: list[BronzeSlice]) -> list[str]:
    """A task's problems once one of its slices could not be read: that error, and the files
    of its later slices whose footers cannot be read (their rows are not read: the job fails
    anyway). Each file is opened once, however many slices it has."""
    return [str(e), *unreadable_footers(dict.fromkeys(sl.uri for sl in rest))]


def unreadable_footers(uris: Iterable[str]) -> list[str]:
    """The files that cannot even be opened (their footer read), as problem strings."""
    from pipelines.lake.reader import open_parquet

    out = []
    for uri in uris:
        try:
            open_parquet(uri)
        except (OSError, pa.ArrowException) as e:
            out.append(problem_of(uri, e))
    return out


def day_of(f) -> int | None:
    d = f.partition_values.get("day")
    return None if d is None else int(d)
