"""``bigopt ingest <conf> [k=v ...] [--force] [--input PATH ...] [--drop-source NAME ...]``: raw Criteo -> bronze Delta.

Reads ``criteo.inputs`` (files, globs or directories, local or ``s3://``/``gs://``/``hdfs://``
URIs; default ``criteo.raw_dir``), plain or
gzip, Kaggle train/test or 1TB ``day_N`` files, and appends typed rows to the bronze table
(bad lines to the quarantine table, one ledger row per file). Files already in the ledger
are skipped; ``--force`` re-ingests them by replacing their rows; ``--drop-source`` deletes
the rows of a file that is gone (a day re-delivered under another name: the run names such
files). Prints the per-file
accounting ``lines = rows_ok + rows_rejected``; exits 1 on an unreadable input (a damaged gzip:
nothing committed for it, the other files ingested; a format or name ingest cannot read, a
symbolic link whose target is missing, a FIFO: found before anything runs, nothing committed).

    bigopt ingest conf/criteo.yaml
    spark-submit jobs/ingest.py conf/criteo.yaml criteo.inputs='[/data/criteo/day_*.gz]'
    bigopt ingest conf/criteo.yaml lake.root=s3://bucket/lake --input 's3://bucket/criteo/day_*.gz'
"""
from __future__ import annotations


SKIPPED_ROWS_SHOWN = 20  # more files skipped as already ingested are one row of totals


def add_arguments(parser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="re-ingest files the ledger has under the same name, replacing their rows (never "
                             "duplicating them); a copy under another name is ingested as a source of its own")
    parser.add_argument("--drop-source", action="append", default=[], metavar="NAME",
                        help="delete the bronze and quarantine rows and the ledger entry of the source (file name) "
                             "NAME, whose file is no longer among the inputs: a day re-delivered under another "
                             "name (repeatable)")
    parser.add_argument("--input", action="append", default=None, metavar="PATH",
                        help="file, glob or directory to ingest instead of criteo.inputs (repeatable)")
    parser.add_argument("--drop-unconfirmed", action="store_true",
                        help="delete bronze and quarantine rows no ledger entry confirms (left by an interrupted "
                             "ingest) of files not among the inputs; a file the ledger has (its confirmed rows were "
                             "replaced by those) is dropped from the ledger too")


def run(cfg, args) -> int:
    import shlex

    from rich.table import Table

    from jobs.console import print_error, shown, styled
    from jobs.spark_step import error_text, run_spark_step
    from pipelines.criteo.ingest import CorruptInputError, IngestError, ingest

    unreadable: CorruptInputError | None = None

    def step(spark, progress):
        try:
            return ingest(spark, cfg, force=args.force, inputs=args.input, progress=progress,
                          drop_unconfirmed=args.drop_unconfirmed, drop_sources=args.drop_source,
                          drop_unknown_ok=False)
        except CorruptInputError as e:
            # the files named with their control characters as pictures, as in the table (the
            # error line drops escape sequences: "day_9\x1b[31mbad" read "day_9bad")
            said = CorruptInputError([(shown(p), shown(why)) for p, why in e.problems], e.report)
            if e.report is None:  # found before anything ran
                raise said from e
            nonlocal unreadable
            unreadable = said  # found while reading: the other files were ingested, show them
            return e.report

    console, rep, status = run_spark_step(cfg, "ingest", step, errors=(IngestError, FileNotFoundError, ValueError))
    if status:
        return status
    table = Table(title=f"ingest batch {rep.batch_id}: {rep.ingested} file(s) ingested, "
                        f"{rep.skipped} skipped, " + (f"{rep.failed} failed, " if rep.failed else "")
                        + f"{rep.seconds:.1f}s")
    for col, just in (("file", "left"), ("day", "right"), ("status", "left"), ("lines", "right"),
                      ("rows_ok", "right"), ("rejected", "right"), ("note", "left")):
        table.add_column(col, justify=just)
    # files skipped as already ingested: one row each while few; a daily run over a folder of
    # months of days printed a row for every one of them (2,010 lines for 2,000 files)
    skipped = [f for f in rep.files if f.status == "skipped"]
    collapse = len(skipped) > SKIPPED_ROWS_SHOWN
    for f in rep.files:
        if collapse and f.status == "skipped":
            continue
        day = "-" if f.day < 0 else str(f.day)  # -1: no day_N in the file name
        table.add_row(shown(f.source) + ("" if f.labeled else " (unlabelled)"), day, f.status, f"{f.lines:,}",
                      f"{f.rows_ok:,}", f"{f.rows_rejected:,}", shown(f.note))
    if collapse:
        from pipelines.criteo.split import day_runs

        days = sorted({f.day for f in skipped if f.day >= 0})
        table.add_row(f"{len(skipped):,} files", day_runs(days) if days else "-", "skipped",
                      f"{sum(f.lines for f in skipped):,}", f"{sum(f.rows_ok for f in skipped):,}",
                      f"{sum(f.rows_rejected for f in skipped):,}", "already ingested, unchanged")
    console.print(table)
    if rep.dropped:
        console.print(f"dropped the bronze rows of {len(rep.dropped)} file(s): {', '.join(rep.dropped)}")
    for src, batch in sorted(rep.already_dropped.items()):  # a repeated --drop-source (a retry)
        console.print(f"{src}: already dropped, by batch {batch}: nothing to do")
    for src in rep.forgotten:
        console.print(f"  {src}: the rows its ledger entry confirmed had been replaced by those, so it is dropped from "
                      "the ledger too (ingest it again to have its rows back)")
    if rep.in_flight:  # an ingest between its bronze commit and its ledger entry
        console.print(f"bronze holds rows of {len(rep.in_flight)} file(s) that an ingest committed moments ago and "
                      "has not recorded in the ledger yet (still running?); left alone:")
        for src, (batch, ago, _) in sorted(rep.in_flight.items()):
            console.print(f"  {src}: batch {batch}, {ago:.0f} s ago (criteo.ingest.in_flight_s: after that, an "
                          "interrupted ingest's rows)")
    if rep.unconfirmed:  # featurize refuses bronze until they are ingested again or dropped
        console.print(styled(("bronze holds rows no ledger entry confirms (an interrupted ingest?) of files not "
                              "among this run's inputs; featurize refuses bronze until they are dealt with:", "yellow")))
        for src, why in rep.unconfirmed.items():
            console.print(f"  {src}: {why}")
    if rep.gone:  # a day renamed or re-delivered under another name: its rows twice in bronze
        # the same lake and inputs: without this run's --input the command ingests raw_dir
        same_lake = [a for a in (args.config, *args.overrides) if a] + [
            a for path in args.input or () for a in ("--input", path)]
        console.print(styled((f"bronze still holds the rows of {len(rep.gone)} file(s) the ledger has that are gone "
                              "(renamed, re-delivered under another name, deleted); where another file now holds "
                              "those rows, they are in bronze twice:", "yellow")))
        for src, r in sorted(rep.gone.items()):
            day = f"day {r['day']}, " if r["day"] is not None and r["day"] >= 0 else ""
            console.print(f"  {src} ({day}{r['rows_ok']:,} rows, was {r['path']})")
        console.print("  to drop them: " + shlex.join(["bigopt", "ingest", *same_lake,
                                                        *(a for src in sorted(rep.gone) for a in ("--drop-source", src))]))
    for folder, srcs in sorted(rep.synthetic.items()):  # a demo's lake reused for real data
        console.print(styled((f"bronze holds generated (synthetic) files of {folder} ({', '.join(srcs[:6])}"
                              f"{', ...' if len(srcs) > 6 else ''}) beside real ones: featurize would mix them into "
                              "one gold; drop them (--drop-source) or give the real data its own lake.root or "
                              "criteo.name", "yellow")))
    rate = rep.rows_in / rep.seconds if rep.seconds and rep.rows_in else 0
    console.print(
        f"rows_in {rep.rows_in:,} = rows_ok {rep.rows_ok:,} + rows_rejected {rep.rows_rejected:,}"
        + (f"  ({rate:,.0f} rows/s)" if rate else "")
    )
    if reasons := rep.reasons:
        top = list(reasons.items())[:8]
        console.print("rejected: " + "; ".join(f"{n:,} {reason}" for reason, n in top)
                      + (f"; {len(reasons) - len(top)} more reason(s)" if len(reasons) > len(top) else ""))
        same_lake = [a for a in (args.config, *args.overrides) if a]  # the config this run had
        console.print("the lines: " + shlex.join(["bigopt", "quarantine", *same_lake, "--batch", rep.batch_id]))
    for name, version, path in (("bronze", rep.bronze_version, rep.bronze),
                                ("quarantine", rep.quarantine_version, rep.quarantine),
                                ("ledger", rep.ledger_version, rep.ledger)):
        state = "unchanged" if version is None else f"v{version}"
        console.print(f"{name} {state} {path}")
    if unreadable is not None:
        print_error(error_text("ingest", unreadable))
    return 0 if rep.rows_in == rep.rows_ok + rep.rows_rejected and unreadable is None else 1


if __name__ == "__main__":
    from jobs.cli import submit_main

    submit_main("ingest")
