"""``bigopt quarantine <conf> [k=v ...] [--batch ID] [--source FILE] [--reason TEXT] [--limit N] [--raw]``

What ingest quarantined, read from the quarantine Delta table without Spark: the number of
lines per file and reason, then example lines of each (20 in all by default; TABs shown as
``⇥``, other control bytes as their Unicode pictures: ``␛``, ``␀``). ``--raw`` prints every matching line's exact bytes instead (or ``--limit`` of them),
one per line, to feed other tools. ``bigopt ingest`` prints this command for its own batch when
it rejected lines.

    bigopt quarantine conf/criteo.yaml
    bigopt quarantine conf/criteo.yaml --batch b20261122-054509-8a451b --reason hex
    bigopt quarantine conf/criteo.yaml --source day_3.gz --raw > day_3.bad.txt
"""
from __future__ import annotations

import itertools


def add_arguments(parser) -> None:
    from jobs.cli import at_least

    parser.add_argument("--batch", default=None, help="only lines of this ingest batch (as bigopt ingest prints it)")
    parser.add_argument("--source", default=None, metavar="FILE", help="only lines of this raw file (its name)")
    parser.add_argument("--reason", default=None, metavar="TEXT", help="only reasons containing TEXT (any case)")
    parser.add_argument("--limit", type=at_least(0), default=None, help="lines to show (default: 20; --raw: all)")
    parser.add_argument("--raw", action="store_true", help="print the lines' exact bytes, one per line")


def run(cfg, args) -> int:
    from jobs.console import print_error
    from jobs.spark_step import error_text
    from pipelines.criteo.quarantine import QuarantineError

    try:
        return _show(cfg, args)
    except QuarantineError as e:  # a damaged log: one line, not a traceback
        print_error(error_text("quarantine", e))
        return 1


def _show(cfg, args) -> int:
    from rich.table import Table

    from jobs.console import make_console
    from pipelines.criteo.quarantine import quarantined, quarantined_lines

    filters = {"batch": args.batch, "source": args.source, "reason": args.reason}
    if args.raw:  # the exact bytes, one line per line (LF ends; a stripped CR is not restored)
        import sys

        sys.stdout.flush()
        out, n = sys.stdout.buffer, 0
        for n, line in enumerate(itertools.islice(quarantined_lines(cfg, **filters), args.limit), 1):
            out.write(line + b"\n")
        out.flush()
        if not n and args.source:
            print(f"bigopt quarantine: {_no_line_of(cfg, args)}", file=sys.stderr)
        return 0
    view = quarantined(cfg, **filters, limit=20 if args.limit is None else args.limit)
    console = make_console()
    if view.version is None:
        console.print(f"nothing quarantined yet: no table at {view.table}")
        return 0
    where = ", ".join(f"{k} {v!r}" for k, v in filters.items() if v)
    title = f"quarantine v{view.version}: {view.lines:,} line(s)" + (f" where {where}" if where else "")
    if not view.counts:
        console.print(f"{title}\n{view.table}")
        if args.source:  # --source takes a file's whole name (day_3.gz, not day_3): say which exist
            console.print(_no_line_of(cfg, args))
        return 0
    console.print(title)  # not the table's title: rich wraps that to the table's width
    counts = Table()
    for col, just in (("file", "left"), ("reason", "left"), ("lines", "right")):
        counts.add_column(col, justify=just)
    for source, reason, n in view.counts:
        counts.add_row(source, reason, f"{n:,}")
    console.print(counts)
    if view.examples:
        kinds = len({(ex["source"], ex["reason"]) for ex in view.examples})
        lines = Table(title=f"{len(view.examples)} of them, " + (
            "a few of each kind" if kinds == len(view.counts) else
            f"one of each of the first {kinds} of {len(view.counts)} kinds (--limit for more)"))
        for col in ("file", "reason", "fields", "line"):
            lines.add_column(col, justify="right" if col == "fields" else "left", overflow="fold")
        for ex in view.examples:
            lines.add_row(ex["source"], ex["reason"], str(ex["num_fields"]), ex["line"].translate(_SHOWN))
        console.print(lines)
    console.print(view.table)
    return 0


# a line's control bytes shown as their Unicode pictures (␛, ␀, ␡), TABs as ⇥: an escape
# sequence in a bad line would otherwise recolour or clear the operator's terminal
_SHOWN = {**{i: 0x2400 + i for i in range(32)}, 0x7F: 0x2421, 0x09: "⇥"}


def _no_line_of(cfg, args) -> str:
    """Why ``--source`` found no line: the file has none (``--source`` takes a file's whole
    name: the files that have some), or the other filters matched none of its lines."""
    from pipelines.criteo.quarantine import quarantined_sources

    names = quarantined_sources(cfg)
    if args.source in names:
        others = [f"--{k} {v!r}" for k, v in (("batch", args.batch), ("reason", args.reason), ("limit", args.limit))
                  if v is not None]
        return f"no line of {args.source!r} where {' '.join(others)}"
    return (f"no line of {args.source!r}; files with quarantined lines: {', '.join(names[:20]) or 'none'}"
            + (f" and {len(names) - 20} more" if len(names) > 20 else ""))


if __name__ == "__main__":
    from jobs.cli import submit_main

    submit_main("quarantine")
