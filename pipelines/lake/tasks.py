"""Delta writes whose rows are produced as Arrow data inside Spark tasks (not as a DataFrame).

Some jobs do their per-row work in vectorised Arrow/NumPy code running in Spark tasks (the
Criteo ingest parses raw bytes, the featurize job maps ids): their rows never exist as JVM
rows, so sending them through a DataFrame writer would only add two format conversions.
Such a job writes its Parquet files from the task and lets the driver commit them:

    tw = begin_write(uri, schema, mode="overwrite", partition_by=["day"],
                     replace_where={"day": [3]})                 # driver: checks, read version
    def task(item):                                               # Spark task
        return tw.write_all(produce(item))                        # add actions (dicts)
    with UncommittedWrites() as writes:                           # an error or a stop in the
        writes.add(tw)                                            # block deletes its files
        adds = [a for r in sc.parallelize(items).map(task).collect() for a in r]
        version = commit_write(tw, adds, commit_info={"job": "..."})  # ONE Delta transaction

The guarantees are those of :func:`pipelines.lake.write_table` (same file writer, same
commit): one write = one commit, conflicting overwrites fail, and a failed write leaves the
table as it was. Files of a failed task attempt are named ``part-<write_id>-*`` and are
removed by :func:`abort_write`.
"""
from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

log = logging.getLogger(__name__)

WRITE_ID_KEY = "bigopt.writeId"
ROW_GROUP_ROWS_KEY = "bigopt.rowGroupRows"  # commit info: the writer's row group size (compaction keeps it)
STATS_COLUMNS_KEY = "delta.dataSkippingStatsColumns"


def new_write_id() -> str:
    """A fresh write id: names a write's files (``part-<write_id>-*``) and marks its commit."""
    return uuid.uuid4().hex[:12]


@dataclass
class TaskWrite:
    """A planned write (picklable: ship it to the tasks)."""

    uri: str
    schema: pa.Schema
    partition_by: list[str]
    mode: str
    replace_where: dict[str, Any] | None
    merge_schema: bool
    write_id: str
    effective_mode: str
    read_version: int | None
    compression: str = "zstd"
    row_group_rows: int = 131_072
    target_file_bytes: int = 256 << 20
    parquet_options: dict[str, Any] | None = None
    stats_columns: list[str] | None = None  # None: statistics on every column

    def open(self):
        """A :class:`~pipelines.lake.files.PartitionedFileWriter` for one task's rows (batches
        must carry the partition columns; they go into the directory names, not the files)."""
        from pipelines.lake.files import PartitionedFileWriter

        return PartitionedFileWriter(
            self.uri, self.schema, self.partition_by, self.write_id, compression=self.compression,
            row_group_rows=self.row_group_rows, target_file_bytes=self.target_file_bytes,
            parquet_options=self.parquet_options, stats_columns=self.stats_columns,
        )

    def write_all(self, batches: Iterable[pa.RecordBatch], partition_values: tuple | None = None) -> list[dict]:
        """Write ``batches`` through one writer and return its add actions; on any failure
        the files it started are removed before the error propagates. A file that cannot be
        written (a full disk, a file-size limit) is a
        :class:`~pipelines.lake.commit.TableWriteError` naming the table: pyarrow's own error
        names neither it nor the file."""
        from pipelines.lake.commit import TableWriteError, readable_error

        w = self.open()
        try:
            try:
                for batch in batches:
                    w.write(batch, partition_values)
                return w.close()
            except TableWriteError:  # the writer's own, naming the table
                raise
            except OSError as e:
                raise TableWriteError(self.uri, readable_error(e), action="writing a data file of") from e
        except BaseException:
            w.discard()
            raise


def begin_write(
    uri: str,
    schema: pa.Schema,
    *,
    mode: str = "append",
    partition_by: Sequence[str] = (),
    replace_where: Mapping[str, Any] | None = None,
    merge_schema: bool = False,
    compression: str = "zstd",
    row_group_rows: int = 131_072,
    target_file_bytes: int = 256 << 20,
    parquet_options: Mapping[str, Any] | None = None,
    stats_columns: Sequence[str] | None = None,
    write_id: str | None = None,
) -> TaskWrite:
    """Driver side, before any task runs: the same checks as ``write_table`` (schema, mode,
    partitioning) raise here, and the read version an overwrite is checked against is fixed.
    ``parquet_options`` go to ``pyarrow.parquet.ParquetWriter`` (e.g. ``use_dictionary``).

    ``stats_columns``: the only columns that get Parquet statistics and Delta min/max (default:
    all). A table created by this write records them as ``delta.dataSkippingStatsColumns``,
    which is also what tells Delta readers (delta-rs parses only the first 32 columns'
    statistics otherwise) which columns have them.

    ``write_id`` (default: a new one) names the write's files (``part-<write_id>-*``) and is
    recorded in its commit as ``bigopt.writeId``."""
    from pipelines.lake.commit import prepare_write
    from pipelines.lake.fs import check_table_path

    uri = check_table_path(uri)
    if replace_where and mode != "overwrite":
        raise ValueError("replace_where is an overwrite of some partitions: use mode='overwrite'")
    effective, read_version, partition_by = prepare_write(
        uri, schema, mode=mode, partition_by=partition_by, merge_schema=merge_schema, replace_where=replace_where,
    )
    return TaskWrite(
        uri, schema, list(partition_by), mode, dict(replace_where) if replace_where else None, merge_schema,
        write_id or new_write_id(), effective, read_version, compression, row_group_rows, target_file_bytes,
        dict(parquet_options) if parquet_options else None, list(stats_columns) if stats_columns is not None else None,
    )


def commit_write(tw: TaskWrite, adds: list[dict], commit_info: Mapping[str, Any] | None = None,
                 max_commit_retries: int = 15) -> int:
    """Commit the tasks' files as ONE transaction; return the table version (on failure the
    files are deleted and the error propagates). The commit records the write's id as
    ``bigopt.writeId`` and its row group size as ``bigopt.rowGroupRows`` (a file smaller than one
    row group does not show it; :func:`pipelines.lake.compaction.file_layout` reads it)."""
    from pipelines.lake.commit import commit

    info = {**dict(commit_info or {}), WRITE_ID_KEY: tw.write_id}
    if adds:  # a commit that adds no file (a drop) tells nothing of the table's files
        info[ROW_GROUP_ROWS_KEY] = tw.row_group_rows
    configuration = None
    if tw.stats_columns is not None:
        configuration = {STATS_COLUMNS_KEY: ",".join(tw.stats_columns)}
    return commit(
        tw.uri, tw.schema, adds, mode=tw.mode, partition_by=tw.partition_by, merge_schema=tw.merge_schema,
        replace_where=tw.replace_where, commit_info=info, read_version=tw.read_version,
        max_commit_retries=max_commit_retries, configuration=configuration,
    )


def commit_writes(writes: Sequence[tuple[TaskWrite, list[dict], Mapping[str, Any] | None]]) -> list[int]:
    """Commit several finished writes (``(write, adds, commit_info)``), in order, one
    transaction each; return their versions. A job that writes several tables runs all its
    tasks first and commits only once every one has succeeded, so a failed task leaves every
    table as it was. Delta has no transaction across tables: if a commit itself fails, the
    writes before it stay committed and those after it are aborted (their files deleted); a
    :class:`~pipelines.lake.commit.TableWriteError` lists the ones that stay (``committed``),
    for the job to say so."""
    from pipelines.lake.commit import TableWriteError

    versions: list[int] = []
    for i, (tw, adds, info) in enumerate(writes):
        try:
            versions.append(commit_write(tw, adds, info))
        except BaseException as e:
            for later, _, _ in writes[i + 1:]:
                _abort_quietly(later)
            if isinstance(e, TableWriteError):
                e.committed = [(w.uri, v) for (w, _, _), v in zip(writes, versions)]
            raise
    return versions


def discard_adds(tw: TaskWrite, adds: Iterable[dict]) -> None:
    """Delete the files of these add actions of ``tw`` (written, never to be committed)."""
    from urllib.parse import unquote

    from pipelines.lake.files import delete_files

    delete_files(tw.uri, [unquote(a["path"]) for a in adds])  # an add's path is the URI-escaped name


def abort_write(tw: TaskWrite) -> int:
    """Delete every file of this write (finished or partial); returns how many were removed."""
    from pipelines.lake.maintenance import remove_write_leftovers

    return remove_write_leftovers(tw.uri, tw.write_id)


def write_committed(tw: TaskWrite) -> bool:
    """Whether ``tw``'s commit is in its table's log (read from the log files, so also a
    commit whose caller was stopped before it returned)."""
    from pipelines.lake.commit import write_in_log

    return write_in_log(tw.uri, tw.write_id, 0 if tw.read_version is None else tw.read_version + 1)


class UncommittedWrites:
    """The driver side of a job that writes tables from tasks, as one block::

        with UncommittedWrites(on_error=stop_jobs) as writes:
            tw = writes.add(begin_write(...))
            ... run the tasks, the driver's own steps, then the commits ...

    When the block ends in an error or a stop (Ctrl-C, SIGTERM), ``on_error(error)`` runs first
    (e.g. cancel the session's Spark jobs, so their tasks stop writing), then every added write
    whose commit is not in its table's log is aborted (its files deleted); a write that was
    committed keeps its files, also one committed just before the stop. Covering the whole
    block, not only its jobs, leaves no instant (between a job's end and its commit, between
    two commits) where a stop leaves files behind."""

    def __init__(self, on_error: Callable[[BaseException], None] | None = None):
        self.on_error = on_error
        self.writes: list[TaskWrite] = []

    def add(self, tw: TaskWrite) -> TaskWrite:
        self.writes.append(tw)
        return tw

    def __enter__(self) -> UncommittedWrites:
        return self

    def __exit__(self, exc_type, error, tb) -> bool:
        if error is None:
            return False
        if self.on_error is not None:
            self.on_error(error)
        for tw in self.writes:
            try:
                committed = write_committed(tw)
            except Exception:  # noqa: BLE001 - a log it cannot read: keep the files (a vacuum finds them)
                log.warning("could not tell whether write %s to %s was committed; its files are kept",
                            tw.write_id, tw.uri, exc_info=True)
                continue
            if not committed:
                _abort_quietly(tw)  # the error that ended the block is the one to raise
        return False


def _abort_quietly(tw: TaskWrite) -> None:
    """:func:`abort_write`, for a write aborted because of another error: its own failure
    (the disk or the store that failed the write) is logged, never raised in that error's place."""
    try:
        abort_write(tw)
    except Exception:  # noqa: BLE001 - the files stay for a vacuum to find
        log.warning("could not delete the files of write %s to %s; `bigopt lake --action vacuum` removes them",
                    tw.write_id, tw.uri, exc_info=True)


def write_arrow(
    uri: str,
    table: pa.Table,
    *,
    mode: str = "append",
    partition_by: Sequence[str] = (),
    replace_where: Mapping[str, Any] | None = None,
    commit_info: Mapping[str, Any] | None = None,
    compression: str = "zstd",
) -> int:
    """Write a small Arrow table from this process (no Spark job) as ONE commit; return the
    version. For driver-side bookkeeping tables (ledgers, summaries) where starting Spark tasks
    would cost more than the write itself."""
    with UncommittedWrites() as writes:  # a stop between the file and its commit leaves no file
        tw = writes.add(begin_write(uri, table.schema, mode=mode, partition_by=partition_by,
                                    replace_where=replace_where, compression=compression))
        return commit_write(tw, tw.write_all(table.to_batches()), commit_info)
