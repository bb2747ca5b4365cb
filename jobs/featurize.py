"""``bigopt featurize <conf> [k=v ...]``: bronze -> gold train/valid/test Delta + vocabulary.

Dense: missing -> 0, negatives -> 0, log(1 + x). Categorical (``criteo.featurize.strategy``):
a frequency-thresholded vocabulary computed on the train split (ids by descending frequency,
0 = missing, 1 = rare) or xxhash64 buckets. Splits by day (1TB layout) or by a seeded hash
(Kaggle). Writes ``<lake>/<criteo.name>/gold/{train,valid,test}``, the vocabulary tables and
``gold/features.json`` (per-column cardinalities + table versions for the trainer).

When gold already is what this would build (same bronze version, same ``criteo.featurize``
settings, its tables untouched since) nothing is rebuilt and Spark is not started; ``--force``
rebuilds anyway.

    bigopt featurize conf/demo.yaml criteo.featurize.strategy=hash
    spark-submit jobs/featurize.py conf/criteo.yaml
"""
from __future__ import annotations


def add_arguments(parser) -> None:
    from jobs.cli import at_least

    # a negative version is a usage error (exit 2), as criteo.featurize.bronze_version=-1 is a
    # config error; until the twenty-eighth session it failed in the step (exit 1)
    parser.add_argument("--bronze-version", type=at_least(0), default=None,
                        help="featurize this bronze version (default: criteo.featurize.bronze_version or latest)")
    parser.add_argument("--force", action="store_true", help="rebuild gold even when it is up to date")


def run(cfg, args) -> int:
    from rich.table import Table

    from jobs.spark_step import run_spark_step
    from pipelines.criteo.featurize import FeaturizeError, featurize

    if args.bronze_version is not None:
        cfg.criteo.featurize.bronze_version = args.bronze_version
    console, rep, status = run_spark_step(
        cfg, "featurize", lambda spark, progress: featurize(spark, cfg, progress=progress, force=args.force),
        errors=(FeaturizeError,))  # a missing bronze is an OSError, as lake_errors takes
    if status:
        return status
    built = "up to date, nothing written (--force rebuilds)" if rep.up_to_date else f"in {rep.seconds:.1f}s"
    table = Table(title=f"featurize ({rep.strategy}, {rep.split_mode} split) from bronze v{rep.bronze_version}: {built}")
    for col, just in (("split", "left"), ("rows", "right"), ("version", "right"), ("table", "left")):
        table.add_column(col, justify=just)
    for split, n in rep.rows.items():
        table.add_row(split, f"{n:,}", str(rep.versions.get(split, "")), rep.tables.get(split, ""))
    console.print(table)
    if rep.split_mode == "day":
        console.print(f"held-out days: test {rep.test_days}" + (f", valid {rep.valid_days}" if rep.valid_days else
                                                               " (valid = a hashed share of them)"))
    if rep.unlabeled_rows:
        console.print(f"{rep.unlabeled_rows:,} unlabelled bronze rows (test files) left out of gold")
    cards = rep.cardinalities
    console.print(f"cardinalities (min/max/sum): {min(cards):,} / {max(cards):,} / {sum(cards):,}")
    console.print(f"features: {rep.features_json}")
    return 0


if __name__ == "__main__":
    from jobs.cli import submit_main

    submit_main("featurize")
