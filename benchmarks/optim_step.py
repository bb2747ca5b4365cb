"""Optimizer step time on a DLRM-sized parameter set: torch Adam (foreach) vs the project's own
optimizers (optim/) and their pytorch_optimizer counterparts; and vs the Adam bigopt builds.

Two Adam baselines run side by side. ``adam`` is ``torch.optim.Adam(foreach=True)``, the
baseline the optimizer issue named ("Adam (torch, foreach)"). ``adam_fused`` is what a bigopt
user gets for ``optimizer: adam`` (``optim.registry.build_optimizer``: torch's fused CPU
kernel), several times faster per step: against it LARS, LAMB and Shampoo are slower than Adam,
where against the foreach one they look cheaper.

Parameter set: DLRM's Criteo-Kaggle configuration -- 26 embedding tables (the Kaggle
cardinalities, capped at ``--rows-cap`` rows as with hashing, dim 16), bottom MLP 13-512-256-64-16,
top MLP 367-512-256-1 -- with dense random gradients (the worst case for the optimizer: every
row is updated). Each optimizer gets its own copy of the parameters.

Timing: a few warmup steps, then ``--rounds`` rounds; every round times one step of every
optimizer in turn (interleaved, so load from other processes hits all of them alike) and the
report uses the median. By default the run is single-threaded and uses the thread's CPU time
(``--clock cpu``): on a shared 2-core machine, wall time of multi-threaded steps mostly measures
other processes (OpenMP threads wait for a preempted peer). On a dedicated machine use
``--threads N --clock wall``. Optimizers with an interval-``k`` refresh are amortised over their default
interval: ``regular step + refresh / k`` where the refresh (Shampoo's inverse roots, Sophia's
Hessian EMA update; likewise for their pytorch_optimizer counterparts) is timed separately in every
round -- exactly the mean cost of k consecutive steps.

    .venv/bin/python benchmarks/optim_step.py --quick

prints a table and then, last, one ``name: value`` per line: ``<opt>_vs_adam_fused`` (time
ratio to bigopt's fused Adam, lower is faster), ``adam_fused_vs_adam`` and ``<opt>_vs_adam``
(ratios to the foreach Adam), and ``<opt>_vs_pytorch_optimizer`` (ratio to the
pytorch_optimizer counterpart where one exists).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optim import FISTA, FTRL, LAMB, LARS, Shampoo, Sophia  # noqa: E402
from optim.registry import build_optimizer  # noqa: E402

KAGGLE_CARDINALITIES = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27,
                        14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]
BOTTOM = [13, 512, 256, 64, 16]
TOP = [367, 512, 256, 1]  # 26*27/2 = 351 pairwise dots + 16 dense features


def dlrm_shapes(rows_cap: int, dim: int = 16) -> list[tuple[int, ...]]:
    shapes = [(min(c, rows_cap), dim) for c in KAGGLE_CARDINALITIES]
    for mlp in (BOTTOM, TOP):
        for a, b in zip(mlp[:-1], mlp[1:]):
            shapes += [(b, a), (b,)]
    return shapes


def make_params(shapes, seed=0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g) * 0.01)
        p.grad = torch.randn(s, generator=g) * 1e-3
        params.append(p)
    return params


_CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}
CLOCK = _CLOCKS["cpu"]


class Case:
    """One optimizer on its own parameter copy; ``refresh`` is the interval work (or None)."""

    def __init__(self, name, factory, shapes, interval=1, refresh=None, step_kwargs=None):
        self.name = name
        self.params = make_params(shapes)
        self.opt = factory(self.params)
        self.interval = interval
        self._refresh = refresh
        self.step_kwargs = step_kwargs or {}
        self.times: list[float] = []
        self.refresh_times: list[float] = []

    def step(self):
        self.opt.step(**self.step_kwargs)

    def timed_step(self):
        t = CLOCK()
        self.step()
        self.times.append(CLOCK() - t)

    def timed_refresh(self):
        if self._refresh is None:
            return
        t = CLOCK()
        measured = self._refresh(self)  # a refresh may report its own duration
        self.refresh_times.append(measured if measured is not None else CLOCK() - t)

    @property
    def step_s(self) -> float:
        return statistics.median(self.times)

    @property
    def refresh_s(self) -> float:
        return statistics.median(self.refresh_times) if self.refresh_times else 0.0

    @property
    def amortised_s(self) -> float:
        return self.step_s + self.refresh_s / self.interval


# -- refresh work of the interval methods ------------------------------------------------------------
def _sophia_refresh(case):
    case.opt.update_hessian(case.hessian)


def _po_sophia_refresh(case):
    """SophiaH applies a passed Hessian inside step(): the refresh is (that step - a regular step)."""
    t = CLOCK()
    case.opt.step(hessian=case.hessian)
    due = CLOCK() - t
    t = CLOCK()
    case.opt.step()
    regular = CLOCK() - t
    return max(due - regular, 0.0)


def _shampoo_refresh(case):
    case.opt.refresh_preconditioners()


def _po_shampoo_refresh(case):
    for p in case.params:
        st = case.opt.state[p]
        if "pre_conditioner" in st:
            st["pre_conditioner"].compute_pre_conditioners()


def build_cases(shapes, with_po: bool):
    sophia_k = Sophia([torch.zeros(1, requires_grad=True)]).defaults["update_interval"]
    cases = [
        Case("adam", lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True), shapes),
        # the Adam bigopt builds for `optimizer: adam` (fused). Until the twenty-eighth session only the
        # foreach one ran, so "LAMB 0.48x Adam" read as cheaper than the Adam a user trains with
        Case("adam_fused", lambda ps: build_optimizer("adam", ps, lr=1e-3), shapes),
        Case("lars", lambda ps: LARS(ps, lr=1.0, momentum=0.9, weight_decay=1e-4), shapes),
        Case("lamb", lambda ps: LAMB(ps, lr=1e-3, weight_decay=0.01), shapes),
    ]
    c = Case("sophia", lambda ps: Sophia(ps, lr=1e-4, rho=0.04, weight_decay=0.1, update_interval=sophia_k),
             shapes, interval=sophia_k, refresh=_sophia_refresh)
    c.hessian = [torch.rand_like(p) for p in c.params]
    cases.append(c)
    k = Shampoo([torch.zeros(1, requires_grad=True)]).defaults["precondition_interval"]
    cases.append(Case("shampoo", lambda ps: Shampoo(ps, lr=1e-3), shapes, interval=k, refresh=_shampoo_refresh))
    cases.append(Case("ftrl", lambda ps: FTRL(ps, lr=0.1, l1=1e-4, l2=1e-4), shapes))
    cases.append(Case("fista", lambda ps: FISTA(ps, lr=1e-3, l1=1e-5), shapes))
    if with_po:
        import pytorch_optimizer as po

        cases.append(Case("po_lars", lambda ps: po.LARS(ps, lr=1.0, momentum=0.9, weight_decay=1e-4), shapes))
        cases.append(Case("po_lamb", lambda ps: po.Lamb(ps, lr=1e-3, weight_decay=0.01), shapes))
        # same update: SophiaH's lr * clip(m / h, p) with p = rho equals Sophia's (lr * rho) * clip(m/(rho h), 1)
        c = Case("po_sophia", lambda ps: po.SophiaH(ps, lr=1e-4 / 0.04, p=0.04, weight_decay=0.1 * 0.04,
                                                   update_period=10**9), shapes,
                 interval=sophia_k, refresh=_po_sophia_refresh)
        c.hessian = [torch.rand_like(p) for p in c.params]
        c.opt.step(hessian=c.hessian)  # SophiaH estimates a Hessian itself on its first step unless given one
        cases.append(c)
        ref = Shampoo([torch.zeros(1, requires_grad=True)]).defaults
        cases.append(Case(
            "po_shampoo",
            lambda ps: po.ScalableShampoo(ps, lr=1e-3, block_size=ref["block_size"], start_preconditioning_step=1,
                                          preconditioning_compute_steps=10**9, graft_type=2,  # AdaGrad graft
                                          no_preconditioning_for_layers_with_dim_gt=ref["max_precond_dim"]),
            shapes, interval=k, refresh=_po_shampoo_refresh))
        cases.append(Case("po_ftrl", lambda ps: po.FTRL(ps, lr=0.1, lambda_1=1e-4, lambda_2=1e-4), shapes))
    return cases


OWN = ("lars", "lamb", "sophia", "shampoo", "ftrl", "fista")


def figure_lines(amortised: dict[str, float]) -> list[str]:
    """The ``name: value`` lines from each case's amortised seconds per step: the ratios to
    bigopt's fused Adam, then to the foreach Adam (the issue's baseline), then to the
    pytorch_optimizer counterparts."""
    fused, adam = amortised["adam_fused"], amortised["adam"]
    lines = [f"{name}_vs_adam_fused: {amortised[name] / fused:.3f}" for name in OWN]
    lines.append(f"adam_fused_vs_adam: {fused / adam:.3f}")
    lines += [f"{name}_vs_adam: {amortised[name] / adam:.3f}" for name in OWN]
    for name in OWN:
        if f"po_{name}" in amortised:
            lines.append(f"{name}_vs_pytorch_optimizer: {amortised[name] / amortised['po_' + name]:.3f}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small tables and few rounds (< 2 min on 2 cores)")
    ap.add_argument("--rows-cap", type=int, default=None, help="max rows per embedding table")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1)")
    ap.add_argument("--clock", choices=sorted(_CLOCKS), default="cpu",
                    help="cpu: CPU time of the (single) timing thread; wall: elapsed time")
    ap.add_argument("--no-pytorch-optimizer", action="store_true")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    rows_cap = args.rows_cap or (50_000 if args.quick else 100_000)
    rounds = args.rounds or (7 if args.quick else 15)
    global CLOCK
    torch.set_num_threads(args.threads)
    if args.clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu measures one thread: use it with --threads 1 (or --clock wall)")
    CLOCK = _CLOCKS[args.clock]
    with_po = importlib.util.find_spec("pytorch_optimizer") is not None and not args.no_pytorch_optimizer

    shapes = dlrm_shapes(rows_cap)
    numel = sum(torch.Size(s).numel() for s in shapes)
    print(f"DLRM-sized parameter set: {len(shapes)} tensors, {numel / 1e6:.2f} M parameters "
          f"(26 tables capped at {rows_cap} rows x 16), torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), {args.clock} clock, {os.cpu_count()} CPUs", flush=True)
    t0 = time.perf_counter()
    cases = build_cases(shapes, with_po)
    for c in cases:
        tw = time.perf_counter()
        for _ in range(args.warmup):
            c.step()
        if args.verbose:
            print(f"  warmup {c.name}: {(time.perf_counter() - tw) / args.warmup * 1e3:.1f} ms/step", flush=True)
        c.timed_refresh()  # warm the refresh path (Shampoo's first roots already exist after step 1)
        c.refresh_times.clear()
    for r in range(rounds):
        order = cases[r % len(cases):] + cases[: r % len(cases)]  # rotate who goes first
        for c in order:
            c.timed_step()
            c.timed_refresh()
        gc.collect()

    amortised = {c.name: c.amortised_s for c in cases}
    adam, fused = amortised["adam"], amortised["adam_fused"]
    print(f"\n{'optimizer':<12}{'step ms':>10}{'refresh ms':>12}{'k':>6}{'amortised ms':>14}{'vs adam':>9}"
          f"{'vs fused':>10}")
    for c in cases:
        print(f"{c.name:<12}{c.step_s * 1e3:>10.2f}{c.refresh_s * 1e3:>12.2f}{c.interval:>6d}"
              f"{c.amortised_s * 1e3:>14.2f}{c.amortised_s / adam:>9.2f}{c.amortised_s / fused:>10.2f}")
    print(f"\n{rounds} rounds in {time.perf_counter() - t0:.1f} s\n")
    print("\n".join(figure_lines(amortised)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
