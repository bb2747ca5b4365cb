"""Table maintenance through delta-rs: history, vacuum, compaction, leftovers of failed writes."""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

from deltalake import DeltaTable
from pyarrow.fs import FileType

from pipelines.lake.fs import delta_uri, filesystem_for, join, normalize_uri
from pipelines.lake.tasks import ROW_GROUP_ROWS_KEY

log = logging.getLogger(__name__)

# how delta-rs names the data files it writes (bigopt's own writers: part-<write_id>-...)
_DELTA_RS_FILE = re.compile(r"part-\d{5}-[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}-c\d{3}\.[^/]*parquet")


def _table(uri: str, storage_options: Mapping[str, str] | None = None) -> DeltaTable:
    return DeltaTable(delta_uri(uri), storage_options=dict(storage_options or {}))


def table_version(uri: str, storage_options: Mapping[str, str] | None = None) -> int:
    return DeltaTable(delta_uri(uri), storage_options=dict(storage_options or {})).version()


def versions_held(uri: str, storage_options: Mapping[str, str] | None = None) -> str:
    """The versions a table can be read at, for an error naming a version it cannot:
    ``0..latest``, or from its oldest checkpoint where older log entries are gone. delta-rs
    deletes the log entries older than ``delta.logRetentionDuration`` (30 days by default)
    when it writes a checkpoint (every 100 commits), and a table is read at a version only from
    a checkpoint at or before it or from version 0."""
    from pyarrow.fs import FileSelector

    uri = normalize_uri(uri)
    latest = table_version(uri, storage_options)
    fs, root = filesystem_for(uri, storage_options)
    names = [i.base_name for i in fs.get_file_info(FileSelector(join(root, "_delta_log"), allow_not_found=True))]
    commits = {int(n[:20]) for n in names if n[:20].isdigit() and n.endswith(".json")}
    checkpoints = sorted(int(n[:20]) for n in names if n[:20].isdigit() and ".checkpoint." in n)
    if 0 in commits or not checkpoints:
        return f"0..{latest}"
    return (f"{checkpoints[0]}..{latest}: the log entries of older versions were cleaned up (Delta keeps them "
            "delta.logRetentionDuration, 30 days by default)")


def _log_entry_path(root: str, version: int) -> str:
    return join(root, f"_delta_log/{version:020d}.json")


def _log_entry_text(fs, root: str, version: int) -> str | None:
    """The text of commit ``version``'s ``_delta_log`` JSON, None when it is not there (cleaned
    up, or never written); other read errors propagate."""
    path = _log_entry_path(root, version)
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode()
    except FileNotFoundError:
        return None
    except OSError:  # some filesystems say "not found" as a plain OSError
        if fs.get_file_info(path).type == FileType.NotFound:
            return None
        raise


def commit_entries(fs, root: str, version: int) -> list[dict] | None:
    """The actions of commit ``version`` (its ``_delta_log`` JSON, one dict per line) of the
    table at ``root`` on ``fs``; None when that file cannot be read (cleaned up, or damaged)."""
    import json

    try:
        text = _log_entry_text(fs, root, version)
        return None if text is None else [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, ValueError):
        return None


# commits that change a table's files but not its data (delta-rs's operation names)
MAINTENANCE_OPERATIONS = frozenset({"OPTIMIZE", "VACUUM START", "VACUUM END"})


def data_version(uri: str, version: int | None = None, storage_options: Mapping[str, str] | None = None) -> int:
    """The version (at or before ``version``, default the latest) whose data ``version`` reads:
    the last commit that is not maintenance (:data:`MAINTENANCE_OPERATIONS`). A compacted or
    vacuumed table holds the rows it held before, so what was built from it is still current.
    A commit whose log entry is gone (log clean-up) or names no operation counts as data."""
    uri = normalize_uri(uri)
    v = version if version is not None else table_version(uri, storage_options)
    fs, root = filesystem_for(uri, storage_options)
    while v > 0:
        if (entries := commit_entries(fs, root, v)) is None:
            return v
        ops = [e["commitInfo"].get("operation") for e in entries if isinstance(e.get("commitInfo"), dict)]
        if not ops or ops[0] not in MAINTENANCE_OPERATIONS:
            return v
        v -= 1
    return v


def commit_metadata(h: Mapping[str, Any]) -> dict[str, Any]:
    """A history entry's commit info with bigopt's keys at the top level: as delta-rs commits
    store them, or decoded from the JSON the native connector stores as ``userMetadata``."""
    import json

    info = dict(h)
    if isinstance(h.get("userMetadata"), str):
        try:
            extra = json.loads(h["userMetadata"])
        except ValueError:
            extra = None
        if isinstance(extra, dict):
            info.update(extra)
    return info


def history(uri: str, limit: int | None = None, storage_options: Mapping[str, str] | None = None
            ) -> list[dict[str, Any]]:
    """Commit infos, newest first (operation, timestamp, our job name/config hash, metrics), as
    delta-rs's ``DeltaTable.history`` shapes them: each commit's ``commitInfo`` with its
    ``version``. Read from the log's JSON here: delta-rs 1.6.6 returned no entries at all for
    a local table whose path has a ``#`` or ``?`` (and labelled the commit before one without
    ``commitInfo`` with that commit's version). A commit whose log entry was cleaned up ends
    the history; one that cannot be parsed is a ``ValueError``."""
    uri = normalize_uri(uri)
    latest = table_version(uri, storage_options)  # a missing table or an unreadable log: delta-rs's DeltaError
    fs, root = filesystem_for(uri, storage_options)
    out: list[dict[str, Any]] = []
    v = latest
    while v >= 0 and (limit is None or len(out) < limit):
        info = commit_info_at(fs, root, v)
        if info is None:  # older entries were cleaned up (log retention): the history ends here
            break
        out.append(info)
        v -= 1
    return out


def commit_info_at(fs, root: str, version: int) -> dict[str, Any] | None:
    """Commit ``version``'s ``commitInfo`` with its ``version`` (a history entry), None when
    its log entry is not there; ``ValueError`` for one that cannot be parsed. A commit
    without a ``commitInfo``, or one that names no timestamp, gets its log file's modification
    time, the commit time the Delta protocol defines."""
    import json

    path = _log_entry_path(root, version)
    if (text := _log_entry_text(fs, root, version)) is None:
        return None
    info: dict[str, Any] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as e:
            raise ValueError(f"the Delta log entry {path} cannot be read (line {n}: {e})") from None
        if isinstance(entry, dict) and isinstance(entry.get("commitInfo"), dict):
            info = dict(entry["commitInfo"])
            break
    if not isinstance(info.get("timestamp"), (int, float)):
        mtime = fs.get_file_info(path).mtime
        if mtime is not None:
            info["timestamp"] = int(mtime.timestamp() * 1000)
    info["version"] = version
    return info


def vacuum(uri: str, retention_hours: int = 168, dry_run: bool = True, enforce_retention: bool = True) -> list[str]:
    """Delete the files older than ``retention_hours`` that no version newer than that
    references: files removed by later commits, and files no commit ever added (those of a
    write whose process was killed before it could clean up). A "full" vacuum, as Spark's
    VACUUM: it lists the table's directory; delta-rs's default looks only at removed files.

    Returns the files' paths relative to the table (deleted, or that a dry run would delete).
    Only files that are there count: delta-rs's list also names the files of the log's
    tombstones that an earlier vacuum already deleted (until the tombstones expire), so every
    run reported them as deleted again and added another VACUUM START/END pair of commits.
    When nothing is there to delete, delta-rs is not called to delete: it commits nothing for
    an empty list either. A file it may not delete stops delta-rs's vacuum with an ``OSError``
    after its ``VACUUM START`` commit (:func:`vacuum_unfinished`).

    The deleted files are those of delta-rs's own list that were in the folder just before it
    ran and are gone after: a file that became deletable between the dry run and the delete (a
    retention boundary passed, a commit removed it) is counted too; until the twenty-fourth
    session only the dry run's files were, so such a file was deleted unreported."""
    table = _table(uri)
    kw = dict(retention_hours=retention_hours, enforce_retention_duration=enforce_retention, full=True)
    fs, root = filesystem_for(normalize_uri(uri))
    rel = table.vacuum(dry_run=True, **kw)
    infos = fs.get_file_info([join(root, r) for r in rel]) if rel else []
    there = [r for r, info in zip(rel, infos) if info.type != FileType.NotFound]
    if dry_run or not there:
        return there
    before = _files_in(fs, root)
    deleted = table.vacuum(dry_run=False, **kw)
    infos = fs.get_file_info([join(root, r) for r in deleted]) if deleted else []
    return [r for r, info in zip(deleted, infos)
            if info.type == FileType.NotFound and (r in before or unquote(r) in before)]


def _files_in(fs, root: str) -> set[str]:
    """The table's files, relative to its folder (its log left out)."""
    from pyarrow.fs import FileSelector

    infos = fs.get_file_info(FileSelector(root, recursive=True, allow_not_found=True))
    cut = len(root.rstrip("/")) + 1
    return {i.path[cut:] for i in infos if i.type == FileType.File and not i.path[cut:].startswith("_delta_log/")}


def vacuum_unfinished(uri: str, since: int, storage_options: Mapping[str, str] | None = None) -> bool:
    """Whether the table's latest commit, newer than version ``since``, is a ``VACUUM START``
    without its ``VACUUM END``: delta-rs commits the start, deletes the files, then commits the
    end, and a vacuum that failed to delete a file (no permission) stops between the two.
    Nothing needs mending: what it deleted no version within the retention referenced, and a
    vacuum run again deletes the rest and commits a pair of its own."""
    uri = normalize_uri(uri)
    fs, root = filesystem_for(uri, storage_options)
    latest = table_version(uri, storage_options)
    info = commit_info_at(fs, root, latest) if latest > since else None
    return info is not None and info.get("operation") == "VACUUM START"


def optimize(uri: str, target_size: int = 256 << 20, partition_filters=None) -> dict[str, Any]:
    """Compact small files into ~``target_size`` files (one commit; old files kept until vacuum),
    written in the table's own layout (:func:`file_layout`).

    A compaction that fails (a write committed while it ran: delta-rs's ``CommitFailedError``; a
    log it may not write: ``OSError``; a stop) commits nothing, and the files it wrote are deleted
    (:func:`_delete_compaction_files`): delta-rs leaves them in the table's folder, where they
    stayed until a vacuum, one more set per attempt."""
    uri = normalize_uri(uri)
    layout = file_layout(uri)
    fs, root = filesystem_for(uri)
    before = _data_files(fs, root)
    try:
        return _table(uri).optimize.compact(partition_filters=partition_filters, target_size=target_size,
                                            writer_properties=layout)
    except BaseException:
        _delete_compaction_files(uri, fs, root, before)
        raise


def _data_files(fs, root: str) -> set[str]:
    """The paths (on ``fs``) of the Parquet files in the table's folder, its log left out."""
    return {join(root, r) for r in _files_in(fs, root) if r.endswith(".parquet")}


def _delete_compaction_files(uri: str, fs, root: str, before: set[str]) -> None:
    """Delete the files of a compaction that failed: the Parquet files that appeared in the
    table's folder while it ran (not in ``before``), named as delta-rs names its files, written
    by delta-rs's Parquet writer (a concurrent Spark write's files are named alike, but written
    by parquet-mr; bigopt's writers name theirs ``part-<write_id>-``), and referenced by no
    commit (a commit that landed keeps its files). What cannot be told or deleted is left to
    a vacuum, with a warning."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def written_by_delta_rs(path: str) -> bool:
        try:
            return (pq.ParquetFile(fs.open_input_file(path)).metadata.created_by or "").startswith("parquet-rs")
        except (OSError, pa.ArrowException):  # still being written, by someone else
            return False

    try:
        new = [p for p in _data_files(fs, root) - before if _DELTA_RS_FILE.fullmatch(p.rsplit("/", 1)[-1])]
        if not new:
            return
        adds = pa.table(_table(uri).get_add_actions(flatten=False)).column("path").to_pylist()
        committed = {join(root, unquote(rel)) for rel in adds}
        for path in new:
            if path not in committed and written_by_delta_rs(path):
                fs.delete_file(path)
    except Exception:  # noqa: BLE001 - the compaction's own error is the one to raise
        log.warning("the files the failed compaction of %s wrote could not all be deleted: a vacuum will",
                    uri, exc_info=True)


def file_layout(uri: str):
    """``WriterProperties`` that keep the layout of the table's writer: its row group size (as
    its latest commit that recorded one says, else the largest row group of the largest data
    file), and the largest file's codec and whether its columns are dictionary-encoded; None
    for a table without files. delta-rs's defaults (row groups of ~1 M rows, dictionaries)
    would undo what the writer chose: gold's small row groups are how the loader shards it
    across ranks (a compacted demo gold/train was one row group, and a second rank got no
    rows). A file smaller than one row group shows only its own rows: a ledger of one-row
    files was compacted into one-row row groups (1.5 MB of footer for 701 rows) until the
    writers recorded their size."""
    from deltalake import ColumnProperties, WriterProperties

    from pipelines.lake.reader import DeltaSnapshot

    snap = DeltaSnapshot(uri)
    files = snap.files()
    if not files:
        return None
    meta = max(files, key=lambda fe: fe.size).parquet().metadata
    chunks = [meta.row_group(g).column(c) for g in range(meta.num_row_groups) for c in range(meta.num_columns)]
    codec = max({ch.compression for ch in chunks}, key=[ch.compression for ch in chunks].count)
    dictionary = sum(any("DICTIONARY" in e for e in ch.encodings) for ch in chunks) * 2 > len(chunks)
    recorded = _recorded_row_group_rows(uri, snap.version)
    return WriterProperties(
        max_row_group_size=recorded or max(meta.row_group(g).num_rows for g in range(meta.num_row_groups)),
        # pyarrow's lz4 is LZ4_RAW, which its metadata names LZ4 (the framed, deprecated codec)
        compression={"LZ4": "LZ4_RAW", "NONE": "UNCOMPRESSED"}.get(codec, codec),
        default_column_properties=ColumnProperties(dictionary_enabled=dictionary),
    )


def _recorded_row_group_rows(uri: str, version: int) -> int | None:
    """The row group size the newest commit at or before ``version`` that records one says
    (a compaction's own commit does not)."""
    fs, root = filesystem_for(normalize_uri(uri))
    while version >= 0 and (info := commit_info_at(fs, root, version)) is not None:
        if info.get(ROW_GROUP_ROWS_KEY):
            return int(info[ROW_GROUP_ROWS_KEY])
        version -= 1
    return None


def remove_write_leftovers(uri: str, write_id: str) -> int:
    """Delete files a failed write left behind (named ``part-<write_id>-*``); returns the count.

    Only files of that write are touched, never committed data of another writer. The write
    is first marked aborted, so a task that creates a file after this listing deletes it
    itself (:meth:`pipelines.lake.files.PartitionedFileWriter.close`). A mark that cannot be
    written (a full disk: often why the write failed) does not stop the deleting, which frees
    the space."""
    from pyarrow.fs import FileSelector, FileType

    from pipelines.lake.files import mark_aborted

    uri = normalize_uri(uri)
    try:
        mark_aborted(uri, write_id)
    except OSError as e:
        log.debug("could not mark write %s to %s aborted (%s); deleting its files all the same", write_id, uri, e)
    fs, root = filesystem_for(uri)
    try:
        infos = fs.get_file_info(FileSelector(root, recursive=True, allow_not_found=True))
    except FileNotFoundError:
        return 0
    n = 0
    prefix = f"part-{write_id}-"
    for info in infos:
        if info.type == FileType.File and info.base_name.startswith(prefix) and "/_delta_log/" not in info.path:
            try:
                fs.delete_file(info.path)
            except FileNotFoundError:  # its task saw the abort mark and deleted it since the listing
                continue
            n += 1
    return n
