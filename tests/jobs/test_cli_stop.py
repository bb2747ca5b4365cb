"""What `bigopt` says after a stop: the command that continues a stopped training."""
from __future__ import annotations

import shlex

from jobs.cli import _after_a_stop


def _resumable() -> KeyboardInterrupt:
    stop = KeyboardInterrupt()
    stop.resumable = True
    return stop


def test_the_resume_command_of_a_run_does_not_force_its_finished_data_steps_again():
    """`bigopt run --force-ingest --force-featurize` stopped in its train step named itself with
    --resume: that command re-ingested every file and rebuilt gold before resuming. Its data
    steps are done, so the flags (also as argparse's abbreviations) are left out; `train` keeps
    its arguments as they are."""
    argv = ["run", "conf/demo.yaml", "train.max_steps=50", "--force-ingest", "--force-f", "--local"]
    said = _after_a_stop(_resumable(), argv)
    again = shlex.split(said.removeprefix("its checkpoints are kept: ").removesuffix(" continues from the last"))
    assert again == ["bigopt", "run", "conf/demo.yaml", "train.max_steps=50", "--local", "--resume"]
    argv = ["train", "conf/demo.yaml", "--resume"]
    assert _after_a_stop(_resumable(), argv) == (
        "its checkpoints are kept: bigopt train conf/demo.yaml --resume continues from the last")
    assert _after_a_stop(KeyboardInterrupt(), argv) == "what it had not committed was removed"


def test_a_stop_before_the_first_checkpoint_promises_no_resume(tmp_path):
    """A Ctrl-C before the first checkpoint said "its checkpoints are kept: ... --resume
    continues from the last" of an empty folder; `--resume` then warned and started from
    scratch (found by the probe of this session's fixes)."""
    from jobs.config import load_config
    from jobs.train import resumable_on_a_stop

    cfg = load_config(None, [f"train.checkpoint_dir={tmp_path}/ckpt"])
    for written in (False, True):
        if written:
            from training.checkpoint import save_checkpoint

            save_checkpoint(tmp_path / "ckpt", 10, {"step": 10})
        try:
            with resumable_on_a_stop(cfg):
                raise KeyboardInterrupt
        except KeyboardInterrupt as stop:
            said = _after_a_stop(stop, ["train", "conf/demo.yaml"])
        assert said == ("its checkpoints are kept: bigopt train conf/demo.yaml --resume continues from the last"
                        if written else "it had written no checkpoint yet (train.checkpoint_every): the same command "
                        "starts again from step 0"), said
