"""The task-side pieces of featurize on plain Arrow data (no Spark): vocabulary partials and
their merge, id lookups, bronze slicing. The 8-byte fast paths (uint64 keys) must agree with
the general string paths they stand in for."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.criteo import bronze_slices as B
from pipelines.criteo import spark_xxhash as X
from pipelines.criteo import split as S
from pipelines.criteo import vocabulary as V
from pipelines.criteo.schema import SPARSE

HEX = [f"{i * 2654435761 % (1 << 32):08x}" for i in range(300)]
MIXED = HEX[:50] + ["", "a", "abc", "0123456789", "é漢字", "68FD1E64"]


def _values(pool: list[str], n: int, seed: int) -> list[str | None]:
    rng = np.random.default_rng(seed)
    idx = np.minimum(rng.zipf(1.3, n) - 1, len(pool) - 1)
    return [None if rng.random() < 0.1 else pool[i] for i in idx]


def _merge(tmp_path, partials, threshold=2, max_size=None):
    from pipelines.lake import DeltaSnapshot
    from pipelines.lake.tasks import begin_write, commit_write

    tw = begin_write(str(tmp_path / "vocab"), V.VOCAB_SCHEMA, mode="overwrite", partition_by=["column"])
    blobs = [V._ipc(V._sum_counts([p])) for p in partials]
    [(index, distinct, kept, adds)] = V.merge_partition([(2, b) for b in blobs], tw, threshold, max_size)
    commit_write(tw, adds)
    rows = DeltaSnapshot(str(tmp_path / "vocab")).to_table().to_pylist()
    return distinct, kept, sorted((r["id"], r["value"], r["count"], r["column"]) for r in rows)


@pytest.mark.parametrize("pool", [HEX, MIXED], ids=["8-byte", "mixed-lengths"])
def test_vocabulary_merge_equals_counting(tmp_path, pool):
    """Partials from plain and dictionary-encoded batches, as keys or strings, merge into the
    vocabulary a plain count gives: threshold, size cap, count desc then value (bytes) asc."""
    batches = [_values(pool, 3000, s) for s in range(4)]
    batches[0] = _values(HEX, 3000, 0)  # all 8 bytes: a key partial even in the mixed case
    arrays = [pa.array(b, pa.string()) for b in batches]
    arrays[1] = arrays[1].dictionary_encode()
    arrays[3] = arrays[3].slice(7).dictionary_encode()
    # nulls held inside the dictionary (not in the indices) are null rows, not a value
    uniq = [None, *sorted({v for v in batches[2] if v is not None})]
    arrays[2] = pa.DictionaryArray.from_arrays(pa.array([uniq.index(v) for v in batches[2]], pa.int32()),
                                               pa.array(uniq, pa.string()))
    assert arrays[2].dictionary.null_count == 1 and arrays[2].indices.null_count == 0
    batches[3] = batches[3][7:]
    partials = [V._value_counts(a) for a in arrays]
    kinds = [p.column_names[0] for p in partials]
    assert kinds == ["key"] * 4 if pool is HEX else kinds[0] == "key" and "value" in kinds
    counts = Counter(v for b in batches for v in b if v is not None)
    for max_size in (None, 20):
        distinct, kept, rows = _merge(tmp_path / str(max_size), partials, threshold=2, max_size=max_size)
        want = sorted(((v, c) for v, c in counts.items() if c >= 2), key=lambda vc: (-vc[1], vc[0].encode()))
        want = want[:max_size] if max_size else want
        assert distinct == len(counts) and kept == len(want)
        assert rows == [(2 + i, v, c, "C3") for i, (v, c) in enumerate(want)]


def test_key_strings_round_trip():
    a = pa.array(HEX[:20] + ["\x00" * 8, "ÿÿÿÿ"], pa.string())
    keys = X.word_keys(a)
    assert keys is not None
    assert V._key_strings(pa.array(keys.byteswap())).to_pylist() == a.to_pylist()
    assert X.word_keys(pa.array(["abcdefgh", "abc"])) is None
    assert X.word_keys(pa.array(["abcdefgh", None, "12345678"])).tolist()[1] == 0


@pytest.mark.parametrize("pool", [HEX, MIXED], ids=["8-byte", "mixed-lengths"])
def test_vocab_ids_fast_and_general_paths_agree(pool):
    vocab = pa.array(pool[::2], pa.string())
    lookup = V.VocabLookup(vocab)
    assert (lookup.index is not None) == (pool is HEX)
    col = pa.array(_values(pool, 5000, 9) + ["zzzzzzzz", "not-in-it"], pa.string())
    pos = {v: i for i, v in enumerate(vocab.to_pylist())}
    want = [0 if v is None else 2 + pos[v] if v in pos else 1 for v in col.to_pylist()]
    assert V.vocab_ids(col, lookup).tolist() == want
    assert V.vocab_ids(col.dictionary_encode(), lookup).tolist() == want
    assert V.vocab_ids(col.slice(100), lookup).tolist() == want[100:]
    empty = V.VocabLookup(pa.array([], pa.string()))
    assert set(V.vocab_ids(col, empty).tolist()) == {0, 1}


def test_hashed_ids_dictionary_equals_plain():
    col = pa.array(_values(MIXED, 2000, 3), pa.string())
    ids = V.hashed_ids(col, 1000)
    assert ids.min() >= 0 and ids.max() < 1000 and (ids == 0).sum() == col.null_count
    assert V.hashed_ids(col.dictionary_encode(), 1000).tolist() == ids.tolist()


def test_bronze_slices_and_tasks(tmp_path):
    """Big files are cut at row groups into contiguous ranges; slices are packed into about
    two tasks per core, balanced by bytes, every slice exactly once."""
    from pipelines.lake import FileEntry

    t = pa.table({c: pa.array([HEX[i % 300] for i in range(10_000)]) for c in SPARSE[:2]})
    big, small = tmp_path / "big.parquet", tmp_path / "small.parquet"
    pq.write_table(t, big, row_group_size=1000)  # 10 row groups
    pq.write_table(t.slice(0, 500), small)
    files = [FileEntry(str(big), big.stat().st_size, 10_000, {"day": 3}),
             FileEntry(str(small), small.stat().st_size, 500, {"day": None})]
    slices = B.bronze_slices(files, parallelism=2)
    cut = [s for s in slices if s.uri == str(big)]
    assert len(cut) > 1 and all(s.day == 3 for s in cut)
    assert [g for s in cut for g in s.row_groups] == list(range(10))  # contiguous, each once
    assert abs(sum(s.size for s in cut) - big.stat().st_size) < len(cut)
    (whole,) = [s for s in slices if s.uri == str(small)]
    assert whole.row_groups is None and whole.day is None
    rows = sum(b.num_rows for s in cut for b in B.read_slice(s, t.schema, dictionary=SPARSE[:1]))
    assert rows == 10_000

    tasks = B.bronze_tasks(files, parallelism=2)
    assert len(tasks) == min(4, len(slices)) and all(tasks)
    assert sorted(map(repr, (s for task in tasks for s in task))) == sorted(map(repr, slices))
    loads = [sum(s.size for s in task) for task in tasks]
    assert max(loads) - min(loads) <= max(s.size for s in slices)
    assert len(B.bronze_tasks(files, parallelism=2, task_bytes=1)) == len(slices)  # size cap: one slice a task


def test_count_task_folds_and_merges(tmp_path, monkeypatch):
    """The map side over two bronze files (dictionary reads, partials folded on the way,
    counts narrowed to int32 on the wire) and the reduce side give plain counts; the held-out
    day is not counted."""
    from pipelines.lake import FileEntry
    from pipelines.lake.tasks import begin_write

    monkeypatch.setattr(V, "FOLD_ROWS", 50)
    monkeypatch.setattr(B, "BATCH_ROWS", 700)
    cols = {c: _values(HEX if j % 2 else MIXED, 3000, j) for j, c in enumerate(SPARSE)}
    files = []
    for day in (0, 1):
        path = tmp_path / f"day{day}.parquet"
        pq.write_table(pa.table({c: pa.array(v[day * 1500:(day + 1) * 1500], pa.string()) for c, v in cols.items()}),
                       path, row_group_size=400)
        files.append(FileEntry(str(path), path.stat().st_size, 1500, {"day": day}))
    rule = S.SplitRule("day", test_days=(1,))
    task = B.bronze_slices(files, parallelism=1)
    assert len(task) == 2
    blobs: dict[int, list[bytes]] = {}
    for j, blob in V.count_task(task, pa.schema([(c, pa.string()) for c in SPARSE]), rule):
        blobs.setdefault(j, []).append(blob)
    assert sorted(blobs) == list(range(26)) and all(len(b) == 1 for b in blobs.values())
    # one reduce partition holding every column, each column's partial twice (as from two map
    # tasks), columns interleaved: with FOLD_ROWS = 50 the partials are summed on arrival
    tw = begin_write(str(tmp_path / "vocab"), V.VOCAB_SCHEMA, mode="overwrite", partition_by=["column"])
    pairs = [(j, b) for _ in range(2) for j in sorted(blobs) for b in blobs[j]]
    results = {r[0]: r for r in V.merge_partition(pairs, tw, 1, None)}
    assert sorted(results) == list(range(26))
    for j in (0, 1, 21):
        counts = Counter(v for v in cols[SPARSE[j]][:1500] if v is not None)
        _, distinct, kept, adds = results[j]
        got = [r for a in adds for r in pq.read_table(tmp_path / "vocab" / a["path"]).to_pylist()]
        assert (distinct, kept) == (len(counts), len(counts))
        assert {r["value"]: r["count"] for r in got} == {v: 2 * c for v, c in counts.items()}


def test_partial_counts_fold_bounds_the_pile(monkeypatch):
    """Partials of one column are summed once the pile passes FOLD_ROWS (then twice what the
    sum left): the pile never holds much more than the distinct values, and the sum is exact."""
    monkeypatch.setattr(V, "FOLD_ROWS", 100)
    acc, want = V.PartialCounts(), Counter()
    rng = np.random.default_rng(0)
    for _ in range(40):
        vals = [HEX[i] for i in rng.integers(0, 150, 60)]
        want.update(vals)
        acc.add(7, V._value_counts(pa.array(vals, pa.string())))
        acc.add(3, V._value_counts(pa.array([], pa.string())))  # empty partials are dropped
        assert acc._rows[7] <= 3 * 150 + 60
    assert acc.columns() == [7]
    got = V._as_values(acc.pop(7))
    assert dict(zip(got.column("value").to_pylist(), got.column("count").to_pylist())) == want
    assert acc.columns() == []


def test_column_partitions_spread_the_large_columns(tmp_path):
    """Reducers get the categorical columns by their bronze bytes, largest first into the
    lightest: the four high-cardinality columns land on four different reducers, and every
    column gets a partition in range."""
    rng = np.random.default_rng(0)
    large = {SPARSE[j] for j in (0, 4, 8, 12)}  # all in one partition under `column % 4`
    t = pa.table({c: pa.array([f"{v:08x}" for v in rng.integers(0, 1 << 32 if c in large else 20, 5000)])
                  for c in SPARSE})
    path = tmp_path / "b.parquet"
    pq.write_table(t, path, row_group_size=1000)
    from pipelines.lake import FileEntry

    parts = V.column_partitions([FileEntry(str(path), path.stat().st_size, 5000, {"day": 0})], reducers=4)
    assert len(parts) == 26 and set(parts) <= set(range(4))
    assert sorted(parts[SPARSE.index(c)] for c in large) == [0, 1, 2, 3]


def test_plan_split_names_what_is_wrong_with_the_days():
    """Day-split settings are checked against bronze's labelled days, with no Spark: a
    held-out day bronze does not have (a typo, a day not ingested yet) is an error, not an
    empty test split."""
    from jobs.config import load_config

    view = S.BronzeView(3, {f"day_{d}": {"rows": 10, "day": d, "labeled": True, "batch": "b"} for d in (0, 1, 2)})

    def plan(**split):
        return S.plan_split(load_config(data={"criteo": {"featurize": {"split": split}}}), view)

    assert (plan().mode, plan().test_days, plan().valid_days) == ("day", [2], [])
    assert (plan(test_days=[2], valid_days=[1]).test_days, plan(test_days=[2], valid_days=[1]).valid_days) == ([2], [1])
    for split, message in (({"test_days": [99]}, r"day\(s\) \[99\] .* no labelled rows in bronze v3 \(its days: \[0, 1, 2\]\)"),
                           ({"test_days": [2], "valid_days": [5]}, r"day\(s\) \[5\]"),
                           ({"test_days": [1], "valid_days": [1]}, r"days \[1\] are both test and valid"),
                           ({"test_days": [0, 1, 2]}, "no training day left"),
                           ({"valid_days": [2]}, r"days \[2\] are both test and valid days \(split.test_days not set")):
        with pytest.raises(S.FeaturizeError, match=message):
            plan(**split)
    # held-out days named under mode auto make a day split even where auto alone would not (one
    # day; until the thirteenth session test_days was ignored and the split was random)
    one = S.BronzeView(4, {"day_0": {"rows": 10, "day": 0, "labeled": True, "batch": "b"}})
    cfg = load_config(data={"criteo": {"featurize": {"split": {"test_days": [0]}}}})
    with pytest.raises(S.FeaturizeError, match="no training day left"):
        S.plan_split(cfg, one)
    assert S.plan_split(load_config(), one).mode == "random"


def test_plan_split_warns_of_a_missing_day_of_training_after_the_test_day_and_of_early_validation(caplog):
    """Splits that are legal but seldom meant are said, not refused: a day missing among
    bronze's days (day_5 ingested before day_4 arrived) and training days later than the test
    day (test_days set to a middle day), validation days before a training day. Before, all
    built gold in silence (the last until the twenty-fifth session)."""
    import logging

    from jobs.config import load_config

    def warnings_for(days, **split):
        view = S.BronzeView(7, {f"day_{d}": {"rows": 10, "day": d, "labeled": True, "batch": "b"} for d in days})
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=S.__name__):
            S.plan_split(load_config(data={"criteo": {"featurize": {"split": split}}}), view)
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    assert warnings_for((0, 1, 2)) == [] and warnings_for((3, 4, 5), test_days=[5], valid_days=[4]) == []
    (gap,) = warnings_for((0, 1, 2, 3, 5))
    assert "no labelled rows of day(s) [4] (its days: [0-3, 5] (5 days))" in gap and "bronze v7" in gap
    (later,) = warnings_for((0, 1, 2, 3), test_days=[1])
    assert "training day(s) [2-3] come after test day 1" in later
    assert len(warnings_for((0, 2, 3), test_days=[2])) == 2  # a gap and a later training day
    # validation before training days (valid_days=[0] of days 0-5): chosen on the past
    (early,) = warnings_for((0, 1, 2, 3, 4, 5), test_days=[5], valid_days=[0])
    assert "validation day(s) [0] come before training day 4" in early
    assert warnings_for((0, 1, 2, 3, 4, 5), test_days=[5], valid_days=[4]) == []
    # days 0-299 and 1000: one short line, not the 700 missing days and the 301 days listed
    (gap,) = warnings_for((*range(300), 1000))
    assert "day(s) [300-999] (700 days) (its days: [0-299, 1000] (301 days))" in gap and len(gap) < 300
    from pipelines.criteo.split import day_spans

    assert day_spans(list(range(0, 40, 2))) == "[0, 2, 4, 6, 8, 10, 12, 14, ... (12 more runs)] (20 days)"


def test_a_day_split_says_where_the_rows_of_undated_labelled_files_go(caplog):
    """A labelled file with no day in its name (a Kaggle train.txt beside day files) goes to
    train in a day split: said, with the files and rows. Until the twenty-seventh session its
    rows joined train without a word (featurize probe); a random split has no such question."""
    import logging

    from jobs.config import load_config

    sources = {f"day_{d}": {"rows": 10, "day": d, "labeled": True, "batch": "b"} for d in (0, 1, 2)}
    sources["extra.txt"] = {"rows": 50, "day": -1, "labeled": True, "batch": "b"}
    sources["test.txt"] = {"rows": 7, "day": -1, "labeled": False, "batch": "b"}  # unlabelled: not in gold at all
    view = S.BronzeView(3, sources)
    with caplog.at_level(logging.WARNING, logger=S.__name__):
        assert S.plan_split(load_config(data={"criteo": {"featurize": {"split": {"mode": "day"}}}}), view).mode == "day"
    (said,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert said == ("split: 1 labelled file(s) have no day in their name (criteo.ingest.day_regex), so a day split "
                    "puts their 50 rows in train: extra.txt")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=S.__name__):
        assert S.plan_split(load_config(), view).mode == "random"  # auto: not every row is dated
    assert not caplog.records
