"""In-process training (num_proc 1, no Horovod): learning, resume, MLflow run contents, CLI."""
from __future__ import annotations

import json
import re
import time

import pytest
import torch

from train_helpers import interrupted_and_full, train_cfg, train_overrides
from training.api import run_training
from training.checkpoint import LOCK_NAME  # the checkpoint folder's lock, kept there


def test_local_training_learns_and_reports(synth_gold, tmp_path):
    cfg = train_cfg(synth_gold, tmp_path, "train.max_steps=80", "train.eval_every=40", "train.target_auc=0.6",
                    "train.early_stop=false", "train.test_at_end=true")
    res = run_training(cfg)
    r = res.rank0
    assert r["step"] == 80 and r["world_size"] == 1 and r["samples"] == 80 * 256
    assert res.valid["auc"] > 0.7, res.valid
    assert res.valid["rows"] == 4000 and res.test["rows"] == 4000  # whole splits, every row once
    assert r["tta"] is not None and r["tta"]["tta_samples"] <= r["samples"]
    losses = [h["loss"] for h in r["history"]["train"]]
    assert losses[-1] < losses[0]
    assert r["bytes_sent_per_step"] == sum(p.numel() * 4 for p in _model_params(res))


@pytest.mark.parametrize("estimator", ["gnb", "hutchinson"])
def test_sophia_trains_with_its_hessian_refreshed_every_k_steps(synth_gold, tmp_path, monkeypatch, estimator):
    """`train.optimizer=sophia`: the loop refreshes the Hessian EMA on steps 1, k+1, 2k+1, ...
    with the configured estimator. Until the eighteenth session nothing did: h stayed 0 and
    "Sophia" trained as sign-momentum."""
    import torch

    from optim.sophia import Sophia

    seen = []
    update = Sophia.update_hessian

    def counted(self, estimates, params=None):
        seen.append((self, self.steps_done + 1))  # the step this estimate is for (self kept: no id reuse)
        return update(self, estimates, params)

    monkeypatch.setattr(Sophia, "update_hessian", counted)
    cfg = train_cfg(synth_gold, tmp_path, "train.optimizer=sophia", "train.lr=0.01", "train.weight_decay=0",
                    "train.max_steps=24", "train.checkpoint_every=24", "train.eval_every=24",
                    f"train.optimizer_params={{update_interval: 10, estimator: {estimator}}}")
    res = run_training(cfg)
    # the settings check's one step on its stand-in model (its own Sophia), then the run's
    assert len(seen) == 4 and seen[0][1] == 1 and [s for o, s in seen if o is seen[-1][0]] == [1, 11, 21]
    state = torch.load(tmp_path / "ckpt" / "step-00000024.pt", weights_only=False)["optimizer"]["state"]
    assert all(float(st["hessian"].abs().max()) > 0 for st in state.values())
    assert res.valid["auc"] > 0.6, res.valid


def _model_params(res):
    from training.models import build_model

    return list(build_model("dlrm", cardinalities=res.spec.cardinalities, embedding_dim=8, bottom_mlp=[32],
                            top_mlp=[32]).parameters())


@pytest.mark.parametrize("variant", [
    ["train.optimizer=momentum", "train.lr=0.05", "train.grad_accum_steps=2", "train.clip_grad_norm=1.0",
     "train.scheduler=cosine", "train.warmup_steps=5"],
    ["train.optimizer=adagrad", "train.model=logreg", "train.model_params={}", "train.lr=0.1", "train.bf16=true"],
])
def test_resume_after_forced_stop_matches_uninterrupted(synth_gold, tmp_path, variant):
    full, resumed = interrupted_and_full(synth_gold, tmp_path, *variant)
    assert resumed.rank0["step"] == 30
    assert resumed.rank0["fingerprint"] == full.rank0["fingerprint"]  # bit-identical parameters
    assert resumed.valid["auc"] == full.valid["auc"]
    a = [h["loss"] for h in full.rank0["history"]["train"]]
    b = [h["loss"] for h in resumed.rank0["history"]["train"]]
    assert a == pytest.approx(b, rel=1e-6)


def test_qsgd_resume_that_only_saves_keeps_the_rng(synth_gold, tmp_path):
    """`--resume` of a run whose checkpoint is already at max_steps writes that checkpoint again;
    a later resume to more steps from it ends bit-identical to an uninterrupted run. Until the
    twentieth session the re-saved checkpoint held no QSGD RNG state (the communicator reported
    none between a load and its first compress()), so the rounding noise restarted from the seed."""
    from training.checkpoint import checkpoint_path, load_checkpoint

    common = ["train.compression.name=qsgd", "train.compression.params={bits: 4}",
              "train.compression.min_compress_numel=0", "train.checkpoint_every=10"]
    full = run_training(train_cfg(synth_gold, tmp_path / "a", "train.max_steps=30", *common))
    run_training(train_cfg(synth_gold, tmp_path / "b", "train.max_steps=20", *common))
    first = load_checkpoint(checkpoint_path(tmp_path / "b" / "ckpt", 20))["compressor"][0]["compressor"]
    run_training(train_cfg(synth_gold, tmp_path / "b", "train.max_steps=20", *common), resume=True)
    again = load_checkpoint(checkpoint_path(tmp_path / "b" / "ckpt", 20))["compressor"][0]["compressor"]
    assert sorted(again) == ["rng", "rng_device"] and again["rng_device"] == first["rng_device"] == "cpu"
    assert torch.equal(again["rng"], first["rng"])
    resumed = run_training(train_cfg(synth_gold, tmp_path / "b", "train.max_steps=30", *common), resume=True)
    assert resumed.rank0["step"] == 30
    assert resumed.rank0["fingerprint"] == full.rank0["fingerprint"]


def test_a_resume_with_nothing_left_to_train_does_not_evaluate_again(synth_gold, tmp_path):
    """`--resume` of a run already at max_steps trains nothing; its final evaluation is in the
    last checkpoint's history (written after it, at step 20). It evaluated again and appended a
    second step-20 entry to the history (history.json, the loss/AUC plot); now the history is
    the one the run ended with."""
    cfg = train_cfg(synth_gold, tmp_path, "train.max_steps=20", "train.eval_every=0", "train.checkpoint_every=15")
    first = run_training(cfg)
    again = run_training(cfg, resume=True)
    assert [e["step"] for e in first.rank0["history"]["eval"]] == [20]
    assert again.rank0["history"]["eval"] == first.rank0["history"]["eval"]
    assert again.valid == first.valid and again.rank0["step"] == 20


def test_resume_mid_log_window_logs_the_same_train_loss(synth_gold, tmp_path):
    """A checkpoint that cuts a train_loss window (step 14, logged every 10) holds each rank's
    window sums: the resumed run's step-20 loss averages steps 11-20 as the uninterrupted run's
    does, bit for bit (it averaged 15-20 only). A checkpoint from before the window was saved
    still resumes, to the same parameters."""
    import shutil

    from training.checkpoint import checkpoint_path, load_checkpoint
    from training.loop import InjectedFailure

    common = ["train.max_steps=30", "train.scheduler=constant", "train.warmup_steps=0", "train.log_every=10",
              "train.checkpoint_every=7", "train.keep_checkpoints=0"]
    full = run_training(train_cfg(synth_gold, tmp_path / "a", *common))
    cfg = train_cfg(synth_gold, tmp_path / "b", *common)
    with pytest.raises(InjectedFailure):
        run_training(cfg.model_copy(update={"train": cfg.train.model_copy(update={"fail_at_step": 17})}))
    old_dir = tmp_path / "old"
    shutil.copytree(tmp_path / "b" / "ckpt", old_dir)
    resumed = run_training(cfg, resume=True)
    losses = [(h["step"], h["loss"]) for h in full.rank0["history"]["train"]]
    assert [(h["step"], h["loss"]) for h in resumed.rank0["history"]["train"]] == losses  # exact, not approx
    assert resumed.rank0["fingerprint"] == full.rank0["fingerprint"]
    state = load_checkpoint(checkpoint_path(old_dir, 14))
    assert [w["micro"] for w in state["window"]] == [4]  # steps 11-14, one rank
    del state["window"], state["stop_reason"]  # as written before they were saved
    torch.save(state, checkpoint_path(old_dir, 14))
    old = run_training(cfg.model_copy(update={"train": cfg.train.model_copy(update={"checkpoint_dir": str(old_dir)})}),
                       resume=True)
    assert old.rank0["step"] == 30 and old.rank0["fingerprint"] == full.rank0["fingerprint"]


def test_resume_of_an_early_stopped_run_stays_stopped(synth_gold, tmp_path):
    """A run stopped at target_auc (step 5 of 30) and resumed: nothing more is trained, as for a
    run that stopped at max_steps (the tracker then logs nothing it holds). It trained on to
    max_steps: the target had been logged already and never fired again, so the MLflow run got
    final_valid_auc at steps 5 and 30. A resume that turns early_stop off goes on."""
    from training.checkpoint import latest_checkpoint, load_checkpoint

    cfg = train_cfg(synth_gold, tmp_path, "train.max_steps=30", "train.eval_every=5", "train.target_auc=0.5",
                    "train.early_stop=true", "train.checkpoint_every=100")
    first = run_training(cfg)
    assert (first.rank0["step"], first.rank0["stop_reason"]) == (5, "target_auc")
    again = run_training(cfg, resume=True)
    assert (again.rank0["step"], again.rank0["stop_reason"]) == (5, "target_auc")
    assert again.rank0["fingerprint"] == first.rank0["fingerprint"]
    assert load_checkpoint(latest_checkpoint(tmp_path / "ckpt"))["stop_reason"] == "target_auc"  # re-saved: kept
    on = cfg.model_copy(update={"train": cfg.train.model_copy(update={"early_stop": False})})
    more = run_training(on, resume=True)
    assert (more.rank0["step"], more.rank0["stop_reason"]) == (30, "max_steps")


def test_mlflow_run_has_params_metrics_artifacts(synth_gold, tmp_path, mlflow_store):
    from mlflow import MlflowClient

    cfg = train_cfg(synth_gold, tmp_path, "train.max_steps=40", "train.eval_every=20", "train.target_auc=0.55",
                    "tracking.model_format=pt2", "run.name=mlflow-test", tracking=mlflow_store)
    res = run_training(cfg)
    client = MlflowClient(tracking_uri=res.tracking_uri)
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["train.lr"] == "0.003" and p["train.model"] == "dlrm" and p["run.name"] == "mlflow-test"
    assert p["data.train_version"] == str(res.spec.versions["train"]) and p["world_size"] == "1"
    assert "lib.torch" in p and "lib.mlflow" in p and "model.params_total" in p
    assert p["data.train_table_id"] == res.spec.table_ids["train"] and "data.train_version_requested" not in p
    assert run.data.tags["bigopt.repeat_group"] == p["repeat_group"] != p["config_hash"]
    from training.tracking import code_version

    if code_version():  # a git checkout: the commit, also where the MLflow UI shows a run's code
        assert p["lib.bigopt_git"] == code_version()
        assert run.data.tags["mlflow.source.git.commit"] == code_version().removesuffix("-dirty")
    m = run.data.metrics
    for k in ("train_loss", "lr", "samples_per_s", "step_time_s", "bytes_sent_per_step", "valid_auc",
              "valid_logloss", "valid_accuracy", "tta_wall_s", "tta_samples", "final_valid_auc"):
        assert k in m, k
    hist = client.get_metric_history(res.run_id, "train_loss")
    # early stop at the first evaluation reaching the target (step 20 or 40)
    stop = res.rank0["step"]
    assert res.rank0["stop_reason"] == "target_auc" and m["tta_step"] == stop and m["tta_reached"] == 1.0
    assert [h.step for h in hist] == list(range(5, stop + 1, 5))
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "bigopt-criteo"
    arts = {a.path for a in client.list_artifacts(res.run_id)} | {
        a.path for a in client.list_artifacts(res.run_id, "plots")}
    assert {"history.json", "plots/loss_auc_vs_time.png"} <= arts
    hist_json = json.loads(open(client.download_artifacts(res.run_id, "history.json", str(tmp_path))).read())
    assert len(hist_json["eval"]) == stop // 20
    import mlflow.pytorch

    model = mlflow.pytorch.load_model(res.rank0["model_uri"])
    assert isinstance(model, torch.fx.GraphModule)  # the pt2 export, not the pickle fallback
    dense, sparse = torch.rand(3, 13), torch.zeros(3, 26, dtype=torch.long)
    assert model(dense, sparse).shape == (3,)
    # the logged (torch.export) model is the trained one: it scores the valid split exactly as
    # the run's final evaluation did
    import numpy as np

    from pipelines.lake import DeltaSnapshot
    from training.metrics import auc_exact

    valid = DeltaSnapshot(synth_gold["valid"], version=res.spec.versions["valid"]).to_table()
    with torch.no_grad():
        scores = model(torch.from_numpy(np.stack(valid.column("dense").to_numpy(zero_copy_only=False))),
                       torch.from_numpy(np.stack(valid.column("sparse").to_numpy(zero_copy_only=False))))
    auc = auc_exact(scores.numpy(), valid.column("label").to_numpy())
    assert auc == pytest.approx(m["final_valid_auc"], abs=1e-6)


def test_train_command_prints_summary(synth_gold, tmp_path, capsys):
    import argparse

    from jobs import train as job

    cfg = train_cfg(synth_gold, tmp_path, "train.max_steps=10", "train.num_proc=2")
    args = argparse.Namespace(resume=False, local=True, num_proc=None)
    assert job.run(cfg, args) == 0
    out = capsys.readouterr().out
    assert "valid AUC" in out and "samples/s" in out and "1 x cpu" in out
    bad = argparse.Namespace(resume=False, local=True, num_proc=3)
    assert job.run(cfg, bad) == 2
    assert "bigopt train: --local runs one rank in this process, --num-proc 3" in capsys.readouterr().err
    indivisible = argparse.Namespace(resume=False, local=False, num_proc=3)  # 256 rows a step over 3 ranks
    assert job.run(cfg, indivisible) == 2
    err = capsys.readouterr().err
    assert err.startswith("bigopt train: --num-proc 3: batch_size 256 must be divisible") and "pydantic" not in err


def _stop_at_batch(monkeypatch, n: int, stop: type[KeyboardInterrupt]) -> None:
    """Ctrl-C (KeyboardInterrupt) or SIGTERM (jobs.cli.Terminated) once, as the loop reads its
    ``n``-th batch; the calls after it go on."""
    import training.loop

    real, calls = training.loop.batch_to_inputs, []

    def counted(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise stop()
        return real(*a, **k)

    monkeypatch.setattr(training.loop, "batch_to_inputs", counted)


def test_run_stopped_while_training_keeps_its_checkpoints_and_its_resume_continues(synth_gold, tmp_path, capsys,
                                                                                    monkeypatch):
    """`bigopt run` stopped in its train step said "what it had not committed was removed" (the
    checkpoints are kept) and had no --resume: a re-run cleared the checkpoints and started
    over. Now it names the command that continues (the same one with --resume), and that
    command ends with the parameters and test metrics of an uninterrupted run. A stop in its
    data steps, and `bigopt train`'s, are said as before."""
    import shlex

    from jobs.cli import Terminated, main

    def argv(command: str, where, *flags: str) -> list[str]:
        return [command, *train_overrides(synth_gold, where, "train.max_steps=30", "train.checkpoint_every=10",
                                          "train.eval_every=15"), *flags, "--local"]

    assert main(argv("run", tmp_path / "a", "--skip-data")) == 0
    full = capsys.readouterr().out
    _stop_at_batch(monkeypatch, 17, Terminated)  # after the step-10 checkpoint
    stopped = argv("run", tmp_path / "b", "--skip-data")
    assert main(stopped) == 143
    err = capsys.readouterr().err.strip().splitlines()[-1]
    again = shlex.join(["bigopt", *stopped, "--resume"])
    assert err == f"bigopt run: stopped by SIGTERM; its checkpoints are kept: {again} continues from the last"
    assert [p.name for p in (tmp_path / "b" / "ckpt").iterdir() if p.name != LOCK_NAME] == ["step-00000010.pt"]
    assert main(shlex.split(again)[1:]) == 0  # the command it names, as it names it
    resumed = capsys.readouterr().out

    def last(where) -> dict:
        return torch.load(where / "ckpt" / "step-00000030.pt", weights_only=True)["model"]

    a, b = last(tmp_path / "a"), last(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical parameters

    def test_line(out: str) -> str:
        return next(line for line in out.splitlines() if "test AUC" in line)

    assert test_line(resumed) == test_line(full)

    _stop_at_batch(monkeypatch, 1, KeyboardInterrupt)  # before the first checkpoint: nothing to resume from
    assert main(argv("train", tmp_path / "c")) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "bigopt train: stopped by Ctrl-C; it had written no checkpoint yet (train.checkpoint_every): the same "
        "command starts again from step 0")
    import pipelines.criteo.ingest

    def stopped_ingest(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipelines.criteo.ingest, "ingest", stopped_ingest)
    # the gold its own featurize writes (other gold is refused without --skip-data)
    own_gold = [f"train.{split}_table=null" for split in ("train", "valid", "test")]
    assert main(argv("run", tmp_path / "d", "--no-generate", *own_gold)) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "bigopt run: stopped by Ctrl-C; what it had not committed was removed")


def test_a_stopped_run_is_killed_in_mlflow_and_a_broken_one_failed(synth_gold, tmp_path, capsys, monkeypatch):
    """A run stopped by SIGTERM (how Airflow stops a task) or Ctrl-C was marked FAILED in MLflow,
    like a crash: the UI and `bigopt compare` ("1 failed") could not tell a run its user stopped,
    which --resume continues, from one that broke. It is KILLED now; --resume takes it to
    FINISHED, and an error still marks a run FAILED."""
    from mlflow import MlflowClient

    from jobs.cli import Terminated, main
    from train_helpers import fresh_store

    store = fresh_store(tmp_path)
    client = MlflowClient(store[0])

    def train(where, *flags: str) -> list[str]:
        return ["train", *train_overrides(synth_gold, where, "train.max_steps=20", "train.checkpoint_every=10",
                                          "tracking.log_model=false", tracking=store), *flags, "--local"]

    def statuses() -> list[str]:
        ids = [e.experiment_id for e in client.search_experiments()]
        return [r.info.status for r in client.search_runs(ids, order_by=["attribute.start_time ASC"])]

    _stop_at_batch(monkeypatch, 13, Terminated)  # after the step-10 checkpoint
    assert main(train(tmp_path / "a")) == 143
    assert statuses() == ["KILLED"]
    assert main(train(tmp_path / "a", "--resume")) == 0
    assert statuses() == ["FINISHED"]

    _stop_at_batch(monkeypatch, 3, KeyboardInterrupt)
    assert main(train(tmp_path / "b")) == 130
    assert statuses() == ["FINISHED", "KILLED"]

    import training.loop

    def broken(*a, **k):
        raise RuntimeError("a broken batch")

    monkeypatch.setattr(training.loop, "batch_to_inputs", broken)
    with pytest.raises(RuntimeError, match="a broken batch"):  # in-process (--local): raised as it is
        main(train(tmp_path / "c"))
    assert statuses() == ["FINISHED", "KILLED", "FAILED"]
    capsys.readouterr()


def test_a_run_killed_by_kill_9_is_marked_killed_when_a_fresh_run_replaces_its_checkpoints(synth_gold, tmp_path,
                                                                                           caplog):
    """A driver killed by `kill -9` (the OOM killer, a power loss) ends nothing: its MLflow run
    stayed RUNNING forever and `bigopt compare` said "1 running" of it. A fresh run that removes
    its checkpoints marks it KILLED, unless a run still trains in that folder (holds its lock)."""
    import logging

    from mlflow import MlflowClient

    from train_helpers import fresh_store
    from training.checkpoint import folder_lock, save_checkpoint

    store = fresh_store(tmp_path)
    client = MlflowClient(store[0])
    exp = client.create_experiment("killed-elsewhere")

    def dead_run(where) -> str:  # what a kill -9 after the step-10 checkpoint leaves
        rid = client.create_run(exp, run_name="k1").info.run_id
        client.log_metric(rid, "train_loss", 0.5, step=10)
        save_checkpoint(where / "ckpt", 10, {"run_id": rid})
        return rid

    def fresh(where):
        return run_training(train_cfg(synth_gold, where, "train.max_steps=10", "run.name=k1",
                                      "tracking.log_model=false", tracking=store))

    # a run still training there holds the folder's lock: its run is left as it is, and said
    held = dead_run(tmp_path / "b")
    with folder_lock(tmp_path / "b" / "ckpt") as got, caplog.at_level(logging.INFO, logger="training.api"):
        assert got is True
        fresh(tmp_path / "b")
    assert client.get_run(held).info.status == "RUNNING"
    assert f"another bigopt run is training in this folder now; MLflow run(s) {held}" in caplog.text
    caplog.clear()

    rid = dead_run(tmp_path / "a")
    with caplog.at_level(logging.INFO, logger="training.api"):
        res = fresh(tmp_path / "a")
    old = client.get_run(rid).info
    assert old.status == "KILLED" and res.run_id != rid and _run_status(res) == "FINISHED"
    assert old.start_time <= old.end_time <= client.get_run(res.run_id).info.start_time
    assert f"MLflow run {rid} was left RUNNING by a run that died" in caplog.text and "marked KILLED" in caplog.text
    # the next fresh run finds a FINISHED run in the folder: nothing said, nothing changed
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="training.api"):
        again = fresh(tmp_path / "a")
    assert "left RUNNING" not in caplog.text and _run_status(res) == "FINISHED" and _run_status(again) == "FINISHED"


def test_compression_hook_in_process(synth_gold, tmp_path, mlflow_store):
    """compression.name != none: plain optimizer + GradientCommunicator, bytes accounted."""
    cfg = train_cfg(synth_gold, tmp_path, "train.max_steps=20", "train.compression.name=topk",
                    "train.compression.params={ratio: 0.05}", "tracking.log_model=false",
                    tracking=mlflow_store)
    res = run_training(cfg)
    sent = res.rank0["bytes_sent_per_step"]
    dense = sum(p.numel() * 4 for p in _model_params(res))
    assert 0 < sent < 0.5 * dense
    from mlflow import MlflowClient

    m = MlflowClient(res.tracking_uri).get_run(res.run_id).data.metrics
    assert m["bytes_sent_per_step"] == pytest.approx(sent) and "comm/ratio" in m
    assert m["dense_grad_bytes"] == dense


def test_none_gives_sparse_as_dense_to_horovod_and_counts_what_it_sends(synth_gold, tmp_path, monkeypatch):
    """compression.name=none: hvd.DistributedOptimizer gets train.compression.sparse_as_dense, and
    bytes_sent_per_step is what it then sends: the dense gradients plus the sparse table's
    (uncoalesced) int64 indices and rows, or, densified, every parameter's bytes. Until the
    twentieth session sparse_as_dense was not passed (and the bytes were the rows' either way)."""
    from training.dist import LocalDist

    made = []

    class FakeHvd:  # records the wrapper's arguments; one rank: the exchange is the identity
        @staticmethod
        def DistributedOptimizer(opt, **kwargs):
            made.append(kwargs)
            return opt

    monkeypatch.setattr(LocalDist, "hvd", FakeHvd)
    common = ("train.optimizer=adagrad", "train.lr=0.01", "train.max_steps=4", "train.log_every=2")
    rows = run_training(train_cfg(synth_gold, tmp_path / "rows", *common))
    dense = run_training(train_cfg(synth_gold, tmp_path / "dense", *common, "train.compression.sparse_as_dense=true"))
    assert [m["sparse_as_dense"] for m in made] == [False, True]
    from training.models import build_model

    named = dict(build_model("dlrm", cardinalities=rows.spec.cardinalities, embedding_dim=8, bottom_mlp=[32],
                             top_mlp=[32]).named_parameters())
    full = sum(p.numel() * 4 for p in named.values())
    table = named["emb.table.weight"].numel() * 4  # one table for all columns, rows of 8
    lookups = 256 * len(rows.spec.cardinalities)  # one row id per column per example
    assert rows.rank0["bytes_sent_per_step"] == full - table + lookups * (8 + 8 * 4)
    assert dense.rank0["bytes_sent_per_step"] == full


def test_batch_size_command(synth_gold, tmp_path, capsys):
    import argparse

    from jobs import batch_size as job

    from training import loaders

    read = []
    real = loaders.table_to_tensors
    cfg = train_cfg(synth_gold, tmp_path, "train.num_proc=2")
    with pytest.MonkeyPatch.context() as mp:  # the rows of the largest size, not the whole table
        mp.setattr(loaders, "table_to_tensors", lambda *a, **k: read.append(real(*a, **k)) or read[-1])
        assert job.run(cfg, argparse.Namespace(sizes=[32, 64, 128], memory_budget_gb=4.0, steps=1)) == 0
    assert [len(r["label"]) for r in read] == [128]
    out = capsys.readouterr().out
    assert "measured" in out and "memory(b)" in out and "time(b)" in out
    # the sizes are per rank; train.batch_size is global
    b = int(re.search(r"^recommended (\d+):", out, re.M).group(1))
    assert f"per rank and micro-step: train.batch_size={2 * b} with train.num_proc=2 and train.grad_accum_steps=1" \
        in out
    # bad arguments are usage errors (exit 2), not tracebacks from the fits (seventeenth session)
    from jobs.cli import main

    for bad in (["--sizes", "abc"], ["--sizes", "0"], ["--sizes", "64"], ["--sizes", "16,32", "--steps", "0"]):
        with pytest.raises(SystemExit) as ei:
            main(["batch-size", "conf/demo.yaml", *bad])
        err = capsys.readouterr().err
        assert ei.value.code == 2 and "Traceback" not in err and ("batch sizes" in err or "integer >= 1" in err), err


def test_batch_size_says_what_the_table_cannot_hold(synth_gold, tmp_path, capsys):
    """The recommended size as train.batch_size was printed even when bigopt train refuses it
    (twice the whole table: "train table too small"), and sizes above the table's rows were
    measured on its rows repeated, unsaid (attack probe)."""
    import argparse

    from jobs import batch_size as job
    from training.dataspec import resolve_data
    from training.synthetic import make_gold

    cfg = train_cfg(synth_gold, tmp_path, "train.num_proc=2")
    spec = resolve_data(cfg)
    assert job.global_batch_line(cfg.train, spec, 64) == (
        "per rank and micro-step: train.batch_size=128 with train.num_proc=2 and train.grad_accum_steps=1")
    assert job.global_batch_line(cfg.train, spec, 16384).endswith(
        "train.grad_accum_steps=1 is more than the train table's 16,000 rows give each rank for one step: "
        "bigopt train would refuse it; measure sizes up to the table's rows per rank")
    small = make_gold(tmp_path / "small", rows={"train": 100, "valid": 50, "test": 50}, files_per_table=1, seed=2)
    assert job.run(train_cfg(small, tmp_path), argparse.Namespace(sizes=[32, 128], memory_budget_gb=None,
                                                                  steps=1)) == 0
    assert "the train table has 100 rows: the sizes above that measured its rows repeated" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [["train.optimizer=nonexistent"], ["train.model_params.embedding_dim=0"],
                                 ["train.optimizer=sophia", "train.optimizer_params.bogus=1"]])
def test_batch_size_command_checks_the_train_settings_first(synth_gold, tmp_path, capsys, bad):
    """Bad train.* settings are bigopt train's one line and exit 2, before the train table is
    read. batch-size did not check them: the first size's model or optimizer raised a
    traceback (exit 1)."""
    from jobs.cli import main
    from training.loop import TrainSettingsError, check_settings

    cfg = train_cfg(synth_gold, tmp_path, *bad)
    with pytest.raises(TrainSettingsError) as ei:
        check_settings(cfg.train, 26, 13)
    capsys.readouterr()
    assert main(["batch-size", *train_overrides(synth_gold, tmp_path, *bad), "--sizes", "64,128", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err == f"bigopt batch-size: {ei.value}\n"


def _finished_run_with_checkpoint(gold, tmp_path, mlflow_store, *extra):
    cfg = train_cfg(gold, tmp_path, "train.max_steps=20", "train.checkpoint_every=10", "run.name=resume-check",
                    *extra, tracking=mlflow_store)
    res = run_training(cfg)
    return cfg, res


def _run_status(res) -> str:
    import mlflow

    return mlflow.tracking.MlflowClient(res.tracking_uri).get_run(res.run_id).info.status


def test_the_lr_logged_at_a_step_is_the_one_it_used(synth_gold, tmp_path, mlflow_store):
    """MLflow's `lr` at step k is the LR step k ran at. It was read after sched.step(), the next
    step's: with 2 warmup steps step 1's 0.5 * lr never appeared and the last step showed 0."""
    import math

    from mlflow import MlflowClient

    cfg = train_cfg(synth_gold, tmp_path, "train.lr=0.01", "train.scheduler=cosine", "train.warmup_steps=2",
                    "train.max_steps=10", "train.log_every=1", "run.name=lr-logged", tracking=mlflow_store)
    res = run_training(cfg)
    hist = MlflowClient(res.tracking_uri).get_metric_history(res.run_id, "lr")
    want = [0.005, 0.01] + [0.01 * (1 + math.cos(math.pi * s / 8)) / 2 for s in range(8)]
    assert [h.step for h in hist] == list(range(1, 11))
    assert [h.value for h in hist] == pytest.approx(want)


def test_resume_refuses_changed_settings_and_leaves_the_run_as_it_was(synth_gold, tmp_path, mlflow_store, capsys):
    """A resume that changes what the run computes (lr, optimizer, batch, ranks, model...) is one
    clear refusal naming each change, before anything starts: until the seventeenth session a
    changed lr was silently overridden by the restored scheduler while the checkpoint recorded
    the new config, and a changed optimizer or batch size ended in a traceback that marked the
    finished MLflow run FAILED. Changing only when to stop is a resume."""
    import argparse

    from jobs.train import run as train_command
    from training.checkpoint import ResumeError

    cfg, first = _finished_run_with_checkpoint(synth_gold, tmp_path, mlflow_store)
    assert _run_status(first) == "FINISHED"
    for changes, named in [(["train.lr=0.05", "train.optimizer=adamw"], ["train.lr: 0.003", "train.optimizer: 'adam'"]),
                           (["train.batch_size=512"], ["train.batch_size: 256 in the checkpoint, 512 now"]),
                           (["train.model_params.embedding_dim=4"], ["train.model_params"]),
                           (["run.seed=99"], ["run.seed"])]:
        changed = train_cfg(synth_gold, tmp_path, "train.max_steps=30", "train.checkpoint_every=10",
                            "run.name=resume-check", *changes, tracking=mlflow_store)
        with pytest.raises(ResumeError) as ei:
            run_training(changed, resume=True)
        assert all(n in str(ei.value) for n in named), (changes, str(ei.value))
        assert "max_steps" not in str(ei.value)  # a resumable change is not named
        assert _run_status(first) == "FINISHED"
        # the command: one line, exit 2
        rc = train_command(changed, argparse.Namespace(resume=True, local=True, num_proc=None))
        err = capsys.readouterr().err
        assert rc == 2 and "\nbigopt train: cannot resume" in f"\n{err}" and "Traceback" not in err
    more = train_cfg(synth_gold, tmp_path, "train.max_steps=30", "train.checkpoint_every=10", "train.eval_every=15",
                     "run.name=resume-check", tracking=mlflow_store)
    resumed = run_training(more, resume=True)
    assert resumed.rank0["step"] == 30 and resumed.run_id == first.run_id and _run_status(resumed) == "FINISHED"
    # max_steps is the length of any schedule but a constant one: a restored cosine schedule
    # climbed back up to its peak past its old end
    cosine = train_cfg(synth_gold, tmp_path, "train.max_steps=40", "train.checkpoint_every=10",
                       "run.name=resume-check", "train.scheduler=cosine", tracking=mlflow_store)
    run_training(cosine.model_copy(update={"train": cosine.train.model_copy(update={"max_steps": 20})}))
    with pytest.raises(ResumeError, match=r"train.max_steps: 20 in the checkpoint, 40 now \(the cosine schedule"):
        run_training(cosine, resume=True)
    # the checkpoint's MLflow run is not in this store: one line (it was an MlflowException traceback)
    elsewhere = cosine.model_copy(update={"train": cosine.train.model_copy(update={"max_steps": 20}),
                                          "tracking": cosine.tracking.model_copy(
                                              update={"tracking_uri": f"sqlite:///{tmp_path}/other.db"})})
    with pytest.raises(ResumeError, match="checkpoint's MLflow run .* is not in the tracking store"):
        run_training(elsewhere, resume=True)


def test_a_resumed_run_keeps_the_metrics_logged_before_the_crash(synth_gold, tmp_path, mlflow_store):
    """Metrics are buffered for MLflow; a crash lost what the buffer held, and a resume, which
    restarts at the checkpoint, never logged those steps again (here: the step-10 evaluation and
    the time-to-accuracy). The buffer is flushed with every checkpoint now."""
    import mlflow

    from training.loop import InjectedFailure

    cfg = train_cfg(synth_gold, tmp_path, "run.name=crash-resume", "train.max_steps=20", "train.eval_every=10",
                    "train.checkpoint_every=10", "train.target_auc=0.5", "train.early_stop=false",
                    tracking=mlflow_store)
    failing = cfg.model_copy(update={"train": cfg.train.model_copy(update={"fail_at_step": 15})})
    with pytest.raises(InjectedFailure):
        run_training(failing)
    res = run_training(cfg, resume=True)
    client = mlflow.MlflowClient(mlflow_store[0])
    assert [m.step for m in client.get_metric_history(res.run_id, "valid_auc")] == [10, 20]
    assert [m.step for m in client.get_metric_history(res.run_id, "tta_samples")] == [10]
    assert [m.step for m in client.get_metric_history(res.run_id, "train_loss")] == list(range(5, 21, 5))

    # a crashed run that had sent steps after its checkpoint (every log flushed at once), and a
    # resume of a finished run: no step is logged twice (they were: train_loss, valid_auc, the
    # final and test metrics, tta_* with new timings)
    cfg = train_cfg(synth_gold, tmp_path, "run.name=crash-resume-2", "train.max_steps=40", "train.eval_every=10",
                    "train.checkpoint_every=20", "train.target_auc=0.5", "train.early_stop=false",
                    "train.checkpoint_dir=" + str(tmp_path / "ckpt2"), "tracking.flush_every_s=0",
                    "train.test_at_end=true", tracking=mlflow_store)
    with pytest.raises(InjectedFailure):
        run_training(cfg.model_copy(update={"train": cfg.train.model_copy(update={"fail_at_step": 35})}))
    res = run_training(cfg, resume=True)
    run_training(cfg, resume=True)  # after the end: nothing new
    for key, steps in [("train_loss", list(range(5, 41, 5))), ("valid_auc", [10, 20, 30, 40]),
                       ("tta_samples", [10]), ("test_auc", [40]), ("final_valid_auc", [40])]:
        assert [m.step for m in client.get_metric_history(res.run_id, key)] == steps, key


def test_an_early_stop_logs_its_last_window_and_the_bytes_sent(synth_gold, tmp_path, mlflow_store):
    """An early stop between two logs (step 10 with log_every 7): steps 8-10 had no train_loss,
    samples_per_s or bytes; the bytes sent in all and up to the target were not in MLflow."""
    import mlflow

    cfg = train_cfg(synth_gold, tmp_path, "run.name=early-window", "train.max_steps=40", "train.eval_every=10",
                    "train.log_every=7", "train.target_auc=0.3", "train.early_stop=true", tracking=mlflow_store)
    res = run_training(cfg)
    assert res.rank0["stop_reason"] == "target_auc" and res.rank0["step"] == 10
    client = mlflow.MlflowClient(mlflow_store[0])
    assert [m.step for m in client.get_metric_history(res.run_id, "train_loss")] == [7, 10]
    assert [m.step for m in client.get_metric_history(res.run_id, "bytes_sent_per_step")] == [7, 10]
    m = client.get_run(res.run_id).data.metrics
    per_step = res.rank0["bytes_sent_per_step"]
    assert m["total_bytes_sent"] == res.rank0["bytes_sent_total"] == 10 * per_step > 0
    assert m["tta_bytes_sent"] == 10 * per_step and m["tta_step"] == 10


def test_a_resume_logs_a_steps_metrics_a_flush_left_out(mlflow_store):
    """Flushes are timed, so one step's metrics can be split by one: the step-25 evaluation sent,
    its tta_* still buffered at a crash. The resume skipped whole steps up to the run's latest
    step of any metric, so the recomputed tta_* were dropped for good (tta_reached=1 with no
    tta_*). It now skips per metric."""
    import mlflow

    from training.tracking import MetricLogger

    uri = mlflow_store[0]
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment(f"split-flush-{time.time_ns()}")).info.run_id
    before = MetricLogger(uri, run_id, flush_every_s=3600)
    before.log({"train_loss": 0.5}, 24)
    before.log({"valid_auc": 0.64}, 25)
    before.flush()
    before.log({"tta_step": 25.0, "tta_samples": 6400.0}, 25)  # buffered: the process dies here
    after = MetricLogger(uri, run_id, flush_every_s=3600, resumed=True)  # restarts at the step-20 checkpoint
    for step in range(21, 27):
        after.log({"train_loss": 0.4}, step)
    after.log({"valid_auc": 0.65}, 25)
    after.log({"tta_step": 25.0, "tta_samples": 6400.0}, 25)
    after.flush()
    steps = {k: [m.step for m in client.get_metric_history(run_id, k)] for k in ("train_loss", "valid_auc", "tta_step")}
    assert steps == {"train_loss": [24, 25, 26], "valid_auc": [25], "tta_step": [25]}
    assert client.get_metric_history(run_id, "valid_auc")[0].value == 0.64  # the first, not logged twice


def test_metrics_up_to_a_checkpoint_are_in_mlflow_once_it_exists(synth_gold, tmp_path, mlflow_store, monkeypatch):
    """A process that dies right after a checkpoint's rename: every metric up to that step is in
    MLflow already (the resume restarts there and logs only later steps). The buffer was flushed
    after the rename, so a death in between lost the step-10 metrics for good."""
    import mlflow

    import training.loop as loop

    class Died(RuntimeError):
        pass

    def save_then_die(*a, **kw):
        loop_save(*a, **kw)
        raise Died("killed just after the checkpoint's rename")

    loop_save = loop.save_checkpoint
    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    cfg = train_cfg(synth_gold, tmp_path, "run.name=die-after-checkpoint", "train.max_steps=20",
                    "train.eval_every=10", "train.checkpoint_every=10", "tracking.flush_every_s=3600",
                    tracking=mlflow_store)
    with pytest.raises(Died):
        run_training(cfg)
    assert [p.name for p in (tmp_path / "ckpt").iterdir() if p.name != LOCK_NAME] == ["step-00000010.pt"]
    client = mlflow.MlflowClient(mlflow_store[0])
    run_id = torch.load(tmp_path / "ckpt" / "step-00000010.pt", weights_only=True)["run_id"]
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [5, 10]
    assert [m.step for m in client.get_metric_history(run_id, "valid_auc")] == [10]


def test_a_resume_records_what_its_command_changed(synth_gold, tmp_path, mlflow_store):
    """MLflow params are immutable, so a resumed run's params are its first command's: after a
    resume with a longer max_steps they said train.max_steps=20 for a 30-step run. Each resume
    adds resume.<n>.from_step and resume.<n>.<param> for each param its command changed."""
    import mlflow

    cfg, first = _finished_run_with_checkpoint(synth_gold, tmp_path, mlflow_store, "train.eval_every=0")
    client = mlflow.MlflowClient(mlflow_store[0])
    assert client.get_run(first.run_id).data.params["total_steps"] == "20"
    for n, steps, changed in [(1, 30, {"train.max_steps": "30", "total_steps": "30"}), (2, 30, {}),
                              (3, 40, {"train.max_steps": "40", "total_steps": "40"})]:
        more = train_cfg(synth_gold, tmp_path, f"train.max_steps={steps}", "train.checkpoint_every=10",
                         "train.eval_every=0", "run.name=resume-check", tracking=mlflow_store)
        res = run_training(more, resume=True)
        assert res.run_id == first.run_id
        p = client.get_run(res.run_id).data.params
        assert p["train.max_steps"] == "20" and p["total_steps"] == "20"  # the first command's
        mine = {k.removeprefix(f"resume.{n}."): v for k, v in p.items() if k.startswith(f"resume.{n}.")}
        from_step = mine.pop("from_step")
        assert from_step == str(first.rank0["step"] if n == 1 else 30), from_step
        assert (mine.pop("config_hash", None) is not None) == bool(changed)  # the command's config's
        group = mine.pop("repeat_group", None)  # a run of another length: another experiment's repeat
        assert (group is not None) == bool(changed) and mine == changed, (n, mine)
        if group:  # the tag says what the run is now (tags are mutable)
            assert client.get_run(res.run_id).data.tags["bigopt.repeat_group"] == group


def test_resume_names_a_damaged_checkpoint(synth_gold, tmp_path, mlflow_store):
    """A truncated or empty newest checkpoint is named as damaged, with the older one to fall
    back on, instead of torch's zip-reader or mmap error."""
    from training.checkpoint import ResumeError, list_checkpoints

    cfg, first = _finished_run_with_checkpoint(synth_gold, tmp_path, mlflow_store)
    older, newest = list_checkpoints(first.checkpoint_dir)
    data = newest.read_bytes()
    for damaged, reason in [(data[: len(data) // 2], "damaged ("), (b"", "damaged (it is empty)")]:
        newest.write_bytes(damaged)
        with pytest.raises(ResumeError) as ei:
            run_training(cfg, resume=True)
        msg = str(ei.value)
        assert str(newest) in msg and reason in msg and older.name in msg and "Traceback" not in msg
    assert _run_status(first) == "FINISHED"


def test_resume_refuses_a_position_in_files_a_vacuum_removed(synth_gold, tmp_path):
    """The checkpoint's gold train version was compacted and vacuumed since: the same rows are
    at the latest version, but in other files, where the saved loader position means other
    rows. One clear refusal (until the seventeenth session: a ValueError traceback from the
    loader)."""
    import shutil

    from pipelines.lake import optimize, vacuum
    from training.checkpoint import ResumeError

    gold = {k: str(tmp_path / "gold" / k) for k in ("train", "valid", "test")}
    for k in gold:
        shutil.copytree(synth_gold[k], gold[k])
    gold = {**synth_gold, **gold}
    cfg = train_cfg(gold, tmp_path, "train.max_steps=20", "train.checkpoint_every=10")
    run_training(cfg)
    optimize(gold["train"])
    vacuum(gold["train"], retention_hours=0, dry_run=False, enforce_retention=False)
    with pytest.raises(ResumeError, match=r"gold train v\d+, whose files were compacted and vacuumed since"):
        run_training(train_cfg(gold, tmp_path, "train.max_steps=30", "train.checkpoint_every=10"), resume=True)


def test_a_pinned_version_read_at_another_says_so_and_is_recorded(synth_gold, tmp_path, caplog):
    """A pinned gold version compacted and vacuumed since is read at the latest version (the
    same rows, in other files: another order, other results). Until the twenty-fifth session
    that was an INFO line, and MLflow recorded only the version read (reproducibility probe)."""
    import logging
    import shutil

    from deltalake import DeltaTable

    from pipelines.lake import optimize, vacuum
    from training.dataspec import resolve_data

    gold = {k: str(tmp_path / "gold" / k) for k in ("train", "valid", "test")}
    for k in gold:
        shutil.copytree(synth_gold[k], gold[k])
    gold = {**synth_gold, **gold}
    pin = DeltaTable(gold["train"]).version()
    optimize(gold["train"], target_size=1 << 30)
    vacuum(gold["train"], retention_hours=0, dry_run=False, enforce_retention=False)
    assert DeltaTable(gold["train"]).version() > pin
    with caplog.at_level(logging.WARNING):
        spec = resolve_data(train_cfg(gold, tmp_path, f"train.table_version={pin}"))
    assert spec.requested == {"train": pin} and spec.versions["train"] == DeltaTable(gold["train"]).version()
    assert f"results will not match runs that read v{pin}" in caplog.text
    assert spec.table_ids == {"train": DeltaTable(gold["train"]).metadata().id}
    assert resolve_data(train_cfg(gold, tmp_path)).requested == {}


def test_repeat_group_groups_runs_that_differ_only_in_seed_name_and_bookkeeping(synth_gold, tmp_path):
    """config_hash covers every setting (run.name, tracking, checkpoints...), so two repeats of
    one experiment never shared one (reproducibility probe): repeat_group hashes what decides
    the result but the seed, the data read included."""
    from training.dataspec import resolve_data
    from training.tracking import repeat_group

    def group(*overrides):
        cfg = train_cfg(synth_gold, tmp_path, *overrides)
        return repeat_group(cfg.train, resolve_data(cfg))

    base = group()
    assert group("run.seed=7", "run.name=again", "train.log_every=3", f"train.checkpoint_dir={tmp_path}/c2",
                 "train.threads_per_rank=1", "train.test_at_end=false") == base
    assert group("train.lr=0.01") != base and group("train.optimizer=lamb") != base
    assert group("train.num_proc=1") != group("train.num_proc=2")  # the world size decides the batches
    from deltalake import DeltaTable

    latest = DeltaTable(synth_gold["train"]).version()
    assert group(f"train.table_version={latest - 1}") != base  # other data
    # another vocabulary: embedding tables 4x the size, another model (grouped as a repeat until
    # the twenty-sixth session)
    doc = json.loads(open(synth_gold["vocabulary"]).read())
    for col in doc["columns"].values():
        col["cardinality"] *= 4
    (tmp_path / "big.json").write_text(json.dumps(doc))
    assert group(f"train.vocabulary={tmp_path / 'big.json'}") != base
    assert group(f"train.vocabulary={synth_gold['vocabulary']}") == base  # the same sizes, named


def test_data_seed_orders_the_data_apart_from_the_model_seed(synth_gold, tmp_path, monkeypatch):
    """run.seed seeded both the model's initialisation and the data order, so repeats could
    not vary one and keep the other (reproducibility probe); train.data_seed seeds the
    loaders' shuffle alone (default: run.seed), and repeats varying it share a repeat_group."""
    import training.loop
    from training.dataspec import resolve_data
    from training.tracking import repeat_group

    seeds = []
    real = training.loop.make_loader

    def spy(*a, **k):
        if k.get("train"):
            seeds.append(k["seed"])
        return real(*a, **k)

    monkeypatch.setattr(training.loop, "make_loader", spy)
    fingerprints = []
    for overrides in (("run.seed=3",), ("run.seed=3", "train.data_seed=11"), ("run.seed=4", "train.data_seed=11")):
        res = run_training(train_cfg(synth_gold, tmp_path / str(len(seeds)), "train.max_steps=2", *overrides))
        fingerprints.append(res.rank0["fingerprint"])
    assert seeds == [3, 11, 11]
    assert len(set(fingerprints)) == 3  # the same init and other data; the same data and another init
    cfgs = [train_cfg(synth_gold, tmp_path, f"train.data_seed={d}") for d in (1, 2)]
    assert repeat_group(cfgs[0].train, resolve_data(cfgs[0])) == repeat_group(cfgs[1].train, resolve_data(cfgs[1]))


def test_bad_train_settings_are_one_error_before_anything_starts(synth_gold, tmp_path, mlflow_store, capsys):
    """An unknown optimizer, another model's hyper-parameters, a bad compressor parameter: one
    line from `bigopt train` (exit 2) before the ranks or an MLflow run start. Until the
    seventeenth session each passed `bigopt config`, then failed in every rank with a traceback
    and left an MLflow run marked FAILED. A local backend with 2 ranks fails as config."""
    import argparse

    import mlflow

    from jobs.config import ConfigError, load_config
    from jobs.train import run as train_command
    from training.loop import TrainSettingsError

    kept = tmp_path / "ckpt" / "step-00000005.pt"  # an earlier run's: a refused command keeps it
    kept.parent.mkdir()
    kept.write_bytes(b"an earlier run's checkpoint")
    for bad, said in [(["train.optimizer=nosuch"], "unknown optimizer 'nosuch'"),
                      (["train.model=logreg"], "model logreg: bad hyper-parameters"),
                      (["train.compression.name=topk", "train.compression.params={ratio: 7}"], "train settings: "),
                      # `none` (hvd.DistributedOptimizer) took any params and ignored them
                      (["train.compression.params={error_feedback: true}"], "error_feedback is meaningless"),
                      (["train.compression.params={ratio: 0.1}"], "compressor 'none' does not take ['ratio']"),
                      (["train.optimizer=momentum", "train.sparse_embeddings=true"], "train settings: "),
                      # these crashed every rank at the first step (a closure / an epoch hook)
                      (["train.optimizer=svrg"], "train.optimizer=svrg needs a loss closure at every step"),
                      (["train.optimizer=saga", "train.optimizer_params={num_components: 10}"],
                       "train.optimizer=saga needs a loss closure at every step"),
                      (["train.optimizer=lbfgs"], "train.optimizer=lbfgs needs a closure that re-evaluates"),
                      # settings only the optimizer's first step refused (a traceback from every rank), and a
                      # misspelt pytorch_optimizer key (taken and ignored: the run trained on the defaults)
                      (["train.optimizer=adam", "train.optimizer_params={betas: [0.9, 0.999, 0.5]}"],
                       "train.optimizer=adam (optimizer_params {'betas': [0.9, 0.999, 0.5]}) fails at its first step"),
                      (["train.optimizer=po:adan", "train.optimizer_params={betaz: [0.1, 0.1, 0.1]}"],
                       "unknown hyperparameter(s) 'betaz' for optimizer 'po:adan'"),
                      # a ZeroDivisionError traceback at the first step / a run at a negative LR
                      (["train.scheduler=step", "train.scheduler_params.step_size=0"], "step_size must be"),
                      (["train.scheduler=exponential", "train.scheduler_params.gamma=-1"], "gamma must be")]:
        cfg = train_cfg(synth_gold, tmp_path, "run.name=bad-settings", *bad, tracking=mlflow_store)
        with pytest.raises(TrainSettingsError, match="^train settings: ") as ei:
            run_training(cfg)
        assert said in str(ei.value), str(ei.value)
        rc = train_command(cfg, argparse.Namespace(resume=False, local=True, num_proc=None))
        err = capsys.readouterr().err
        assert rc == 2 and "bigopt train: train settings: " in err and "Traceback" not in err
        assert kept.read_bytes() == b"an earlier run's checkpoint"  # it was deleted before the check
    mlflow.set_tracking_uri(mlflow_store[0])
    from training.tracking import experiment_name

    exp = mlflow.get_experiment_by_name(experiment_name(cfg))
    if exp is not None:
        runs = mlflow.search_runs([exp.experiment_id], filter_string="tags.mlflow.runName = 'bad-settings'")
        assert len(runs) == 0
    with pytest.raises((ConfigError, ValueError), match="backend 'local' runs exactly one rank"):
        load_config(None, ["train.backend=local", "train.num_proc=2", "train.batch_size=512"])


def test_bad_mlflow_tag_keys_are_config_errors_and_a_run_that_fails_to_start_is_failed(
        synth_gold, tmp_path, mlflow_store, monkeypatch, capsys):
    """A tag key MLflow refuses is a config error (exit 2). Until the twentieth session MLflow
    took it at create_run, refused it at the first log_batch (a traceback), and the run stayed
    RUNNING with no params: nothing marked a run FAILED before the ranks were launched."""
    import mlflow

    from jobs.cli import main
    from jobs.config import ConfigError, load_config

    for key, said in [("a!b", "MLflow's keys may only contain alphanumerics"), ("/abs", "starts with / or .."),
                      ("a/../b", "reads as another path ('b')"), ("k" * 251, "MLflow takes at most 250")]:
        with pytest.raises(ConfigError, match=f"tracking.tags key '{key}': .*{re.escape(said)}"):
            load_config(None, [f'tracking.tags={{"{key}": x}}'])
    assert main(["train", 'tracking.tags={"a!b": x}', "--local"]) == 2
    err = capsys.readouterr().err
    assert "tracking.tags key 'a!b'" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="tracking.experiment is 501 characters; MLflow takes at most 500"):
        load_config(None, ["tracking.experiment=" + "e" * 501])
    assert load_config(None, ['tracking.tags={"team/x": a, "mlflow.note.content": b, "k 1:v-2_z": c}'])

    def store_gone(client, run_id, items):
        raise RuntimeError("the store went away")

    import training.tracking

    monkeypatch.setattr(training.tracking, "_log_params", store_gone)
    cfg = train_cfg(synth_gold, tmp_path, "run.name=params-fail", tracking=mlflow_store)
    with pytest.raises(RuntimeError, match="the store went away"):
        run_training(cfg)
    client = mlflow.MlflowClient(mlflow_store[0])
    exp = client.get_experiment_by_name("bigopt-criteo")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.mlflow.runName = 'params-fail'")
    assert [r.info.status for r in runs] == ["FAILED"]


def test_a_run_the_data_cannot_hold_is_one_error_before_mlflow(synth_gold, tmp_path, mlflow_store, capsys):
    """The driver counts each rank's steps per epoch as the ranks' loaders will (from the train
    table's footers), so a table too small for one step, and a decaying schedule longer than
    train.epochs allow, are one line before Spark, the ranks or an MLflow run start. Until the
    nineteenth session the first was a ValueError traceback from the rank (exit 1, the MLflow run
    FAILED) and the second the scheduler's ValueError there (the check used max_steps)."""
    import argparse

    import mlflow

    from jobs.train import run as train_command
    from training.dataspec import resolve_data
    from training.loaders import make_loader
    from training.loop import TrainSettingsError

    def no_spark():
        raise AssertionError("Spark started")

    name = "run.name=too-small"
    for bad, said in [(["train.batch_size=16384"], "train table too small for 1 rank(s): 0 micro-batches of 16384"),
                      (["train.batch_size=16384", "train.num_proc=2"], "too small for 2 rank(s): 0 micro-batches of "
                                                                       "8192 rows"),
                      (["train.batch_size=16384", "train.num_proc=2"], "use fewer ranks (train.num_proc, --num-proc)"),
                      # more ranks than a local master runs: fewer ranks is the remedy that answers both
                      # (the real sample on local[2] with conf/criteo.yaml's 8 ranks named only the other two)
                      (["train.batch_size=16384", "train.num_proc=4", "spark.master=local[2]"],
                       "spark.master=local[2] runs 2 Spark task(s) at a time, fewer than train.num_proc=4: lower "
                       "train.num_proc (--num-proc) to 2 or less"),
                      (["train.epochs=1", "train.scheduler=cosine", "train.warmup_steps=100", "train.max_steps=200"],
                       "needs total_steps > warmup_steps (got total_steps=62, warmup_steps=100): the run is 62 "
                       "steps, train.epochs=1 x 62 steps per epoch")]:
        cfg = train_cfg(synth_gold, tmp_path, name, *bad, tracking=mlflow_store)
        with pytest.raises(TrainSettingsError) as ei:
            run_training(cfg, spark=no_spark)
        assert said in str(ei.value), str(ei.value)
        if cfg.train.num_proc == 1:
            rc = train_command(cfg, argparse.Namespace(resume=False, local=True, num_proc=None))
            err = capsys.readouterr().err
            assert rc == 2 and f"bigopt train: {str(ei.value)[:40]}" in err and "Traceback" not in err
    exp = mlflow.MlflowClient(mlflow_store[0]).get_experiment_by_name("bigopt-criteo")
    assert exp is None or not mlflow.MlflowClient(mlflow_store[0]).search_runs(
        [exp.experiment_id], filter_string="tags.mlflow.runName = 'too-small'")
    # the driver's count is each rank's loader's
    from training.loop import run_steps

    for ranks, batch, accum in [(1, 256, 1), (2, 512, 2), (2, 6000, 1)]:
        cfg = train_cfg(synth_gold, tmp_path, f"train.num_proc={ranks}", f"train.batch_size={batch}",
                        f"train.grad_accum_steps={accum}")
        spec, t = resolve_data(cfg), cfg.train
        lens = {len(make_loader(spec.train, spec.columns, t.micro_batch_size, version=spec.versions["train"], rank=r,
                                world_size=ranks, train=True)) for r in range(ranks)}
        assert {run_steps(t, spec)} == {n // accum for n in lens}


@pytest.mark.parametrize("max_rows", [1, 1001, 3999, 4000, 5000])
def test_eval_max_rows_scores_the_splits_first_rows_on_any_number_of_ranks(synth_gold, tmp_path, monkeypatch,
                                                                            max_rows):
    """train.eval_max_rows caps an evaluation over all ranks together at the split's first rows.
    Each rank scored ceil(max_rows / ranks) (2 ranks and 1001: 1002), then max_rows // ranks
    (unequal shards of a split under the cap lost rows), then a share proportional to its shard,
    taken from its shard's start: the right count, but which rows, and so a capped AUC, depended
    on the rank count (metrics probe: 0.4945 on 1 rank, 0.5140 on 2). Each rank's eval loader
    (padded to equal batch counts, as on Horovod) under a dist whose allgather returns the rank's
    own rows: together they score the same rows, with the same scores, on 1, 2 and 3 ranks."""
    import numpy as np

    import training.loop as loop
    from training.dataspec import resolve_data
    from training.dist import LocalDist
    from training.loaders import make_loader

    cfg = train_cfg(synth_gold, tmp_path)
    spec = resolve_data(cfg)
    model = loop.model_for(cfg.train, spec.cardinalities, spec.num_dense)
    scored: list = []
    real = loop.binary_metrics
    monkeypatch.setattr(loop, "binary_metrics", lambda z, y: scored.append((z, y)) or real(z, y))
    seen = {}
    for ranks in (1, 2, 3):
        class OneOf(LocalDist):
            def __init__(self, rank):
                self.rank, self.size = rank, ranks

        scored.clear()
        positions = []
        for r in range(ranks):
            loader = make_loader(spec.valid, spec.columns, 256, version=spec.versions["valid"], rank=r,
                                 world_size=ranks, train=False, prefetch=0)
            total = sum(loader.rank_rows)
            positions.append(loader.global_positions())
            loop.evaluate(model, loader, spec, OneOf(r), torch.device("cpu"), max_rows=max_rows)
        want = min(max_rows, total)
        assert sum(len(z) for z, _ in scored) == want
        assert sorted(np.concatenate(positions).tolist()) == list(range(total))  # every row once, whatever the ranks
        seen[ranks] = np.sort(np.concatenate([z for z, _ in scored])), np.concatenate([y for _, y in scored]).sum()
    for ranks in (2, 3):
        np.testing.assert_array_equal(seen[ranks][0], seen[1][0])  # the same rows scored alike
        assert seen[ranks][1] == seen[1][1]


@pytest.mark.parametrize("override, said", [
    ("train.optimizer=nosuch", "bigopt run: train settings: unknown optimizer 'nosuch'"),
    ("tracking.tracking_uri=sqlite:////proc/bigopt-no.db",
     "bigopt run: cannot open the MLflow tracking store sqlite:////proc/bigopt-no.db: "),
])
def test_bigopt_run_checks_train_settings_before_the_data_steps(tmp_path, capsys, monkeypatch, override, said):
    """`bigopt run` with a bad train.* setting, or a tracking store MLflow cannot use, is the
    same one line, before it generates, ingests or featurizes anything (it used to fail only
    after those steps had run; the store, until the twentieth session, after MLflow's retries too)."""
    import argparse
    from pathlib import Path

    import jobs.run
    from jobs.config import load_config
    from jobs.run import run as run_command

    def data_step(cfg):
        raise AssertionError("a data step started before the check")

    monkeypatch.setattr(jobs.run, "needs_generation", data_step)
    conf = Path(__file__).resolve().parents[2] / "conf" / "demo.yaml"
    cfg = load_config(conf, [f"lake.root={tmp_path / 'lake'}", f"criteo.raw_dir={tmp_path / 'raw'}", override])
    args = argparse.Namespace(no_generate=False, force_ingest=False, force_featurize=False, skip_data=False,
                              local=True, num_proc=None)
    assert run_command(cfg, args) == 2
    err = capsys.readouterr().err
    assert err.startswith(said) and "Traceback" not in err, err
    assert not (tmp_path / "raw").exists() and not (tmp_path / "lake").exists()


def test_an_unusable_tracking_store_is_one_line_before_any_checkpoint_is_removed(synth_gold, tmp_path, mlflow_store,
                                                                                  capsys):
    """A tracking store MLflow cannot open or reach is one line (exit 2) from a cheap check
    (open the sqlite file; one request to the server), and old checkpoints are removed only once
    the MLflow run has started. Until the twentieth session the checkpoints were removed first,
    then MLflow retried (~110 s for sqlite, ~260 s for a server) and ended in a traceback (exit 1)."""
    import argparse
    import socket
    import time

    import mlflow

    from jobs.train import run as train_command

    kept = tmp_path / "ckpt" / "step-00000005.pt"  # an earlier run's: a refused command keeps it
    kept.parent.mkdir()
    kept.write_bytes(b"an earlier run's checkpoint")
    (tmp_path / "afile").write_text("not a folder")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for uri, said in [("sqlite:////proc/no.db", "cannot open the MLflow tracking store sqlite:////proc/no.db: "),
                      (f"sqlite:///{tmp_path}/afile/x.db", "cannot create the folder of the MLflow tracking store"),
                      (f"http://127.0.0.1:{port}", f"cannot reach the MLflow tracking server http://127.0.0.1:{port}"),
                      ("nosuch:store", "MLflow has no tracking store for 'nosuch:store'")]:
        cfg = train_cfg(synth_gold, tmp_path, "run.name=no-store", tracking=(uri, f"{tmp_path}/mlruns"))
        t0 = time.monotonic()
        rc = train_command(cfg, argparse.Namespace(resume=False, local=True, num_proc=None))
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"bigopt train: {said}") and err.count("\n") == 1, err
        assert time.monotonic() - t0 < 60  # no retries
        assert kept.read_bytes() == b"an earlier run's checkpoint"
    # a store that works but where MLflow will not start the run (a deleted experiment of that
    # name): one line too, and the checkpoints are still there
    client = mlflow.MlflowClient(mlflow_store[0])
    client.delete_experiment(client.create_experiment("bigopt-deleted", artifact_location=mlflow_store[1]))
    cfg = train_cfg(synth_gold, tmp_path, "run.name=deleted-exp", "tracking.experiment=bigopt-deleted",
                    tracking=mlflow_store)
    assert train_command(cfg, argparse.Namespace(resume=False, local=True, num_proc=None)) == 2
    err = capsys.readouterr().err
    assert "\nbigopt train: MLflow did not start the run (experiment 'bigopt-deleted') in sqlite:" in f"\n{err}"
    assert "must be in the 'active' state" in err and "Traceback" not in err
    assert kept.read_bytes() == b"an earlier run's checkpoint"
    # once the run has started they go (a fresh run)
    res = run_training(train_cfg(synth_gold, tmp_path, "train.max_steps=10", "train.checkpoint_every=10",
                                 "run.name=store-ok", tracking=mlflow_store))
    assert not kept.exists() and _run_status(res) == "FINISHED"

