"""benchmarks/criteo_featurize.py's cross-check of (b) pandas against (c) bigopt: which
differences it catches."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

_path = Path(__file__).resolve().parents[2] / "benchmarks" / "criteo_featurize.py"
_spec = importlib.util.spec_from_file_location("criteo_featurize_bench", _path)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _gold(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 2, n).astype(np.float32), rng.random((n, 13), dtype=np.float32),
            rng.integers(0, 50, (n, 26)).astype(np.int32))


def _result(label, dense, sparse, train, split_rows):
    return {"cardinalities": [52] * 26, "train_hist": [np.bincount(sparse[train, j]).tolist() for j in range(26)],
            "train_digest": bench.masked_digest(label, dense, sparse, train),
            "heldout_digest": bench.masked_digest(label, dense, sparse, ~train), "split_rows": split_rows}


def test_the_held_out_day_is_compared_as_a_multiset_with_the_split_totals():
    """Until the twenty-eighth session only train was compared: (b) writing garbage for every
    held-out row still printed ``identical``. The held-out rows are compared whatever order
    and whichever valid/test half each one puts them in."""
    n = 600_000  # more than one of masked_digest's slices
    label, dense, sparse = _gold(n, 0)
    train = np.arange(n) < 400_000
    b = _result(label, dense, sparse, train, {"train": 400_000, "valid": 99_000, "test": 101_000})
    perm = np.random.default_rng(1).permutation(n)  # (c): other row order, other valid/test halves
    c = _result(label[perm], dense[perm], sparse[perm], train[perm],
                {"train": 400_000, "valid": 100_500, "test": 99_500})
    assert bench.cross_check(b, c, n) == []

    bad = sparse.copy()
    bad[~train] = 12345
    assert bench.cross_check(_result(label, dense, bad, train, b["split_rows"]), c, n) == [
        "held-out rows (valid + test)"]
    i = 450_000  # two held-out rows exchange one id: every per-column count stays the same
    j = i + 1 + int(np.flatnonzero(sparse[i + 1:, 3] != sparse[i, 3])[0])
    swapped = sparse.copy()
    swapped[[i, j], 3] = sparse[[j, i], 3]
    assert bench.cross_check(_result(label, dense, swapped, train, b["split_rows"]), c, n) == [
        "held-out rows (valid + test)"]

    short = {"train": 400_000, "valid": 99_000, "test": 100_000}
    assert bench.cross_check({**b, "split_rows": short}, c, n) == [
        f"b's split rows {short} do not add up to 600,000",
        f"train / held-out row counts (b {short}, c {c['split_rows']})"]


def test_a_short_lived_peak_is_measured(tmp_path):
    """A single-process stage's peak is at least the kernel's high-water mark of its resident
    set. Until the twenty-eighth session it was PSS sampled at 2 Hz alone: a parse of well
    under a second printed ``parse_limit_peak_gb: 0.0``."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "b = bytearray(300 << 20)"])  # 300 MB for a moment
    assert bench.wait_maxrss(proc) > 300 << 20 and proc.returncode == 0

    day = "\t".join(["1", *["5"] * 13, *["a1b2c3d4"] * 26])
    (tmp_path / "day_0").write_text((day + "\n") * 100)
    res, wall, peak = bench.run_stage("parse", str(tmp_path))
    assert res["rows"] == 100
    assert peak > 20 << 20  # an interpreter with pyarrow loaded, however short the parse
