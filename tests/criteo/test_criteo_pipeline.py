"""Criteo pipeline: raw -> bronze (+ quarantine, ledger) -> gold, on real samples and generated data."""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from jobs.config import load_config
from pipelines.lake import DeltaSnapshot, table_exists, table_version

pytestmark = pytest.mark.spark


def _cfg(tmp: Path, **criteo):
    data = {
        "lake": {"root": str(tmp / "lake")},
        "spark": {"master": "local[2]"},
        "criteo": {"raw_dir": str(tmp / "raw"), **criteo},
    }
    return load_config(data=data)


def _bronze(cfg):
    from pipelines.criteo.schema import tables

    return tables(cfg)


def _lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        text = f.read()
    return [ln for ln in text.split("\n") if ln != ""] if text else []


# ------------------------------------------------------------------------ real samples
def test_real_samples_every_line_accounted(spark, criteo_shared, tmp_path):
    from pipelines.criteo.ingest import ingest

    files = sorted(p for p in criteo_shared.iterdir() if p.suffix == ".txt")
    assert len(files) == 6
    cfg = _cfg(tmp_path, inputs=[str(p) for p in files])
    rep = ingest(spark, cfg)
    t = _bronze(cfg)
    total_lines = sum(len(_lines(p)) for p in files)
    assert rep.rows_in == total_lines == 2300
    assert rep.rows_ok + rep.rows_rejected == rep.rows_in
    bronze = DeltaSnapshot(t["bronze"]).to_table()
    quarantine_rows = DeltaSnapshot(t["quarantine"]).num_rows if table_exists(t["quarantine"]) else 0
    assert bronze.num_rows + quarantine_rows == total_lines
    # the real samples are clean: nothing quarantined, stripped rows padded, not rejected
    assert quarantine_rows == 0
    rows = bronze.to_pylist()
    by_source: dict[str, list[dict]] = {}
    for r in rows:
        by_source.setdefault(r["source"], []).append(r)
    # test file: 100 unlabelled rows, label null, including lines that start with a TAB
    test_name = "kaggle_dac_test_head100.txt"
    test_rows = next(v for k, v in by_source.items() if test_name in k)
    assert len(test_rows) == 100 and all(r["label"] is None for r in test_rows)
    raw_test = _lines(criteo_shared / test_name)
    leading_tab = [ln for ln in raw_test if ln.startswith("\t")]
    assert leading_tab, "the sample should contain test lines with I1 missing"
    assert sum(r["I1"] is None for r in test_rows) >= len(leading_tab)
    # spot-check values against the raw text (first lines of a stripped file, padded)
    stripped = "kaggle_dac_train_head1000_trailing_tabs_stripped.txt"
    raw = _lines(criteo_shared / stripped)
    got = {(r["label"], r["I2"], r["C1"], r["C26"]) for r in next(v for k, v in by_source.items() if stripped in k)}
    short = 0
    for ln in raw[:200]:
        f = ln.split("\t")
        short += len(f) < 40
        f += [""] * (40 - len(f))
        want = (int(f[0]), int(f[2]) if f[2] else None, f[14] or None, f[39] or None)
        assert want in got
    assert short > 0
    # negative integers kept as such
    assert min(r["I2"] for r in rows if r["I2"] is not None) < 0


def test_chunking_changes_nothing(spark, criteo_shared, tmp_path):
    """Plain files split into many byte ranges (one Spark task each, lines cut anywhere) give
    exactly the rows of one task per file, and the sha256 is still the whole file's."""
    import hashlib

    from pipelines.criteo.bronze import read_ledger
    from pipelines.criteo.ingest import ingest

    src = [criteo_shared / "kaggle_dac_train_head1000_trailing_tabs_stripped.txt",
           criteo_shared / "kaggle_dac_test_head100.txt"]
    rows = {}
    for chunk in (1 << 20, 1 << 16):
        cfg = _cfg(tmp_path / str(chunk), inputs=[str(p) for p in src], ingest={"chunk_bytes": chunk})
        ingest(spark, cfg)
        tbl = DeltaSnapshot(_bronze(cfg)["bronze"]).to_table().drop(["ingest_batch"]).to_pylist()
        rows[chunk] = sorted(tbl, key=lambda r: json.dumps(r, sort_keys=True))
        assert {r["source"]: r["sha256"] for r in read_ledger(_bronze(cfg)["ledger"])} == {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src}
    assert len(rows[1 << 20]) == 1100 and rows[1 << 20] == rows[1 << 16]


def test_arrow_schemas_match_the_ddl(spark):
    from pyspark.sql.types import StructType

    from pipelines.criteo.bronze import BRONZE_DDL, BRONZE_SCHEMA, LEDGER_DDL, LEDGER_SCHEMA, QUARANTINE_DDL, \
        QUARANTINE_SCHEMA
    from pipelines.lake.schema import spark_to_arrow

    for ddl, schema in ((BRONZE_DDL, BRONZE_SCHEMA), (QUARANTINE_DDL, QUARANTINE_SCHEMA), (LEDGER_DDL, LEDGER_SCHEMA)):
        assert spark_to_arrow(StructType.fromDDL(ddl)) == schema


# ---------------------------------------------------------------------- generated data
@pytest.fixture(scope="module")
def pipeline(spark, tmp_path_factory):
    """Generate 2 days x 4000 rows, ingest, featurize (vocab). Shared by the tests below."""
    from pipelines.criteo.featurize import featurize
    from pipelines.criteo.generate import generate
    from pipelines.criteo.ingest import ingest

    tmp = tmp_path_factory.mktemp("criteo")
    cfg = _cfg(tmp, generate={"days": 3, "rows_per_day": 4000, "seed": 7},
               featurize={"strategy": "vocab", "freq_threshold": 3, "row_group_rows": 2048})
    paths = generate(cfg)
    ing = ingest(spark, cfg)
    feat = featurize(spark, cfg)
    return cfg, tmp, paths, ing, feat


def test_generated_format_and_label_rate(pipeline):
    cfg, tmp, paths, ing, feat = pipeline
    lines = [ln for p in paths for ln in _lines(Path(p))]
    assert len(lines) == 12_000
    fields = [ln.split("\t") for ln in lines[:2000]]
    assert all(len(f) == 40 for f in fields)
    pos = sum(f[0] == "1" for f in fields) / len(fields)
    assert 0.15 < pos < 0.35
    import re

    hexes = [c for f in fields for c in f[14:] if c]
    assert all(re.fullmatch(r"[0-9a-f]{8}", c) for c in hexes)


def test_bronze_and_gold_counts(pipeline):
    cfg, tmp, paths, ing, feat = pipeline
    t = _bronze(cfg)
    assert ing.rows_in == ing.rows_ok == 12_000 and ing.rows_rejected == 0
    assert DeltaSnapshot(t["bronze"]).num_rows == 12_000
    # Delta min/max where skipping can use them (label, I1..I13, the batch id), not for C1..C26
    from pipelines.criteo.bronze import BRONZE_STATS_COLUMNS

    for fe in DeltaSnapshot(t["bronze"]).files():
        assert set(fe.min_values) == set(fe.max_values) == set(BRONZE_STATS_COLUMNS), fe.min_values
        assert fe.min_values["I2"] < 0 <= fe.max_values["I2"] and fe.min_values["ingest_batch"] == ing.batch_id
    assert sum(feat.rows.values()) == 12_000
    # day split: the last day is held out, halves to valid/test
    assert feat.rows["train"] == 8000
    assert abs(feat.rows["valid"] - 2000) < 300 and feat.rows["valid"] + feat.rows["test"] == 4000
    # gold layout and commit metadata: built from the bronze version
    gold = DeltaSnapshot(t["train"])
    assert gold.schema().names[:3] == ["label", "dense", "sparse"]
    tbl = gold.to_table(["dense", "sparse"])
    assert all(len(x) == 13 for x in tbl.column("dense").to_pylist()[:50])
    assert all(len(x) == 26 for x in tbl.column("sparse").to_pylist()[:50])
    assert min(min(x) for x in tbl.column("dense").to_pylist()) >= 0.0
    info = json.dumps(gold.commit_info())
    assert str(feat.bronze_version) in info and "bronze" in info


def test_vocabulary_dense_frequency_ordered_threshold(spark, pipeline):
    cfg, tmp, paths, ing, feat = pipeline
    t = _bronze(cfg)
    vocab = DeltaSnapshot(t["vocabulary"]).to_table().to_pylist()
    by_col: dict[str, list[dict]] = {}
    for r in vocab:
        by_col.setdefault(r["column"], []).append(r)
    features = json.loads(Path(feat.features_json).read_text())
    for j, (col, rows) in enumerate(sorted(by_col.items(), key=lambda kv: int(kv[0][1:]))):
        rows.sort(key=lambda r: r["id"])
        ids = [r["id"] for r in rows]
        assert ids == list(range(2, 2 + len(ids)))  # dense, after missing=0 and rare=1
        counts = [r["count"] for r in rows]
        assert counts == sorted(counts, reverse=True)  # by descending frequency
        assert all(c >= 3 for c in counts)  # threshold respected
    cards = features["cardinalities"]
    assert len(cards) == 26
    train = DeltaSnapshot(t["train"]).to_table(["sparse"]).column("sparse").to_pylist()
    for row in train[:500]:
        assert all(0 <= v < cards[j] for j, v in enumerate(row))


def test_vocab_ids_match_train_counts(pipeline):
    """Each id's frequency in gold train equals its vocabulary count (the vocabulary is
    computed on exactly these rows); id 0 counts the missing values, id 1 the rare ones."""
    import numpy as np

    cfg, tmp, paths, ing, feat = pipeline
    t = _bronze(cfg)
    vocab = DeltaSnapshot(t["vocabulary"]).to_table().to_pylist()
    sparse = DeltaSnapshot(t["train"]).to_table(["sparse"]).column("sparse").combine_chunks()
    ids = sparse.values.to_numpy().reshape(-1, 26)
    bronze = DeltaSnapshot(t["bronze"]).to_table().to_pylist()
    train_rows = [r for r in bronze if r["day"] != max(feat.test_days)]
    assert len(train_rows) == ids.shape[0]
    for j in (0, 2, 21):  # C1 (small), C3 (large, many rare values), C22 (mostly missing)
        col = f"C{j + 1}"
        got = dict(zip(*np.unique(ids[:, j], return_counts=True)))
        want = {r["id"]: r["count"] for r in vocab if r["column"] == col}
        assert {k: v for k, v in got.items() if k >= 2} == want
        assert got.get(0, 0) == sum(r[col] is None for r in train_rows)
        assert got.get(1, 0) == len(train_rows) - got.get(0, 0) - sum(want.values())


def _spark_sql_reference(spark, cfg, plan) -> tuple[dict, dict]:
    """What the earlier Spark SQL featurize computed, evaluated by Spark on the same bronze:
    ({split: sorted (label, dense, sparse) rows}, {(column, value): (id, count)}). Vocabulary
    ids are applied in Python from the reference vocabulary (the old left joins)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from pipelines.criteo.schema import DENSE, SPARSE
    from pipelines.lake import read_table

    fz, sp = cfg.criteo.featurize, cfg.criteo.featurize.split
    df = read_table(spark, _bronze(cfg)["bronze"], columns=["label", *DENSE, *SPARSE, "day"])
    df = df.where("label IS NOT NULL")
    u = F.pmod(F.xxhash64(F.lit(sp.seed), "label", *DENSE, *SPARSE), F.lit(1 << 30)).cast("double") / float(1 << 30)
    if plan.mode == "random":
        cut = sp.train_fraction + (1.0 - sp.train_fraction) * sp.valid_share
        split = F.when(u < sp.train_fraction, "train").when(u < cut, "valid").otherwise("test")
    else:
        split = F.when(F.col("day").isin(plan.test_days), F.when(u < sp.valid_share, "valid").otherwise("test"))
        split = split.otherwise("train")
    df = df.withColumn("split", split)
    vocab = {}
    if fz.strategy == "vocab":
        stack = "stack(26, {}) AS (column, value)".format(", ".join(f"'{c}', {c}" for c in SPARSE))
        counts = df.where("split = 'train'").selectExpr(stack).where("value IS NOT NULL")
        counts = counts.groupBy("column", "value").count()
        w = Window.partitionBy("column").orderBy(F.col("count").desc(), F.col("value").asc())
        kept = counts.where(F.col("count") >= fz.freq_threshold).withColumn("rank", F.row_number().over(w))
        if fz.max_vocab_size:
            kept = kept.where(F.col("rank") <= fz.max_vocab_size)
        vocab = {(r["column"], r["value"]): (r["rank"] + 1, r["count"]) for r in kept.collect()}
        ids = [F.col(c) for c in SPARSE]
    else:
        ids = [F.when(F.col(c).isNull(), 0).otherwise(F.pmod(F.xxhash64(c), F.lit(fz.hash_buckets - 1)) + 1)
               .cast("int").alias(c) for c in SPARSE]
    dense = F.array(*[F.log1p(F.greatest(F.coalesce(F.col(c), F.lit(0)), F.lit(0))).cast("float") for c in DENSE])
    rows = df.select("split", F.col("label").cast("float").alias("label"), dense.alias("dense"), *ids).collect()
    out: dict[str, list] = {"train": [], "valid": [], "test": []}
    for r in rows:
        if fz.strategy == "vocab":
            sparse = [0 if r[c] is None else vocab.get((c, r[c]), (1,))[0] for c in SPARSE]
        else:
            sparse = [r[c] for c in SPARSE]
        out[r["split"]].append((r["label"], tuple(r["dense"]), tuple(sparse)))
    return {k: sorted(v) for k, v in out.items()}, vocab


def _gold_rows(path: str) -> list:
    t = DeltaSnapshot(path).to_table()
    return sorted(zip(t.column("label").to_pylist(), map(tuple, t.column("dense").to_pylist()),
                      map(tuple, t.column("sparse").to_pylist())))


@pytest.mark.parametrize("split_mode,strategy", [("day", "hash"), ("random", "vocab")])
def test_featurize_equals_the_spark_sql_expressions(spark, tmp_path, split_mode, strategy):
    """The Arrow/NumPy tasks give exactly what Spark SQL gives for the same definitions: the
    row-hash split (day mode: valid/test halves of the held-out day; random mode, which also
    filters the vocabulary's train rows by the hash), the hashing ids, the vocabulary with
    its threshold and size cap, the dense transform."""
    from pipelines.criteo.featurize import featurize
    from pipelines.criteo.generate import generate
    from pipelines.criteo.ingest import ingest

    cfg = _cfg(tmp_path, generate={"days": 3, "rows_per_day": 1500, "seed": 5},
               featurize={"strategy": strategy, "hash_buckets": 997, "freq_threshold": 2, "max_vocab_size": 40,
                          "split": {"mode": split_mode, "seed": 11, "valid_share": 0.3}})
    generate(cfg)
    ingest(spark, cfg)
    rep = featurize(spark, cfg)
    from pipelines.criteo.split import SplitPlan

    want, vocab = _spark_sql_reference(spark, cfg, SplitPlan(rep.split_mode, rep.test_days, rep.valid_days))
    assert rep.split_mode == split_mode and sum(len(v) for v in want.values()) == 4500
    for split in ("train", "valid", "test"):
        got = _gold_rows(rep.tables[split])
        assert len(got) == rep.rows[split] == len(want[split]) > 0
        assert got == want[split], split
    if strategy == "vocab":
        table = DeltaSnapshot(rep.vocabulary).to_table().to_pylist()
        assert {(r["column"], r["value"]): (r["id"], r["count"]) for r in table} == vocab
        assert max(rep.cardinalities) == 42  # the size cap bites on the large columns
    # rebuilt from the same bronze, every gold table lists its files, and so reads back (as the
    # loader reads it: files by path), in the same row order: names carry the task order
    before = {split: _rows_in_listing_order(rep.tables[split]) for split in ("train", "valid", "test")}
    again = featurize(spark, cfg, force=True)
    for split, table in before.items():
        assert DeltaSnapshot(again.tables[split]).version == 1
        assert _rows_in_listing_order(again.tables[split]).equals(table), split


def _rows_in_listing_order(path: str) -> pa.Table:
    from pipelines.lake.reader import open_parquet

    return pa.concat_tables(open_parquet(f.uri).read() for f in DeltaSnapshot(path).files())


def test_failed_featurize_commits_nothing(spark, tmp_path, capfd):
    """Unreadable bronze files (damaged, or missing) fail featurize with one error naming every
    such file of the failing job and the remedy, without Spark task failures (no retries, no
    Java/Python tracebacks); no table gets a commit and no file of the failed writes is left,
    also when only the gold job fails, after the vocabulary job has written its files."""
    from pipelines.criteo.bronze_slices import bronze_slices
    from pipelines.criteo.featurize import FeaturizeError, featurize
    from pipelines.criteo.generate import generate
    from pipelines.criteo.ingest import ingest

    # 4 days of equal files: no file is big enough for the driver to read its footer (to cut it
    # into slices), so the tasks meet the bad files, in both jobs
    cfg = _cfg(tmp_path, generate={"days": 4, "rows_per_day": 300, "seed": 1})
    generate(cfg)
    ingest(spark, cfg)
    rep = featurize(spark, cfg)
    t = _bronze(cfg)
    tables = ("train", "valid", "test", "vocabulary", "vocab_sizes")
    files = {s: sorted(p.name for p in Path(t[s]).rglob("*.parquet")) for s in tables}
    by_day = {f.partition_values["day"]: Path(f.uri.removeprefix("file://")) for f in DeltaSnapshot(t["bronze"]).files()}
    held, train_days = rep.test_days[0], sorted(d for d in by_day if d not in rep.test_days)
    saved = {d: p.read_bytes() for d, p in by_day.items()}
    # the held-out day fails the gold job; two train days the vocabulary job (one damaged, one
    # gone), whose error also names the held-out day's file (gone too), which it did not read
    for damaged, gone in (([held], []), (train_days[:1], [train_days[1], held])):
        for d in damaged:
            by_day[d].write_bytes(b"not parquet")
        for d in gone:
            by_day[d].unlink()
        capfd.readouterr()
        with pytest.raises(FeaturizeError, match=r"cannot be read; .*bigopt ingest --force") as err:
            featurize(spark, cfg, force=True)
        msg = str(err.value)
        bad = damaged + gone
        assert all(str(by_day[d]) in msg for d in bad) and err.value.__cause__ is None
        assert msg.startswith(f"bronze file {by_day[held]} (ArrowInvalid" if bad == [held] else "3 bronze files")
        assert "FileNotFoundError" in msg if gone else "\n" not in msg
        assert "PythonException" not in capfd.readouterr().err  # not a failed Spark task
        assert [table_version(t[s]) for s in tables] == [
            *(rep.versions[s] for s in ("train", "valid", "test")), rep.vocabulary_version, rep.vocab_sizes_version]
        for s in tables:
            assert sorted(p.name for p in Path(t[s]).rglob("*.parquet")) == files[s], s
        for d in bad:
            by_day[d].write_bytes(saved[d])
    # a random split whose train share holds no row (until the thirteenth session: committed,
    # with empty vocabularies and every cardinality 2)
    cfg.criteo.featurize.split.mode, cfg.criteo.featurize.split.train_fraction = "random", 1e-9
    with pytest.raises(FeaturizeError, match=r"the train split of bronze v0's 1,200 labelled rows is empty "
                                             r"\(split.train_fraction=1e-09\); nothing committed"):
        featurize(spark, cfg, force=True)
    assert [table_version(t[s]) for s in tables] == [
        *(rep.versions[s] for s in ("train", "valid", "test")), rep.vocabulary_version, rep.vocab_sizes_version]
    for s in tables:
        assert sorted(p.name for p in Path(t[s]).rglob("*.parquet")) == files[s], s
    # the driver reads a large file's footer to cut it into slices: the same error there
    by_day[held].write_bytes(b"not parquet either")
    with pytest.raises(FeaturizeError, match=f"^bronze file {by_day[held]}"):
        bronze_slices([DeltaSnapshot(t["bronze"]).files({"day": held})[0]], parallelism=2, max_bytes=1024)


def test_kaggle_layout_random_split_hash_and_unlabelled(spark, tmp_path):
    """Kaggle layout: one train.txt.gz + an unlabelled test.txt.gz; seeded 6/7 : 1/14 : 1/14
    split, hashing strategy, unlabelled rows kept in bronze but out of gold."""
    from pipelines.criteo.featurize import featurize
    from pipelines.criteo.generate import generate
    from pipelines.criteo.ingest import ingest

    cfg = _cfg(tmp_path, generate={"layout": "kaggle", "days": 7, "rows_per_day": 1000, "test_rows": 500,
                                   "gzip": True, "seed": 2},
               featurize={"strategy": "hash", "hash_buckets": 1000, "split": {"seed": 9}})
    generate(cfg)
    ing = ingest(spark, cfg)
    assert {f.source: (f.labeled, f.day, f.rows_ok) for f in ing.files} == {
        "train.txt.gz": (True, -1, 7000), "test.txt.gz": (False, -1, 500)}
    rep = featurize(spark, cfg)
    assert rep.split_mode == "random" and rep.unlabeled_rows == 500
    assert rep.total_rows == 7000 and rep.cardinalities == [1000] * 26
    assert abs(rep.rows["train"] / 7000 - 6 / 7) < 0.02
    assert abs(rep.rows["valid"] - rep.rows["test"]) < 120
    sparse = DeltaSnapshot(rep.tables["train"]).to_table(["sparse"]).column("sparse").combine_chunks()
    flat = sparse.values.to_numpy()
    assert flat.min() >= 0 and flat.max() < 1000 and (flat == 0).any()  # 0 = missing
    again = featurize(spark, cfg, force=True)  # deterministic split
    assert again.rows == rep.rows and again.versions == {k: v + 1 for k, v in rep.versions.items()}
    features = json.loads(Path(rep.features_json).read_text())
    assert features["strategy"] == "hash" and features["tables"]["train"]["version"] == again.versions["train"]


def test_featurize_skips_gold_that_is_current(spark, tmp_path, capsys, spark_forbidden):
    """Featurizing the same bronze version with the same featurize settings again writes
    nothing (an Airflow schedule re-runs it daily whether or not a day arrived); a new bronze
    version, another featurize setting, a gold table written since, or ``force`` rebuild."""
    from dataclasses import asdict

    from deltalake import write_deltalake

    from jobs.cli import main
    from pipelines.criteo.featurize import featurize
    from pipelines.criteo.generate import generate
    from pipelines.criteo.ingest import ingest

    settings = {"generate": {"days": 2, "rows_per_day": 300, "seed": 3}, "featurize": {"freq_threshold": 2}}
    cfg = _cfg(tmp_path, **settings)
    generate(cfg)
    ingest(spark, cfg)
    first = featurize(spark, cfg)
    t = _bronze(cfg)
    versions = {name: table_version(t[name]) for name in ("train", "valid", "test", "vocabulary", "vocab_sizes")}

    def same_build(rep) -> bool:
        skip = ("seconds", "up_to_date")
        return {k: v for k, v in asdict(rep).items() if k not in skip} == \
            {k: v for k, v in asdict(first).items() if k not in skip}

    again = featurize(spark, cfg)
    assert not first.up_to_date and again.up_to_date and same_build(again)
    assert {name: table_version(t[name]) for name in versions} == versions
    # settings outside criteo.featurize (training, ingest, the run's name) are not gold's inputs
    other = load_config(data={**cfg.model_dump(mode="json"), "train": {"lr": 0.5}, "run": {"name": "other"}})
    assert featurize(spark, other).up_to_date

    # the CLI answers from the Delta logs and features.json: Spark is not started
    argv = ["featurize", f"lake.root={cfg.lake.root}", f"criteo.raw_dir={cfg.criteo.raw_dir}",
            "criteo.featurize.freq_threshold=2"]
    with spark_forbidden("the up-to-date check"):
        assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"gold is up to date: built from bronze v{first.bronze_version}" in out
    assert f"from bronze v{first.bronze_version}: up to date, nothing written" in out
    assert {name: table_version(t[name]) for name in versions} == versions

    # another featurize setting: rebuilt
    cfg3 = _cfg(tmp_path, **{**settings, "featurize": {"freq_threshold": 3}})
    rebuilt = featurize(spark, cfg3)
    assert not rebuilt.up_to_date and rebuilt.versions == {s: v + 1 for s, v in first.versions.items()}
    assert featurize(spark, cfg3).up_to_date and not featurize(spark, cfg).up_to_date  # and back: rebuilt

    # a gold table written since the build (here a row appended by hand): rebuilt, rows right again
    valid = DeltaSnapshot(t["valid"]).to_table()
    write_deltalake(t["valid"], valid.slice(0, 1), mode="append")
    fixed = featurize(spark, cfg)
    assert not fixed.up_to_date and DeltaSnapshot(t["valid"]).num_rows == first.rows["valid"]

    # a gold table deleted since (by hand, a cleanup): rebuilt, not a TableNotFoundError
    import shutil

    shutil.rmtree(t["test"])
    assert not featurize(spark, cfg).up_to_date and DeltaSnapshot(t["test"]).num_rows == first.rows["test"]
    # one made again by hand up to the version features.json records: not this build's rows
    current = featurize(spark, cfg)
    assert current.up_to_date
    shutil.rmtree(t["valid"])
    for _ in range(current.versions["valid"] + 1):
        write_deltalake(t["valid"], valid.slice(0, 1), mode="append")
    assert table_version(t["valid"]) == current.versions["valid"]
    assert not featurize(spark, cfg).up_to_date and DeltaSnapshot(t["valid"]).num_rows == first.rows["valid"]

    # force: rebuilt with nothing changed
    assert not featurize(spark, cfg, force=True).up_to_date
    # a features.json this code cannot read (damaged, or another layout): rebuilt, not an error
    features = Path(first.features_json)
    doc = json.loads(features.read_text())
    features.write_text(json.dumps({k: v for k, v in doc.items() if k != "split"}))
    assert not featurize(spark, cfg).up_to_date
    features.write_text("{not json")
    assert not featurize(spark, cfg).up_to_date and featurize(spark, cfg).up_to_date

    # a new bronze version (a third day arrives): rebuilt, the new day held out
    lines = (tmp_path / "raw" / "day_1").read_text().splitlines(keepends=True)
    (tmp_path / "raw" / "day_2").write_text("".join(lines[:200]))  # not a copy: ingest skips duplicates
    assert ingest(spark, cfg).ingested == 1
    grown = featurize(spark, cfg)
    assert not grown.up_to_date and grown.bronze_version > first.bronze_version and grown.test_days == [2]
    assert grown.total_rows == 800

    # bronze deleted and ingested again from changed files, reaching the same version number:
    # another table (Delta's table id), so rebuilt
    for name in ("bronze", "quarantine", "ledger"):
        shutil.rmtree(t[name])
    (tmp_path / "raw" / "day_1").write_text("".join(lines[:100]))
    again_cfg = _cfg(tmp_path, **settings, ingest={"files_per_commit": 2})
    assert ingest(spark, again_cfg).bronze_version == grown.bronze_version
    recreated = featurize(spark, cfg)
    assert not recreated.up_to_date and recreated.total_rows == 600
    # a pinned version bronze does not have: named, with the versions it has
    from pipelines.criteo.featurize import FeaturizeError

    with pytest.raises(FeaturizeError, match=r"bronze has no version 99: .* has versions 0\.\.1"):
        featurize(spark, _cfg(tmp_path, **{**settings, "featurize": {"freq_threshold": 2, "bronze_version": 99}}))


def test_lake_compression_sets_every_table_codec_but_gold(spark, tmp_path):
    """``lake.compression`` is the codec of bronze, quarantine, ledger and vocabularies; gold
    keeps ``criteo.featurize.compression``."""
    import pyarrow.parquet as pq

    from pipelines.criteo.featurize import featurize
    from pipelines.criteo.generate import generate
    from pipelines.criteo.ingest import ingest

    cfg = load_config(data={
        "lake": {"root": str(tmp_path / "lake"), "compression": "snappy"}, "spark": {"master": "local[2]"},
        "criteo": {"raw_dir": str(tmp_path / "raw"), "generate": {"days": 2, "rows_per_day": 400, "seed": 4},
                   "featurize": {"freq_threshold": 2}},
    })
    generate(cfg)
    with open(tmp_path / "raw" / "day_0", "a") as f:
        f.write("2\tnot a criteo line\n")  # one quarantined line, so the quarantine has a file
    assert ingest(spark, cfg).rows_rejected == 1
    featurize(spark, cfg)

    def codecs(table: str) -> set[str]:
        files = [p for p in Path(table).rglob("*.parquet") if "_delta_log" not in p.parts]
        assert files, table
        return {pq.ParquetFile(p).metadata.row_group(0).column(0).compression for p in files}

    t = _bronze(cfg)
    for name in ("bronze", "quarantine", "ledger", "vocabulary", "vocab_sizes"):
        assert codecs(t[name]) == {"SNAPPY"}, name
    for split in ("train", "valid", "test"):
        assert codecs(t[split]) == {"LZ4"}, split


def test_reingest_adds_nothing_and_force_replaces(spark, pipeline, capsys, spark_forbidden):
    from jobs.cli import main
    from pipelines.criteo.featurize import bronze_view
    from pipelines.criteo.bronze import current_entries, read_ledger
    from pipelines.criteo.ingest import ingest

    cfg, tmp, paths, ing, feat = pipeline
    t = _bronze(cfg)
    v, qv = table_version(t["bronze"]), table_version(t["quarantine"])
    # the CLI on the same config: everything is in the ledger already, nothing is written and
    # Spark is not started
    with spark_forbidden("ingest with nothing to ingest"):
        rc = main(["ingest", f"lake.root={cfg.lake.root}", f"criteo.raw_dir={cfg.criteo.raw_dir}"])
    out = capsys.readouterr().out
    assert rc == 0 and "0 file(s) ingested, 3 skipped" in out
    assert f"bronze unchanged {t['bronze']}" in out and "vNone" not in out
    assert table_version(t["bronze"]) == v and DeltaSnapshot(t["bronze"]).num_rows == 12_000
    (first,) = {r["ingest_batch"] for r in read_ledger(t["ledger"])}
    forced = ingest(spark, cfg, force=True)
    assert forced.ingested == 3 and {f.status for f in forced.files} == {"replaced"}
    assert {f.note for f in forced.files} == {f"--force: rows of batch {first} replaced"}
    snap = DeltaSnapshot(t["bronze"])
    assert snap.num_rows == 12_000  # replaced, never duplicated
    # no rejects now and none to replace: the quarantine gets no empty commit, and the report
    # names none (until the eighteenth session it gave the version read, as if committed)
    assert forced.quarantine_version is None and table_version(t["quarantine"]) == qv
    assert {r["quarantine_version"] for r in current_entries(read_ledger(t["ledger"])).values()} == {qv}
    batches = set(snap.to_table(["ingest_batch"]).column("ingest_batch").to_pylist())
    assert batches == {forced.batch_id}
    ledger = read_ledger(t["ledger"])
    assert len(ledger) == 6 and {r["ingest_batch"] for r in current_entries(ledger).values()} == {forced.batch_id}
    assert bronze_view(cfg).version == snap.version


def test_featurize_refuses_bronze_rows_the_ledger_does_not_confirm(spark, tmp_path):
    """Rows committed to bronze by a run that died before its ledger entry are not used; a
    plain re-run of ingest replaces them."""
    from pipelines.criteo.featurize import FeaturizeError, bronze_view
    from pipelines.criteo.bronze import BRONZE_DDL, PARTITION_BY
    from pipelines.criteo.ingest import ingest
    from pipelines.lake import read_table, write_table

    raw = tmp_path / "raw"
    raw.mkdir()
    line = "1\t" + "\t".join(["3"] * 13) + "\t" + "\t".join(["0a1b2c3d"] * 26)
    for d in (0, 1):  # not copies (a copy is a duplicate): their labels differ
        (raw / f"day_{d}").write_text("\n".join([f"{d}{line[1:]}"] * 20) + "\n")
    cfg = _cfg(tmp_path)
    ingest(spark, cfg)
    t = _bronze(cfg)
    assert sorted(bronze_view(cfg).sources) == ["day_0", "day_1"]
    orphan = read_table(spark, t["bronze"]).where("source = 'day_1'").drop("ingest_batch", "source")
    orphan = orphan.selectExpr("*", "'b-crashed' AS ingest_batch", "'day_9' AS source").select(
        *[c.split()[0] for c in BRONZE_DDL.split(", ")])
    write_table(orphan, t["bronze"], mode="append", partition_by=PARTITION_BY)
    with pytest.raises(FeaturizeError, match="day_9: 20 bronze rows but no ledger entry"):
        bronze_view(cfg)
    # same row count, another batch (the batch id is column 41: its Delta min/max are only
    # parsed because bronze declares its statistics columns)
    redo = read_table(spark, t["bronze"]).where("source = 'day_0'").drop("ingest_batch")
    redo = redo.selectExpr("*", "'b-other' AS ingest_batch").select(*[c.split()[0] for c in BRONZE_DDL.split(", ")])
    write_table(redo, t["bronze"], mode="overwrite", partition_by=PARTITION_BY,
                replace_where={"source": "day_0"})
    with pytest.raises(FeaturizeError, match=r"day_0: bronze has 20 rows from batch\(es\) \['b-other'\]"):
        bronze_view(cfg)
    # a plain re-run replaces what the ledger does not confirm of its inputs: day_0's file is as
    # the ledger has it, but its rows are another batch's. day_9's file is not among them: its
    # rows are named with the remedy (they were passed over in silence, featurize kept refusing)
    rep = ingest(spark, cfg)
    by = {f.source: f for f in rep.files}
    assert by["day_0"].status == "replaced" and "bronze rows unconfirmed" in by["day_0"].note
    assert by["day_1"].status == "skipped" and "day_9" not in by
    assert rep.unconfirmed == {"day_9": "20 bronze rows but no ledger entry (an interrupted ingest?): ingest its "
                                        "file again (--input), or drop them (--drop-unconfirmed)"}
    with pytest.raises(FeaturizeError, match="--drop-unconfirmed"):
        bronze_view(cfg)
    # day_9's file, the one the crashed run read, turns up: a plain run ingests it, replacing the rows
    (raw / "day_9").write_text("\n".join(["0\t" + "\t".join(["5"] * 13) + line[line.index("\t0a"):]] * 7) + "\n")
    rep = ingest(spark, cfg)
    by = {f.source: f for f in rep.files}
    assert by["day_9"].status == "ingested" and "bronze rows unconfirmed" in by["day_9"].note
    assert rep.unconfirmed == {} and by["day_0"].status == "skipped"
    assert {s: d["rows"] for s, d in bronze_view(cfg).sources.items()} == {"day_0": 20, "day_1": 20, "day_9": 7}
    # an orphan whose file is gone for good: --drop-unconfirmed deletes its rows, nothing else
    gone = read_table(spark, t["bronze"]).where("source = 'day_1'").drop("ingest_batch", "source")
    gone = gone.selectExpr("*", "'b-crashed' AS ingest_batch", "'day_5' AS source").select(
        *[c.split()[0] for c in BRONZE_DDL.split(", ")])
    write_table(gone, t["bronze"], mode="append", partition_by=PARTITION_BY)
    assert list(ingest(spark, cfg).unconfirmed) == ["day_5"]
    rep = ingest(spark, cfg, drop_unconfirmed=True)
    assert rep.dropped == ["day_5"] and rep.unconfirmed == {} and rep.ingested == 0
    assert rep.bronze_version == bronze_view(cfg).version
    assert {s: d["rows"] for s, d in bronze_view(cfg).sources.items()} == {"day_0": 20, "day_1": 20, "day_9": 7}


def test_drop_unconfirmed_drops_a_ledgered_file_whose_rows_were_replaced(spark, tmp_path, capsys):
    """A changed file's re-ingest died before its ledger entry, and the file is gone since: its
    rows replaced the ones the ledger confirms, so --drop-unconfirmed drops the file, bronze and
    quarantine rows and ledger entry, and featurize takes bronze again. Until the eighteenth
    session it passed such a file over (it has a ledger entry), asked for the gone file to be
    ingested again, and featurize refused bronze for good."""
    from jobs.cli import main
    from pipelines.criteo.featurize import bronze_view
    from pipelines.criteo.bronze import current_entries, read_ledger
    from pipelines.criteo.ingest import ingest

    raw = tmp_path / "raw"
    raw.mkdir()
    line = "1\t" + "\t".join(["3"] * 13) + "\t" + "\t".join(["0a1b2c3d"] * 26)
    for d in (0, 1):  # a bad line each, so both have quarantine rows
        (raw / f"day_{d}").write_text("\n".join([f"{d}{line[1:]}"] * 20 + ["2\tbad"]) + "\n")
    cfg = _cfg(tmp_path, ingest={"in_flight_s": 0})  # the crash below was long ago
    ingest(spark, cfg)
    t = _bronze(cfg)
    with open(raw / "day_1", "a") as f:  # changed: ingested again, its rows replaced
        f.write("\n".join([f"1{line[1:]}"] * 5 + ["3\tbad"]) + "\n")
    assert [f.status for f in ingest(spark, cfg).files] == ["skipped", "replaced"]
    (Path(t["ledger"]) / "_delta_log" / f"{1:020d}.json").unlink()  # died before its ledger entry
    (raw / "day_1").unlink()  # and the file is gone since
    conf = [f"lake.root={cfg.lake.root}", f"criteo.raw_dir={cfg.criteo.raw_dir}", "criteo.ingest.in_flight_s=0"]
    assert main(["ingest", *conf]) == 0
    assert "day_1: bronze has 25 rows" in capsys.readouterr().out.replace("\n", "")
    rep = ingest(spark, cfg)
    assert rep.unconfirmed["day_1"].endswith(f"ingest {raw / 'day_1'} again (--input), or drop the file: its rows "
                                             "and its ledger entry (--drop-unconfirmed)")
    assert main(["ingest", *conf, "--drop-unconfirmed"]) == 0
    out = capsys.readouterr().out
    assert "dropped the bronze rows of 1 file(s): day_1" in out
    assert "day_1: the rows its ledger entry confirmed had been replaced by those, so it is dropped" in out
    assert "bronze v2" in out and "quarantine v2" in out and "ledger v1" in out
    view = bronze_view(cfg)  # featurize takes it: day_0 alone, as it was
    assert {s: d["rows"] for s, d in view.sources.items()} == {"day_0": 20} and view.version == 2
    assert set(current_entries(read_ledger(t["ledger"]))) == {"day_0"}
    assert {r["source"] for r in DeltaSnapshot(t["quarantine"]).to_table().to_pylist()} == {"day_0"}
    # the ledger is appended to, not rewritten: bronze v0 is still confirmed by it
    assert {s: d["rows"] for s, d in bronze_view(cfg, 0).sources.items()} == {"day_0": 20, "day_1": 20}
    rep = ingest(spark, cfg)
    assert rep.unconfirmed == {} and rep.dropped == [] and rep.bronze_version is None
    # the file back: ingested as a new one
    (raw / "day_1").write_text(f"1{line[1:]}\n" * 4)
    rep = ingest(spark, cfg)
    assert [(f.source, f.status, f.note) for f in rep.files if f.status != "skipped"] == [("day_1", "ingested", "")]
    assert {s: d["rows"] for s, d in bronze_view(cfg).sources.items()} == {"day_0": 20, "day_1": 4}


def test_rows_an_ingest_is_still_recording_are_neither_dropped_nor_refused(spark, tmp_path, capsys, caplog,
                                                                              monkeypatch):
    """Between its bronze commit and its ledger entry an ingest's rows look like an interrupted
    one's (concurrency probe): a --drop-unconfirmed in that gap deleted them and the running
    ingest still reported success, and a featurize there failed, sending the user to that drop.
    Rows committed less than criteo.ingest.in_flight_s ago are now left alone by the drop,
    featurize builds from the latest version the ledger confirms, and an ingest whose rows were
    dropped anyway says so."""
    import logging

    from jobs.cli import main
    from pipelines.criteo import ingest as ing
    from pipelines.criteo.featurize import FeaturizeError, bronze_view
    from pipelines.criteo.ingest import IngestError, ingest

    raw = tmp_path / "raw"
    raw.mkdir()
    rest = "\t".join(["3"] * 12) + "\t" + "\t".join(["0a1b2c3d"] * 26)

    def rows(label, n):  # distinct rows: the random split's hash sends duplicates one way
        return "".join(f"{label}\t{i}\t{rest}\n" for i in range(n))

    (raw / "day_0").write_text(rows(0, 20))
    cfg = _cfg(tmp_path)
    ingest(spark, cfg)
    t = _bronze(cfg)
    (raw / "day_1").write_text(rows(1, 30))
    assert ingest(spark, cfg).bronze_version == 1
    (Path(t["ledger"]) / "_delta_log" / f"{1:020d}.json").unlink()  # its ledger entry not written yet
    conf = [f"lake.root={cfg.lake.root}", f"criteo.raw_dir={raw}", "--input", str(raw / "day_0")]  # another run
    assert main(["ingest", *conf, "--drop-unconfirmed"]) == 0
    out = capsys.readouterr().out
    assert "rows of 1 file(s) that an ingest committed moments ago" in out and "day_1: batch b" in out
    assert "dropped" not in out and rows_by_source_now(t["bronze"]) == {"day_0": 20, "day_1": 30}
    with caplog.at_level(logging.WARNING):
        view = bronze_view(cfg)
    assert view.version == 0 and set(view.sources) == {"day_0"}
    assert "building from bronze v0, the latest version the ledger confirms (if no ingest is running, it was " \
           "killed: run `bigopt ingest` again, which replaces those rows)" in caplog.text
    # and so does featurize itself, which names the latest version it checks (until the attack
    # probe only --force reached the fallback); gold records v0, so a featurize once the ingest has
    # recorded its rows builds again
    from pipelines.criteo.featurize import featurize

    built = featurize(spark, cfg)
    assert built.bronze_version == 0 and built.total_rows == 20
    # once in_flight_s has passed, they are an interrupted ingest's: refused, and dropped on request
    late = _cfg(tmp_path, ingest={"in_flight_s": 0})
    with pytest.raises(FeaturizeError, match="day_1: 30 bronze rows but no ledger entry"):
        bronze_view(late)
    assert main(["ingest", *conf, "criteo.ingest.in_flight_s=0", "--drop-unconfirmed"]) == 0
    assert "dropped the bronze rows of 1 file(s): day_1" in capsys.readouterr().out
    # a drop that ignores the grace and lands in the gap anyway: the running ingest fails, saying so
    import pipelines.lake.tasks

    real = pipelines.lake.tasks.write_arrow

    def drop_then_write(path, *a, **k):
        if path == t["ledger"]:
            ing._drop_sources(t, ["day_1"], [], "h", "b-other", cfg.lake.compression)
        return real(path, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(pipelines.lake.tasks, "write_arrow", drop_then_write)
        with pytest.raises(IngestError, match="bronze no longer holds the rows of day_1: another process dropped "
                                              "them after this ingest committed them"):
            ingest(spark, cfg, force=True)
    rep = ingest(spark, late)  # the remedy it names: the same ingest again
    assert [(f.source, f.status) for f in rep.files] == [("day_0", "skipped"), ("day_1", "replaced")]
    assert {s: d["rows"] for s, d in bronze_view(late).sources.items()} == {"day_0": 20, "day_1": 30}
    again = featurize(spark, late)  # gold of v0 is not taken for current: day_1 is in
    assert not again.up_to_date and again.total_rows == 50


def test_a_day_re_delivered_under_another_name_is_named_and_its_old_source_dropped(spark, tmp_path, capsys):
    """A corrected day under a versioned name (day_0 -> day_0_v2) and a renamed one (day_1 ->
    day_1.tsv): bronze kept the old sources' rows beside the new ones, nothing said so, and no
    command removed them (found by the incremental-operations probe). Now ingest names the gone
    files with the command that drops them, and `--drop-source` drops them (the renamed copy is
    then ingested without --force)."""
    import shlex

    from jobs.cli import main
    from pipelines.criteo.featurize import bronze_view
    from pipelines.criteo.bronze import current_entries, read_ledger

    raw = tmp_path / "raw"
    raw.mkdir()
    line = "\t".join(["3"] * 13) + "\t" + "\t".join(["0a1b2c3d"] * 26)
    for d in (0, 1):
        (raw / f"day_{d}").write_text("\n".join([f"{d}\t{line}"] * 20 + ["2\tbad"]) + "\n")
    cfg = _cfg(tmp_path)
    conf = [f"lake.root={cfg.lake.root}", f"criteo.raw_dir={cfg.criteo.raw_dir}"]
    assert main(["ingest", *conf]) == 0
    (raw / "day_0").unlink()
    (raw / "day_0_v2").write_text(f"0\t{line}\n" * 15)
    (raw / "day_1").rename(raw / "day_1.tsv")
    capsys.readouterr()
    assert main(["ingest", *conf]) == 0
    out = capsys.readouterr().out
    assert "day_1.tsv" in out and "duplicate" in out  # a content twin of day_1: not ingested
    assert "bronze still holds the rows of 2 file(s) the ledger has that are gone" in out, out
    assert f"day_0 (day 0, 20 rows, was {raw / 'day_0'})" in out and f"day_1 (day 1, 20 rows, was {raw / 'day_1'})" in out
    cmd = out.split("to drop them: ", 1)[1].split("\n", 1)[0]
    assert shlex.split(cmd) == ["bigopt", "ingest", *conf, "--drop-source", "day_0", "--drop-source", "day_1"]
    assert {s: d["rows"] for s, d in bronze_view(cfg).sources.items()} == {"day_0": 20, "day_0_v2": 15, "day_1": 20}
    # a name that is no source, or one of the inputs: one line, nothing dropped or ingested
    before = bronze_view(cfg).version
    assert main(["ingest", *conf, "--drop-source", "day_7", "--drop-source", "day_0_v2"]) == 1
    err = capsys.readouterr().err
    assert ("--drop-source: day_0_v2 is among the inputs (" in err and "bronze and the ledger hold no source named day_7"
            in err and "nothing dropped or ingested" in err), err
    assert bronze_view(cfg).version == before
    # the printed command repeats the run's --input: without it, it ingested criteo.raw_dir
    assert main(["ingest", *conf, "--input", str(raw)]) == 0
    cmd = capsys.readouterr().out.split("to drop them: ", 1)[1].split("\n", 1)[0]
    assert shlex.split(cmd) == ["bigopt", "ingest", *conf, "--input", str(raw), "--drop-source", "day_0",
                                "--drop-source", "day_1"]
    assert main(shlex.split(cmd)[1:]) == 0
    out = capsys.readouterr().out
    assert "dropped the bronze rows of 2 file(s): day_0, day_1" in out and "still holds" not in out
    assert "ingest it again" not in out  # --drop-unconfirmed's text, which told to undo the drop
    assert {s: d["rows"] for s, d in bronze_view(cfg).sources.items()} == {"day_0_v2": 15, "day_1.tsv": 20}
    version = bronze_view(cfg).version
    # a repeated drop (an Airflow retry) has nothing to do: it failed, "no source named day_0"
    assert main(["ingest", *conf, "--drop-source", "day_0"]) == 0
    assert re.search(r"day_0: already dropped, by batch b\S+: nothing to do", capsys.readouterr().out)
    assert bronze_view(cfg).version == version
    assert set(current_entries(read_ledger(_bronze(cfg)["ledger"]))) == {"day_0_v2", "day_1.tsv"}
    assert {r["source"] for r in DeltaSnapshot(_bronze(cfg)["quarantine"]).to_table().to_pylist()} == {"day_1.tsv"}


def test_bad_lines_quarantined_exactly(spark, tmp_path, capsys, spark_forbidden):
    import hashlib
    import re
    from collections import Counter

    from pipelines.criteo.bronze import read_ledger
    from pipelines.criteo.ingest import ingest

    raw = tmp_path / "raw"
    raw.mkdir()
    good = "0\t1\t2\t3\t4\t5\t6\t7\t8\t9\t10\t11\t12\t13\t" + "\t".join(["68fd1e64"] * 26)
    bad = {  # line -> the reason the quarantine must give
        good + "\textra": "too many fields (expected 40, got 41)",
        good.replace("\t5\t", "\tfive\t", 1): "non-integer in I5",
        good.replace("\t5\t", "\t 5\t", 1): "non-integer in I5",
        good.replace("\t5\t", "\t99999999999999999999\t", 1): "integer out of range in I5",
        good.replace("68fd1e64", "zzzz", 1): "C1 not 8 hex chars",
        good.replace("68fd1e64", "68fd1e6g", 1): "C1 not 8 hex chars",
        good.replace("68fd1e64", "[/bold]", 1): "C1 not 8 hex chars",  # printed as is, not as markup
        good.replace("68fd1e64", ":fire:", 1): "C1 not 8 hex chars",  # nor as an emoji
        good.replace("68fd1e64", "\x1b[2J", 1): "C1 not 8 hex chars",  # an escape: shown, not obeyed
        "7" + good[1:]: "label not 0/1",
        "\t" + good[2:]: "label not 0/1",  # a labelled file's line may not start with a TAB
        good.replace("\t68fd1e64", "\t68fd\r1e64", 1): "C1 not 8 hex chars",  # a CR not before the LF
        "": "empty line",
    }
    accepted = [  # odd but valid: padded short rows, '+5', uppercase hex, negative ints, a CR LF end
        "\t".join(good.split("\t")[:38]),
        good + "\r",
        good.replace("\t5\t", "\t+5\t", 1).replace("68fd1e64", "68FD1E64", 1),
        good.replace("\t1\t2\t", "\t1\t-2\t", 1),
    ]
    undecodable = good.encode().replace(b"68fd1e64", b"68fd\xff\xfe64", 1)
    long = good + "\t" + "x" * 5000  # past max_line_preview (4096)
    body = "\n".join([good] * 10 + list(bad) + accepted + [long] + [good] * 5).encode() + b"\n" + undecodable
    (raw / "day_0").write_bytes(body)  # no final newline
    cfg = _cfg(tmp_path)
    rep = ingest(spark, cfg)
    t = _bronze(cfg)
    n_bad = len(bad) + 2
    assert rep.rows_in == 10 + len(bad) + len(accepted) + 1 + 5 + 1
    assert rep.rows_ok == 15 + len(accepted) and rep.rows_rejected == n_bad
    q = DeltaSnapshot(t["quarantine"]).to_table().to_pylist()
    assert len(q) == n_bad and all(r["source"] == "day_0" and r["day"] == 0 for r in q)
    got = {r["line"]: r["reason"] for r in q if r["line_bytes"] is None}
    assert got == bad
    exact = {r["reason"]: r for r in q if r["line_bytes"] is not None}
    assert exact["undecodable bytes (not UTF-8)"]["line_bytes"] == undecodable
    # the whole of a long line is kept (until the thirteenth session only its first 4096 chars)
    lg = exact["too many fields (expected 40, got 41)"]
    assert lg["line"] == long[:4096] and lg["line_bytes"] == long.encode()
    from pipelines.criteo.quarantine import quarantined_lines

    assert sorted(quarantined_lines(cfg, reason="undecodable")) == [undecodable]
    rows = DeltaSnapshot(t["bronze"]).to_table().to_pylist()
    assert sum(r["I5"] == 5 and r["C1"] == "68FD1E64" for r in rows) == 1
    assert sum(r["I2"] == -2 for r in rows) == 1
    padded = [r for r in rows if r["C25"] is None]
    assert len(padded) == 1 and padded[0]["C24"] == "68fd1e64" and padded[0]["C26"] is None
    (led,) = read_ledger(t["ledger"])
    assert (led["lines"], led["rows_ok"], led["rows_rejected"]) == (rep.rows_in, rep.rows_ok, rep.rows_rejected)
    assert led["sha256"] == hashlib.sha256(body).hexdigest() and led["size"] == len(body)
    want = Counter(bad.values()) + Counter({"undecodable bytes (not UTF-8)": 1, "too many fields (expected 40, got 41)": 1})
    assert rep.reasons == dict(want.most_common()) == rep.files[0].reasons

    # the commands: ingest (again, --force) names the reasons and how to see the lines;
    # `bigopt quarantine` shows them, by file and reason, without Spark
    from jobs.cli import main

    conf = [f"lake.root={cfg.lake.root}", f"criteo.raw_dir={cfg.criteo.raw_dir}"]
    capsys.readouterr()
    assert main(["ingest", *conf, "--force"]) == 0
    out = capsys.readouterr().out
    (batch,) = re.findall(r"bigopt quarantine " + re.escape(" ".join(conf)) + r" --batch (\S+)", out)
    (said,) = [ln for ln in out.splitlines() if ln.startswith("rejected: ")]
    assert sorted(said.removeprefix("rejected: ").split("; ")) == sorted(f"{n} {r}" for r, n in want.items())
    with spark_forbidden("bigopt quarantine"):
        assert main(["quarantine", *conf, "--batch", batch]) == 0
        out = capsys.readouterr().out
        assert f"quarantine v1: {n_bad} line(s) where batch {batch!r}" in out
        assert all(reason in out for reason in want) and "0⇥1⇥2⇥3⇥4⇥five⇥6" in out
        assert main(["quarantine", *conf, "--reason", "hex", "--limit", "10"]) == 0
        out = capsys.readouterr().out
        assert "13⇥[/bold]⇥68fd1e64" in out and "13⇥:fire:⇥68fd1e64" in out  # data, not markup or emoji
        assert "13⇥␛[2J⇥68fd1e64" in out and "\x1b[2J" not in out and "🔥" not in out
        assert main(["quarantine", *conf, "--limit", "2"]) == 0  # more kinds than lines to show
        assert f"2 of them, one of each of the first 2 of {len(want)} kinds (--limit for more)" in (
            capsys.readouterr().out)
        assert main(["quarantine", *conf, "--source", "day_0", "--reason", "zzz", "--raw"]) == 0
        assert "no line of 'day_0' where --reason 'zzz'" in capsys.readouterr().err  # day_0 has lines
        assert main(["quarantine", *conf, "--reason", "HEX", "--raw"]) == 0
        hex_lines = [ln for ln, r in bad.items() if "hex" in r]
        assert sorted(capsys.readouterr().out.split("\n")[:-1]) == sorted(hex_lines)  # one has a CR in it
        assert main(["quarantine", *conf, "--source", "day_0", "--raw", "--limit", "3"]) == 0
        assert len(capsys.readouterr().out.splitlines()) == 3
        assert main(["quarantine", *conf, "--reason", "too many", "--raw"]) == 0
        assert sorted(capsys.readouterr().out.split("\n")[:-1]) == sorted([good + "\textra", long])
        assert main(["quarantine", *conf, "--source", "day_0.gz", "--raw"]) == 0
        raw_out = capsys.readouterr()
        assert raw_out.out == "" and "no line of 'day_0.gz'; files with quarantined lines: day_0" in raw_out.err
        assert main(["quarantine", *conf, "--batch", rep.batch_id]) == 0  # replaced by --force: none left
        out = " ".join(capsys.readouterr().out.split())
        assert "0 line(s)" in out and f"day_0: ingested again in batch {batch} (" in out
        assert f"whose rows replaced this batch's: {n_bad:,} line(s) quarantined there" in out
        assert main(["quarantine", *conf, "--source", "day_0.gz"]) == 0  # no such file: the names there are
        assert "files with quarantined lines: day_0" in capsys.readouterr().out
    # `--raw | head`: a reader that stops early is no error worth a traceback
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "jobs.cli", "quarantine", *conf, "--raw"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()  # before it writes a byte
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 1 and "Traceback" not in err and "BrokenPipe" not in err, err
    # the file fixed: a changed file is ingested again without --force, replacing its rows,
    # and its rejects leave the quarantine with it
    (raw / "day_0").write_text("\n".join([good] * 3) + "\n")
    fixed = ingest(spark, cfg)
    assert (fixed.rows_ok, fixed.rows_rejected, fixed.quarantine_version) == (3, 0, 2)
    assert [(f.status, f.note) for f in fixed.files] == [("replaced", f"size changed since batch {batch}")]
    assert DeltaSnapshot(t["bronze"]).num_rows == 3
    assert DeltaSnapshot(t["quarantine"]).num_rows == 0


def test_windows_saved_files_ingest_like_the_originals(spark, criteo_shared, tmp_path):
    """Real samples saved the way some Windows tools save text (a UTF-8 byte order mark, CR LF
    line ends, the last line without its LF; one gzip'd), a bad line added, give the
    originals' rows and rejects, with plain files' byte ranges cut anywhere."""
    from pipelines.criteo.ingest import ingest

    bad = "1\t" + "\t".join(["3"] * 13) + "\tnot-hex"
    src = {"day_0": criteo_shared / "kaggle_dac_train_head1000_trailing_tabs_stripped.txt",
           "test_day_1.gz": criteo_shared / "kaggle_dac_test_head100.txt"}
    out = {}
    for ends in ("lf", "crlf"):
        raw = tmp_path / ends / "raw"
        raw.mkdir(parents=True)
        for name, p in src.items():
            lines = p.read_text().splitlines() + ([bad] if name == "day_0" else [])
            if ends == "lf":
                data = ("\n".join(lines) + "\n").encode()
            else:
                data = b"\xef\xbb\xbf" + ("\r\n".join(lines) + "\r").encode()
            (raw / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
        cfg = _cfg(tmp_path / ends, ingest={"chunk_bytes": 1 << 16, "unlabeled_globs": ["test_*"]},
                   inputs=[str(raw / n) for n in src])
        rep = ingest(spark, cfg)
        t = _bronze(cfg)
        rows = DeltaSnapshot(t["bronze"]).to_table().drop(["ingest_batch"]).to_pylist()
        q = DeltaSnapshot(t["quarantine"]).to_table().to_pylist()
        out[ends] = (rep.rows_in, rep.rows_ok, sorted(rows, key=lambda r: json.dumps(r, sort_keys=True)),
                     [(r["source"], r["line"], r["reason"]) for r in q])
    assert out["crlf"] == out["lf"]
    assert out["lf"][:2] == (1101, 1100) and out["lf"][3] == [("day_0", bad, "C1 not 8 hex chars")]
    assert sum(r["label"] is None for r in out["crlf"][2]) == 100


def test_a_file_whose_lines_are_mostly_bad_is_not_ingested_and_says_why(spark, tmp_path, capsys):
    """A file more than criteo.ingest.max_rejected_share (0.5) of whose lines are bad is not in
    Criteo's raw format: it fails alone, named with its counts, main reason, first bad line and
    the fix, nothing of it committed (no rows, no quarantine rows, no ledger entry), exit 1;
    the run's other files are ingested, and a file with a few bad lines is as before. Until the
    twenty-seventh session a file with a TAB ending every line, CR line ends, UTF-16 without a
    byte order mark or 0.0/1.0 labels was "ingested" with every line quarantined, exit 0, and
    every later run skipped it as already ingested (the ingest probe)."""
    from jobs.cli import main
    from pipelines.criteo.bronze import read_ledger
    from pipelines.criteo.ingest import CorruptInputError, ingest

    raw = tmp_path / "raw"
    raw.mkdir()
    rows = [f"{i % 2}\t{i}\t" + "\t".join(["3"] * 12) + "\t" + "\t".join([f"{i:08x}"] * 26) for i in range(300)]
    (raw / "day_0").write_text("\n".join(rows) + "\n")
    other = [r.replace("\t3\t", "\t4\t", 1) for r in rows]  # day_1's rows, not a copy of day_0's
    (raw / "day_1").write_text("\n".join(r + "\t" for r in other) + "\n")  # a TAB ending every line
    (raw / "day_2").write_text("\r".join(rows) + "\r")  # CR line ends
    (raw / "day_3").write_bytes(("\n".join(rows) + "\n").encode("utf-16-le"))  # UTF-16, no byte order mark
    (raw / "day_4").write_text("\n".join("1.0" + r[1:] if r[0] == "1" else "0.0" + r[1:] for r in rows) + "\n")
    few = rows[:150] + ["1\tx"] * 149  # 149 of 299 bad: under the share, quarantined as always
    (raw / "day_5").write_text("\n".join(few) + "\n")
    cfg = _cfg(tmp_path, ingest={"files_per_commit": 3})
    with pytest.raises(CorruptInputError) as e:
        ingest(spark, cfg)
    why = {Path(p).name: w for p, w in e.value.problems}
    assert sorted(why) == ["day_1", "day_2", "day_3", "day_4"]
    assert why["day_1"].startswith("300 of its 300 lines are bad (more than criteo.ingest.max_rejected_share=0.5): "
                                   "300 too many fields (expected 40, got 41); the first: '0\\t0\\t4")
    assert "one field too many on most lines: does each end with a TAB? sed 's/\\t$//' FILE > FIXED" in why["day_1"]
    assert why["day_2"].startswith("1 of its 1 lines are bad") and "tr '\\r' '\\n'" in why["day_2"]
    assert "iconv -f UTF-16LE -t UTF-8" in why["day_3"]
    assert "300 label not 0/1" in why["day_4"] and "labels written as 0.0/1.0" in why["day_4"]
    # a failed file's counts are shown (the attack probe: they were 0 0 0), nothing of it committed
    # (UTF-16: the NUL after the last newline is one more line)
    assert {f.source: (f.status, f.lines, f.rows_ok, f.rows_rejected) for f in e.value.report.files} == {
        "day_0": ("ingested", 300, 300, 0), "day_1": ("failed", 300, 0, 300), "day_2": ("failed", 1, 0, 1),
        "day_3": ("failed", 301, 0, 301), "day_4": ("failed", 300, 0, 300), "day_5": ("ingested", 299, 150, 149)}
    assert e.value.report.rows_in == 599
    t = _bronze(cfg)
    assert rows_by_source_now(t["bronze"]) == {"day_0": 300, "day_5": 150}
    assert rows_by_source_now(t["quarantine"]) == {"day_5": 149}
    assert {r["source"] for r in read_ledger(t["ledger"])} == {"day_0", "day_5"}
    on_disk = {p.relative_to(t["bronze"]).parts[1] for p in Path(t["bronze"]).rglob("*.parquet")}
    assert on_disk == {"source=day_0", "source=day_5"}

    # the next run tries them again (no ledger entry), exit 1; fixed, day_1 is ingested
    conf = [f"lake.root={cfg.lake.root}", f"criteo.raw_dir={cfg.criteo.raw_dir}"]
    capsys.readouterr()
    assert main(["ingest", *conf]) == 1
    out = capsys.readouterr()
    assert "0 file(s) ingested, 2 skipped, 4 failed" in out.out, out.out
    (raw / "day_1").write_text("\n".join(other) + "\n")
    for d in ("day_2", "day_3", "day_4"):
        (raw / d).unlink()
    assert main(["ingest", *conf]) == 0
    assert rows_by_source_now(t["bronze"]) == {"day_0": 300, "day_1": 300, "day_5": 150}
    # 1: the share is off, every line of such a file quarantined as before; a later run skips it
    # with a warning and the remedy (as it does a file the code before the share "ingested")
    (raw / "day_6").write_text("\n".join(r + "\t" for r in rows) + "\n")
    assert main(["ingest", *conf, "criteo.ingest.max_rejected_share=1"]) == 0
    assert rows_by_source_now(t["quarantine"]) == {"day_5": 149, "day_6": 300}
    capsys.readouterr()
    assert main(["ingest", *conf]) == 0
    out = capsys.readouterr().out
    assert ("already ingested in batch" in out and "with every one of its 300 lines quarantined" in out
            and "ingest it again with --force" in out), out
    # empty lines hold no row to lose: a double-spaced file, and a file of one newline, go in
    (raw / "day_7").write_text("\n\n\n".join(other) + "\n")
    (raw / "day_8").write_text("\n")
    assert main(["ingest", *conf]) == 0
    assert rows_by_source_now(t["bronze"])["day_7"] == 300 and rows_by_source_now(t["quarantine"])["day_7"] == 598
    shutil.rmtree(raw)


def test_a_mostly_bad_file_alone_in_its_group_shows_its_counts(spark, tmp_path):
    """A mostly-bad file in a group of its own (files_per_commit=1) shows its counts as one in
    a group with good files does (the review: it showed 0 0 0 there)."""
    from pipelines.criteo.ingest import CorruptInputError, ingest

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "day_0").write_text("1\tbad\n" * 4 + "1\t2\n")
    with pytest.raises(CorruptInputError) as e:
        ingest(spark, _cfg(tmp_path, ingest={"files_per_commit": 1}))
    (f,) = e.value.report.files
    assert (f.status, f.lines, f.rows_ok, f.rows_rejected) == ("failed", 5, 1, 4)


def test_control_characters_in_file_names_are_shown_not_obeyed(spark, tmp_path, capsys, spark_forbidden):
    """A file name holding an escape sequence or a newline is printed with its control
    characters as pictures by `bigopt ingest` and `bigopt quarantine`, as quarantined lines
    already were. Until the twenty-seventh session the escape recoloured the terminal and the
    newline split the file's table row in two (the ingest probe)."""
    from jobs.cli import main

    raw = tmp_path / "raw"
    raw.mkdir()
    good = "0\t1\t2\t3\t4\t5\t6\t7\t8\t9\t10\t11\t12\t13\t" + "\t".join(["68fd1e64"] * 26)
    for i, name in enumerate(("day_7\x1b[31mred", "day_8\nevil")):
        (raw / name).write_text("\n".join([good.replace("\t1\t", f"\t{i}\t", 1)] * 5 + ["1\tbad"]) + "\n")
    conf = [f"lake.root={tmp_path / 'lake'}", f"criteo.raw_dir={raw}"]
    capsys.readouterr()
    assert main(["ingest", *conf]) == 0
    out = capsys.readouterr().out
    assert "day_7␛[31mred" in out and "day_8␊evil" in out and "\x1b" not in out, out
    with spark_forbidden("bigopt quarantine"):
        assert main(["quarantine", *conf]) == 0
    out = capsys.readouterr().out
    assert "day_7␛[31mred" in out and "day_8␊evil" in out and "\x1b" not in out and "\nevil" not in out, out
    # and in the error line of a file that fails (it said "day_9bad", a name that is not there)
    (raw / "day_9\x1b[31mbad").write_text("1\tbad\n" * 3)
    assert main(["ingest", *conf]) == 1
    err = capsys.readouterr().err
    assert "day_9␛[31mbad: 3 of its 3 lines are bad" in err and "\x1b[31mbad" not in err, err


def test_corrupt_gzip_fails_clearly_and_commits_nothing_for_it(spark, tmp_path, capsys):
    """A damaged gzip is named with its reason and nothing of it is committed (no rows, no
    ledger entry, an earlier batch's rows of it kept); the run's readable files are ingested.
    Until the twelfth session the whole group failed and the message said "nothing was
    committed" although groups before it had been."""
    from jobs.cli import main
    from pipelines.criteo.bronze import read_ledger
    from pipelines.criteo.ingest import CorruptInputError, ingest

    raw = tmp_path / "raw"
    raw.mkdir()
    line = "1\t" + "\t".join(["3"] * 13) + "\t" + "\t".join(["0a1b2c3d"] * 26)
    whole = gzip.compress(("\n".join([line] * 2000) + "\n").encode())
    (raw / "day_0.gz").write_bytes(whole)
    (raw / "day_1.gz").write_bytes(whole[: len(whole) // 2])  # truncated
    (raw / "day_2.gz").write_bytes(whole[:1000] + bytes(400) + whole[1400:])  # damaged inside
    (raw / "day_3.gz").write_bytes(gzip.compress(("\n".join([line] * 30) + "\n").encode()))
    cfg = _cfg(tmp_path, ingest={"files_per_commit": 2})
    with pytest.raises(CorruptInputError, match="day_1.gz") as e:
        ingest(spark, cfg)
    # every bad file of the run is named at once, each with its reason; the good ones are not
    assert [(Path(p).name, why.split(":")[0]) for p, why in e.value.problems] == [
        ("day_1.gz", "truncated gzip"), ("day_2.gz", "inflate error")]
    assert "nothing was committed for them; the run's 2 other file(s) were ingested" in str(e.value)
    assert {f.source: f.status for f in e.value.report.files} == {
        "day_0.gz": "ingested", "day_1.gz": "failed", "day_2.gz": "failed", "day_3.gz": "ingested"}
    t = _bronze(cfg)
    assert rows_by_source_now(t["bronze"]) == {"day_0.gz": 2000, "day_3.gz": 30}
    assert {r["source"] for r in read_ledger(t["ledger"])} == {"day_0.gz", "day_3.gz"}
    # no file of the bad ones was left behind in the table's folders
    on_disk = {p.relative_to(t["bronze"]).parts[1] for p in Path(t["bronze"]).rglob("*.parquet")}
    assert on_disk == {"source=day_0.gz", "source=day_3.gz"}

    # day_3 damaged after it was ingested: its rows stay, nothing of the damaged copy lands
    (raw / "day_3.gz").write_bytes(whole[: len(whole) // 3])
    conf = [f"lake.root={cfg.lake.root}", f"criteo.raw_dir={cfg.criteo.raw_dir}"]
    capsys.readouterr()
    assert main(["ingest", *conf]) == 1
    out = capsys.readouterr()  # the table on stdout, the error line on stderr
    assert "0 file(s) ingested, 1 skipped, 3 failed" in out.out
    assert out.err.startswith("bigopt ingest: ") and "cannot be ingested, nothing was committed:" in out.err
    assert rows_by_source_now(t["bronze"]) == {"day_0.gz": 2000, "day_3.gz": 30}
    shutil.rmtree(raw)


def test_sigterm_during_ingest_leaves_no_file_and_a_rerun_ingests_all(spark, tmp_path):
    """SIGTERM (how Airflow stops a task) while the Spark tasks write bronze: exit 143 with one
    line, no Parquet file of the write left in the lake, nothing committed; a re-run ingests
    every line. Until the eighteenth session the driver died at once (its Parquet files stayed,
    for a vacuum to find) and Ctrl-C printed py4j's tracebacks."""
    import signal
    import subprocess
    import sys
    import time

    from pipelines.criteo.ingest import ingest

    repo = Path(__file__).resolve().parents[2]
    raw = tmp_path / "raw"
    raw.mkdir()
    for day in (0, 1):  # not copies of each other (a copy is skipped as a duplicate)
        line = f"{day}\t" + "\t".join(["3"] * 13) + "\t" + "\t".join(["0a1b2c3d"] * 26) + "\n"
        (raw / f"day_{day}").write_text(line * 200_000)
    lake = tmp_path / "lake"
    conf = [f"lake.root={lake}", f"criteo.raw_dir={raw}", "spark.master=local[2]", "criteo.ingest.chunk_bytes=2097152"]
    env = {**os.environ, "PYTHONPATH": str(repo), "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "ingest", *conf], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not any(lake.rglob("*.parquet")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, out + err
    # no traceback of the driver (py4j's, ours); Spark's log may show its cancelled tasks' errors
    assert "bigopt ingest: stopped by SIGTERM" in err and "KeyboardInterrupt" not in out + err, out + err
    assert not re.search(r"^\s*Traceback \(most recent call last\)", out + err, re.M), out + err
    assert not list(lake.rglob("*.parquet")) and not list(lake.rglob("_delta_log/*.json"))
    rep = ingest(spark, _cfg(tmp_path))
    assert rows_by_source_now(_bronze(_cfg(tmp_path))["bronze"]) == {"day_0": 200_000, "day_1": 200_000}, rep.summary()


def test_a_stop_between_the_jobs_and_the_commits_leaves_no_file(spark, tmp_path, monkeypatch):
    """Ctrl-C / SIGTERM after the Spark jobs wrote their files but before the driver committed
    them: ingest and featurize delete every file of the uncommitted writes; a stop just after
    the commits landed deletes nothing the log names. Until the nineteenth session only the
    jobs themselves were guarded, and a stop between a job's end and its commit left the job's
    Parquet files in the lake (for a vacuum to find)."""
    from pipelines.criteo.featurize import featurize
    from pipelines.criteo.generate import generate
    from pipelines.criteo.ingest import ingest
    from pipelines.lake import tasks

    cfg = _cfg(tmp_path, generate={"days": 2, "rows_per_day": 300, "seed": 3})
    generate(cfg)
    t = _bronze(cfg)
    real_commit_writes = tasks.commit_writes

    def stopped_before(writes):
        raise KeyboardInterrupt

    def stopped_after(writes):
        real_commit_writes(writes)
        raise KeyboardInterrupt

    monkeypatch.setattr(tasks, "commit_writes", stopped_before)
    with pytest.raises(KeyboardInterrupt):
        ingest(spark, cfg)
    assert not list((tmp_path / "lake").rglob("*.parquet")), "uncommitted bronze/quarantine files left"
    monkeypatch.setattr(tasks, "commit_writes", real_commit_writes)
    ingest(spark, cfg)
    assert rows_by_source_now(t["bronze"]) == {"day_0": 300, "day_1": 300}
    gold = ("train", "valid", "test", "vocabulary", "vocab_sizes")
    monkeypatch.setattr(tasks, "commit_writes", stopped_before)
    with pytest.raises(KeyboardInterrupt):
        featurize(spark, cfg)
    assert not any(Path(t[s]).exists() and list(Path(t[s]).rglob("*.parquet")) for s in gold)
    assert not any(table_exists(t[s]) for s in gold)
    monkeypatch.setattr(tasks, "commit_writes", stopped_after)
    with pytest.raises(KeyboardInterrupt):
        featurize(spark, cfg)
    for s in gold:  # committed: every file the log names is there, and nothing else
        snap = DeltaSnapshot(t[s])
        on_disk = {p.resolve() for p in Path(t[s]).rglob("*.parquet")}
        assert {Path(f.uri.removeprefix("file://")).resolve() for f in snap.files()} == on_disk, s
    assert sum(DeltaSnapshot(t[s]).to_table().num_rows for s in ("train", "valid", "test")) == 600


def test_a_stop_signal_between_two_gold_commits_waits_for_features_json(spark, tmp_path, monkeypatch):
    """SIGINT while featurize commits its five tables, one transaction each: the signal is held
    until the last commit and features.json are written, then acted on. Until the twenty-first
    session a stop after the second commit left gold train on the new build and valid / test
    on the old one, which training refuses until featurize runs again."""
    import json
    import os
    import signal

    from pipelines.criteo.featurize import BUILD_KEY, featurize
    from pipelines.criteo.generate import generate
    from pipelines.criteo.ingest import ingest
    from pipelines.lake import tasks

    cfg = _cfg(tmp_path, generate={"days": 2, "rows_per_day": 300, "seed": 4})
    generate(cfg)
    ingest(spark, cfg)
    first = featurize(spark, cfg)
    t = _bronze(cfg)
    real_commit_write = tasks.commit_write
    calls = []

    def commit_then_stop(tw, adds, info=None, *a, **kw):
        v = real_commit_write(tw, adds, info, *a, **kw)
        calls.append(info.get("table") if info else None)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return v

    monkeypatch.setattr(tasks, "commit_write", commit_then_stop)
    with pytest.raises(KeyboardInterrupt):
        featurize(spark, cfg, force=True)
    assert len(calls) == 5, calls  # every table committed before the stop was acted on
    builds = {s: DeltaSnapshot(t[s]).table.history(1)[0].get(BUILD_KEY)
              for s in ("train", "valid", "test", "vocabulary", "vocab_sizes")}
    assert len(set(builds.values())) == 1 and first.build not in builds.values(), builds
    assert json.loads(Path(t["features_json"]).read_text())["build"] == builds["train"]


def test_bigopt_run_drops_the_rows_of_days_a_new_generate_no_longer_makes(spark, tmp_path):
    """``criteo.generate.days`` 3 -> 2 on a reused lake: the generator removes ``day_2``, and its
    rows, ingested before, leave bronze, the quarantine and the ledger too. Until the
    twenty-first session featurize still took them (the test split was the removed day)."""
    from jobs.run import generate_replacing
    from pipelines.criteo.bronze import current_entries, read_ledger
    from pipelines.criteo.ingest import ingest

    three = _cfg(tmp_path, generate={"days": 3, "rows_per_day": 200, "seed": 5})
    files, stale = generate_replacing(three)
    assert len(files) == 3 and stale == []
    ingest(spark, three)
    t = _bronze(three)
    assert set(rows_by_source_now(t["bronze"])) == {"day_0", "day_1", "day_2"}
    two = _cfg(tmp_path, generate={"days": 2, "rows_per_day": 200, "seed": 5})
    files, stale = generate_replacing(two)
    assert stale == ["day_2"] and not (tmp_path / "raw" / "day_2").exists()
    rep = ingest(spark, two, drop_sources=stale)
    assert rep.dropped == ["day_2"] and rep.forgotten == []  # forgotten: --drop-unconfirmed's only
    assert rows_by_source_now(t["bronze"]) == {"day_0": 200, "day_1": 200}
    assert set(current_entries(read_ledger(t["ledger"]))) == {"day_0", "day_1"}
    again = ingest(spark, two, drop_sources=stale)  # nothing left to drop: no commit
    assert again.dropped == [] and table_version(t["bronze"]) == rep.bronze_version


def rows_by_source_now(path: str) -> dict[str, int]:
    from pipelines.criteo.bronze import rows_by_source

    return rows_by_source(path, table_version(path))


def test_a_file_removed_after_listing_fails_alone(spark, tmp_path, monkeypatch):
    """A file that vanishes between the listing and its task is a file that cannot be read,
    named with the reason; the run's other files land. Until the fifteenth session the task's
    FileNotFoundError failed the whole job (~190 lines of PythonException)."""
    from pipelines.criteo import ingest as ing

    raw = tmp_path / "raw"
    raw.mkdir()
    line = "1\t" + "\t".join(["3"] * 13) + "\t" + "\t".join(["0a1b2c3d"] * 26)
    for d in range(3):
        (raw / f"day_{d}").write_text("\n".join([line] * (40 + d)) + "\n")
    (raw / "day_3.gz").write_bytes(gzip.compress(("\n".join([line] * 43) + "\n").encode()))
    original = ing._commit_group

    def vanish(spark_, group, *a, **k):
        for f in group:
            if f.source in ("day_1", "day_3.gz"):
                os.remove(f.path)
        return original(spark_, group, *a, **k)

    monkeypatch.setattr(ing, "_commit_group", vanish)
    cfg = _cfg(tmp_path)
    with pytest.raises(ing.CorruptInputError) as e:
        ing.ingest(spark, cfg)
    problems = {Path(p).name: why for p, why in e.value.problems}
    assert set(problems) == {"day_1", "day_3.gz"}
    assert all(why.startswith("could not be read since it was listed (FileNotFoundError") for why in problems.values())
    assert rows_by_source_now(_bronze(cfg)["bronze"]) == {"day_0": 40, "day_2": 42}


def test_files_in_formats_ingest_does_not_read_fail_up_front(tmp_path):
    """A raw file stored as zstd, bzip2, xz or a zip archive (or a zstd file named .gz) fails
    before anything runs, each named with its format and the fix; nothing is committed. Until
    the eleventh session such files were 'ingested': every line quarantined as undecodable
    bytes, and the ledger then skipped them."""
    import bz2
    import lzma
    import zipfile

    from pipelines.criteo.ingest import CorruptInputError, ingest

    raw = tmp_path / "raw"
    raw.mkdir()
    text = ("1\t" + "\t".join(["3"] * 13) + "\t" + "\t".join(["0a1b2c3d"] * 26) + "\n").encode() * 50
    zst = pa.compress(text, codec="zstd", asbytes=True)
    (raw / "day_0.zst").write_bytes(zst)
    (raw / "day_1.bz2").write_bytes(bz2.compress(text))
    (raw / "day_2.xz").write_bytes(lzma.compress(text))
    with zipfile.ZipFile(raw / "day_3.zip", "w") as z:
        z.writestr("day_3", text)
    (raw / "day_4.gz").write_bytes(zst)
    (raw / "day_5").write_bytes(text)  # fine
    # inside a gzip (a download's double Content-Encoding): until the fifteenth session only
    # the stored bytes were looked at, and day_6 went in as one garbage row, ledgered
    (raw / "day_6.gz").write_bytes(gzip.compress(gzip.compress(text)))
    (raw / "day_7.gz").write_bytes(gzip.compress(zst))
    cfg = _cfg(tmp_path, ingest={"file_globs": ["day_*"]})
    with pytest.raises(CorruptInputError) as e:
        ingest(lambda: pytest.fail("ingest started Spark for files it cannot read"), cfg)
    got = {Path(p).name: why.split(",")[0] for p, why in e.value.problems}
    assert got == {"day_0.zst": "zstd-compressed", "day_1.bz2": "bzip2-compressed", "day_2.xz": "xz-compressed",
                   "day_3.zip": "a zip archive", "day_4.gz": "zstd-compressed", "day_6.gz": "gzip-compressed twice",
                   "day_7.gz": "zstd-compressed"}
    assert "zstd-compressed, then gzip'd, not lines of text" in dict(e.value.problems)[str(raw / "day_7.gz")]
    assert "recompress it with gzip" in str(e.value) and "cannot be ingested, nothing was committed" in str(e.value)
    assert not table_exists(_bronze(cfg)["bronze"]) and not table_exists(_bronze(cfg)["ledger"])


def test_text_in_utf16_or_utf32_fails_up_front(tmp_path):
    """A raw file saved as UTF-16 or UTF-32 (Windows tools' "Unicode"; known by its byte order
    mark, gzip'd too) fails before anything runs, named, with the fix; a UTF-8 mark is no
    problem. Until the eighteenth session such a file was ingested as lines of undecodable
    bytes, every one quarantined, and the ledger then skipped it."""
    from pipelines.criteo.ingest import CorruptInputError, ingest

    raw = tmp_path / "raw"
    raw.mkdir()
    text = ("1\t" + "\t".join(["3"] * 13) + "\t" + "\t".join(["0a1b2c3d"] * 26) + "\n") * 20
    (raw / "day_0").write_bytes(text.encode("utf-16"))  # the mark in native (little-endian) order
    (raw / "day_1").write_bytes(b"\xfe\xff" + text.encode("utf-16-be"))
    (raw / "day_2").write_bytes(text.encode("utf-32"))
    (raw / "day_3").write_bytes(b"\x00\x00\xfe\xff" + text.encode("utf-32-be"))
    (raw / "day_4.gz").write_bytes(gzip.compress(text.encode("utf-16")))
    (raw / "day_5").write_bytes(text.encode("utf-8-sig"))  # fine
    cfg = _cfg(tmp_path)
    with pytest.raises(CorruptInputError) as e:
        ingest(lambda: pytest.fail("ingest started Spark for files it cannot read"), cfg)
    got = {Path(p).name: why for p, why in e.value.problems}
    assert sorted(got) == ["day_0", "day_1", "day_2", "day_3", "day_4.gz"]
    assert got["day_0"] == got["day_1"] == ("UTF-16 text (by its byte order mark): ingest reads UTF-8; convert it to "
                                            "UTF-8 (iconv -f UTF-16 -t UTF-8)")
    assert got["day_2"] == got["day_3"] and got["day_2"].startswith("UTF-32 text (by its byte order mark)")
    assert got["day_4.gz"].startswith("UTF-16 text, then gzip'd (by its byte order mark)")
    assert not table_exists(_bronze(cfg)["bronze"]) and not table_exists(_bronze(cfg)["ledger"])


def test_names_without_a_usable_day_or_partition_fail_up_front(tmp_path):
    """A day number past bronze's int `day`, a day_regex group that is no number, a name too
    long for its `source` partition folder: each file is named before Spark, nothing committed.
    Until the fifteenth session day_2147483648 was committed, and every later read of bronze
    failed to parse its partition value; a long CJK name failed the job with ENAMETOOLONG."""
    from pipelines.criteo.ingest import CorruptInputError, ingest

    raw = tmp_path / "raw"
    raw.mkdir()
    text = ("1\t" + "\t".join(["3"] * 13) + "\t" + "\t".join(["0a1b2c3d"] * 26) + "\n") * 3
    long_name = "day_1_" + "点击日志数据第一天的样本文件用于训练模型测试点击率预估任务数据"  # 99 bytes, 291 escaped
    for name in ("day_2147483647", "day_2147483648", "day_99999999999", long_name, "holiday_x"):
        (raw / name).write_text(text)
    with pytest.raises(CorruptInputError) as e:
        ingest(lambda: pytest.fail("ingest started Spark for files it cannot read"), _cfg(tmp_path))
    got = {Path(p).name: why for p, why in e.value.problems}
    assert set(got) == {"day_2147483648", "day_99999999999", long_name}
    assert got["day_2147483648"] == "its day number 2147483648 is past bronze's `day` column (at most 2,147,483,647): rename it"
    assert got[long_name].startswith("its name is too long for bronze's `source` partition folder (")
    cfg = _cfg(tmp_path, ingest={"day_regex": r"(day)_\d+"})
    with pytest.raises(CorruptInputError, match=r"criteo.ingest.day_regex '\(day\)_\\\\d\+' takes 'day' from its name"):
        ingest(lambda: pytest.fail("started Spark"), cfg, inputs=[str(raw / "day_2147483647")])
    for bad, why in ((r"day_\d+", "needs a group around the day's digits"), ("day_(", "not a regular expression")):
        with pytest.raises(Exception, match=why):
            _cfg(tmp_path, ingest={"day_regex": bad})


def test_an_integer_partition_value_out_of_its_type_is_never_committed(tmp_path):
    """The lake refuses it before the log: delta-rs took day=2^31 for an int column, and then
    no read of the table worked (and the error was reported as a lost creation race)."""
    from pipelines.lake import commit as lake_commit
    from pipelines.lake.schema import SchemaMismatchError
    from pipelines.lake.tasks import write_arrow

    schema = pa.schema([("day", pa.int32()), ("x", pa.int64())])
    t = tmp_path / "t"
    write_arrow(str(t), pa.table({"day": pa.array([1], pa.int32()), "x": [1]}), partition_by=["day"])
    adds = [{"path": "day=2147483648/f.parquet", "size": 1, "partition_values": {"day": "2147483648"},
             "modification_time": 0, "stats": None, "num_records": 1}]
    with pytest.raises(SchemaMismatchError, match="partition value day='2147483648' .* is not a int32 value"):
        lake_commit.commit(str(t), schema, adds, mode="append", partition_by=["day"])
    assert DeltaSnapshot(str(t)).num_rows == 1 and DeltaSnapshot(str(t)).version == 0


def test_a_file_is_labelled_by_its_name_not_by_a_stray_line(spark, tmp_path):
    """Whether a file has a label column is decided by its name (``unlabeled_globs``): a
    stray line must not flip it. Until the twelfth session the first 40-field line made a
    file labelled (and else a 39-field line unlabelled), so one TAB too many in a test file
    shifted its every row by a column into bronze, labels and all."""
    from pipelines.criteo.ingest import ingest

    raw = tmp_path / "raw"
    raw.mkdir()
    ints, cats = ["5"] * 13, ["68fd1e64"] * 26

    def j(*fields):
        return "\t".join(fields) + "\n"

    # a test file: a line with a stray trailing TAB (40 fields), then a row with I1=1, C1 missing
    (raw / "test.txt").write_text(j(*ints, *cats, "") + j("1", *ints[1:], "", *cats[1:]))
    # a labelled row whose I13 is missing and whose empty C26 was stripped: 39 fields
    (raw / "day_0").write_text(j("1", *ints[:12], "", *cats[:25]))
    rep = ingest(spark, _cfg(tmp_path))
    assert {f.source: f.labeled for f in rep.files} == {"test.txt": False, "day_0": True}
    q = DeltaSnapshot(_bronze(_cfg(tmp_path))["quarantine"]).to_table().to_pylist()
    assert [(r["source"], r["reason"]) for r in q] == [("test.txt", "too many fields (expected 39, got 40)")]
    rows = {r["source"]: r for r in DeltaSnapshot(_bronze(_cfg(tmp_path))["bronze"]).to_table().to_pylist()}
    t, d = rows["test.txt"], rows["day_0"]
    assert (t["label"], t["I1"], t["I2"], t["C1"], t["C26"]) == (None, 1, 5, None, "68fd1e64")
    assert (d["label"], d["I1"], d["I13"], d["C25"], d["C26"]) == (1, 5, None, "68fd1e64", None)


def test_a_file_whose_lines_contradict_its_name_fails_up_front(tmp_path):
    """Most first lines of the other kind (rows of a test file under a day name, labelled rows
    under a test name) fail before Spark, naming the file and the setting to change."""
    from pipelines.criteo.ingest import CorruptInputError, ingest

    raw = tmp_path / "raw"
    raw.mkdir()
    cats = "\t".join(["68fd1e64"] * 26)
    test_rows = "".join(f"{'' if i % 3 == 0 else i}\t" + "\t".join(["2"] * 12) + f"\t{cats}\n" for i in range(10))
    labelled_rows = "".join(f"{i % 2}\t" + "\t".join(["2"] * 13) + f"\t{cats}\n" for i in range(10))
    (raw / "day_0").write_text(test_rows)
    (raw / "day_1").write_text(labelled_rows)  # fine
    (raw / "test_2.txt").write_text(labelled_rows)
    # trailing TABs stripped (missing C25/C26, as in the real samples): a labelled row keeps 40
    # fields only when its C26 is there, a test row has 37-39. Until the thirteenth session
    # only whole lines of 40 (or 39) fields counted, and both files went in shifted by a column
    cut = [26, 25, 24]
    stripped_labelled = "".join(f"{i % 2}\t" + "\t".join(["2"] * 13) + "\t" + "\t".join(["68fd1e64"] * cut[i % 3])
                                + "\n" for i in range(10))
    stripped_test = "".join(f"{'' if i % 3 == 0 else i + 1}\t" + "\t".join(["2"] * 12) + "\t"
                            + "\t".join(["68fd1e64"] * cut[i % 3]) + "\n" for i in range(10))
    (raw / "latest.txt").write_text(stripped_labelled)  # matches *test*
    (raw / "day_5").write_text(stripped_test)
    # a real test file keeps its name: 40-field lines are rare, most first fields (I1) no label
    (raw / "test_6.txt").write_text(stripped_test + "1\t" + "\t".join(["2"] * 13) + f"\t{cats}\n")
    # behind an empty first gzip member (`cat empty.gz day.gz`): until the fifteenth session
    # only the first member was read, and the file went in shifted by a column
    (raw / "day_8.gz").write_bytes(gzip.compress(b"") + gzip.compress(test_rows.encode()))
    # not Criteo rows at all: said so, not "add a glob to unlabeled_globs" (fifteenth session)
    (raw / "notes.txt").write_text("Display Advertising Challenge\n---\n\nDataset: dac-v1\nsee train.txt\n")
    # rows whose empty trailing fields were stripped are rows, however short: they go in
    (raw / "day_9").write_text("1\t5\t7\n0\t3\n1\t\t9\t1\n0\t1\t2\t3\t4\n")
    # the Kaggle archive's readme.txt beside train.txt / test.txt is not taken from a folder
    (raw / "README.txt").write_text("Display Advertising Challenge\n---\n\nDataset: dac-v1\n")
    # a test file with a TAB ending every line: 40 fields, the last empty. Until the twenty-
    # seventh session it was told to rename itself, and renamed it went in shifted by a column
    (raw / "test_7.txt").write_text(test_rows.replace("\n", "\t\n"))
    (raw / "latest_9.txt").write_text(labelled_rows.replace(cats + "\n", cats.rsplit("\t", 1)[0] + "\t\n"))
    cfg = _cfg(tmp_path)
    with pytest.raises(CorruptInputError) as e:
        ingest(lambda: pytest.fail("ingest started Spark for files it cannot read"), cfg)
    got = {Path(p).name: why for p, why in e.value.problems}
    assert set(got) == {"day_0", "test_2.txt", "latest.txt", "day_5", "day_8.gz", "notes.txt", "test_7.txt",
                        "latest_9.txt"}
    # a labelled file (0/1 first on every line) whose C26 is empty: renamed, not stripped
    assert "rename it or change criteo.ingest.unlabeled_globs" in got["latest_9.txt"], got["latest_9.txt"]
    assert got["test_7.txt"].startswith("10 of its first 10 lines have 40 fields, the last of them empty: each line "
                                        "ends with a TAB too many (an export artefact); strip it (sed 's/\\t$//'")
    assert got["notes.txt"].startswith("4 of its first 4 lines are text, not rows: fewer than 14 fields (a Criteo "
                                       "row has 37-40) and no number first; it does not look like a raw Criteo file")
    assert "9 of its first 10 lines have at most 39 fields" in got["day_8.gz"]
    assert "9 of its first 10 lines have at most 39 fields and no 0/1 label" in got["day_0"]  # I1=1 could be a label
    assert "add a glob matching its name to criteo.ingest.unlabeled_globs" in got["day_0"]
    assert "10 of its first 10 lines have 40 fields" in got["test_2.txt"]
    assert "4 of its first 10 lines have 40 fields and 10 start with a 0/1 label" in got["latest.txt"]
    assert "10 of its first 10 lines have at most 39 fields" in got["day_5"]
    assert not table_exists(_bronze(cfg)["bronze"]) and not table_exists(_bronze(cfg)["ledger"])


def test_a_twin_removed_before_its_duplicate_check_fails_alone_later(tmp_path):
    """Two files of the same size and first/last MiB, the second removed between listing and
    planning: it is planned (its task reports it as gone), not a crash of the whole run
    (fifteenth session's review)."""
    from pipelines.criteo.ingest import _plan
    from pipelines.criteo.raw_files import describe_files

    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("day_0", "day_1"):
        (raw / name).write_text("1\t2\n" * 10)
    files = describe_files([str(raw / "day_0"), str(raw / "day_1")], _cfg(tmp_path))
    (raw / "day_1").unlink()
    todo, results, _ = _plan(files, {}, False)
    assert [f.source for f in todo] == ["day_0", "day_1"] and results == []


def test_a_gz_too_short_for_a_member_is_no_duplicate_and_has_none(tmp_path):
    """A .gz of 0 or 1 bytes (a copy in progress) is a truncated gzip that fails alone when read
    (docs/criteo.md). Until the twentieth session an empty .gz was planned as the "duplicate" of
    an empty file ingested before or in the same run (same size and content), and the run
    succeeded; a plain file could likewise be called a copy of a .gz that then failed."""
    import hashlib

    from pipelines.criteo.ingest import _plan
    from pipelines.criteo.raw_files import describe_files

    raw = tmp_path / "raw"
    raw.mkdir()
    for name, blob in (("day_40", b""), ("day_40.gz", b""), ("day_41.gz", b""), ("day_42.gz", b"\x1f"),
                       ("day_43.gz", b""), ("day_43", b"")):
        (raw / name).write_bytes(blob)
    files = describe_files([str(raw / n) for n in ("day_40", "day_40.gz", "day_41.gz", "day_42.gz", "day_43.gz",
                                                   "day_43")], _cfg(tmp_path))
    assert [f.gzip for f in files] == [False, True, True, True, True, False]
    empty = files[0]
    ingested = {"day_40": {"source": "day_40", "path": empty.path, "size": 0, "mtime_ns": empty.mtime_ns,
                           "quick_hash": empty.quick_hash, "sha256": hashlib.sha256(b"").hexdigest(),
                           "ingest_batch": "b1", "lines": 0, "rows_ok": 0, "rows_rejected": 0}}
    todo, results, _ = _plan(files[1:], ingested, False)  # the empty plain day_43 is a copy, no .gz is
    assert [f.source for f in todo] == ["day_40.gz", "day_41.gz", "day_42.gz", "day_43.gz"]
    assert [(r.source, r.status, r.note) for r in results] == [
        ("day_43", "duplicate", f"same content as {empty.path} (already ingested); --force to ingest")]
    # in one run: the empty plain files are copies of each other, no .gz is one, nor has one
    todo, results, _ = _plan(files, {}, False)
    assert [f.source for f in todo] == ["day_40", "day_40.gz", "day_41.gz", "day_42.gz", "day_43.gz"]
    assert [(r.source, r.status) for r in results] == [("day_43", "duplicate")]
    assert results[0].note.startswith(f"same content as {empty.path} (ingested in this run)")


def test_a_copy_is_a_duplicate_whether_its_twin_is_new_or_ingested(spark, tmp_path):
    """A file with the content of another (size and first/last MiB) is reported, not ingested,
    whether the other was ingested before or is new in the same run. Until the twelfth session
    only the ledger was compared, so two copies arriving together both went into bronze."""
    from pipelines.criteo.ingest import ingest

    raw = tmp_path / "raw"
    raw.mkdir()
    lines = [f"{i % 2}\t" + "\t".join([str(i)] * 13) + "\t" + "\t".join([f"{i:08x}"] * 26) for i in range(60)]
    (raw / "day_0").write_text("\n".join(lines[:50]) + "\n")
    (raw / "day_1").write_text("\n".join(lines[:50]) + "\n")
    (raw / "day_2").write_text("\n".join(lines[50:60]) + "\n")
    cfg = _cfg(tmp_path)
    rep = ingest(spark, cfg)
    got = {f.source: (f.status, f.note) for f in rep.files}
    assert got["day_0"][0] == got["day_2"][0] == "ingested"
    assert got["day_1"] == ("duplicate", f"same content as {raw / 'day_0'} (ingested in this run); --force to ingest")
    assert DeltaSnapshot(_bronze(cfg)["bronze"]).num_rows == 60
    (raw / "day_5").write_bytes((raw / "day_0").read_bytes())
    # gzip'd copies (`gzip -k`): other bytes, the same name apart from .gz. Until the thirteenth
    # session they went into bronze beside their originals, every row twice
    (raw / "day_2.gz").write_bytes(gzip.compress((raw / "day_2").read_bytes()))
    (raw / "day_7").write_text("\n".join(lines[5:9]) + "\n")
    (raw / "day_7.gz").write_bytes(gzip.compress((raw / "day_7").read_bytes()))
    later = {f.source: (f.status, f.note) for f in ingest(spark, cfg).files}
    assert later["day_5"] == ("duplicate", f"same content as {raw / 'day_0'} (already ingested); --force to ingest")
    copy = "taken for a compressed copy; --force to ingest it as a file of its own"
    assert later["day_2.gz"] == ("duplicate", f"same name apart from .gz as {raw / 'day_2'} (already ingested): {copy}")
    assert later["day_7"][0] == "ingested"
    assert later["day_7.gz"] == ("duplicate", f"same name apart from .gz as {raw / 'day_7'} (ingested in this run): {copy}")
    assert DeltaSnapshot(_bronze(cfg)["bronze"]).num_rows == 64
    # the same size, first and last MiB, another middle: a file of its own. Until the fifteenth
    # session (size, quick hash) alone made it a "duplicate: same content", never ingested
    big = [lines[i % 60] for i in range(16_000)]  # ~2.7 MB
    (raw / "day_10").write_text("\n".join(big) + "\n")
    big[8000] = "1" + big[8000][1:] if big[8000][0] == "0" else "0" + big[8000][1:]
    (raw / "day_11").write_text("\n".join(big) + "\n")
    (raw / "day_12").write_bytes((raw / "day_11").read_bytes())  # a true copy, found by its sha256
    later = {f.source: (f.status, f.note) for f in ingest(spark, cfg).files}
    assert later["day_10"][0] == later["day_11"][0] == "ingested"
    assert later["day_12"] == ("duplicate", f"same content as {raw / 'day_11'} (ingested in this run); --force to ingest")
    (raw / "day_13").write_bytes((raw / "day_10").read_bytes())
    later = {f.source: (f.status, f.note) for f in ingest(spark, cfg).files}
    assert later["day_13"] == ("duplicate", f"same content as {raw / 'day_10'} (already ingested); --force to ingest")
    assert DeltaSnapshot(_bronze(cfg)["bronze"]).num_rows == 64 + 32_000


def test_a_lake_that_cannot_be_written_fails_before_spark(spark, tmp_path, capsys, spark_forbidden):
    """A lake root (or gold folder) that is a file, or read-only, is named before any Spark
    job; found by the tasks it printed hundreds of lines of Java and Python traces. Exit 2: the
    command cannot run as given (it was 1)."""
    from jobs.cli import main
    from pipelines.criteo.ingest import ingest

    raw = tmp_path / "raw"
    raw.mkdir()
    line = "1\t" + "\t".join(["3"] * 13) + "\t" + "\t".join(["0a1b2c3d"] * 26)
    (raw / "day_0").write_text("\n".join([line] * 20) + "\n")
    (raw / "day_1").write_text("\n".join([f"0{line[1:]}"] * 20) + "\n")
    (tmp_path / "file").write_text("not a folder")
    with spark_forbidden("ingest into a lake it cannot write"):
        assert main(["ingest", f"lake.root={tmp_path / 'file'}", f"criteo.raw_dir={raw}"]) == 2
    assert "bigopt ingest: cannot write to" in capsys.readouterr().err
    cfg = _cfg(tmp_path)
    ingest(spark, cfg)
    (tmp_path / "lake" / "criteo" / "gold").write_text("a file where gold goes")
    with spark_forbidden("featurize into a gold folder it cannot write"):
        assert main(["featurize", f"lake.root={cfg.lake.root}", f"criteo.raw_dir={raw}"]) == 2
    assert "bigopt featurize: cannot write to" in capsys.readouterr().err


def test_up_to_date_names_the_bronze_version_gold_was_built_from(spark, tmp_path, capsys, spark_forbidden):
    """Bronze compacted after featurize holds the same data: gold stays up to date, and the
    status line names the version gold was built from, not bronze's latest (the compaction's,
    which it once named)."""
    from jobs.cli import main
    from pipelines.criteo.featurize import featurize
    from pipelines.criteo.generate import generate
    from pipelines.criteo.ingest import ingest
    from pipelines.lake import optimize

    # several bronze files per day (64 KiB chunks of ~150 KB files): something to compact
    cfg = _cfg(tmp_path, generate={"days": 2, "rows_per_day": 1000, "seed": 3}, ingest={"chunk_bytes": 65536})
    generate(cfg)
    ingest(spark, cfg)
    first = featurize(spark, cfg)
    t = _bronze(cfg)
    optimize(t["bronze"])
    assert table_version(t["bronze"]) > first.bronze_version
    capsys.readouterr()
    with spark_forbidden("the up-to-date check"):
        assert main(["featurize", f"lake.root={cfg.lake.root}", f"criteo.raw_dir={cfg.criteo.raw_dir}"]) == 0
    out = capsys.readouterr().out
    assert f"gold is up to date: built from bronze v{first.bronze_version} " in out
    assert f"bronze v{table_version(t['bronze'])} " not in out


def test_a_table_that_cannot_be_committed_is_one_line_naming_it_and_what_stays(spark, tmp_path, capsys, monkeypatch):
    """A commit delta-rs cannot write (a read-only ``_delta_log``, a full disk, a file-size
    limit) was several lines of delta-rs's text naming a log file: not the table, not that the
    tables before it had committed, nor what to do (until this was fixed). It is one
    line naming the table, the cause and what a re-run does, and a re-run does it: ingest
    replaces the rows the ledger never confirmed, featurize rebuilds gold."""
    from jobs.cli import main
    from pipelines.lake import commit as lake_commit

    cfg = _cfg(tmp_path, generate={"days": 2, "rows_per_day": 300, "seed": 5})
    t = _bronze(cfg)
    conf = [f"lake.root={cfg.lake.root}", f"criteo.raw_dir={cfg.criteo.raw_dir}", "spark.master=local[2]",
            "criteo.generate.days=2", "criteo.generate.rows_per_day=300", "criteo.generate.seed=5"]
    assert main(["generate", "criteo", *conf]) == 0
    assert main(["ingest", *conf]) == 0
    real_tx = lake_commit.DeltaTable.create_write_transaction
    failing = {}

    def log_not_writable(self, *args, **kwargs):
        if self.table_uri.removeprefix("file://").rstrip("/") == failing.get("table"):
            raise OSError(f"Generic LocalFileSystem error\n   \x1b[31m↳\x1b[0m Unable to open file {failing['table']}"
                          "/_delta_log/00000000000000000001.json#1\n    \x1b[31m↳\x1b[0m Permission denied (os error 13)\n")
        return real_tx(self, *args, **kwargs)

    monkeypatch.setattr(lake_commit.DeltaTable, "create_write_transaction", log_not_writable)
    failing["table"] = t["ledger"]
    capsys.readouterr()
    assert main(["ingest", *conf, "--force"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.strip() == (
        f"bigopt ingest: commit to Delta table {t['ledger']} failed: Generic LocalFileSystem error: Unable to open file "
        f"{t['ledger']}/_delta_log/00000000000000000001.json#1: Permission denied (os error 13); bronze v1 stays "
        "committed with the rows of the 2 file(s) being ingested, which no ledger entry confirms (featurize refuses "
        "them): run the same command again once that is fixed: it ingests those files again, replacing their rows")
    assert table_version(t["bronze"]) == 1 and table_version(t["ledger"]) == 0
    failing.clear()
    assert main(["ingest", *conf]) == 0  # the same command (without --force too): the rows are replaced
    assert "bronze rows unconfirmed" in capsys.readouterr().out
    assert table_version(t["bronze"]) == 2 and table_version(t["ledger"]) == 1

    assert main(["featurize", *conf]) == 0
    failing["table"] = t["test"]
    capsys.readouterr()
    assert main(["featurize", *conf, "--force"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"bigopt featurize: commit to Delta table {t['test']} failed: Generic LocalFileSystem "
                          f"error: Unable to open file {t['test']}/_delta_log/")
    assert err.strip().endswith(
        "Permission denied (os error 13); vocabulary v1, train v1, valid v1 of this build stay committed, the rest of "
        "it and features.json not (features.json still describes the previous build, if any): run the same command "
        "again once that is fixed: it rebuilds gold")
    assert [table_version(t[s]) for s in ("vocabulary", "train", "valid", "test", "vocab_sizes")] == [1, 1, 1, 0, 0]
    failing.clear()
    assert main(["featurize", *conf]) == 0  # not "up to date": rebuilt
    assert [table_version(t[s]) for s in ("vocabulary", "train", "valid", "test", "vocab_sizes")] == [2, 2, 2, 1, 1]


def test_many_skipped_files_are_one_row_and_generated_files_beside_real_ones_are_said(spark, tmp_path, capsys):
    """Two things an ingest over a long-lived lake says (one lake, to spare a Spark ingest):
    - a daily ingest over a folder of months of days printed one "skipped" row per file
      ingested before (2,010 lines for 2,000 files, found by the lake-longevity probe): past
      SKIPPED_ROWS_SHOWN they are one row of totals, with the days as runs; new files keep
      their own rows;
    - a lake of an earlier `make demo` (its tables were `lake/criteo`, as conf/criteo.yaml's
      are) then given real files: bronze mixed the synthetic days with the real ones, and gold
      took them all, with nothing said (found by the probe of this session's fixes). Ingest
      names the generated folder's files when bronze holds them beside files of a folder
      without a generate manifest."""
    from jobs.cli import main
    from jobs.ingest import SKIPPED_ROWS_SHOWN
    from pipelines.criteo.generate import generate

    n = SKIPPED_ROWS_SHOWN + 2
    conf = [f"lake.root={tmp_path / 'lake'}", f"criteo.raw_dir={tmp_path / 'gen'}", f"criteo.generate.days={n}",
            "criteo.generate.rows_per_day=20", "criteo.ingest.files_per_commit=32"]
    generate(load_config(None, conf))
    assert main(["ingest", *conf]) == 0
    out = capsys.readouterr().out
    assert "generated (synthetic)" not in out  # all of one kind
    ok = {int(m[0]): int(m[1]) for m in re.findall(r"│ day_(\d+)\s+│\s+\d+ │ ingested\s+│\s+[\d,]+ │\s+([\d,]+) │", out)}
    assert sorted(ok) == list(range(n)), out
    real = tmp_path / "real"
    real.mkdir()
    (real / f"day_{n}").write_text("1\t" + "\t".join(["3"] * 13) + "\t" + "\t".join(["0a1b2c3d"] * 26) + "\n")
    assert main(["ingest", *conf, "--input", str(tmp_path / "gen"), "--input", str(real)]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith("│")]
    assert len(rows) == 2, rows
    assert rows[0].split("│")[1].strip() == f"day_{n}" and "ingested" in rows[0]
    cells = [c.strip() for c in rows[1].split("│")[1:-1]]
    assert cells[:5] == [f"{n} files", f"0-{n - 1}", "skipped", f"{n * 20}", f"{sum(ok.values())}"], cells
    said = " ".join(out.split())
    assert f"bronze holds generated (synthetic) files of {tmp_path / 'gen'} (day_0, day_1, day_10," in said, said


def test_inputs_that_share_a_file_name_are_refused_before_spark(tmp_path, capsys, spark_forbidden):
    """The file name is bronze's ``source`` key: two inputs named alike (day_0 from two folders)
    are refused, naming each shared name once, before anything is read. The check counts names
    (it compared every pair: 42 s on the driver for 20,000 files)."""
    from jobs.cli import main

    line = "1\t" + "\t".join(["3"] * 13) + "\t" + "\t".join(["0a1b2c3d"] * 26) + "\n"
    for folder in ("a", "b"):
        for name in ("day_0", "day_1", "day_2"):
            (tmp_path / folder).mkdir(exist_ok=True)
            (tmp_path / folder / name).write_text(line)
    (tmp_path / "b" / "day_2").rename(tmp_path / "b" / "day_3")
    with spark_forbidden("an ingest of inputs sharing names"):
        assert main(["ingest", f"lake.root={tmp_path / 'lake'}", "--input", str(tmp_path / "a"),
                     "--input", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert err == ("bigopt ingest: several inputs share the file name(s) ['day_0', 'day_1']; the name is the bronze "
                   "`source` key\n"), err
    assert not (tmp_path / "lake").exists()


def test_a_file_that_shrinks_while_it_is_read_is_not_ledgered(spark, tmp_path, monkeypatch):
    """A file truncated after it was listed (an in-place copy over it that overlaps the ingest)
    fails alone, nothing of it committed and no ledger entry, so the next run ingests it whole.
    Until the twenty-ninth session its read stopped at the cut as if at the end of the file: it
    was ledgered as ingested with the lines before the cut, and every later run skipped it (the
    hard-failure probe: 206,878 of 1,000,000 rows, exit 0). Emulated by listing the file bigger
    than it is, which is what its tasks then meet."""
    import dataclasses

    import pipelines.criteo.ingest as ingest_mod
    from pipelines.criteo.bronze import read_ledger
    from pipelines.criteo.ingest import CorruptInputError, ingest

    raw = tmp_path / "raw"
    raw.mkdir()
    for day in (0, 1):
        rows = [f"{i % 2}\t{i}\t" + "\t".join([str(day)] * 12) + "\t" + "\t".join([f"{i:08x}"] * 26) for i in range(600)]
        (raw / f"day_{day}").write_text("\n".join(rows) + "\n")  # ~170 KB: 3 ranges of 64 KiB below
    real = ingest_mod.describe_files

    def listed_bigger(names, cfg):  # day_1 as listed before its cut: 500 bytes more than it now has
        return [dataclasses.replace(f, size=f.size + 500) if f.source == "day_1" else f for f in real(names, cfg)]

    cfg = _cfg(tmp_path)
    t = _bronze(cfg)
    for chunk in (None, 1 << 16):  # one range per file, then several: the last one meets the early end
        if chunk:
            cfg = _cfg(tmp_path, ingest={"chunk_bytes": chunk})
        monkeypatch.setattr(ingest_mod, "describe_files", listed_bigger)
        with pytest.raises(CorruptInputError) as e:
            ingest(spark, cfg)
        why = {Path(p).name: w for p, w in e.value.problems}
        size = (raw / "day_1").stat().st_size
        assert why == {"day_1": f"ended at byte {size:,}, where it was listed with {size + 500:,} bytes or more: it "
                                "changed while it was read (a copy or download still in progress?)"}, why
        assert rows_by_source_now(t["bronze"]) == {"day_0": 600}
        assert {r["source"] for r in read_ledger(t["ledger"])} == {"day_0"}
        monkeypatch.undo()
    ingest(spark, cfg)  # listed as it is: ingested whole
    assert rows_by_source_now(t["bronze"]) == {"day_0": 600, "day_1": 600}


def test_a_killed_first_ingest_is_said_with_the_remedy_that_works(spark, tmp_path):
    """An ingest killed between its bronze commit and its ledger entry leaves rows that look, for
    criteo.ingest.in_flight_s, like a running ingest's. With no earlier version to build from,
    featurize told the user to wait for that ingest to finish, which a killed one never does
    (hard-failure probe); it now names the remedy too, and that remedy works."""
    from pipelines.criteo.featurize import FeaturizeError, featurize
    from pipelines.criteo.ingest import ingest

    raw = tmp_path / "raw"
    raw.mkdir()
    rest = "\t".join(["3"] * 12) + "\t" + "\t".join(["0a1b2c3d"] * 26)
    (raw / "day_0").write_text("".join(f"{i % 2}\t{i}\t{rest}\n" for i in range(40)))
    cfg = _cfg(tmp_path)
    ingest(spark, cfg)
    t = _bronze(cfg)
    shutil.rmtree(t["ledger"])  # killed before its ledger entry: the first ingest, so no ledger at all
    with pytest.raises(FeaturizeError, match=r"run featurize again once that ingest has finished \(if no ingest is "
                                             r"running, it was killed: run `bigopt ingest` again, which replaces "
                                             r"those rows\)$"):
        featurize(spark, cfg)
    assert ingest(spark, cfg).files[0].status == "ingested"  # the remedy: its rows replaced, ledgered
    assert rows_by_source_now(t["bronze"]) == {"day_0": 40}
    assert featurize(spark, cfg).total_rows == 40
