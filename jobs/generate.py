"""``bigopt generate criteo <conf> [k=v ...] [--out DIR] [--overwrite]``: synthetic raw Criteo click logs.

Writes ``criteo.generate.days`` day files ``day_0 .. day_{N-1}`` (the 1TB layout) or one
Kaggle ``train.txt`` (``criteo.generate.layout=kaggle``), plus an optional unlabelled
``test.txt``, plain or ``.gz``, into ``criteo.raw_dir``: tab-separated label/I1..I13/C1..C26
lines with Kaggle-like statistics; deterministic by ``criteo.generate.seed``.

    bigopt generate criteo conf/demo.yaml
    bigopt generate criteo conf/demo.yaml criteo.generate.days=24 criteo.generate.gzip=true
    spark-submit jobs/generate.py criteo conf/demo.yaml
"""
from __future__ import annotations

LEADING_ARGS = {"dataset": "which raw format to generate (criteo)"}


def add_arguments(parser) -> None:
    parser.add_argument("--out", default=None, help="output directory (default: criteo.raw_dir)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace files of the names it writes that no earlier generate wrote (refused otherwise)")


def run(cfg, args) -> int:
    import sys
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from jobs.console import make_console

    if args.dataset != "criteo":
        print(f"bigopt generate: unknown dataset {args.dataset!r} (available: criteo)", file=sys.stderr)
        return 2
    from pipelines.criteo.generate import generate_files, plan_files

    if args.out:
        cfg.criteo.raw_dir = args.out
    console = make_console()
    gen = cfg.criteo.generate
    planned = plan_files(gen)
    t0 = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    # refreshed from the callback, not by rich's refresh thread: with a second thread running,
    # the generator's workers would start by spawn (safe) instead of fork (~1 s faster here)
    with Progress(*columns, console=console, transient=True, auto_refresh=False) as progress:
        tasks = {name: progress.add_task(name, total=rows) for name, rows, _labeled in planned}
        try:
            files = generate_files(cfg, progress=lambda name, done: progress.update(tasks[name], completed=done,
                                                                                    refresh=True),
                                   overwrite=args.overwrite)
        except ValueError as e:
            print(f"bigopt generate: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # raw_dir is a file, or not writable
            print(f"bigopt generate: cannot write to {cfg.criteo.raw_dir}: {e}", file=sys.stderr)
            return 1
    secs = time.perf_counter() - t0
    rows = sum(f.rows for f in files)
    table = Table(title=f"generated {rows:,} rows in {len(files)} file(s) in {secs:.1f}s "
                        f"({rows / max(secs, 1e-9):,.0f} rows/s) -> {cfg.criteo.raw_dir}")
    for col, just in (("file", "left"), ("rows", "right"), ("positives", "right"), ("MB", "right")):
        table.add_column(col, justify=just)
    for f in files:
        pos = f"{f.positives / f.rows:.1%}" if f.labeled and f.rows else "unlabelled"
        table.add_row(f.path, f"{f.rows:,}", pos, f"{f.bytes / 1e6:.1f}")
    console.print(table)
    return 0


if __name__ == "__main__":
    from jobs.cli import submit_main

    submit_main("generate")
