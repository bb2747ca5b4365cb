"""Table maintenance through delta-rs: history, vacuum, leftovers of failed writes (compaction:
:mod:`pipelines.lake.compaction`)."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

from deltalake import DeltaTable
from pyarrow.fs import FileType

from pipelines.lake.fs import delta_uri, filesystem_for, join, normalize_uri

log = logging.getLogger(__name__)


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
