"""benchmarks/optim_step.py: both Adam baselines, and the order of its figures."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_path = Path(__file__).resolve().parents[2] / "benchmarks" / "optim_step.py"
_spec = importlib.util.spec_from_file_location("optim_step_bench", _path)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_the_fused_adam_baseline_is_the_one_bigopt_builds():
    """Until the twenty-eighth session only torch's foreach Adam ran: the registry's ``adam``
    (fused, several times faster on CPU) is what a user trains with."""
    cases = {c.name: c for c in bench.build_cases([(8, 4), (4,)], with_po=False)}
    assert cases["adam"].opt.defaults["foreach"] is True and not cases["adam"].opt.defaults["fused"]
    assert cases["adam_fused"].opt.defaults["fused"] is True
    for c in cases.values():
        c.step()  # every case steps on its own parameters


def test_figures_fused_ratios_first_foreach_ratios_last():
    amortised = {"adam": 6.0, "adam_fused": 1.0, "lars": 3.0, "lamb": 3.0, "sophia": 2.0, "shampoo": 6.0,
                 "ftrl": 9.0, "fista": 4.0, "po_lamb": 6.0}
    lines = bench.figure_lines(amortised)
    figures = dict(line.split(": ") for line in lines)
    assert len(figures) == len(lines) == 6 + 1 + 6 + 1
    assert figures["lamb_vs_adam_fused"] == "3.000" and figures["lamb_vs_adam"] == "0.500"
    assert figures["adam_fused_vs_adam"] == "0.167"
    assert list(figures) == [*(f"{n}_vs_adam_fused" for n in bench.OWN), "adam_fused_vs_adam",
                             *(f"{n}_vs_adam" for n in bench.OWN), "lamb_vs_pytorch_optimizer"]
