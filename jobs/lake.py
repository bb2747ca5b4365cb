"""``bigopt lake <conf> --action history|vacuum|optimize|roundtrip --table PATH``.

Maintenance of the Delta tables (through delta-rs, no Spark needed except for ``roundtrip``,
which writes and reads back a small table through Spark to check an installation).
"""
from __future__ import annotations

import json


def add_arguments(parser) -> None:
    from jobs.cli import at_least

    parser.add_argument("--action", choices=["history", "vacuum", "optimize", "roundtrip"], default="history")
    parser.add_argument("--table",
                        help="table path or URI (default for roundtrip: <lake.root>/_check/roundtrip/all_types)")
    parser.add_argument("--limit", type=at_least(0), default=20, help="history: newest N commits; vacuum: files listed")
    parser.add_argument("--retention-hours", type=at_least(0), default=168, help="vacuum: keep files newer than this")
    parser.add_argument("--apply", action="store_true", help="vacuum: actually delete (default: dry run)")
    parser.add_argument("--no-retention-check", action="store_true",
                        help="vacuum: allow a retention under the table's minimum (7 days by default); only "
                             "while no write to the table is running, whose new files it would delete, and no job "
                             "reads an older version of it (featurize, training), whose files it would delete")
    parser.add_argument("--target-mb", type=at_least(1), default=256, help="optimize: target file size")


def run(cfg, args) -> int:
    from rich.table import Table

    from jobs.console import make_console, print_error
    from jobs.spark_step import error_line
    from pipelines import lake
    from pipelines.lake.commit import ROWS_ADDED_KEY

    console = make_console()
    if args.action == "roundtrip":
        return _roundtrip(cfg, args)
    if not args.table:
        print_error(f"bigopt lake: --table is required for --action {args.action}")
        return 2
    from deltalake.exceptions import DeltaError

    # a damaged log (DeltaError), or one delta-rs cannot list or open (OSError: no permission, a
    # store that does not answer), said as such: not as a traceback, nor as a compaction that met
    # a concurrent write
    try:
        exists = lake.table_exists(args.table)
        version = lake.table_version(args.table) if exists else -1
    except (DeltaError, OSError) as e:
        print_error(f"bigopt lake: {args.action} {args.table}: its log cannot be read: {error_line(e)}")
        return 1
    if not exists:
        import os

        why = "it is a file" if os.path.isfile(args.table) else "it has no _delta_log"
        print_error(f"bigopt lake: no Delta table at {args.table} ({why})")
        return 2
    if args.action == "history":
        try:  # an older entry's commitInfo damaged (ValueError), or the log damaged since the check
            history = lake.history(args.table, args.limit)
        except (DeltaError, ValueError, OSError) as e:
            print_error(f"bigopt lake: history {args.table}: {error_line(e)}")
            return 1
        t = Table(title=f"history of {args.table}")
        for col in ("version", "timestamp", "operation", "job", "config", "rows added", "parameters"):
            t.add_column(col)
        import datetime as dt

        for h in history:
            m = h.get("operationMetrics") or {}
            info = lake.commit_metadata(h)
            ts = h.get("timestamp")
            when = "" if ts is None else dt.datetime.fromtimestamp(ts / 1000, dt.timezone.utc)
            t.add_row(
                str(h.get("version")),
                when and when.isoformat(timespec="seconds"),
                h.get("operation", ""),
                str(info.get("job", "")),
                str(info.get("config_hash", ""))[:12],
                str(m.get("num_added_rows", h.get(ROWS_ADDED_KEY, ""))),
                json.dumps(h.get("operationParameters", {}))[:60],
            )
        console.print(t)
        oldest = history[-1].get("version") if history else None
        if oldest and (args.limit is None or len(history) < args.limit):  # the log entries before it are gone
            console.print(f"(no older entries: the log entries before version {oldest} were cleaned up; Delta keeps "
                          "them delta.logRetentionDuration, 30 days by default)")
    elif args.action == "vacuum":
        try:
            files = lake.vacuum(args.table, retention_hours=args.retention_hours, dry_run=not args.apply,
                                enforce_retention=not args.no_retention_check)
        except DeltaError as e:
            hint = (" (add --no-retention-check if no write to the table is running and no job reads an older version "
                    "of it)" if "retention" in str(e) else "")
            print_error(f"bigopt lake: vacuum {args.table}: {error_line(e)}{hint}")
            return 1
        except OSError as e:  # a file it may not delete, a log it may not write
            print_error(f"bigopt lake: vacuum {args.table}: {error_line(e)} ({_after_a_failed_vacuum(args, version)})")
            return 1
        console.print(f"{'deleted' if args.apply else 'would delete'} {len(files)} file(s)"
                      f"{'' if args.apply or not files else ' (dry run: add --apply to delete them)'}")
        for f in sorted(files)[:args.limit]:
            console.print(f"  {f}")
        if len(files) > args.limit:
            console.print(f"  … and {len(files) - args.limit} more")
    elif args.action == "optimize":
        from deltalake.exceptions import CommitFailedError

        try:  # a failed compaction commits nothing and deletes the files it wrote (lake.optimize)
            console.print(_compaction_said(lake.optimize(args.table, target_size=args.target_mb << 20)))
        except lake.CompactionRunningError as e:
            print_error(f"bigopt lake: optimize {args.table}: {e}")
            return 1
        except CommitFailedError as e:  # a write committed while it compacted: run it again
            # the first line: the "Help:" after it is delta-rs's advice to its API's callers
            print_error(f"bigopt lake: optimize {args.table}: {error_line(e).splitlines()[0]} (nothing was "
                        "committed: run it again once no write to the table is running)")
            return 1
        except (DeltaError, OSError) as e:  # a log or folder it may not write, a file it cannot read
            print_error(f"bigopt lake: optimize {args.table}: {error_line(e)} (nothing was committed)")
            return 1
    return 0


def _after_a_failed_vacuum(args, version: int) -> str:
    """What a vacuum of the table at ``version`` that raised an ``OSError`` left: with
    ``--apply``, delta-rs stops at the first file it may not delete, after its VACUUM START
    commit, with no VACUUM END (a log it may not write stops it before that commit)."""
    from deltalake.exceptions import DeltaError

    from pipelines.lake.maintenance import vacuum_unfinished

    if args.apply:
        try:
            stopped = vacuum_unfinished(args.table, since=version)
        except (DeltaError, OSError, ValueError):  # cannot tell: say what it may have done
            stopped = True
        if stopped:
            return ("the vacuum stopped part-way: delta-rs committed its VACUUM START, may have deleted some of the "
                    "files, and committed no VACUUM END; run it again once the cause is fixed")
    return "nothing was deleted"


def _roundtrip(cfg, args) -> int:
    """Write a table with every type the pipelines use, read it back, compare."""
    from jobs.config import config_hash
    from jobs.console import print_error
    from pipelines import lake

    path = args.table or cfg.lake.table("_check", "roundtrip", "all_types")
    refusal = _not_a_roundtrip_table(path)
    if refusal:
        print_error(f"bigopt lake: roundtrip overwrites its own check table; {path} {refusal}: "
                    "give --table a new path, or leave it out")
        return 2
    from pipelines.lake.fs import check_writable

    try:  # before Spark: found by the tasks, a lake root that is a file was pages of traces
        check_writable(path)
    except PermissionError as e:
        print_error(f"bigopt lake: roundtrip: {e}")
        return 2
    from jobs.spark_step import run_spark_step

    def step(start_spark, progress):
        from pyspark.sql import functions as F

        spark = start_spark()
        df = spark.range(0, 100_000).select(  # every type the pipelines write, nulls included
            F.col("id"),
            (F.col("id") % 7).cast("int").alias("day"),
            (F.col("id") * 0.5).alias("x"),
            (F.col("id") * 0.25).cast("float").alias("label"),
            F.when(F.col("id") % 5 == 0, None).otherwise(F.sha1(F.col("id").cast("string")).substr(1, 8)).alias("c"),
            F.when(F.col("id") % 9 == 0, None).otherwise(F.col("id").cast("string").cast("binary")).alias("raw"),
            F.when(F.col("id") % 4 == 0, None).otherwise(F.col("id") % 2 == 0).alias("flag"),
            F.array(*[(F.col("id") + i).cast("float") for i in range(3)]).alias("dense"),
            F.array(*[(F.col("id") - i).cast("int") for i in range(2)]).alias("sparse"),
            F.current_timestamp().alias("ts"),
        )
        progress(f"writing {path}")
        v = lake.write_table(df, path, mode="overwrite", partition_by=["day"], compression=cfg.lake.compression,
                             commit_info={"job": "lake-roundtrip", "config_hash": config_hash(cfg)})
        progress(f"reading {path} back")
        back = lake.read_table(spark, path, version=v)
        diff = df.drop("ts").exceptAll(back.drop("ts").select(*[c for c in df.columns if c != "ts"])).count()
        return lake.delta_engine(spark), v, back.count(), diff

    # a Spark that cannot start (spark.conf.spark.scheduler.mode=FOO) or a job that fails: one line, as every step's
    console, result, status = run_spark_step(cfg, "lake", step, errors=())
    if status:
        return status
    engine, v, n, diff = result
    console.print(f"engine={engine} table={path} version={v} rows={n} mismatched_rows={diff}")
    return 0 if n == 100_000 and diff == 0 else 1


def _not_a_roundtrip_table(path: str) -> str | None:
    """Why ``path`` must not be overwritten by the check (None: it is free, or the check's own
    table): a Delta table some other job wrote, or a directory holding something else."""
    import os

    from pipelines import lake
    from pipelines.lake.fs import normalize_uri

    from deltalake.exceptions import DeltaError

    from jobs.spark_step import error_line

    try:
        exists = lake.table_exists(path)
    except OSError as e:  # its _delta_log cannot be listed (no permission): whether it is a table cannot be told
        return f"is a folder whose Delta log cannot be read ({error_line(e)})"
    if exists:
        try:
            history = lake.history(path)
        except (DeltaError, ValueError, OSError) as e:  # a damaged log: whose table it is cannot be told
            return f"is a Delta table whose log cannot be read ({error_line(e)})"
        jobs = {str(lake.commit_metadata(h).get("job", "")) for h in history
                if h.get("operation") not in ("VACUUM START", "VACUUM END", "OPTIMIZE")}
        others = sorted(jobs - {"lake-roundtrip"})
        return f"is a Delta table written by {', '.join(o or 'another writer' for o in others)}" if others else None
    local = normalize_uri(path)  # a local path comes back absolute, a remote URI keeps its scheme
    if "://" not in local and os.path.isdir(local) and os.listdir(local):
        return "is a directory with files in it and no Delta table"
    return None


def _compaction_said(metrics: dict) -> str:
    """delta-rs's compaction metrics as one line (they were printed as its dict)."""
    def size(key: str) -> int:
        try:
            return int(json.loads(metrics.get(key) or "{}").get("totalSize", 0))
        except (ValueError, AttributeError):
            return 0

    added, removed = metrics.get("numFilesAdded", 0), metrics.get("numFilesRemoved", 0)
    considered, skipped = metrics.get("totalConsideredFiles", 0), metrics.get("totalFilesSkipped", 0)
    if not removed:
        return f"nothing to compact: {considered} file(s), each alone in its partition or already large enough"
    return (f"compacted {removed} file(s) ({size('filesRemoved') / 1e6:,.1f} MB) into {added} "
            f"({size('filesAdded') / 1e6:,.1f} MB) in {metrics.get('partitionsOptimized', 0)} partition(s); "
            f"{skipped} file(s) left as they were (the old files stay until a vacuum)")


if __name__ == "__main__":
    from jobs.cli import submit_main

    submit_main("lake")
