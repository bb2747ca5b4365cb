"""Bronze -> gold: model-ready train/valid/test Delta tables + the vocabulary.

    report = featurize(spark, cfg)

Gold rows are ``label float, dense array<float> (13), sparse array<int> (26)``:

- dense: missing -> 0, negatives -> 0, then ``log(1 + x)`` (the DLRM / MLPerf transform);
- sparse, ``featurize.strategy``:
  - ``vocab``: per column, the values seen at least ``freq_threshold`` times in the *train*
    split get ids 2, 3, ... by descending frequency (ties: by value); id 0 = missing, id 1 =
    rare or unseen (NVTabular Categorify / MLPerf style). ``cardinality`` = kept values + 2.
    Applied with one broadcast hash join per column (shuffle join above
    ``broadcast_max_rows``), all in one Spark stage;
  - ``hash``: id 0 = missing, else ``1 + pmod(xxhash64(value), hash_buckets - 1)``; no
    vocabulary pass, cardinality = ``hash_buckets``.
- splits: ``day`` (1TB layout: the last day, or ``test_days``, is held out; ``valid_share``
  of its rows, chosen by a hash of the row, go to valid, the rest to test; or explicit
  ``valid_days``) or ``random`` (Kaggle: a seeded hash of the row's content sends
  ``train_fraction`` = 6/7 of rows to train and halves of the rest to valid/test). A hash of
  the content, not ``rand()``, so the split does not depend on partitioning and exact
  duplicate rows never straddle train and test.

Only bronze rows the ingest ledger confirms are used (see :mod:`pipelines.criteo.ingest`);
unlabelled rows (Kaggle ``test.txt``) are left out of gold. Every gold commit records the
bronze version it was built from; ``features.json`` next to the gold tables names the table
versions and per-column cardinalities the training code needs.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pipelines.criteo.schema import (
    DENSE, FIRST_VOCAB_ID, GOLD_SPLITS, MISSING_ID, NUM_DENSE, NUM_SPARSE, RARE_ID, SPARSE, tables,
)

log = logging.getLogger(__name__)

VOCAB_DDL = "column string, value string, id int, count bigint"
VOCAB_SIZES_DDL = (
    "column string, position int, cardinality int, kept_values bigint, distinct_in_train bigint, "
    "strategy string, freq_threshold int, hash_buckets int, missing_id int, rare_id int"
)
GOLD_LAYOUT = {"label": "float", "dense": f"array<float>[{NUM_DENSE}]", "sparse": f"array<int>[{NUM_SPARSE}]"}


class FeaturizeError(RuntimeError):
    """Bronze cannot be featurized as it stands (empty, or inconsistent with the ledger)."""


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

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())

    def summary(self) -> str:
        """One line for logs and ``bigopt run``."""
        rows = ", ".join(f"{k} {v:,}" for k, v in self.rows.items())
        return (
            f"{self.strategy}/{self.split_mode} split from bronze v{self.bronze_version}: {rows}; "
            f"{sum(self.cardinalities):,} embedding rows over {len(self.cardinalities)} columns"
        )


# ------------------------------------------------------------------------- bronze view
@dataclass
class BronzeView:
    """Which bronze rows are usable: the sources (and their batches) the ledger confirms."""

    version: int
    sources: dict[str, dict]  # source -> {"rows", "day", "labeled", "batch"}

    @property
    def labeled_sources(self) -> list[str]:
        return sorted(s for s, v in self.sources.items() if v["labeled"] and v["rows"])

    @property
    def unlabeled_rows(self) -> int:
        return sum(v["rows"] for v in self.sources.values() if not v["labeled"])

    def days(self) -> list[int]:
        return sorted({v["day"] for s, v in self.sources.items() if v["labeled"] and v["rows"]})


def bronze_view(cfg, version: int | None = None) -> BronzeView:
    """Check bronze (at ``version``) against the ingest ledger using only the Delta log:
    rows per source (file statistics) and the batch id of every file (min/max statistics of
    ``ingest_batch``). Raises :class:`FeaturizeError` naming the sources that disagree."""
    from pipelines.criteo.ingest import read_ledger
    from pipelines.lake import DeltaSnapshot, table_exists

    paths = tables(cfg)
    if not table_exists(paths["bronze"]):
        raise FeaturizeError(f"no bronze table at {paths['bronze']}: run `bigopt ingest` first")
    snap = DeltaSnapshot(paths["bronze"], version=version)
    per_source: dict[str, dict] = {}
    for fe in snap.files():
        src = fe.partition_values.get("source")
        d = per_source.setdefault(src, {"rows": 0, "batches": set(), "day": fe.partition_values.get("day")})
        d["rows"] += int(fe.num_records or 0)
        for b in (fe.min_values.get("ingest_batch"), fe.max_values.get("ingest_batch")):
            if b is not None:
                d["batches"].add(b)
    ledger = [r for r in read_ledger(paths["ledger"]) if r["bronze_version"] <= snap.version]
    current: dict[str, dict] = {}
    for r in sorted(ledger, key=lambda r: (r["ingested_at"], r["ingest_batch"])):
        current[r["source"]] = r
    problems = []
    out: dict[str, dict] = {}
    for src in sorted(set(per_source) | set(current)):
        b, led = per_source.get(src), current.get(src)
        if led is None:
            problems.append(f"{src}: {b['rows']} bronze rows but no ledger entry (an interrupted ingest?)")
            continue
        rows = b["rows"] if b else 0
        if rows != led["rows_ok"] or (b and b["batches"] and b["batches"] != {led["ingest_batch"]}):
            problems.append(
                f"{src}: bronze has {rows} rows from batch(es) {sorted(b['batches']) if b else []}, "
                f"the ledger says {led['rows_ok']} rows from {led['ingest_batch']}"
            )
            continue
        out[src] = {"rows": rows, "day": int(led["day"]), "labeled": bool(led["labeled"]), "batch": led["ingest_batch"]}
    if problems:
        raise FeaturizeError(
            f"bronze v{snap.version} and the ingest ledger disagree (re-run `bigopt ingest`, which replaces "
            "unconfirmed rows):\n  " + "\n  ".join(problems)
        )
    return BronzeView(snap.version, out)


# ------------------------------------------------------------------------------ splits
@dataclass
class SplitPlan:
    mode: str
    test_days: list[int] = field(default_factory=list)
    valid_days: list[int] = field(default_factory=list)


def plan_split(cfg, view: BronzeView) -> SplitPlan:
    sp = cfg.criteo.featurize.split
    days = [d for d in view.days() if d >= 0]
    mode = sp.mode
    if mode == "auto":
        mode = "day" if len(days) >= 2 and len(days) == len(view.days()) else "random"
    if mode == "random":
        return SplitPlan("random")
    if len(days) < 2 and not sp.test_days:
        raise FeaturizeError(f"split.mode=day needs at least 2 dated days in bronze, found {days}")
    test = sorted(sp.test_days) if sp.test_days else [max(days)]
    valid = sorted(sp.valid_days or [])
    if set(test) & set(valid):
        raise FeaturizeError(f"split: days {sorted(set(test) & set(valid))} are both test and valid days")
    if not set(days) - set(test) - set(valid):
        raise FeaturizeError(f"split: no training day left (days {days}, test {test}, valid {valid})")
    return SplitPlan("day", test, valid)


def split_day_filter(plan: SplitPlan, split: str):
    """A filter on the ``day`` partition column that keeps every row of ``split`` (day mode), so
    the bronze scan for that split reads only its days' files; None in random mode."""
    from pyspark.sql import functions as F

    if plan.mode != "day":
        return None
    day = F.col("day")
    held = plan.test_days + plan.valid_days
    if split == "train":
        return ~day.isin(held)
    if split == "valid":
        return day.isin(plan.valid_days if plan.valid_days else plan.test_days)
    return day.isin(plan.test_days)


def _row_hash_unit(seed: int):
    """A deterministic number in [0, 1) per row, from the row's content."""
    from pyspark.sql import functions as F

    h = F.xxhash64(F.lit(seed), F.col("label"), *[F.col(c) for c in DENSE], *[F.col(c) for c in SPARSE])
    return F.pmod(h, F.lit(1 << 30)).cast("double") / float(1 << 30)


def split_column(cfg, plan: SplitPlan):
    """Spark column with 'train' / 'valid' / 'test' per row."""
    from pyspark.sql import functions as F

    sp = cfg.criteo.featurize.split
    u = _row_hash_unit(sp.seed)
    if plan.mode == "random":
        tf = sp.train_fraction
        cut = tf + (1.0 - tf) * sp.valid_share
        return F.when(u < tf, "train").when(u < cut, "valid").otherwise("test")
    day = F.col("day")
    holdout = F.when(u < sp.valid_share, "valid").otherwise("test") if not plan.valid_days else F.lit("test")
    col = F.when(day.isin(plan.test_days), holdout)
    if plan.valid_days:
        col = col.when(day.isin(plan.valid_days), "valid")
    return col.otherwise("train")


# ------------------------------------------------------------------------ transforms
def dense_array():
    from pyspark.sql import functions as F

    return F.array(*[F.log1p(F.greatest(F.coalesce(F.col(c), F.lit(0)), F.lit(0))).cast("float") for c in DENSE])


def hashed_ids(buckets: int) -> list:
    from pyspark.sql import functions as F

    return [
        F.when(F.col(c).isNull(), F.lit(MISSING_ID)).otherwise(F.pmod(F.xxhash64(F.col(c)), F.lit(buckets - 1)) + 1)
        .cast("int").alias(c)
        for c in SPARSE
    ]


def build_vocabulary(train_df, threshold: int, max_size: int | None):
    """(vocab, counts): vocab = (column, value, id, count) of the kept values; counts =
    per-column (column, value, count) over the train rows, both as DataFrames."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    stack = "stack({n}, {args}) AS (column, value)".format(
        n=NUM_SPARSE, args=", ".join(f"'{c}', {c}" for c in SPARSE)
    )
    counts = train_df.selectExpr(stack).where("value IS NOT NULL").groupBy("column", "value").count()
    w = Window.partitionBy("column").orderBy(F.col("count").desc(), F.col("value").asc())
    kept = counts.where(F.col("count") >= threshold).withColumn("_rank", F.row_number().over(w))
    if max_size:
        kept = kept.where(F.col("_rank") <= max_size)
    vocab = kept.select(
        "column", "value", (F.col("_rank") + (FIRST_VOCAB_ID - 1)).cast("int").alias("id"), F.col("count")
    )
    return vocab, counts


def vocab_keys(vocab):
    """(``_key`` = "<column>:<value>", ``id``): every column's vocabulary in one small table."""
    from pyspark.sql import functions as F

    return vocab.select(F.concat(F.col("column"), F.lit(":"), F.col("value")).alias("_key"), F.col("id"))


def vocab_ids(df, vocab, sizes: dict[str, int], broadcast_max_rows: int, keyed=None):
    """``df`` with C1..C26 replaced by their int ids: one hash join per column.

    When all the vocabularies together fit ``broadcast_max_rows``, every join probes the same
    broadcast table (``keyed``, from :func:`vocab_keys`) with the key "<column>:<value>":
    the 26 broadcast exchanges are then identical and Spark builds and ships ONE hash
    relation per query (ReuseExchange) instead of 26. Otherwise each column is joined with
    its own vocabulary, broadcast when small, shuffle-joined when large."""
    from pyspark.sql import functions as F

    shared = keyed is not None and sum(sizes.values()) <= broadcast_max_rows
    out = df
    for j, c in enumerate(SPARSE):
        if shared:
            v = F.broadcast(keyed.select(F.col("_key").alias(f"_k{j}"), F.col("id").alias(f"_id{j}")))
            cond = F.concat(F.lit(f"{c}:"), out[c]) == v[f"_k{j}"]
        else:
            v = vocab.where(F.col("column") == c).select(F.col("value").alias(f"_k{j}"), F.col("id").alias(f"_id{j}"))
            if sizes.get(c, 0) <= broadcast_max_rows:
                v = F.broadcast(v)
            cond = out[c] == v[f"_k{j}"]
        out = out.join(v, cond, "left")
    ids = [
        F.when(F.col(c).isNull(), F.lit(MISSING_ID)).otherwise(F.coalesce(F.col(f"_id{j}"), F.lit(RARE_ID)))
        .cast("int").alias(c)
        for j, c in enumerate(SPARSE)
    ]
    keep = [c for c in df.columns if c not in SPARSE]
    return out.select(*keep, *ids)


@contextlib.contextmanager
def session_conf(spark, settings: dict[str, str]):
    """Temporarily change SQL settings of ``spark`` (restored afterwards)."""
    old = {k: spark.conf.get(k, None) for k in settings}
    for k, v in settings.items():
        spark.conf.set(k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                spark.conf.unset(k)
            else:
                spark.conf.set(k, v)


# ------------------------------------------------------------------------------- main
def featurize(spark, cfg, progress: Callable[[str], None] | None = None) -> FeaturizeReport:
    """Build the gold tables from the current (or ``featurize.bronze_version``) bronze."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from jobs.config import config_hash
    from pipelines.lake import DeltaSnapshot, read_table, write_table

    t0 = time.time()
    say = progress or (lambda msg: log.info(msg))
    fz = cfg.criteo.featurize
    paths = tables(cfg)
    chash = config_hash(cfg)

    view = bronze_view(cfg, fz.bronze_version)
    sources = view.labeled_sources
    if not sources:
        raise FeaturizeError(f"bronze v{view.version} has no labelled rows to featurize")
    plan = plan_split(cfg, view)
    say(f"bronze v{view.version}: {sum(view.sources[s]['rows'] for s in sources):,} labelled rows from "
        f"{len(sources)} file(s); split by {plan.mode}")
    report = FeaturizeReport(fz.strategy, plan.mode, paths["bronze"], view.version,
                             unlabeled_rows=view.unlabeled_rows, test_days=plan.test_days,
                             valid_days=plan.valid_days)
    info_base = {"job": "featurize", "config_hash": chash, "bronze_path": paths["bronze"],
                 "bronze_version": str(view.version), "strategy": fz.strategy, "split_mode": plan.mode}

    bronze = read_table(spark, paths["bronze"], version=view.version,
                        columns=["label", *DENSE, *SPARSE, "day", "source"])
    bronze = bronze.where(F.col("source").isin(sources))

    def rows_of(split: str):
        """bronze -> rows of ``split`` (the day filter prunes bronze files in day mode)."""
        df = bronze
        day_filter = split_day_filter(plan, split)
        if day_filter is not None:
            df = df.where(day_filter)
        df = df.select("label", *DENSE, *SPARSE, split_column(cfg, plan).alias("split"))
        return df.where(F.col("split") == split).drop("split")

    cached = []
    sizes: dict[str, int] = {}
    distinct: dict[str, int] = {}
    if fz.strategy == "vocab":
        say(f"vocabulary: counting values in the train split (threshold {fz.freq_threshold})")
        vocab, counts = build_vocabulary(rows_of("train"), fz.freq_threshold, fz.max_vocab_size)
        counts = counts.persist(StorageLevel.MEMORY_AND_DISK)
        vocab = vocab.persist(StorageLevel.MEMORY_AND_DISK)
        cached += [counts, vocab]
        vv = write_table(vocab, paths["vocabulary"], mode="overwrite", partition_by=["column"],
                         commit_info={**info_base, "table": "vocabulary"})
        for row in vocab.groupBy("column").count().collect():
            sizes[row["column"]] = int(row["count"])
        keyed = None
        if sum(sizes.values()) <= fz.broadcast_max_rows:
            keyed = vocab_keys(vocab).persist(StorageLevel.MEMORY_AND_DISK)
            cached.append(keyed)
        for row in counts.groupBy("column").count().collect():
            distinct[row["column"]] = int(row["count"])
        report.vocabulary, report.vocabulary_version = paths["vocabulary"], vv
        cards = [sizes.get(c, 0) + FIRST_VOCAB_ID for c in SPARSE]
    else:
        cards = [fz.hash_buckets] * NUM_SPARSE
    report.cardinalities = cards

    def gold_rows(split: str):
        df = rows_of(split)
        if fz.strategy == "vocab":
            df = vocab_ids(df, vocab, sizes, fz.broadcast_max_rows, keyed)
        else:
            df = df.select("label", *DENSE, *hashed_ids(fz.hash_buckets))
        return df.select(
            F.col("label").cast("float").alias("label"),
            dense_array().alias("dense"),
            F.array(*[F.col(c) for c in SPARSE]).alias("sparse"),
        )

    try:
        # Without AQE the 26 identical broadcast exchanges are reused (one broadcast job per
        # query instead of 26); these queries have no shuffle for AQE to tune anyway.
        with session_conf(spark, {"spark.sql.adaptive.enabled": "false"}):
            for split in GOLD_SPLITS:
                say(f"writing gold {split}")
                v = write_table(
                    gold_rows(split), paths[split], mode="overwrite",
                    commit_info={**info_base, "table": split}, row_group_rows=fz.row_group_rows,
                )
                report.tables[split], report.versions[split] = paths[split], v
                report.rows[split] = DeltaSnapshot(paths[split], version=v).num_rows
    finally:
        for df in cached:
            df.unpersist()

    say("writing the vocabulary summary and features.json")
    rows = [
        (c, j, cards[j], sizes.get(c, 0) if fz.strategy == "vocab" else None,
         distinct.get(c, 0) if fz.strategy == "vocab" else None, fz.strategy,
         fz.freq_threshold if fz.strategy == "vocab" else None,
         fz.hash_buckets if fz.strategy == "hash" else None, MISSING_ID,
         RARE_ID if fz.strategy == "vocab" else None)
        for j, c in enumerate(SPARSE)
    ]
    report.vocab_sizes = paths["vocab_sizes"]
    report.vocab_sizes_version = write_table(
        spark.createDataFrame(rows, VOCAB_SIZES_DDL), paths["vocab_sizes"], mode="overwrite",
        commit_info={**info_base, "table": "vocab_sizes"},
    )
    report.features_json = paths["features_json"]
    write_features_json(cfg, report, sizes, distinct, plan)
    report.seconds = time.time() - t0
    return report


def write_features_json(cfg, report: FeaturizeReport, sizes: dict, distinct: dict, plan: SplitPlan) -> dict:
    """The small JSON the training code reads to size embedding tables and find the data."""
    from jobs.config import config_hash

    fz = cfg.criteo.featurize
    vocab = fz.strategy == "vocab"
    doc = {
        "dataset": cfg.criteo.name,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config_hash": config_hash(cfg),
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
        "tables": {s: {"path": report.tables[s], "version": report.versions[s], "rows": report.rows[s]}
                   for s in report.tables},
        "vocabulary": {"path": report.vocabulary, "version": report.vocabulary_version} if vocab else None,
        "vocab_sizes": {"path": report.vocab_sizes, "version": report.vocab_sizes_version},
        "bronze": {"path": report.bronze, "version": report.bronze_version},
        "unlabeled_rows_excluded": report.unlabeled_rows,
    }
    path = report.features_json
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)
    return doc


def read_features(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
