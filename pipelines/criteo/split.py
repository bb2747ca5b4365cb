"""The train/valid/test split of a gold build, planned from bronze's Delta log and the ingest
ledger alone (no Spark, no data read, no Numba), and the settings a build records.

    plan = plan_split(cfg, bronze_view(cfg))        # featurize: day or random, held-out days
    plan = plan_split(cfg, ledger_view(cfg, 7), warn=False)   # training: what a build of v7 had
    build_settings(cfg.criteo.featurize, plan)      # the strings its commits record
    rule = SplitRule.of(cfg, plan); rule.of_rows(batch)   # featurize's tasks: each row's split

Training imports this to compare its command's settings with a build's: the featurize module
loads the Numba kernels (~0.4 s and ~150 MB) it does not need.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from pipelines.criteo.schema import DENSE, SPARSE, tables

if TYPE_CHECKING:
    import pyarrow as pa

    from pipelines.lake import DeltaSnapshot

log = logging.getLogger(__name__)


class FeaturizeError(RuntimeError):
    """Bronze cannot be featurized as it stands (empty, inconsistent with the ledger, or a
    file of it unreadable)."""


@dataclass
class BronzeView:
    """Which bronze rows are usable: the sources (and their batches) the ledger confirms."""

    version: int
    sources: dict[str, dict]  # source -> {"rows", "day", "labeled", "batch"}
    snapshot: DeltaSnapshot | None = field(default=None, repr=False, compare=False)  # what it was read from

    @property
    def labeled_sources(self) -> list[str]:
        return sorted(s for s, v in self.sources.items() if v["labeled"] and v["rows"])

    @property
    def unlabeled_rows(self) -> int:
        return sum(v["rows"] for v in self.sources.values() if not v["labeled"])

    def days(self) -> list[int]:
        return sorted({v["day"] for s, v in self.sources.items() if v["labeled"] and v["rows"]})


@dataclass
class SplitPlan:
    mode: str
    test_days: list[int] = field(default_factory=list)
    valid_days: list[int] = field(default_factory=list)


def ledger_view(cfg, version: int) -> BronzeView:
    """Bronze's labelled days and sources at ``version`` as the ledger alone records them (no
    bronze log read, no check): enough to plan the split a build of that version had."""
    from pipelines.criteo.bronze import current_entries, read_ledger

    rows = [r for r in read_ledger(tables(cfg)["ledger"]) if (r["bronze_version"] or 0) <= version]
    return BronzeView(version, view_sources(current_entries(rows)))


def view_sources(current: dict[str, dict]) -> dict[str, dict]:
    """A view's sources from the ledger's current entries."""
    return {src: {"rows": led["rows_ok"], "day": int(led["day"]), "labeled": bool(led["labeled"]),
                  "batch": led["ingest_batch"]} for src, led in sorted(current.items())}


def plan_split(cfg, view: BronzeView, warn: bool = True) -> SplitPlan:
    sp = cfg.criteo.featurize.split
    days = [d for d in view.days() if d >= 0]
    mode = sp.mode
    if mode == "auto":  # held-out days named: a day split, or an error saying why it cannot be one
        mode = "day" if sp.test_days or sp.valid_days or (len(days) >= 2 and len(days) == len(view.days())) \
            else "random"
    if mode == "random":
        return SplitPlan("random")
    if len(days) < 2 and not sp.test_days:
        raise FeaturizeError(f"split.mode=day needs at least 2 dated days in bronze, found {days}")
    test = sorted(sp.test_days) if sp.test_days else [max(days)]
    valid = sorted(sp.valid_days or [])
    if absent := sorted((set(test) | set(valid)) - set(days)):  # a typo, or a day not ingested yet
        raise FeaturizeError(f"split: day(s) {absent} named in split.test_days/valid_days have no labelled rows "
                             f"in bronze v{view.version} (its days: {days}); the split would hold none of them")
    if set(test) & set(valid):
        default = "" if sp.test_days else " (split.test_days not set: the last day is the test day)"
        raise FeaturizeError(f"split: days {sorted(set(test) & set(valid))} are both test and valid days{default}")
    if not set(days) - set(test) - set(valid):
        raise FeaturizeError(f"split: no training day left (days {days}, test {test}, valid {valid})")
    if warn:
        undated = {s: view.sources[s]["rows"] for s in view.labeled_sources if view.sources[s]["day"] < 0}
        _warn_day_layout(view.version, days, test, valid, undated)
    return SplitPlan("day", test, valid)


def _warn_day_layout(version: int, days: list[int], test: list[int], valid: list[int],
                     undated: Mapping[str, int]) -> None:
    """Legal splits that are seldom meant: a day missing among bronze's days (a delivery that
    has not arrived, or a day all quarantined), and training days later than a test day (the
    model learns from the days it is tested before: the 1TB protocol trains on the past), and
    validation days earlier than a training day (the model is then chosen on days it trains
    after: valid AUC overstates what the test days will show), and labelled files without a day
    (``undated``: source -> rows), which go to train (until the twenty-seventh session without
    a word: the featurize probe)."""
    if undated:
        names = sorted(undated)
        log.warning("split: %d labelled file(s) have no day in their name (criteo.ingest.day_regex), so a day split "
                    "puts their %s rows in train: %s%s", len(names), f"{sum(undated.values()):,}",
                    ", ".join(names[:5]), f" and {len(names) - 5} more" if len(names) > 5 else "")
    if gaps := sorted(set(range(min(days), max(days) + 1)) - set(days)):
        log.warning("split: bronze v%s has no labelled rows of day(s) %s (its days: %s): a day not delivered yet, "
                    "or all its lines quarantined? gold is built without it", version, day_spans(gaps),
                    day_spans(days))
    if later := sorted(d for d in set(days) - set(test) - set(valid) if d > min(test)):
        log.warning("split: training day(s) %s come after test day %s: the model is trained on later days than it "
                    "is tested on (split.test_days names the held-out days; the 1TB protocol holds out the last)",
                    day_spans(later), min(test))
    train = set(days) - set(test) - set(valid)
    if early := sorted(d for d in valid if d < max(train)):
        log.warning("split: validation day(s) %s come before training day %s: the model is chosen on days earlier "
                    "than some it is trained on (split.valid_days names the validation days; the 1TB protocol "
                    "validates on a day after the training days)", day_spans(early), max(train))


def day_spans(days: list[int]) -> str:
    """Sorted days as runs, so a long list stays one short line: ``[0-3, 5, 9-700] (697 days)``."""
    return f"[{day_runs(days)}]" + (f" ({len(days)} days)" if len(days) > 3 else "")


def day_runs(days: list[int]) -> str:
    """Sorted days as runs of consecutive days, the first 8: ``0-3, 5, 9-700``."""
    runs: list[list[int]] = []
    for d in days:
        if runs and d == runs[-1][1] + 1:
            runs[-1][1] = d
        else:
            runs.append([d, d])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs[:8])
    return text + (f", ... ({len(runs) - 8} more runs)" if len(runs) > 8 else "")


# the settings a build records (build_settings): their key -> criteo.featurize.<path>
BUILD_SETTINGS = {"freq_threshold": "freq_threshold", "max_vocab_size": "max_vocab_size",
                  "hash_buckets": "hash_buckets", "test_days": "split.test_days", "valid_days": "split.valid_days",
                  "valid_share": "split.valid_share", "train_fraction": "split.train_fraction",
                  "split_seed": "split.seed"}


def build_settings(fz, plan: SplitPlan) -> dict[str, str]:
    """The settings a gold build was made with, as its commits record them (strings, those
    that apply): training logs them as ``data.gold.*``, which the command's own
    ``criteo.featurize.*`` need not be (gold built earlier, with other settings)."""
    vocab = fz.strategy == "vocab"
    out = {
        "freq_threshold": fz.freq_threshold if vocab else None,
        "max_vocab_size": fz.max_vocab_size if vocab else None,
        "hash_buckets": None if vocab else fz.hash_buckets,
        "test_days": plan.test_days if plan.mode == "day" else None,
        "valid_days": plan.valid_days if plan.mode == "day" and plan.valid_days else None,
        "valid_share": fz.split.valid_share if not (plan.mode == "day" and plan.valid_days) else None,
        "train_fraction": fz.split.train_fraction if plan.mode == "random" else None,
        # the row hash splits random mode's rows, and the held-out days' rows between valid
        # and test in day mode without valid_days (until the twenty-seventh session only
        # random mode's seed was recorded, so two such builds with other seeds looked alike)
        "split_seed": fz.split.seed if not (plan.mode == "day" and plan.valid_days) else None,
    }
    return {k: json.dumps(v) if isinstance(v, list) else str(v) for k, v in out.items() if v is not None}


# ------------------------------------------------------------------- the rule per row (tasks)
TRAIN, VALID, TEST = 0, 1, 2  # positions in GOLD_SPLITS
ROW_COLUMNS = ["label", *DENSE, *SPARSE]  # what the row hash covers, in Spark's argument order


@dataclass(frozen=True)
class SplitRule:
    """The split of a bronze row, evaluated on Arrow batches inside tasks (picklable). Same
    decisions as the Spark SQL expression it replaced::

        day mode:    CASE WHEN day IN test_days THEN (valid_days given ? 'test' :
                                                      u < valid_share ? 'valid' : 'test')
                          WHEN day IN valid_days THEN 'valid' ELSE 'train' END
        random mode: u < train_fraction ? 'train' : u < cut ? 'valid' : 'test'

    with ``u = pmod(xxhash64(seed, label, I1..I13, C1..C26), 2^30) / 2^30`` and
    ``cut = train_fraction + (1 - train_fraction) * valid_share``."""

    mode: str
    test_days: tuple[int, ...] = ()
    valid_days: tuple[int, ...] = ()
    valid_share: float = 0.5
    train_fraction: float = 6 / 7
    seed: int = 0

    @classmethod
    def of(cls, cfg, plan: SplitPlan) -> SplitRule:
        sp = cfg.criteo.featurize.split
        return cls(plan.mode, tuple(plan.test_days), tuple(plan.valid_days), sp.valid_share, sp.train_fraction, sp.seed)

    def of_day(self, day: int | None) -> int | None:
        """The split of every row of a file of ``day``; None when it depends on the row."""
        if self.mode == "random":
            return None
        if day in self.test_days:
            return TEST if self.valid_days else None
        if day in self.valid_days:
            return VALID
        return TRAIN

    def may_train(self, day: int | None) -> bool:
        """Can a file of ``day`` hold train rows?"""
        return self.mode == "random" or (day not in self.test_days and day not in self.valid_days)

    def of_rows(self, batch: pa.RecordBatch) -> np.ndarray:
        """Per row (int8: TRAIN/VALID/TEST), for slices where :meth:`of_day` is None."""
        u = row_hash_unit(batch, self.seed)
        if self.mode == "random":
            tf = self.train_fraction
            cut = tf + (1.0 - tf) * self.valid_share
            return np.where(u < tf, TRAIN, np.where(u < cut, VALID, TEST)).astype(np.int8)
        return np.where(u < self.valid_share, VALID, TEST).astype(np.int8)


def row_hash_unit(batch: pa.RecordBatch, seed: int) -> np.ndarray:
    """Spark's ``pmod(xxhash64(lit(seed), label, I1..I13, C1..C26), 2^30) / 2^30`` per row."""
    from pipelines.criteo.spark_xxhash import xxhash64  # Numba: only where rows are split, not for planning

    h = xxhash64([seed, *[batch.column(c) for c in ROW_COLUMNS]])
    return (h & ((1 << 30) - 1)).astype(np.float64) / float(1 << 30)
