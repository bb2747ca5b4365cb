"""Column names and the raw format of the Criteo click logs.

A raw line is ``label TAB I1..I13 TAB C1..C26`` (40 fields; test files have no label: 39).
Empty field = missing. I = integer counts (may be negative), C = 32-bit hashes as 8 hex chars.
"""
from __future__ import annotations

NUM_DENSE = 13
NUM_SPARSE = 26
DENSE = [f"I{i}" for i in range(1, NUM_DENSE + 1)]
SPARSE = [f"C{i}" for i in range(1, NUM_SPARSE + 1)]
LABELED_FIELDS = 1 + NUM_DENSE + NUM_SPARSE  # 40
UNLABELED_FIELDS = NUM_DENSE + NUM_SPARSE  # 39

# Distinct values per categorical column in the 45.8 M-row Kaggle training set (as reported by
# the DLRM Kaggle preprocessing). The generator uses them as value universes (x cardinality_scale).
KAGGLE_CARDINALITIES = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]

# Table names inside <lake.root>/<criteo.name>/
BRONZE = ("bronze", "events")
QUARANTINE = ("bronze", "quarantine")
LEDGER = ("bronze", "ledger")
GOLD_SPLITS = ("train", "valid", "test")
VOCABULARY = ("gold", "vocabulary")
VOCAB_SIZES = ("gold", "vocab_sizes")
FEATURES_JSON = "features.json"

# commit-info key naming the featurize run that wrote a gold, vocabulary or vocab_sizes version
# (one id for all the tables it commits: what makes a pinned gold version a whole build)
BUILD_KEY = "bigopt.build"

# ids reserved by the vocabulary strategy (frequent values get 2, 3, ... by descending count)
MISSING_ID = 0
RARE_ID = 1
FIRST_VOCAB_ID = 2


def tables(cfg) -> dict[str, str]:
    """Every table path of the pipeline for a root config ``cfg``."""
    name = cfg.criteo.name
    out = {
        "bronze": cfg.lake.table(name, *BRONZE),
        "quarantine": cfg.lake.table(name, *QUARANTINE),
        "ledger": cfg.lake.table(name, *LEDGER),
        "vocabulary": cfg.lake.table(name, *VOCABULARY),
        "vocab_sizes": cfg.lake.table(name, *VOCAB_SIZES),
    }
    for split in GOLD_SPLITS:
        out[split] = cfg.lake.table(name, "gold", split)
    out["features_json"] = cfg.lake.table(name, "gold", FEATURES_JSON)
    return out
