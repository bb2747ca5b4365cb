"""Where the embedding sizes come from: the vocabulary JSON bigopt writes next to the gold
tables (featurize's ``features.json``, make_gold's ``vocabulary.json``), ``train.vocabulary``,
or a scan of the ids; never another dataset's vocabulary in a folder nearby."""
from __future__ import annotations

import json
import shutil

from jobs.config import load_config
from training.dataspec import resolve_data
from training.synthetic import make_gold

ROWS = {"train": 400, "valid": 100}


def spec_of(gold: dict, tmp_path, *overrides: str):
    return resolve_data(load_config(None, [f"train.train_table={gold['train']}", f"train.valid_table={gold['valid']}",
                                           f"lake.root={tmp_path}/lake", *overrides]))


def test_a_sibling_datasets_vocabulary_is_not_taken(tmp_path):
    """x/a has no vocabulary; x/b (another dataset) has one, with smaller sizes. Until the
    twentieth session x/b/vocabulary.json (`*/vocabulary.json` in x/) sized x/a's embeddings:
    an IndexError at the first step, or, had x/b's been larger, oversized tables."""
    a = make_gold(tmp_path / "x" / "a", rows=ROWS, cardinalities=[50] * 26)
    (tmp_path / "x" / "a" / "vocabulary.json").unlink()
    make_gold(tmp_path / "x" / "b", rows=ROWS, cardinalities=[5] * 26, seed=1)
    scanned = spec_of(a, tmp_path)
    assert scanned.vocabulary is None  # from a scan of the ids
    assert max(scanned.cardinalities) > 5 and all(c <= 50 for c in scanned.cardinalities), scanned.cardinalities
    # nor any other JSON around that is not where bigopt writes one
    (tmp_path / "x" / "other_vocab.json").write_text(json.dumps({f"C{j + 1}": 3 for j in range(26)}))
    (tmp_path / "x" / "a" / "old").mkdir()
    (tmp_path / "x" / "a" / "old" / "vocabulary.json").write_text(json.dumps({f"C{j + 1}": 4 for j in range(26)}))
    (tmp_path / "x" / "a" / "a_vocab.json").write_text(json.dumps({f"C{j + 1}": 4 for j in range(26)}))
    (tmp_path / "x" / "a" / "train" / "vocab.json").write_text(json.dumps({f"C{j + 1}": 4 for j in range(26)}))
    spec = spec_of(a, tmp_path)
    assert spec.vocabulary is None and spec.cardinalities == scanned.cardinalities


def test_the_vocabulary_next_to_the_gold_tables_is_taken(tmp_path):
    gold = make_gold(tmp_path / "x" / "a", rows=ROWS, cardinalities=[50] * 26)
    make_gold(tmp_path / "x" / "b", rows=ROWS, cardinalities=[5] * 26, seed=1)
    spec = spec_of(gold, tmp_path)
    assert spec.vocabulary == gold["vocabulary"] and spec.cardinalities == [50] * 26
    # featurize's features.json (here one without table versions) comes first
    features = tmp_path / "x" / "a" / "features.json"
    features.write_text(json.dumps({"columns": {f"C{j + 1}": {"cardinality": 60} for j in range(26)}}))
    spec = spec_of(gold, tmp_path)
    assert spec.vocabulary == str(features) and spec.cardinalities == [60] * 26
    # train.vocabulary names any JSON, wherever it is
    elsewhere = tmp_path / "sizes.json"
    shutil.copy(tmp_path / "x" / "b" / "vocabulary.json", elsewhere)
    spec = spec_of(gold, tmp_path, f"train.vocabulary={elsewhere}")
    assert spec.vocabulary == str(elsewhere) and spec.cardinalities == [5] * 26
