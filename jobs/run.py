"""bigopt run <conf.yaml> [k=v ...] [--no-generate] [--force-ingest] [--force-featurize] [--resume] [--local] [--num-proc N]

The whole first slice in one command, on one SparkSession (started when a step first needs it):

    generate (synthetic raw Criteo, when no raw input exists or criteo.generate changed) -> ingest (raw -> bronze)
    -> featurize (bronze -> gold + vocabulary) -> train (Horovod-on-Spark, MLflow)
    -> final test-split evaluation -> summary table

``make demo`` = ``bigopt run conf/demo.yaml``. Stopped (Ctrl-C, SIGTERM) in its train step, the
command keeps its checkpoints and says so; the same command with ``--resume`` runs the data steps
again (up to date: nothing to do) and continues training from the last checkpoint, as
``bigopt train --resume`` does, then evaluates the test split.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-generate", action="store_true", help="never generate synthetic raw data")
    parser.add_argument("--force-ingest", action="store_true", help="re-ingest files already in bronze")
    parser.add_argument("--force-featurize", action="store_true", help="rebuild gold even when it is up to date")
    parser.add_argument("--skip-data", action="store_true", help="train on the existing gold tables only")
    parser.add_argument("--resume", action="store_true",
                        help="continue training from the last checkpoint (same MLflow run), as bigopt train --resume")
    parser.add_argument("--local", action="store_true", help="train in-process (one rank, no Horovod)")
    parser.add_argument("--num-proc", type=int, default=None, help="override train.num_proc")


# the flags that change the data steps, which --skip-data does not run
_DATA_STEP_FLAGS = ("no_generate", "force_ingest", "force_featurize")


def check_arguments(args: argparse.Namespace) -> str | None:
    """A usage error for ``--skip-data`` with a flag of the data steps it skips: until the
    twenty-eighth session ``--skip-data --force-featurize`` trained on the old gold without a word."""
    given = [f"--{f.replace('_', '-')}" for f in _DATA_STEP_FLAGS if getattr(args, f, False)]
    if getattr(args, "skip_data", False) and given:
        return f"argument --skip-data: not allowed with {', '.join(given)} (it skips the data steps they change)"
    return None


def gold_elsewhere(cfg) -> list[str]:
    """The ``train.*`` data settings (``key=value``) that name other gold or another vocabulary
    than the ones this command's featurize step writes. Until the twenty-eighth session
    ``bigopt run ... train.train_table=/nope/train`` ran generate, ingest and featurize for a
    minute, then trained on the other table or said it was not found: without ``--skip-data``
    they are refused up front; with it, training on other gold is what was asked."""
    from pipelines.criteo.schema import tables
    from pipelines.lake.fs import normalize_uri

    paths = tables(cfg)
    written = {"train_table": paths["train"], "valid_table": paths["valid"], "test_table": paths["test"],
               "vocabulary": paths["features_json"]}
    return [f"train.{key}={given} (featurize writes {path})" for key, path in written.items()
            if (given := getattr(cfg.train, key)) is not None and normalize_uri(given) != normalize_uri(path)]


def needs_generation(cfg) -> bool:
    """Generate when no raw input is configured or present (the demo case), or when the files
    there are an earlier generate's with other ``criteo.generate`` settings (its
    ``_generated.json`` says which): a changed setting is not silently ignored. Files no
    generate wrote are never generated over."""
    import json

    from pipelines.criteo.generate import read_manifest
    from pipelines.lake.fs import is_local, normalize_uri
    from pipelines.raw_inputs import resolve as resolve_inputs

    raw_dir = normalize_uri(cfg.criteo.raw_dir)
    if cfg.criteo.inputs or not is_local(raw_dir):  # an object store is never generated into
        return False
    raw = Path(raw_dir)
    try:  # "present": what ingest would take from the folder, not any file (.DS_Store, a manifest)
        resolve_inputs([raw_dir], cfg.criteo.ingest.file_globs, cfg.criteo.ingest.exclude_globs)
    except (FileNotFoundError, NotADirectoryError):
        return True
    if (manifest := read_manifest(raw)) is None:
        return False  # not (only) generated files: leave them
    made = manifest["config"]
    now = json.loads(json.dumps(cfg.criteo.generate.model_dump()))
    return {k: v for k, v in made.items() if k != "workers"} != {k: v for k, v in now.items() if k != "workers"}


def generate_replacing(cfg) -> tuple[list[str], list[str]]:
    """Generate into ``criteo.raw_dir``; return the files written and the file names (bronze
    ``source`` keys) an earlier generate wrote there and this one did not, which it removed:
    their rows, ingested before, are dropped from bronze, or featurize would still take them
    (with ``criteo.generate.days`` 3 -> 2 the test split stayed the removed ``day_2``)."""
    from pipelines.criteo.generate import generate, manifest_files
    from pipelines.lake.fs import normalize_uri

    earlier = manifest_files(Path(normalize_uri(cfg.criteo.raw_dir)))
    files = generate(cfg)
    return files, sorted(earlier - {os.path.basename(p) for p in files})


def run(cfg, args) -> int:
    from jobs.console import make_console, print_error, styled
    from jobs.train import apply_cli_overrides, resumable_on_a_stop
    from pipelines.spark import spark_from_config
    from training.api import check_destinations, print_summary, run_training
    from training.checkpoint import ResumeError
    from training.data.loader import UnreadableDataFileError
    from training.dataspec import DataNotFoundError, GoldVersionError
    from training.launch import RankFailure, RanksNotStartedError
    from training.loop import TrainSettingsError
    from training.tracking import TrackingStoreError

    console = make_console()
    if cfg.run.dataset != "criteo" or getattr(cfg, "criteo", None) is None:
        print("bigopt run: only run.dataset=criteo has a pipeline so far", file=sys.stderr)
        return 2
    try:
        cfg = apply_cli_overrides(cfg, args)
    except ValueError as e:
        print(f"bigopt run: {e}", file=sys.stderr)
        return 2
    if not args.skip_data and (elsewhere := gold_elsewhere(cfg)):
        print(f"bigopt run: {'; '.join(elsewhere)}: not the gold its featurize step writes; to train on it, "
              "add --skip-data (no data steps), else leave the setting unset", file=sys.stderr)
        return 2
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"test_at_end": True})})
    try:  # bad train.* settings are one line now, not after minutes of ingest and featurize
        from pipelines.criteo.schema import NUM_DENSE, NUM_SPARSE
        from training.loop import check_settings

        check_settings(cfg.train, NUM_SPARSE, NUM_DENSE)
        check_destinations(cfg)  # and the store, artifact and checkpoint folders it cannot reach or write
    except (TrainSettingsError, TrackingStoreError) as e:
        print(f"bigopt run: {e}", file=sys.stderr)
        return 2
    timings: dict[str, float] = {}

    @functools.cache
    def spark():
        """The session, started on first use: with ingest and featurize up to date and
        in-process training (--local, one rank) the command runs without Spark."""
        t0 = time.perf_counter()
        session = spark_from_config(cfg.spark)
        timings["spark start"] = time.perf_counter() - t0
        return session

    @contextlib.contextmanager
    def step(name: str, what: str):
        """Announce a step and record its own seconds, without a Spark start it triggered
        (timed on its own)."""
        console.print(styled((name, "bold"), f" {what}"))
        t0, spark_before = time.perf_counter(), timings.get("spark start", 0.0)
        try:
            yield
        finally:
            timings[name] = time.perf_counter() - t0 - (timings.get("spark start", 0.0) - spark_before)

    if not args.skip_data:  # the pipeline's modules are imported only for it
        from pipelines.criteo.featurize import FeaturizeError, featurize
        from pipelines.criteo.generate import ForeignFilesError
        from pipelines.criteo.ingest import IngestError, ingest
        from jobs.spark_step import error_text, exit_status, step_error
        from pipelines.raw_inputs import InputNameError

        try:
            stale: list[str] = []
            if not args.no_generate and needs_generation(cfg):
                with step("generate", f"synthetic raw Criteo -> {cfg.criteo.raw_dir}"):
                    files, stale = generate_replacing(cfg)
                console.print(f"  {len(files)} file(s) in {timings['generate']:.1f} s")
            with step("ingest", "raw -> bronze"):
                # the files the new settings no longer make (days 3 -> 2: day_2) leave bronze too
                rep = ingest(spark, cfg, force=args.force_ingest, drop_sources=stale)
            console.print(f"  {rep.summary()} ({timings['ingest']:.1f} s)")
            with step("featurize", "bronze -> gold + vocabulary"):
                rep = featurize(spark, cfg, force=args.force_featurize)
            console.print(f"  {rep.summary()} ({timings['featurize']:.1f} s)")
        except Exception as e:  # noqa: BLE001 - printed as one line, or raised again
            # the steps' own errors name the file or table and the remedy: no traceback
            if (shown := step_error(e, (IngestError, FeaturizeError, FileNotFoundError, InputNameError,
                                           ForeignFilesError))) is None:
                raise
            print_error(error_text("run", shown))
            return exit_status(shown)

    try:
        ranks = 1 if args.local else cfg.train.num_proc  # --local: one in-process rank
        with step("train", f"{cfg.train.model} / {cfg.train.optimizer} on {ranks} rank(s)"), resumable_on_a_stop(cfg):
            res = run_training(cfg, spark=spark, resume=args.resume, local=args.local,
                               store_checked=True)  # checked above
    except (DataNotFoundError, GoldVersionError, ResumeError, TrainSettingsError, TrackingStoreError) as e:
        print(f"bigopt run: {e}", file=sys.stderr)
        return 2
    except (UnreadableDataFileError, RankFailure, RanksNotStartedError) as e:  # a damaged file; a rank's error
        print(f"bigopt run: {e}", file=sys.stderr)
        return 1
    res.extra["timings"] = timings
    print_summary(res, title=f"bigopt run - {cfg.run.name}  (" + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + ")")
    return 0


if __name__ == "__main__":
    from jobs.cli import submit_main

    submit_main("run")
