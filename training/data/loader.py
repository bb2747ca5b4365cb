"""DeltaTorchLoader: a Delta table at a pinned version -> batches of torch tensors.

Replaces Petastorm (whose 0.13.1 imports ``pyarrow.filesystem``, removed in pyarrow 16, while
pyspark 4 needs pyarrow >= 18). See docs/loader.md for the full semantics; in short:

* the Delta log is resolved once (``pipelines.lake.DeltaSnapshot``): ``loader.version`` is the
  version read, whatever is committed later;
* the active files' row groups are sharded statically across ``world_size`` ranks, balanced
  by row count (``training.data.sources.lpt_assign``);
* per epoch, each rank streams its row groups (in a seeded random order when shuffling)
  through a read-ahead thread pool, decodes each row group ONCE into tensors (zero-copy
  where the types allow), and cuts batches by tensor slicing; shuffling goes through a
  reservoir of ``shuffle_buffer_rows`` rows with vectorized gather/scatter (no per-row Python);
* every rank yields exactly ``len(loader)`` batches per epoch (drop / pad rule below), a
  background thread keeps ``prefetch`` batches ready, and ``state_dict()`` /
  ``load_state_dict()`` resume an epoch exactly where it stopped.

Batch-count rule (identical on every rank, so collectives never hang):

* ``drop_last=True`` (training default): ``len = min_rank_rows // batch_size``; every batch
  is full; each rank drops what it has beyond that (with shuffling, different rows each epoch).
* ``drop_last=False, pad_to_equal=True`` (default when ``world_size > 1``):
  ``len = ceil(max_rank_rows / batch_size)``; every row of the rank's shard is yielded once;
  batch ``i`` has the same size on every rank (``batch_size``, the last one
  ``max_rank_rows - (len-1) * batch_size``); rows beyond a rank's shard are zeros and
  ``batch["_valid"]`` (bool) marks the real ones.
* ``drop_last=False, pad_to_equal=False``: ``len = ceil(rank_rows / batch_size)``, last batch
  partial, no mask. May differ between ranks: only for single-process use or when nothing
  collective runs per batch.
"""
from __future__ import annotations

import logging
import math
import os
import queue
import threading
import warnings
import weakref
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipelines.lake.fs import path_in_filesystem
from pipelines.lake.reader import DeltaSnapshot, partition_scalar
from training.data.convert import UnsupportedColumnError, column_to_tensor, default_torch_dtype, torch_dtype
from training.data.sources import (
    RowGroup,
    filesystem_for_table,
    lpt_assign,
    read_footers,
)

log = logging.getLogger(__name__)

VALID_KEY = "_valid"
STATE_VERSION = 1

Batch = dict[str, torch.Tensor]


class UnreadableDataFileError(OSError):
    """A data file of the table that cannot be read (damaged, or gone): the message names it."""


class DeltaTorchLoader:
    """Iterate a Delta table (pinned version) as ``dict[str, torch.Tensor]`` batches.

    Args:
        table_uri: local path or URI pyarrow/delta-rs understand (``s3://``, ``hdfs://``, ...).
        columns: columns to read (projection at the Parquet scan); default all.
        batch_size: rows per batch.
        version: Delta version to pin; ``None`` = latest at construction time.
        rank, world_size: this process's shard (e.g. ``hvd.rank(), hvd.size()``).
        shuffle: seeded shuffling (row-group order + a shuffle buffer); off = table order.
        seed: base seed; the order is a function of (seed, epoch, rank, world_size) only.
        shuffle_buffer_rows: reservoir size (rounded up to a multiple of ``batch_size``).
        drop_last: keep only full batches (see module doc for the exact rule).
        pad_to_equal: with ``drop_last=False``, pad every rank to the same number of
            batches and add ``batch["_valid"]``; default: ``world_size > 1``.
        prefetch: batches kept ready by a background thread (0 = no thread).
        storage_options: delta-rs storage options (also used for the S3 filesystem).
        dtypes: ``{column: torch dtype or name}`` to cast to (default: the Arrow type's).
        pad: ``{column: (max_len, value)}`` for variable-length list columns.
        fill_null: value replacing nulls (default: nulls are an error).
        shard_by: ``"row_group"`` (finest balance) or ``"file"`` (each rank only opens its
            own files' footers; coarser balance).
        read_ahead: row groups read/decoded concurrently ahead of batching (0 = inline;
            default :func:`default_read_ahead`: 1 to 4 by cores for local paths, 4 for remote filesystems).
        use_threads: let pyarrow decode a row group's columns in parallel.
        filesystem: explicit ``pyarrow.fs.FileSystem`` for the data files.
        pin_memory: batches in page-locked memory (shuffled batches are gathered straight
            into it), so ``tensor.to("cuda", non_blocking=True)`` returns at once. A copy from
            pageable memory first waits for the GPU's queued work, so the GPU then idles while
            the host launches the next step. Ignored without CUDA.
    """

    _GATHER_ROWS = 65_536  # rows per shuffle gather (staging area: this many records)

    def __init__(
        self,
        table_uri: str,
        columns: Sequence[str] | None = None,
        batch_size: int = 4096,
        *,
        version: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        shuffle_buffer_rows: int = 262_144,
        drop_last: bool = True,
        pad_to_equal: bool | None = None,
        prefetch: int = 2,
        storage_options: Mapping[str, str] | None = None,
        dtypes: Mapping[str, torch.dtype | str] | None = None,
        pad: Mapping[str, tuple[int, Any]] | None = None,
        fill_null: Any = None,
        shard_by: str = "row_group",
        read_ahead: int | None = None,
        use_threads: bool = True,
        filesystem=None,
        pin_memory: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if seed < 0:
            raise ValueError("seed must be >= 0")
        if shard_by not in ("row_group", "file"):
            raise ValueError("shard_by must be 'row_group' or 'file'")
        if pad_to_equal and drop_last:
            raise ValueError("pad_to_equal=True needs drop_last=False (with drop_last every batch is full)")
        self.batch_size = int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.shuffle, self.seed = bool(shuffle), int(seed)
        self.drop_last = bool(drop_last)
        self.pad_to_equal = bool(pad_to_equal) if pad_to_equal is not None else (not drop_last and world_size > 1)
        self.shuffle_buffer_rows = max(1, math.ceil(max(0, int(shuffle_buffer_rows)) / self.batch_size)) * self.batch_size
        self.prefetch = max(0, int(prefetch))
        self.use_threads = bool(use_threads)
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        self.shard_by = shard_by
        self.fill_null = fill_null
        self.storage_options = dict(storage_options or {})

        snap = DeltaSnapshot(table_uri, version=version, storage_options=self.storage_options)
        self.table_uri: str = snap.uri
        self.version: int = snap.version
        self.columns: list[str] = list(columns) if columns is not None else list(snap.schema().names)
        if not self.columns:
            raise ValueError("no columns to read")
        if len(set(self.columns)) != len(self.columns):
            raise ValueError(f"duplicate column names in {self.columns}")
        self.arrow_schema: pa.Schema = snap.schema(self.columns)  # KeyError on unknown columns
        self.partition_columns = [c for c in self.columns if c in snap.partition_columns]
        self._pad = {k: (int(v[0]), v[1]) for k, v in (pad or {}).items()}
        self.dtypes: dict[str, torch.dtype] = {}
        for f in self.arrow_schema:
            given = (dtypes or {}).get(f.name)
            self.dtypes[f.name] = torch_dtype(given) if given is not None else default_torch_dtype(f.type, f.name)
        self._physical = _physical_names(snap, self.columns)
        snap.check_no_deletion_vectors()  # read whole, such files bring deleted rows back

        self._fs = filesystem_for_table(self.table_uri, self.storage_options, filesystem)
        self._local = "://" not in self.table_uri and filesystem is None
        self.read_ahead = max(0, int(read_ahead)) if read_ahead is not None else default_read_ahead(self._local)
        self._files = [f for f in snap.files() if f.num_records is None or f.num_records > 0]
        self._paths = [path_in_filesystem(f.uri) for f in self._files]
        self._footers: dict[int, pq.FileMetaData] = {}
        self._template: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None
        self._template_lock = threading.Lock()
        self._arena_pool: list[_Arena] = []  # idle shuffle arena, reused next epoch
        self._build_shards()

        # iteration state: the epoch the next iter() starts, a pending resume point, and the
        # position (epoch, batches handed out) of the epoch in progress
        self._next_epoch = 0
        self._resume: tuple[int, int] | None = None
        self._cursor: list[int] | None = None
        self._active: weakref.ReferenceType[_EpochIterator] | None = None

    # ------------------------------------------------------------------ setup
    def _footer(self, i: int) -> pq.FileMetaData:
        self._load_footers([i])
        return self._footers[i]

    def _load_footers(self, idx: Sequence[int]) -> None:
        """Read the footers of files ``idx`` not read yet. One that cannot be read is
        :class:`UnreadableDataFileError` naming the file, the table and its version, as a row
        group that cannot be read is (until the twenty-sixth session the footers read while the
        loader was built gave pyarrow's bare error: "Parquet magic bytes not found", or a
        FileNotFoundError without the vacuum that removed the file)."""
        todo = [i for i in idx if i not in self._footers]
        if not todo:
            return
        try:
            footers = read_footers(self._fs, [self._paths[i] for i in todo])
        except (OSError, pa.ArrowException):
            for i in todo:  # which one (read in threads together)
                try:
                    read_footers(self._fs, [self._paths[i]])
                except (OSError, pa.ArrowException) as e:
                    raise UnreadableDataFileError(self._unreadable(self._files[i].uri, None, e)) from e
            raise
        for i, md in zip(todo, footers):
            self._footers[i] = md

    def _file_row_groups(self, i: int) -> list[RowGroup]:
        md = self._footer(i)
        names = set(md.schema.to_arrow_schema().names)
        missing = [c for c in self.columns if c not in self.partition_columns and self._physical[c] not in names]
        if missing:
            raise UnsupportedColumnError(
                f"column(s) {missing} absent from data file {self._files[i].uri} (added later by schema "
                "evolution?); rewrite the table or project other columns"
            )
        return [RowGroup(i, g, md.row_group(g).num_rows) for g in range(md.num_row_groups) if md.row_group(g).num_rows]

    def _build_shards(self) -> None:
        W = self.world_size
        if self.shard_by == "row_group":
            self._load_footers(range(len(self._files)))
            all_units = [u for i in range(len(self._files)) for u in self._file_row_groups(i)]
            assign = lpt_assign([u.num_rows for u in all_units], W)
            shards = [[all_units[j] for j in a] for a in assign]
            self.rank_rows = [sum(u.num_rows for u in s) for s in shards]
            self._units = shards[self.rank]
            self.num_rows = sum(u.num_rows for u in all_units)
            starts = np.concatenate([[0], np.cumsum([u.num_rows for u in all_units])])
            self._unit_starts = [int(starts[j]) for j in assign[self.rank]]
        else:
            unknown = [i for i, f in enumerate(self._files) if f.num_records is None]
            self._load_footers(unknown)
            file_rows = [
                int(f.num_records) if f.num_records is not None else self._footers[i].num_rows
                for i, f in enumerate(self._files)
            ]
            assign = lpt_assign(file_rows, W)
            self.rank_rows = [sum(file_rows[i] for i in a) for a in assign]
            self._load_footers(assign[self.rank])
            self._units = [u for i in assign[self.rank] for u in self._file_row_groups(i)]
            self.num_rows = sum(file_rows)
            file_starts = np.concatenate([[0], np.cumsum(file_rows)])
            self._unit_starts = []
            for i in assign[self.rank]:
                at = int(file_starts[i])
                for u in self._file_row_groups(i):
                    self._unit_starts.append(at)
                    at += u.num_rows
        self.shard_rows = self.rank_rows[self.rank]
        if sum(u.num_rows for u in self._units) != self.shard_rows:
            raise RuntimeError("Delta num_records disagrees with the Parquet footers of this shard")
        B = self.batch_size
        if self.drop_last:
            self._len = min(self.rank_rows) // B
            if self._len == 0 and self.num_rows:
                warnings.warn(
                    f"drop_last with batch_size={B}: the smallest shard has {min(self.rank_rows)} rows, so every "
                    "epoch is empty", stacklevel=3,
                )
        elif self.pad_to_equal:
            self._len = math.ceil(max(self.rank_rows) / B)
        else:
            self._len = math.ceil(self.shard_rows / B)
        self._real_batches = math.ceil(self.shard_rows / B)

    # ------------------------------------------------------------------ public API
    def global_positions(self) -> np.ndarray:
        """Each row of this rank's shard, in the order an unshuffled epoch yields it, as its
        position in the snapshot (files in the log's order, row groups and rows in file order):
        the same row has the same position whatever the rank count, so a capped evaluation can
        score the snapshot's first rows on any number of ranks (:func:`training.loop.evaluate`)."""
        if self.shuffle:
            raise ValueError("global_positions: the loader is shuffled (its order changes every epoch)")
        if not self._units:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.arange(a, a + u.num_rows, dtype=np.int64)
                               for u, a in zip(self._units, self._unit_starts)])

    def __len__(self) -> int:
        return self._len

    @property
    def epoch(self) -> int:
        """The epoch in progress, or the one the next ``iter()`` starts."""
        return self._position()[0]

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` run ``epoch`` from its start."""
        if epoch < 0:
            raise ValueError("epoch must be >= 0")
        self._close_active()
        self._next_epoch, self._resume, self._cursor = int(epoch), None, None

    def __iter__(self) -> Iterator[Batch]:
        """The next epoch (or the rest of a resumed one). Starting a new iteration stops
        the previous one; abandoning an epoch midway moves on to the next epoch."""
        self._close_active()
        epoch, skip = self._resume if self._resume is not None else (self._next_epoch, 0)
        self._resume = None
        self._next_epoch = epoch + 1
        self._cursor = [epoch, skip]
        it = _EpochIterator(self, epoch, skip, self._cursor)
        self._active = weakref.ref(it)
        return it

    def _position(self) -> tuple[int, int]:
        if self._resume is not None:
            return self._resume
        if self._cursor is not None and self._cursor[1] < self._len:
            return self._cursor[0], self._cursor[1]
        return self._next_epoch, 0

    def state_dict(self) -> dict[str, Any]:
        """Where the iteration stands: the epoch in progress and the number of its batches
        already handed out (``next()`` returned), or the next epoch and 0 at an epoch
        boundary; plus the settings that determine the order, which ``load_state_dict``
        checks. Batches sitting in the prefetch queue are not counted: they are produced
        again after a resume."""
        epoch, consumed = self._position()
        return {
            "state_version": STATE_VERSION,
            "epoch": epoch,
            "batches_consumed": consumed,
            "seed": self.seed,
            "version": self.version,
            "table_uri": self.table_uri,
            "columns": list(self.columns),
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "shuffle_buffer_rows": self.shuffle_buffer_rows,
            "drop_last": self.drop_last,
            "pad_to_equal": self.pad_to_equal,
            "shard_by": self.shard_by,
            "num_batches": self._len,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the next ``iter()`` continues ``state['epoch']`` after its first
        ``state['batches_consumed']`` batches and yields exactly the batches an uninterrupted
        run would have yielded next. The settings that determine the stream must match
        (construct the loader with ``version=state['version']``); ``seed`` is taken from it."""
        must_match = ("version", "world_size", "rank", "batch_size", "shuffle", "shuffle_buffer_rows",
                      "drop_last", "pad_to_equal", "shard_by")
        diff = {k: (state[k], getattr(self, k)) for k in must_match if k in state and state[k] != getattr(self, k)}
        if "columns" in state and list(state["columns"]) != self.columns:
            diff["columns"] = (list(state["columns"]), self.columns)
        if diff:
            raise ValueError(f"state_dict does not match this loader (saved, current): {diff}")
        epoch, consumed = int(state["epoch"]), int(state["batches_consumed"])
        if epoch < 0 or not 0 <= consumed <= self._len:
            raise ValueError(f"bad position epoch={epoch}, batches_consumed={consumed} (len={self._len})")
        self._close_active()
        self.seed = int(state.get("seed", self.seed))
        self._cursor = None
        self._resume = (epoch, consumed) if consumed < self._len else (epoch + 1, 0)

    def close(self) -> None:
        """Stop the background thread of an unfinished iteration (also happens when the
        iterator is garbage-collected or a new iteration starts)."""
        self._close_active()

    def _close_active(self) -> None:
        it = self._active() if self._active is not None else None
        self._active = None
        if it is not None:
            it.close()

    def __repr__(self) -> str:
        return (f"DeltaTorchLoader({self.table_uri!r}@v{self.version}, columns={self.columns}, "
                f"batch_size={self.batch_size}, rank={self.rank}/{self.world_size}, rows={self.shard_rows}/"
                f"{self.num_rows}, batches={self._len}, shuffle={self.shuffle})")

    # ------------------------------------------------------------------ reading
    def _unreadable(self, uri: str, row_group: int | None, e: BaseException) -> str:
        """Why a data file could not be read. A file a vacuum removed while this loader read its
        version (a later version had replaced it) is no damage, and a run again on the latest
        version is the remedy (until the twenty-fifth session: "rebuild the table ... or restore")."""
        part = "its footer" if row_group is None else f"row group {row_group}"
        where = f"{uri} ({part}, {self.table_uri} v{self.version})"
        if isinstance(e, FileNotFoundError):
            try:
                vacuumed = DeltaSnapshot(self.table_uri, version=self.version,
                                         storage_options=self.storage_options).vacuumed_since()
            except Exception:  # noqa: BLE001 - the log itself unreadable: the plain message below
                vacuumed = None
            if vacuumed:
                return (f"{where} is gone: a vacuum removed {len(vacuumed[1])} of v{self.version}'s files while this "
                        f"run read it (v{vacuumed[0]} replaced them; a vacuum with --no-retention-check deletes "
                        "files a reader of an older version still needs); the table is not damaged: run again on "
                        f"v{vacuumed[0]}")
        return (f"{where} cannot be read: {type(e).__name__}: {e}; rebuild the table (gold: bigopt featurize --force) "
                "or restore the file")

    def _read_unit(self, u: RowGroup) -> Batch:
        """One row group -> ``{column: tensor}`` (decoded once; zero-copy where possible)."""
        fe = self._files[u.file]
        file_cols = [self._physical[c] for c in self.columns if c not in self.partition_columns]
        table = None
        if file_cols:
            try:
                with self._fs.open_input_file(self._paths[u.file]) as f:
                    pf = pq.ParquetFile(f, metadata=self._footer(u.file), pre_buffer=not self._local)
                    table = pf.read_row_group(u.row_group, columns=file_cols, use_threads=self.use_threads)
            except (OSError, pa.ArrowException) as e:  # damaged or gone: say which file of which table
                raise UnreadableDataFileError(self._unreadable(fe.uri, u.row_group, e)) from e
            if table.num_rows != u.num_rows:
                raise RuntimeError(f"{fe.uri} row group {u.row_group}: {table.num_rows} rows, footer says {u.num_rows}")
        out: Batch = {}
        for c in self.columns:
            if c in self.partition_columns:
                typ = self.arrow_schema.field(c).type
                arr = pa.repeat(partition_scalar(fe.partition_values.get(c), typ), u.num_rows)
            else:
                arr = table.column(self._physical[c])
            out[c] = column_to_tensor(arr, c, self.dtypes[c], self._pad.get(c), self.fill_null)
        self._check_template(out, fe.uri)
        return out

    def _check_template(self, chunk: Batch, where: str) -> None:
        shapes = {c: (tuple(t.shape[1:]), t.dtype) for c, t in chunk.items()}
        with self._template_lock:
            if self._template is None:
                self._template = shapes
                return
        if shapes != self._template:
            bad = {c: (shapes[c], self._template[c]) for c in shapes if shapes[c] != self._template[c]}
            raise UnsupportedColumnError(
                f"{where}: per-row shapes differ from earlier row groups (got, expected): {bad}; "
                "use pad={col: (max_len, value)} for list columns whose length varies"
            )

    def _ensure_template(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        if self._template is None:
            units = self._units or self._file_row_groups(0)
            self._read_unit(units[0])
        assert self._template is not None
        return self._template

    # ------------------------------------------------------------------ epoch planning
    def _rng(self, epoch: int, stream: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, epoch, self.rank, self.world_size, stream]))

    def epoch_units(self, epoch: int) -> list[RowGroup]:
        """This rank's row groups in the order epoch ``epoch`` reads them."""
        units = list(self._units)
        if not self.shuffle or len(units) < 2:
            return units
        rng = self._rng(epoch, 0)
        if self.shard_by == "file":
            files: dict[int, list[RowGroup]] = {}
            for u in units:
                files.setdefault(u.file, []).append(u)
            groups = list(files.values())
            return [u for g in (groups[i] for i in rng.permutation(len(groups))) for u in g]
        return [units[i] for i in rng.permutation(len(units))]

    def _epoch_batches(self, epoch: int, skip: int) -> Iterator[Batch]:
        """Exactly the batches ``skip..len-1`` of ``epoch`` (generator; runs in the prefetch thread)."""
        n, B = self._len, self.batch_size
        if skip >= n:
            return
        units = self.epoch_units(epoch)
        real = self._real_batches
        raw = (self._shuffled if self.shuffle else self._sequential)(units, epoch, min(skip, real))
        last_size = max(self.rank_rows) - (n - 1) * B if self.pad_to_equal else B
        try:
            for i in range(skip, n):
                batch = next(raw) if i < real else None
                if self.pad_to_equal:
                    batch = self._padded(batch, B if i < n - 1 else last_size)
                yield batch
        finally:
            raw.close()

    def _padded(self, batch: Batch | None, size: int) -> Batch:
        q = 0 if batch is None else len(next(iter(batch.values())))
        valid = np.zeros(size, dtype=bool)
        valid[:q] = True
        if q == size:
            out = dict(batch)  # type: ignore[arg-type]
        else:
            tmpl = self._ensure_template()
            out = {}
            for c in self.columns:
                shape, dt = tmpl[c]
                z = torch.zeros((size - q, *shape), dtype=dt)
                out[c] = z if batch is None else _cat([batch[c], z])
        out[VALID_KEY] = torch.from_numpy(valid)
        return out

    def _sequential(self, units: list[RowGroup], epoch: int, start_batch: int) -> Iterator[Batch]:
        total, B = self.shard_rows, self.batch_size
        p = start_batch * B
        if p >= total:
            return
        stream = _Stream(self, units, p)
        try:
            while p < total:
                m = min(B, total - p)
                batch = stream.take(m)
                yield {c: t.pin_memory() for c, t in batch.items()} if self.pin_memory else batch
                p += m
        finally:
            stream.close()

    def _shuffled(self, units: list[RowGroup], epoch: int, skip: int) -> Iterator[Batch]:
        """Reservoir shuffle over a ring arena, vectorized.

        Control flow (a function of row counts and the RNG only, never of the data): ``C``
        slots hold the stream positions of the first ``C`` rows of the (row-group shuffled)
        stream. Round after round, a fresh permutation of the ``C`` slots is cut into
        ``C / B`` batches; each batch emits the rows its ``B`` slots refer to, then points
        those slots at the next ``B`` stream rows. Every slot is emitted once per round, so a
        row waits a random time (at most two rounds) before it leaves. When the stream runs
        dry, the remaining rows are permuted and emitted.

        Data path: rows are appended to a ring arena of ``2C`` rows in stream order
        (sequential copies) and batches are random gathers of whole records at
        ``position % 2C``. Within a round a batch only reads slots not yet emitted in that
        round, whose positions were set in the previous round, so several batches are
        gathered at once (about 64k rows: fewer, larger numpy calls); ``2C`` rows suffice
        because appends in round ``r`` only overwrite positions inserted in round ``r - 2``.
        Resuming replays the control flow on the positions alone, then reads only the row
        groups the live slots refer to (``_materialize``).
        """
        total, B, C = self.shard_rows, self.batch_size, self.shuffle_buffer_rows
        rng = self._rng(epoch, 1)
        dts = self.dtypes
        G = max(1, self._GATHER_ROWS // B)  # batches gathered per numpy call
        n0 = min(C, total)
        A = 2 * C if total > C else n0  # arena rows
        ids = np.arange(n0, dtype=np.int64)  # slot -> stream position
        live = np.ones(n0, dtype=bool)  # False: slot emptied when the stream ran dry
        emitted = 0  # batches of this epoch before the current point (skipped or yielded)
        next_pos = n0  # stream position of the next refill
        appended = 0  # stream rows [0, appended) are (or were) in the arena
        arena: _Arena | None = None
        stream: _Stream | None = None

        def append_upto(upto: int) -> None:
            """Stream rows [appended, upto) -> arena[pos % A ...] (sequential, wrapping)."""
            nonlocal arena, appended
            pos = appended
            for piece in stream.pieces(upto - appended):  # type: ignore[union-attr]
                if arena is None:  # after the first read: the per-row shapes are known
                    arena = self._arena(A)
                k = len(next(iter(piece.values())))
                i = pos % A
                h = min(k, A - i)
                for c, a in arena.cols.items():
                    src = _np(piece[c])
                    a[i:i + h] = src[:h]
                    if h < k:
                        a[:k - h] = src[h:]
                pos += k
            appended = upto

        def go_live(resume_pos: int) -> None:
            """Start producing data: fresh from the stream, or (resume) materialize the slots."""
            nonlocal arena, stream, appended
            if emitted == 0 and resume_pos == n0:
                stream = _Stream(self, units, 0)
                append_upto(n0)
            else:
                arena = self._materialize(units, ids[live], A)
                appended = resume_pos
                stream = _Stream(self, units, resume_pos) if resume_pos < total else None

        pin = self.pin_memory

        def batches_of(slots: np.ndarray) -> Iterator[Batch]:
            for got in arena.gather(ids[slots] % A, B, copy=not pin):  # type: ignore[union-attr]
                yield {c: _pinned_copy(a, dts[c]) if pin else _tt(a, dts[c]) for c, a in got.items()}

        try:
            if total > C:
                while True:
                    perm = rng.permutation(C)
                    rem = total - next_pos
                    done = rem // B < C // B  # the stream runs dry in this round
                    J = rem // B + 1 if done else C // B  # batches this round
                    consumed = rem if done else C  # stream rows refilled this round
                    j0 = min(max(0, skip - emitted), J)  # first batch to produce
                    if j0 > 0:  # fast-forward: refill ids of the skipped batches only
                        k = min(consumed, j0 * B)
                        ids[perm[:k]] = np.arange(next_pos, next_pos + k)
                    if j0 < J:
                        if arena is None:
                            go_live(next_pos + min(consumed, j0 * B))
                        for j in range(j0, J, G):
                            je = min(J, j + G)
                            yield from batches_of(perm[j * B:je * B])
                            lo, hi = min(consumed, j * B), min(consumed, je * B)
                            if hi > lo:
                                append_upto(next_pos + hi)
                                ids[perm[lo:hi]] = np.arange(next_pos + lo, next_pos + hi)
                    emitted += J
                    next_pos += consumed
                    if done:
                        live[perm[rem:J * B]] = False
                        break
            slots = np.flatnonzero(live)
            order = slots[rng.permutation(len(slots))]
            nb = -(-len(order) // B)
            j0 = min(max(0, skip - emitted), nb)
            if j0 < nb and arena is None:
                go_live(next_pos)
            for j in range(j0, nb, G):
                yield from batches_of(order[j * B:min(nb, j + G) * B])
        finally:
            if stream is not None:
                stream.close()
            if arena is not None:
                self._arena_pool.append(arena)

    def _arena(self, rows: int) -> _Arena:
        """A shuffle arena of ``rows`` rows: the previous epoch's when it fits (fresh memory
        costs page faults on first touch, ~0.1 s per 40 MB on some VMs), else a new one."""
        while self._arena_pool:
            a = self._arena_pool.pop()
            if a.rows == rows:
                return a
        return _Arena(rows, self._ensure_template())

    def _materialize(self, units: list[RowGroup], positions: np.ndarray, arena_rows: int) -> _Arena:
        """A ring arena holding the rows at stream ``positions`` (at ``position % arena_rows``),
        reading only the row groups those positions fall in."""
        starts = np.cumsum([0] + [u.num_rows for u in units])
        uidx = np.searchsorted(starts, positions, side="right") - 1
        order = np.argsort(uidx, kind="stable")
        sorted_u = uidx[order]
        arena: _Arena | None = None

        def read(k: int) -> tuple[int, Batch]:
            return k, self._read_unit(units[k])

        with ThreadPoolExecutor(max_workers=max(1, self.read_ahead)) as ex:
            for k, chunk in ex.map(read, np.unique(sorted_u).tolist()):
                if arena is None:
                    arena = self._arena(arena_rows)
                lo, hi = np.searchsorted(sorted_u, [k, k + 1])
                pos = positions[order[lo:hi]]
                for c, a in arena.cols.items():
                    a[pos % arena_rows] = np.take(_np(chunk[c]), pos - starts[k], axis=0)
        assert arena is not None
        return arena


class _Arena:
    """Row-major storage for the shuffle: one record of all columns per row, so a batch is
    ONE random gather of whole records (a record of the gold columns is 160 bytes, ~3 cache
    lines, instead of a miss per column), then a sequential split into column arrays."""

    def __init__(self, rows: int, template: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        specs = []
        for c, (shape, dt) in template.items():
            npdt = _np(torch.empty(0, dtype=dt)).dtype
            specs.append((c, shape, npdt, npdt.itemsize * int(np.prod(shape, dtype=np.int64))))
        # widest items first keeps every column aligned to its itemsize
        layout, off = {}, 0
        for c, shape, npdt, width in sorted(specs, key=lambda x: -x[2].itemsize):
            layout[c] = (off, width, shape, npdt)
            off += width
        align = max((x[2].itemsize for x in specs), default=1)
        self.record = max(align, -(-off // align) * align)
        self.rows = rows
        self.buf = np.empty((rows, self.record), dtype=np.uint8)
        self.records = self.buf.view(np.dtype((np.void, self.record))).reshape(rows)
        self.layout = {c: layout[c] for c in template}
        self.cols = {c: self._column(self.buf, c) for c in template}
        self._stage: np.ndarray | None = None

    def _column(self, buf: np.ndarray, c: str) -> np.ndarray:
        off, width, shape, npdt = self.layout[c]
        n = buf.shape[0]
        if width == 0:
            return np.zeros((n, *shape), dtype=npdt)
        return buf[:, off:off + width].view(npdt).reshape(n, *shape)

    def gather(self, at: np.ndarray, batch_rows: int, copy: bool = True) -> Iterator[dict[str, np.ndarray]]:
        """The records at ``at``, as column arrays of ``batch_rows`` rows each.

        One random gather into a staging area that is reused (fresh memory is expensive:
        page faults on first touch), then a sequential copy per batch and column into
        arrays the caller owns. Each batch is copied out before the next one is yielded.
        ``copy=False``: views of the staging area, valid until the next batch (the caller
        copies them, e.g. into page-locked memory)."""
        n = len(at)
        if self._stage is None or len(self._stage) < n:
            self._stage = np.empty((n, self.record), dtype=np.uint8)
        stage = self._stage[:n]
        np.take(self.records, at, out=stage.view(self.records.dtype).reshape(n), mode="clip")
        for s in range(0, n, batch_rows):
            rows = stage[s:s + batch_rows]
            yield {c: np.array(self._column(rows, c), copy=True) if copy else self._column(rows, c) for c in self.cols}


def default_read_ahead(local: bool, cores: int | None = None) -> int:
    """Row groups decoding concurrently: Parquet decoding is most of the loader's time (65 % in a
    profile). Object stores: 4 requests in flight hide their latency. Local files: one per 4
    cores, 1 to 4 - on 2 cores the training step needs the other core, while on a 16-core GPU
    host the loader went from 2.2 M rows/s with 1 to 4.3 M with 4 (4.1 M with 8)."""
    if not local:
        return 4
    return min(4, max(1, (cores or os.cpu_count() or 1) // 4))


def _np(t: torch.Tensor) -> np.ndarray:
    """numpy view of a tensor (bfloat16, which numpy lacks, as its int16 bits)."""
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _pinned_copy(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """``a`` copied into a page-locked tensor from torch's caching host allocator (which keeps
    the block until the asynchronous copies reading it have finished)."""
    t = torch.empty(a.shape, dtype=dtype, pin_memory=True)
    _np(t)[...] = a
    return t


def _tt(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0 with numpy: single-threaded, unlike torch.cat whose intra-op
    pool can stall badly on an oversubscribed CPU (measured: 80x on this 2-core box)."""
    return _tt(np.concatenate([_np(t) for t in tensors]), tensors[0].dtype)


def _physical_names(snap: DeltaSnapshot, columns: Sequence[str]) -> dict[str, str]:
    """Logical -> physical (Parquet) column names; differ only under column mapping."""
    try:
        mode = (snap.table.metadata().configuration or {}).get("delta.columnMapping.mode", "none")
    except Exception:  # noqa: BLE001
        mode = "none"
    if mode in (None, "none"):
        return {c: c for c in columns}
    fields = {f.name: f for f in snap.table.schema().fields}
    out = {}
    for c in columns:
        md = dict(getattr(fields.get(c), "metadata", None) or {})
        out[c] = str(md.get("delta.columnMapping.physicalName", c)).strip('"')
    return out


class _Stream:
    """A rank's rows for one epoch in order, read ahead by a thread pool, handed out by count."""

    def __init__(self, loader: DeltaTorchLoader, units: list[RowGroup], start_row: int) -> None:
        self._read = loader._read_unit
        self._units = units
        starts = np.cumsum([0] + [u.num_rows for u in units])
        self._next = int(np.searchsorted(starts, start_row, side="right") - 1)
        self._offset0 = int(start_row - starts[self._next])
        self._depth = loader.read_ahead
        self._ex = ThreadPoolExecutor(max_workers=self._depth, thread_name_prefix="delta-read") if self._depth else None
        self._pending: deque = deque()
        self._cur: Batch | None = None
        self._cur_off = 0
        self._cur_len = 0
        self._first = True

    def _submit(self) -> None:
        while self._ex is not None and len(self._pending) < self._depth and self._next < len(self._units):
            self._pending.append(self._ex.submit(self._read, self._units[self._next]))
            self._next += 1

    def _next_chunk(self) -> None:
        if self._ex is not None:
            self._submit()
            if not self._pending:
                raise RuntimeError("stream exhausted (row counts disagree with the data)")
            chunk = self._pending.popleft().result()
            self._submit()
        else:
            if self._next >= len(self._units):
                raise RuntimeError("stream exhausted (row counts disagree with the data)")
            chunk = self._read(self._units[self._next])
            self._next += 1
        self._cur = chunk
        self._cur_len = len(next(iter(chunk.values())))
        self._cur_off = self._offset0 if self._first else 0
        self._first = False

    def pieces(self, m: int) -> Iterator[Batch]:
        """The next ``m`` rows as views, one per row group they span (no copy)."""
        need = m
        while need > 0:
            if self._cur is None or self._cur_off >= self._cur_len:
                self._next_chunk()
            k = min(need, self._cur_len - self._cur_off)
            a = self._cur_off
            self._cur_off += k
            need -= k
            yield {c: t[a:a + k] for c, t in self._cur.items()}  # type: ignore[union-attr]

    def take(self, m: int, copy: bool = False) -> Batch:
        """The next ``m`` rows: views into the decoded row group when they lie in one (unless
        ``copy``), else a concatenation (a fresh, writable copy)."""
        pieces: list[Batch] = []
        need = m
        while need > 0:
            if self._cur is None or self._cur_off >= self._cur_len:
                self._next_chunk()
            k = min(need, self._cur_len - self._cur_off)
            a = self._cur_off
            pieces.append({c: t[a:a + k] for c, t in self._cur.items()})  # type: ignore[union-attr]
            self._cur_off += k
            need -= k
        if len(pieces) == 1:
            return {c: _tt(np.array(_np(t)), t.dtype) for c, t in pieces[0].items()} if copy else pieces[0]
        return {c: _cat([p[c] for p in pieces]) for c in pieces[0]}

    def close(self) -> None:
        if self._ex is not None:
            self._ex.shutdown(wait=False, cancel_futures=True)
            self._ex = None
        self._pending.clear()
        self._cur = None


_END = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _produce(gen: Iterator[Batch], q: queue.Queue, stop: threading.Event) -> None:
    """Prefetch thread body. Holds no reference to the consumer's iterator, so dropping the
    iterator (-> ``stop``) ends the thread, which then closes the generator in its own thread."""

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        for item in gen:
            if not put(item):
                return
        put(_END)
    except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
        put(_Failure(e))
    finally:
        gen.close()


class _EpochIterator(Iterator[Batch]):
    """One epoch's batches; with ``prefetch > 0`` produced by a background thread into a
    bounded queue of that many batches."""

    def __init__(self, loader: DeltaTorchLoader, epoch: int, skip: int, cursor: list[int]) -> None:
        self.epoch = epoch
        self._cursor = cursor
        self.finished = skip >= len(loader)
        self._gen = loader._epoch_batches(epoch, skip)
        self._stop = threading.Event()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        if loader.prefetch > 0 and not self.finished:
            self._queue = queue.Queue(maxsize=loader.prefetch)
            self._thread = threading.Thread(
                target=_produce, args=(self._gen, self._queue, self._stop),
                name=f"delta-loader-r{loader.rank}-e{epoch}", daemon=True,
            )
            self._thread.start()

    def __next__(self) -> Batch:
        if self.finished:
            raise StopIteration
        if self._queue is None:
            try:
                item = next(self._gen)
            except StopIteration:
                self.finished = True
                raise
        else:
            item = self._queue.get()
            if item is _END:
                self.finished = True
                self._thread.join()  # type: ignore[union-attr]
                raise StopIteration
            if isinstance(item, _Failure):
                self.finished = True
                self.close()
                raise item.exc
        self._cursor[1] += 1
        return item

    def close(self) -> None:
        self._stop.set()
        t, self._thread = self._thread, None
        if t is not None:
            while t.is_alive():
                try:  # unblock a producer waiting on a full queue
                    while True:
                        self._queue.get_nowait()  # type: ignore[union-attr]
                except queue.Empty:
                    pass
                t.join(timeout=0.05)
        else:
            self._gen.close()

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
