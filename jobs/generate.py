"""``bigopt generate criteo <conf>``: synthetic raw files in exactly the raw Criteo format.

Writes ``criteo.generate.days`` day files (or one Kaggle ``train.txt``) of tab-separated
label/I1..I13/C1..C26 lines into ``criteo.raw_dir``; deterministic by ``criteo.generate.seed``.
"""
from __future__ import annotations

LEADING_ARGS = {"dataset": "which raw format to generate (criteo)"}


def add_arguments(parser) -> None:
    pass


def run(cfg, args) -> int:
    import os
    import sys
    import time

    from rich.console import Console
    from rich.table import Table

    if args.dataset != "criteo":
        print(f"bigopt generate: unknown dataset {args.dataset!r} (available: criteo)", file=sys.stderr)
        return 2
    from pipelines.criteo.generate import generate

    console = Console()
    t0 = time.perf_counter()
    with console.status(f"generating Criteo-format files in {cfg.criteo.raw_dir}"):
        paths = generate(cfg)
    table = Table(title=f"generated {len(paths)} file(s) in {time.perf_counter() - t0:.1f}s")
    table.add_column("file")
    table.add_column("MB", justify="right")
    for p in paths:
        table.add_row(str(p), f"{os.path.getsize(p) / 1e6:.1f}")
    console.print(table)
    return 0


if __name__ == "__main__":
    from jobs.cli import submit_main

    submit_main("generate")
