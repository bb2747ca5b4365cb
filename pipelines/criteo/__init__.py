"""The Criteo click-log pipeline: raw TSV -> bronze (+ quarantine, ledger) -> gold.

One plain function per stage, each in the module of the same name:

    from pipelines.criteo.generate import generate      # generate(cfg) -> [paths]
    from pipelines.criteo.ingest import ingest          # ingest(spark, cfg, force=False) -> IngestReport
    from pipelines.criteo.featurize import featurize    # featurize(spark, cfg) -> FeaturizeReport

(``jobs/run.py`` chains them on one SparkSession.) Reports are dataclasses with the counts,
table paths and versions, and a one-line ``summary()``. The package itself imports nothing
heavy: loading the config imports :mod:`pipelines.criteo.config`. See docs/criteo.md.
"""
