"""Task-side Parquet file writing with Delta add-action statistics.

A Spark task streams Arrow record batches into :class:`PartitionedFileWriter`, which groups
rows by partition values, buffers them into row groups of ``row_group_rows`` rows, rolls files
at ``target_file_bytes`` and, on close, returns one Delta ``add`` action per file with
``numRecords`` and ``nullCount`` counted as the rows stream through and ``minValues`` /
``maxValues`` taken from the row-group statistics the Parquet writer computes anyway (no
second pass over the data, no second read of the file).

Partition columns are not stored in the data files (the Delta convention): their values live
in the add action's ``partitionValues`` and in the Hive-style directory name.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow.fs import FileType

from pipelines.lake.fs import filesystem_for, join

# Delta truncates string statistics; a truncated max would not be an upper bound, so we only
# record string min/max when every value fits.
_MAX_STAT_STRING = 32


def partition_value_str(value: Any) -> str | None:
    """Delta's serialized form of a partition value (``None`` for null)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, _dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(value, _dt.date):
        return value.isoformat()
    return str(value)


MAX_DIR_NAME = 255  # bytes in one path component (a partition folder): every local filesystem's limit


def int_range(t: pa.DataType) -> tuple[int, int] | None:
    """(min, max) of an integer Arrow type (a partition value outside it cannot be committed:
    readers fail to parse it); None for other types."""
    if not pa.types.is_integer(t):
        return None
    if pa.types.is_signed_integer(t):
        return -(1 << (t.bit_width - 1)), (1 << (t.bit_width - 1)) - 1
    return 0, (1 << t.bit_width) - 1


def partition_dir(partition_by: list[str], values: tuple) -> str:
    parts = []
    for col, v in zip(partition_by, values):
        s = partition_value_str(v)
        parts.append(f"{col}={'__HIVE_DEFAULT_PARTITION__' if s is None else quote(s, safe='')}")
    return "/".join(parts)


def _stat_value(v: Any, t: pa.DataType, side: str) -> Any:
    """A Parquet statistics value of Arrow type ``t`` as Delta writes it in ``minValues`` /
    ``maxValues`` (``side``: "min" or "max"; None: no usable bound)."""
    if pa.types.is_timestamp(t):
        if v.tzinfo is not None:
            v = v.astimezone(_dt.timezone.utc).replace(tzinfo=None)
        return v.isoformat(timespec="milliseconds") + "Z"  # strftime's %Y does not pad a year before 1000
    if pa.types.is_date(t):
        return v.isoformat()
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        f = float(v)
        # a decimal as a JSON number, rounded outwards: a float rounded to nearest could
        # exclude the value, and readers then skip the file for it
        if pa.types.is_decimal(t) and Decimal(f) != v and (Decimal(f) > v) == (side == "min"):
            f = math.nextafter(f, -math.inf if side == "min" else math.inf)
        return f if math.isfinite(f) else None  # Parquet leaves NaN out of its min/max, not inf
    if isinstance(v, str) and len(v) > _MAX_STAT_STRING:
        return _truncated_bound(v, side)
    return v


def _truncated_bound(s: str, side: str) -> str | None:
    """A bound of at most 32 characters for a longer string, as Parquet's truncated statistics
    are: its prefix is below it; the prefix with its last character incremented is above every
    string that starts with that prefix (in code point order, which is UTF-8's byte order).
    Until the fifteenth session such a column got no bound at all, and delta-rs's pyarrow
    reader then skipped the file for any filter on it (delta-io/delta-rs#3032): rows of the
    quarantine's `reason` or the ledger's `path` went missing for other readers."""
    prefix = s[:_MAX_STAT_STRING]
    if side == "min":
        return prefix
    chars = list(prefix)
    while chars:
        c = ord(chars[-1]) + 1
        c = 0xE000 if 0xD800 <= c <= 0xDFFF else c  # no surrogates: not UTF-8
        if c <= 0x10FFFF:
            chars[-1] = chr(c)
            return "".join(chars)
        chars.pop()  # U+10FFFF has no successor: increment the character before it
    return None


def _min_max_capable(t: pa.DataType) -> bool:
    return (
        pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_timestamp(t)
        or pa.types.is_date(t)
        or pa.types.is_decimal(t)
    )


def file_min_max(md: pq.FileMetaData, schema: pa.Schema) -> tuple[dict[str, Any], dict[str, Any]]:
    """Delta ``minValues`` / ``maxValues`` of a written file, from the statistics the Parquet
    writer computed for each row group (no second pass over the data). A column gets no bound
    when a row group with values has none (e.g. a string over Parquet's statistics size) or
    when a bound is not representable (an infinite float, a string over 32 characters)."""
    leaf = {}
    if md.num_row_groups:
        rg = md.row_group(0)
        leaf = {rg.column(j).path_in_schema: j for j in range(md.num_columns)}
    lo: dict[str, Any] = {}
    hi: dict[str, Any] = {}
    for f in schema:
        j = leaf.get(f.name)
        if j is None or not _min_max_capable(f.type):
            continue
        col_lo = col_hi = None
        for i in range(md.num_row_groups):
            rg = md.row_group(i)
            st = rg.column(j).statistics
            if st is not None and st.has_null_count and st.null_count == rg.num_rows:
                continue  # only nulls: no bound to contribute
            if st is None or not st.has_min_max:
                break
            a, b = _stat_value(st.min, f.type, "min"), _stat_value(st.max, f.type, "max")
            if a is None or b is None:
                break
            col_lo = a if col_lo is None else min(col_lo, a)
            col_hi = b if col_hi is None else max(col_hi, b)
        else:
            if col_lo is not None:
                lo[f.name], hi[f.name] = col_lo, col_hi
    return lo, hi


@dataclass
class _OpenFile:
    rel_path: str
    writer: pq.ParquetWriter
    partition_values: dict[str, str | None]
    rows: int = 0
    bytes_in: int = 0
    nulls: dict[str, int] = field(default_factory=dict)


def _current_task() -> int:
    """The Spark partition this code runs in (0 outside a Spark task)."""
    try:
        from pyspark import TaskContext
    except ImportError:  # pragma: no cover - pyspark is a dependency; a bare pyarrow process
        return 0
    ctx = TaskContext.get()
    return ctx.partitionId() if ctx is not None else 0


class PartitionedFileWriter:
    """Writes one task's rows into Parquet files under ``table_uri``."""

    def __init__(
        self,
        table_uri: str,
        schema: pa.Schema,
        partition_by: list[str],
        write_id: str,
        *,
        compression: str = "zstd",
        row_group_rows: int = 131_072,
        target_file_bytes: int = 256 << 20,
        parquet_options: dict[str, Any] | None = None,
        stats_columns: list[str] | None = None,
        task: int | None = None,
    ) -> None:
        self.table_uri = table_uri
        self.fs, self.root = filesystem_for(table_uri)
        self.partition_by = list(partition_by)
        self.data_schema = pa.schema([f for f in schema if f.name not in self.partition_by])
        self.write_id = write_id
        self.compression = compression
        self.row_group_rows = row_group_rows
        self.target_file_bytes = target_file_bytes
        self.parquet_options = dict(parquet_options or {})
        # ParquetWriter's write_statistics: every column, or the named ones this file holds
        self.write_statistics: bool | list[str] = True if stats_columns is None else [
            c for c in stats_columns if c in self.data_schema.names]
        # a struct's nullCount is an object of its fields' counts in Delta; a number there makes
        # the log entry unreadable to delta-rs, so structs get none (null counts are optional)
        self.null_count_columns = [f.name for f in self.data_schema if not pa.types.is_struct(f.type)]
        self._open: dict[tuple, _OpenFile] = {}
        self._pending: dict[tuple, list[pa.RecordBatch]] = {}
        self._pending_rows: dict[tuple, int] = {}
        self._done: list[dict] = []
        self.written_paths: list[str] = []
        # File names carry the task and the file's sequence in it, so that a write's files sort
        # (and readers that list by path read them) in the order the rows were produced, not
        # in the order of random ids: the same input gives the same table order every run.
        self.task = _current_task() if task is None else task
        self._seq = 0

    # -- writing ---------------------------------------------------------------------------
    def write(self, batch: pa.RecordBatch, partition_values: tuple | None = None) -> None:
        """Buffer ``batch``. Its partition columns decide its files; a caller that knows the
        whole batch belongs to one partition passes ``partition_values`` (in ``partition_by``
        order) and the batch may then omit those columns (no per-row grouping is done).
        A file that cannot be written (a full disk) raises
        :class:`~pipelines.lake.commit.TableWriteError` naming the table, as :meth:`close` does."""
        with self._naming_the_table():
            self._write(batch, partition_values)

    @contextlib.contextmanager
    def _naming_the_table(self):
        """pyarrow's error for a file it cannot write names neither the table nor the file
        (``[Errno 28] Error writing bytes to file``): until the twenty-ninth session a full disk
        under ingest's or featurize's tasks was one line that named no folder."""
        from pipelines.lake.commit import TableWriteError, readable_error

        try:
            yield
        except TableWriteError:
            raise
        except OSError as e:
            raise TableWriteError(self.table_uri, readable_error(e), action="writing a data file of") from e

    def _write(self, batch: pa.RecordBatch, partition_values: tuple | None) -> None:
        if batch.num_rows == 0:
            return
        if not self.partition_by:
            self._buffer((), batch.select(self.data_schema.names))
            return
        if partition_values is not None:
            if len(partition_values) != len(self.partition_by):
                raise ValueError(f"partition_values {partition_values} do not match partition_by {self.partition_by}")
            self._buffer(tuple(partition_values), batch.select(self.data_schema.names))
            return
        keys = pa.Table.from_batches([batch]).select(self.partition_by)
        grouped = keys.group_by(self.partition_by, use_threads=False).aggregate([])
        if grouped.num_rows == 1:
            self._buffer(tuple(grouped.column(c)[0].as_py() for c in self.partition_by), batch.select(self.data_schema.names))
            return
        for i in range(grouped.num_rows):
            values = tuple(grouped.column(c)[i].as_py() for c in self.partition_by)
            mask = None
            for c, v in zip(self.partition_by, values):
                col = batch.column(batch.schema.get_field_index(c))
                m = pc.is_null(col) if v is None else pc.fill_null(pc.equal(col, pa.scalar(v, col.type)), False)
                mask = m if mask is None else pc.and_(mask, m)
            self._buffer(values, batch.filter(mask).select(self.data_schema.names))

    def _buffer(self, key: tuple, batch: pa.RecordBatch) -> None:
        batch = batch.cast(self.data_schema) if batch.schema != self.data_schema else batch
        self._pending.setdefault(key, []).append(batch)
        self._pending_rows[key] = self._pending_rows.get(key, 0) + batch.num_rows
        if self._pending_rows[key] >= self.row_group_rows:
            self._flush(key, whole_groups=True)

    def _flush(self, key: tuple, whole_groups: bool = False) -> None:
        """Write the rows buffered for ``key`` as row groups of ``row_group_rows`` rows (the
        last one of a file may be shorter). ``whole_groups``: write only full row groups and
        keep the rest buffered for the next."""
        batches = self._pending.pop(key, [])
        n = self._pending_rows.pop(key, 0)
        if not batches:
            return
        table = pa.Table.from_batches(batches, schema=self.data_schema)
        if whole_groups and (rest := n % self.row_group_rows):
            self._pending[key], self._pending_rows[key] = table.slice(n - rest).to_batches(), rest
            table = table.slice(0, n - rest)
        f = self._open.get(key)
        if f is None:
            f = self._new_file(key)
        f.writer.write_table(table, row_group_size=self.row_group_rows)
        f.rows += table.num_rows
        f.bytes_in += table.nbytes
        for name in self.null_count_columns:
            f.nulls[name] = f.nulls.get(name, 0) + table.column(name).null_count
        if f.bytes_in >= self.target_file_bytes:
            self._close_file(key)

    def _new_file(self, key: tuple) -> _OpenFile:
        # the uuid keeps names of two attempts of one task apart
        name = f"part-{self.write_id}-{self.task:05d}-{self._seq:04d}-{uuid.uuid4().hex}.{self.compression}.parquet"
        self._seq += 1
        rel = f"{partition_dir(self.partition_by, key)}/{name}" if self.partition_by else name
        full = join(self.root, rel)
        parent = full.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        sink = self.fs.open_output_stream(full)
        writer = pq.ParquetWriter(sink, self.data_schema, compression=self.compression,
                                  write_statistics=self.write_statistics, **self.parquet_options)
        self.written_paths.append(rel)
        f = _OpenFile(rel, writer, {c: partition_value_str(v) for c, v in zip(self.partition_by, key)})
        f._sink = sink  # type: ignore[attr-defined]
        self._open[key] = f
        return f

    def _close_file(self, key: tuple) -> None:
        f = self._open.pop(key)
        f.writer.close()
        f._sink.close()  # type: ignore[attr-defined]
        size = self.fs.get_file_info(join(self.root, f.rel_path)).size
        if size is None:  # deleted under us: by the driver's abort of this write (Ctrl-C, SIGTERM, a failure)
            if write_aborted(self.table_uri, self.write_id):
                raise WriteAbortedError(f"write {self.write_id} to {self.table_uri} was aborted; its files were removed")
            raise FileNotFoundError(f"{join(self.root, f.rel_path)} disappeared as its writer closed it")
        lo, hi = file_min_max(f.writer.writer.metadata, self.data_schema)
        stats = {"numRecords": f.rows, "minValues": lo, "maxValues": hi, "nullCount": f.nulls}
        self._done.append(
            {
                # add.path is a URI: escape '%' etc. so readers decode it back to the on-disk name
                "path": quote(f.rel_path, safe="/="),
                "size": int(size),
                "partition_values": f.partition_values,
                "modification_time": int(time.time() * 1000),
                "stats": json.dumps(stats),
                "num_records": f.rows,
            }
        )

    def close(self) -> list[dict]:
        """Flush everything and return the add actions (as plain dicts) of this task.

        If the write was aborted meanwhile (a task of a failed job can outlive the driver's
        cleanup: its Python worker sees the end of its input and closes normally), the files
        are deleted and :class:`WriteAbortedError` is raised. The abort marks the write BEFORE
        listing leftovers and this check runs AFTER the files exist, so one side always
        deletes them."""
        with self._naming_the_table():
            for key in list(self._pending):
                self._flush(key)
            for key in list(self._open):
                self._close_file(key)
        if write_aborted(self.table_uri, self.write_id):
            delete_files(self.table_uri, self.written_paths)
            raise WriteAbortedError(f"write {self.write_id} to {self.table_uri} was aborted; its files were removed")
        return self._done

    def discard(self) -> None:
        """Best-effort removal of every file this task started (used when the task fails)."""
        for f in self._open.values():
            try:
                f.writer.close()
                f._sink.close()  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001 - cleanup must not mask the original error
                pass
        self._open.clear()
        delete_files(self.table_uri, self.written_paths)


ABORTED_DIR = "_bigopt_aborted"


class WriteAbortedError(RuntimeError):
    """A task finished writing after its write had been aborted (its files are removed)."""


ABORT_MARK_KEEP_S = 24 * 3600  # no task of a write outlives its job by a day


def mark_aborted(table_uri: str, write_id: str) -> None:
    """Record that write ``write_id`` was aborted (``<table>/_bigopt_aborted/<write_id>``;
    Delta ignores ``_``-prefixed directories, and so does vacuum). A mark is needed only while a
    task of its write may still run, so marks older than ``ABORT_MARK_KEEP_S`` are deleted
    here: until the twenty-ninth session they piled up, one for every ingest whose quarantine
    was unchanged and one per table of every failed write (hard-failure probe)."""
    from pyarrow.fs import FileSelector

    fs, root = filesystem_for(table_uri)
    folder = join(root, ABORTED_DIR)
    fs.create_dir(folder, recursive=True)
    with fs.open_output_stream(join(folder, write_id)) as f:
        f.write(b"aborted\n")
    cutoff = time.time() - ABORT_MARK_KEEP_S
    for info in fs.get_file_info(FileSelector(folder, allow_not_found=True)):
        if info.type == FileType.File and info.mtime is not None and info.mtime.timestamp() < cutoff:
            try:
                fs.delete_file(info.path)
            except OSError:  # another writer's clean-up took it first, or a store that refuses: harmless
                pass


def write_aborted(table_uri: str, write_id: str) -> bool:
    fs, root = filesystem_for(table_uri)
    return fs.get_file_info(join(root, f"{ABORTED_DIR}/{write_id}")).type != FileType.NotFound


def delete_files(table_uri: str, rel_paths: list[str]) -> None:
    fs, root = filesystem_for(table_uri)
    for rel in rel_paths:
        try:
            fs.delete_file(join(root, rel))
        except (FileNotFoundError, OSError):
            pass
