"""``bigopt featurize <conf>``: bronze -> gold train/valid/test Delta tables + vocabulary.

Dense: missing -> 0, negatives -> 0, log(1+x). Categorical: frequency-thresholded vocabulary
computed on the train split, or xxhash64 buckets (``criteo.featurize.strategy``).
"""
from __future__ import annotations


def add_arguments(parser) -> None:
    pass


def run(cfg, args) -> int:
    from rich.console import Console
    from rich.table import Table

    from pipelines.criteo.featurize import FeaturizeError, featurize
    from pipelines.spark import spark_from_config

    console = Console()
    spark = spark_from_config(cfg.spark)
    try:
        rep = featurize(spark, cfg)
    except FeaturizeError as e:
        console.print(f"[red]bigopt featurize: {e}[/red]")
        return 1
    table = Table(title=f"featurize ({rep.strategy}, {rep.split_mode} split) from bronze v{rep.bronze_version} in {rep.seconds:.1f}s")
    for col in ("split", "rows", "table", "version"):
        table.add_column(col)
    for split, n in rep.rows.items():
        table.add_row(split, str(n), rep.tables.get(split, ""), str(rep.versions.get(split, "")))
    console.print(table)
    console.print(f"embedding cardinalities: {rep.cardinalities}; features: {rep.features_json}")
    return 0


if __name__ == "__main__":
    from jobs.cli import submit_main

    submit_main("featurize")
