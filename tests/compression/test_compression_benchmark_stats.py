"""benchmarks/compression.py's statistics: paired AUC gaps per seed, a Student-t 95 % CI, and
the met / not met / undecided verdicts against the 0.002 goal."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
from scipy import stats

_path = Path(__file__).resolve().parents[2] / "benchmarks" / "compression.py"
_spec = importlib.util.spec_from_file_location("compression_bench", _path)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_ci_is_the_student_t_interval_of_the_paired_differences():
    gaps = [0.0011, 0.0032, 0.0019, -0.0004]
    mean, lo, hi = bench.paired_gap_ci(gaps)
    ref = stats.ttest_1samp(gaps, 0.0).confidence_interval(0.95)
    assert mean == pytest.approx(sum(gaps) / 4)
    assert (lo, hi) == (pytest.approx(ref.low), pytest.approx(ref.high))
    one = bench.paired_gap_ci([0.001])
    assert one[0] == 0.001 and math.isnan(one[1]) and math.isnan(one[2])


@pytest.mark.parametrize("n,lo,hi,verdict", [(3, -0.003, 0.0015, "met"), (3, 0.0021, 0.004, "not met"),
                                             (3, -0.001, 0.003, "undecided"), (1, math.nan, math.nan, "undecided"),
                                             (5, 0.0, 0.002, "met")])
def test_verdicts(n, lo, hi, verdict):
    assert bench.gap_verdict(n, lo, hi, 0.002) == verdict


def _run(method, seed, auc, bytes_per_step, dense=1000):
    return {"method": method, "seed": seed, "valid": {"auc": auc, "logloss": 0.5}, "bytes_per_step": bytes_per_step,
            "dense_ref_bytes": dense, "compress_ms": 1.0, "decompress_ms": 1.0, "communicate_ms": 1.0,
            "step_ms": 3.0, "train_loss_last": 0.5, "final_hash_ranks": ["a", "a"]}


def test_summary_pairs_each_method_with_dense_of_the_same_seed():
    results = [_run("none", 0, 0.80, 1000), _run("none", 1, 0.70, 1000), _run("none", 2, 0.75, 1000),
               # the method's seeds in another order: pairing is by seed, not by position
               _run("topk", 2, 0.749, 20), _run("topk", 0, 0.797, 20), _run("topk", 1, 0.698, 25)]
    rows = {r["method"]: r for r in bench.summarize(results)}
    t = rows["topk"]
    assert t["auc_gaps"] == pytest.approx([0.001, 0.003, 0.002])
    assert t["auc_gap"] == pytest.approx(0.002) and t["repeats"] == 3
    ref = stats.ttest_1samp([0.001, 0.003, 0.002], 0.0).confidence_interval(0.95)
    assert t["auc_gap_ci_lo"] == pytest.approx(ref.low) and t["auc_gap_ci_hi"] == pytest.approx(ref.high)
    assert t["ratio_min"] == 40.0 and t["ratio"] == pytest.approx((50 + 50 + 40) / 3)
    assert rows["none"]["auc_gap"] == 0.0
    line = bench._goal_line("goal", t, 50.0, 0.002)
    assert line.startswith("goal topk: NOT MET") and "(>= 50: not met)" in line and "undecided" in line


def test_data_auto_uses_the_demo_tables_when_they_exist(tmp_path):
    """``--data auto`` trains on the config's gold tables when they are there. Until the
    nineteenth session it imported a helper ``jobs.run`` no longer has, so ``auto`` always fell
    back to synthetic tables and ``--data demo`` always failed."""
    import argparse

    from pipelines.criteo.schema import KAGGLE_CARDINALITIES
    from training.synthetic import make_gold

    gold = make_gold(tmp_path / "gold", rows={"train": 600, "valid": 200, "test": 200},
                     cardinalities=[min(c, 50) for c in KAGGLE_CARDINALITIES], seed=0)
    overrides = [f"lake.root={tmp_path}/lake", f"train.train_table={gold['train']}",
                 f"train.valid_table={gold['valid']}", f"train.test_table={gold['test']}",
                 f"train.vocabulary={gold['vocabulary']}"]
    args = argparse.Namespace(data="auto", config=None, set=overrides)
    spec, what = bench.resolve_spec(args, tmp_path / "work")
    assert what == "criteo demo gold tables"
    assert spec.train == gold["train"] and spec.train_rows == 600


def test_the_baseline_is_always_run_and_the_mlflow_run_names_the_code(monkeypatch):
    """--methods without `none` gave every method an AUC gap of nan ("UNDECIDED"); the MLflow run
    recorded no code or library version, so two runs of different code looked alike."""
    import argparse

    import training.tracking as tracking

    assert bench.with_baseline(["topk_1pct_ef", "powersgd"]) == ["none", "topk_1pct_ef", "powersgd"]
    assert bench.with_baseline(["powersgd", "none"]) == ["none", "powersgd"]

    class Logged(Exception):
        pass

    def start_run(cfg, params, tags=None, **kw):
        raise Logged(params, tags)

    monkeypatch.setattr(tracking, "start_run", start_run)
    monkeypatch.setattr(tracking, "code_version", lambda: "0123abcd-dirty")
    rows = bench.summarize([_run("none", 0, 0.8, 1000), _run("topk", 0, 0.79, 20)])
    args = argparse.Namespace(experiment="e", quick=True)
    with pytest.raises(Logged) as ei:
        bench.log_mlflow(args, rows, [], {"steps": 100, "bench_wall_s": 1.0}, "")
    params, tags = ei.value.args
    assert params["lib.bigopt_git"] == "0123abcd-dirty" and "lib.torch" in params and params["steps"] == 100
    assert tags == {"bigopt.benchmark": "compression", "mlflow.source.git.commit": "0123abcd"}


@pytest.mark.parametrize("final_ranks,inits,reason", [
    (["a", "a"], ["w", "w"], None),
    (["a", "b"], ["w", "w"], "ranks ended with different parameters for topk"),
    (["a", "a"], ["w", "v"], "the methods of a repeat did not start from the same initial weights"),
])
def test_a_wrong_result_prints_its_figures_then_fails(monkeypatch, capsys, final_ranks, inits, reason):
    """Ranks that end apart, or methods of a repeat that start from other weights, make every
    figure wrong: they are printed all the same, then the run exits 1 with the reason on stderr.
    Until the twenty-eighth session it printed a WARNING line and exited 0, like a pass."""
    import types

    runs = [_run("none", 0, 0.80, 1000), _run("topk", 0, 0.799, 20)]
    for r, init in zip(runs, inits, strict=True):
        r.update(init_hash=init, train_s=1.0, eval_s=0.1)
    runs[1]["final_hash_ranks"] = final_ranks
    spec = types.SimpleNamespace(train="t", valid="v", versions={}, train_rows=100, cardinalities=[10, 20],
                                 to_dict=lambda: {})
    monkeypatch.setattr(bench, "resolve_spec", lambda args, work: (spec, "synthetic gold tables"))
    monkeypatch.setattr(bench, "_launch", lambda fn, job, args: [
        {"results": runs, "world_size": 2, "device": "cpu", "threads": 1}])
    rc = bench.main(["--quick", "--no-mlflow", "--methods", "topk_1pct_ef"])
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-4:] == ["bytes_ratio_none: 1.00", "auc_gap_none: 0.0000",
                                             "bytes_ratio_topk: 50.00", "auc_gap_topk: 0.0010"]
    if reason is None:
        assert rc == 0 and err == ""
    else:
        assert rc == 1 and err == f"compression benchmark FAILED: {reason}\n"
        assert f"FAILED: {reason}" in out
