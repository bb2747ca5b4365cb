"""Lake write/read throughput: the delta-rs data source vs Spark's own Parquet writer/reader.

Same session, same cached data (Criteo-bronze-like: label, 13 bigint, 26 string columns), same
codec (zstd). Writes are timed end to end including the Delta commit; reads materialise every
column through Spark's ``noop`` sink.

    python benchmarks/lake_write.py [--rows 2000000] [--repeats 3] [--quick]

Each of the four timings is the median over the repeats of its seconds; with ``--quick``'s two
repeats that is their mean. The figures come last, one ``name: value`` per line: ``rows``,
``columns``, ``repeats``, the four rows/s, and last ``write_ratio_vs_parquet`` (data-source
rows/s / parquet rows/s, goal >= 0.8) and ``read_ratio_vs_parquet``.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def make_df(spark, rows: int):
    from pyspark.sql import functions as F

    cols = [(F.rand(1) < 0.25).cast("int").alias("label")]
    for i in range(1, 14):
        v = F.floor(F.exp(F.rand(10 + i) * 8)).cast("bigint")
        cols.append(F.when(F.rand(100 + i) < 0.2, None).otherwise(v).alias(f"I{i}"))
    for i in range(1, 27):
        card = [10, 100, 1000, 100_000, 1_000_000][i % 5]
        h = F.lpad(F.hex(F.floor(F.pow(F.rand(200 + i), 3) * card).cast("bigint") * 2654435761 % (1 << 32)), 8, "0")
        cols.append(F.when(F.rand(300 + i) < 0.1, None).otherwise(F.lower(h)).alias(f"C{i}"))
    return spark.range(rows).select(*cols).repartition(2)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def report_lines(rows: int, repeats: int, secs: dict[str, list[float]]) -> list[str]:
    """The figures, one ``name: value`` a line, from each timing's seconds per repeat (``w_pq``,
    ``w_dl``, ``r_pq``, ``r_dl``). Until the twenty-eighth session the first line was ``rows: N
    columns: 40  repeats: R (median)``: three figures on one line, which a ``name: value`` reader
    took as one."""
    m = {k: statistics.median(v) for k, v in secs.items()}
    return [
        f"rows: {rows}",
        "columns: 40",
        f"repeats: {repeats}",
        f"write_rows_per_s_parquet: {rows / m['w_pq']:.0f}",
        f"write_rows_per_s_delta_datasource: {rows / m['w_dl']:.0f}",
        f"read_rows_per_s_parquet: {rows / m['r_pq']:.0f}",
        f"read_rows_per_s_delta_datasource: {rows / m['r_dl']:.0f}",
        f"write_ratio_vs_parquet: {m['w_pq'] / m['w_dl']:.3f}",
        f"read_ratio_vs_parquet: {m['r_pq'] / m['r_dl']:.3f}",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="500k rows, 2 repeats (< 2 min)")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.repeats = 500_000, 2

    from pipelines.lake import read_table, write_table
    from pipelines.spark import get_spark

    spark = get_spark("bench-lake", master="local[2]", ui=False, log_level="ERROR",
                      conf={"spark.sql.parquet.compression.codec": "zstd"})
    df = make_df(spark, args.rows).cache()
    df.count()
    tmp = Path(tempfile.mkdtemp(prefix="bench-lake-"))
    w_pq, w_dl, r_pq, r_dl = [], [], [], []
    try:
        for i in range(args.repeats):
            pq_path, dl_path = str(tmp / f"pq{i}"), str(tmp / f"dl{i}")
            w_pq.append(timed(lambda: df.write.mode("overwrite").parquet(pq_path)))
            w_dl.append(timed(lambda: write_table(df, dl_path, mode="overwrite", compression="zstd")))
            r_pq.append(timed(lambda: spark.read.parquet(pq_path).write.format("noop").mode("overwrite").save()))
            r_dl.append(timed(lambda: read_table(spark, dl_path).write.format("noop").mode("overwrite").save()))
            shutil.rmtree(pq_path, ignore_errors=True)
            shutil.rmtree(dl_path, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        spark.stop()
    print(f"(each timing: the median of {args.repeats} repeats"
          f"{', that is their mean' if args.repeats == 2 else ''}; ratios of those medians)")
    print("\n".join(report_lines(args.rows, args.repeats, dict(w_pq=w_pq, w_dl=w_dl, r_pq=r_pq, r_dl=r_dl))))


if __name__ == "__main__":
    main()
