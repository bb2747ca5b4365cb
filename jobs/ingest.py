"""``bigopt ingest <conf> [--force]``: raw Criteo files -> bronze Delta (+ quarantine, ledger).

Already-ingested files (by the ledger) are skipped; ``--force`` re-ingests them by replacing
their rows. Prints per-file accounting: lines = rows_ok + rows_rejected.
"""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--force", action="store_true", help="re-ingest files already in the ledger (replaces their rows)")


def run(cfg, args) -> int:
    from rich.console import Console
    from rich.table import Table

    from pipelines.criteo.ingest import IngestError, ingest
    from pipelines.spark import spark_from_config

    console = Console()
    spark = spark_from_config(cfg.spark)
    try:
        rep = ingest(spark, cfg, force=args.force)
    except IngestError as e:
        console.print(f"[red]bigopt ingest: {e}[/red]")
        return 1
    table = Table(title=f"ingest batch {rep.batch_id}: {rep.ingested} file(s) ingested, {rep.skipped} skipped, {rep.seconds:.1f}s")
    for col in ("file", "status", "lines", "rows_ok", "rows_rejected", "note"):
        table.add_column(col)
    for f in rep.files:
        table.add_row(f.source, f.status, str(f.lines), str(f.rows_ok), str(f.rows_rejected), f.note)
    console.print(table)
    console.print(
        f"rows_in = {rep.rows_in} = rows_ok {rep.rows_ok} + rows_rejected {rep.rows_rejected}; "
        f"bronze v{rep.bronze_version} ({rep.bronze}), quarantine v{rep.quarantine_version}, ledger v{rep.ledger_version}"
    )
    return 0 if rep.rows_in == rep.rows_ok + rep.rows_rejected else 1


if __name__ == "__main__":
    from jobs.cli import submit_main

    submit_main("ingest")
