"""``bigopt quarantine <conf> [k=v ...] [--batch ID] [--source FILE] [--reason TEXT] [--limit N] [--raw]``

What ingest quarantined, read from the quarantine Delta table without Spark: the number of
lines per file and reason, then example lines of each (20 in all by default; TABs shown as
``⇥``, other control bytes as their Unicode pictures: ``␛``, ``␀``). ``--raw`` prints every matching line's exact bytes instead (or ``--limit`` of them),
one per line, to feed other tools. ``bigopt ingest`` prints this command for its own batch when
it rejected lines. A ``--batch`` or ``--source`` that finds no line says why (from the ledger:
the batch's files ingested again since, or dropped; the files that have lines).

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

    from jobs.console import make_console, shown
    from pipelines.criteo.quarantine import quarantined, quarantined_lines

    filters = {"batch": args.batch, "source": args.source, "reason": args.reason}
    if args.raw:  # the exact bytes, one line per line (LF ends; a stripped CR is not restored)
        import sys

        sys.stdout.flush()
        out, n = sys.stdout.buffer, 0
        for n, line in enumerate(itertools.islice(quarantined_lines(cfg, **filters), args.limit), 1):
            out.write(line + b"\n")
        out.flush()
        if not n and (args.source or args.batch):
            print(f"bigopt quarantine: {_why_no_line(cfg, args)}", file=sys.stderr)
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
        if args.source or args.batch:  # a file's whole name (day_3.gz, not day_3); a batch since replaced
            console.print(_why_no_line(cfg, args))
        return 0
    console.print(title)  # not the table's title: rich wraps that to the table's width
    counts = Table()
    for col, just in (("file", "left"), ("reason", "left"), ("lines", "right")):
        counts.add_column(col, justify=just)
    for source, reason, n in view.counts:
        counts.add_row(shown(source), reason, f"{n:,}")
    console.print(counts)
    if view.examples:
        kinds = len({(ex["source"], ex["reason"]) for ex in view.examples})
        lines = Table(title=f"{len(view.examples)} of them, " + (
            "a few of each kind" if kinds == len(view.counts) else
            f"one of each of the first {kinds} of {len(view.counts)} kinds (--limit for more)"))
        for col in ("file", "reason", "fields", "line"):
            lines.add_column(col, justify="right" if col == "fields" else "left", overflow="fold")
        for ex in view.examples:
            lines.add_row(shown(ex["source"]), ex["reason"], str(ex["num_fields"]), shown(ex["line"]))
        console.print(lines)
    console.print(view.table)
    return 0



def _why_no_line(cfg, args) -> str:
    if args.batch and (why := _no_line_of_batch(cfg, args)):
        return why
    if args.source:
        return _no_line_of(cfg, args)
    return f"no line of batch {args.batch!r}" + (f" where {others}" if (others := _others(args, "batch")) else "")


def _others(args, but: str) -> str:
    return " ".join(f"--{k} {v!r}" for k, v in (("source", args.source), ("batch", args.batch),
                                               ("reason", args.reason), ("limit", args.limit))
                    if v is not None and k != but)


def _no_line_of_batch(cfg, args) -> str | None:
    """Why ``--batch`` found no line, from the ledger: no such batch (the latest are named), or
    its files have none now: each file's fate since (ingested again in a later batch, whose
    rows replaced its lines; dropped) or none quarantined. None: the batch's lines are there
    and the other filters matched none."""
    from pipelines.criteo.bronze import current_entries, read_ledger
    from pipelines.criteo.schema import tables

    rows = read_ledger(tables(cfg)["ledger"])
    batch = [r for r in rows if r["ingest_batch"] == args.batch]
    if not batch:
        when = {}
        for r in rows:
            when[r["ingest_batch"]] = max(when.get(r["ingest_batch"], r["ingested_at"]), r["ingested_at"])
        latest = sorted(when, key=lambda b: when[b], reverse=True)[:5]
        return (f"no ingest batch {args.batch!r} in the ledger; "
                + (f"the latest: {', '.join(latest)}" if latest else "the ledger is empty"))
    if not (mine := [r for r in batch if args.source is None or r["source"] == args.source]):
        return (f"batch {args.batch} did not ingest {args.source!r}; its files: "
                + ", ".join(sorted({r["source"] for r in batch})[:20]))
    current, fates = current_entries(rows), []
    for r in sorted(mine, key=lambda r: r["source"]):
        cur = current.get(r["source"])
        if r["size"] is None:
            fates.append(f"{r['source']}: dropped by this batch (--drop-source quarantines nothing)")
        elif cur is None:
            fates.append(f"{r['source']}: dropped since (--drop-source)"
                         + (", with its quarantined lines" if r["rows_rejected"] else "; it had no line quarantined"))
        elif cur["ingest_batch"] != args.batch:
            fates.append(f"{r['source']}: ingested again in batch {cur['ingest_batch']} "
                         f"({cur['ingested_at']:%Y-%m-%d %H:%M} UTC), whose rows replaced this batch's: "
                         f"{cur['rows_rejected']:,} line(s) quarantined there")
        elif r["rows_rejected"]:
            return None  # its lines are there: the other filters matched none
        else:
            fates.append(f"{r['source']}: no line quarantined")
    shown = fates[:10] + ([f"and {len(fates) - 10} more file(s)"] if len(fates) > 10 else [])
    return f"batch {args.batch} has no quarantined line now:\n  " + "\n  ".join(shown)


def _no_line_of(cfg, args) -> str:
    """Why ``--source`` found no line: the file has none (``--source`` takes a file's whole
    name: the files that have some), or the other filters matched none of its lines."""
    from pipelines.criteo.quarantine import quarantined_sources

    names = quarantined_sources(cfg)
    if args.source in names:
        return f"no line of {args.source!r} where {_others(args, 'source')}"
    return (f"no line of {args.source!r}; files with quarantined lines: {', '.join(names[:20]) or 'none'}"
            + (f" and {len(names) - 20} more" if len(names) > 20 else ""))


if __name__ == "__main__":
    from jobs.cli import submit_main

    submit_main("quarantine")
