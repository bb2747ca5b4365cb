"""Benchmark: DeltaTorchLoader rows/s vs a raw pyarrow scan of the same files into tensors.

    python benchmarks/loader.py --quick          # 2 M rows, < 2 min on a 2-core box
    python benchmarks/loader.py                  # 5 M rows
    python benchmarks/loader.py --table PATH     # an existing gold-shaped Delta table

A synthetic Criteo-gold-shaped Delta table (label float32, dense list<float32>[13], sparse
list<int32>[26]; zstd, 131072-row row groups) is written with deltalake into a temp dir.
Then, interleaved ``--repeats`` times (rows/s figures are medians over the passes; each
ratio is the median over passes of loader / faster raw scan of the same pass; rows per
CPU-second give the ``*_cpu`` ratios, which are less sensitive to other load on a shared box):

* raw limit: every row group of every file, ``ParquetFile.read_row_group(columns,
  use_threads=True)`` -> zero-copy tensors, nothing else: sequentially (raw_seq) and with
  two row groups decoding concurrently (raw_threaded). The faster is "the limit". (A
  ``pyarrow.dataset`` scan, ``raw_dataset_scan``, measured ~2x slower than either here, so
  it is not part of the limit.)
* loader, unshuffled / shuffled (default 262144-row buffer), 1 rank and 2 ranks (two rank
  processes, as under Horovod, running the epoch at the same time; rows/s = all rows over
  the wall time of both). Loaders are built once and live across passes, as in training
  (pass k = epoch k); one untimed warm-up epoch each first.

Goals: loader_ratio_unshuffled >= 0.9, loader_ratio_shuffled >= 0.7 (1 rank, wall clock).
The LAST lines are ``name: value``, the two ratios last.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.data import DeltaTorchLoader  # noqa: E402

COLUMNS = ["label", "dense", "sparse"]


def write_gold(path: str, rows: int, chunk: int = 500_000, seed: int = 0) -> None:
    from deltalake import WriterProperties, write_deltalake

    rng = np.random.default_rng(seed)
    wp = WriterProperties(max_row_group_size=131_072, compression="ZSTD")
    for start in range(0, rows, chunk):
        m = min(chunk, rows - start)
        label = (rng.random(m) < 0.25).astype(np.float32)
        dense = np.log1p(rng.integers(0, 1000, size=m * 13)).astype(np.float32)
        sparse = rng.integers(0, 1_000_000, size=m * 26, dtype=np.int32)
        t = pa.table({
            "label": label,
            "dense": pa.ListArray.from_arrays(pa.array(np.arange(m + 1, dtype=np.int32) * 13), pa.array(dense)),
            "sparse": pa.ListArray.from_arrays(pa.array(np.arange(m + 1, dtype=np.int32) * 26), pa.array(sparse)),
        })
        write_deltalake(path, t, mode="append", writer_properties=wp)


def _tensor(col: pa.ChunkedArray) -> torch.Tensor:
    a = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if pa.types.is_list(a.type) or pa.types.is_fixed_size_list(a.type):
        v = a.flatten().to_numpy()
        return torch.from_numpy(v).view(len(a), -1)
    return torch.from_numpy(a.to_numpy())


def raw_scan(paths: list[str]) -> int:
    """The limit: read each row group once, wrap it as tensors, nothing else."""
    rows = 0
    for p in paths:
        pf = pq.ParquetFile(p)
        for g in range(pf.metadata.num_row_groups):
            t = pf.read_row_group(g, columns=COLUMNS, use_threads=True)
            ts = {c: _tensor(t.column(c)) for c in COLUMNS}
            rows += len(ts["label"])
    return rows


def raw_threaded_scan(paths: list[str], threads: int = 2) -> int:
    """The same, with ``threads`` row groups decoding concurrently (ordered)."""
    from concurrent.futures import ThreadPoolExecutor

    units = [(p, g) for p in paths for g in range(pq.ParquetFile(p).metadata.num_row_groups)]

    def one(u):
        t = pq.ParquetFile(u[0]).read_row_group(u[1], columns=COLUMNS, use_threads=True)
        return {c: _tensor(t.column(c)) for c in COLUMNS}

    rows = 0
    with ThreadPoolExecutor(threads) as ex:
        for ts in ex.map(one, units):
            rows += len(ts["label"])
    return rows


def raw_dataset_scan(paths: list[str]) -> int:
    rows = 0
    for b in pads.dataset(paths, format="parquet").to_batches(columns=COLUMNS, batch_size=131_072, use_threads=True):
        ts = {c: _tensor(pa.chunked_array([b.column(c)])) for c in COLUMNS}
        rows += len(ts["label"])
    return rows


def make_loader(table: str, rank: int, world: int, shuffle: bool, batch_size: int, buffer_rows: int) -> DeltaTorchLoader:
    return DeltaTorchLoader(table, COLUMNS, batch_size, rank=rank, world_size=world, shuffle=shuffle, seed=0,
                            shuffle_buffer_rows=buffer_rows, drop_last=False, pad_to_equal=False)


def epoch_rows(loader: DeltaTorchLoader) -> int:
    """One epoch (the next one: loaders live across passes, as in training)."""
    n = 0
    for b in loader:
        n += len(b["label"])
    return n


def _rank_worker(conn, table: str, rank: int, world: int, batch_size: int, buffer_rows: int) -> None:
    """One rank in its own process (as under Horovod): an unshuffled and a shuffled loader;
    each request runs one epoch of one of them and answers (rows, cpu seconds)."""
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    loaders = {sh: make_loader(table, rank, world, sh, batch_size, buffer_rows) for sh in (False, True)}
    conn.send("ready")
    while (shuffle := conn.recv()) is not None:
        c0 = time.process_time()
        n = epoch_rows(loaders[shuffle])
        conn.send((n, time.process_time() - c0))


class RankProcesses:
    """``world`` rank processes reading the same table; ``epoch(shuffle)`` runs one epoch on
    all of them at once and returns (total rows, total cpu seconds)."""

    def __init__(self, table: str, world: int, batch_size: int, buffer_rows: int) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for r in range(world):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_rank_worker, args=(child, table, r, world, batch_size, buffer_rows), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)
        for c in self.conns:
            if c.recv() != "ready":
                raise RuntimeError("rank worker failed to start")

    def epoch(self, shuffle: bool) -> tuple[int, float]:
        for c in self.conns:
            c.send(shuffle)
        got = [c.recv() for c in self.conns]
        return sum(g[0] for g in got), sum(g[1] for g in got)

    def close(self) -> None:
        for c in self.conns:
            c.send(None)
        for p in self.procs:
            p.join(timeout=10)


def timed(fn) -> tuple[int, float, float]:
    """(rows, wall s, cpu s); ``fn`` returns rows, or (rows, cpu s) when the work ran elsewhere."""
    t0, c0 = time.perf_counter(), time.process_time()
    r = fn()
    w, c = time.perf_counter() - t0, time.process_time() - c0
    if isinstance(r, tuple):
        return r[0], w, r[1]
    return r, w, c


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 M rows (< 2 minutes)")
    ap.add_argument("--rows", type=int, default=None, help="rows of the synthetic table (default 5 M; quick 2 M)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved timed passes per config (default 3)")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--shuffle-buffer-rows", type=int, default=262_144)
    ap.add_argument("--table", default=None, help="existing gold-shaped Delta table (skips writing)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic table")
    args = ap.parse_args(argv)
    rows = args.rows or (2_000_000 if args.quick else 5_000_000)
    repeats = args.repeats or 3
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

    tmp = None
    t_start = time.perf_counter()
    if args.table:
        table = args.table
    else:
        tmp = tempfile.mkdtemp(prefix="bigopt-loader-bench-")
        table = os.path.join(tmp, "gold")
        t0 = time.perf_counter()
        write_gold(table, rows)
        print(f"wrote {rows:,} rows to {table} in {time.perf_counter() - t0:.1f}s", flush=True)
    try:
        probe = DeltaTorchLoader(table, COLUMNS, args.batch_size, shuffle=False)
        paths = [f.uri for f in probe._files]
        n_rows, version = probe.num_rows, probe.version
        rgs = len(probe._units)
        print(f"table v{version}: {n_rows:,} rows, {len(paths)} files, {rgs} row groups; "
              f"cpus={os.cpu_count()} torch_threads={torch.get_num_threads()} "
              f"load={os.getloadavg()[0]:.1f}", flush=True)
        B, buf = args.batch_size, args.shuffle_buffer_rows
        one = {sh: make_loader(table, 0, 1, sh, B, buf) for sh in (False, True)}
        two = RankProcesses(table, 2, B, buf)
        configs = {
            "raw_seq": lambda: raw_scan(paths),
            "raw_threaded": lambda: raw_threaded_scan(paths),
            "loader_unshuffled": lambda: epoch_rows(one[False]),
            "loader_shuffled": lambda: epoch_rows(one[True]),
            "loader_unshuffled_2rank": lambda: two.epoch(False),
            "loader_shuffled_2rank": lambda: two.epoch(True),
        }
        # warm-up, untimed: page cache, imports, and each loader's first epoch (which also
        # allocates its shuffle arena: first-touch page faults, not a steady-state cost)
        raw_scan(paths)
        for name in ("loader_unshuffled", "loader_shuffled", "loader_unshuffled_2rank", "loader_shuffled_2rank"):
            configs[name]()
        wall: dict[str, list[float]] = {k: [] for k in configs}
        cpu: dict[str, list[float]] = {k: [] for k in configs}
        try:
            for rep in range(repeats):
                for name, fn in configs.items():
                    n, w, c = timed(fn)
                    if n != n_rows:
                        raise RuntimeError(f"{name} produced {n} rows, expected {n_rows}")
                    wall[name].append(n / w)
                    cpu[name].append(n / max(c, 1e-9))
                    print(f"  pass {rep + 1}/{repeats} {name:26s} {n / w / 1e6:6.2f} M rows/s wall "
                          f"{n / max(c, 1e-9) / 1e6:6.2f} M rows/cpu-s", flush=True)
        finally:
            two.close()
        # Per pass: limit = the faster raw scan of that pass; ratio = loader / limit of the
        # same pass (adjacent in time, so similar background load). Reported: medians.
        med = statistics.median
        raws = ("raw_seq", "raw_threaded")
        limit = [max(wall[k][i] for k in raws) for i in range(repeats)]
        limit_cpu = [max(cpu[k][i] for k in raws) for i in range(repeats)]

        def ratio(name: str, per_cpu: bool = False) -> float:
            src, lim = (cpu, limit_cpu) if per_cpu else (wall, limit)
            return round(med([src[name][i] / lim[i] for i in range(repeats)]), 3)

        print("best wall M rows/s: " + ", ".join(f"{k}={max(v) / 1e6:.2f}" for k, v in wall.items()))
        print(f"total benchmark time {time.perf_counter() - t_start:.1f}s")
        out = {
            "rows": n_rows,
            "batch_size": B,
            "shuffle_buffer_rows": buf,
            "passes": repeats,
            "raw_seq_rows_per_s": round(med(wall["raw_seq"])),
            "raw_threaded_rows_per_s": round(med(wall["raw_threaded"])),
            "raw_limit_rows_per_s": round(med(limit)),
            "loader_unshuffled_rows_per_s": round(med(wall["loader_unshuffled"])),
            "loader_shuffled_rows_per_s": round(med(wall["loader_shuffled"])),
            "loader_unshuffled_2rank_rows_per_s": round(med(wall["loader_unshuffled_2rank"])),
            "loader_shuffled_2rank_rows_per_s": round(med(wall["loader_shuffled_2rank"])),
            "loader_ratio_unshuffled_2rank": ratio("loader_unshuffled_2rank"),
            "loader_ratio_shuffled_2rank": ratio("loader_shuffled_2rank"),
            "loader_ratio_unshuffled_cpu": ratio("loader_unshuffled", True),
            "loader_ratio_shuffled_cpu": ratio("loader_shuffled", True),
            "loader_ratio_unshuffled": ratio("loader_unshuffled"),
            "loader_ratio_shuffled": ratio("loader_shuffled"),
        }
        for k, v in out.items():
            print(f"{k}: {v}")
    finally:
        if tmp and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
