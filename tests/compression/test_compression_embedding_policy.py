"""PowerSGD's embedding policy (``embedding: topk | sparse | powersgd``) in one process: which
parameters are tables, what each policy sends (exact bytes against the analytic payload sizes),
what it writes back, error feedback, learning. Resume: test_compression_communicator.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from optim.compression import (
    CompressionConfigError,
    GradientCommunicator,
    build_compressor,
    embedding_parameter_names,
)
from payload_sizes import analytic_nbytes, hybrid_nbytes

ROWS, DIM, MIN_NUMEL = 3000, 16, 1024


class TinyDLRM(nn.Module):
    """One 3000 x 16 table (named like the project's models: ``emb.table.weight``) and an MLP."""

    def __init__(self, sparse: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Module()
        self.emb.table = nn.Embedding(ROWS, DIM, sparse=sparse)
        self.mlp = nn.Sequential(nn.Linear(DIM * 3 + 8, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                                 nn.Linear(64, 1))

    def forward(self, x, ids):
        return self.mlp(torch.cat([x, self.emb.table(ids).flatten(1)], 1)).squeeze(1)


def _batch(seed: int, n: int = 256):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, ROWS, (n, 3), generator=g)
    x = torch.randn(n, 8, generator=g)
    y = ((x[:, 0] + (ids[:, 0] % 7 - 3).float() * 0.5) > 0).float()
    return x, ids, y


def _backward(model, seed: int):
    model.zero_grad()
    x, ids, y = _batch(seed)
    nn.functional.binary_cross_entropy_with_logits(model(x, ids), y).backward()
    return ids


def _mlp_bytes(model, rank: int) -> int:
    """The MLP's bytes under PowerSGD (the table left out)."""
    return hybrid_nbytes(((n, p.shape) for n, p in model.named_parameters() if n != "emb.table.weight"),
                         (), rank, min_numel=MIN_NUMEL)


# ---------------------------------------------------------------------------------------------

def test_default_policy_is_topk_and_bad_values_are_refused():
    comp = build_compressor("powersgd")
    assert comp.embedding == "topk" and comp.embedding_ratio == 0.01
    with pytest.raises(CompressionConfigError, match="embedding must be one of"):
        build_compressor("powersgd", embedding="rows")
    with pytest.raises(CompressionConfigError, match="embedding_ratio must be in"):
        build_compressor("powersgd", embedding_ratio=0.0)
    with pytest.raises(CompressionConfigError, match="does not take"):
        build_compressor("topk", embedding="topk")  # a PowerSGD hyperparameter only


def test_tables_found_by_module_type_by_name_or_as_given():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.item_lookup = nn.EmbeddingBag(100, 4)  # no "emb" in the name
            self.tok_emb = nn.Embedding(50, 4)
            self.member = nn.Linear(4, 4)  # "emb" inside a word is not a table

    m = M()
    assert embedding_parameter_names(m) == {"item_lookup.weight", "tok_emb.weight"}
    comp = build_compressor("powersgd")
    assert GradientCommunicator(comp, m).embedding_names == {"item_lookup.weight", "tok_emb.weight"}
    by_name = GradientCommunicator(build_compressor("powersgd"), m.named_parameters())
    assert by_name.embedding_names == {"tok_emb.weight"}
    assert GradientCommunicator(build_compressor("powersgd"), m.named_parameters(),
                                embedding_names=r"lookup").embedding_names == {"item_lookup.weight"}
    assert GradientCommunicator(build_compressor("powersgd"), m.named_parameters(),
                                embedding_names=lambda n, p: p.shape[0] == 50).embedding_names == {"tok_emb.weight"}
    with pytest.raises(ValueError, match="not among"):
        GradientCommunicator(build_compressor("powersgd"), m.named_parameters(), embedding_names=["nope.weight"])
    # the project's models keep their table in emb.table.weight: found by name as well
    assert GradientCommunicator(build_compressor("powersgd"), TinyDLRM().named_parameters()).embedding_names \
        == {"emb.table.weight"}
    # plain PowerSGD and other compressors do not look for tables
    assert GradientCommunicator(build_compressor("powersgd", embedding="powersgd"), m).embedding_names == set()
    assert GradientCommunicator("topk", m).embedding_names == set()


def test_topk_policy_bytes_equal_the_analytic_payload_sizes():
    model = TinyDLRM()
    comm = GradientCommunicator(build_compressor("powersgd", rank=4), model, min_compress_numel=MIN_NUMEL)
    expected = analytic_nbytes("topk", {"ratio": 0.01}, (ROWS, DIM)) + _mlp_bytes(model, 4)
    dense = 4 * sum(p.numel() for p in model.parameters())
    for step in range(3):
        _backward(model, step)
        st = comm.synchronize()
        assert st.bytes_sent == expected and st.dense_bytes == dense
        assert st.n_compressed == 3  # the table (top-k) + two MLP matrices (PowerSGD)
    assert comm.totals()["bytes_sent"] == 3 * expected
    # the same model with plain PowerSGD: the table as a 3000 x 16 matrix at rank 4
    pm = TinyDLRM()
    plain = GradientCommunicator(build_compressor("powersgd", rank=4, embedding="powersgd"), pm,
                                 min_compress_numel=MIN_NUMEL)
    _backward(pm, 0)
    assert plain.synchronize().bytes_sent == 4 * 4 * (ROWS + DIM) + _mlp_bytes(pm, 4)


def test_topk_policy_sends_the_k_largest_table_entries_with_error_feedback():
    model = TinyDLRM()
    comm = GradientCommunicator(build_compressor("powersgd", rank=4), model, min_compress_numel=MIN_NUMEL)
    _backward(model, 0)
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    comm.synchronize()
    g, sent = raw["emb.table.weight"], model.emb.table.weight.grad
    k = math.ceil(0.01 * g.numel())
    assert int((sent != 0).sum()) == k
    kth = g.abs().flatten().topk(k).values.min()
    assert torch.equal(sent[sent != 0], g[sent != 0]) and bool((sent.abs()[sent != 0] >= kth).all())
    torch.testing.assert_close(comm.memory.get("emb.table.weight") + sent, g, rtol=0, atol=0)  # EF residual
    w = model.mlp[2].weight  # 64 x 128: PowerSGD, not exact
    assert not torch.equal(w.grad, raw["mlp.2.weight"])
    assert torch.equal(model.mlp[4].weight.grad, raw["mlp.4.weight"])  # 64 elements: dense


def test_sparse_policy_sends_exactly_the_touched_rows_and_writes_back_dense():
    model = TinyDLRM()
    comp = build_compressor("powersgd", rank=4, embedding="sparse", warmup_steps=1)
    comm = GradientCommunicator(comp, model, min_compress_numel=MIN_NUMEL)
    for step in range(2):  # rows during warm-up too: they are exact either way
        ids = _backward(model, step)
        table = model.emb.table.weight.grad.clone()
        st = comm.synchronize()
        touched = int(torch.unique(ids).numel())
        assert int((table != 0).any(1).sum()) == touched
        rows_bytes = touched * (8 + 4 * DIM)  # int64 row id + 16 fp32 values
        rest = _mlp_bytes(model, 4) if step else 4 * sum(p.numel() for n, p in model.named_parameters()
                                                          if n != "emb.table.weight")
        assert st.bytes_sent == rows_bytes + rest
        assert st.dense_bytes == 4 * sum(p.numel() for p in model.parameters())  # the ratio is against dense
        assert not model.emb.table.weight.grad.is_sparse
        assert torch.equal(model.emb.table.weight.grad, table)  # lossless


def test_sparse_table_gradients_stay_exact_rows_under_every_policy():
    for policy in ("topk", "sparse", "powersgd"):
        model = TinyDLRM(sparse=True)
        comm = GradientCommunicator(build_compressor("powersgd", embedding=policy), model, min_compress_numel=MIN_NUMEL)
        ids = _backward(model, 0)
        ref = model.emb.table.weight.grad.coalesce().to_dense()
        st = comm.synchronize()
        assert model.emb.table.weight.grad.is_sparse and st.n_sparse == 1
        torch.testing.assert_close(model.emb.table.weight.grad.to_dense(), ref)
        assert st.by_collective["allgather"] == int(torch.unique(ids).numel()) * (8 + 4 * DIM)


@pytest.mark.parametrize("policy", ["topk", "sparse", "powersgd"])
def test_every_policy_learns(policy):
    model = TinyDLRM(seed=1)
    comm = GradientCommunicator(build_compressor("powersgd", rank=4, embedding=policy), model,
                                min_compress_numel=MIN_NUMEL)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, ids, y = _batch(7, n=1024)
    lossf = nn.BCEWithLogitsLoss()
    with torch.no_grad():
        l0 = float(lossf(model(x, ids), y))
    for _ in range(40):
        opt.zero_grad()
        lossf(model(x, ids), y).backward()
        comm.synchronize()
        opt.step()
    with torch.no_grad():
        l1 = float(lossf(model(x, ids), y))
    assert l1 < 0.8 * l0, (l0, l1)


def test_adaptive_rank_switching_keeps_the_policy():
    model = TinyDLRM()
    comm = GradientCommunicator(build_compressor("powersgd", rank=2), model, min_compress_numel=MIN_NUMEL,
                                adaptive={"interval": 2, "eta": 0.5})
    for s in range(6):
        _backward(model, s)
        st = comm.synchronize()
    assert comm.compressor.embedding == "topk" and comm.embedding_names == {"emb.table.weight"}
    assert st.n_compressed == 3
