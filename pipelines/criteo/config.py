"""The ``criteo:`` config section (composed into the root config by :mod:`jobs.config`).

    criteo:
      name: criteo                 # lake dataset name: <lake.root>/<name>/{bronze,gold}/...
      raw_dir: data/criteo/raw     # where `generate` writes; what `ingest` reads if `inputs` is empty
      inputs: []                   # files, globs or directories to ingest (plain or .gz)
      generate: {...}              # synthetic raw files (GenerateConfig)
      ingest: {...}                # raw -> bronze (IngestConfig)
      featurize: {...}             # bronze -> gold (FeaturizeConfig)

Every field has a default, so ``criteo: {}`` is a valid (small, local) setup.
"""
from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from pipelines.config import Section


class GenerateConfig(Section):
    """Synthetic click logs in exactly the raw Criteo format."""

    layout: Literal["days", "kaggle"] = Field(
        "days", description="days: day_0..day_{N-1} (1TB layout); kaggle: one train.txt with all rows"
    )
    days: int = Field(3, ge=1, le=366)
    rows_per_day: int = Field(70_000, ge=1)
    test_rows: int = Field(0, ge=0, description="rows of an unlabelled test.txt (39 fields, Kaggle style)")
    gzip: bool = False
    compress_level: int = Field(1, ge=1, le=9, description="gzip level (1 is ~5x faster than 6)")
    seed: int = Field(0, ge=0, description="the data's identity: same seed and settings, same bytes")
    positive_rate: float = Field(0.25, gt=0.0, lt=1.0)
    cardinality_scale: float = Field(
        1.0, gt=0.0, le=4.0, description="scale the Kaggle-like per-column value universes (3 .. 10M values)"
    )
    zipf_exponent: float = Field(1.05, gt=0.5, le=3.0, description="heavy tail of categorical frequencies")
    final_newline: bool = True
    chunk_rows: int = Field(500_000, ge=1_000, le=4_000_000,
                            description="rows generated and written per step; part of the data's identity "
                                        "(each chunk has its own random stream), like the seed")
    workers: int = Field(0, ge=0, description="processes (0: one per CPU core, at most one per chunk; "
                                              "the bytes do not depend on it)")


class IngestConfig(Section):
    """Raw files -> bronze Delta table (+ quarantine, ledger)."""

    file_globs: list[str] = Field(
        default_factory=lambda: ["day_*", "*.txt", "*.txt.gz", "*.tsv", "*.tsv.gz"],
        description="basenames taken when an input is a directory",
    )
    exclude_globs: list[str] = Field(
        default_factory=lambda: ["readme*"],
        description="basenames never taken from a directory, matched ignoring case (the Kaggle archive's readme.txt)",
    )
    unlabeled_globs: list[str] = Field(
        default_factory=lambda: ["*test*"],
        description="basenames of unlabelled (39-field, no label) files; every other file is labelled (40 fields)",
    )
    day_regex: str = Field(r"day_(\d+)", description="day number from the basename (its first group); no match -> day -1")

    @field_validator("day_regex")
    @classmethod
    def _one_group(cls, v: str) -> str:
        try:
            groups = re.compile(v).groups
        except re.error as e:
            raise ValueError(f"not a regular expression ({e})") from None
        if not groups:
            raise ValueError(r"needs a group around the day's digits, as in day_(\d+)")
        return v

    verify: bool = Field(
        True, description="record each file's sha256 in the ledger (split plain files get one extra hashing task)"
    )
    files_per_commit: int = Field(16, ge=1, description="files ingested (and committed) per Spark job")
    chunk_bytes: int = Field(
        128 << 20, ge=1 << 16, description="plain files are parsed in byte ranges of this size, one Spark task each"
    )
    block_bytes: int = Field(
        # 16 MiB: ~7% less CPU per chunk than 32 MiB (a 32 MiB buffer is past glibc's mmap
        # threshold, so every block was a fresh mapping to fault in); 8 MiB and below cost more
        16 << 20, ge=1 << 12, description="a task parses this many bytes of lines at a time (memory per task)"
    )
    row_group_rows: int = Field(131_072, ge=1024, description="bronze Parquet row-group size")
    max_line_preview: int = Field(4096, ge=64, description="quarantine keeps at most this many chars of a line")
    max_rejected_share: float = Field(
        0.5, ge=0.0, le=1.0, description="a file more than this share of whose lines are bad is not ingested (nothing "
        "committed for it, no ledger entry, exit 1, named with its main reasons): it is not in Criteo's raw format, "
        "and quarantining all of it lost it without an error; 1: never"
    )
    in_flight_s: float = Field(
        600, ge=0, description="bronze rows no ledger entry confirms yet, committed less than this many seconds ago, "
        "are taken for an ingest still recording them: --drop-unconfirmed leaves them, featurize builds from the "
        "latest bronze version the ledger confirms (0: every such row is an interrupted ingest's)"
    )


class SplitConfig(Section):
    mode: Literal["auto", "day", "random"] = Field(
        "auto", description="auto: 'day' when test_days/valid_days are set or bronze's labelled rows "
        "all come from dated files (day_N) spanning >= 2 days, else 'random' (Kaggle)"
    )
    test_days: list[int] | None = Field(None, description="day mode: held-out days (default: the last day)")
    valid_days: list[int] | None = Field(
        None, description="day mode: validation days; default: valid_share of the held-out days' rows"
    )
    valid_share: float = Field(0.5, ge=0.0, le=1.0, description="share of held-out rows that go to valid")
    train_fraction: float = Field(6 / 7, gt=0.0, lt=1.0, description="random mode: DLRM Kaggle uses 6/7")
    # the seed is the first argument of Spark's xxhash64 over each row, typed as F.lit types it:
    # an int when it fits in 32 bits, else a bigint (the same hash only with the same type)
    seed: int = Field(0, ge=-(2**63), le=2**63 - 1, description="the row hash's seed (a 64-bit integer): random "
                      "mode's split, and day mode's split of the held-out days' rows into valid and test when "
                      "valid_days is unset")


class FeaturizeConfig(Section):
    """Bronze -> gold train/valid/test + vocabulary."""

    strategy: Literal["vocab", "hash"] = "vocab"
    freq_threshold: int = Field(3, ge=1, le=2**31 - 1,
                                description="vocab: values seen fewer times in train share the rare id")
    max_vocab_size: int | None = Field(None, ge=1, description="vocab: keep at most this many values per column")
    hash_buckets: int = Field(1 << 18, ge=2, le=(1 << 31) - 1,
                              description="hash: ids in [0, hash_buckets); id 0 = missing (gold ids are int32)")
    split: SplitConfig = Field(default_factory=SplitConfig)
    bronze_version: int | None = Field(None, ge=0, description="pin the bronze snapshot (default: latest)")
    row_group_rows: int = Field(131_072, ge=1024, description="gold Parquet row-group size (loader batch unit)")
    compression: Literal["lz4", "snappy", "zstd", "gzip", "none"] = Field(
        "lz4", description="gold Parquet codec: lz4 decodes fastest (the loader reads gold every epoch); zstd is smaller"
    )


class CriteoConfig(Section):
    name: str = Field("criteo", pattern=r"^[A-Za-z0-9_.-]+$", description="dataset name in the lake")
    raw_dir: str = "data/criteo/raw"
    inputs: list[str] = Field(default_factory=list, description="files/globs/dirs to ingest; empty: raw_dir")
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    featurize: FeaturizeConfig = Field(default_factory=FeaturizeConfig)

    def input_specs(self) -> list[str]:
        return list(self.inputs) or [self.raw_dir]
