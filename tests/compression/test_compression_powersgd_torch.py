"""PowerSGD vs torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook on the same inputs.

The torch hook runs for real inside DDP on a 1-process gloo group on 127.0.0.1; a wrapper
hook records every bucket's input gradients and the hook's output. The same gradients are
then fed through GradientCommunicator(powersgd) with backend=None. Torch draws the first Q
from np.RandomState(seed).randint -> torch.manual_seed -> randn per compressed tensor in
bucket order grouped by shape; we replay that draw and load it as our warm-start Q, so
every later step (orthogonalisation, P, Q, warm start, error feedback, the size rule) is
compared step by step.
"""

from __future__ import annotations

import copy
import socket
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from optim.compression import GradientCommunicator, build_compressor

START = 2  # torch requires start_powerSGD_iter > 1 with error feedback / warm start
STEPS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> nn.Module:
    torch.manual_seed(3)
    # (30, 40): 70*4*2 = 560 < 1200 -> compressed; (20, 6, 5) viewed as (20, 30) -> compressed;
    # (3, 20): 23*3*2 = 138 > 60 -> not compressed; biases never.
    return nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 30), nn.Tanh(), nn.Linear(30, 3))


@pytest.fixture
def gloo_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _run_torch(rank: int, seed: int):
    model = _model()
    ddp = DDP(model, bucket_cap_mb=100)
    state = PowerSGDState(process_group=None, matrix_approximation_rank=rank, start_powerSGD_iter=START,
                          min_compression_rate=2, use_error_feedback=True, warm_start=True, random_seed=seed)
    records = []

    def hook(st, bucket):
        inputs = [g.detach().clone() for g in bucket.gradients()]
        params = bucket.parameters()
        rng = copy.deepcopy(st.rng)
        it = st.iter

        def done(fut):
            out = fut.value()
            flat = out[0] if isinstance(out, list) else out
            records.append({"iter": it, "inputs": inputs, "params": params, "rng": rng,
                            "out": flat.detach().clone()})
            return out

        return powerSGD_hook(st, bucket).then(done)

    ddp.register_comm_hook(state, hook)
    gen = torch.Generator().manual_seed(11)
    for _ in range(STEPS):
        x = torch.randn(16, 40, generator=gen)
        y = torch.randn(16, 3, generator=gen)
        ddp.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
    return model, records


@pytest.mark.parametrize("rank", [2, 4])  # 2: Gram-Schmidt path, 4: QR path
def test_powersgd_matches_torch_hook(gloo_group, rank):
    seed = 7
    model, records = _run_torch(rank, seed)
    assert len(records) == STEPS  # one bucket per backward
    names = {id(p): n for n, p in model.named_parameters()}
    ref = _model()
    mine = dict(ref.named_parameters())
    comp = build_compressor("powersgd", rank=rank, min_compression_rate=2, warm_start=True, error_feedback=True)
    comm = GradientCommunicator(comp, ref.named_parameters(), backend=None, min_compress_numel=0)

    compared = 0
    for rec in records:
        if rec["iter"] < START:
            continue
        order = [names[id(p)] for p in rec["params"]]
        if rec["iter"] == START:
            # replay torch's first-Q draw (shape-grouped bucket order) as our warm-start state
            groups = defaultdict(list)
            for n, g in zip(order, rec["inputs"]):
                if comp.should_compress(g.shape):
                    groups[comp.matrix_shape(g.shape)].append(n)
            qs = {}
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(rec["rng"].randint(1_000_000_000))
                for shape, ns in groups.items():
                    for n in ns:
                        r = comp.effective_rank(mine[n].shape)
                        qs[n] = torch.randn(1, shape[1], r).squeeze(0)
            assert qs, "nothing compressed: the test model is wrong"
            comp.load_state_dict({"q": qs})
        for n, g in zip(order, rec["inputs"]):
            mine[n].grad = g.reshape(mine[n].shape).clone()
        stats = comm.synchronize()
        assert stats.n_compressed == 2 and stats.n_uncompressed == 4
        off = 0
        for n, g in zip(order, rec["inputs"]):
            theirs = rec["out"][off : off + g.numel()].view(mine[n].shape)
            off += g.numel()
            torch.testing.assert_close(mine[n].grad, theirs, rtol=1e-5, atol=1e-6, msg=f"{n} @ iter {rec['iter']}")
        compared += 1
    assert compared == STEPS - START
    # torch's bucket error == our per-parameter residuals (zero for the uncompressed ones)
    assert all(comm.memory.get(n) is not None for n in ("0.weight", "2.weight"))


def test_powersgd_size_rule_matches_torch():
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _should_compress

    comp = build_compressor("powersgd", rank=4, min_compression_rate=2)
    for shape in [(30, 40), (3, 20), (20, 6, 5), (100,), (8, 8), (64, 64)]:
        n = shape[0]
        m = int(np.prod(shape)) // n
        assert comp.should_compress(shape) == _should_compress(n, m, min(n, m, 4), 2)[0]
