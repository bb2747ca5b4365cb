"""Compaction of a table's small files (delta-rs's ``optimize.compact``) in the table's own file
layout, and the clean-up of a compaction that failed; a lease per running compaction tells one
compaction's clean-up from another's files."""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from pipelines.lake.fs import filesystem_for, join, normalize_uri
from pipelines.lake.maintenance import _files_in, _table, commit_info_at
from pipelines.lake.tasks import ROW_GROUP_ROWS_KEY

log = logging.getLogger(__name__)

# how delta-rs names the data files it writes (bigopt's own writers: part-<write_id>-...)
_DELTA_RS_FILE = re.compile(r"part-\d{5}-[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}-c\d{3}\.[^/]*parquet")

# <table>/_bigopt_compacting/<id>.json while a compaction runs (Delta ignores _-prefixed folders)
LEASE_DIR = "_bigopt_compacting"
# a lease older than this is a compaction that died (vacuum's default retention)
LEASE_EXPIRES_S = 7 * 24 * 3600


class CompactionRunningError(RuntimeError):
    """Another compaction of the table holds a lease: this one did nothing."""


def optimize(uri: str, target_size: int = 256 << 20, partition_filters=None) -> dict[str, Any]:
    """Compact small files into ~``target_size`` files (one commit; old files kept until vacuum),
    written in the table's own layout (:func:`file_layout`).

    One compaction of a table at a time: it holds a lease (``<table>/_bigopt_compacting/<id>.json``)
    while it runs and refuses to start (:class:`CompactionRunningError`) while another's lease is
    there (of two that start together, the one whose lease is older goes on). delta-rs 1.6.6 lets
    two compactions of the same files both commit, so every row was in the table twice (until the
    twenty-sixth session: the attack probe's two `bigopt lake --action optimize` at once).

    A compaction that fails (a write committed while it ran: delta-rs's ``CommitFailedError``; a
    log it may not write: ``OSError``; a stop) commits nothing, and the files it wrote are deleted
    (:func:`_delete_compaction_files`): delta-rs leaves them in the table's folder, where they
    stayed until a vacuum, one more set per attempt."""
    uri = normalize_uri(uri)
    layout = file_layout(uri)
    fs, root = filesystem_for(uri)
    lease = _take_lease(fs, root)
    try:
        if lease is not None and (ahead := _other_compactions(fs, root, lease, ahead_only=True)):
            raise CompactionRunningError(
                f"another compaction of {uri} is running ({'; '.join(ahead)}); nothing was done. If it is not running "
                f"(its process was killed on another host), delete its lease in {join(root, LEASE_DIR)} and run this "
                "again")
        before = _data_files(fs, root)
        try:
            return _table(uri).optimize.compact(partition_filters=partition_filters, target_size=target_size,
                                                writer_properties=layout)
        except BaseException:
            _delete_compaction_files(uri, fs, root, before, lease)
            raise
    finally:
        _drop_lease(fs, lease and lease.path)


@dataclass(frozen=True)
class _Lease:
    path: str
    started: float


def _take_lease(fs, root: str) -> _Lease | None:
    """Write this compaction's lease, or None where it cannot be written (a table folder it may
    not write: the compaction then fails on its own, with its own error)."""
    lease = _Lease(join(root, f"{LEASE_DIR}/{uuid.uuid4()}.json"), time.time())
    body = {"host": socket.gethostname(), "pid": os.getpid(), "started": lease.started}
    try:
        fs.create_dir(join(root, LEASE_DIR), recursive=True)
        with fs.open_output_stream(lease.path) as f:
            f.write(json.dumps(body).encode())
    except OSError:
        log.debug("could not write the compaction lease %s", lease.path, exc_info=True)
        return None
    return lease


def _drop_lease(fs, path: str | None) -> None:
    if path is None:
        return
    try:
        fs.delete_file(path)
    except OSError:  # a lease left behind only makes other compactions' clean-ups more careful
        log.debug("could not delete the compaction lease %s", path, exc_info=True)


def _other_compactions(fs, root: str, own: _Lease | None, ahead_only: bool = False) -> list[str]:
    """The leases of the table's other compactions that may still be running, as text for a
    message; with ``ahead_only``, only those that started before ``own`` (ties: the smaller
    lease name), which go first. A lease of this host whose process is gone, or older than
    ``LEASE_EXPIRES_S``, is a compaction that died: it is deleted and not counted. One that
    cannot be read (being written) counts; so does one of another host, whose process cannot be
    checked."""
    from pyarrow.fs import FileSelector, FileType

    running = []
    infos = fs.get_file_info(FileSelector(join(root, LEASE_DIR), allow_not_found=True))
    for info in infos:
        if info.type != FileType.File or (own is not None and info.path == own.path) or not info.path.endswith(".json"):
            continue
        try:
            with fs.open_input_stream(info.path) as f:
                lease = json.loads(f.read())
            host, pid, started = str(lease["host"]), int(lease["pid"]), float(lease["started"])
        except FileNotFoundError:  # ended since the listing
            continue
        except (OSError, ValueError, KeyError, TypeError):
            running.append(f"{info.path} (unreadable)")
            continue
        if time.time() - started > LEASE_EXPIRES_S or (host == socket.gethostname() and not _alive(pid)):
            _drop_lease(fs, info.path)
            continue
        if ahead_only and own is not None and (started, info.path) > (own.started, own.path):
            continue  # started after this one: it gives way
        running.append(f"pid {pid} on {host} since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}")
    return running


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _data_files(fs, root: str) -> set[str]:
    """The paths (on ``fs``) of the Parquet files in the table's folder, its log left out."""
    return {join(root, r) for r in _files_in(fs, root) if r.endswith(".parquet")}


def _delete_compaction_files(uri: str, fs, root: str, before: set[str], lease: _Lease | None) -> None:
    """Delete the files of a compaction that failed: the Parquet files that appeared in the
    table's folder while it ran (not in ``before``), named as delta-rs names its files, written
    by delta-rs's Parquet writer (a concurrent Spark write's files are named alike, but written
    by parquet-mr; bigopt's writers name theirs ``part-<write_id>-``), and referenced by no
    commit (a commit that landed keeps its files). While another compaction of the table holds
    a lease, nothing is deleted: its files, not yet committed, look the same (until the
    twenty-sixth session they were deleted, and its commit then named files that were gone).
    The leases are read after the listing and the commits after the leases, so a compaction
    that starts, or commits, in between is seen. What cannot be told or deleted is left to a
    vacuum, with a warning."""
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
        if others := _other_compactions(fs, root, lease):
            log.warning("the %d file(s) the failed compaction of %s may have written are left to a vacuum: another "
                        "compaction of the table is running (%s), whose files look the same", len(new), uri,
                        "; ".join(others))
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

