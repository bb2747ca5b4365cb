"""pipelines.criteo.spark_xxhash reproduces Spark's xxhash64 bit for bit (the featurize split
and hashing ids depend on it)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipelines.criteo.schema import DENSE, SPARSE
from pipelines.criteo.spark_xxhash import _dictionary_words, xxhash64

pytestmark = pytest.mark.spark

ROW_SCHEMA = pa.schema([("label", pa.int32()), *[(c, pa.int64()) for c in DENSE], *[(c, pa.string()) for c in SPARSE]])


def _real_rows(folder) -> pa.Table:
    """Every line of the shared real samples as bronze-typed columns (short lines padded,
    unlabelled test lines with a null label), parsed the plain way."""
    rows = []
    for p in sorted(folder.glob("*.txt")):
        for line in p.read_text().splitlines():
            f = line.split("\t")
            if "test" in p.name:
                f = [""] + f
            f += [""] * (40 - len(f))
            ints = [int(x) if x else None for x in f[:14]]
            rows.append([*ints, *[x or None for x in f[14:40]]])
    cols = list(zip(*rows))
    return pa.table([pa.array(c, t.type) for c, t in zip(cols, ROW_SCHEMA)], schema=ROW_SCHEMA)


def _spark(spark, table: pa.Table, *exprs) -> pa.Table:
    return spark.createDataFrame(table).select(*exprs).toArrow()


def test_real_rows_match_spark(spark, criteo_shared):
    """The featurize row hash (seed literal, label, I1..I13, C1..C26) and per-column hashes on
    every real sample line: nulls (missing fields, unlabelled rows), negative integers."""
    from pyspark.sql import functions as F

    t = _real_rows(criteo_shared)
    assert t.num_rows == 2300 and t.column("label").null_count == 100
    assert min(x for x in t.column("I2").to_pylist() if x is not None) < 0
    cols = ["label", *DENSE, *SPARSE]
    exprs = [F.xxhash64(F.lit(seed), *cols).alias(f"row{seed}") for seed in (0, 9, -3, 1 << 40)]
    exprs += [F.xxhash64(c).alias(f"h_{c}") for c in ("label", "I2", "I12", "C1", "C22")]
    exprs.append((F.pmod(F.xxhash64("C3"), F.lit(999)) + 1).alias("ids"))
    got = _spark(spark, t, *exprs)
    for seed in (0, 9, -3, 1 << 40):
        mine = xxhash64([seed, *[t.column(c) for c in cols]])
        np.testing.assert_array_equal(mine, got.column(f"row{seed}").to_numpy())
    for c in ("label", "I2", "I12", "C1", "C22"):
        np.testing.assert_array_equal(xxhash64([t.column(c)]), got.column(f"h_{c}").to_numpy())
    np.testing.assert_array_equal(np.mod(xxhash64([t.column("C3")]), 999) + 1, got.column("ids").to_numpy())


def test_edge_values_match_spark(spark):
    """Strings of every length 0..80 (the 4-byte tail, single bytes, 32-byte stripes), multibyte
    UTF-8, int/bigint extremes, booleans, binary, all-null arguments."""
    from pyspark.sql import functions as F

    strings = [None, *["".join(chr(97 + (i * 7 + k) % 26) for k in range(i)) for i in range(81)],
               "é", "漢字かな", "ü" * 17, "68FD1E64", "0a1b2c3d"]
    ints = [None, 0, 1, -1, 7, -123456, 2**31 - 1, -(2**31)]
    longs = [None, 0, 1, -1, 99_999_999_999, -42, 2**63 - 1, -(2**63)]
    n = len(strings) * 3
    t = pa.table({
        "s": pa.array([strings[i % len(strings)] for i in range(n)], pa.string()),
        "i": pa.array([ints[i % len(ints)] for i in range(n)], pa.int32()),
        "l": pa.array([longs[i % len(longs)] for i in range(n)], pa.int64()),
        "b": pa.array([None if i % 5 == 0 else i % 2 == 0 for i in range(n)], pa.bool_()),
        "z": pa.nulls(n, pa.int64()),
    })
    exprs = {
        "s": ([t.column("s")], F.xxhash64("s")),
        "i": ([t.column("i")], F.xxhash64("i")),
        "l": ([t.column("l")], F.xxhash64("l")),
        "b": ([t.column("b")], F.xxhash64("b")),
        "bin": ([t.column("s").cast(pa.binary())], F.xxhash64(F.col("s").cast("binary"))),
        "mix": ([5, t.column("l"), t.column("s"), t.column("i"), t.column("z")],
                F.xxhash64(F.lit(5), "l", "s", "i", "z")),
        "nulls": ([t.column("z"), t.column("z")], F.xxhash64("z", "z")),
        "long_lit": ([-(2**40), t.column("s")], F.xxhash64(F.lit(-(2**40)), "s")),
    }
    got = _spark(spark, t, *[e.alias(k) for k, (_, e) in exprs.items()])
    for k, (args, _) in exprs.items():
        np.testing.assert_array_equal(xxhash64(args), got.column(k).to_numpy(), err_msg=k)


def test_chunked_sliced_and_dictionary_inputs():
    """Sliced arrays, chunked arrays and dictionary-encoded strings hash like plain arrays."""
    s = pa.array(["a" * (i % 13) if i % 4 else None for i in range(200)])
    ref = xxhash64([s])
    np.testing.assert_array_equal(xxhash64([s.slice(50, 100)]), ref[50:150])
    np.testing.assert_array_equal(xxhash64([pa.chunked_array([s.slice(0, 70), s.slice(70)])]), ref)
    np.testing.assert_array_equal(xxhash64([s.dictionary_encode()]), ref)
    # a null held in the dictionary (not in the indices) is a null row too
    in_dict = pa.DictionaryArray.from_arrays(pa.array([0, 1, 0], pa.int32()), pa.array([None, "a"]))
    np.testing.assert_array_equal(xxhash64([in_dict]), xxhash64([pa.array([None, "a", None])]))
    # 8-byte values (how bronze's categoricals are read): hashed from the dictionary's words,
    # without decoding; nulls in the indices and in the dictionary, after another argument
    rng = np.random.default_rng(3)
    words = [f"{v:08x}" for v in rng.integers(0, 1 << 32, 50)]
    dictionary = pa.array([None if i == 7 else w for i, w in enumerate(words)])
    idx = pa.array([None if i % 11 == 0 else int(v) for i, v in enumerate(rng.integers(0, 50, 400))], pa.int32())
    d8 = pa.DictionaryArray.from_arrays(idx, dictionary)
    ints = pa.array(rng.integers(-5, 5, 400), pa.int64())
    assert _dictionary_words(d8) is not None  # the words path, not a decode
    for args in ([d8], [ints, d8], [5, d8, ints], [d8.slice(13, 200)]):
        plain = [a.cast(pa.string()) if isinstance(a, pa.Array) and pa.types.is_dictionary(a.type) else a for a in args]
        np.testing.assert_array_equal(xxhash64(args), xxhash64(plain))
    empty = pa.DictionaryArray.from_arrays(pa.nulls(3, pa.int32()), pa.array([], pa.string()))
    np.testing.assert_array_equal(xxhash64([ints.slice(0, 3), empty]), xxhash64([ints.slice(0, 3)]))
    with pytest.raises(TypeError, match="no Spark-compatible hash"):
        xxhash64([pa.array([1.5])])
    with pytest.raises(ValueError, match="different lengths"):
        xxhash64([s, pa.array([1], pa.int64())])
