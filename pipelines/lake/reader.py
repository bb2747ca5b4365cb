"""Spark-free reading of a Delta table at a pinned version.

This is what the training loader (and the Spark data source's tasks) use: delta-rs resolves
the snapshot's active files from the log, pyarrow reads them. No JVM, no Spark.

    snap = DeltaSnapshot("lake/criteo/gold/train", version=3)
    snap.version, snap.num_rows, snap.files()        # pinned version, row count, active files
    snap.dataset(["label", "dense"])                 # a pyarrow.dataset over exactly those files
"""
from __future__ import annotations

import datetime as _dt
import operator
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, reduce
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from deltalake import DeltaTable

from pipelines.errors import MissingInputError
from pipelines.lake.fs import delta_uri, file_uri, filesystem_for, join, normalize_uri, path_in_filesystem
from pipelines.lake.schema import to_pyarrow_schema


def open_parquet(uri: str, **kwargs) -> pq.ParquetFile:
    """A data file by its URI (local path or any pyarrow filesystem); ``kwargs`` go to
    ``pyarrow.parquet.ParquetFile`` (e.g. ``read_dictionary``)."""
    fs, path = filesystem_for(uri)
    return pq.ParquetFile(fs.open_input_file(path), **kwargs)


@dataclass
class FileEntry:
    """One active data file of a snapshot."""

    uri: str
    size: int
    num_records: int | None
    partition_values: dict[str, Any]
    min_values: dict[str, Any] = field(default_factory=dict)
    max_values: dict[str, Any] = field(default_factory=dict)
    null_counts: dict[str, Any] = field(default_factory=dict)

    def parquet(self) -> pq.ParquetFile:
        return open_parquet(self.uri)

    @cached_property
    def metadata(self) -> pq.FileMetaData:
        """The file's Parquet footer, read once per entry (data files never change)."""
        return self.parquet().metadata

    def row_group_ranges(self, split_bytes: int) -> list[list[int]]:
        """Split the file into contiguous row-group ranges of about ``split_bytes``."""
        md = self.metadata
        out, cur, cur_bytes = [], [], 0
        for i in range(md.num_row_groups):
            cur.append(i)
            cur_bytes += md.row_group(i).total_byte_size
            if cur_bytes >= split_bytes:
                out.append(cur)
                cur, cur_bytes = [], 0
        if cur:
            out.append(cur)
        return out


def _parse_timestamp(ts: str | _dt.datetime | int) -> _dt.datetime:
    if isinstance(ts, _dt.datetime):
        return ts if ts.tzinfo else ts.replace(tzinfo=_dt.timezone.utc)
    if isinstance(ts, (int, float)):
        return _dt.datetime.fromtimestamp(ts / 1000.0, tz=_dt.timezone.utc)
    parsed = _dt.datetime.fromisoformat(str(ts).replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=_dt.timezone.utc)


def check_readable(uri: str, configuration: Mapping[str, str] | None) -> None:
    """Refuse a table whose data files this engine would misread. With column mapping the
    files hold physical names (``col-<uuid>``): read by logical name, every column came back
    null, with no error (delta-rs 1.6's own pyarrow reader does the same)."""
    mode = (configuration or {}).get("delta.columnMapping.mode", "none")
    if mode != "none":
        raise ValueError(f"Delta table {uri} uses column mapping (delta.columnMapping.mode={mode}), which bigopt's "
                         "delta-rs engine cannot read or write; use Spark with the Delta connector for it")


class DeltaSnapshot:
    """A Delta table pinned at one version (latest, ``version`` or ``timestamp``)."""

    def __init__(
        self,
        uri: str,
        version: int | None = None,
        timestamp: str | _dt.datetime | None = None,
        storage_options: Mapping[str, str] | None = None,
    ) -> None:
        if version is not None and timestamp is not None:
            raise ValueError("give versionAsOf or timestampAsOf, not both")
        self.uri = normalize_uri(uri)
        self.storage_options = dict(storage_options or {})
        if not DeltaTable.is_deltatable(delta_uri(self.uri), storage_options=self.storage_options):
            raise MissingInputError(f"no Delta table at {self.uri}")
        self.table = DeltaTable(delta_uri(self.uri), version=version, storage_options=self.storage_options)
        if timestamp is not None:
            when = _parse_timestamp(timestamp)
            self.table.load_as_version(when)
            self._check_not_before_first_commit(when)
        self.version: int = self.table.version()
        meta = self.table.metadata()
        check_readable(self.uri, meta.configuration)
        self.partition_columns: list[str] = list(meta.partition_columns)

    def _check_not_before_first_commit(self, when: _dt.datetime) -> None:
        """``ValueError`` when ``when`` is before the table's earliest commit, as Delta's
        ``timestampAsOf`` says: delta-rs loads the latest version committed at or before
        ``when`` and, when there is none, quietly its earliest. That version's commit time
        is its log file's modification time (what delta-rs compares), or, when earlier, the
        time in its ``commitInfo`` (the one the history shows), so that time reads it."""
        from pyarrow.fs import FileType

        from pipelines.lake.maintenance import commit_info_at

        v = self.table.version()
        fs, root = filesystem_for(self.uri, self.storage_options)
        log_file = fs.get_file_info(join(root, f"_delta_log/{v:020d}.json"))
        if log_file.type == FileType.NotFound or log_file.mtime is None:
            return  # only its checkpoint is left: nothing to compare with
        when_ms = int(when.timestamp() * 1000)
        if when_ms >= int(log_file.mtime.timestamp() * 1000):
            return
        info = commit_info_at(fs, root, v) or {}
        times = [t for k in ("timestamp", "inCommitTimestamp") if isinstance(t := info.get(k), int)]
        first = min([int(log_file.mtime.timestamp() * 1000), *times])
        if when_ms < first:
            at = _dt.datetime.fromtimestamp(first / 1000, _dt.timezone.utc).isoformat(timespec="milliseconds")
            raise ValueError(f"Delta table {self.uri} has no version at {when.isoformat()}: that is before its "
                             f"earliest commit (version {v}, {at}); give a timestamp at or after it, or a version")

    # -- schema -------------------------------------------------------------------------
    @cached_property
    def full_schema(self) -> pa.Schema:
        return to_pyarrow_schema(self.table.schema())

    def schema(self, columns: Sequence[str] | None = None) -> pa.Schema:
        if columns is None:
            return self.full_schema
        missing = [c for c in columns if c not in self.full_schema.names]
        if missing:
            raise KeyError(f"column(s) {missing} not in table {self.uri} (has {self.full_schema.names})")
        return pa.schema([self.full_schema.field(c) for c in columns])

    # -- files --------------------------------------------------------------------------
    def files(self, partition_filter: Mapping[str, Any] | None = None) -> list[FileEntry]:
        """Active files; ``partition_filter={"day": 3}`` or ``{"day": [3, 4]}`` keeps only the
        files of those partitions (values compared as Delta's partition strings)."""
        if not partition_filter:
            return list(self._files)
        bad = [c for c in partition_filter if c not in self.partition_columns]
        if bad:
            raise KeyError(f"{bad} are not partition columns of {self.uri} ({self.partition_columns})")
        from pipelines.lake.files import partition_value_str

        wanted = {
            c: {partition_value_str(x) for x in (v if isinstance(v, (list, tuple, set)) else [v])}
            for c, v in partition_filter.items()
        }
        return [
            f for f in self._files
            if all(partition_value_str(f.partition_values.get(c)) in vals for c, vals in wanted.items())
        ]

    @cached_property
    def _files(self) -> list[FileEntry]:
        actions = pa.table(self.table.get_add_actions(flatten=True))
        rows = actions.to_pylist()
        out = []
        for r in rows:
            pv, mins, maxs, nulls = {}, {}, {}, {}
            for k, v in r.items():
                if k.startswith("partition."):
                    pv[k[len("partition."):]] = v
                elif k.startswith("min.") and v is not None:  # delta-rs gives None for a column without
                    mins[k[4:]] = v                                 # a bound in this file: left out
                elif k.startswith("max.") and v is not None:
                    maxs[k[4:]] = v
                elif k.startswith("null_count."):
                    nulls[k[len("null_count."):]] = v
            for c in self.partition_columns:
                pv.setdefault(c, None)
            out.append(
                FileEntry(file_uri(self.uri, r["path"]), int(r["size_bytes"]), r.get("num_records"), pv, mins, maxs, nulls)
            )
        out.sort(key=lambda f: f.uri)
        return out

    @property
    def num_rows(self) -> int:
        return sum(int(f.num_records or 0) for f in self._files)

    def check_no_deletion_vectors(self) -> None:
        """Refuse (NotImplementedError) to read a snapshot whose files carry deletion vectors:
        read whole, they would bring deleted rows back. Only a table with the
        ``deletionVectors`` reader feature is looked at (:meth:`deletion_vector_files`); one
        with the feature on and no vector is read. Checked once per snapshot."""
        if getattr(self, "_dv_checked", False):
            return
        try:
            features = self.table.protocol().reader_features or []
        except Exception:  # noqa: BLE001 - no protocol features: none to check
            features = []
        if "deletionVectors" in features:
            with_dv = self.deletion_vector_files()
            if with_dv is None:
                raise NotImplementedError(
                    f"{self.uri}@{self.version} has the deletionVectors reader feature and its log could not be read "
                    "to tell which files carry one; reading its raw Parquet files could resurrect deleted rows. Run "
                    "REORG TABLE ... APPLY (PURGE) on the table first.")
            if with_dv:
                raise NotImplementedError(
                    f"{self.uri}@{self.version} has deletion vectors on {len(with_dv)} file(s) (e.g. {with_dv[0]}); "
                    "reading its raw Parquet files would resurrect deleted rows. Run REORG TABLE ... APPLY (PURGE) on "
                    "the table first.")
        self._dv_checked = True

    def deletion_vector_files(self) -> list[str] | None:
        """This snapshot's active files that carry a deletion vector (their URIs), read from the
        log itself: its newest checkpoint at or before the version, then the JSON commits after
        it (delta-rs 1.6.6 does not expose an add action's ``deletionVector``). None when the
        log cannot be read so (a checkpoint in a layout not known here, a commit gone)."""
        from urllib.parse import unquote

        from pyarrow.fs import FileSelector, FileType

        from pipelines.lake.maintenance import commit_entries

        fs, root = filesystem_for(self.uri, self.storage_options)
        log_dir = join(root, "_delta_log")
        checkpoints: dict[int, list[str]] = {}
        for info in fs.get_file_info(FileSelector(log_dir)):
            name = info.base_name
            if info.type == FileType.File and ".checkpoint." in name and name.endswith(".parquet"):
                v = int(name.split(".", 1)[0])
                if v <= self.version:
                    checkpoints.setdefault(v, []).append(info.path)
        dv: dict[str, bool] = {}
        start = 0
        if checkpoints:
            start = max(checkpoints)
            try:
                for path in checkpoints[start]:
                    with fs.open_input_file(path) as f:
                        adds = pq.read_table(f, columns=["add"]).column("add").to_pylist()
                    for a in adds:
                        if a:
                            dv[unquote(a["path"])] = bool(a.get("deletionVector"))
            except (OSError, KeyError, pa.ArrowException):
                return None
            start += 1
        for v in range(start, self.version + 1):
            entries = commit_entries(fs, root, v)
            if entries is None:
                return None
            # a commit's removes first: a DELETE with deletion vectors removes a file and adds it
            # again, by the same path, with its vector
            for e in entries:
                if isinstance(e.get("remove"), dict):
                    dv.pop(unquote(e["remove"]["path"]), None)
            for e in entries:
                if isinstance(e.get("add"), dict):
                    dv[unquote(e["add"]["path"])] = bool(e["add"].get("deletionVector"))
        active = {f.uri for f in self._files}
        return sorted(u for u in (file_uri(self.uri, p) for p, has in dv.items() if has) if u in active)

    def missing_files(self) -> list[str]:
        """The active files of this snapshot that are not there (a vacuum after later versions
        replaced them, or deleted by hand): an older version whose files a vacuum removed can
        no longer be read. One metadata lookup per file."""
        from pyarrow.fs import FileType

        fs, _ = filesystem_for(self.uri, self.storage_options)
        uris = [f.uri for f in self._files]
        infos = fs.get_file_info([path_in_filesystem(u) for u in uris])
        return [u for u, info in zip(uris, infos) if info.type == FileType.NotFound]

    def vacuumed_since(self) -> tuple[int, list[str]] | None:
        """(the table's latest version, this snapshot's files that are gone) when a vacuum
        removed them after a later version replaced them: a job reading this version when it
        happened lost them then, and the table is not damaged (the latest version does not
        have them). None otherwise. One metadata lookup per file, and the latest log: an error
        path's check."""
        gone = self.missing_files()
        if not gone:
            return None
        latest = DeltaSnapshot(self.uri, storage_options=self.storage_options)
        if latest.version <= self.version or set(gone) & {f.uri for f in latest.files()}:
            return None
        return latest.version, gone

    def dataset(self, columns: Sequence[str] | None = None) -> pads.Dataset:
        """A pyarrow dataset over exactly this snapshot's active files (partition columns
        included as fields). ``columns`` only checks names here; project when scanning.

        Each file carries what the log knows of it as its guarantee (:meth:`_guarantee`), so
        a filter skips files by partition value and by min/max without opening them. Files with
        deletion vectors are refused (:meth:`check_no_deletion_vectors`; until the twenty-sixth
        session they were read whole, deleted rows included)."""
        self.check_no_deletion_vectors()
        if columns is not None:
            self.schema(columns)
        # pyarrow's own filesystem, not delta-rs's default (a PyFileSystem whose reads call back
        # into Python from Arrow's threads): with that one a process that exits right after a
        # threaded scan aborts in Arrow's thread-pool teardown ("terminate called without an
        # active exception", exit 134) - 17 times in 20 for a script that reads a ledger and
        # exits, 10 in 10 for one that reads the 7.5 M-row gold column. With pyarrow's: once in
        # 123 such runs (apache/arrow#39862 is the same abort without Python in the reads).
        try:
            fs, _ = filesystem_for(self.uri, self.storage_options)
        except ValueError:  # a scheme pyarrow has no filesystem for (ArrowInvalid): delta-rs's own
            return self.table.to_pyarrow_dataset()
        # Not delta-rs's to_pyarrow_dataset (1.6.6): for a column the log has no min/max for in
        # a file (a string over 32 characters, which Delta does not bound) it writes the
        # guarantee `col >= null and col <= null`, so ANY filter on that column skips every
        # such file and returns no rows (delta-io/delta-rs#3032, #3173: the quarantine's
        # `reason` filtered to nothing).
        schema = self.full_schema
        types = {fld.name: fld.type for fld in schema}
        files = self._files
        return pads.FileSystemDataset.from_paths(
            [path_in_filesystem(f.uri) for f in files], schema=schema, format=pads.ParquetFileFormat(),
            filesystem=fs, partitions=[self._guarantee(f, types) for f in files],
        )

    def _guarantee(self, f: FileEntry, types: Mapping[str, pa.DataType]) -> pc.Expression:
        """What holds for every row of file ``f``: its partition values (which also fill the
        partition columns, absent from the files), and ``min <= col <= max`` for the integer
        and string columns the log bounds that have no nulls in the file. Anything else (no
        bound in the log, nulls, floats with their NaNs, dates and times) gives no guarantee:
        less pruning, never a wrong one."""
        parts: list[pc.Expression] = []
        for c in self.partition_columns:
            v = f.partition_values.get(c)
            typ = types[c]
            parts.append(pc.field(c).is_null() if v is None else pc.field(c) == partition_scalar(v, typ))
        for c, lo in f.min_values.items():
            hi = f.max_values.get(c)
            typ = types.get(c)
            if hi is None or f.null_counts.get(c) != 0 or typ is None:
                continue
            if not (pa.types.is_integer(typ) or pa.types.is_string(typ) or pa.types.is_large_string(typ)):
                continue
            try:
                lo_s, hi_s = pa.scalar(lo, typ), pa.scalar(hi, typ)
            except (pa.ArrowException, TypeError, ValueError, OverflowError):
                continue
            parts += [pc.field(c) >= lo_s, pc.field(c) <= hi_s]
        return reduce(operator.and_, parts, pc.scalar(True))

    def commit_info(self) -> dict:
        """This version's commit info (a history entry: ``commitInfo`` and ``version``), read
        from its log entry ({} when log clean-up removed it). Not delta-rs's ``history()``,
        which returned nothing for a local table whose path has a ``#`` or ``?``."""
        from pipelines.lake.maintenance import commit_info_at

        fs, root = filesystem_for(self.uri, self.storage_options)
        return commit_info_at(fs, root, self.version) or {}

    def to_table(self, columns: Sequence[str] | None = None, filter: pc.Expression | None = None) -> pa.Table:
        return self.dataset(columns).to_table(columns=list(columns) if columns else None, filter=filter)


def partition_scalar(value: Any, typ: pa.DataType) -> pa.Scalar:
    if value is None:
        return pa.scalar(None, typ)
    if isinstance(value, str) and not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        return pc.cast(pa.array([value]), typ)[0]
    return pa.scalar(value, typ)


def read_file_batches(
    uri: str,
    arrow_schema: pa.Schema,
    partition_values: Mapping[str, Any],
    partition_columns: Sequence[str],
    *,
    row_groups: list[int] | None = None,
    batch_size: int = 65_536,
) -> Iterator[pa.RecordBatch]:
    """Read one data file as batches shaped exactly like ``arrow_schema``: partition columns
    filled from the add action, columns absent from an older file (schema evolution) filled
    with nulls, everything cast to the table type."""
    pf = open_parquet(uri)
    file_cols = set(pf.schema_arrow.names)
    wanted = [f.name for f in arrow_schema if f.name in file_cols and f.name not in partition_columns]
    it = pf.iter_batches(batch_size=batch_size, row_groups=row_groups, columns=wanted, use_threads=False)
    emitted = False
    for batch in it:
        yield _shape(batch, arrow_schema, partition_values, partition_columns)
        emitted = True
    if not emitted and not wanted and pf.metadata.num_rows:
        # only partition columns projected: still emit the right number of rows
        n = sum(pf.metadata.row_group(i).num_rows for i in (row_groups or range(pf.metadata.num_row_groups)))
        yield _shape(pa.RecordBatch.from_pydict({}), arrow_schema, partition_values, partition_columns, n)


def _shape(batch: pa.RecordBatch, schema: pa.Schema, pv, partition_columns, n: int | None = None) -> pa.RecordBatch:
    n = batch.num_rows if n is None else n
    arrays = []
    names = batch.schema.names
    for f in schema:
        if f.name in partition_columns:
            arrays.append(pa.repeat(partition_scalar(pv.get(f.name), f.type), n))
        elif f.name in names:
            col = batch.column(names.index(f.name))
            arrays.append(col if col.type == f.type else col.cast(f.type))
        else:
            arrays.append(pa.nulls(n, f.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)
