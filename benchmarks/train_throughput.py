"""Benchmark: training samples/s of the full pipeline vs in-memory tensors, and Horovod scaling.

    python benchmarks/train_throughput.py --quick        # < 2 min on a 2-core box
    python benchmarks/train_throughput.py                # larger table, more steps
    python benchmarks/train_throughput.py --table PATH   # an existing gold table (+ --vocab)

1. **Pipeline vs in-memory** (one process): the same model and optimizer step
   (forward, BCE, backward, ``optimizer.step``) fed either by ``DeltaTorchLoader`` reading a
   gold-shaped Delta table (shuffled, prefetching) through ``batch_to_inputs``, or by batches
   already materialised as tensors in memory. Interleaved ``--repeats`` rounds of ``--steps``
   steps each; ``train_ratio_vs_inmemory`` is the median over rounds of pipeline / in-memory
   samples/s (goal >= 0.9: the loader must hide behind the model step). Each round runs
   inside one epoch; ``epoch_start_s`` is the wait for a new epoch's first batch (its shuffle
   buffer filling), paid once per epoch and reported on its own.
2. **Horovod scaling**: ``training.api.run_training`` with ``num_proc`` 1 (in-process) and 2
   (``horovod.spark.run``, gloo, local[2]) on the same table and global batch; samples/s is
   over the training steps only (the launch overhead is reported separately). On a 2-core
   machine shared with Spark's JVM the ideal is 2x only if nothing else runs.

The LAST lines are ``name: value``; ``train_ratio_vs_inmemory`` is last.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def _step_fn(model, opt):
    def step(dense, sparse, label):
        opt.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(model(dense, sparse), label)
        loss.backward()
        opt.step()
        return loss

    return step


def pipeline_vs_inmemory(spec, args) -> dict[str, float]:
    from training.data import DeltaTorchLoader
    from training.dataspec import batch_to_inputs
    from training.models import build_model
    from training.optimizers import build_optimizer

    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.model, cardinalities=spec.cardinalities, num_dense=spec.num_dense).to(dev)
    opt = build_optimizer(args.optimizer, model, lr=1e-3)
    step = _step_fn(model, opt)
    loader = DeltaTorchLoader(spec.train, spec.columns, args.batch, version=spec.versions["train"], shuffle=True,
                              seed=0, prefetch=4, read_ahead=args.read_ahead, pin_memory=dev.type == "cuda" and not args.no_pin)
    per_epoch = len(loader)
    # in-memory baseline: the same number of distinct batches, already tensors in the model's dtypes
    mem = []
    for b in loader:
        mem.append(batch_to_inputs(b, spec, dev)[:3])
        if len(mem) >= min(per_epoch, args.steps):
            break
    if per_epoch < args.steps:
        raise SystemExit(f"the table gives {per_epoch} batches of {args.batch} per epoch, fewer than --steps "
                         f"{args.steps}: use more --rows or fewer --steps")
    # A round is timed inside one epoch: an epoch's first batch waits for the shuffle buffer
    # to fill (shuffle_buffer_rows rows read and decoded), once per epoch. On a small table
    # every round would pay it (300k rows at batch 8192: 36 batches an epoch), so it is
    # measured on its own (epoch_start_s) and left out of the steady-state samples/s.
    cur = {"it": None, "left": 0, "epoch": 1, "pending": None}
    starts: list[float] = []

    def new_epoch() -> None:
        if cur["it"] is not None:
            loader.set_epoch(cur["epoch"])
            cur["epoch"] += 1
        t0 = time.perf_counter()
        cur["it"] = iter(loader)
        cur["pending"] = next(cur["it"])
        starts.append(time.perf_counter() - t0)
        cur["left"] = per_epoch

    def next_batch():
        b, cur["pending"] = cur["pending"], None
        cur["left"] -= 1
        return b if b is not None else next(cur["it"])

    def sync() -> None:  # a GPU runs behind the host: time what it finished, not what was queued
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def run_pipeline(n: int) -> float:
        if cur["left"] < n:
            new_epoch()
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            d, s, y, _m = batch_to_inputs(next_batch(), spec, dev)
            step(d, s, y)
        sync()
        return n * args.batch / (time.perf_counter() - t0)

    def run_memory(n: int) -> float:
        sync()
        t0 = time.perf_counter()
        for i in range(n):
            step(*mem[i % len(mem)])
        sync()
        return n * args.batch / (time.perf_counter() - t0)

    run_memory(3)
    run_pipeline(3)  # warm-up (allocator, loader threads)
    pipe, memv, ratios = [], [], []
    for _ in range(args.repeats):
        m = run_memory(args.steps)
        p = run_pipeline(args.steps)
        pipe.append(p)
        memv.append(m)
        ratios.append(p / m)
    if len(starts) < 2:  # a warm epoch start, the figure reported
        new_epoch()
    loader.close()
    return {
        "pipeline_samples_per_s": statistics.median(pipe),
        "inmemory_samples_per_s": statistics.median(memv),
        # the first start also pays the loader's first reads (footers, template, arena)
        "epoch_start_s": statistics.median(starts[1:] or starts),
        "epochs_started": len(starts),
        "train_ratio_vs_inmemory": statistics.median(ratios),
    }


def horovod_scaling(gold: dict, workdir: Path, args) -> dict[str, float]:
    from jobs.config import load_config
    from pipelines.spark import get_spark
    from training.api import run_training

    spark = get_spark("train-throughput", master="local[2]", ui=False, log_level="ERROR")
    out: dict[str, float] = {}
    for n in (1, 2):
        cfg = load_config(None, [
            f"train.train_table={gold['train']}", f"train.valid_table={workdir}/none",
            f"train.test_table={workdir}/none", f"train.checkpoint_dir={workdir}/ckpt{n}",
            f"train.model={args.model}", f"train.optimizer={args.optimizer}", f"train.batch_size={args.batch}",
            f"train.max_steps={args.hvd_steps}", "train.eval_every=0", "train.log_every=10",
            f"train.num_proc={n}", "tracking.enabled=false", f"lake.root={workdir}/lake",
        ])
        t0 = time.perf_counter()
        res = run_training(cfg, spark=spark)
        wall = time.perf_counter() - t0
        r = res.rank0
        # steady state: skip the first logging window (allocator / loader warm-up)
        hist = r["history"]["train"]
        steady = statistics.median(h["samples_per_s"] for h in hist[1:]) if len(hist) > 2 else r["samples_per_s"]
        out[f"hvd_{n}proc_samples_per_s"] = steady
        out[f"hvd_{n}proc_launch_overhead_s"] = wall - r["train_s"]
    out["hvd_scaling_2v1"] = out["hvd_2proc_samples_per_s"] / out["hvd_1proc_samples_per_s"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small table, few steps (< 2 min)")
    p.add_argument("--table", default=None, help="existing gold train table (default: synthetic)")
    p.add_argument("--vocab", default=None, help="vocabulary JSON for --table")
    p.add_argument("--model", default="dlrm")
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--rows", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="steps per round (pipeline vs in-memory)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--hvd-steps", type=int, default=None)
    p.add_argument("--no-horovod", action="store_true")
    p.add_argument("--no-pin", action="store_true", help="CUDA: pageable batches (synchronous host-to-GPU copies)")
    p.add_argument("--read-ahead", type=int, default=None, help="loader read_ahead (default: by cores)")
    p.add_argument("--device", default="auto",
                   help="device of the pipeline-vs-in-memory part: auto (CUDA when present, as training picks), cpu, cuda")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.rows = args.rows or (300_000 if args.quick else 2_000_000)
    args.steps = args.steps or (30 if args.quick else 150)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.hvd_steps = args.hvd_steps or (60 if args.quick else 300)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

    from jobs.config import load_config
    from training.dataspec import resolve_data
    from training.loop import default_threads
    from training.synthetic import make_gold

    torch.set_num_threads(default_threads(1))  # the same policy as a 1-rank training run

    work = Path(tempfile.mkdtemp(prefix="bigopt-train-bench-"))
    t_start = time.perf_counter()
    try:
        if args.table:
            gold = {"train": args.table}
            extra = [f"train.vocabulary={args.vocab}"] if args.vocab else []
        else:
            gold = make_gold(work / "gold", rows={"train": args.rows}, files_per_table=max(2, args.rows // 131_072),
                             seed=0)
            extra = []
        cfg = load_config(None, [f"train.train_table={gold['train']}", f"train.valid_table={work}/none",
                                 f"lake.root={work}/lake", *extra])
        spec = resolve_data(cfg)
        print(f"table {spec.train} v{spec.versions['train']}: {spec.train_rows:,} rows, model {args.model}, "
              f"optimizer {args.optimizer}, batch {args.batch}, device {args.device}, "
              f"torch threads {torch.get_num_threads()}")
        res = pipeline_vs_inmemory(spec, args)
        if not args.no_horovod:
            res.update(horovod_scaling(gold, work, args))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["bench_wall_s"] = time.perf_counter() - t_start
    ratio = res.pop("train_ratio_vs_inmemory")
    for k, v in res.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    print(f"train_ratio_vs_inmemory: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
