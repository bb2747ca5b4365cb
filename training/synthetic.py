"""Small gold-shaped Delta tables with a learnable label, for tests and benchmarks.

Same schema as the Criteo gold tables (``label float``, ``dense array<float>[13]``,
``sparse array<int>[26]``; dense already ``log(1 + x)`` like the featurizer's) or the scalar layout (``I1..I13``, ``C1..C26``), plus a
``vocabulary.json`` with per-column ``cardinality``. The label is drawn from a logistic
model over log1p(dense) and per-category weights, so a trained model reaches an AUC well
above 0.5 (about 0.8 for the default scale).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def make_gold(
    root: str | Path,
    *,
    rows: dict[str, int] | None = None,
    num_dense: int = 13,
    cardinalities: list[int] | None = None,
    seed: int = 0,
    layout: str = "array",
    scale: float = 1.0,
    files_per_table: int = 2,
) -> dict[str, str]:
    """Write ``<root>/{train,valid,test}`` Delta tables + ``<root>/vocabulary.json``."""
    import pyarrow as pa
    from deltalake import write_deltalake

    rows = rows or {"train": 20_000, "valid": 4_000, "test": 4_000}
    cards = cardinalities or [int(c) for c in np.random.default_rng(seed + 99).integers(5, 200, size=26)]
    rng = np.random.default_rng(seed)
    w_dense = rng.normal(0, 0.6, size=num_dense) * scale
    w_cat = [rng.normal(0, 0.8, size=c) * scale for c in cards]
    root = Path(root)
    out = {}
    for split, n in rows.items():
        dense = rng.gamma(0.6, 4.0, size=(n, num_dense)).astype(np.float32).round()
        sparse = np.stack([rng.zipf(1.6, size=n) % c for c in cards], axis=1).astype(np.int32)
        z = np.log1p(dense) @ w_dense - 1.0  # label from the raw counts
        z = z + sum(w_cat[j][sparse[:, j]] for j in range(len(cards)))
        z = (z - z.mean()) / (z.std() + 1e-9) * 1.5 - 1.0
        label = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(np.float32)
        dense = np.log1p(dense)  # gold dense features are log(1 + x), as the Criteo featurizer writes them
        if layout == "array":
            cols = {
                "label": pa.array(label, pa.float32()),
                "dense": pa.FixedSizeListArray.from_arrays(pa.array(dense.ravel(), pa.float32()), num_dense)
                .cast(pa.list_(pa.float32())),
                "sparse": pa.FixedSizeListArray.from_arrays(pa.array(sparse.ravel(), pa.int32()), len(cards))
                .cast(pa.list_(pa.int32())),
            }
        elif layout == "scalar":
            cols = {"label": pa.array(label, pa.float32())}
            cols.update({f"I{i + 1}": pa.array(dense[:, i], pa.float32()) for i in range(num_dense)})
            cols.update({f"C{j + 1}": pa.array(sparse[:, j], pa.int32()) for j in range(len(cards))})
        else:
            raise ValueError("layout must be array or scalar")
        table = pa.table(cols)
        uri = str(root / split)
        per = -(-n // files_per_table)
        for i in range(files_per_table):
            part = table.slice(i * per, per)
            if part.num_rows:
                write_deltalake(uri, part, mode="append")
        out[split] = uri
    vocab = {"columns": {f"C{j + 1}": {"cardinality": int(c)} for j, c in enumerate(cards)}}
    (root / "vocabulary.json").write_text(json.dumps(vocab))
    out["vocabulary"] = str(root / "vocabulary.json")
    return out
