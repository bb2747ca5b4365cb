"""bigopt batch-size <conf.yaml> [k=v ...] [--sizes 256,1024,...] [--memory-budget-gb G]

Measures peak memory and step time of one full training step (forward, backward, optimizer
step) of the configured model/optimizer at several per-rank batch sizes, on real rows of the
gold train table, and prints the large-batch toolkit's table (``optim.large_batch``): linear
memory/time fits, the largest batch for the memory budget and the throughput knee.
"""
from __future__ import annotations

import argparse
import math
import sys


def batch_sizes(text: str) -> list[int]:
    """``--sizes``: at least two distinct positive integers, comma-separated (the fits need two)."""
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        sizes = []
    if len(set(sizes)) < 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give at least two distinct positive batch sizes, e.g. 256,1024")
    return sizes


def positive_gb(text: str) -> float:
    try:
        gb = float(text)
    except ValueError:
        gb = math.nan
    if not math.isfinite(gb) or gb <= 0:  # before: a negative budget was taken ("max batch 0; recommended 1")
        raise argparse.ArgumentTypeError(f"{text!r}: give the memory per rank in GB, a positive number")
    return gb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jobs.cli import at_least

    parser.add_argument("--sizes", type=batch_sizes, default=None,
                        help="comma-separated per-rank batch sizes, at least two (default: around train.batch_size)")
    parser.add_argument("--memory-budget-gb", type=positive_gb, default=None, help="memory per rank (default: none)")
    parser.add_argument("--steps", type=at_least(1), default=3, help="timed steps per size")


def default_sizes(micro: int) -> list[int]:
    base = max(16, micro)
    return sorted({max(16, base // 4), max(16, base // 2), base, base * 2, base * 4})


def run(cfg, args) -> int:
    import torch
    import torch.nn.functional as F

    from optim.large_batch import measure_batch_size_bounds
    from training.dataspec import GoldVersionError, batch_to_inputs, resolve_data
    from training.loaders import table_to_tensors
    from training.loop import TrainSettingsError, check_settings, model_for, optimizer_for

    t = cfg.train
    try:
        spec = resolve_data(cfg)
        # the model and optimizer are built from train.* as bigopt train builds them: a bad
        # setting is the same one line (exit 2), before the train table is read, not a
        # traceback from the first size's model or optimizer
        check_settings(t, len(spec.cardinalities), spec.num_dense)
    except (FileNotFoundError, GoldVersionError, TrainSettingsError) as e:
        print(f"bigopt batch-size: {e}", file=sys.stderr)
        return 2
    sizes = args.sizes or default_sizes(t.micro_batch_size)
    # the rows of the largest batch, not the table: training streams the table, and the memory
    # measured is the process's (until the twenty-sixth session the whole train table was read,
    # so the memory model's intercept grew with the table: 1.4 GB at 2 M rows, "no batch fits")
    rows = table_to_tensors(spec.train, spec.versions.get("train"), spec.columns, max_rows=max(sizes))
    n = next(iter(rows.values())).shape[0]

    def model_factory():
        torch.manual_seed(cfg.run.seed)
        return model_for(t, spec.cardinalities, spec.num_dense)

    def batch_factory(b: int):
        idx = torch.arange(b) % n
        return batch_to_inputs({k: v[idx] for k, v in rows.items()}, spec)

    def loss_fn(model, batch):
        dense, sp, label, _ = batch
        with torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16, enabled=t.bf16):
            z = model(dense, sp)
        return F.binary_cross_entropy_with_logits(z.float(), label)

    budget = None if args.memory_budget_gb is None else args.memory_budget_gb * 2**30
    report = measure_batch_size_bounds(model_factory, batch_factory, sizes, budget, loss_fn=loss_fn,
                                       optimizer_factory=lambda model: optimizer_for(t, model), timed_steps=args.steps)
    print(f"bigopt batch-size: {t.model} / {t.optimizer}, table {spec.train} v{spec.versions.get('train')}, "
          f"per-rank batch sizes {sizes}")
    print(report.to_table())
    if n < max(sizes):  # batch_factory cycles the rows it has
        print(f"the train table has {n:,} rows: the sizes above that measured its rows repeated")
    if (b := report.recommended_batch) is not None:  # the sizes are per rank; train.batch_size is global
        print(global_batch_line(t, spec, b))
    return 0


def global_batch_line(t, spec, b: int) -> str:
    """The recommended per-rank size ``b`` as the global ``train.batch_size`` it means, or why
    ``bigopt train`` would refuse that (the train table holds no step of it on some rank: until
    the twenty-sixth session that batch size was printed all the same)."""
    from training.loop import TrainSettingsError, run_steps

    size = b * t.num_proc * t.grad_accum_steps
    line = f"per rank and micro-step: train.batch_size={size} with train.num_proc={t.num_proc} and " \
           f"train.grad_accum_steps={t.grad_accum_steps}"
    try:
        run_steps(t.model_copy(update={"batch_size": size}), spec)
    except TrainSettingsError:
        return (f"{line} is more than the train table's {spec.train_rows:,} rows give each rank for one step: "
                "bigopt train would refuse it; measure sizes up to the table's rows per rank")
    return line


if __name__ == "__main__":
    from jobs.cli import submit_main

    submit_main("batch-size")
