"""What the trainer needs to know about the gold tables, resolved once on the driver.

Handles both gold layouts the Criteo featurizer may write:

* array columns: ``label float``, ``dense array<float>[13]``, ``sparse array<int>[26]``;
* scalar columns: ``label``, ``I1..I13``, ``C1..C26``.

:func:`batch_to_inputs` is the one adapter from a loader batch to model inputs.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from pipelines.errors import MissingInputError

log = logging.getLogger(__name__)


class GoldVersionError(ValueError):
    """The gold versions asked for cannot be read as one build: a version a table does not
    have, or a build a table has no commit of (the message names the table and the remedy)."""


class DataNotFoundError(MissingInputError):
    """A gold table or vocabulary the settings name (or default to) does not exist: a usage
    error (exit 2), where another FileNotFoundError (an artifact folder gone while MLflow logs)
    is not. Until the twenty-eighth session `bigopt train` took every FileNotFoundError for this."""


@dataclass
class DataSpec:
    train: str
    valid: str | None = None
    test: str | None = None
    versions: dict[str, int] = field(default_factory=dict)
    label: str = "label"
    dense_columns: list[str] = field(default_factory=lambda: ["dense"])
    sparse_columns: list[str] = field(default_factory=lambda: ["sparse"])
    dense_is_array: bool = True
    sparse_is_array: bool = True
    num_dense: int = 13
    cardinalities: list[int] = field(default_factory=list)
    vocabulary: str | None = None
    train_rows: int = 0
    gold: dict[str, Any] = field(default_factory=dict)  # the featurize build of train's version (commit info)
    # split -> the version asked for, where it is read at another (compacted and vacuumed since)
    requested: dict[str, int] = field(default_factory=dict)
    table_ids: dict[str, str] = field(default_factory=dict)  # split -> its Delta table id (metaData.id)

    @property
    def columns(self) -> list[str]:
        return [self.label, *self.dense_columns, *self.sparse_columns]

    def table(self, split: str) -> str | None:
        return {"train": self.train, "valid": self.valid, "test": self.test}[split]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataSpec":
        return cls(**d)


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _exists(uri: str | None) -> bool:
    if not uri:
        return False
    from pipelines.lake import table_exists

    # a Delta log with a commit in it: a folder whose `_delta_log` is empty (a featurize stopped
    # by a full disk at its commit) holds no table. Any `_delta_log` folder counted
    # before, and `bigopt train` ended in delta-rs's traceback
    # "No files in log segment" instead of the one line for a table not found
    return table_exists(uri)


def _layout(schema) -> tuple[str, list[str], list[str], bool, bool]:
    import pyarrow as pa

    names = schema.names
    label = "label" if "label" in names else next((n for n in names if n.lower() in {"label", "y", "click"}), None)
    if label is None:
        raise ValueError(f"gold table has no label column: {names}")

    def is_list(n):
        t = schema.field(n).type
        return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)

    if "dense" in names and is_list("dense"):
        dense, dense_arr = ["dense"], True
    else:
        dense = sorted((n for n in names if re.fullmatch(r"I\d+", n)), key=_natural_key)
        dense_arr = False
    if "sparse" in names and is_list("sparse"):
        sparse, sparse_arr = ["sparse"], True
    else:
        sparse = sorted((n for n in names if re.fullmatch(r"C\d+", n)), key=_natural_key)
        sparse_arr = False
    if not dense and not sparse:
        raise ValueError(f"gold table has neither dense/sparse arrays nor I*/C* columns: {names}")
    return label, dense, sparse, dense_arr, sparse_arr


# the vocabulary JSONs bigopt writes next to the gold tables, looked for in this order in the
# folder holding the train table: featurize's <lake>/<name>/gold/features.json, make_gold's
# <root>/vocabulary.json. Nowhere else: the folders around hold other datasets (until the
# twentieth session the search also looked inside the train table and in the folder above
# the gold folder, for `*vocab*.json` and `*/vocabulary.json` too, and sized the embeddings
# from a sibling dataset's vocabulary when the gold had none)
_VOCAB_FILES = ("features.json", "vocabulary.json")


def _parent(uri: str) -> str:
    """The directory holding ``uri`` (a bucket or the root is its own parent)."""
    if "://" in uri and "/" not in uri.split("://", 1)[1]:
        return uri
    return uri.rpartition("/")[0] or "/"


def _vocab_candidates(train_uri: str) -> list[str]:
    """Where :data:`_VOCAB_FILES` would be for the train table: in its folder, in that order."""
    from pipelines.lake.fs import normalize_uri

    d = _parent(normalize_uri(train_uri)).rstrip("/")
    return [f"{d}/{name}" for name in _VOCAB_FILES]


def _find_vocabulary(explicit: str | None, train_uri: str) -> str | None:
    """The vocabulary JSON for the train table: ``explicit``, else the first of
    :data:`_VOCAB_FILES` next to it (in its folder), on whatever filesystem it lives."""
    import pyarrow.fs as pafs

    from pipelines.lake.fs import exists, filesystem_for

    if explicit:
        if not exists(explicit):
            raise DataNotFoundError(f"train.vocabulary: {explicit} does not exist")
        return explicit
    for uri in _vocab_candidates(train_uri):
        fs, path = filesystem_for(uri)
        if fs.get_file_info(path).type == pafs.FileType.File:
            return uri
    return None


def cardinalities_from_vocabulary(path: str, sparse_names: list[str]) -> list[int]:
    """Per-column ``cardinality`` from a vocabulary JSON, in ``sparse_names`` order.

    Accepts ``{"columns": {"C1": {"cardinality": n}, ...}}``, ``{"C1": {"cardinality": n}}``,
    ``{"C1": n}`` or a list of ``{"name"/"column": "C1", "cardinality": n}``.
    """
    from pipelines.lake.fs import read_small_file

    data = json.loads(read_small_file(path))
    found: dict[str, int] = {}

    def visit(node, name=None):
        if isinstance(node, dict):
            if "cardinality" in node and isinstance(node["cardinality"], int | float):
                key = node.get("name") or node.get("column") or name
                if key is not None:
                    found[str(key)] = int(node["cardinality"])
                return
            for k, v in node.items():
                if isinstance(v, int) and re.fullmatch(r"C\d+", str(k)):
                    found[str(k)] = int(v)
                else:
                    visit(v, k)
        elif isinstance(node, list):
            for v in node:
                visit(v, name)

    visit(data)
    if not found:
        raise ValueError(f"{path}: no per-column 'cardinality' entries")
    keys = sparse_names if all(n in found for n in sparse_names) else sorted(found, key=_natural_key)
    return [found[k] for k in keys]


def _max_ids(uri: str, version: int | None, spec_cols: list[str], is_array: bool, n_cols: int) -> list[int]:
    """max id + 1 per categorical column, scanning the table (fallback when no vocabulary)."""
    import numpy as np
    import pyarrow.compute as pc

    from pipelines.lake import DeltaSnapshot

    snap = DeltaSnapshot(uri, version)
    out = np.zeros(n_cols, dtype=np.int64)
    for batch in snap.dataset(spec_cols).to_batches(columns=spec_cols):
        if batch.num_rows == 0:
            continue
        if is_array:
            vals = pc.list_flatten(batch.column(0)).to_numpy(zero_copy_only=False).reshape(batch.num_rows, -1)
            out = np.maximum(out, vals.max(axis=0) + 1)
        else:
            for i, c in enumerate(spec_cols):
                m = pc.max(batch.column(c)).as_py()
                out[i] = max(out[i], (m or 0) + 1)
    return [int(x) for x in out]


# what a featurize commit records about its build (pipelines/criteo/featurize.py), kept for MLflow
_BUILD_INFO = ("bronze_path", "bronze_version", "strategy", "split_mode", "config_hash")


def _settings_not_gold_s(cfg, info: dict) -> list[str]:
    """The command's ``criteo.featurize`` settings that differ from those the gold build read
    was made with (as ``key=command's (gold: build's)``), of the settings the build records.
    The command's split is planned on the bronze version gold was built from (the ledger's
    days), so an unset ``test_days`` (the last day) or ``split.mode=auto`` is compared as what
    it resolves to; until the twenty-fourth session they, an added ``valid_days`` or
    ``max_vocab_size``, and the split mode were never said to differ."""
    from pipelines.criteo.split import (
        BUILD_SETTINGS,
        FeaturizeError,
        SplitPlan,
        build_settings,
        ledger_view,
        plan_split,
    )
    from pipelines.criteo.schema import tables

    fz = getattr(getattr(cfg, "criteo", None), "featurize", None)
    if fz is None or info.get("strategy") is None:
        return []
    if fz.strategy != info["strategy"]:  # every other setting follows from the strategy
        return [f"strategy={fz.strategy} (gold: {info['strategy']})"]
    recorded = any(k in info for k in BUILD_SETTINGS)
    if info.get("bronze_path") not in (None, tables(cfg)["bronze"]) or "bronze_version" not in info:
        # gold of another lake's bronze (a lake copied or moved, train.train_table elsewhere): the
        # command's split cannot be planned on it, the settings that do not depend on it still count
        plan = SplitPlan(info.get("split_mode", "random"), json.loads(info.get("test_days", "[]")),
                         json.loads(info.get("valid_days", "[]")))
        keys = [k for k in BUILD_SETTINGS if k not in _SPLIT_DAYS] if recorded else []
    else:
        try:
            plan = plan_split(cfg, ledger_view(cfg, int(info["bronze_version"])), warn=False)
        except FeaturizeError as e:  # the command's split names days that bronze version lacks
            return [f"split ({e})"]
        keys = ["split_mode"] + (list(BUILD_SETTINGS) if recorded else [])
    mine = {**build_settings(fz, plan), "split_mode": plan.mode}
    if "split_seed" not in info and info.get("split_mode") == "day":
        # a day build before the twenty-seventh session did not record the seed it used:
        # unknown, not different (featurize, which compares the config hash, calls it current)
        keys = [k for k in keys if k != "split_seed"]
    return [f"{BUILD_SETTINGS.get(k, 'split.mode')}={mine.get(k, 'unset')} (gold: {info.get(k, 'unset')})"
            for k in keys if mine.get(k) != info.get(k)]


_SPLIT_DAYS = ("test_days", "valid_days")  # resolved against bronze's days


def _commit_infos(uri: str) -> dict[int, dict]:
    """Every commit's info of table ``uri``, by version."""
    from pipelines.lake import history

    return {int(h["version"]): h for h in history(uri) if h.get("version") is not None}


def _snapshot(uri: str, version: int | None, what: str):
    """``DeltaSnapshot(uri, version)``, a version the table does not have named clearly."""
    from deltalake.exceptions import DeltaError

    from pipelines.lake import DeltaSnapshot

    try:
        return DeltaSnapshot(uri, version)
    except (DeltaError, OverflowError):  # no such version (OverflowError: a negative one)
        if version is None:
            raise
        from pipelines.lake.maintenance import versions_held

        raise GoldVersionError(f"{what}: {uri} has no version {version} (it has {versions_held(uri)})") from None


def _same_data(uri: str, version: int, latest: int) -> bool:
    """Only maintenance commits (compactions, vacuums) came after ``version``, up to ``latest``:
    ``latest`` holds the same rows."""
    from pipelines.lake import data_version

    return data_version(uri, latest) == data_version(uri, version)


def _build_versions(build: str, uris: dict[str, str | None], latest: dict[str, int]) -> dict[str, int]:
    """The version of each table in ``uris`` that featurize build ``build`` committed (newest
    first: a build commits each table once), or its latest (``latest``) where only maintenance
    commits came after. Raises naming a table that has none."""
    from pipelines.criteo.schema import BUILD_KEY

    out = {}
    for name, uri in uris.items():
        if not uri:
            continue
        hit = next((v for v, info in sorted(_commit_infos(uri).items(), reverse=True)
                    if info.get(BUILD_KEY) == build), None)
        if hit is not None and _same_data(uri, hit, latest[name]):  # compacted/vacuumed since
            hit = latest[name]
        if hit is None:
            raise GoldVersionError(f"gold {name} table {uri} has no commit of featurize build {build} (the one that wrote "
                             "the train version being read): rebuild gold with `bigopt featurize --force`")
        out[name] = hit
    return out


def _require_whole_build(build: str, train_version: int, found: dict[str, str | None],
                         paths: dict[str, str], features: tuple[str, str | None] | None) -> None:
    """Refuse gold whose train version featurize build ``build`` wrote while that build's valid
    or test table (``found``, of the splits at their default paths: None where ``paths``' is no
    table) or its ``features.json`` next to train is missing (``features``: where it would be and
    the vocabulary :func:`_find_vocabulary` found; None when ``train.vocabulary`` is set):
    featurize commits vocabulary, train, valid, test, vocab_sizes, then writes
    ``features.json``, every time, so one missing is a featurize that stopped part-way (killed,
    a full disk). Before, a first featurize stopped after its train commit was trained on with
    a warning and no validation, and ended as a FINISHED MLflow run."""
    remedy = ("that featurize did not finish (stopped part-way) or the table was removed since: run "
              "`bigopt featurize` again")
    for split in ("valid", "test"):
        if split in found and found[split] is None:
            raise DataNotFoundError(
                f"gold {split} table not found at {paths[split]}, but gold train v{train_version} was written by "
                f"featurize build {build}, which writes train, valid and test together: {remedy}")
    if features is not None and features[1] != features[0]:
        raise DataNotFoundError(
            f"{features[0]} not found, but gold train v{train_version} was written by featurize build {build}, "
            "which writes it after its last commit: that featurize did not finish (stopped part-way) or it "
            "was removed since: run `bigopt featurize` again (or set train.vocabulary)")


def _vocab_sizes_cardinalities(uri: str, version: int, n_sparse: int) -> list[int] | None:
    """Per-column cardinality from the ``vocab_sizes`` table at ``version``, in column order."""
    from pipelines.lake import DeltaSnapshot

    rows = sorted(DeltaSnapshot(uri, version).to_table(columns=["position", "cardinality"]).to_pylist(),
                  key=lambda r: r["position"])
    return [int(r["cardinality"]) for r in rows] if len(rows) == n_sparse else None


def resolve_data(cfg, versions: dict[str, int] | None = None) -> DataSpec:
    """Tables, pinned versions, column layout and embedding sizes for ``cfg``. ``versions``
    (``{"train": v, "valid": v, "test": v}``, a checkpoint's) pins each table it names.

    Gold written by ``bigopt featurize`` is read as one build: the valid and test versions are
    the ones committed with the train version read (latest, ``train.table_version`` or
    ``versions``), and the embedding sizes are that build's: ``features.json``'s where it
    describes exactly those versions, else its ``vocab_sizes`` version, else (tables from
    elsewhere) the largest ids in the tables."""
    from pipelines.criteo.schema import BUILD_KEY
    from pipelines.criteo.split import BUILD_SETTINGS
    from pipelines.lake import DeltaSnapshot, data_version, table_version

    t = cfg.train
    ds = cfg.run.dataset
    if ds == "criteo" and getattr(cfg, "criteo", None) is not None:
        ds = cfg.criteo.name  # the Criteo pipeline writes <lake.root>/<criteo.name>/gold/<split>
    train = t.train_table or cfg.lake.table(ds, "gold", "train")
    valid = t.valid_table or cfg.lake.table(ds, "gold", "valid")
    test = t.test_table or cfg.lake.table(ds, "gold", "test")
    if not _exists(train):
        if t.train_table is None and ds != getattr(getattr(cfg, "criteo", None), "name", ds):
            # `bigopt featurize` writes the Criteo pipeline's gold only: its remedy does not apply
            raise DataNotFoundError(f"gold train table not found at {train}: run.dataset={cfg.run.dataset} has no "
                                    "pipeline in bigopt (the Criteo one writes its gold with run.dataset=criteo); "
                                    "for tables of your own set train.train_table")
        raise DataNotFoundError(f"gold train table not found at {train} (run `bigopt featurize` first)")
    pinned = dict(versions or {})
    uris = {"valid": valid if _exists(valid) else None, "test": test if _exists(test) else None}
    for split, uri in (("valid", valid), ("test", test)):
        if uris[split] is None and split in pinned:
            raise DataNotFoundError(f"gold {split} table not found at {uri} (version {pinned[split]} is pinned)")

    latest = {s: table_version(u) for s, u in (("train", train), *uris.items()) if u}  # one log read each
    train_version = pinned.get("train", t.table_version)
    snap = _snapshot(train, train_version, "train.table_version" if "train" not in pinned else "checkpoint")
    # the commit that wrote the data read (a compaction or vacuum of gold/train comes after it)
    info = _commit_infos(train).get(data_version(train, snap.version), {})
    build = info.get(BUILD_KEY)
    gold = {"build": build, **{k: info[k] for k in (*_BUILD_INFO, *BUILD_SETTINGS) if k in info}} if build else {}
    if build and (differ := _settings_not_gold_s(cfg, info)):
        log.warning("gold train v%s (featurize build %s) was built with other criteo.featurize settings than this "
                    "command's: %s; the run's data.gold.* params record the build's (`bigopt featurize` rebuilds "
                    "gold with this command's)", snap.version, build, ", ".join(differ))
    versions = {"train": snap.version}
    # the vocabulary next to gold, looked for once: the build check below and the embedding sizes use it
    found_vocab = None if t.vocabulary else _find_vocabulary(None, train)
    if build:  # the build's own valid/test (not a train.valid_table/test_table named) and features.json
        own = {s: uris[s] for s in ("valid", "test") if not getattr(t, f"{s}_table")}
        _require_whole_build(build, snap.version, own, {"valid": valid, "test": test},
                             None if t.vocabulary else (_vocab_candidates(train)[0], found_vocab))
    for split, uri in (("valid", valid), ("test", test)):
        if build and uris[split] is None:  # a table named in train.*_table that does not exist
            log.warning("gold %s table not found at %s: training without %s", split, uri,
                        "validation" if split == "valid" else "a test evaluation")
    valid, test = uris["valid"], uris["test"]
    if build:  # the valid/test versions written with this train version, whatever came since
        versions.update(_build_versions(build, {s: u for s, u in uris.items() if s not in pinned}, latest))
    else:
        versions.update({s: latest[s] for s, u in uris.items() if u and s not in pinned})
        if train_version is not None and (valid or test):
            log.warning("gold train v%s carries no featurize build id (written before it was recorded): valid/test "
                        "are read at their latest versions, which may be another build's", snap.version)
    for split in ("valid", "test"):
        if split in pinned and uris[split]:
            versions[split] = _snapshot(uris[split], pinned[split], "checkpoint").version
    requested: dict[str, int] = {}
    for split, uri in (("train", train), *uris.items()):
        if uri and split in versions and versions[split] != latest[split]:  # an older version:
            snap_s = snap if split == "train" else DeltaSnapshot(uri, versions[split])  # still readable?
            if (gone := snap_s.missing_files()) and _same_data(uri, versions[split], latest[split]):
                # only compactions and vacuums since (a nightly schedule): the same rows, at the latest
                # version (a checkpoint's pins once made `--resume` fail here, "read a later version")
                log.warning("gold %s v%s was compacted and its files vacuumed since: reading the same rows at v%s, in "
                            "other files and so in another order: results will not match runs that read v%s (the "
                            "run records data.%s_version_requested; `bigopt featurize criteo.featurize.bronze_version="
                            "<its data.gold.bronze_version> --force` rebuilds that gold, files and order alike)",
                            split, versions[split], latest[split], versions[split], split)
                requested[split] = versions[split]
                versions[split] = latest[split]
                if split == "train":
                    snap = DeltaSnapshot(uri, latest[split])
            elif gone:
                raise GoldVersionError(
                    f"gold {split} v{versions[split]} cannot be read any more: {len(gone)} of its "
                    f"{len(snap_s.files())} data files are gone (e.g. {gone[0]}), removed by a vacuum after later "
                    "versions replaced them; read a later version, or rebuild that gold")

    label, dense, sparse, dense_arr, sparse_arr = _layout(snap.schema())
    num_dense = len(dense)
    n_sparse = len(sparse)
    if dense_arr or sparse_arr:
        import pyarrow as pa

        from training.data.loader import UnreadableDataFileError

        try:
            head = snap.dataset([c for c in (dense + sparse) if c in ("dense", "sparse")]).head(1).to_pylist()
        except (OSError, pa.ArrowException) as e:  # a damaged first file: name the table and the way out
            raise UnreadableDataFileError(
                f"gold train {train} v{snap.version} cannot be read: {type(e).__name__}: {e}; rebuild it "
                "(bigopt featurize --force) or restore its files") from e
        if head:
            if dense_arr:
                num_dense = len(head[0]["dense"])
            if sparse_arr:
                n_sparse = len(head[0]["sparse"])
    sparse_names = sparse if not sparse_arr else [f"C{i + 1}" for i in range(n_sparse)]

    vocab = _find_vocabulary(t.vocabulary, train) if t.vocabulary else found_vocab
    cards: list[int] = []
    if vocab and not t.vocabulary:  # found next to gold: trusted only for the versions it describes
        doc_versions, vocab_sizes = _described(vocab)
        read = {k: data_version(u, versions[k]) for k, u in (("train", train), ("valid", valid), ("test", test))
                if k in versions and k in (doc_versions or {})}
        if doc_versions is not None and doc_versions != read:
            log.info("%s describes gold versions %s, not the %s being read: sizing embeddings from the build's "
                     "vocab_sizes", vocab, doc_versions, versions)
            vocab = None
            if build and vocab_sizes and _exists(vocab_sizes):
                import pyarrow as pa

                try:
                    (v,) = _build_versions(build, {"vocab_sizes": vocab_sizes},
                                           {"vocab_sizes": table_version(vocab_sizes)}).values()
                    cards = _vocab_sizes_cardinalities(vocab_sizes, v, n_sparse) or []
                except GoldVersionError as e:
                    log.warning("%s", e)
                except (OSError, pa.ArrowException) as e:  # its files vacuumed after a later build replaced it
                    from pipelines.lake.commit import readable_error

                    log.warning("%s v%s (featurize build %s) cannot be read any more (%s): sizing the embeddings "
                                "from a scan of the ids the gold tables hold", vocab_sizes, v, build,
                                readable_error(e))
                if cards:
                    vocab = f"{vocab_sizes}@v{v}"
    if vocab and not cards:
        try:
            cards = cardinalities_from_vocabulary(vocab, sparse_names)
        except ValueError as e:
            log.warning("ignoring vocabulary %s: %s", vocab, e)
            cards = []
        if cards and len(cards) != n_sparse:
            log.warning("vocabulary %s has %d columns, table has %d; scanning ids instead", vocab, len(cards), n_sparse)
            cards = []
    if not cards and n_sparse:
        cards = [0] * n_sparse
        for split, uri in (("train", train), ("valid", valid), ("test", test)):
            if uri:
                ids = _max_ids(uri, versions[split], sparse, sparse_arr, n_sparse)
                cards = [max(a, b) for a, b in zip(cards, ids)]
        vocab = None
    return DataSpec(
        train=train,
        valid=valid,
        test=test,
        versions=versions,
        label=label,
        dense_columns=dense,
        sparse_columns=sparse,
        dense_is_array=dense_arr,
        sparse_is_array=sparse_arr,
        num_dense=num_dense,
        cardinalities=[max(1, c) for c in cards],
        vocabulary=vocab,
        train_rows=snap.num_rows,
        gold=gold,
        requested=requested,
        table_ids={"train": snap.table.metadata().id},  # a lake rebuilt at the same path has a v0 again
    )


def _described(path: str) -> tuple[dict[str, int] | None, str | None]:
    """The gold versions a ``features.json`` describes (None: not one of featurize's) and the
    path of its build's ``vocab_sizes`` table."""
    from pipelines.lake.fs import read_small_file

    try:
        doc = json.loads(read_small_file(path))
        described = {s: int(d["version"]) for s, d in doc["tables"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, None
    vocab_sizes = doc.get("vocab_sizes") if isinstance(doc.get("vocab_sizes"), dict) else {}
    return described, vocab_sizes.get("path")


def batch_to_inputs(batch: dict[str, torch.Tensor], spec: DataSpec, device: torch.device | str = "cpu"):
    """Loader batch -> ``(dense float32 [B, D], sparse int32/int64 [B, C], label float32 [B], valid mask|None)``.

    Integer ids keep their dtype (int32 gold columns stay int32: embedding lookups accept
    them, and skipping the int64 copy matters at high samples/s)."""
    if spec.dense_is_array:
        dense = batch[spec.dense_columns[0]]
    elif spec.dense_columns:
        dense = torch.stack([batch[c] for c in spec.dense_columns], dim=1)
    else:
        dense = torch.zeros(batch[spec.label].shape[0], 0)
    if spec.sparse_is_array:
        sparse = batch[spec.sparse_columns[0]]
    elif spec.sparse_columns:
        sparse = torch.stack([batch[c] for c in spec.sparse_columns], dim=1)
    else:
        sparse = torch.zeros(batch[spec.label].shape[0], 0, dtype=torch.long)
    label = batch[spec.label]
    mask = batch.get("_valid")
    nb = device != "cpu" and str(device) != "cpu"
    return (
        dense.to(device, torch.float32, non_blocking=nb),
        sparse.to(device, sparse.dtype if sparse.dtype in (torch.int32, torch.int64) else torch.long, non_blocking=nb),
        label.reshape(-1).to(device, torch.float32, non_blocking=nb),
        None if mask is None else mask.reshape(-1).to(device, torch.bool, non_blocking=nb),
    )
