"""A PySpark worker daemon that imports the pipelines' heavy modules before it forks workers.

Spark starts Python workers by forking a daemon (``python -m pyspark.daemon``) that has only
pyspark imported, so every new worker pays ~1 s of CPU importing pyarrow, numpy, pandas and
deltalake the first time it runs a parse, a Delta read/write task or a data-source planning
step. :func:`pipelines.spark.get_spark` sets ``spark.python.daemon.module`` to this module
(override it in ``spark.conf`` to opt out): the daemon imports them once, makes the first
Arrow compute call (which sets up Arrow's kernels, ~0.6 s of CPU) and loads the compiled
(Numba) kernels, ~1 s, so every forked worker starts warm. It also sets Arrow's allocator to
keep freed memory for a second (below). Nothing else changes.
"""
from __future__ import annotations

import os

# Arrow allocates through mimalloc, which by default hands freed pages back to the OS after
# 10 ms: a task that reads or writes a row group every ~0.1 s page-faults its buffers in again
# for each one. Keeping freed pages for a second made the Criteo ingest + featurize ~8% faster
# (docs/criteo.md). Must be set before pyarrow loads; a value in the environment wins.
os.environ.setdefault("MIMALLOC_PURGE_DELAY", "1000")


def warm_up() -> None:
    """Import the heavy modules and load the compiled kernels once, before workers fork."""
    try:  # never let a warm-up problem take the workers down
        import pyarrow.compute  # noqa: F401
        import pyarrow.csv  # noqa: F401

        import pipelines.criteo.parse  # noqa: F401  (numpy, pyarrow.csv)
        import pipelines.lake.commit  # noqa: F401  (pyarrow, deltalake)
        import pipelines.lake.datasource  # noqa: F401  (pyspark.sql.datasource, pandas)
        import pipelines.lake.files  # noqa: F401
        import pipelines.lake.reader  # noqa: F401  (pyarrow.dataset)
        import pipelines.lake.tasks  # noqa: F401

        # Arrow sets up its compute kernels on the first compute call (~0.6 s of CPU): do it here
        # once, not in every forked worker
        pyarrow.compute.less(pyarrow.array([1]), 0)
        # the compiled kernels (line scanner, Spark's xxhash64): load them from Numba's cache (or
        # compile them, the first time on a machine) once, not in every worker
        import pipelines.criteo.scan
        import pipelines.criteo.spark_xxhash

        pipelines.criteo.scan.warm_up()
        pipelines.criteo.spark_xxhash.warm_up()
    except Exception:  # noqa: BLE001
        pass


if __name__ == "__main__":
    # Only in the daemon itself. A process a worker starts with multiprocessing's "spawn" (as
    # Horovod's launcher does for every rank, to run its command) re-runs the parent's main
    # module under the name "__mp_main__": the warm-up there took ~5 s per rank and warmed
    # nothing it uses.
    warm_up()

    from pyspark.daemon import manager

    manager()
