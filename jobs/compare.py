"""bigopt compare [conf.yaml] [k=v ...] [--experiment NAME] [--by PARAM] [--metric NAME] [--baseline GROUP]
[--csv FILE] [--plot FILE]

Compares the training runs of one MLflow experiment (the config's tracking store and experiment,
as ``bigopt train`` logs them): repeats grouped by ``repeat_group``, each group's metric over its
finished runs with a 95 % confidence interval, the runs that reached the target AUC (k of n) and
their time to it, throughput and bytes sent, and, with ``--baseline``, each run's difference from
the baseline's run of the same seeds (:mod:`training.compare`). Failed and running runs are
counted and named, never averaged in.
"""
from __future__ import annotations

import math
import sys


def add_arguments(parser) -> None:
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default: the config's, as train logs)")
    parser.add_argument("--by", default="repeat_group",
                        help="param to group runs by (default repeat_group: repeats of one experiment; e.g. "
                             "train.optimizer)")
    parser.add_argument("--metric", default="final_valid_auc", help="metric to compare (default final_valid_auc)")
    parser.add_argument("--baseline", default=None,
                        help="group to pair the others with by seed: its repeat_group (or its start) or its label")
    parser.add_argument("--csv", default=None, help="also write one row per group to this CSV file")
    parser.add_argument("--plot", default=None, help="also draw the metric per group (mean, 95%% CI, runs) to this PNG")


def _f(v, fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _ci(lo: float, hi: float, fmt: str = "+.4f") -> str:
    return "n/a" if lo != lo else f"[{format(lo, fmt)}, {format(hi, fmt)}]"


def run(cfg, args) -> int:
    from rich.table import Table

    from jobs.console import make_console
    from training.compare import figure, group_runs, load_runs, summarize
    from training.tracking import TrackingStoreError, check_store, experiment_name, sqlite_file, tracking_uri

    uri = tracking_uri(cfg.tracking)
    experiment = args.experiment or experiment_name(cfg)
    # comparing only reads the store: until the twenty-eighth session a wrong or default
    # tracking_uri made an empty mlflow.db where the command ran, then said the experiment was not there
    if (db := sqlite_file(uri)) is not None and not db.exists():
        print(f"bigopt compare: no MLflow tracking store at {db} ({uri}): no run was logged there; set "
              "tracking.tracking_uri to the store the runs were logged to", file=sys.stderr)
        return 2
    try:
        check_store(uri)
        runs = load_runs(uri, experiment)
        groups = group_runs(runs, args.by)
        summaries = summarize(groups, args.metric, args.by, args.baseline)
    except (TrackingStoreError, ValueError) as e:
        print(f"bigopt compare: {e}", file=sys.stderr)
        return 2
    if not runs:
        print(f"bigopt compare: experiment {experiment!r} in {uri} has no runs", file=sys.stderr)
        return 2
    console = make_console()
    table = Table(title=f"{experiment}: {len(runs)} run(s) in {len(groups)} group(s) by {args.by} ({uri})")
    for col, just in (("group", "left"), ("runs", "right"), (f"{args.metric} mean", "right"), ("95 % CI", "right"),
                      ("vs baseline (paired)", "right"), ("target reached", "right"), ("samples to target", "right"),
                      ("samples/s", "right"), ("bytes sent", "right")):
        table.add_column(col, justify=just)
    for s in summaries:
        done = len(s.finished)
        runs_text = f"{done}" + (f" of {len(s.runs)}" if done != len(s.runs) else "")
        if s.is_baseline:
            vs = "baseline"
        elif s.pairs and s.gap_lo == s.gap_lo:
            vs = f"{s.gap:+.4f} {_ci(s.gap_lo, s.gap_hi)} n={s.pairs}"
        else:
            vs = _f(s.gap, "+.4f") + (f" n={s.pairs}" if s.pairs else "")
        reached = "-" if s.tta_reached is None else f"{s.tta_reached} of {s.tta_runs}"
        # a label of settings, with the start of its repeat_group; the key alone where it is the label
        name = s.label if s.label in (s.key, s.key[:12]) or s.key.startswith("(no ") else f"{s.label} ({s.key[:8]})"
        table.add_row(name, runs_text,
                      _f(s.mean, ".4f"), _ci(s.ci_lo, s.ci_hi, ".4f"), vs, reached, _f(s.tta_samples, ",.0f"),
                      _f(s.samples_per_s, ",.0f"), _f(s.bytes_sent, ",.0f"))
    console.print(table)
    for s in summaries:
        for note in s.notes:
            console.print(f"  {s.label}: {note}")
    if any(s.tta_reached is not None for s in summaries):
        console.print("  samples to target: the mean over the runs that reached it (k of n above)")
    if args.baseline:
        console.print(f"  vs baseline: mean of ({args.metric} of a run - the baseline's run of the same seeds), "
                      "95 % CI of those differences")
    if args.csv:
        import csv

        rows = [s.as_row() for s in summaries]
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        console.print(f"  CSV: {args.csv}")
    if args.plot:
        import matplotlib.pyplot as plt

        fig = figure(summaries, args.metric)
        try:
            fig.savefig(args.plot, dpi=120)
        finally:
            plt.close(fig)
        console.print(f"  plot: {args.plot}")
    return 0


if __name__ == "__main__":
    from jobs.cli import submit_main

    submit_main("compare")
