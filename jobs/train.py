"""bigopt train <conf.yaml> [k=v ...] [--resume] [--local] [--num-proc N]

Trains ``train.model`` on the gold tables with Horovod-on-Spark (``train.num_proc`` ranks;
1 or ``--local`` runs in this process without Horovod), tracked in MLflow, and prints a
summary table. Under spark-submit: ``spark-submit jobs/train.py conf/criteo.yaml``.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint (same MLflow run)")
    parser.add_argument("--local", action="store_true", help="one in-process rank, no Horovod/Spark (debugging)")
    parser.add_argument("--num-proc", type=int, default=None, help="override train.num_proc")


def apply_cli_overrides(cfg, args):
    """``--num-proc`` -> ``train.num_proc`` (re-validated: batch_size must divide). A
    ValueError says what is wrong in one line."""
    n = getattr(args, "num_proc", None)
    if n is None:
        return cfg
    if getattr(args, "local", False) and n != 1:
        raise ValueError(f"--local runs one rank in this process, --num-proc {n} asks for {n}: give one of them")
    from pydantic import ValidationError

    from training.config import TrainConfig

    try:
        # only the fields the config set: a full dump marks every default as given (unused_settings
        # then warned of a min_compress_numel nobody set)
        train = TrainConfig.model_validate({**cfg.train.model_dump(exclude_unset=True), "num_proc": n})
    except ValidationError as e:
        raise ValueError(f"--num-proc {n}: " + "; ".join(err["msg"].removeprefix("Value error, ")
                                                          for err in e.errors())) from None
    return cfg.model_copy(update={"train": train})


@contextlib.contextmanager
def resumable_on_a_stop(cfg=None):
    """Mark a Ctrl-C / SIGTERM that stops training (``resumable = True`` on the
    KeyboardInterrupt, also one behind an error raised while it unwound): rank 0 writes each
    checkpoint atomically and a stop removes none, so `bigopt` says that the same command with
    ``--resume`` continues, not that uncommitted files were removed (ingest's and featurize's
    case). ``bigopt run`` stopped in its train step is marked too, and only there. With
    ``cfg``, a stop before the first checkpoint is marked ``checkpointed = False``: the same
    command then starts again from step 0 (the line promised checkpoints that did not exist)."""
    from pipelines.stopping import stop_behind

    try:
        yield
    except BaseException as e:
        if (stop := stop_behind(e)) is not None:
            stop.resumable = True
            if cfg is not None:
                from training.api import checkpoint_dir_for
                from training.checkpoint import latest_checkpoint

                stop.checkpointed = latest_checkpoint(checkpoint_dir_for(cfg)) is not None
        raise


def run(cfg, args) -> int:
    from training.api import print_summary, run_training
    from training.checkpoint import ResumeError
    from training.data.loader import UnreadableDataFileError
    from training.dataspec import DataNotFoundError, GoldVersionError
    from training.launch import RankFailure, RanksNotStartedError
    from training.loop import TrainSettingsError
    from training.tracking import TrackingStoreError

    try:
        cfg = apply_cli_overrides(cfg, args)
    except ValueError as e:
        print(f"bigopt train: {e}", file=sys.stderr)
        return 2
    try:  # starts Spark only for Horovod-on-Spark ranks
        with resumable_on_a_stop(cfg):
            res = run_training(cfg, resume=args.resume, local=args.local)
    except (DataNotFoundError, GoldVersionError, ResumeError, TrainSettingsError, TrackingStoreError) as e:
        print(f"bigopt train: {e}", file=sys.stderr)
        return 2
    except (UnreadableDataFileError, RankFailure, RanksNotStartedError) as e:  # a damaged file; a rank's error
        print(f"bigopt train: {e}", file=sys.stderr)
        return 1
    print_summary(res, title=f"bigopt train - {cfg.run.name}")
    return 0


if __name__ == "__main__":
    from jobs.cli import submit_main

    submit_main("train")
