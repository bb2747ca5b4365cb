"""Categorical values -> ids: the vocabulary job (strategy ``vocab``), its lookups, and the
hashing strategy's ids.

- ``vocab`` (NVTabular Categorify / MLPerf style): per column, the values seen at least
  ``freq_threshold`` times in the *train* split get ids 2, 3, ... by descending frequency
  (ties: by value; at most ``max_vocab_size``); id 0 = missing, id 1 = rare or unseen.
  :func:`build_vocabulary` is one RDD job with one shuffle (map: :func:`count_task`; reduce:
  :func:`merge_partition`; the module docstring of :mod:`pipelines.criteo.featurize` tells
  what runs where); gold tasks look ids up with :func:`load_vocabulary` and :func:`vocab_ids`.
- ``hash``: id 0 = missing, else Spark's ``1 + pmod(xxhash64(value), hash_buckets - 1)``
  (:func:`hashed_ids`); no vocabulary pass.

Partial counts of 8-byte values (every Criteo categorical) travel and merge as uint64 keys
(:func:`_sum_counts`); other values as strings, with the same results.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.criteo.bronze_slices import (
    BronzeFileError,
    BronzeSlice,
    UnreadableBronzeError,
    bronze_tasks,
    read_slice,
    unreadable_from,
)
from pipelines.criteo.schema import FIRST_VOCAB_ID, MISSING_ID, NUM_SPARSE, RARE_ID, SPARSE
from pipelines.criteo.spark_xxhash import valid_mask, word_keys, xxhash64
from pipelines.criteo.split import TRAIN, FeaturizeError, SplitRule

if TYPE_CHECKING:
    from pipelines.lake.tasks import TaskWrite

VOCAB_SCHEMA = pa.schema([
    pa.field("column", pa.string()),
    pa.field("value", pa.string()),
    pa.field("id", pa.int32(), nullable=False),
    pa.field("count", pa.int64(), nullable=False),
])
FOLD_ROWS = 1 << 23  # vocabulary: partial-count rows a column may pile up (map or reduce side) before they are summed
UNREADABLE = -1  # vocabulary job: the shuffle key under which map tasks send unreadable files


def hashed_ids(col: pa.Array, buckets: int) -> np.ndarray:
    """``0`` for null, else Spark's ``1 + pmod(xxhash64(value), buckets - 1)`` (int32)."""
    def ids(values: pa.Array) -> np.ndarray:
        return (np.mod(xxhash64([values]), buckets - 1) + 1).astype(np.int32)

    return ids_per_row(col, ids)


class VocabLookup:
    """Positions of values in one column's vocabulary (value i has id 2 + i; -1: absent).

    Criteo categoricals are 8-byte strings: those are looked up as uint64 keys (their bytes)
    in a pandas hash index built once per vocabulary and worker. ``pc.index_in`` rebuilds a
    hash table of the whole vocabulary on every call; at 10 M rows (vocabularies of up to
    ~400 k values) that rebuild per batch made the lookups ~3x slower. Other values (any
    length but 8 bytes) go through ``pc.index_in``."""

    def __init__(self, values: pa.Array):
        import pandas as pd

        self.values = values
        keys = word_keys(values)
        self.index = pd.Index(keys) if keys is not None else None

    def positions(self, col: pa.Array) -> np.ndarray:
        """Per row of ``col``: its position, -1 when absent (null rows: unspecified)."""
        keys = word_keys(col) if self.index is not None else None
        if keys is not None:
            return self.index.get_indexer(keys)
        return pc.index_in(col, value_set=self.values).fill_null(-1).to_numpy()


def vocab_ids(col: pa.Array, lookup: VocabLookup) -> np.ndarray:
    """Ids of ``col`` against a column's vocabulary: null -> 0 (missing), not in the
    vocabulary -> 1 (rare or unseen), else 2 + its position."""

    def ids(values: pa.Array) -> np.ndarray:
        pos = lookup.positions(values)
        return np.where(pos >= 0, pos + FIRST_VOCAB_ID, RARE_ID).astype(np.int32)

    return ids_per_row(col, ids)


def ids_per_row(col: pa.Array, ids_of: Callable[[pa.Array], np.ndarray]) -> np.ndarray:
    """Per row of ``col``: ``ids_of``'s int32 id of its value, ``MISSING_ID`` for null. For a
    dictionary column (how bronze's categoricals are read) ``ids_of`` runs on the distinct
    values only and the rows gather from that (nulls from an extra entry): two passes over
    the rows, whatever ``ids_of`` costs."""
    if pa.types.is_dictionary(col.type):
        d = col.dictionary
        table = np.empty(len(d) + 1, np.int32)
        if len(d):
            table[:-1] = ids_of(d)
        if d.null_count:
            table[:-1][~valid_mask(d)] = MISSING_ID
        table[-1] = MISSING_ID
        idx = col.indices.fill_null(len(d)) if col.indices.null_count else col.indices
        return table[idx.to_numpy()]
    out = ids_of(col)
    if col.null_count:
        out[~valid_mask(col)] = MISSING_ID
    return out


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def _sum_counts(parts: list[pa.Table]) -> pa.Table:
    """Partial counts -> one table with the counts of equal values added. A partial is
    ``(key uint64, count)`` when all its values are 8 bytes (the key holds them big-endian,
    so key order is the values' byte order, Spark's string order), else ``(value string,
    count)``; mixed partials are merged as strings. Key partials are kept sorted by key (a
    merge of sorted runs: ~3x cheaper than hashing the keys again)."""
    if any("value" in p.column_names for p in parts):
        parts = [_as_values(p) for p in parts]
    if parts[0].column_names[0] == "key":
        keys = np.concatenate([p.column("key").to_numpy() for p in parts])
        counts = np.concatenate([p.column("count").to_numpy() for p in parts]).astype(np.int64)  # int32 on the wire
        order = np.argsort(keys, kind="stable")  # timsort: linear-ish on the sorted runs of the partials
        keys = keys[order]
        first = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
        return pa.table({"key": keys[first], "count": np.add.reduceat(counts[order], first) if len(first) else counts})
    parts = [p.set_column(1, "count", p.column("count").cast(pa.int64())) for p in parts]
    g = pa.concat_tables(parts).group_by("value", use_threads=False).aggregate([("count", "sum")])
    return pa.table({"value": g.column("value"), "count": g.column("count_sum")})


def _partial(values: pa.Array, counts: np.ndarray) -> pa.Table:
    keys = word_keys(values)
    if keys is None:
        return pa.table({"value": values, "count": counts})
    return _key_partial(keys, counts)


def _key_partial(words: np.ndarray, counts: np.ndarray) -> pa.Table:
    """A key partial from 8-byte values' little-endian words (see :func:`_sum_counts`)."""
    keys = words.byteswap()
    order = np.argsort(keys)
    return pa.table({"key": keys[order], "count": counts[order]})


def _as_values(t: pa.Table) -> pa.Table:
    if "value" in t.column_names:
        return t
    return pa.table({"value": _key_strings(t.column("key")), "count": t.column("count")})


def _key_strings(keys: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Big-endian uint64 keys back to their 8-byte strings."""
    k = np.ascontiguousarray(keys.to_numpy()).byteswap()
    offsets = np.arange(0, 8 * len(k) + 1, 8, dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), len(k), [None, pa.py_buffer(offsets), pa.py_buffer(k.view(np.uint8))])


def _value_counts(col: pa.Array) -> pa.Table:
    """Partial counts (see :func:`_sum_counts`) of the non-null values of ``col``; a
    dictionary column (how bronze's categoricals are read) is counted by its indices,
    without hashing a string per row."""
    if pa.types.is_dictionary(col.type):
        d = col.dictionary
        counts = np.bincount(pc.drop_null(col.indices).to_numpy(), minlength=len(d))
        seen = counts > 0
        d_valid = valid_mask(d)
        if d_valid is not None:
            seen &= d_valid  # a null held in the dictionary is a null row
        counts = counts[seen].astype(np.int32)
        words = word_keys(d)
        if words is not None:  # 8-byte values: keys straight from the dictionary, no string filter
            return _key_partial(words[seen], counts)
        return pa.table({"value": d.filter(pa.array(seen)), "count": counts})
    vc = pc.value_counts(col)
    values, counts = vc.field("values"), vc.field("counts")
    if values.null_count:
        valid = pc.is_valid(values)
        values, counts = values.filter(valid), counts.filter(valid)
    return _partial(values, counts.to_numpy().astype(np.int32))


class PartialCounts:
    """Partial counts (see :func:`_sum_counts`) per column index, summed whenever a column's
    pile passes ``FOLD_ROWS`` rows (then twice what the last sum left), so that memory stays
    within about three times the column's distinct values however many partials arrive."""

    def __init__(self) -> None:
        self._parts: dict[int, list[pa.Table]] = {}
        self._rows: dict[int, int] = {}
        self._limit: dict[int, int] = {}

    def add(self, j: int, t: pa.Table) -> None:
        if not t.num_rows:
            return
        parts = self._parts.setdefault(j, [])
        parts.append(t)
        self._rows[j] = self._rows.get(j, 0) + t.num_rows
        if len(parts) > 1 and self._rows[j] > self._limit.get(j, FOLD_ROWS):
            summed = _sum_counts(parts)
            self._parts[j], self._rows[j] = [summed], summed.num_rows
            self._limit[j] = max(FOLD_ROWS, 2 * summed.num_rows)

    def columns(self) -> list[int]:
        return sorted(self._parts)

    def pop(self, j: int) -> pa.Table:
        """Column ``j``'s counts, summed; forgotten here."""
        self._rows.pop(j, None)
        self._limit.pop(j, None)
        return _sum_counts(self._parts.pop(j))


def count_task(task: list[BronzeSlice], schema: pa.Schema, rule: SplitRule) -> Iterator[tuple[int, bytes]]:
    """Map side: per column index, the partial counts (see :func:`_sum_counts`) of the train
    rows of this task's slices, as Arrow IPC bytes; memory: about three times each column's
    distinct values in the task's rows (:class:`PartialCounts`)."""
    acc = PartialCounts()
    for i, sl in enumerate(task):
        if not rule.may_train(sl.day):
            continue
        whole = rule.of_day(sl.day)
        try:
            for batch in read_slice(sl, schema, dictionary=SPARSE):
                if whole is None:
                    keep = rule.of_rows(batch) == TRAIN
                    batch = batch.select(SPARSE).filter(pa.array(keep))
                for j, c in enumerate(SPARSE):
                    acc.add(j, _value_counts(batch.column(c)))
        except BronzeFileError as e:  # the job fails on the driver: counting the rest would be wasted
            for problem in unreadable_from(e, task[i + 1:]):
                yield UNREADABLE, problem.encode()
            return
    for j in acc.columns():
        t = acc.pop(j)
        if pc.max(t.column("count")).as_py() < 1 << 31:  # half the bytes to shuffle for the counts
            t = t.set_column(1, "count", t.column("count").cast(pa.int32()))
        yield j, _ipc(t)


def column_partitions(files: list, reducers: int) -> list[int]:
    """The reduce partition of each categorical column: columns spread over ``reducers`` by
    their Parquet bytes in up to 8 of the bronze ``files`` (footers: a proxy for the distinct
    values a reducer merges; a high-cardinality column is ~100x a small one), largest first
    into the lightest partition. ``column % reducers`` would pile the large columns onto a
    few reducers."""
    weight = np.ones(NUM_SPARSE)
    for f in files[:: max(1, -(-len(files) // 8))]:
        try:
            md = f.metadata
        except (OSError, pa.ArrowException):  # an unreadable file: the map task that reads it reports it
            continue
        for i in range(md.num_row_groups):
            rg = md.row_group(i)
            for k in range(rg.num_columns):
                c = rg.column(k)
                if c.path_in_schema in SPARSE:
                    weight[SPARSE.index(c.path_in_schema)] += c.total_uncompressed_size
    load = [0.0] * reducers
    out = [0] * NUM_SPARSE
    for j in np.argsort(-weight, kind="stable"):
        out[j] = load.index(min(load))
        load[out[j]] += weight[j]
    return out


def merge_partition(pairs: Iterable[tuple[int, bytes]], tw, threshold: int,
                    max_size: int | None) -> Iterator[tuple[int, int, int, list[dict]]]:
    """Reduce side: the ``(column index, partial counts as IPC bytes)`` pairs of this
    partition's columns, in any order, summed per column as they arrive; then each column
    through :func:`merge_column`."""
    acc = PartialCounts()
    unreadable: list[str] = []
    for j, blob in pairs:
        if j == UNREADABLE:
            unreadable.append(blob.decode())
            continue
        acc.add(j, pa.ipc.open_stream(blob).read_all())
    if unreadable:
        yield UNREADABLE, 0, 0, unreadable
        return
    for j in acc.columns():
        yield merge_column(j, acc.pop(j), tw, threshold, max_size)


def merge_column(index: int, counts: pa.Table, tw, threshold: int,
                 max_size: int | None) -> tuple[int, int, int, list[dict]]:
    """Column ``SPARSE[index]``'s summed train ``counts`` -> its vocabulary: keep values seen
    ``threshold``+ times (at most ``max_size``), number them 2, 3, ... by count desc then value
    asc, write the column's vocabulary files. Returns (index, distinct values in train, kept
    values, add actions)."""
    distinct = counts.num_rows
    kept = counts.filter(pc.greater_equal(counts.column("count"), threshold))
    by = kept.column_names[0]
    order = pc.sort_indices(kept, sort_keys=[("count", "descending"), (by, "ascending")])
    if max_size is not None:
        order = order.slice(0, max_size)
    kept = _as_values(kept.take(order))
    n = kept.num_rows
    adds: list[dict] = []
    if n:
        batch = pa.RecordBatch.from_arrays(
            [pa.repeat(pa.scalar(SPARSE[index], pa.string()), n), kept.column("value").combine_chunks(),
             pa.array(np.arange(FIRST_VOCAB_ID, FIRST_VOCAB_ID + n, dtype=np.int32)),
             kept.column("count").combine_chunks().cast(pa.int64())],
            schema=VOCAB_SCHEMA,
        )
        adds = tw.write_all([batch])
    return index, distinct, n, adds


def build_vocabulary(sc, files: list, schema: pa.Schema, rule: SplitRule, fz, path: str, guard,
                     compression: str = "zstd") -> tuple[TaskWrite, list[dict], dict[str, int], dict[str, int], tuple]:
    """The vocabulary job (see the module docstring) over the bronze ``files`` that can hold
    train rows. Returns (the vocabulary write, its add actions: written, NOT committed; kept
    values per column, distinct train values per column, per column the URIs of its files).
    The write is added to ``guard`` (:class:`pipelines.lake.tasks.UncommittedWrites`), which
    deletes its files on a failure."""
    from pipelines.lake.fs import file_uri
    from pipelines.lake.tasks import begin_write

    tw = guard.add(begin_write(path, VOCAB_SCHEMA, mode="overwrite", partition_by=["column"], compression=compression))
    # one reduce task per column at most; fewer on a small cluster, where a task's fixed cost
    # (about 60 ms of CPU in PySpark) would outweigh the merge of a small column
    reducers = min(NUM_SPARSE, 2 * max(1, sc.defaultParallelism))
    threshold, max_size = fz.freq_threshold, fz.max_vocab_size
    tasks = bronze_tasks(files, sc.defaultParallelism)
    results: list = []
    if tasks:
        sc.setJobDescription("featurize: vocabulary (count train values, merge per column)")
        try:
            results = (
                sc.parallelize(tasks, len(tasks))
                .flatMap(functools.partial(count_task, schema=schema, rule=rule))
                .partitionBy(reducers, column_partitions(files, reducers).__getitem__)
                .mapPartitions(lambda pairs: merge_partition(pairs, tw, threshold, max_size))
                .collect()
            )
        finally:
            sc.setJobDescription(None)
    if unreadable := [p for j, _, _, problems in results if j == UNREADABLE for p in problems]:
        raise UnreadableBronzeError(unreadable)
    distinct = {SPARSE[j]: d for j, d, _, _ in results}
    sizes = {SPARSE[j]: k for j, _, k, _ in results}
    uris = {j: tuple(file_uri(tw.uri, a["path"]) for a in adds) for j, _, _, adds in results}
    return (tw, [a for r in results for a in r[3]], {c: sizes.get(c, 0) for c in SPARSE},
            {c: distinct.get(c, 0) for c in SPARSE}, tuple(uris.get(j, ()) for j in range(NUM_SPARSE)))


_VOCAB_CACHE: dict[tuple, list[VocabLookup]] = {}


def load_vocabulary(files_by_column: tuple[tuple[str, ...], ...]) -> list[VocabLookup]:
    """Per column, a lookup of its vocabulary values ordered by id (value i has id 2 + i),
    read from the vocabulary table's files; cached in the worker process (the key is the file
    list, which is unique to one vocabulary write)."""
    import pyarrow.parquet as pq

    from pipelines.lake.fs import filesystem_for

    key = files_by_column
    hit = _VOCAB_CACHE.get(key)
    if hit is not None:
        return hit
    _VOCAB_CACHE.clear()
    out = []
    for c, files in zip(SPARSE, files_by_column):
        parts = []
        for uri in files:
            fs, path = filesystem_for(uri)
            parts.append(pq.read_table(path, filesystem=fs, columns=["value", "id"], use_threads=False))
        if not parts:
            out.append(VocabLookup(pa.array([], pa.string())))
            continue
        t = pa.concat_tables(parts).sort_by("id")
        ids = t.column("id").to_numpy()
        if not np.array_equal(ids, np.arange(FIRST_VOCAB_ID, FIRST_VOCAB_ID + len(ids))):
            raise FeaturizeError(f"vocabulary of {c} at {files[0]}: ids are not consecutive from {FIRST_VOCAB_ID}")
        out.append(VocabLookup(t.column("value").combine_chunks()))
    _VOCAB_CACHE[key] = out
    return out
