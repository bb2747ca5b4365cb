"""`bigopt compare`: runs of an MLflow experiment grouped by repeat_group, each group's metric
with a Student-t interval over its finished runs, target reached k of n, paired differences
from a baseline by seed; failed runs counted and named, never averaged in."""
from __future__ import annotations

import csv
import math
import re
import time

import pytest
from scipy import stats


def _experiment(uri: str, runs: list[dict]) -> str:
    import mlflow
    from mlflow.entities import Metric, Param

    client = mlflow.MlflowClient(uri)
    name = f"compare-{time.time_ns()}"
    exp = client.create_experiment(name)
    for r in runs:
        run = client.create_run(exp, run_name=r["name"])
        params = {"train.model": "dlrm", "device": r.get("device", "cpu"), "lib.bigopt_git": r.get("git", "abc"),
                  **r["params"]}
        ts = int(time.time() * 1000)
        client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()],
                         metrics=[Metric(k, float(v), ts, 0) for k, v in r["metrics"].items()])
        client.set_terminated(run.info.run_id, r.get("status", "FINISHED"))
    return name


def _run(name, group, opt, seed, auc, status="FINISHED", reached=None, tta_samples=None, **extra):
    metrics = {"final_valid_auc": auc, "avg_samples_per_s": 1000.0 + seed, "total_bytes_sent": 4e6}
    if reached is not None:
        metrics["tta_reached"] = float(reached)
        if reached:
            metrics["tta_samples"] = tta_samples
    return {"name": name, "status": status, "metrics": metrics if status == "FINISHED" else {},
            "params": {"repeat_group": group, "train.optimizer": opt, "train.lr": "0.01", "run.seed": seed,
                       "train.data_seed": seed}, **extra}


@pytest.fixture
def experiment(mlflow_store):
    runs = [
        _run("adam-0", "g-adam", "adam", 0, 0.760, reached=1, tta_samples=5000),
        _run("adam-1", "g-adam", "adam", 1, 0.770, reached=1, tta_samples=7000),
        _run("adam-2", "g-adam", "adam", 2, 0.765, reached=0),
        _run("lamb-0", "g-lamb", "lamb", 0, 0.764, reached=1, tta_samples=4000),
        _run("lamb-1", "g-lamb", "lamb", 1, 0.775, reached=1, tta_samples=3000),
        _run("lamb-2", "g-lamb", "lamb", 2, 0.768, reached=1, tta_samples=5000),
        _run("lamb-3", "g-lamb", "lamb", 3, 0.0, status="FAILED"),
    ]
    return mlflow_store[0], _experiment(mlflow_store[0], runs)


def test_groups_intervals_and_paired_gaps(experiment):
    from training.compare import group_runs, load_runs, summarize

    uri, name = experiment
    s = {g.key: g for g in summarize(group_runs(load_runs(uri, name)), baseline="optimizer=adam")}
    adam, lamb = s["g-adam"], s["g-lamb"]
    assert (adam.label, lamb.label) == ("optimizer=adam", "optimizer=lamb")  # what tells the groups apart
    ref = stats.ttest_1samp([0.764, 0.775, 0.768], 0.0).confidence_interval(0.95)
    assert lamb.mean == pytest.approx((0.764 + 0.775 + 0.768) / 3)
    assert (lamb.ci_lo, lamb.ci_hi) == (pytest.approx(ref.low), pytest.approx(ref.high))
    assert len(lamb.runs) == 4 and len(lamb.finished) == 3  # the failed run is not averaged in ...
    assert lamb.notes == ["1 failed (not averaged: lamb-3)"]  # ... and is said
    gaps = [0.764 - 0.760, 0.775 - 0.770, 0.768 - 0.765]  # paired by seed
    ref = stats.ttest_1samp(gaps, 0.0).confidence_interval(0.95)
    assert lamb.pairs == 3 and lamb.gap == pytest.approx(sum(gaps) / 3)
    assert (lamb.gap_lo, lamb.gap_hi) == (pytest.approx(ref.low), pytest.approx(ref.high))
    assert lamb.gap_hi - lamb.gap_lo < lamb.ci_hi - lamb.ci_lo  # pairing removes the seeds' shared effect
    assert (adam.tta_reached, adam.tta_runs, adam.tta_samples) == (2, 3, 6000)  # over those that reached it
    assert (lamb.tta_reached, lamb.tta_runs, lamb.tta_samples) == (3, 3, 4000)
    with pytest.raises(ValueError, match="baseline 'sgd': no group match"):
        summarize(group_runs(load_runs(uri, name)), baseline="sgd")


def test_a_running_run_says_when_it_last_logged_a_metric(mlflow_store):
    """A RUNNING run is named with how long since its last metric: one a `kill -9` left RUNNING
    was just "1 running", forever."""
    import mlflow

    from training.compare import group_runs, load_runs, summarize

    uri = mlflow_store[0]
    runs = [_run("a0", "ga", "adam", 0, 0.7), _run("a1", "ga", "adam", 1, 0.71)]
    name = _experiment(uri, runs)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(name).experiment_id
    dead = client.create_run(exp, run_name="k1", tags={}).info.run_id
    client.log_batch(dead, params=[mlflow.entities.Param("repeat_group", "ga")],
                     metrics=[mlflow.entities.Metric("train_loss", 0.5, int((time.time() - 3 * 3600 - 60) * 1000), 1)])
    fresh = client.create_run(exp, run_name="k2").info.run_id
    client.log_param(fresh, "repeat_group", "ga")
    (g,) = summarize(group_runs(load_runs(uri, name)))
    assert re.fullmatch(r"2 running \(not averaged: k1 \(last metric 3 h ago\), "
                        r"k2 \(no metric yet, started \d+ s ago\)\)", g.notes[0]), g.notes


def test_bigopt_compare_prints_writes_and_refuses(experiment, tmp_path, capsys):
    from jobs.cli import main

    uri, name = experiment
    args = ["compare", f"tracking.tracking_uri={uri}", "--experiment", name, "--baseline", "g-adam",
            "--csv", str(tmp_path / "c.csv"), "--plot", str(tmp_path / "c.png")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "7 run(s) in 2 group(s) by repeat_group" in out and "optimizer=lamb (g-lamb)" in out
    assert "3 of 4" in out and "2 of 3" in out and "baseline" in out
    assert "optimizer=lamb: 1 failed (not averaged: lamb-3)" in out
    rows = {r["label"]: r for r in csv.DictReader(open(tmp_path / "c.csv"))}
    assert rows["optimizer=lamb"]["pairs"] == "3" and rows["optimizer=lamb"]["status_failed"] == "1"
    assert (tmp_path / "c.png").stat().st_size > 1000
    # grouped by another param, no baseline
    assert main(["compare", f"tracking.tracking_uri={uri}", "--experiment", name, "--by", "train.optimizer"]) == 0
    assert "train.optimizer=adam" in capsys.readouterr().out
    # an experiment that is not there: one line naming those that are, exit 2
    assert main(["compare", f"tracking.tracking_uri={uri}", "--experiment", "nope"]) == 2
    assert capsys.readouterr().err.startswith(f"bigopt compare: no experiment 'nope' in {uri} (there: ")
    # a store that is not there: said, and not made (an empty mlflow.db was left where it ran)
    missing = tmp_path / "elsewhere" / "mlflow.db"
    assert main(["compare", f"tracking.tracking_uri=sqlite:///{missing}"]) == 2
    assert capsys.readouterr().err.startswith(f"bigopt compare: no MLflow tracking store at {missing} (")
    assert not missing.parent.exists()


def test_mixed_devices_code_and_shared_seeds_are_said(mlflow_store):
    from training.compare import group_runs, load_runs, summarize

    uri = mlflow_store[0]
    name = _experiment(uri, [_run("a", "g", "adam", 0, 0.7, device="cpu"),
                             _run("b", "g", "adam", 0, 0.71, device="cuda:0", git="def")])
    (g,) = summarize(group_runs(load_runs(uri, name)))
    assert "repeats share a seed (not independent)" in g.notes
    assert "2 devices (cpu, cuda:0): times not comparable" in g.notes
    assert "2 code versions (abc, def): times not comparable" in g.notes
    assert math.isnan(g.gap)  # no baseline


def test_runs_that_are_not_repeats_are_said_and_labels_name_settings_only(mlflow_store, capsys):
    """Runs without a repeat_group (from before the twenty-fifth session) form one group: adam
    and lamb were averaged together without a word. A group whose runs differ in a setting now
    says so. Labels were built from any param, so a failed run's train.fail_at_step named a group."""
    from training.compare import group_runs, labels, load_runs, summarize

    uri = mlflow_store[0]
    old = [_run(f"r{i}", None, opt, i, auc) for i, (opt, auc) in enumerate([("adam", 0.7), ("adam", 0.72),
                                                                            ("lamb", 0.6)])]
    for r in old:
        del r["params"]["repeat_group"]
    name = _experiment(uri, old)
    (g,) = summarize(group_runs(load_runs(uri, name)))
    assert g.key == "(no repeat_group)" and g.label == "(no repeat_group)"
    from jobs.cli import main

    assert main(["compare", f"tracking.tracking_uri={uri}", "--experiment", name]) == 0
    out = capsys.readouterr().out
    assert "│ (no repeat_group) │" in out and "((no repe" not in out  # the name once, not cut
    assert main(["compare", f"tracking.tracking_uri={uri}", "--experiment", name, "--by", "train.lr"]) == 0
    assert "train.lr=0.01" in capsys.readouterr().out
    assert any(n.startswith("its runs differ in optimizer: not repeats of one setting") for n in g.notes)
    runs = [_run("a0", "ga", "adam", 0, 0.7), _run("a1", "ga", "adam", 1, 0.71),
            _run("l0", "gl", "lamb", 0, 0.6), _run("l1", "gl", "lamb", 1, 0.61, status="FAILED")]
    runs[3]["params"]["train.fail_at_step"] = 12
    runs[0]["params"]["train.fail_at_step"] = "None"
    groups = group_runs(load_runs(uri, _experiment(uri, runs)))
    assert labels(groups, "repeat_group") == {"ga": "optimizer=adam", "gl": "optimizer=lamb"}
    assert not any("differ" in n for s in summarize(groups) for n in s.notes)  # true repeats
