"""Criteo raw -> model-ready features: bigopt on Spark vs the parse limit vs plain pandas.

    .venv/bin/python benchmarks/criteo_featurize.py            # 10 M rows (4 day files)
    .venv/bin/python benchmarks/criteo_featurize.py --quick    # 1 M rows (2 day files), ~1.5 min

The same generated raw files (plain TSV, 1TB day layout) go through, in ONE run:

  (a) parse limit: ``pyarrow.csv.read_csv`` of every file into typed columns (multithreaded,
      all cores, default 1 MiB blocks, its fastest setting): no validation, no features,
      nothing written. The floor for any parser: the best of 3 runs, each in its own process
      (a fresh process sometimes pays for faulting in its memory: 3.7 to 6.6 s per run).
  (b) pandas reference: one process doing the same featurization the NumPy/pandas way
      (DLRM's scripts): ``read_csv`` (C engine, categorical dtype for C1..C26), a per-column
      vocabulary with the frequency threshold counted on the train days, ids by descending
      frequency (0 missing, 1 rare), dense ``log1p(max(x, 0))``, day split, gold Parquet with
      the same layout (label float, dense list<float>[13], sparse list<int>[26]).
  (c) bigopt: ``ingest`` (validate, bronze + quarantine + ledger Delta tables) and
      ``featurize`` (vocabulary, gold train/valid/test Delta tables) on ``local[2]``.
  (d) storage floor: the same files parsed by pyarrow (streamed, one file per thread on
      every core), then only the Parquet work of bigopt's two tables: write bronze, read its
      categoricals back from the train days, read it all back, write gold in the same formats
      (no validation, no vocabulary, no Spark). Its Parquet share (printed apart, in CPU
      seconds) is what any implementation of these two tables pays, however it parses.

``--quick`` took 1 min 38 s on this shared 2-core host under a load of ~2.5, the first
generation of its 1 M rows (8 s) included, of which 28 s were Spark's start-up.

Each runs in its own process. Seconds are timed inside it, after interpreter start and
imports (for (c): after the SparkSession and its Python workers are up, a fixed start-up
cost printed apart). Peak memory is measured from outside: for (c) the PSS of the whole
process tree (the Python driver, the JVM and its Python workers), summed and sampled at 2 Hz,
so a peak shorter than half a second can be missed; for (a), (b) and (d), single processes,
the larger of their PSS sampled at 10 Hz and the kernel's high-water mark of their resident
set (``ru_maxrss`` from ``os.wait4``), which no short peak escapes. (b) and (c) must
agree: same cardinalities, the same multiset of ids per column and the same multiset of
whole rows (label, dense, sparse) in the train split, the same multiset of whole rows in the
held-out day (valid and test together: which half a row goes to depends on each one's row
hash) and the same train and held-out row counts; if not, the script exits 1.
Finally the gold train table is read the way the training loader does (pyarrow -> torch),
as written (list columns) and re-laid out as 39 scalar columns, to justify the layout.

The figures come last, one ``name: value`` per line: rows; seconds, rows/s and peak GB of
(a), (b), (c) and (d); (c)'s ingest, featurize and Spark start-up seconds; the loader's
read; ``ratio_vs_pandas`` (c time / b time), ``speedup_vs_pandas_with_spark_start`` (b time /
(c time + Spark start-up)), ``floor_vs_parse_limit`` (d / a), ``ratio_vs_floor`` (c / d);
and last ``ratio_vs_parse_limit: X`` (c time / a time) and ``speedup_vs_pandas: Y`` (b time /
c time).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DENSE = [f"I{i}" for i in range(1, 14)]
SPARSE = [f"C{i}" for i in range(1, 27)]
NAMES = ["label", *DENSE, *SPARSE]
THRESHOLD = 3
PARSE_RUNS = 3
_MIX = None  # per-column odd 64-bit multipliers of rows_digest, made on first use


def rows_digest(label, dense, sparse) -> list[int]:
    """An order-independent fingerprint of gold rows (label float32 [n], dense float32 [n, 13],
    sparse int32 [n, 26]): the sum and the xor of a 64-bit hash of each row's 40 values' bits,
    so two implementations' train splits compare as multisets of whole rows, not per column.
    Sums of batches' digests add up (mod 2^64), xors xor."""
    import numpy as np

    global _MIX
    if _MIX is None:
        _MIX = np.random.default_rng(12345).integers(1, 2**63, 40, dtype=np.uint64) | np.uint64(1)
    bits = np.concatenate([np.ascontiguousarray(label, np.float32).reshape(-1, 1).view(np.uint32),
                           np.ascontiguousarray(dense, np.float32).view(np.uint32),
                           np.ascontiguousarray(sparse, np.int32).view(np.uint32)], axis=1).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = (bits * _MIX).sum(axis=1, dtype=np.uint64)
        h ^= h >> np.uint64(31)
        h *= np.uint64(0x9E3779B97F4A7C15)
        h ^= h >> np.uint64(29)
    return [int(h.sum(dtype=np.uint64)), int(np.bitwise_xor.reduce(h)) if len(h) else 0]


def _add_digests(a: list[int], b: list[int]) -> list[int]:
    return [(a[0] + b[0]) % 2**64, a[1] ^ b[1]]


def masked_digest(label, dense, sparse, mask) -> list[int]:
    """``rows_digest`` of the rows where ``mask`` holds, in slices: the cross-check must not
    raise the peak memory of the stage it runs in."""
    digest = [0, 0]
    for lo in range(0, len(mask), 1 << 18):
        part = slice(lo, lo + (1 << 18))
        m = mask[part]
        digest = _add_digests(digest, rows_digest(label[part][m], dense[part][m], sparse[part][m]))
    return digest


def gold_batches(table: str):
    """(label, dense [n, 13], sparse ids [n, 26]) of a gold Delta table, batch by batch (a
    whole-table read would add to (c)'s peak memory)."""
    from pipelines.lake import DeltaSnapshot

    for b in DeltaSnapshot(table).dataset(["label", "dense", "sparse"]).to_batches():
        yield (b.column("label").to_numpy(), b.column("dense").values.to_numpy().reshape(-1, 13),
               b.column("sparse").values.to_numpy().reshape(-1, 26))


def cross_check(b: dict, c: dict, rows: int) -> list[str]:
    """What differs between (b)'s and (c)'s gold tables; empty: they are the same. Train:
    cardinalities, per-column id counts and the rows as a multiset. The held-out day: its rows
    as a multiset, valid and test together, since which of the two a row goes to depends on
    each implementation's row hash while their union does not; and the split totals (every row
    in one split, as many held out). Until the twenty-eighth session the held-out day was not
    compared, so (b) writing garbage for every held-out row still printed ``identical``."""
    diff = []
    if b["cardinalities"] != c["cardinalities"]:
        diff.append("cardinalities")
    if b["train_hist"] != c["train_hist"]:
        diff.append("per-column train id counts")
    if b["train_digest"] != c["train_digest"]:
        diff.append("train rows")
    if b["heldout_digest"] != c["heldout_digest"]:
        diff.append("held-out rows (valid + test)")
    for name, r in (("b", b), ("c", c)):
        if sum(r["split_rows"].values()) != rows:
            diff.append(f"{name}'s split rows {r['split_rows']} do not add up to {rows:,}")
    bs, cs = b["split_rows"], c["split_rows"]
    held = [r.get("valid", 0) + r.get("test", 0) for r in (bs, cs)]
    if bs.get("train") != cs.get("train") or held[0] != held[1]:
        diff.append(f"train / held-out row counts (b {bs}, c {cs})")
    return diff


# ----------------------------------------------------------------------------- stages
def stage_parse(raw: Path) -> dict:
    import pyarrow as pa
    import pyarrow.csv as pcsv

    types = {"label": pa.int8(), **{c: pa.int64() for c in DENSE}, **{c: pa.string() for c in SPARSE}}
    t0 = time.perf_counter()
    rows = 0
    for f in sorted(raw.glob("day_*")):
        t = pcsv.read_csv(
            f,
            # pyarrow's default 1 MiB blocks: its fastest setting here (1.0 s per 2.5 M-row file,
            # where 32 MiB blocks took 2.7 s): the limit must be the best parse, not a slowed one
            read_options=pcsv.ReadOptions(column_names=NAMES),
            parse_options=pcsv.ParseOptions(delimiter="\t", quote_char=False, double_quote=False),
            convert_options=pcsv.ConvertOptions(column_types=types, strings_can_be_null=True),
        )
        rows += t.num_rows
        del t
    return {"rows": rows, "seconds": time.perf_counter() - t0}


def stage_pandas(raw: Path, out: Path) -> dict:
    """Single-process pandas/NumPy featurization, same semantics as bigopt's vocab strategy."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pandas.api.types import union_categoricals

    t0 = time.perf_counter()
    files = sorted(raw.glob("day_*"), key=lambda p: int(p.name.split("_")[1]))
    dtypes = {"label": np.int8, **{c: np.float64 for c in DENSE}, **{c: "category" for c in SPARSE}}
    frames = [pd.read_csv(f, sep="\t", header=None, names=NAMES, dtype=dtypes, engine="c", quoting=3,
                          na_filter=True, keep_default_na=False, na_values=[""]) for f in files]
    days = np.concatenate([np.full(len(fr), i, dtype=np.int16) for i, fr in enumerate(frames)])
    n = len(days)
    label = np.concatenate([fr["label"].to_numpy(np.float32) for fr in frames])
    dense = np.empty((n, 13), dtype=np.float32)
    for j, c in enumerate(DENSE):
        x = np.concatenate([fr[c].to_numpy() for fr in frames])
        dense[:, j] = np.log1p(np.maximum(np.nan_to_num(x, nan=0.0), 0.0))
    test_day = len(files) - 1
    train = days != test_day
    sparse = np.empty((n, 26), dtype=np.int32)
    cards = []
    for j, c in enumerate(SPARSE):
        cat = union_categoricals([fr[c] for fr in frames])
        for fr in frames:
            del fr[c]
        codes = cat.codes.astype(np.int64)  # -1 = missing
        counts = np.bincount(codes[train & (codes >= 0)], minlength=len(cat.categories))
        values = np.asarray(cat.categories, dtype=object)
        keep = np.flatnonzero(counts >= THRESHOLD)
        order = keep[np.lexsort((values[keep].astype(str), -counts[keep]))]  # count desc, value asc
        lut = np.ones(len(values) + 1, dtype=np.int32)  # 1 = rare / unseen in train
        lut[order] = np.arange(2, 2 + len(order), dtype=np.int32)
        lut[-1] = 0  # codes == -1 (missing) index the last slot
        sparse[:, j] = lut[codes]
        cards.append(len(order) + 2)
    del frames
    u = (np.arange(n) * 2654435761 % 2**32) / 2**32  # deterministic valid/test halves of the test day
    split = np.where(train, 0, np.where(u < 0.5, 1, 2))
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for k, name in enumerate(("train", "valid", "test")):
        m = split == k
        rows[name] = int(m.sum())
        d, s = dense[m], sparse[m]
        tbl = pa.table({
            "label": label[m],
            "dense": pa.FixedSizeListArray.from_arrays(pa.array(d.ravel()), 13).cast(pa.list_(pa.float32())),
            "sparse": pa.FixedSizeListArray.from_arrays(pa.array(s.ravel()), 26).cast(pa.list_(pa.int32())),
        })
        pq.write_table(tbl, out / f"{name}.parquet", compression="zstd", row_group_size=131072)
    secs = time.perf_counter() - t0
    train_hist = [np.bincount(sparse[train, j]).tolist() for j in range(26)]
    return {"rows": n, "seconds": secs, "split_rows": rows, "cardinalities": cards, "train_hist": train_hist,
            "train_digest": masked_digest(label, dense, sparse, train),
            "heldout_digest": masked_digest(label, dense, sparse, ~train)}


def stage_floor(raw: Path, out: Path) -> dict:
    """(d) storage floor: the same files parsed by pyarrow, then ONLY the Parquet work the
    two Delta tables need, as bigopt's design does it: write bronze (zstd, 131,072-row groups,
    statistics on label/I1..I13), read its categoricals back (dictionary-encoded) from the
    train days, read all of it back, write gold (lz4, the list layout). No validation, no
    vocabulary (the ids are bronze's dictionary indices), no Spark: one file per thread on
    every core, so any design that writes these tables with these formats costs at least
    this. Per-thread CPU is split into parse and Parquet work."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from pipelines.config import LakeConfig
    from pipelines.criteo.config import FeaturizeConfig, IngestConfig
    from pipelines.criteo.featurize import GOLD_PARQUET_OPTIONS, GOLD_SCHEMA, GOLD_STATS_COLUMNS, dense_matrix, gold_batch
    from pipelines.criteo.bronze import BRONZE_STATS_COLUMNS
    from pipelines.criteo.parse import ROW_SCHEMA

    files = sorted(raw.glob("day_*"), key=lambda p: int(p.name.split("_")[1]))
    out.mkdir(parents=True, exist_ok=True)
    types = {f.name: f.type for f in ROW_SCHEMA}
    # bigopt's defaults (what stage (c) runs with)
    bronze_rg, bronze_codec, gold = IngestConfig().row_group_rows, LakeConfig().compression, FeaturizeConfig()

    def one(i: int, f: Path) -> tuple[float, float, int]:
        # streamed (pyarrow's default 1 MiB blocks, its fastest; bronze-sized row groups): holding a whole
        # file's table costs more (fresh memory to fault in) than the Parquet work itself
        parse_cpu = 0.0
        c0 = time.thread_time()
        bronze = out / f"bronze-{i}.parquet"
        reader = pcsv.open_csv(f, read_options=pcsv.ReadOptions(column_names=NAMES, use_threads=False),
                               parse_options=pcsv.ParseOptions(delimiter="\t", quote_char=False, double_quote=False),
                               convert_options=pcsv.ConvertOptions(column_types=types, strings_can_be_null=True))
        schema = reader.schema.append(pa.field("ingest_batch", pa.string()))
        rows, pending = 0, []
        with pq.ParquetWriter(bronze, schema, compression=bronze_codec, write_statistics=BRONZE_STATS_COLUMNS) as w:
            while True:
                c = time.thread_time()
                try:
                    b = reader.read_next_batch()
                except StopIteration:
                    b = None
                parse_cpu += time.thread_time() - c
                if b is not None:
                    pending.append(b.append_column("ingest_batch", pa.repeat(pa.scalar("0123456789ab"), b.num_rows)))
                    rows += b.num_rows
                buffered = sum(p.num_rows for p in pending)
                if buffered >= bronze_rg or (b is None and buffered):
                    t = pa.Table.from_batches(pending)
                    cut = buffered if b is None else buffered // bronze_rg * bronze_rg
                    w.write_table(t.slice(0, cut), row_group_size=bronze_rg)
                    pending = t.slice(cut).to_batches()
                if b is None:
                    break
        if i != len(files) - 1:  # the train days' categoricals, for the counts
            for _ in pq.ParquetFile(bronze, read_dictionary=SPARSE).iter_batches(1 << 18, columns=SPARSE, use_threads=False):
                pass
        with pq.ParquetWriter(out / f"gold-{i}.parquet", GOLD_SCHEMA, compression=gold.compression,
                              write_statistics=GOLD_STATS_COLUMNS, **GOLD_PARQUET_OPTIONS) as w:
            for b in pq.ParquetFile(bronze, read_dictionary=SPARSE).iter_batches(1 << 18, columns=NAMES, use_threads=False):
                sparse = np.empty((b.num_rows, len(SPARSE)), np.int32)
                for j, c in enumerate(SPARSE):
                    sparse[:, j] = b.column(c).indices.fill_null(0).to_numpy()
                w.write_batch(gold_batch(b.column("label").cast(pa.float32()), dense_matrix(b), sparse),
                              row_group_size=gold.row_group_rows)
        return parse_cpu, time.thread_time() - c0 - parse_cpu, rows

    t0 = time.perf_counter()
    with ThreadPoolExecutor(os.cpu_count()) as ex:
        res = list(ex.map(one, range(len(files)), files))
    secs = time.perf_counter() - t0
    return {"rows": sum(r[2] for r in res), "seconds": secs, "parse_cpu_s": sum(r[0] for r in res),
            "parquet_cpu_s": sum(r[1] for r in res)}


def stage_spark(raw: Path, lake: Path) -> dict:
    import numpy as np

    from jobs.config import load_config
    from pipelines.criteo.featurize import featurize
    from pipelines.criteo.ingest import ingest
    from pipelines.spark import get_spark

    cfg = load_config(data={
        "lake": {"root": str(lake)},
        "criteo": {"inputs": [str(raw)], "featurize": {"strategy": "vocab", "freq_threshold": THRESHOLD}},
    })
    t0 = time.perf_counter()
    # the project's own local session settings (get_spark): what `bigopt ingest/featurize` get
    spark = get_spark("bigopt-bench", master="local[2]", ui=False, log_level="ERROR")
    spark.range(1).count()
    # start the Python worker daemon and one worker per core (their imports, ~1.5 s): like the
    # imports of (a) and (b), a fixed start-up cost, not per-row work
    spark.sparkContext.parallelize(range(2), 2).map(lambda x: x).collect()
    startup = time.perf_counter() - t0
    t1 = time.perf_counter()
    ing = ingest(spark, cfg)
    t2 = time.perf_counter()
    feat = featurize(spark, cfg, force=True)  # a fresh lake anyway: always time a build
    t3 = time.perf_counter()
    spark.stop()
    # the cross-check with (b)
    hist = [np.zeros(0, dtype=np.int64) for _ in range(26)]
    digest = [0, 0]
    for label, dense, ids in gold_batches(feat.tables["train"]):
        digest = _add_digests(digest, rows_digest(label, dense, ids))
        for j in range(26):
            c = np.bincount(ids[:, j])
            if len(c) > len(hist[j]):
                hist[j] = np.pad(hist[j], (0, len(c) - len(hist[j])))
            hist[j][:len(c)] += c
    train_hist = [h.tolist() for h in hist]
    heldout = [0, 0]
    for name in ("valid", "test"):
        for batch in gold_batches(feat.tables[name]):
            heldout = _add_digests(heldout, rows_digest(*batch))
    return {
        "rows": ing.rows_in, "rows_ok": ing.rows_ok, "rows_rejected": ing.rows_rejected,
        "startup_s": startup, "ingest_s": t2 - t1, "featurize_s": t3 - t2, "split_rows": feat.rows,
        "cardinalities": feat.cardinalities, "train_hist": train_hist, "train_table": feat.tables["train"],
        "train_digest": digest, "heldout_digest": heldout,
    }


def stage_loader(table: str) -> dict:
    """Gold train through the project's loader (``DeltaTorchLoader``: one epoch unshuffled, one
    shuffled, best of 3, one thread, CPU s), as written (array columns) and as 39 scalar columns
    written with gold's own codec, Parquet options and row groups, then stacked into the model's
    (n, 13) / (n, 26) inputs as ``training.dataspec.batch_to_inputs`` does: docs/criteo.md "Why
    the array layout". Until the twenty-eighth session the decode step alone was timed, with
    the scalar copy in zstd with dictionaries against gold's lz4 without: the codec decided."""
    import shutil
    import warnings

    import pyarrow as pa
    import torch

    from pipelines.criteo.config import FeaturizeConfig
    from pipelines.criteo.featurize import GOLD_PARQUET_OPTIONS
    from pipelines.lake import DeltaSnapshot
    from pipelines.lake.tasks import UncommittedWrites, begin_write, commit_write
    from training.data.loader import DeltaTorchLoader

    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    torch.set_num_threads(1)
    fz = FeaturizeConfig()
    files = [f.uri for f in DeltaSnapshot(table).files()]
    cols = pa.concat_tables(pa.table({"label": label, **{c: d[:, i] for i, c in enumerate(DENSE)},
                                      **{c: s[:, i] for i, c in enumerate(SPARSE)}})
                            for label, d, s in gold_batches(table))
    scalar = str(Path(table).parent / "_bench_scalar_columns")
    with UncommittedWrites() as writes:
        tw = writes.add(begin_write(scalar, cols.schema, mode="overwrite", row_group_rows=fz.row_group_rows,
                                    compression=fz.compression, parquet_options=GOLD_PARQUET_OPTIONS))
        commit_write(tw, tw.write_all(cols.to_batches(max_chunksize=fz.row_group_rows)))
    rows = cols.num_rows
    del cols

    def epochs(uri: str, columns: list[str], stack: bool) -> dict[bool, float]:
        best = {}
        for shuffle in (False, True):
            loader = DeltaTorchLoader(uri, columns, 4096, shuffle=shuffle, seed=0, shuffle_buffer_rows=262_144,
                                      drop_last=False, pad_to_equal=False, use_threads=False)
            for _ in range(3):
                c0, n = time.process_time(), 0
                for b in loader:
                    if stack:
                        torch.stack([b[c] for c in DENSE], 1), torch.stack([b[c] for c in SPARSE], 1)
                    n += len(b["label"])
                assert n == rows, (uri, n, rows)
                best[shuffle] = min(best.get(shuffle, float("inf")), time.process_time() - c0)
        return best

    try:
        lists = epochs(table, ["label", "dense", "sparse"], stack=False)
        columns = epochs(scalar, ["label", *DENSE, *SPARSE], stack=True)
        out = {"rows": rows, "lists_cpu_s": lists[False], "columns_cpu_s": columns[False],
               "lists_shuffled_cpu_s": lists[True], "columns_shuffled_cpu_s": columns[True],
               "lists_mb": sum(os.path.getsize(f) for f in files) / 1e6}
        out["columns_mb"] = sum(os.path.getsize(f.uri) for f in DeltaSnapshot(scalar).files()) / 1e6
    finally:
        shutil.rmtree(scalar, ignore_errors=True)
    return out


# ------------------------------------------------------------------------ harness
def _pss(pid: int) -> int:
    """Proportional set size of one process in bytes, from /proc/<pid>/smaps_rollup (one
    kernel summary: cheap even for the JVM's thousands of mappings; psutil's full smaps walk
    cost a sizeable share of a core at 10 Hz, taken from the 2 cores being measured)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakRSS:
    """Peak memory of a process tree, sampled every ``interval`` seconds: the sum of each
    process's PSS (proportional set size: pages shared between forked workers are counted
    once). A sample of (c)'s 7 processes costs ~26 ms of CPU (the kernel walks their page
    tables): at 5 Hz that was 3% of the 2 cores being measured; its tasks hold their memory
    for seconds, so 2 Hz still sees the peaks. A sample of a lone 1 GB process costs ~3 ms
    (1.5 % of the 2 cores at 10 Hz), so the single-process stages are sampled at 10 Hz (and
    their kernel high-water mark is taken besides: ``wait_maxrss``)."""

    def __init__(self, pid: int, interval: float = 0.5):
        import psutil

        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        import psutil

        while not self._stop.is_set():
            try:
                pids = [self.proc.pid, *(c.pid for c in self.proc.children(recursive=True))]
                self.peak = max(self.peak, sum(_pss(p) for p in pids))
            except psutil.Error:
                break
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak


def warm_page_cache(raw: Path) -> None:
    """Read every raw file once, so that each stage starts with them in the page cache: this
    machine's kernel reclaims idle file pages (DAMON): ~8-10 % of the raw bytes were out of
    the cache after a few idle minutes, and (c) ran 1.5-2 s slower after the two minutes of
    (b) than without (b) before it."""
    for f in sorted(raw.glob("day_*")):
        with open(f, "rb") as fh:
            while fh.read(16 << 20):
                pass


def wait_maxrss(proc: subprocess.Popen) -> int:
    """Wait for ``proc`` and return its peak resident set in bytes, the kernel's own high-water
    mark (``ru_maxrss`` from ``os.wait4``): exact however briefly the peak lasted, where a
    sampler misses a peak shorter than its interval."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss * 1024  # KiB on Linux


# stages whose work runs in more processes than the one started: the JVM and Python workers
TREE_STAGES = ("spark",)


def run_stage(name: str, *args: str) -> tuple[dict, float, int]:
    """Run a stage in a fresh interpreter; (its JSON result, wall seconds, peak memory in bytes).

    The peak of a stage in the process tree (c) is its PSS, summed over the tree and sampled at
    2 Hz: ``ru_maxrss`` would see the driver alone, not the JVM and its Python workers. The
    peak of a single-process stage is the larger of its PSS sampled at 10 Hz and its
    ``ru_maxrss`` (RSS counts the shared libraries' pages in full, PSS a share). Until the
    twenty-eighth session every stage was sampled at 2 Hz alone: a parse of well under a second
    printed ``parse_limit_peak_gb: 0.0`` and pandas read 0.96 GB against its 1.15 GB ru_maxrss
    in a --quick run."""
    if name in ("parse", "pandas", "floor", "spark"):
        warm_page_cache(Path(args[0]))
    env = {**os.environ, "PYTHONPATH": str(REPO), "SPARK_LOCAL_IP": "127.0.0.1"}
    cmd = [sys.executable, __file__, "--stage", name, *args]
    tree = name in TREE_STAGES
    t0 = time.perf_counter()
    # output to files, not pipes, so that the wait is ours (wait4, for ru_maxrss) and not communicate()'s
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, cwd=REPO)
        mon = PeakRSS(proc.pid, interval=0.5 if tree else 0.1)
        maxrss = wait_maxrss(proc)
        wall = time.perf_counter() - t0
        peak = mon.stop() if tree else max(mon.stop(), maxrss)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"stage {name} failed ({proc.returncode}):\n{stderr[-4000:]}")
    return json.loads(stdout.strip().splitlines()[-1]), wall, peak


def ensure_data(rows: int, days: int, root: Path) -> Path:
    from jobs.config import load_config
    from pipelines.criteo.generate import generate_files

    raw = root / f"criteo-{rows}-{days}d"
    per_day = rows // days
    manifest = raw / "_generated.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        if [f["rows"] for f in m["files"]] == [per_day] * days:
            return raw
    cfg = load_config(data={"criteo": {"raw_dir": str(raw), "generate": {"days": days, "rows_per_day": per_day,
                                                                          "seed": 0}}})
    t0 = time.perf_counter()
    generate_files(cfg)
    print(f"generated {rows:,} rows ({days} day files) in {time.perf_counter() - t0:.1f}s -> {raw}", flush=True)
    return raw


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 M rows over 2 day files")
    p.add_argument("--rows", type=int, default=None, help="total rows (default 10 M, 1 M with --quick)")
    p.add_argument("--days", type=int, default=None, help="day files (default 4, 2 with --quick)")
    p.add_argument("--data", default=str(REPO / "data" / "bench"), help="where the raw files are cached")
    p.add_argument("--skip-pandas", action="store_true")
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args()
    for flag, value in (("--rows", a.rows), ("--days", a.days)):
        if value is not None and value < 1:
            p.error(f"{flag} must be at least 1, got {value}")
    if a.rows is not None and a.days is not None and a.rows < a.days:
        p.error(f"--rows {a.rows} cannot fill --days {a.days} day files")
    if a.stage:
        fn = {"parse": stage_parse, "pandas": stage_pandas, "floor": stage_floor, "spark": stage_spark,
              "loader": stage_loader}[a.stage]
        res = fn(*[Path(x) if a.stage != "loader" else x for x in a.args])
        print(json.dumps(res))
        return 0

    rows = a.rows if a.rows is not None else (1_000_000 if a.quick else 10_000_000)
    days = a.days if a.days is not None else (2 if a.quick else 4)
    raw = ensure_data(rows, days, Path(a.data))
    work = Path(a.data) / f"work-{os.getpid()}"
    import shutil

    results = {}
    try:
        # the limit is the best parse: its first call in a fresh process sometimes pays for
        # faulting in fresh memory (3.7 to 6.6 s for the same 10 M rows), so take the best of
        # PARSE_RUNS processes; (b) and (c) run once
        print(f"(a) pyarrow.csv parse, best of {PARSE_RUNS} ...", flush=True)
        parses = [run_stage("parse", str(raw)) for _ in range(PARSE_RUNS)]
        results["a"] = min(parses, key=lambda r: r[0]["seconds"])
        if not a.skip_pandas:
            print("(b) pandas single process ...", flush=True)
            results["b"] = run_stage("pandas", str(raw), str(work / "pandas"))
        print("(d) storage floor: pyarrow parse + the Parquet work of bronze and gold ...", flush=True)
        results["d"] = run_stage("floor", str(raw), str(work / "floor"))
        shutil.rmtree(work / "floor", ignore_errors=True)
        print("(c) bigopt ingest + featurize on local[2] ...", flush=True)
        results["c"] = run_stage("spark", str(raw), str(work / "lake"))
        loader, _, _ = run_stage("loader", results["c"][0]["train_table"])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    from rich.table import Table

    from jobs.console import make_console

    (ra, _, ma) = results["a"]
    (rc, wc, mc) = results["c"]
    wa = ra["seconds"]
    tc = rc["ingest_s"] + rc["featurize_s"]
    n = rc["rows"]
    assert ra["rows"] == n == rc["rows_ok"] == results["d"][0]["rows"], (ra["rows"], rc)
    table = Table(title=f"Criteo raw -> features, {n:,} rows in {days} day files, {os.cpu_count()} cores")
    for col in ("", "seconds", "rows/s", "peak memory (GB)"):
        table.add_column(col, justify="right" if col else "left")
    runs = ", ".join(f"{r[0]['seconds']:.1f}" for r in parses)
    table.add_row(f"(a) pyarrow.csv parse (limit: best of {runs})", f"{wa:.1f}", f"{n / wa:,.0f}", f"{ma / 1e9:.2f}")
    if "b" in results:
        (rb, _, mb) = results["b"]
        wb = rb["seconds"]
        table.add_row("(b) pandas featurize, 1 process", f"{wb:.1f}", f"{n / wb:,.0f}", f"{mb / 1e9:.2f}")
    table.add_row("(c) bigopt ingest + featurize", f"{tc:.1f}", f"{n / tc:,.0f}", f"{mc / 1e9:.2f}")
    table.add_row("    ingest (verify, bronze, quarantine, ledger)", f"{rc['ingest_s']:.1f}", "", "")
    table.add_row("    featurize (vocabulary, 3 gold tables)", f"{rc['featurize_s']:.1f}", "", "")
    table.add_row("    (Spark session + Python workers start, not counted)", f"{rc['startup_s']:.1f}", "", "")
    (rd, _, md) = results["d"]
    wd = rd["seconds"]
    table.add_row(f"(d) storage floor: parse + Parquet only ({rd['parse_cpu_s']:.1f} + {rd['parquet_cpu_s']:.1f} CPU s)",
                  f"{wd:.1f}", f"{n / wd:,.0f}", f"{md / 1e9:.2f}")
    make_console().print(table)  # a log keeps each row on one line
    print("(seconds inside each process, after interpreter start and imports; for (c) after the SparkSession and "
          "its Python workers are up, whose start is spark_start_s; peak memory: for (c) the PSS of the whole "
          "process tree, the driver, the JVM and the Python workers, sampled at 2 Hz; for (a), (b) and (d) the "
          "larger of the process's sampled PSS and its ru_maxrss)")
    same = True
    if "b" in results:
        diff = cross_check(rb, rc, n)
        same = not diff
        print(f"(cross-check (b) vs (c): cardinalities, per-column train id counts, the train rows and the held-out "
              f"day's rows (valid + test) as multisets, the split totals: "
              f"{'identical' if same else 'DIFFER in ' + '; '.join(diff)}; split rows b={rb['split_rows']} "
              f"c={rc['split_rows']}: valid/test halves of the held-out day use different row hashes)")
    figures = {
        "rows": n,
        "parse_limit_s": round(wa, 2), "parse_limit_rows_per_s": round(n / wa), "parse_limit_peak_gb": round(ma / 1e9, 2),
    }
    if "b" in results:
        figures.update({"pandas_s": round(wb, 2), "pandas_rows_per_s": round(n / wb), "pandas_peak_gb": round(mb / 1e9, 2)})
    figures.update({
        "bigopt_s": round(tc, 2), "bigopt_rows_per_s": round(n / tc), "bigopt_peak_gb": round(mc / 1e9, 2),
        "bigopt_ingest_s": round(rc["ingest_s"], 2), "bigopt_featurize_s": round(rc["featurize_s"], 2),
        "spark_start_s": round(rc["startup_s"], 2),
        # (until the twenty-eighth session the docstring promised the floor's rows/s, but no line printed it)
        "floor_s": round(wd, 2), "floor_rows_per_s": round(n / wd), "floor_peak_gb": round(md / 1e9, 2),
        # one loader epoch of gold train (CPU s): arrays as written vs 39 scalar columns, same codec
        "loader_list_columns_cpu_s": round(loader["lists_cpu_s"], 3),
        "loader_scalar_columns_cpu_s": round(loader["columns_cpu_s"], 3),
        "loader_shuffled_list_columns_cpu_s": round(loader["lists_shuffled_cpu_s"], 3),
        "loader_shuffled_scalar_columns_cpu_s": round(loader["columns_shuffled_cpu_s"], 3),
    })
    if "b" in results:
        figures.update({"ratio_vs_pandas": round(tc / wb, 3),  # c / b
                        "speedup_vs_pandas_with_spark_start": round(wb / (tc + rc["startup_s"]), 2),
                        "cross_check_b_vs_c": "identical" if same else "DIFFER"})
    figures.update({"floor_vs_parse_limit": round(wd / wa, 2), "ratio_vs_floor": round(tc / wd, 2),
                    "ratio_vs_parse_limit": round(tc / wa, 2)})
    if "b" in results:
        figures["speedup_vs_pandas"] = round(wb / tc, 2)
    for k, v in figures.items():
        print(f"{k}: {v}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
