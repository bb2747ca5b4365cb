"""The CUDA path, on a GPU; every test here is skipped without one (CI has none).

Run them on a GPU machine with ``make test-cuda`` (docs/gpu.md). Most tests run the same
computation on CPU and on CUDA from the same initial weights and compare, so a device slip (a
state tensor created on the CPU, a CPU-only kernel, an export that assumes CPU inputs) fails
here instead of on a user's cluster.
"""
from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from train_helpers import interrupted_and_full, train_cfg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (the CUDA path is checked on a GPU machine: make test-cuda)")

CUDA = torch.device("cuda", 0)
# optimizers whose update draws random numbers (the CPU and CUDA generators differ): compared
# for running on the device, finite and moving, not for equal values
RANDOM_OPTIMIZERS = {"sophia"}
# matrix roots by eigendecomposition: the GPU's eigh differs from LAPACK's in the last digits
LOOSE = {"shampoo": {"rtol": 1e-2, "atol": 2e-4}}
# L-BFGS runs 20 inner iterations per step: float32 rounding differences grow to 0.1 in 5 steps
# (measured on an H100), while in float64 the devices agree to 1e-8 - compare it there
FLOAT64 = {"lbfgs"}
VARIANCE_REDUCED = {"svrg", "saga"}  # their own loop contract (docs/optim.md), tested below


@pytest.fixture(autouse=True)
def _fp32_matmul():
    """Compare true fp32 on both devices (TF32 would differ from the CPU by ~1e-3)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(scope="module")
def synth_gold(tmp_path_factory):
    from training.synthetic import make_gold

    return make_gold(tmp_path_factory.mktemp("gold"), rows={"train": 16_000, "valid": 4_000, "test": 4_000},
                     files_per_table=4, seed=1)


class Net(nn.Module):
    """Every parameter kind the registry groups: embedding, bag, linear, norms, bias."""

    def __init__(self, sparse: bool = False):
        super().__init__()
        self.emb = nn.Embedding(50, 8, sparse=sparse)
        self.lin = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 1)

    def forward(self, ids):
        return self.out(torch.relu(self.norm(self.lin(self.emb(ids).mean(1))))).squeeze(1)


def _batch(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (64, 4), generator=g)
    y = (ids[:, 0] % 2).float()
    return ids.to(device), y.to(device)


def _twins(factory):
    torch.manual_seed(0)
    cpu = factory()
    return cpu, copy.deepcopy(cpu).to(CUDA)


def _state_tensors(opt):
    for st in opt.state.values():
        for v in (st.values() if isinstance(st, dict) else [st]):
            if isinstance(v, torch.Tensor):
                yield v
            elif isinstance(v, (list, tuple)):
                yield from (x for x in v if isinstance(x, torch.Tensor))


def _train(model, opt, device, steps=5):
    loss_fn = nn.BCEWithLogitsLoss()
    dtype = next(model.parameters()).dtype
    for s in range(steps):
        ids, y = _batch(device, seed=s)
        y = y.to(dtype)

        def closure():
            opt.zero_grad()
            loss = loss_fn(model(ids), y)
            loss.backward()
            return loss

        opt.step(closure)


def _assert_close_params(a: nn.Module, b: nn.Module, rtol: float, atol: float, what: str) -> None:
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert q.device.type == "cuda"
        torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=rtol, atol=atol, msg=lambda m: f"{what} {n}: {m}")


def test_pick_device_takes_the_local_ranks_gpu():
    from training.loop import pick_device

    assert pick_device(0) == CUDA
    n = torch.cuda.device_count()
    assert pick_device(n + 0) == torch.device("cuda", 0)  # ranks beyond the GPUs share them round-robin


def _dense_names():
    from optim import available_optimizers

    return [n for n in available_optimizers() if n not in VARIANCE_REDUCED]


@pytest.mark.parametrize("name", _dense_names())
def test_optimizer_on_cuda_matches_cpu(name):
    from optim import build_optimizer

    cpu, gpu = _twins(lambda: Net().to(torch.float64 if name in FLOAT64 else torch.float32))
    init = [p.detach().clone() for p in cpu.parameters()]
    hp = {"lr": 0.01}
    opts = [build_optimizer(name, m, **hp) for m in (cpu, gpu)]
    _train(cpu, opts[0], "cpu")
    _train(gpu, opts[1], CUDA)
    for t in _state_tensors(opts[1]):
        # a 0-dim step counter may stay on the CPU (torch's own optimizers do that); any other
        # state on the CPU would cost a copy per step
        assert t.device.type == "cuda" or t.dim() == 0, (name, t.shape, t.device)
    if name in RANDOM_OPTIMIZERS:
        moved = [not torch.equal(p.detach().cpu(), w) for p, w in zip(gpu.parameters(), init)]
        assert all(torch.isfinite(p).all() for p in gpu.parameters()) and any(moved)
        return
    _assert_close_params(cpu, gpu, **LOOSE.get(name, {"rtol": 2e-4, "atol": 2e-5}), what=name)


@pytest.mark.parametrize("name", ["sgd", "adagrad", "ftrl"])
def test_sparse_embedding_routes_on_cuda_match_cpu(name):
    """Sparse (COO) embedding gradients: the routes the loop takes with sparse_embeddings."""
    from optim import build_optimizer

    cpu, gpu = _twins(lambda: Net(sparse=True))
    opts = [build_optimizer(name, m, lr=0.05) for m in (cpu, gpu)]
    _train(cpu, opts[0], "cpu")
    _train(gpu, opts[1], CUDA)
    assert gpu.emb.weight.grad is not None and gpu.emb.weight.grad.is_sparse and gpu.emb.weight.grad.is_cuda
    _assert_close_params(cpu, gpu, rtol=2e-4, atol=2e-5, what=name)


@pytest.mark.parametrize("name", sorted(VARIANCE_REDUCED))
def test_variance_reduced_on_cuda_match_cpu(name):
    from optim import build_optimizer

    batches = [_batch("cpu", seed=s) for s in range(4)]
    loss_fn = nn.BCEWithLogitsLoss()

    def run(model, device):
        opt = build_optimizer(name, model, lr=0.1, **({"num_components": len(batches)} if name == "saga" else {}))
        data = [(x.to(device), y.to(device)) for x, y in batches]
        for _ in range(3):
            if name == "svrg":
                opt.on_epoch_start(model, lambda m: ((loss_fn(m(x), y), len(x)) for x, y in data))
            else:
                opt.on_epoch_start(model)
            for j, (x, y) in enumerate(data):
                if name == "svrg":
                    opt.step(lambda: loss_fn(model(x), y))
                else:
                    opt.step(lambda: loss_fn(model(x), y), index=j)
        return opt

    cpu, gpu = _twins(lambda: nn.Sequential(nn.EmbeddingBag(50, 4, mode="mean"), nn.Linear(4, 1), nn.Flatten(0)))
    run(cpu, "cpu")
    opt = run(gpu, CUDA)
    assert all(t.device.type == "cuda" or t.dim() == 0 for t in _state_tensors(opt))
    _assert_close_params(cpu, gpu, rtol=2e-4, atol=2e-5, what=name)


# --- gradient compression -------------------------------------------------------------------
DETERMINISTIC_COMPRESSORS = ["none", "fp16", "bf16", "topk", "signsgd", "efsignsgd", "signum_vote"]


def _compressor_names():
    from optim.compression import available_compressors

    return sorted(available_compressors())


@pytest.mark.parametrize("name", _compressor_names())
def test_communicator_on_cuda(name):
    """Same gradients on both devices: same bytes on the wire; same decompressed gradients for
    the deterministic methods (QSGD, random-k and PowerSGD draw from the device's generator)."""
    from optim.compression import GradientCommunicator, build_compressor

    cpu, gpu = _twins(lambda: nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 1)))
    x = torch.randn(32, 256, generator=torch.Generator().manual_seed(1))
    stats = []
    for model, dev in ((cpu, "cpu"), (gpu, CUDA)):
        comm = GradientCommunicator(build_compressor(name), model, backend=None, min_compress_numel=64)
        for _ in range(2):  # a second round exercises error-feedback residuals / PowerSGD warm start
            model.zero_grad()
            model(x.to(dev)).square().mean().backward()
            stats.append(comm.synchronize())
    for p in gpu.parameters():
        assert p.grad.is_cuda and torch.isfinite(p.grad).all()
    assert stats[3].bytes_sent == stats[1].bytes_sent, name
    if name in DETERMINISTIC_COMPRESSORS:
        # the gradients themselves differ in the last float32 bits between devices; a cast can
        # round such a pair to neighbouring wire values (one fp16/bf16 ulp apart)
        wire_eps = {"fp16": torch.finfo(torch.float16).eps, "bf16": torch.finfo(torch.bfloat16).eps}.get(name, 1e-4)
        for p, q in zip(cpu.parameters(), gpu.parameters()):
            torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=wire_eps, atol=1e-6)


# --- models -----------------------------------------------------------------------------------
MODELS = {
    "logreg": {},
    "dlrm": {"embedding_dim": 8, "bottom_mlp": [32, 8], "top_mlp": [32]},
    "dcnv2": {"embedding_dim": 8, "deep_mlp": [32], "cross_layers": 2},
}
CARDS = [7, 1000, 3, 50] * 6 + [2, 100_000]


def _inputs(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(n, 13, generator=g) * 5
    sparse = torch.stack([torch.randint(0, c, (n,), generator=g) for c in CARDS], 1).to(torch.int32)
    return dense, sparse


@pytest.mark.parametrize("name", list(MODELS))
def test_model_forward_backward_on_cuda_matches_cpu(name):
    from training.models import build_model

    cpu, gpu = _twins(lambda: build_model(name, cardinalities=CARDS, **MODELS[name]))
    dense, sparse = _inputs()
    outs = []
    for model, dev in ((cpu, "cpu"), (gpu, CUDA)):
        logits = model(dense.to(dev), sparse.to(dev))
        logits.sigmoid().sum().backward()
        outs.append(logits)
    torch.testing.assert_close(outs[1].detach().cpu(), outs[0].detach(), rtol=1e-4, atol=1e-5)
    for (n, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = gpu(dense.to(CUDA), sparse.to(CUDA))
    assert torch.isfinite(low).all() and (low.float() - outs[1]).abs().max() < 0.1


def test_out_of_range_id_stops_the_cuda_step():
    """On CUDA the vocabulary check is an asynchronous device assert: the step fails (at the
    next sync) instead of reading another column's embedding rows. A device assert poisons the
    CUDA context, hence the subprocess."""
    code = textwrap.dedent("""
        import torch
        from training.models import build_model
        m = build_model("dlrm", cardinalities=[10, 20], num_dense=2, embedding_dim=4, bottom_mlp=[4], top_mlp=[4]).cuda()
        ok = m(torch.rand(8, 2, device="cuda"), torch.tensor([[9, 19]] * 8, device="cuda"))
        torch.cuda.synchronize()
        print("valid ids ok", flush=True)
        bad = m(torch.rand(8, 2, device="cuda"), torch.tensor([[9, 20]] * 8, device="cuda"))
        torch.cuda.synchronize()
        print("out-of-range id not caught", flush=True)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "valid ids ok" in p.stdout, p.stderr[-2000:]
    assert p.returncode != 0 and "out-of-range id not caught" not in p.stdout
    assert "categorical id outside its column's vocabulary" in p.stderr, p.stderr[-2000:]


# --- the loader feeding a GPU ----------------------------------------------------------------------
@pytest.mark.parametrize("shuffle", [True, False])
def test_loader_pins_batches_for_asynchronous_copies(synth_gold, shuffle):
    """pin_memory: the same batches, in page-locked memory (shuffled ones gathered straight into
    it), and a non-blocking copy to the GPU delivers them intact."""
    from training.data import DeltaTorchLoader

    kw = dict(batch_size=1000, shuffle=shuffle, seed=3, shuffle_buffer_rows=4000, drop_last=shuffle)
    pinned = DeltaTorchLoader(synth_gold["train"], pin_memory=True, **kw)
    plain = DeltaTorchLoader(synth_gold["train"], **kw)
    n = 0
    for a, b in zip(pinned, plain):
        assert all(t.is_pinned() for t in a.values()) and not any(t.is_pinned() for t in b.values())
        on_gpu = {k: v.to(CUDA, non_blocking=True) for k, v in a.items()}
        del a  # the caching host allocator keeps the block until the copies are done
        for k, v in on_gpu.items():
            assert torch.equal(v.cpu(), b[k]), k
        n += 1
    assert n == len(plain) > 0
    pinned.close()
    plain.close()


# --- the training loop ----------------------------------------------------------------------------
def test_training_on_cuda_learns(synth_gold, tmp_path):
    from training.api import run_training

    cfg = train_cfg(synth_gold, tmp_path, "train.max_steps=80", "train.eval_every=40", "train.target_auc=0.6",
                    "train.early_stop=false", "train.test_at_end=true")
    r = run_training(cfg).rank0
    assert r["device"] == "cuda:0"
    assert r["valid"]["auc"] > 0.7 and r["test"]["rows"] == 4000, r["valid"]
    losses = [h["loss"] for h in r["history"]["train"]]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("variant", [
    ["train.optimizer=momentum", "train.lr=0.05", "train.grad_accum_steps=2", "train.clip_grad_norm=1.0",
     "train.scheduler=cosine", "train.warmup_steps=5"],
    ["train.optimizer=adagrad", "train.lr=0.05", "train.sparse_embeddings=true", "train.bf16=true"],
    ["train.optimizer=adam", "train.compression.name=topk", "train.compression.params={ratio: 0.05}"],
    # sparse SGD: an uncoalesced gradient's rows were added with atomics, and runs differed
    ["train.optimizer=sgd", "train.lr=0.1", "train.sparse_embeddings=true"],
    # QSGD's rounding noise comes from the CUDA generator, whose state the checkpoint keeps
    ["train.optimizer=sgd", "train.lr=0.1", "train.compression.name=qsgd", "train.compression.params={bits: 4}"],
])
def test_resume_on_cuda_matches_uninterrupted(synth_gold, tmp_path, variant):
    """A checkpoint taken on the GPU restores model, optimizer, compressor residuals, loader
    position and the CUDA generator: the resumed run ends with the same parameters."""
    full, resumed = interrupted_and_full(synth_gold, tmp_path, *variant)
    assert resumed.rank0["device"] == "cuda:0" and resumed.rank0["step"] == 30
    assert resumed.rank0["fingerprint"] == full.rank0["fingerprint"]
    assert resumed.valid["auc"] == full.valid["auc"]


def test_cuda_checkpoint_resumes_on_a_cpu_only_host(synth_gold, tmp_path, monkeypatch):
    """A run checkpointed on a GPU goes on where there is none (the state loads to the CPU)."""
    from training.api import run_training

    common = ["train.max_steps=20", "train.checkpoint_every=10", "train.eval_every=0"]
    cfg = train_cfg(synth_gold, tmp_path, *common)
    run_training(cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 10})}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = run_training(cfg, resume=True).rank0
    assert r["device"] == "cpu" and r["step"] == 20


def test_batch_size_probe_measures_device_memory():
    from optim.large_batch.batch_size import measure_batch_size_bounds

    rep = measure_batch_size_bounds(
        lambda: nn.Sequential(nn.Linear(512, 2048), nn.ReLU(), nn.Linear(2048, 10)),
        lambda b: (torch.randn(b, 512), torch.randint(0, 10, (b,))),
        [256, 1024, 4096], memory_budget=2e9)
    assert rep.memory_kind == "cuda_max_allocated" and rep.device.startswith("cuda")
    peaks = [m.peak_memory_bytes for m in rep.measurements]
    assert peaks == sorted(peaks) and peaks[-1] > peaks[0]
