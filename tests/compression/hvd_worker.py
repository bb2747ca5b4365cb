"""Worker for test_compression_horovod.py, launched as ``horovodrun -np 2 --gloo python hvd_worker.py OUT``.

For every method: a small MLP + sparse-embedding logistic problem, each rank on its own data
shard, initial weights broadcast from rank 0, SGD through GradientCommunicator(backend=hvd).
The PowerSGD embedding policies run on the same problem with a dense-gradient embedding.
Writes OUT/rank<r>.json with per-method parameter digests, losses, bytes and checks.
"""

from __future__ import annotations

import hashlib
import json
import sys
import traceback
from pathlib import Path

import torch
import torch.nn as nn

import horovod.torch as hvd

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from optim.compression import GradientCommunicator, build_compressor  # noqa: E402
from payload_sizes import hybrid_nbytes  # noqa: E402  (this folder: the script's own)

METHODS = {
    "none": {}, "fp16": {}, "bf16": {}, "qsgd": {"bits": 8}, "topk": {"ratio": 0.05},
    "randomk": {"ratio": 0.1}, "signsgd": {}, "efsignsgd": {}, "signum_vote": {}, "powersgd": {"rank": 2},
}
# PowerSGD's embedding policies need a dense embedding gradient: name -> (compressor, hparams)
DENSE_EMB_METHODS = {"powersgd_hybrid": ("powersgd", {"rank": 2}),  # default policy: top-k 1 % + EF
                     "powersgd_rows": ("powersgd", {"rank": 2, "embedding": "sparse"})}
STEPS = 30
MIN_COMPRESS_NUMEL = 256  # smaller layers are sent exact (dense)


class Net(nn.Module):
    def __init__(self, sparse: bool = True):
        super().__init__()
        self.emb = nn.Embedding(64, 8, sparse=sparse)
        self.mlp = nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x, c):
        return self.mlp(torch.cat([x, self.emb(c)], dim=1)).squeeze(1)


def data(rank: int, size: int):
    g = torch.Generator().manual_seed(1234)
    n = 1024
    X = torch.randn(n, 16, generator=g)
    C = torch.randint(0, 64, (n,), generator=g)
    w = torch.randn(16, generator=g)
    bias = torch.randn(64, generator=g)
    y = ((X @ w + bias[C]) > 0).float()
    return (X, C, y), (X[rank::size], C[rank::size], y[rank::size])


def digest(model) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def run_method(name, hp, rank, size, adaptive=None, sparse_emb=True):
    torch.manual_seed(100 + rank)  # different init per rank: broadcast must fix it
    model = Net(sparse=sparse_emb)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    (X, C, y), (Xl, Cl, yl) = data(rank, size)
    comp = build_compressor(name, **hp)
    comm = GradientCommunicator(comp, model.named_parameters(), backend=hvd,
                                min_compress_numel=MIN_COMPRESS_NUMEL, adaptive=adaptive, name=f"t.{name}")
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    lossf = nn.BCEWithLogitsLoss()
    with torch.no_grad():
        l0 = float(lossf(model(X, C), y))
    out = {"bytes": [], "ratio": [], "wire": [], "critical": []}
    for step in range(STEPS):
        opt.zero_grad()
        lossf(model(Xl, Cl), yl).backward()
        if step == 0:
            raw = {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone() for n, p in model.named_parameters()}
        st = comm.synchronize()
        if step == 0:
            out["aggregation_err"] = None if adaptive else aggregation_error(name, hp, model, raw)
        out["bytes"].append(st.bytes_sent)
        out["ratio"].append(st.ratio)
        out["wire"].append(st.wire_bytes)
        out["critical"].append(st.critical)
        opt.step()
    with torch.no_grad():
        l1 = float(lossf(model(X, C), y))
    out.update(loss0=l0, loss1=l1, digest=digest(model), totals=comm.totals(),
               emb_grad_sparse=bool(model.emb.weight.grad.is_sparse), embedding_names=sorted(comm.embedding_names),
               payload_nbytes=payload_nbytes(comp, model, comm))
    return out


def payload_nbytes(comp, model, comm) -> int | None:
    """Analytic bytes per step for the PowerSGD run with top-k tables (None otherwise: rows vary):
    the table's top-k payload, PowerSGD's 4r(n + m) per compressed matrix, 4 bytes per element
    for the rest."""
    if comm.embedding_compressor is None:
        return None
    return hybrid_nbytes(((n, p.shape) for n, p in model.named_parameters()), comm.embedding_names,
                         comp.rank, comp.embedding_ratio, comm.min_compress_numel)


def aggregation_error(name, hp, model, raw):
    """Step 0, recomputed independently from every rank's raw gradient (allgathered):
    averaging methods -> mean over ranks of each rank's decompress(compress(g_r));
    signum_vote -> sign(sum_r sign(g_r)) * mean_r(mean|g_r|);
    powersgd -> P = sum_r M_r Q0, orthogonalise, Q = mean_r M_r^T P, P Q^T.
    Small layers and the sparse embedding are exact means. A dense embedding under PowerSGD's
    policies: the mean of each rank's top-k 1 % (``topk``) or the exact mean (``sparse``).
    Returns the max abs error."""
    from optim.compression.powersgd import orthogonalize

    fresh = build_compressor(name, **hp)
    fresh.set_rank(hvd.rank(), hvd.size())
    policy = getattr(fresh, "embedding", None) if not model.emb.sparse else None
    worst = 0.0
    for n, p in model.named_parameters():
        g = raw[n]
        everyone = hvd.allgather(g.unsqueeze(0).float())
        small = (n == "emb.weight" and policy != "topk") or (
            p.numel() < MIN_COMPRESS_NUMEL and name not in ("fp16", "bf16", "none"))
        if n == "emb.weight" and policy == "topk":
            top = build_compressor("topk", ratio=fresh.embedding_ratio)
            local = top.decompress(*top.compress(g, n))
            expected = hvd.allgather(local.unsqueeze(0).float()).mean(0)
        elif name == "powersgd" and not small and fresh.should_compress(g.shape):
            M = everyone.reshape(everyone.shape[0], g.shape[0], -1)
            q0 = orthogonalize(fresh._initial_q(n, M.shape[2], fresh.effective_rank(g.shape), g.device, g.dtype))
            P = orthogonalize(sum(Mr @ q0 for Mr in M))
            Q = sum(Mr.t() @ P for Mr in M) / M.shape[0]
            expected = (P @ Q.t()).view(g.shape)
        elif name == "powersgd" or small:
            expected = everyone.mean(0)
        elif name == "signum_vote":
            signs = torch.where(everyone >= 0, 1.0, -1.0).sum(0).sign()
            scale = everyone.reshape(everyone.shape[0], -1).abs().mean(1).mean()
            expected = signs * scale
        else:
            local = fresh.decompress(*fresh.compress(g, n))
            expected = hvd.allgather(local.unsqueeze(0).float()).mean(0)
        got = p.grad.to_dense() if p.grad.is_sparse else p.grad
        worst = max(worst, float((got.float() - expected).abs().max()))
    return worst


def main(out_dir: str) -> None:
    hvd.init()
    torch.set_num_threads(1)
    rank, size = hvd.rank(), hvd.size()
    res = {"size": size}
    runs = [(m, m, hp, None, True) for m, hp in METHODS.items()]
    runs.append(("topk_adaptive", "topk", {"ratio": 0.01}, {"interval": 5, "eta": 0.3}, True))
    runs += [(key, name, hp, None, False) for key, (name, hp) in DENSE_EMB_METHODS.items()]
    for key, name, hp, adaptive, sparse_emb in runs:
        try:
            res[key] = run_method(name, hp, rank, size, adaptive, sparse_emb)
        except Exception:  # report, keep ranks in step for the next method is not possible: stop
            res[key] = {"error": traceback.format_exc()}
            break
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))


if __name__ == "__main__":
    main(sys.argv[1])
