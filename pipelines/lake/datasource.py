"""Delta tables from Spark without JVM jars: a Spark 4 Python data source over delta-rs.

Format name: ``bigopt_delta``. Jobs normally go through :func:`pipelines.lake.write_table` /
:func:`pipelines.lake.read_table`, which pick the native JVM connector when it is on the
classpath; this module is what runs when it is not.

Write path: each task streams its Arrow batches into Parquet files inside the table directory
(:mod:`pipelines.lake.files`) and returns the add actions as its commit message; the driver
commits them as ONE Delta transaction (:mod:`pipelines.lake.commit`). ``abort`` deletes the
files of every task, including partial files of tasks that died without a message.

Read path: the driver resolves the snapshot (latest, ``versionAsOf`` or ``timestampAsOf``),
keeps the files whose partition values match the ``partition_filter`` option, and plans one
input partition per file, or per row-group range for big files. Tasks read with pyarrow,
projecting the ``columns`` option.

Why partition pruning is an option and not Spark filter pushdown: Spark 4.2 caches the planned
partitions of a Python data source scan per DataFrame, so a filter pushed for one query
(``df.filter("day = 1").count()``) leaks into the next query on the same DataFrame
(``df.count()``). An option is part of the relation itself, so it cannot leak.

Options (all strings, as Spark passes them):
  write: mode, partition_by (JSON list), replace_where (JSON object), merge_schema,
         commit_info (JSON object), compression, row_group_rows, target_file_bytes,
         max_commit_retries, write_id (default: a new one)
  read:  versionAsOf, timestampAsOf, columns (JSON list), partition_filter (JSON object
         {column: value or [values]}), split_bytes
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa
from pyspark.sql.datasource import (
    DataSource,
    DataSourceArrowWriter,
    DataSourceReader,
    InputPartition,
    WriterCommitMessage,
)
from pyspark.sql.types import StructType

FORMAT = "bigopt_delta"


def register(spark) -> None:
    """Register the data source on ``spark`` (idempotent).

    Also makes ``spark`` the JVM's active session on the calling thread: Spark looks Python
    data sources up through the thread's active session, which other threads (a thread pool
    writing several tables at once) do not inherit."""
    try:
        jvm = spark._jvm
        if jvm is not None:
            jvm.org.apache.spark.sql.SparkSession.setActiveSession(spark._jsparkSession)
    except AttributeError:  # Spark Connect: no JVM handle
        pass
    if getattr(spark, "_bigopt_delta_registered", False):
        return
    spark.dataSource.register(DeltaRsDataSource)
    try:
        spark._bigopt_delta_registered = True
    except AttributeError:  # Spark Connect sessions may be slotted
        pass


def _json_opt(options, key, default):
    raw = options.get(key)
    return default if raw in (None, "") else json.loads(raw)


def _bool_opt(options, key) -> bool:
    return str(options.get(key, "false")).lower() in {"1", "true", "yes"}


class DeltaRsDataSource(DataSource):
    @classmethod
    def name(cls) -> str:
        return FORMAT

    @property
    def uri(self) -> str:
        from pipelines.lake.fs import normalize_uri

        path = self.options.get("path")
        if not path:
            raise ValueError(f"{FORMAT}: a table path is required (.load(path) / .save(path))")
        return normalize_uri(path)

    def _snapshot(self):
        from pipelines.lake.reader import DeltaSnapshot

        return DeltaSnapshot(
            self.uri,
            version=int(self.options["versionAsOf"]) if self.options.get("versionAsOf") not in (None, "") else None,
            timestamp=self.options.get("timestampAsOf") or None,
        )

    def schema(self):
        from pipelines.lake.schema import arrow_to_spark

        snap = self._snapshot()
        return arrow_to_spark(snap.schema(_json_opt(self.options, "columns", None)))

    def reader(self, schema: StructType) -> DataSourceReader:
        return DeltaRsReader(
            self._snapshot(), schema, int(self.options.get("split_bytes", 512 << 20)),
            _json_opt(self.options, "partition_filter", None),
        )

    def writer(self, schema: StructType, overwrite: bool):
        return DeltaRsWriter(self.uri, schema, self.options, overwrite)


# ----------------------------------------------------------------------------------- write
@dataclass
class DeltaCommitMessage(WriterCommitMessage):
    adds: list[dict]


class DeltaRsWriter(DataSourceArrowWriter):
    """A DataFrame write as a task write (:mod:`pipelines.lake.tasks`): the same planning,
    file writer, one-transaction commit and abort as jobs that write from their own tasks."""

    def __init__(self, uri: str, schema: StructType, options, overwrite: bool) -> None:
        from pipelines.lake.schema import spark_to_arrow
        from pipelines.lake.tasks import begin_write

        mode = options.get("mode") or ("overwrite" if overwrite else "append")
        if overwrite and mode == "append":
            mode = "overwrite"
        self.commit_info = _json_opt(options, "commit_info", {})
        self.max_commit_retries = int(options.get("max_commit_retries", 15))
        self.committed_version: int | None = None
        # Fail fast on the driver: schema mismatch, bad partitioning, mode=error on an existing table.
        self.tw = begin_write(
            uri, spark_to_arrow(schema), mode=mode, partition_by=list(_json_opt(options, "partition_by", [])),
            replace_where=_json_opt(options, "replace_where", None), merge_schema=_bool_opt(options, "merge_schema"),
            compression=options.get("compression", "zstd"), row_group_rows=int(options.get("row_group_rows", 131_072)),
            target_file_bytes=int(options.get("target_file_bytes", 256 << 20)), write_id=options.get("write_id"),
        )

    def write(self, iterator: Iterator[pa.RecordBatch]) -> DeltaCommitMessage:
        if self.tw.effective_mode == "skip":
            for _ in iterator:
                pass
            return DeltaCommitMessage([])
        return DeltaCommitMessage(self.tw.write_all(iterator))

    def commit(self, messages: list[DeltaCommitMessage | None]) -> None:
        from pipelines.lake.tasks import commit_write

        if self.tw.effective_mode == "skip":
            return
        adds = [a for m in messages if m is not None for a in m.adds]
        self.committed_version = commit_write(self.tw, adds, self.commit_info, self.max_commit_retries)

    def abort(self, messages: list[DeltaCommitMessage | None]) -> None:
        from pipelines.lake.tasks import abort_write

        abort_write(self.tw)  # every file of the write, also partial ones of tasks that sent no message


# ------------------------------------------------------------------------------------ read
class DeltaFilePartition(InputPartition):
    def __init__(self, uri: str, partition_values: dict, row_groups: list[int] | None) -> None:
        super().__init__(uri)
        self.uri = uri
        self.partition_values = partition_values
        self.row_groups = row_groups


class DeltaRsReader(DataSourceReader):
    def __init__(self, snapshot, schema: StructType, split_bytes: int, partition_filter: dict | None) -> None:
        from pipelines.lake.schema import spark_to_arrow

        snapshot.check_no_deletion_vectors()  # read whole, such files bring deleted rows back
        # keep only picklable state: the reader is shipped to the tasks
        self.partition_columns = list(snapshot.partition_columns)
        self.files = snapshot.files(partition_filter)
        self.arrow_schema = spark_to_arrow(schema)
        self.split_bytes = split_bytes

    def partitions(self) -> Sequence[InputPartition]:
        out: list[InputPartition] = []
        for fe in self.files:
            if fe.size > self.split_bytes:
                for rgs in fe.row_group_ranges(self.split_bytes):
                    out.append(DeltaFilePartition(fe.uri, fe.partition_values, rgs))
            else:
                out.append(DeltaFilePartition(fe.uri, fe.partition_values, None))
        # no file (an empty table, a partition filter that matches none): Spark then reads ONE
        # default partition, which is not ours; an empty one of ours reads nothing
        return out or [DeltaFilePartition("", {}, None)]

    def read(self, partition: DeltaFilePartition) -> Iterator[pa.RecordBatch]:
        from pipelines.lake.reader import read_file_batches

        if not partition.uri:  # the empty partition of a scan with no file
            return
        yield from read_file_batches(
            partition.uri, self.arrow_schema, partition.partition_values,
            self.partition_columns, row_groups=partition.row_groups,
        )
