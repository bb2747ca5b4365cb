"""Compare training runs recorded in MLflow: repeats grouped, summarised over their seeds with
a Student-t interval, and paired by seed with a baseline group (``bigopt compare``).

A *group* is the runs of one ``repeat_group`` (the param every training run records: a hash of
what decides its result but the seed, :func:`training.tracking.repeat_group`), or of one value of
another param (``by=``). Each group gets, over its FINISHED runs: the metric's mean and its 95 %
confidence interval; with a target AUC, how many runs reached it (``tta_reached``) and the means
of ``tta_*`` over those that did (a mean over the others alone is no time to accuracy of the
group: it is said, k of n); throughput and bytes sent. Runs that FAILED or are still RUNNING are
counted and named, never averaged in silently. With a baseline group, each run is paired with
the baseline's run of the same seeds (``run.seed``, ``train.data_seed``) and the mean of the
paired differences gets its own interval, which is narrower than the two groups' intervals
when the seeds' effects are shared (the compression benchmark's design).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

NO_GROUP = "(no repeat_group)"  # runs from before the twenty-fifth session record none
# what two runs may differ in and still be repeats: their bookkeeping and seeds
_NOT_A_SETTING = ("run.", "tracking.", "lake.", "spark.", "resume.", "lib.", "mem.", "model.", "criteo.")
_SEED_PARAMS = ("run.seed", "train.data_seed")
# where a run ran and the paths it read (``repeat_group`` has the tables' ids and versions): said apart
_NOT_A_SETTING_NAMES = ("device", "data.train_table", "data.valid_table", "data.test_table", "data.vocabulary")


@dataclass(frozen=True)
class RunRecord:
    """What the comparison reads of one MLflow run."""

    run_id: str
    name: str
    status: str
    params: Mapping[str, str]
    metrics: Mapping[str, float]
    last_logged_ms: int | None = None  # a RUNNING run's last metric (its start without one), epoch ms
    logged_any: bool = False

    @property
    def seeds(self) -> tuple[str, ...]:
        return tuple(self.params.get(p, "") for p in _SEED_PARAMS)


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and its two-sided ``level`` confidence interval (Student t, n-1 degrees of freedom).
    One value: (value, nan, nan), no interval; none: all nan."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    from scipy.stats import t as student_t

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(student_t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


@dataclass
class GroupSummary:
    key: str
    label: str
    runs: list[RunRecord]
    metric: str
    values: list[float] = field(default_factory=list)
    mean: float = math.nan
    ci_lo: float = math.nan
    ci_hi: float = math.nan
    missing: int = 0  # finished runs without the metric
    tta_reached: int | None = None  # of the finished runs with a target
    tta_runs: int = 0
    tta_samples: float = math.nan  # mean over the runs that reached it
    tta_wall_s: float = math.nan
    tta_bytes_sent: float = math.nan
    samples_per_s: float = math.nan
    bytes_sent: float = math.nan
    gap: float = math.nan  # mean of (this run - the baseline's run of the same seeds)
    gap_lo: float = math.nan
    gap_hi: float = math.nan
    pairs: int = 0
    is_baseline: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def finished(self) -> list[RunRecord]:
        return [r for r in self.runs if r.status == "FINISHED"]

    def status_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.runs:
            out[r.status] = out.get(r.status, 0) + 1
        return out

    def as_row(self) -> dict[str, Any]:
        return {"group": self.key, "label": self.label, "runs": len(self.runs), "finished": len(self.finished),
                **{f"status_{k.lower()}": v for k, v in self.status_counts().items()},
                "seeds": " ".join(sorted({r.params.get("run.seed", "?") for r in self.finished})),
                f"{self.metric}_mean": self.mean, "ci_lo": self.ci_lo, "ci_hi": self.ci_hi,
                "gap_vs_baseline": self.gap, "gap_ci_lo": self.gap_lo, "gap_ci_hi": self.gap_hi, "pairs": self.pairs,
                "tta_reached": self.tta_reached, "tta_runs": self.tta_runs, "tta_samples_mean": self.tta_samples,
                "tta_wall_s_mean": self.tta_wall_s, "tta_bytes_sent_mean": self.tta_bytes_sent,
                "samples_per_s_mean": self.samples_per_s, "total_bytes_sent_mean": self.bytes_sent,
                "notes": "; ".join(self.notes)}


def load_runs(uri: str, experiment: str) -> list[RunRecord]:
    """Every run of ``experiment`` in the store at ``uri`` (all pages); ValueError naming the
    experiments there when it does not exist."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"no experiment {experiment!r} in {uri} (there: {', '.join(names) or 'none'})")
    out: list[RunRecord] = []
    token = None
    while True:
        page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token,
                                  order_by=["attributes.start_time ASC"])  # groups in the order first run
        for r in page:
            stamps = [m.timestamp for m in getattr(r.data, "_metric_objs", None) or []]
            out.append(RunRecord(r.info.run_id, r.info.run_name or r.info.run_id[:8], r.info.status,
                                 dict(r.data.params), dict(r.data.metrics),
                                 max(stamps, default=r.info.start_time) if r.info.status == "RUNNING" else None,
                                 bool(stamps)))
        token = page.token
        if not token:
            return out


def group_runs(runs: Iterable[RunRecord], by: str = "repeat_group") -> dict[str, list[RunRecord]]:
    """Runs by the value of param ``by`` (in the order first seen); runs without it under
    :data:`NO_GROUP`."""
    groups: dict[str, list[RunRecord]] = {}
    for r in runs:
        groups.setdefault(r.params.get(by, _missing(by)), []).append(r)
    return groups


def _missing(by: str) -> str:
    """The group of runs without param ``by`` (:data:`NO_GROUP` for ``repeat_group``)."""
    return f"(no {by})"


def is_setting(param: str) -> bool:
    """Whether a param is a setting that decides a run's result (what ``repeat_group`` hashes):
    not the run's bookkeeping, seeds, library versions or derived sizes, nor the train settings
    ``repeat_group`` leaves out (``train.fail_at_step``, ``train.log_every``, ...)."""
    from training.tracking import NOT_RESULT

    if param.startswith(_NOT_A_SETTING) or param in ("repeat_group", "config_hash", *_SEED_PARAMS,
                                                     *_NOT_A_SETTING_NAMES):
        return False
    return not (param.startswith("train.") and param.removeprefix("train.").split(".")[0] in NOT_RESULT)


def _one_value(runs: Sequence[RunRecord]) -> tuple[dict[str, str], list[str]]:
    """The settings the runs share (one value each), and those they differ in."""
    one, differ = {}, []
    for p in sorted(set().union(*(r.params for r in runs))):
        if not is_setting(p):
            continue
        values = {r.params[p] for r in runs if p in r.params}  # a run that failed early lacks rank 0's
        if len(values) == 1:
            one[p] = values.pop()
        else:
            differ.append(p)
    return one, differ


def labels(groups: Mapping[str, list[RunRecord]], by: str) -> dict[str, str]:
    """A name per group from the settings that tell the groups apart: the settings
    (:func:`is_setting`) whose value is one within each group and differs between groups, e.g.
    ``optimizer=lamb lr=0.01``; the key itself when nothing does (or grouped by a param)."""
    if by != "repeat_group":
        return {k: k if k == _missing(by) else f"{by}={k}" for k in groups}
    common = {key: _one_value(runs)[0] for key, runs in groups.items()}
    varying = sorted({p for one in common.values() for p in one
                      if len({c.get(p) for c in common.values()}) > 1})
    out = {}
    for key, one in common.items():
        if key == NO_GROUP:
            out[key] = key
            continue
        parts = [f"{p.removeprefix('train.')}={one[p]}" for p in varying if one.get(p) is not None]
        out[key] = " ".join(parts) or key[:12]
    return out


def _metric_mean(runs: Sequence[RunRecord], metric: str) -> float:
    """The mean of ``metric`` over the runs that logged it (nan when none did)."""
    values = [r.metrics[metric] for r in runs if metric in r.metrics]
    return sum(values) / len(values) if values else math.nan


def summarize(groups: Mapping[str, list[RunRecord]], metric: str = "final_valid_auc", by: str = "repeat_group",
              baseline: str | None = None, level: float = 0.95) -> list[GroupSummary]:
    """One summary per group (see the module docstring); ``baseline`` is a group key (or its
    start) or label."""
    names = labels(groups, by)
    base_key = find_group(groups, names, baseline) if baseline is not None else None
    base_by_seed: dict[tuple[str, ...], float] = {}
    if base_key is not None:
        for r in groups[base_key]:
            if r.status == "FINISHED" and metric in r.metrics:
                base_by_seed.setdefault(r.seeds, r.metrics[metric])
    out = []
    for key, runs in groups.items():
        s = GroupSummary(key, names[key], runs, metric)
        done = s.finished
        s.values = [r.metrics[metric] for r in done if metric in r.metrics]
        s.missing = len(done) - len(s.values)
        s.mean, s.ci_lo, s.ci_hi = mean_ci(s.values, level)
        with_target = [r for r in done if "tta_reached" in r.metrics]
        if with_target:
            reached = [r for r in with_target if r.metrics["tta_reached"] >= 1]
            s.tta_reached, s.tta_runs = len(reached), len(with_target)
            s.tta_samples = _metric_mean(reached, "tta_samples")
            s.tta_wall_s = _metric_mean(reached, "tta_wall_s")
            s.tta_bytes_sent = _metric_mean(reached, "tta_bytes_sent")
        s.samples_per_s = _metric_mean(done, "avg_samples_per_s")
        s.bytes_sent = _metric_mean(done, "total_bytes_sent")
        if base_key is not None and key != base_key:
            gaps = [r.metrics[metric] - base_by_seed[r.seeds] for r in done
                    if metric in r.metrics and r.seeds in base_by_seed]
            s.pairs = len(gaps)
            s.gap, s.gap_lo, s.gap_hi = mean_ci(gaps, level)
        elif key == base_key:
            s.gap, s.pairs, s.is_baseline = 0.0, len(s.values), True
        s.notes = _notes(s)
        out.append(s)
    return out


def _ago(seconds: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= n:
            return f"{int(seconds // n)} {unit} ago"
    return f"{max(int(seconds), 0)} s ago"


def _last_logged(r: RunRecord) -> str:
    """For a RUNNING run, how long since it last logged a metric: one that has not for hours
    likely died without ending its run (``kill -9``, the OOM killer; a fresh run over its
    checkpoints marks it KILLED)."""
    if r.status != "RUNNING" or r.last_logged_ms is None:
        return ""
    import time

    ago = _ago(time.time() - r.last_logged_ms / 1000)
    return f" (last metric {ago})" if r.logged_any else f" (no metric yet, started {ago})"


def _notes(s: GroupSummary) -> list[str]:
    notes = []
    counts = s.status_counts()
    for status in sorted(counts):
        if status != "FINISHED":
            names = ", ".join(r.name + _last_logged(r) for r in s.runs if r.status == status)
            notes.append(f"{counts[status]} {status.lower()} (not averaged: {names})")
    if s.missing:
        notes.append(f"{s.missing} finished without {s.metric}")
    seeds = [r.seeds for r in s.finished]
    if len(set(seeds)) < len(seeds):
        notes.append("repeats share a seed (not independent)")
    if differ := _one_value(s.finished)[1]:  # runs without a repeat_group, or grouped --by a param
        shown = ", ".join(p.removeprefix("train.") for p in differ[:6]) + (" ..." if len(differ) > 6 else "")
        notes.append(f"its runs differ in {shown}: not repeats of one setting, so its mean and interval mix them "
                     "(group by repeat_group, or --by one of those)")
    for p, what in (("device", "devices"), ("lib.bigopt_git", "code versions")):
        values = {r.params.get(p) for r in s.finished if r.params.get(p)}
        if len(values) > 1:
            notes.append(f"{len(values)} {what} ({', '.join(sorted(values))}): times not comparable")
    return notes


def find_group(groups: Mapping[str, list[RunRecord]], names: Mapping[str, str], wanted: str) -> str:
    """The group ``wanted`` names: a key, the start of one, or a label; ValueError when none or
    several do."""
    hits = [k for k in groups if k == wanted or names.get(k) == wanted]
    if not hits:
        hits = [k for k in groups if k.startswith(wanted)]
    if len(hits) != 1:
        listed = "; ".join(f"{k[:12]} ({names[k]})" for k in groups)
        what = "no group" if not hits else f"{len(hits)} groups"
        raise ValueError(f"baseline {wanted!r}: {what} match (groups: {listed})")
    return hits[0]


def figure(summaries: Sequence[GroupSummary], metric: str):
    """The metric's mean and 95 % interval per group (a dot and a bar), one row each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [s for s in summaries if s.values]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    for i, s in enumerate(rows):
        if s.ci_lo == s.ci_lo:
            ax.plot([s.ci_lo, s.ci_hi], [i, i], color="tab:blue", linewidth=2)
        ax.plot([s.mean], [i], "o", color="tab:blue")
        ax.plot(s.values, [i] * len(s.values), "|", color="gray")
    ax.set_yticks(range(len(rows)), [f"{s.label} (n={len(s.values)})" for s in rows])
    ax.set_xlabel(f"{metric}: mean, 95 % CI, runs")
    ax.invert_yaxis()
    fig.tight_layout()
    return fig
