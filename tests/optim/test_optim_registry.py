"""Registry (names, grouping rules, sparse routing, errors), schedules, LR scaling and clipping."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from optim import (LAMB, LARS, CombinedOptimizer, available_optimizers, build_optimizer, build_scheduler,
                   clip_grad_norm_, scale_lr)
from optim.registry import _construct

REQUIRED = ["sgd", "nesterov", "adagrad", "rmsprop", "adam", "adamw", "nadam", "radam", "amsgrad", "adafactor",
            "lbfgs", "lars", "lamb", "sophia", "shampoo", "ftrl", "ista", "fista"]


class Net(nn.Module):
    def __init__(self, sparse=False):
        super().__init__()
        self.emb = nn.Embedding(20, 4, sparse=sparse)
        self.bag = nn.EmbeddingBag(15, 4, mode="sum")
        self.lin = nn.Linear(8, 6)
        self.norm = nn.LayerNorm(6)
        self.bn = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 1)

    def forward(self, ids):
        h = torch.cat([self.emb(ids).mean(1), self.bag(ids % 15)], 1)
        return self.out(self.bn(self.norm(self.lin(h)))).sum()


def _ids():
    return torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 5, 9]])


def test_all_required_names_build_and_step():
    assert set(REQUIRED) <= set(available_optimizers())
    for name in REQUIRED:
        torch.manual_seed(0)
        model = Net()
        opt = build_optimizer(name, model, lr=0.01)
        before = [p.detach().clone() for p in model.parameters()]

        def closure():
            opt.zero_grad()
            loss = model(_ids())
            loss.backward()
            return loss

        opt.step(closure)
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), name
    assert any(n.startswith("po:") for n in available_optimizers(include_external=True))


def test_grouping_rules_for_lamb():
    model = Net()
    opt = build_optimizer("lamb", model, lr=1e-3, weight_decay=0.1, embedding_lr=0.05)
    groups = {g["group"]: g for g in opt.param_groups}
    assert set(groups) == {"decay", "embedding", "no_decay"}
    assert groups["decay"]["param_names"] == ["lin.weight", "out.weight"]
    assert set(groups["embedding"]["param_names"]) == {"emb.weight", "bag.weight"}
    assert groups["embedding"]["lr"] == 0.05 and groups["decay"]["lr"] == 1e-3
    nd = groups["no_decay"]
    assert set(nd["param_names"]) == {"lin.bias", "norm.weight", "norm.bias", "bn.weight", "bn.bias", "out.bias"}
    assert nd["weight_decay"] == 0.0 and nd["layer_adaptation"] is False
    assert groups["decay"]["weight_decay"] == 0.1 and groups["decay"]["layer_adaptation"] is True
    opt.zero_grad()
    Net.forward(model, _ids()).backward()
    opt.step()
    diag = opt.diagnostics()
    assert "trust_ratio/lin.weight" in diag and "trust_ratio/norm.weight" not in diag


def test_ftrl_and_prox_zero_their_l1_l2_for_biases():
    g = {x["group"]: x for x in build_optimizer("fista", Net(), lr=0.1, l1=0.5).param_groups}
    assert g["decay"]["l1"] == 0.5 and g["no_decay"]["l1"] == 0.0
    g = {x["group"]: x for x in build_optimizer("ftrl", Net(), lr=0.1, l1=0.5, l2=0.1).param_groups}
    assert g["no_decay"]["l1"] == 0.0 and g["no_decay"]["l2"] == 0.0


def test_torch_optimizers_default_to_fused_kernels_and_plain_params_pass_through():
    opt = build_optimizer("adamw", Net(), lr=1e-3)
    assert all(g["fused"] for g in opt.param_groups)
    lin = nn.Linear(3, 3)
    opt = build_optimizer("sgd", [{"params": [lin.weight], "lr": 0.5}, {"params": [lin.bias]}], lr=0.1, momentum=0.9)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.1]
    opt = build_optimizer("amsgrad", lin.parameters(), lr=0.1)
    assert opt.param_groups[0]["amsgrad"] is True
    opt = build_optimizer("nesterov", lin.parameters(), lr=0.1)
    assert opt.param_groups[0]["nesterov"] and opt.param_groups[0]["momentum"] == 0.9
    assert isinstance(build_optimizer("lars", lin.parameters(), lr=0.1), LARS)
    assert isinstance(build_optimizer("LAMB", lin.named_parameters()), LAMB)


@pytest.mark.parametrize("sparse_optimizer", ["sparse_adam", "adagrad", "ftrl"])
def test_sparse_embeddings_routed_to_sparse_optimizer(sparse_optimizer):
    torch.manual_seed(0)
    model = Net(sparse=True)
    opt = build_optimizer("lamb", model, lr=0.01, embedding_lr=0.1, sparse_optimizer=sparse_optimizer)
    assert isinstance(opt, CombinedOptimizer) and isinstance(opt, torch.optim.Optimizer)
    routes = {g["group"]: g["route"] for g in opt.param_groups}
    assert routes["sparse_embedding"] == sparse_optimizer and routes["decay"] == "lamb"
    sparse_group = next(g for g in opt.param_groups if g["group"] == "sparse_embedding")
    assert sparse_group["lr"] == 0.1 and sparse_group["param_names"] == ["emb.weight"]
    emb0 = model.emb.weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        model(_ids()).backward()
        assert model.emb.weight.grad.is_sparse
        opt.step()
    assert not torch.equal(model.emb.weight, emb0)
    assert torch.equal(model.emb.weight[10:], emb0[10:])  # untouched rows (ids < 10)
    # state_dict round trip through bytes resumes identically; LR changes reach the inner optimizers
    buf = io.BytesIO()
    torch.save({"m": model.state_dict(), "o": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    model2 = Net(sparse=True)
    model2.load_state_dict(saved["m"])
    opt2 = build_optimizer("lamb", model2, lr=0.01, embedding_lr=0.1, sparse_optimizer=sparse_optimizer)
    opt2.load_state_dict(saved["o"])
    sched = build_scheduler(opt2, "step", step_size=1, gamma=0.5)
    sched_ref = build_scheduler(opt, "step", step_size=1, gamma=0.5)
    for m, o, s in ((model, opt, sched_ref), (model2, opt2, sched)):
        for _ in range(2):
            o.zero_grad()
            m(_ids()).backward()
            o.step()
            s.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert opt2.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0025)
    # rebuild from param_groups alone (what hvd.DistributedOptimizer does)
    clone = CombinedOptimizer(opt2.param_groups)
    assert [type(o).__name__ for o in clone.optimizers] == [type(o).__name__ for o in opt2.optimizers]


@pytest.mark.parametrize("name, hp", [("ftrl", {"l1": 0.05, "l2": 0.1, "beta": 0.5}),
                                      ("adagrad", {"initial_accumulator_value": 1.0, "eps": 1e-3})])
def test_sparse_tables_routed_to_the_same_rule_take_its_hyperparameters(name, hp):
    """A sparse=True table routed to the model's own optimizer (what training does for
    ftrl/adagrad) trains exactly as the dense table does: with the user's l1/l2/beta, eps...
    Until the twenty-fifth session the route got that optimizer's defaults (FTRL without L1
    or L2: no table weight was ever zeroed), so a sparse and a dense run differed by up to 0.4."""
    tables = []
    for sparse in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.EmbeddingBag(200, 4, mode="sum", sparse=sparse), nn.Linear(4, 1))
        nn.init.zeros_(model[0].weight)  # FTRL's L1 keeps a weight at 0 until its |z| passes l1
        opt = build_optimizer(name, model, lr=0.1, sparse_optimizer=name, **hp)
        if sparse:
            (g,) = [g for g in opt.param_groups if g["group"] == "sparse_embedding"]
            assert g["route"] == name and {k: g[k] for k in hp} == hp
        gen = torch.Generator().manual_seed(1)
        for _ in range(30):
            opt.zero_grad()
            ids, y = torch.randint(0, 200, (16, 3), generator=gen), torch.randint(0, 2, (16, 1), generator=gen)
            nn.functional.binary_cross_entropy_with_logits(model(ids), y.float()).backward()
            opt.step()
        tables.append(model[0].weight.detach().clone())
    torch.testing.assert_close(tables[1], tables[0], rtol=1e-5, atol=1e-6)
    if name == "ftrl":
        zeros = tables[0] == 0  # L1 holds most at 0 (without it: only a row never seen, 4 weights)
        assert zeros.sum() > 400 and torch.equal(tables[1] == 0, zeros)


@pytest.mark.parametrize("name, sparse_optimizer", [("ftrl", "ftrl"), ("ftrl", None), ("adam", None),
                                                     ("sgd", "adagrad")])
def test_model_with_only_sparse_embeddings_gets_the_sparse_route_alone(name, sparse_optimizer):
    """A hashed-feature logistic regression (one sparse=True EmbeddingBag) has no dense parameters:
    the result is a CombinedOptimizer with only the sparse route (it was "empty parameter list"),
    whose step equals the sparse optimizer's, and state_dict, schedulers and the rebuild still work."""
    kw = {"sparse_optimizer": sparse_optimizer} if sparse_optimizer else {}
    route = sparse_optimizer or "sparse_adam"

    def make():
        torch.manual_seed(0)
        return nn.EmbeddingBag(50, 1, mode="sum", sparse=True)

    def train(model, opt, sched, steps):
        gen = torch.Generator().manual_seed(steps)
        for _ in range(steps):
            opt.zero_grad()
            ids = torch.randint(0, 40, (8, 3), generator=gen)  # rows 40.. never touched
            torch.sigmoid(model(ids)).sum().backward()
            opt.step()
            sched.step()

    model = make()
    opt = build_optimizer(name, model, lr=0.1, **kw)
    assert isinstance(opt, CombinedOptimizer) and opt.routes == [route]
    assert [g["group"] for g in opt.param_groups] == ["sparse_embedding"] and opt.param_groups[0]["lr"] == 0.1
    ref_model = make()
    ref = _construct(route, [ref_model.weight], lr=0.1)  # as the route builds it (build_optimizer would fuse adagrad)
    w0 = model.weight.detach().clone()
    train(model, opt, build_scheduler(opt, "step", step_size=1, gamma=0.5), 3)
    train(ref_model, ref, build_scheduler(ref, "step", step_size=1, gamma=0.5), 3)
    assert torch.equal(model.weight, ref_model.weight) and not torch.equal(model.weight, w0)
    assert torch.equal(model.weight[40:], w0[40:])
    buf = io.BytesIO()
    torch.save({"m": model.state_dict(), "o": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    model2 = make()
    model2.load_state_dict(saved["m"])
    opt2 = build_optimizer(name, model2, lr=0.1, **kw)
    opt2.load_state_dict(saved["o"])
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.0125)
    train(model, opt, build_scheduler(opt, "constant"), 2)
    train(model2, opt2, build_scheduler(opt2, "constant"), 2)
    assert torch.equal(model.weight, model2.weight)
    assert CombinedOptimizer(opt2.param_groups).routes == [route]
    with pytest.raises(ValueError, match="unknown hyperparameter"):  # the dense hp are still checked
        build_optimizer(name, make(), lr=0.1, lrr=0.1, **kw)


def test_errors_list_valid_options():
    with pytest.raises(ValueError, match="valid names: sgd, nesterov"):
        build_optimizer("adamx", Net())
    with pytest.raises(ValueError, match=r"unknown hyperparameter.*'lrr'.*valid: lr, betas"):
        build_optimizer("adam", Net(), lrr=0.1)
    with pytest.raises(ValueError, match="bad hyperparameters for optimizer 'adam'.*valid hyperparameters"):
        build_optimizer("adam", Net(), lr=-1.0)
    with pytest.raises(ValueError, match=r"betas\[0\]"):
        build_optimizer("lamb", Net(), betas=(1.5, 0.9))
    # too-short tuples: torch (and the trust_clip unpacking here) index them, an IndexError
    for name, hp in (("adam", {"betas": (0.9,)}), ("adamw", {"betas": ()}), ("nadam", {"betas": (0.9,)}),
                     ("lars", {"trust_clip": (1.0,)}), ("lamb", {"trust_clip": (1.0,)})):
        with pytest.raises(ValueError, match=f"bad hyperparameters for optimizer '{name}'.*valid hyperparameters"):
            build_optimizer(name, nn.Linear(2, 2), **hp)
    with pytest.raises(ValueError, match="graft"):
        build_optimizer("shampoo", Net(), graft="kfac")
    with pytest.raises(ValueError, match="sparse_optimizer"):
        build_optimizer("adam", Net(sparse=True), sparse_optimizer="lamb")
    with pytest.raises(ValueError, match="num_components"):
        build_optimizer("saga", Net())
    with pytest.raises(ValueError, match="single dense param group"):
        build_optimizer("lbfgs", Net(sparse=True))
    with pytest.raises(ValueError, match="unknown schedule"):
        build_scheduler(build_optimizer("adam", Net()), "cosinus", total_steps=10)
    with pytest.raises(ValueError, match="total_steps"):
        build_scheduler(build_optimizer("adam", Net()), "cosine", warmup_steps=10, total_steps=5)


def test_po_names_are_exposed():
    lin = nn.Linear(3, 3)
    opt = build_optimizer("po:adan", lin.parameters(), lr=1e-3)
    assert type(opt).__name__ == "Adan"


def _lrs(name, steps, **kw):
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(opt, name, **kw)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedules_match_closed_forms():
    w, total = 4, 20
    got = _lrs("cosine", total, warmup_steps=w, total_steps=total, min_lr=0.1)
    want = [(t + 1) / w for t in range(w)] + [0.1 + 0.9 * (1 + math.cos(math.pi * s / (total - w))) / 2
                                            for s in range(total - w)]
    assert got == pytest.approx(want)
    got = _lrs("poly", total, warmup_steps=w, total_steps=total, power=2.0)
    want = [(t + 1) / w for t in range(w)] + [(1 - s / (total - w)) ** 2 for s in range(total - w)]
    assert got == pytest.approx(want)
    got = _lrs("step", 10, step_size=3, gamma=0.5)
    assert got == pytest.approx([0.5 ** (t // 3) for t in range(10)])
    got = _lrs("multistep", 10, warmup_steps=2, milestones=[3, 5], gamma=0.1)
    assert got == pytest.approx([0.5, 1.0, 1, 1, 1, 0.1, 0.1, 0.01, 0.01, 0.01])
    got = _lrs("constant", 6, warmup_steps=3)
    assert got == pytest.approx([1 / 3, 2 / 3, 1, 1, 1, 1])


_DECAYS = {  # docstring closed forms after warmup: s = t - W, T = total_steps - W
    "constant": ({}, lambda s, T: 1.0),
    "cosine": ({"min_lr": 0.1}, lambda s, T: 0.1 + 0.9 * (1 + math.cos(math.pi * s / T)) / 2),
    "step": ({"step_size": 3, "gamma": 0.5}, lambda s, T: 0.5 ** (s // 3)),
    "multistep": ({"milestones": [2, 5], "gamma": 0.5}, lambda s, T: 0.5 ** sum(m <= s for m in (2, 5))),
    "poly": ({"power": 2.0}, lambda s, T: (1 - min(s, T) / T) ** 2),
    "linear": ({}, lambda s, T: 1 - min(s, T) / T),
    "exponential": ({"gamma": 0.8}, lambda s, T: 0.8**s),
}
_ENDS = {"constant": 1.0, "cosine": 0.1, "poly": 0.0, "linear": 0.0}


@pytest.mark.parametrize("name", sorted(_DECAYS))
@pytest.mark.parametrize("w, start", [(0, None), (1, None), (1, 0.25), (2, None), (2, 0.25)])
def test_every_schedule_follows_its_closed_form_for_small_warmups(name, w, start):
    """W = 1 is a one-step warmup like W >= 2 (lr * start at t = 0), and the decay starts at t = W and
    spans T = total_steps - W: the decaying schedules reach their end value at t = total_steps, not
    one step early (W = 1 used to start the decay at t = 0 over T = total_steps - 1)."""
    hp, decay = _DECAYS[name]
    total = 10
    got = _lrs(name, total + 1, warmup_steps=w, total_steps=total, warmup_start_factor=start, **hp)
    first = (1.0 / w if start is None else start) if w else None
    warm = [first + (1 - first) * t / (w - 1) if w > 1 else first for t in range(w)]
    want = warm + [decay(t - w, total - w) for t in range(w, total + 1)]
    assert got == pytest.approx(want, abs=1e-12)
    if name in _ENDS:
        assert got[-1] == pytest.approx(_ENDS[name], abs=1e-12)
        assert min(got[:-1]) > got[-1] or name == "constant"


def _group_lrs(opt, sched, steps):
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


def _two_groups():
    """SGD with lr 1.0 and a second group (an embedding_lr) at 0.01."""
    return torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))]},
                            {"params": [nn.Parameter(torch.zeros(1))], "lr": 0.01}], lr=1.0)


def test_cosine_floor_is_each_groups_own():
    """The cosine schedule scales every param group alike: each decays to its own initial LR times
    the floor ratio. CosineAnnealingLR's one absolute eta_min drew a group below it (an
    embedding_lr) up to it: 0.01 rose to 0.1 over the run."""
    w, total = 2, 12
    for hp in ({"min_lr_ratio": 0.1}, {"min_lr": 0.1}, {"min_lr": 0.01, "base_lr": 0.1}):
        opt = _two_groups()
        got = _group_lrs(opt, build_scheduler(opt, "cosine", warmup_steps=w, total_steps=total, **hp), total + 1)
        factor = [(t + 1) / w for t in range(w)] + [0.1 + 0.9 * (1 + math.cos(math.pi * s / (total - w))) / 2
                                                  for s in range(total - w + 1)]
        assert sum(got, []) == pytest.approx([x for f in factor for x in (f, 0.01 * f)], abs=1e-15), hp
        assert got[-1] == pytest.approx([0.1, 0.001])
    # past its end the schedule stays at the floor (CosineAnnealingLR climbed back up)
    opt = _two_groups()
    assert sum(_group_lrs(opt, build_scheduler(opt, "cosine", total_steps=4, min_lr_ratio=0.5), 8)[4:], []) == \
        pytest.approx([0.5, 0.005] * 4)
    for hp, said in [({"min_lr": -0.5}, "min_lr must be a number >= 0"), ({"min_lr": 2.0}, "at most the base LR"),
                     ({"min_lr_ratio": 1.5}, r"min_lr_ratio must be a number in \[0, 1\]"),
                     ({"min_lr": float("nan")}, "min_lr must be"), ({"min_lr": "0.1"}, "min_lr must be"),
                     ({"min_lr": 0.1, "min_lr_ratio": 0.1}, "not both")]:
        with pytest.raises(ValueError, match=said):
            build_scheduler(_two_groups(), "cosine", total_steps=10, **hp)


def test_a_cosine_annealing_state_resumes_on_the_closed_form():
    """Checkpoints from before hold a SequentialLR(LinearLR, CosineAnnealingLR) state: it loads,
    and the run goes on along the same schedule."""
    from torch.optim import lr_scheduler

    w, total, done = 2, 12, 5
    old_opt = _two_groups()
    warm = lr_scheduler.LinearLR(old_opt, start_factor=0.5, end_factor=1.0, total_iters=w - 1)
    cos = lr_scheduler.CosineAnnealingLR(old_opt, T_max=total - w, eta_min=0.0)
    old = lr_scheduler.SequentialLR(old_opt, schedulers=[warm, cos], milestones=[w])
    before = _group_lrs(old_opt, old, done)
    opt = _two_groups()
    sched = build_scheduler(opt, "cosine", warmup_steps=w, total_steps=total)
    sched.load_state_dict(old.state_dict())
    for g, lr in zip(opt.param_groups, sched.get_last_lr()):
        g["lr"] = lr
    ref_opt = _two_groups()
    ref = _group_lrs(ref_opt, build_scheduler(ref_opt, "cosine", warmup_steps=w, total_steps=total), total + 1)
    assert sum(before + _group_lrs(opt, sched, total + 1 - done), []) == pytest.approx(sum(ref, []), abs=1e-12)


def test_scale_lr_rules():
    assert scale_lr(0.1, 8192, 256) == pytest.approx(3.2)  # Goyal et al.: linear
    assert scale_lr(1e-3, 1024, 256, rule="sqrt") == pytest.approx(2e-3)
    assert scale_lr(1e-3, 1024, 256, rule="none") == 1e-3
    with pytest.raises(ValueError):
        scale_lr(0.1, 0, 256)
    with pytest.raises(ValueError, match="linear, sqrt"):
        scale_lr(0.1, 512, 256, rule="cube")


def test_clip_grad_norm_dense_and_sparse():
    model = Net(sparse=True)
    model(_ids()).backward()
    params = list(model.parameters())
    grads = [p.grad.to_dense() if p.grad.is_sparse else p.grad for p in params if p.grad is not None]
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    total = clip_grad_norm_(params, max_norm=0.01)
    assert float(total) == pytest.approx(float(norm), rel=1e-5)
    grads = [p.grad.to_dense() if p.grad.is_sparse else p.grad for p in params if p.grad is not None]
    assert float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads))) == pytest.approx(0.01, rel=1e-4)
    dense = Net()
    ref = copy.deepcopy(dense)
    dense(_ids()).backward()
    ref(_ids()).backward()
    t1 = clip_grad_norm_(dense.parameters(), 0.5)
    t2 = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    assert float(t1) == pytest.approx(float(t2)) and float(t1) > 0
    for a, b in zip(dense.parameters(), ref.parameters()):
        assert torch.allclose(a.grad, b.grad)


def test_sparse_sgd_route_refuses_momentum():
    """torch's sparse momentum buffer concatenates every step's rows (unbounded growth)."""
    with pytest.raises(ValueError, match="momentum"):
        build_optimizer("adam", Net(sparse=True), lr=0.01, sparse_optimizer="sgd", sparse_hp={"momentum": 0.9})
    opt = build_optimizer("adam", Net(sparse=True), lr=0.01, sparse_optimizer="sgd")
    assert opt.routes == ["adam", "sgd"]


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("option, value", [("embedding_lr", -0.1), ("embedding_lr", float("nan")),
                                           ("embedding_lr", "0.1"), ("embedding_weight_decay", -1e-4)])
def test_per_group_overrides_are_validated(option, value, sparse):
    """embedding_lr / embedding_weight_decay go into their groups as given, where torch checks
    nothing (it validates the constructor's defaults): a negative embedding_lr trained the
    embeddings by gradient ascent, where a negative lr is refused."""
    with pytest.raises(ValueError, match=f"invalid {option}=.*a finite number >= 0"):
        build_optimizer("adagrad" if sparse else "adam", Net(sparse=sparse), lr=0.1, **{option: value})
    opt = build_optimizer("adam", Net(sparse=sparse), lr=0.1, **{option: 0.0})  # 0 (frozen, no decay) is valid
    assert {g["group"] for g in opt.param_groups} >= {"decay", "no_decay"}


def test_po_hyperparameters_are_checked_against_what_the_class_reads():
    """Most pytorch_optimizer classes declare **kwargs: a misspelt key was taken silently (Adan
    put it into its group defaults, where no step reads it). Keys the class really takes through
    **kwargs stay valid: group flags its step reads (Adan's adanorm), keys its __init__ reads
    (schedule-free's use_palm), the hyperparameters of the optimizer it builds (Magma: AdamW)."""
    lin = nn.Linear(3, 3)
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) 'betaz' for optimizer 'po:adan'; "
                                         r"valid: lr, betas, .*adanorm"):
        build_optimizer("po:adan", lin, lr=1e-3, betaz=(0.1, 0.1, 0.1))
    opt = build_optimizer("po:adan", lin, lr=1e-3, adanorm=True)
    assert all(g["adanorm"] is True for g in opt.param_groups)
    assert build_optimizer("po:schedulefreeadamw", lin, lr=1e-3, use_palm=True).param_groups[0]["use_palm"] is True
    assert build_optimizer("po:magma", lin, lr=1e-3, betas=(0.8, 0.9)).optimizer.param_groups[0]["betas"] == (0.8, 0.9)
    with pytest.raises(ValueError, match="unknown hyperparameter.*'betaz' for optimizer 'po:magma'"):
        build_optimizer("po:magma", lin, lr=1e-3, betaz=(0.8, 0.9))
    # AliG has no lr (it sets its own step size): said, not a bare "'lr'" KeyError later
    with pytest.raises(ValueError, match="'lr' for optimizer 'po:alig' \\(it takes no learning rate"):
        build_optimizer("po:alig", lin, lr=1e-3)


@pytest.mark.parametrize("name", ["po:lomo", "po:adalomo", "po:adammini"])
def test_po_optimizers_built_on_the_model_are_refused_by_name(name):
    """LOMO/AdaLOMO/AdamMini take the model itself: the registry handed them parameter groups and
    they failed with "'list' object has no attribute 'named_parameters'"."""
    with pytest.raises(ValueError, match=f"optimizer '{name}' is built on the model itself"):
        build_optimizer(name, Net(), lr=1e-3)


def test_po_missing_optional_package_is_a_value_error(monkeypatch):
    """po:demo needs einops: its ImportError (a traceback past every settings check) is a ValueError."""
    import pytorch_optimizer

    class NeedsAPackage(torch.optim.SGD):
        __module__ = "pytorch_optimizer.optimizer.test_stub"

        def __init__(self, params, lr=1e-3):
            raise ImportError("You need to install `einops` to use `TransformDCT`")

    monkeypatch.setattr(pytorch_optimizer, "load_optimizer", lambda name: NeedsAPackage)
    with pytest.raises(ValueError, match="optimizer 'po:demo' needs a package that is not installed: You need to "
                                         "install `einops`"):
        build_optimizer("po:demo", Net(), lr=1e-3)
