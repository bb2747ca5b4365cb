"""Shared lake I/O: every job reads and writes Delta tables through these functions.

    from pipelines.lake import write_table, read_table, DeltaSnapshot
    v = write_table(df, "lake/criteo/bronze", mode="append", partition_by=["day"],
                    commit_info={"job": "ingest"})
    df = read_table(spark, "lake/criteo/bronze", version=v, columns=["label", "I1"])

Engine choice (``BIGOPT_DELTA_ENGINE`` = ``auto`` | ``native`` | ``deltars``): with ``auto``
(default) the JVM Delta connector (``format("delta")``) is used when its classes are on the
driver's classpath, as on a cluster started with ``--packages io.delta:delta-spark_2.13:...``;
otherwise the project's delta-rs Python data source. Both write the same Delta protocol, so a
table written by one is read by the other.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from pipelines.lake.commit import CommitConflictError, TableExistsError, TableWriteError, table_exists
from pipelines.lake.files import partition_value_str
from pipelines.lake.compaction import CompactionRunningError, optimize
from pipelines.lake.maintenance import commit_metadata, data_version, history, table_version, vacuum
from pipelines.lake.reader import DeltaSnapshot, FileEntry
from pipelines.lake.schema import SchemaMismatchError
from pipelines.lake.tasks import WRITE_ID_KEY, new_write_id

__all__ = [
    "CommitConflictError",
    "CompactionRunningError",
    "DeltaSnapshot",
    "FileEntry",
    "SchemaMismatchError",
    "TableExistsError",
    "TableWriteError",
    "delta_engine",
    "commit_metadata",
    "data_version",
    "history",
    "optimize",
    "read_table",
    "table_exists",
    "table_version",
    "vacuum",
    "write_table",
]

def delta_engine(spark) -> str:
    """'native' when the JVM Delta connector is usable on this session, else 'deltars'."""
    from pipelines.env import delta_engine_choice

    choice = delta_engine_choice()  # `bigopt` checked it as it started
    if choice != "auto":
        return choice
    cached = getattr(spark, "_bigopt_delta_engine", None)
    if cached:
        return cached
    engine = "deltars"
    try:
        jvm = spark._jvm  # absent on Spark Connect
        if jvm is not None:
            jvm.java.lang.Class.forName("org.apache.spark.sql.delta.sources.DeltaDataSource")
            engine = "native"
    except Exception:  # noqa: BLE001 - any failure means "not available"
        engine = "deltars"
    try:
        spark._bigopt_delta_engine = engine
    except AttributeError:
        pass
    return engine


def _sql_literal(v: Any) -> str:
    if isinstance(v, str):
        return "'" + v.replace("'", "''") + "'"
    return str(v)


def _replace_where_sql(replace_where: Mapping[str, Any]) -> str:
    parts = []
    for col, v in replace_where.items():
        if isinstance(v, (list, tuple, set)):
            parts.append(f"`{col}` IN ({', '.join(_sql_literal(x) for x in v)})")
        else:
            parts.append(f"`{col}` = {_sql_literal(v)}")
    return " AND ".join(parts)


def write_table(
    df,
    path: str,
    mode: str = "append",
    *,
    partition_by: Sequence[str] | None = None,
    replace_where: Mapping[str, Any] | None = None,
    merge_schema: bool = False,
    commit_info: Mapping[str, Any] | None = None,
    compression: str = "zstd",
    row_group_rows: int | None = None,
    target_file_bytes: int | None = None,
) -> int:
    """Write a Spark DataFrame to the Delta table at ``path`` as ONE commit; return its version.

    mode: append | overwrite | error | ignore. ``replace_where={"day": 3}`` (overwrite only)
    atomically replaces just those partitions, which makes re-runs idempotent. A schema that
    does not match the table raises :class:`SchemaMismatchError` and commits nothing;
    ``merge_schema=True`` allows new nullable columns.
    """
    from pipelines.lake.fs import normalize_uri

    uri = normalize_uri(path)
    if replace_where and mode != "overwrite":
        raise ValueError("replace_where is an overwrite of some partitions: use mode='overwrite'")
    write_id = new_write_id()
    spark = df.sparkSession
    if delta_engine(spark) == "native":  # Delta's own writer keeps a table's partitioning by itself
        w = df.write.format("delta").mode({"error": "errorifexists"}.get(mode, mode)).option("compression", compression)
        if partition_by:
            w = w.partitionBy(*partition_by)
        if replace_where:
            w = w.option("replaceWhere", _replace_where_sql(replace_where))
        if merge_schema:
            w = w.option("mergeSchema", "true")
        w = w.option("userMetadata", json.dumps({**dict(commit_info or {}), WRITE_ID_KEY: write_id}))
        w.save(uri)
    else:
        from pipelines.lake.commit import prepare_write
        from pipelines.lake.datasource import FORMAT, register
        from pipelines.lake.schema import spark_to_arrow

        register(spark)
        # same checks the writer repeats: raise the project's own errors here, in the caller
        effective, _, partition_by = prepare_write(
            uri, spark_to_arrow(df.schema), mode=mode, partition_by=partition_by,
            merge_schema=merge_schema, replace_where=replace_where,
        )
        w = (
            df.write.format(FORMAT)
            .mode("overwrite" if mode == "overwrite" else "append")
            .option("mode", mode)
            .option("partition_by", json.dumps(list(partition_by or [])))
            .option("merge_schema", str(bool(merge_schema)).lower())
            .option("commit_info", json.dumps(dict(commit_info or {})))
            .option("write_id", write_id)  # names the files; the commit records it as WRITE_ID_KEY
            .option("compression", compression)
        )
        if replace_where:
            w = w.option("replace_where", json.dumps(dict(replace_where), default=partition_value_str))
        if row_group_rows:
            w = w.option("row_group_rows", str(row_group_rows))
        if target_file_bytes:
            w = w.option("target_file_bytes", str(target_file_bytes))
        try:
            w.save(uri)
        except Exception as e:  # the data source's commit runs in Spark, which wraps its errors
            errors = {c.__name__: c for c in (CommitConflictError, SchemaMismatchError)}
            if m := re.search(rf"({'|'.join(errors)}): (.+)", str(e)):
                raise errors[m.group(1)](m.group(2)) from e
            raise
        if effective == "skip":  # mode "ignore" on an existing table: nothing written
            return table_version(uri)
    return _version_of_write(uri, write_id)


def _version_of_write(uri: str, write_id: str) -> int:
    """The version our commit got (other writers may have committed after it)."""
    for h in history(uri, 50):
        if commit_metadata(h).get(WRITE_ID_KEY) == write_id:
            return int(h["version"])
    return table_version(uri)


def read_table(
    spark,
    path: str,
    *,
    version: int | None = None,
    timestamp: str | None = None,
    columns: Sequence[str] | None = None,
    partition_filter: Mapping[str, Any] | None = None,
):
    """Read the Delta table at ``path`` (latest, or pinned by ``version`` / ``timestamp``).

    ``columns`` projects at the scan: only those columns are read from the files.
    ``partition_filter={"day": [0, 1]}`` reads only those partitions' files."""
    from pipelines.lake.fs import normalize_uri

    uri = normalize_uri(path)
    if delta_engine(spark) == "native":
        r = spark.read.format("delta")
        if version is not None:
            r = r.option("versionAsOf", int(version))
        if timestamp is not None:
            r = r.option("timestampAsOf", str(timestamp))
        df = r.load(uri)
        if partition_filter:
            from pyspark.sql import functions as F

            for col, v in partition_filter.items():
                vals = list(v) if isinstance(v, (list, tuple, set)) else [v]
                df = df.filter(F.col(col).isin(vals))
        return df.select(*columns) if columns else df
    from pipelines.lake.datasource import FORMAT, register

    register(spark)
    r = spark.read.format(FORMAT)
    if version is not None:
        r = r.option("versionAsOf", str(int(version)))
    if timestamp is not None:
        r = r.option("timestampAsOf", str(timestamp))
    if columns:
        r = r.option("columns", json.dumps(list(columns)))
    if partition_filter:
        # dates, timestamps, decimals as their partition-value strings (the form the log holds)
        r = r.option("partition_filter", json.dumps({k: list(v) if isinstance(v, (list, tuple, set)) else v
                                                     for k, v in partition_filter.items()}, default=partition_value_str))
    return r.load(uri)
