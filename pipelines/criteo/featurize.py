"""Bronze -> gold: model-ready train/valid/test Delta tables + the vocabulary.

    report = featurize(spark, cfg)

Gold rows are ``label float, dense array<float> (13), sparse array<int> (26)``:

- dense: missing -> 0, negatives -> 0, then ``log(1 + x)`` (the DLRM / MLPerf transform);
- sparse, ``featurize.strategy``:
  - ``vocab``: per column, the values seen at least ``freq_threshold`` times in the *train*
    split get ids 2, 3, ... by descending frequency (ties: by value); id 0 = missing, id 1 =
    rare or unseen (NVTabular Categorify / MLPerf style). ``cardinality`` = kept values + 2;
  - ``hash``: id 0 = missing, else ``1 + pmod(xxhash64(value), hash_buckets - 1)``; no
    vocabulary pass, cardinality = ``hash_buckets``.
- splits: ``day`` (1TB layout: the last day, or ``test_days``, is held out; ``valid_share``
  of its rows, chosen by a hash of the row, go to valid, the rest to test; or explicit
  ``valid_days``) or ``random`` (Kaggle: a seeded hash of the row's content sends
  ``train_fraction`` = 6/7 of rows to train and halves of the rest to valid/test). The hash is
  Spark's ``pmod(xxhash64(seed, label, I1..I13, C1..C26), 2^30) / 2^30``, not ``rand()``, so
  the split does not depend on partitioning and exact duplicate rows never straddle train and
  test.

What runs where. Spark distributes; the per-row work is vectorised Arrow/NumPy code inside
Spark tasks, reading and writing Parquet directly (the rows never become JVM rows). The unit
of work is a bronze *slice* (a file, or a range of its row groups when it is large); slices
are packed into about two tasks per core, balanced by bytes
(:func:`pipelines.criteo.bronze_slices.bronze_tasks`). The split's rule per row is
:class:`pipelines.criteo.split.SplitRule`; categorical ids, the vocabulary job included, are
:mod:`pipelines.criteo.vocabulary`.

1. **Vocabulary** (strategy ``vocab``), one RDD job with one shuffle. Map: each task reads
   C1..C26 of its slices that can hold train rows, dictionary-encoded (plus label/I1..I13
   when the split needs the row hash), keeps the train rows, counts the dictionary indices
   and emits per column its partial counts as Arrow IPC bytes keyed by the column index
   (8-byte values travel as uint64 keys: :func:`_sum_counts`). Reduce (``partitionBy`` into
   min(26, 2 x cores) partitions, then :func:`merge_partition`): each column's partials are
   summed as they arrive (:class:`PartialCounts`), then per column the threshold and
   ``max_vocab_size`` applied, values ordered by count desc then value asc and numbered from
   2; the task writes that column's ``column=Cj`` vocabulary files and returns them with the
   column's distinct and kept counts. The driver keeps the files uncommitted. Memory
   per task, map or reduce: about three times each column's distinct values there
   (:class:`PartialCounts`). (Not ``groupByKey``: its map-side combiner has nothing to
   combine, one partial per column per task, yet it spilled the partials to disk whenever
   the worker's Arrow memory passed ``spark.python.worker.memory``: 1.3 s of the 10 M-row
   benchmark's 5.6 s vocabulary job.)
2. **Gold**, one RDD job without a shuffle: each task reads its slices' rows, computes the
   split per row (day of the file; the row hash with
   :func:`pipelines.criteo.spark_xxhash.xxhash64`, bit-identical to Spark's), the dense
   transform and the ids (lookups in the column's vocabulary, which the task reads from the
   vocabulary job's files and keeps per Python worker: :class:`VocabLookup`; or the Spark
   hash), and writes each split's rows to its own gold table. Memory per task: one batch of
   rows plus all 26 vocabularies (``max_vocab_size`` bounds them).

Only when both jobs have succeeded does the driver commit, one transaction per table:
vocabulary, train, valid, test, then the 26-row ``vocab_sizes`` summary
(:func:`pipelines.lake.tasks.commit_writes`). A failed job (a task error, an unreadable
bronze file), an error or a stop (Ctrl-C, SIGTERM) at any point before the commits leaves
every table as it was and deletes the files it wrote
(:class:`pipelines.lake.tasks.UncommittedWrites`).

Only bronze rows the ingest ledger confirms are used (see :mod:`pipelines.criteo.bronze`);
unlabelled rows (Kaggle ``test.txt``) are left out of gold. Every gold commit records the
bronze version it was built from; ``features.json`` next to the gold tables names the table
versions and per-column cardinalities the training code needs, and the fingerprint of gold's
inputs, so featurizing the same bronze version with the same settings again writes nothing
(:func:`current_gold`).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from pipelines.criteo.bronze_slices import (
    BronzeFileError,
    BronzeSlice,
    UnreadableBronzeError,
    bronze_tasks,
    day_of,
    read_slice,
    unreadable_footers,
    unreadable_from,
)
from pipelines.criteo.schema import (
    BUILD_KEY, DENSE, FIRST_VOCAB_ID, GOLD_SPLITS, MISSING_ID, NUM_DENSE, NUM_SPARSE, RARE_ID, SPARSE, tables,
)
from pipelines.criteo.split import (  # the split is planned from the log and ledger alone: no Numba for it
    ROW_COLUMNS,
    TEST,
    TRAIN,
    VALID,
    BronzeView,
    FeaturizeError,
    SplitPlan,
    SplitRule,
    build_settings,
    plan_split,
    view_sources,
)
from pipelines.criteo.vocabulary import build_vocabulary, hashed_ids, load_vocabulary, vocab_ids
from pipelines.errors import MissingInputError

if TYPE_CHECKING:
    from pipelines.lake.tasks import TaskWrite

log = logging.getLogger(__name__)

# The table layouts (the same Arrow schemas the earlier Spark SQL implementation produced, so
# existing tables are overwritten in place and the training loader reads both alike).
DENSE_TYPE = pa.list_(pa.field("element", pa.float32()))
SPARSE_TYPE = pa.list_(pa.field("element", pa.int32(), nullable=False))
GOLD_SCHEMA = pa.schema([
    pa.field("label", pa.float32()),
    pa.field("dense", DENSE_TYPE, nullable=False),
    pa.field("sparse", SPARSE_TYPE, nullable=False),
])
VOCAB_SIZES_SCHEMA = pa.schema([
    pa.field("column", pa.string()), pa.field("position", pa.int32()), pa.field("cardinality", pa.int32()),
    pa.field("kept_values", pa.int64()), pa.field("distinct_in_train", pa.int64()), pa.field("strategy", pa.string()),
    pa.field("freq_threshold", pa.int32()), pa.field("hash_buckets", pa.int32()), pa.field("missing_id", pa.int32()),
    pa.field("rare_id", pa.int32()),
])
GOLD_LAYOUT = {"label": "float", "dense": f"array<float>[{NUM_DENSE}]", "sparse": f"array<int>[{NUM_SPARSE}]"}

# gold Parquet: no dictionary encoding (the sparse ids are mostly distinct per row group, so
# Parquet would build and then drop a dictionary: writing is ~20% cheaper without, the files ~8%
# larger); statistics for the label only (Delta keeps no min/max for list columns: 6% of the write)
GOLD_PARQUET_OPTIONS = {"use_dictionary": False}
GOLD_STATS_COLUMNS = ["label"]


@dataclass
class FeaturizeReport:
    strategy: str
    split_mode: str
    bronze: str
    bronze_version: int
    rows: dict[str, int] = field(default_factory=dict)
    tables: dict[str, str] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    cardinalities: list[int] = field(default_factory=list)
    unlabeled_rows: int = 0
    vocabulary: str | None = None
    vocabulary_version: int | None = None
    vocab_sizes: str = ""
    vocab_sizes_version: int | None = None
    features_json: str = ""
    test_days: list[int] = field(default_factory=list)
    valid_days: list[int] = field(default_factory=list)
    seconds: float = 0.0
    up_to_date: bool = False  # nothing was written: the gold tables already were this build (current_gold)
    build: str | None = None  # the id in every commit of the build (schema.BUILD_KEY; None: written before it)

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())

    def summary(self) -> str:
        """One line for logs and ``bigopt run``."""
        rows = ", ".join(f"{k} {v:,}" for k, v in self.rows.items())
        return (
            ("up to date, " if self.up_to_date else "")
            + f"{self.strategy}/{self.split_mode} split from bronze v{self.bronze_version}: {rows}; "
            f"{sum(self.cardinalities):,} embedding rows over {len(self.cardinalities)} columns"
        )


# ------------------------------------------------------------------------- bronze view
def bronze_view(cfg, version: int | None = None, latest: int | None = None) -> BronzeView:
    """Check bronze (at ``version``) against the ingest ledger using only the Delta log:
    rows per source (file statistics) and the batch id of every file (min/max statistics of
    ``ingest_batch``). Raises :class:`FeaturizeError` naming the sources that disagree. A view
    of the latest version (``version`` None, or the ``latest`` the caller checked) whose only
    disagreements are rows an ingest is still recording is the version before them."""
    from deltalake.exceptions import DeltaError

    from pipelines.criteo.bronze import bronze_sources, current_entries, in_flight, read_ledger, unconfirmed_sources
    from pipelines.lake import DeltaSnapshot, table_exists

    paths = tables(cfg)
    latest_asked = version in (None, latest)  # not a pin: the in-flight fallback below may apply
    if not table_exists(paths["bronze"]):
        raise MissingInputError(f"no bronze table at {paths['bronze']}: run `bigopt ingest` first")
    try:
        snap = DeltaSnapshot(paths["bronze"], version=version)
    except (DeltaError, OverflowError):  # a version bronze does not have (OverflowError: negative)
        if version is None:
            raise
        from pipelines.lake.maintenance import versions_held

        raise FeaturizeError(f"bronze has no version {version}: {paths['bronze']} has versions "
                             f"{versions_held(paths['bronze'])}") from None
    # an older version a vacuum may have emptied (one lookup per file: not for the latest, which
    # every unpinned build reads)
    if latest is None:  # ``latest``: bronze's latest version where the caller has read it already
        latest = _latest_version(paths["bronze"]) if version is not None else snap.version
    if snap.version != latest and (gone := snap.missing_files()):
        raise FeaturizeError(
            f"bronze v{snap.version} cannot be read any more: {len(gone)} of its {len(snap.files())} data files are "
            f"gone (e.g. {gone[0]}), removed by a vacuum after later versions replaced them (or by hand); "
            f"featurize a later version (bronze is at v{latest})")
    per_source = bronze_sources(snap)
    ledger = read_ledger(paths["ledger"])
    current = current_entries([r for r in ledger if r["bronze_version"] <= snap.version])
    problems = unconfirmed_sources(per_source, current)
    out = {src: v for src, v in view_sources(current).items() if src not in problems}
    if problems and latest_asked:
        # an ingest between its bronze commit and its ledger entry (criteo.ingest.in_flight_s): build
        # from the latest version the ledger confirms (until the twenty-fifth session featurize failed
        # there, and sent the user to --drop-unconfirmed, which then deleted the running ingest's rows)
        young = in_flight(paths["bronze"], per_source, problems, cfg.criteo.ingest.in_flight_s)
        if young and set(young) == set(problems):
            which = ", ".join(f"{s}: batch {b}, {a:.0f} s ago" for s, (b, a, _) in sorted(young.items()))
            # the version before their first commit (maintenance commits before it included); a
            # confirmed commit after them holds them too
            confirmed = min(v for _, _, v in young.values()) - 1
            if confirmed < 0 or any((r["bronze_version"] or -1) > confirmed for r in ledger):
                raise FeaturizeError(f"bronze v{snap.version} holds rows an ingest committed moments ago and is still "
                                     f"recording in the ledger ({which}), and no earlier version the ledger confirms "
                                     "leaves them out: run featurize again once that ingest has finished (if no "
                                     "ingest is running, it was killed: run `bigopt ingest` again, which replaces "
                                     "those rows)")
            log.warning("bronze v%s holds rows an ingest committed moments ago and is still recording in the ledger "
                        "(%s): building from bronze v%s, the latest version the ledger confirms (if no ingest is "
                        "running, it was killed: run `bigopt ingest` again, which replaces those rows)",
                        snap.version, which, confirmed)
            return bronze_view(cfg, version=confirmed, latest=snap.version)
    if problems:
        raise FeaturizeError(
            f"bronze v{snap.version} and the ingest ledger disagree (re-run `bigopt ingest` with these files "
            "among its inputs: it replaces unconfirmed rows; rows of a file that is gone: "
            "`bigopt ingest --drop-unconfirmed`):\n  " + "\n  ".join(f"{src}: {why}" for src, why in problems.items())
        )
    return BronzeView(snap.version, out, snap)


# ------------------------------------------------------------- row transforms (in tasks)
def dense_matrix(batch: pa.RecordBatch) -> np.ndarray:
    """``log1p(max(coalesce(x, 0), 0))`` of I1..I13 as an (n, 13) float32 matrix."""
    out = np.empty((batch.num_rows, NUM_DENSE), dtype=np.float32)
    for j, c in enumerate(DENSE):
        x = np.maximum(batch.column(c).fill_null(0).to_numpy(), 0)
        out[:, j] = np.log1p(x.astype(np.float64))
    return out


def gold_batch(label: pa.Array, dense: np.ndarray, sparse: np.ndarray) -> pa.RecordBatch:
    """Rows in the gold layout from a float label and (n, 13) / (n, 26) matrices."""
    n = len(label)
    d_off = pa.array(np.arange(0, n * NUM_DENSE + 1, NUM_DENSE, dtype=np.int32))
    s_off = pa.array(np.arange(0, n * NUM_SPARSE + 1, NUM_SPARSE, dtype=np.int32))
    return pa.RecordBatch.from_arrays(
        [
            label,
            pa.ListArray.from_arrays(d_off, pa.array(dense.reshape(-1)), type=DENSE_TYPE),
            pa.ListArray.from_arrays(s_off, pa.array(sparse.reshape(-1)), type=SPARSE_TYPE),
        ],
        schema=GOLD_SCHEMA,
    )


# --------------------------------------------------------------------------- gold job
@dataclass(frozen=True)
class GoldSpec:
    """What a gold task needs (picklable): the split rule, the id strategy and the writes."""

    rule: SplitRule
    schema: pa.Schema  # bronze columns read
    writes: tuple  # TaskWrite per GOLD_SPLITS entry
    strategy: str
    hash_buckets: int
    vocab_files: tuple = ()  # per column: the vocabulary's file URIs


def gold_task(task: list[BronzeSlice], spec: GoldSpec) -> dict[str, list]:
    """One task: every row of its slices to the gold table of its split. Returns
    ``{split: add actions}``, or ``{"unreadable": [problems]}`` (its writes discarded) when a
    bronze file of the task cannot be read."""
    values = load_vocabulary(spec.vocab_files) if spec.strategy == "vocab" else None
    writers = [tw.open() for tw in spec.writes]
    try:
        for i, sl in enumerate(task):
            try:
                _gold_slice(sl, spec, values, writers)
            except BronzeFileError as e:  # the job fails on the driver: name this task's other bad files too
                for w in writers:
                    w.discard()
                return {"unreadable": unreadable_from(e, task[i + 1:])}
        return {split: w.close() for split, w in zip(GOLD_SPLITS, writers)}
    except BaseException:
        for w in writers:
            w.discard()
        raise


def _gold_slice(sl: BronzeSlice, spec: GoldSpec, values: list | None, writers: list) -> None:
    whole = spec.rule.of_day(sl.day)
    for batch in read_slice(sl, spec.schema, dictionary=SPARSE):
        label = batch.column("label").cast(pa.float32())
        dense = dense_matrix(batch)
        sparse = np.empty((batch.num_rows, NUM_SPARSE), dtype=np.int32)
        for j, c in enumerate(SPARSE):
            col = batch.column(c)
            ids = vocab_ids(col, values[j]) if values is not None else hashed_ids(col, spec.hash_buckets)
            sparse[:, j] = ids
        if whole is not None:
            writers[whole].write(gold_batch(label, dense, sparse))
            continue
        codes = spec.rule.of_rows(batch)
        for k in (TRAIN, VALID, TEST):
            rows = np.flatnonzero(codes == k)
            if len(rows):
                writers[k].write(gold_batch(label.take(pa.array(rows)), dense[rows], sparse[rows]))


def write_gold(sc, tasks: list[list[BronzeSlice]], spec_args: dict, paths: dict, fz,
               guard) -> dict[str, tuple[TaskWrite, list[dict]]]:
    """The gold job: returns ``{split: (write, add actions)}``, written and NOT committed. The
    three writes are added to ``guard`` (:class:`pipelines.lake.tasks.UncommittedWrites`),
    which deletes their files on a failure."""
    from pipelines.lake.tasks import begin_write

    writes = tuple(
        guard.add(begin_write(paths[s], GOLD_SCHEMA, mode="overwrite", row_group_rows=fz.row_group_rows,
                              compression=fz.compression, parquet_options=GOLD_PARQUET_OPTIONS,
                              stats_columns=GOLD_STATS_COLUMNS))
        for s in GOLD_SPLITS
    )
    spec = GoldSpec(writes=writes, **spec_args)
    results: list[dict] = []
    if tasks:
        sc.setJobDescription("featurize: gold train/valid/test")
        try:
            results = sc.parallelize(tasks, len(tasks)).map(functools.partial(gold_task, spec=spec)).collect()
        finally:
            sc.setJobDescription(None)
    if unreadable := [p for r in results for p in r.get("unreadable", ())]:
        raise UnreadableBronzeError(unreadable)
    return {split: (tw, [a for r in results for a in r[split]]) for split, tw in zip(GOLD_SPLITS, writes)}


# ------------------------------------------------------------------- is gold current?
# Bump when featurize writes different gold from the same bronze and settings (a changed
# transform, id order or split rule), so gold built by older code is not taken as current.
GOLD_REVISION = 1


def gold_fingerprint(cfg, bronze_version: int, bronze_table_id: str) -> str:
    """What the gold tables are a function of: the bronze snapshot, every ``criteo.featurize``
    setting, the vocabulary tables' codec and :data:`GOLD_REVISION`. ``features.json`` records
    it; training settings, ingest settings and the run name are not part of it.

    The snapshot is named by path, version and the table's id (Delta's ``metaData.id``, new
    for each table created at the path): a bronze deleted and ingested again starts at version
    0 once more, and gold built from the old one must not pass for current."""
    from jobs.config import doc_hash

    return doc_hash({
        "revision": GOLD_REVISION,
        "bronze": {"path": tables(cfg)["bronze"], "version": bronze_version, "table_id": bronze_table_id},
        "featurize": cfg.criteo.featurize.model_dump(mode="json", exclude={"bronze_version"}),
        "lake_compression": cfg.lake.compression,
    })


def _bronze_head(uri: str, version: int | None) -> tuple[int, str] | None:
    """(version, Delta table id) of bronze at ``version`` (default: latest), from one read of
    its log; None when there is no table or no such version (the build then says why)."""
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError

    from pipelines.lake.fs import delta_uri

    try:
        dt = DeltaTable(delta_uri(uri), version=version)
    except (DeltaError, OverflowError):  # TableNotFoundError is a DeltaError
        return None
    return dt.version(), dt.metadata().id


def _latest_version(uri: str) -> int | None:
    """A table's latest version from its log (one read of it); None when there is no table."""
    from deltalake.exceptions import TableNotFoundError

    from pipelines.lake import table_version

    try:
        return table_version(uri)
    except TableNotFoundError:
        return None


def _holds_build(path: str, version: int, build: str | None) -> bool:
    """Whether table ``path`` still reads the rows commit ``version`` of build ``build`` wrote.
    Compacting or vacuuming a table adds commits but changes no row (:func:`data_version`): still
    that build. A table deleted since, or made again by hand up to the same version number, is
    not: its commit at ``version`` is gone, or carries no (another) build id. A commit whose log
    entry was cleaned up, or a ``features.json`` written before builds had ids, is taken on its
    version number alone."""
    from deltalake.exceptions import DeltaError

    from pipelines.lake import data_version
    from pipelines.lake.fs import filesystem_for
    from pipelines.lake.maintenance import commit_info_at, commit_metadata

    try:
        if data_version(path) != version:
            return False
        if build is None:
            return True
        fs, root = filesystem_for(path)
        info = commit_info_at(fs, root, version)
    except (DeltaError, OSError, ValueError):  # gone, unreadable or damaged: build it again
        return False
    return info is None or commit_metadata(info).get(BUILD_KEY) == build


def current_gold(cfg, bronze_version: int, bronze_table_id: str) -> FeaturizeReport | None:
    """The report of the gold tables as they stand, when they are exactly what featurizing
    bronze ``bronze_version`` (of the table ``bronze_table_id``) with ``cfg`` would build: ``features.json`` records the same
    :func:`gold_fingerprint` and every table it names is still at the version it records.
    None when anything differs: no bronze or no gold yet, bronze or a setting changed, or a
    table was written since (by another build or by hand). Reads ``features.json`` and the
    tables' logs only; no Spark, no scan of bronze or its ledger."""
    paths = tables(cfg)
    try:
        doc = read_features(paths["features_json"])
    except (OSError, ValueError):  # never built (or unreadable, or not JSON): build
        return None
    if doc.get("fingerprint") != gold_fingerprint(cfg, bronze_version, bronze_table_id):
        return None
    recorded = {s: (t["path"], t["version"]) for s, t in doc["tables"].items()}
    for name in ("vocabulary", "vocab_sizes"):
        if doc.get(name):
            recorded[name] = (doc[name]["path"], doc[name]["version"])
    if not all(_holds_build(path, version, doc.get("build")) for path, version in recorded.values()):
        return None
    try:
        return _report_of(doc, paths["features_json"])
    except (KeyError, TypeError):  # a features.json this code does not know how to read: build
        return None


def _report_of(doc: dict, features_json: str) -> FeaturizeReport:
    split = doc["split"]
    vocab = doc.get("vocabulary") or {}
    return FeaturizeReport(
        doc["strategy"], split["mode"], doc["bronze"]["path"], doc["bronze"]["version"],
        rows={s: t["rows"] for s, t in doc["tables"].items()},
        tables={s: t["path"] for s, t in doc["tables"].items()},
        versions={s: t["version"] for s, t in doc["tables"].items()},
        cardinalities=list(doc["cardinalities"]), unlabeled_rows=doc["unlabeled_rows_excluded"],
        vocabulary=vocab.get("path"), vocabulary_version=vocab.get("version"),
        vocab_sizes=doc["vocab_sizes"]["path"], vocab_sizes_version=doc["vocab_sizes"]["version"],
        features_json=features_json, test_days=list(split["test_days"]),
        valid_days=list(split["valid_days"]), up_to_date=True, build=doc.get("build"),
    )


# ------------------------------------------------------------------------------- main
def featurize(spark, cfg, progress: Callable[[str], None] | None = None, force: bool = False) -> FeaturizeReport:
    """Build the gold tables from the current (or ``featurize.bronze_version``) bronze. When
    they already are that build (:func:`current_gold`) nothing is written and their report is
    returned (``up_to_date``); ``force`` rebuilds them anyway. ``spark``: a SparkSession, or
    a callable that starts one, called only for a build (:func:`pipelines.spark.session_of`)."""
    from jobs.config import config_hash
    from pipelines.lake import data_version
    from pipelines.lake.fs import check_writable
    from pipelines.lake.tasks import UncommittedWrites, begin_write, commit_writes
    from pipelines.spark import session_of
    from pipelines.stopping import cancel_jobs_if_stopping, held_stop_signals

    t0 = time.time()
    say = progress or (lambda msg: log.info(msg))
    fz = cfg.criteo.featurize
    paths = tables(cfg)
    chash = config_hash(cfg)

    bronze_version, data_v, latest = fz.bronze_version, None, None
    if not force and (head := _bronze_head(paths["bronze"], bronze_version)):  # the ledger check is for a build
        bronze_version, data_v = head[0], data_version(paths["bronze"], head[0])
        latest = head[0] if fz.bronze_version is None else None
        if (done := current_gold(cfg, data_v, head[1])) is not None:
            # the version gold records: bronze's latest may be a later maintenance commit (same data)
            say(f"gold is up to date: built from bronze v{done.bronze_version} with these settings, nothing to rebuild")
            done.seconds = time.time() - t0
            return done
    # the version checked above: a commit since cannot slip in
    view = bronze_view(cfg, bronze_version, latest=latest)
    if data_v is None or view.version != bronze_version:  # (the version before an ingest still recording its rows)
        data_v = data_version(paths["bronze"], view.version)
    sources = view.labeled_sources
    if not sources:
        raise FeaturizeError(f"bronze v{view.version} has no labelled rows to featurize")
    plan = plan_split(cfg, view)  # from the log and the ledger: a bad split fails before Spark starts
    for name in ("vocabulary", "vocab_sizes", *GOLD_SPLITS):  # before Spark: a task would fail obscurely
        check_writable(paths[name])
    sc = session_of(spark).sparkContext
    rule = SplitRule.of(cfg, plan)
    say(f"bronze v{view.version}: {sum(view.sources[s]['rows'] for s in sources):,} labelled rows from "
        f"{len(sources)} file(s); split by {plan.mode}")
    report = FeaturizeReport(fz.strategy, plan.mode, paths["bronze"], view.version,
                             unlabeled_rows=view.unlabeled_rows, test_days=plan.test_days,
                             valid_days=plan.valid_days)
    # one id for the commits of this run: training matches a pinned gold/train version to the
    # valid, test and vocab_sizes versions written with it (training/dataspec.py)
    report.build = uuid.uuid4().hex
    info_base = {"job": "featurize", BUILD_KEY: report.build, "config_hash": chash, "bronze_path": paths["bronze"],
                 "bronze_version": str(view.version), "strategy": fz.strategy, "split_mode": plan.mode,
                 **build_settings(fz, plan)}

    bronze = view.snapshot
    bronze.check_no_deletion_vectors()  # a bronze table Spark deleted from with vectors: not read whole
    files = bronze.files({"source": sources})
    parallelism = sc.defaultParallelism

    sizes: dict[str, int] = {}
    distinct: dict[str, int] = {}
    vocab_files: tuple = ()
    written: list[tuple[str, TaskWrite, list[dict]]] = []  # committed once every job has succeeded
    vocab = fz.strategy == "vocab"
    with contextlib.ExitStack() as held:  # stop signals held from the first commit on (below)
        held.enter_context(_vacuumed_errors(view))  # bronze files a vacuum took while this run read them
        held.enter_context(_commit_errors(paths))  # a table that cannot be written or committed: which, what stays
        # a failed job, an error, or Ctrl-C / SIGTERM anywhere up to the commits: no file of an
        # uncommitted write stays (the commits that landed keep theirs)
        with UncommittedWrites(on_error=functools.partial(cancel_jobs_if_stopping, sc)) as guard:
            if vocab:
                say(f"vocabulary: counting values in the train split (threshold {fz.freq_threshold})")
                train_files = [f for f in files if rule.may_train(day_of(f))]
                vocab_columns = ROW_COLUMNS if plan.mode == "random" else SPARSE  # the split needs the row hash
                try:
                    vtw, vadds, sizes, distinct, vocab_files = build_vocabulary(
                        sc, train_files, bronze.schema(vocab_columns), rule, fz, paths["vocabulary"], guard,
                        cfg.lake.compression,
                    )
                except UnreadableBronzeError as e:  # name the held-out days' bad files too, not one job's at a time
                    train_uris = {f.uri for f in train_files}
                    rest = unreadable_footers(f.uri for f in files if f.uri not in train_uris)
                    raise UnreadableBronzeError(e.problems + rest) from None
                written.append(("vocabulary", vtw, vadds))
                cards = [sizes[c] + FIRST_VOCAB_ID for c in SPARSE]
                say(f"vocabulary: {sum(sizes.values()):,} values kept of {sum(distinct.values()):,} distinct in train")
            else:
                cards = [fz.hash_buckets] * NUM_SPARSE
            report.cardinalities = cards

            say("writing gold " + "/".join(GOLD_SPLITS))
            spec_args = {"rule": rule, "schema": bronze.schema(ROW_COLUMNS), "strategy": fz.strategy,
                         "hash_buckets": fz.hash_buckets, "vocab_files": vocab_files}
            gold = write_gold(sc, bronze_tasks(files, parallelism), spec_args, paths, fz, guard)
            written += [(split, tw, adds) for split, (tw, adds) in gold.items()]
            if not sum(int(a["num_records"]) for a in gold["train"][1]):  # nothing to train on (and no vocabulary)
                raise FeaturizeError(
                    f"the train split of bronze v{view.version}'s {sum(view.sources[s]['rows'] for s in sources):,} "
                    f"labelled rows is empty (split.train_fraction={fz.split.train_fraction}); nothing committed")
            rows = [
                {"column": c, "position": j, "cardinality": cards[j], "kept_values": sizes.get(c, 0) if vocab else None,
                 "distinct_in_train": distinct.get(c, 0) if vocab else None, "strategy": fz.strategy,
                 "freq_threshold": fz.freq_threshold if vocab else None,
                 "hash_buckets": None if vocab else fz.hash_buckets, "missing_id": MISSING_ID,
                 "rare_id": RARE_ID if vocab else None}
                for j, c in enumerate(SPARSE)
            ]
            stw = guard.add(begin_write(paths["vocab_sizes"], VOCAB_SIZES_SCHEMA, mode="overwrite",
                                        compression=cfg.lake.compression))
            written.append(("vocab_sizes", stw, stw.write_all(  # 26 rows: written by the driver, no Spark job
                pa.Table.from_pylist(rows, schema=VOCAB_SIZES_SCHEMA).to_batches())))

            say("committing " + ", ".join(name for name, _, _ in written))
            # Ctrl-C / SIGTERM from the first commit to features.json is held, then acted on: a
            # stop between two commits left gold train on the new build and valid/test on the old
            held.enter_context(held_stop_signals())
            versions = dict(zip((name for name, _, _ in written), commit_writes(
                [(tw, adds, {**info_base, "table": name}) for name, tw, adds in written])))
        if vocab:
            report.vocabulary, report.vocabulary_version = paths["vocabulary"], versions["vocabulary"]
        for split, (_, adds) in gold.items():
            report.tables[split], report.versions[split] = paths[split], versions[split]
            report.rows[split] = sum(int(a["num_records"]) for a in adds)
        report.vocab_sizes, report.vocab_sizes_version = paths["vocab_sizes"], versions["vocab_sizes"]

        say("writing features.json")
        report.features_json = paths["features_json"]
        try:
            write_features_json(cfg, report, sizes, distinct, plan, bronze.table.metadata().id, data_v)
        except OSError as e:  # a full disk, a folder that cannot be written: after every commit
            raise _commit_failed(paths["features_json"], e, [(paths[n], versions[n]) for n, _, _ in written],
                                 paths) from e
    report.seconds = time.time() - t0
    return report


@contextlib.contextmanager
def _vacuumed_errors(view: BronzeView) -> Iterator[None]:
    """Bronze files that could not be read because a vacuum removed them while this run read
    ``view``'s version (a later version replaced them): said so, with the remedy (a run again),
    not as damage to restore or re-ingest (until the twenty-fifth session)."""
    try:
        yield
    except UnreadableBronzeError as e:
        vacuumed = view.snapshot.vacuumed_since() if view.snapshot is not None else None
        if not vacuumed:
            raise
        raise FeaturizeError(
            f"{len(vacuumed[1])} of bronze v{view.version}'s files were removed by a vacuum while featurize read them "
            f"(v{vacuumed[0]} replaced them; a vacuum with --no-retention-check deletes files a reader of an older "
            f"version still needs); bronze is not damaged: run featurize again") from e


@contextlib.contextmanager
def _commit_errors(paths: dict) -> Iterator[None]:
    """Turn a :class:`~pipelines.lake.commit.TableWriteError` (a gold table that cannot be
    written or committed: its log, a full disk) into the :func:`_commit_failed` error."""
    from pipelines.lake.commit import TableWriteError

    try:
        yield
    except TableWriteError as e:
        raise _commit_failed(e.table, e, e.stays, paths) from e


def _commit_failed(what: str, e: OSError, stays: list[tuple[str, int | None]], paths: dict) -> FeaturizeError:
    """The error for a gold table (or ``features.json``) that could not be written or
    committed, for a reason outside the data: which and why (on one line), the tables of this
    build that stay committed (``stays``, ``(path, version)``: Delta has no transaction across
    tables, and the commits run in order) and what to do. A re-run rebuilds: ``features.json``
    still describes the previous build, whose tables (some now at this build's versions) no
    longer match it (:func:`current_gold`)."""
    from pipelines.lake.commit import TableWriteError, readable_error

    names = {uri: name for name, uri in paths.items()}
    msg = str(e) if isinstance(e, TableWriteError) else f"writing {what} failed: {readable_error(e)}"
    if not stays:
        held = "nothing of this build was committed"
    elif what == paths["features_json"]:
        held = f"every table of this build is committed ({_versions(stays, names)}), its features.json not"
    else:
        held = (f"{_versions(stays, names)} of this build stay committed, the rest of it and features.json not "
                "(features.json still describes the previous build, if any)")
    return FeaturizeError(f"{msg}; {held}: run the same command again once that is fixed: it rebuilds gold")


def _versions(stays: list[tuple[str, int | None]], names: dict[str, str]) -> str:
    """``vocabulary v3, train v3`` for ``[(path, version), ...]`` (a path by its table's name)."""
    return ", ".join(names.get(t, t) + ("" if v is None else f" v{v}") for t, v in stays)


def write_features_json(cfg, report: FeaturizeReport, sizes: dict, distinct: dict, plan: SplitPlan,
                        bronze_table_id: str, bronze_data_version: int) -> dict:
    """The small JSON the training code reads to size embedding tables and find the data
    (next to the gold tables, on the lake's filesystem)."""
    from jobs.config import config_hash

    fz = cfg.criteo.featurize
    vocab = fz.strategy == "vocab"
    doc = {
        "dataset": cfg.criteo.name,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config_hash": config_hash(cfg),
        # what current_gold compares: bronze's data, whatever maintenance commits came after it
        "fingerprint": gold_fingerprint(cfg, bronze_data_version, bronze_table_id),
        "strategy": fz.strategy,
        "freq_threshold": fz.freq_threshold if vocab else None,
        "max_vocab_size": fz.max_vocab_size if vocab else None,
        "hash_buckets": None if vocab else fz.hash_buckets,
        "missing_id": MISSING_ID,
        "rare_id": RARE_ID if vocab else None,
        "num_dense": NUM_DENSE,
        "num_sparse": NUM_SPARSE,
        "dense_columns": DENSE,
        "sparse_columns": SPARSE,
        "dense_transform": "log(1 + max(x, 0)); missing -> 0",
        "layout": GOLD_LAYOUT,
        "cardinalities": report.cardinalities,
        "columns": [
            {
                "name": c, "position": j, "cardinality": report.cardinalities[j],
                "kept_values": sizes.get(c, 0) if vocab else None,
                "distinct_in_train": distinct.get(c, 0) if vocab else None,
            }
            for j, c in enumerate(SPARSE)
        ],
        "split": {
            "mode": plan.mode, "test_days": plan.test_days, "valid_days": plan.valid_days,
            "valid_share": fz.split.valid_share,
            "train_fraction": fz.split.train_fraction if plan.mode == "random" else None,
            "seed": fz.split.seed,
        },
        "build": report.build,
        "tables": {s: {"path": report.tables[s], "version": report.versions[s], "rows": report.rows[s]}
                   for s in report.tables},
        "vocabulary": {"path": report.vocabulary, "version": report.vocabulary_version} if vocab else None,
        "vocab_sizes": {"path": report.vocab_sizes, "version": report.vocab_sizes_version},
        "bronze": {"path": report.bronze, "version": report.bronze_version},
        "unlabeled_rows_excluded": report.unlabeled_rows,
    }
    from pipelines.lake.fs import write_small_file

    write_small_file(report.features_json, json.dumps(doc, indent=1).encode())
    return doc


def read_features(path: str) -> dict:
    from pipelines.lake.fs import read_small_file

    return json.loads(read_small_file(path))
