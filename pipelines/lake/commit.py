"""Driver-side Delta transactions over files that Spark tasks already wrote.

One Spark write = one Delta commit, whatever the number of tasks. Appends from concurrent
writers both land (delta-rs retries an append whose read version moved on, since appends never
conflict); an overwrite that races another overwrite of the same data fails with
:class:`CommitConflictError`. Whatever fails, the files this write produced are deleted, so a
failed write leaves the table exactly as it was.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
from deltalake import DeltaTable, Schema
from deltalake.exceptions import CommitFailedError, DeltaError
from deltalake.transaction import AddAction, CommitProperties, create_table_with_add_actions

from pipelines.lake.files import delete_files, int_range, partition_value_str
from pipelines.lake.fs import delta_uri, filesystem_for, is_local, normalize_uri
from pipelines.lake.reader import check_readable
from pipelines.lake.schema import SchemaMismatchError, check_compatible, to_pyarrow_schema
from pipelines.lake.tasks import WRITE_ID_KEY

log = logging.getLogger(__name__)

ROWS_ADDED_KEY = "bigopt.rowsAdded"  # commit info: rows in the files the commit adds
_DISJOINT_RETRIES = 10  # commits again on top of commits that kept to other partitions


class CommitConflictError(RuntimeError):
    """A concurrent transaction conflicts with this one (e.g. two overwrites)."""


class TableExistsError(FileExistsError):
    """mode='error' and the table already exists."""


class TableWriteError(OSError):
    """Writing or committing to a Delta table failed for a reason outside the data: a log or a
    folder that cannot be written, a full disk, a file-size limit, a store that fails. Its
    message names the table and the cause on one line (delta-rs's own is several lines and
    names only a file); nothing of this write was committed, unless ``landed`` (the commit is
    in the log, reading the table back failed). ``committed``: the writes of the same
    :func:`pipelines.lake.tasks.commit_writes` committed before this one, ``(table, version)``
    (Delta has no transaction across tables: they stay), for the job to say what to do."""

    def __init__(self, table: str, cause: str, *, action: str = "commit to", landed: bool = False):
        self.table, self.cause, self.action, self.landed = table, cause, action, landed
        self.committed: list[tuple[str, int]] = []
        if landed:
            super().__init__(f"{action} Delta table {table} is in its log, but reading the table back failed: {cause}")
        else:
            super().__init__(f"{action} Delta table {table} failed: {cause}")

    @property
    def stays(self) -> list[tuple[str, int | None]]:
        """The tables this error leaves committed, ``(table, version or None)``: the writes
        committed before it, and its own table when its commit landed."""
        return [*self.committed, *([(self.table, None)] if self.landed else [])]

    def __reduce__(self):  # picklable (raised in a Spark task's writer too)
        return type(self), (self.table, self.cause), {"action": self.action, "landed": self.landed,
                                                      "committed": self.committed, "args": self.args}


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RUST_BACKTRACE = re.compile(r"\n\s*0: ")  # the first frame of the backtrace after a delta-rs error's message
_CHAIN = re.compile(r":?\s*\n\s*↳\s*")  # the next error of a delta-rs error chain, on a line of its own


def readable_error(e: BaseException) -> str:
    """``e``'s message as it is to be read, from a delta-rs error too: without the colour
    escapes of its error chains (they would print as text, "[31m↳[0m"), without the Rust
    backtrace it carries when ``RUST_BACKTRACE`` is set (lines ``   0: <unknown>`` ... after the
    message), and its chain on one line ("Generic LocalFileSystem error: Unable to open file
    …: Permission denied (os error 13)", not three lines, the last two starting "↳")."""
    text = _RUST_BACKTRACE.split(_ANSI.sub("", str(e)), maxsplit=1)[0].strip()
    return _CHAIN.sub(": ", text)


def _environment_error(e: BaseException) -> bool:
    """An error of delta-rs or of the file system (not of the data, nor one this module raises
    itself with its own message), which :class:`TableWriteError` names the table for."""
    return isinstance(e, (DeltaError, OSError)) and not isinstance(e, (TableExistsError, TableWriteError))


def table_exists(uri: str, storage_options: Mapping[str, str] | None = None) -> bool:
    """Whether ``uri`` holds a Delta table. A local path that is not a folder (a file, or a
    path under one) holds none: delta-rs raised ``OSError: Not a directory`` for it."""
    uri = normalize_uri(uri)
    if is_local(uri) and not os.path.isdir(uri):
        return False
    return DeltaTable.is_deltatable(delta_uri(uri), storage_options=dict(storage_options or {}))


def replace_where_filters(replace_where: Mapping[str, Any] | None) -> list[tuple] | None:
    """``{"day": 3}`` / ``{"day": [3, 4]}`` → delta-rs partition filters (a conjunction)."""
    if not replace_where:
        return None
    out = []
    for col, value in replace_where.items():
        many = isinstance(value, (list, tuple, set))
        strs = [partition_value_str(v) for v in (value if many else [value])]
        if None in strs:
            raise ValueError(f"replace_where {col}={value!r}: a null partition value cannot be replaced "
                             "(delta-rs partition filters compare strings); overwrite the table instead")
        out.append((col, "in", strs) if many else (col, "=", strs[0]))
    return out


def _matches(pv: Mapping[str, str | None], filters: list[tuple]) -> bool:
    for col, op, val in filters:
        v = pv.get(col)
        if op == "=" and v != val:
            return False
        if op == "in" and v not in val:
            return False
    return True


def prepare_table(
    uri: str,
    data_schema: pa.Schema,
    *,
    mode: str,
    partition_by: list[str],
    merge_schema: bool,
    replace_where: Mapping[str, Any] | None,
    storage_options: Mapping[str, str] | None = None,
) -> tuple[str, int | None]:
    """Checks done on the driver BEFORE any task writes. Returns the effective mode
    ('create', 'append', 'overwrite' or 'skip') and the table version the write is based on
    (its read version: an overwrite conflicts with anything committed after it)."""
    return prepare_write(uri, data_schema, mode=mode, partition_by=partition_by, merge_schema=merge_schema,
                         replace_where=replace_where, storage_options=storage_options)[:2]


def prepare_write(
    uri: str,
    data_schema: pa.Schema,
    *,
    mode: str,
    partition_by: Sequence[str] | None,
    merge_schema: bool,
    replace_where: Mapping[str, Any] | None,
    storage_options: Mapping[str, str] | None = None,
) -> tuple[str, int | None, list[str]]:
    """:func:`prepare_table`, plus the partition columns the write uses: ``partition_by``, or
    when none is given an existing table's own (as Delta's writers do: a write that names none
    keeps the table's partitioning; writing its rows unpartitioned dropped their values)."""
    uri = normalize_uri(uri)
    if mode not in {"append", "overwrite", "error", "errorifexists", "ignore"}:
        raise ValueError(f"unknown save mode {mode!r}; use append, overwrite, error or ignore")
    dt = (DeltaTable(delta_uri(uri), storage_options=dict(storage_options or {}))
          if table_exists(uri, storage_options) else None)
    partition_by = list(partition_by or ([] if dt is None else dt.metadata().partition_columns))
    missing_parts = [c for c in partition_by if c not in data_schema.names]
    if missing_parts:
        raise ValueError(f"partition column(s) {missing_parts} are not in the data ({data_schema.names})")
    if partition_by and set(data_schema.names) <= set(partition_by):
        raise ValueError(f"every column of the data is a partition column ({partition_by}): a Delta table needs "
                         "at least one other (its files would hold no rows)")
    if floats := [c for c in partition_by if pa.types.is_floating(data_schema.field(c).type)]:
        raise ValueError(f"partition column(s) {floats} are floating-point: -0.0 and 0.0, and NaNs, cannot be "
                         "kept apart in partition values; partition by an integer or string column")
    if dt is None:
        if replace_where:  # nothing to replace yet: the write creates the table
            if bad := [c for c in replace_where if c not in partition_by]:
                raise ValueError(f"replace_where column(s) {bad} are not partition columns of the table this "
                                 f"write creates ({partition_by})")
            replace_where_filters(replace_where)
        return "create", None, partition_by
    if mode in {"error", "errorifexists"}:
        raise TableExistsError(f"Delta table already exists at {uri} (mode='error')")
    check_readable(uri, dt.metadata().configuration)  # its files' column names are not ours to write
    if mode == "ignore":
        return "skip", dt.version(), partition_by
    table_parts = list(dt.metadata().partition_columns)
    if partition_by and table_parts != list(partition_by) and not (mode == "overwrite" and not replace_where):
        raise ValueError(f"table {uri} is partitioned by {table_parts}, write asked for {partition_by}")
    if replace_where:
        bad = [c for c in replace_where if c not in table_parts]
        if bad:
            raise ValueError(f"replace_where column(s) {bad} are not partition columns of {uri} ({table_parts})")
        replace_where_filters(replace_where)  # a value it cannot express fails here, before any task
    if not (mode == "overwrite" and not replace_where and merge_schema):
        check_compatible(to_pyarrow_schema(dt.schema()), data_schema, merge_schema=merge_schema, table_uri=uri)
    return mode, dt.version(), partition_by


def commit(
    uri: str,
    data_schema: pa.Schema,
    adds: list[dict],
    *,
    mode: str,
    partition_by: list[str],
    merge_schema: bool = False,
    replace_where: Mapping[str, Any] | None = None,
    commit_info: Mapping[str, Any] | None = None,
    max_commit_retries: int = 15,
    storage_options: Mapping[str, str] | None = None,
    read_version: int | None = None,
    configuration: Mapping[str, str] | None = None,
) -> int:
    """Commit the task-written files as ONE transaction; return the new table version.
    ``configuration``: table properties of a table this commit creates (ignored otherwise).

    ``read_version`` is the version the write was planned against (see :func:`prepare_table`;
    None: planned when the table did not exist); commits that landed since are checked for
    conflicts (appends pass, overwrites fail; a replace_where write planned before the table
    existed fails once another write has created it).
    On any failure the files are deleted before the error propagates.
    """
    uri = normalize_uri(uri)
    opts = dict(storage_options or {})
    # an add's "path" is the log's form, a URI (the on-disk name with '%', ' ', ... escaped);
    # delta-rs's AddAction takes the on-disk name and escapes it itself: given the escaped form
    # it escaped it again, and the log named a file that does not exist
    on_disk = [unquote(a["path"]) for a in adds]
    actions = [
        AddAction(rel, a["size"], a["partition_values"], a["modification_time"], True, a["stats"])
        for rel, a in zip(on_disk, adds)
    ]
    # delta-rs records no operation metrics for a commit of add actions: the rows it adds are
    # recorded here, so `bigopt lake --action history` can show them
    info = {**dict(commit_info or {}), ROWS_ADDED_KEY: sum(int(a.get("num_records") or 0) for a in adds)}
    props = CommitProperties(custom_metadata=info, max_commit_retries=max_commit_retries)
    landed = False  # once the commit is in the log its files are the table's: never delete them
    try:
        _check_partition_values(uri, data_schema, partition_by, adds)
        effective, planned_version = prepare_table(
            uri, data_schema, mode=mode, partition_by=partition_by, merge_schema=merge_schema,
            replace_where=replace_where, storage_options=opts,
        )
        if read_version is None:  # planned when the table did not exist (or a caller that read none)
            if replace_where and effective != "create":  # created since: by a write that may have
                raise CommitFailedError(  # written to what this one replaces
                    "the table was created by another write after this one was planned, and may hold rows of "
                    "the partitions this one replaces")
            read_version = planned_version
        if effective == "skip":
            delete_files(uri, on_disk)
            return DeltaTable(delta_uri(uri), storage_options=opts).version()
        if effective == "create":
            try:
                create_table_with_add_actions(
                    delta_uri(uri), Schema.from_arrow(data_schema), actions, mode="error", partition_by=partition_by or None,
                    storage_options=opts or None, commit_properties=props,
                    configuration=dict(configuration) if configuration else None,
                )
                landed = True
                return DeltaTable(delta_uri(uri), storage_options=opts).version()
            except DeltaError as e:
                if landed or write_in_log(uri, info.get(WRITE_ID_KEY), 0):
                    landed = True  # the log has this write's version 0 (reading it back failed): keep its files
                    raise
                # Lost a creation race: another writer created the table first.
                if not table_exists(uri, opts) or mode in {"error", "errorifexists"}:
                    raise
                if replace_where:  # as above: it may have written to what this write replaces
                    raise CommitFailedError(f"the table was created concurrently by another write ({e}), which "
                                            "may hold rows of the partitions this one replaces") from None
                log.info("table %s was created concurrently (%s); committing as %s", uri, e, mode)
                effective, read_version = prepare_table(
                    uri, data_schema, mode=mode, partition_by=partition_by, merge_schema=merge_schema,
                    replace_where=replace_where, storage_options=opts,
                )
        dt = DeltaTable(delta_uri(uri), storage_options=opts, version=read_version)
        table_schema = to_pyarrow_schema(dt.schema())
        if effective == "overwrite" and not replace_where:
            schema_to_commit = data_schema if merge_schema else table_schema
            parts = partition_by or list(dt.metadata().partition_columns)
        else:
            new_cols = check_compatible(table_schema, data_schema, merge_schema=merge_schema, table_uri=uri)
            if new_cols:
                # Schema evolution is its own (metadata-only) commit; readers see nulls for old files.
                dt.alter.add_columns([_delta_field(f) for f in new_cols])
                dt = DeltaTable(delta_uri(uri), storage_options=opts, version=read_version + 1)
                table_schema = to_pyarrow_schema(dt.schema())
            schema_to_commit = table_schema
            parts = list(dt.metadata().partition_columns)
        _check_not_null(uri, schema_to_commit, adds)
        filters = replace_where_filters(replace_where)
        if filters:
            outside = [rel for rel, a in zip(on_disk, adds) if not _matches(a["partition_values"], filters)]
            if outside:
                raise ValueError(
                    f"replace_where={dict(replace_where)} but {len(outside)} written file(s) fall outside it "
                    f"(e.g. {outside[0]}); nothing was committed"
                )
        if effective == "overwrite":
            # delta-rs lets a concurrent append through an overwrite (it rebases the overwrite
            # on it), so rows appended after the read version would survive the overwrite:
            # commits since then must keep to other partitions, else this is a conflict
            since = dt.version()
            if not _move_to_latest_if_disjoint(dt, uri, opts, filters):
                raise CommitFailedError(f"v{since + 1}..v{dt.version()} were committed since this overwrite's "
                                        "read version and wrote to what it replaces")
        for attempt in range(_DISJOINT_RETRIES + 1):
            try:
                dt.create_write_transaction(
                    actions, "overwrite" if effective == "overwrite" else "append", schema_to_commit,
                    partition_by=parts or None, partition_filters=filters, commit_properties=props,
                )
                landed = True
                break
            except CommitFailedError:
                # delta-rs fails a replace_where overwrite on ANY commit since its read version,
                # also one that only touched other partitions (two ingests of different files
                # at once): when every commit since kept to other partitions, commit again on top
                if not filters or attempt == _DISJOINT_RETRIES:
                    raise
                since = dt.version()
                if not _move_to_latest_if_disjoint(dt, uri, opts, filters):
                    raise
                log.info("commit to %s: the commits since v%d touched other partitions only; committing on v%d",
                         uri, since, dt.version())
        dt.update_incremental()
        return dt.version()
    except CommitFailedError as e:
        if landed:
            raise
        delete_files(uri, on_disk)
        raise CommitConflictError(
            f"commit to {uri} conflicted with a concurrent transaction, so nothing of this write was "
            f"committed (run it again once the other writer is done): {e}") from e
    except BaseException as e:
        # a commit that reached the log (its read-back failed) keeps its files: the log names them
        first = 0 if read_version is None else read_version + 1
        if not landed and not (landed := write_in_log(uri, info.get(WRITE_ID_KEY), first)):
            delete_files(uri, on_disk)
        if _environment_error(e):
            raise TableWriteError(uri, readable_error(e), landed=landed) from e
        raise


def _check_partition_values(uri: str, schema: pa.Schema, partition_by: list[str], adds: list[dict]) -> None:
    """Refuse an integer partition value its column cannot hold (a ``day`` of 2^31 in an
    ``int`` column): the log would take it, and then every read of the table fails to parse it.
    Checked before anything is committed."""
    for col in partition_by:
        if col not in schema.names or (bounds := int_range(schema.field(col).type)) is None:
            continue
        for a in adds:
            v = (a.get("partition_values") or {}).get(col)
            if v is None:
                continue
            try:
                ok = bounds[0] <= int(v) <= bounds[1]
            except ValueError:
                ok = False
            if not ok:
                raise SchemaMismatchError(f"partition value {col}={v!r} of Delta table {uri} is not a "
                                          f"{schema.field(col).type} value; nothing was committed")


def write_in_log(uri: str, write_id: str | None, first_version: int) -> bool:
    """Whether a commit of write ``write_id`` is in the table's log at ``first_version`` or
    later, read from the log files themselves (:func:`commit_entries`): delta-rs can write a
    commit and then fail loading the table, and a log it cannot load must still be told apart
    from a commit that never happened (or one another writer made)."""
    from pipelines.lake.maintenance import commit_entries

    if not write_id:
        return False
    fs, root = filesystem_for(uri)
    version = first_version
    while (entries := commit_entries(fs, root, version)) is not None:
        if any((e.get("commitInfo") or {}).get(WRITE_ID_KEY) == write_id for e in entries):
            return True
        version += 1
    return False


def _check_not_null(uri: str, schema: pa.Schema, adds: list[dict]) -> None:
    """Refuse nulls in the table's NOT NULL columns, from the files' null counts (Delta's
    writers enforce the constraint; a null there broke Spark's reads of the whole table)."""
    required = [f.name for f in schema if not f.nullable]
    if not required:
        return
    nulls: dict[str, int] = {}
    for a in adds:
        counts = (json.loads(a["stats"]) if a.get("stats") else {}).get("nullCount") or {}
        for name in required:
            if isinstance(counts.get(name), int):
                nulls[name] = nulls.get(name, 0) + counts[name]
    if bad := {n: c for n, c in nulls.items() if c}:
        raise SchemaMismatchError(f"NOT NULL column(s) of Delta table {uri} would get nulls: "
                                  + ", ".join(f"{n} ({c:,} rows)" for n, c in bad.items()) + "; nothing was committed")


def _move_to_latest_if_disjoint(dt: DeltaTable, uri: str, opts: Mapping[str, str], filters: list[tuple] | None) -> bool:
    """Move ``dt`` (the same table object) on to the latest version; True when no commit came
    since, or when every one kept to partitions outside ``filters`` (never for a full overwrite:
    no filters)."""
    since = dt.version()
    dt.update_incremental()
    return dt.version() == since or bool(filters) and _disjoint(uri, opts, since, dt.version(), filters)


def _disjoint(uri: str, opts: Mapping[str, str], since: int, latest: int, filters: list[tuple]) -> bool:
    """Did every commit in (since, latest] add and remove files of partitions outside
    ``filters`` only, and change no metadata or protocol? False also for a commit whose log
    entry cannot be read."""
    from pipelines.lake.maintenance import commit_entries

    fs, root = filesystem_for(uri, opts)
    for v in range(since + 1, latest + 1):
        if (entries := commit_entries(fs, root, v)) is None:
            return False
        for entry in entries:
            if "metaData" in entry or "protocol" in entry:
                return False
            for kind in ("add", "remove"):
                action = entry.get(kind)
                if action is None:
                    continue
                pv = action.get("partitionValues")
                if pv is None or _matches(pv, filters):  # a remove may omit its partition values
                    return False
    return True


def _delta_field(f: pa.Field):
    from deltalake import Field

    return Field.from_arrow(pa.field(f.name, f.type, True))
