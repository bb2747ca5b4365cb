"""Where the rows come from: filesystems, row groups of a pinned Delta snapshot, sharding.

Sharding is static (the same for every epoch) and deterministic: it depends only on the
snapshot's active files (sorted by path), their row groups, ``world_size`` and the
granularity. Units (row groups, or whole files) are assigned greedily, largest first, to the
rank with the fewest rows so far (LPT), ties broken by table order / rank id. Every rank
computes the same assignment independently, so no communication is needed.
"""
from __future__ import annotations

import heapq
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.lake.fs import filesystem_for


def filesystem_for_table(
    table_uri: str,
    storage_options: Mapping[str, str] | None = None,
    filesystem: pafs.FileSystem | None = None,
) -> pafs.FileSystem:
    """The pyarrow filesystem the data files are read with: an explicit ``filesystem``, else
    the lake's (:func:`pipelines.lake.fs.filesystem_for`, which turns delta-rs style S3
    ``storage_options`` into an ``S3FileSystem`` with the credentials delta-rs uses)."""
    if filesystem is not None:
        return filesystem
    return filesystem_for(table_uri, storage_options)[0]


@dataclass(frozen=True)
class RowGroup:
    """One read unit: a row group of one active file."""

    file: int  # index into the loader's file list
    row_group: int
    num_rows: int


def read_footers(
    fs: pafs.FileSystem, paths: Sequence[str], threads: int = 8
) -> list[pq.FileMetaData]:
    """Parquet footers of ``paths`` (in parallel: on object stores each is a round trip)."""

    def one(path: str) -> pq.FileMetaData:
        with fs.open_input_file(path) as f:
            return pq.read_metadata(f)

    if len(paths) <= 1 or threads <= 1:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(threads, len(paths), (os.cpu_count() or 2) * 4)) as ex:
        return list(ex.map(one, paths))


def lpt_assign(unit_rows: Sequence[int], world_size: int) -> list[list[int]]:
    """Greedy longest-processing-time assignment of units to ranks, balanced by rows.

    Returns, per rank, its unit indices in ascending (table) order. Deterministic: units are
    taken by (rows desc, index asc), each goes to the rank with (fewest rows, lowest id).
    The spread between the fullest and the emptiest rank is at most one unit's rows.
    """
    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    heap = [(0, r) for r in range(world_size)]
    out: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(unit_rows)), key=lambda i: (-int(unit_rows[i]), i)):
        load, r = heapq.heappop(heap)
        out[r].append(i)
        heapq.heappush(heap, (load + int(unit_rows[i]), r))
    for lst in out:
        lst.sort()
    return out
