"""GradientCommunicator: compressed gradient averaging for Horovod (or a single process).

Per ``synchronize()`` call (after ``loss.backward()``, before clipping / ``optimizer.step()``):

1. classify each parameter's gradient:
   * *sparse* (torch sparse COO, e.g. ``nn.Embedding(sparse=True)``): coalesced and sent
     exactly as (indices, values) with two allgathers - ranks touch different rows and
     different numbers of rows, which an allgather allows and an allreduce does not; the
     result stays sparse (sum of all ranks' rows / world size, coalesced). Not compressed,
     no error feedback. ``sparse_as_dense=True`` densifies them instead (then they are
     compressed like any other gradient).
   * *dense-exact*: the ``none`` compressor, warm-up steps, layers with fewer than
     ``min_compress_numel`` elements (for compressors with per-tensor overhead), and
     matrices PowerSGD would not shrink: flattened per dtype into one buffer each and
     averaged with one allreduce (launched first so it overlaps the compression work).
   * *compressed*: everything else.
   With PowerSGD, dense gradients of embedding tables follow its ``embedding`` policy
   (:mod:`optim.compression.powersgd`): ``topk`` compresses them with a top-k compressor in
   the same step (one allgather, overlapping the PowerSGD rounds), ``sparse`` sends their
   non-zero rows exactly like sparse gradients and writes the result back dense,
   ``powersgd`` leaves them to PowerSGD.
2. compress (error feedback: compress g + e, keep e = (g + e) - decompress(local payload)),
   fuse the payloads - all allreduce-compatible payloads into one buffer per dtype, all
   allgather payloads of all parameters into a single uint8 buffer - and launch the
   asynchronous collectives; PowerSGD runs its two allreduce rounds (P summed, Q averaged).
3. decompress / aggregate and write the cross-rank average back into ``p.grad`` in place.
   Every rank decodes the same gathered bytes in the same order, so the result is bitwise
   identical on all ranks.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Callable, Iterable

import torch

from .accounting import CommStats, CommTotals
from .adaptive import AccordionController, build_adaptive
from .backends import AVERAGE, SUM, Backend, make_backend
from .base import Collective, Compressor, ResidualMemory, build_compressor
from .embeddings import resolve_embedding_names
from .powersgd import PowerSGDCompressor

__all__ = ["GradientCommunicator"]

_HALF = (torch.float16, torch.bfloat16)


class _Timer:
    def __init__(self) -> None:
        self.t = {"compress": 0.0, "communicate": 0.0, "decompress": 0.0}
        self._k: str | None = None
        self._t0 = 0.0

    def __call__(self, key: str) -> "_Timer":
        self._k = key
        return self

    def __enter__(self):
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.t[self._k] += time.perf_counter() - self._t0


class _Pending:
    """A launched collective; ``wait()`` returns the finished (post-processed) result."""

    def __init__(self, backend: Backend, handle: Any, finish: Callable[[torch.Tensor], Any]):
        self.backend, self.handle, self.finish = backend, handle, finish

    def wait(self):
        return self.finish(self.backend.synchronize(self.handle))


def _nonzero_rows(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row ids as an (nnz, 1) int64 column, those rows) of a dense gradient: the same layout as a
    coalesced sparse gradient's ``indices().t()`` / ``values()``, without ``to_sparse`` (100x slower)."""
    idx = (g.reshape(g.shape[0], -1) != 0).any(1).nonzero()
    return idx, g.index_select(0, idx[:, 0])


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1).contiguous()
    return t if t.dtype == torch.uint8 else t.view(torch.uint8)


def _from_bytes(b: torch.Tensor, dtype: torch.dtype, shape) -> torch.Tensor:
    b = b.clone()  # contiguous, storage offset 0: safe to reinterpret
    return (b if dtype == torch.uint8 else b.view(dtype)).reshape(shape)


class GradientCommunicator:
    """Replace every ``p.grad`` with the cross-rank average of the decompressed gradients.

    Args:
        compressor: a :class:`Compressor`, or a name / config dict for :func:`build_compressor`.
        named_parameters: iterable of (name, parameter), or the model itself; parameters with
            ``requires_grad=False`` are skipped, shared parameters counted once.
        backend: None (single process) or the ``horovod.torch`` module (``hvd.init()`` done)
            or a :class:`Backend`.
        min_compress_numel: gradients with fewer elements are sent uncompressed (ignored by
            the fp16/bf16 casts, which have no per-tensor overhead).
        adaptive: None, True, a dict of :class:`AccordionController` options, or a controller.
        sparse_as_dense: densify sparse gradients instead of allgathering their rows.
        embedding_names: which parameters are embedding tables, for PowerSGD's ``embedding``
            policy: None (the ``nn.Embedding`` weights when a model is passed, else a name
            rule), a regex, a predicate ``(name, param) -> bool`` or a collection of names
            (:func:`optim.compression.embeddings.resolve_embedding_names`).
    """

    def __init__(
        self,
        compressor: Compressor | str | dict,
        named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
        backend: Any = None,
        min_compress_numel: int = 1024,
        adaptive: Any = None,
        *,
        sparse_as_dense: bool = False,
        name: str = "gradcomm",
        embedding_names: Any = None,
    ) -> None:
        if not isinstance(compressor, Compressor):
            compressor = build_compressor(compressor)
        module = named_parameters if isinstance(named_parameters, torch.nn.Module) else None
        if module is not None:
            named_parameters = module.named_parameters()
        if isinstance(min_compress_numel, bool) or not isinstance(min_compress_numel, int) or min_compress_numel < 0:
            raise ValueError(f"min_compress_numel must be an int >= 0, got {min_compress_numel!r}")
        params: list[tuple[str, torch.nn.Parameter]] = []
        seen: set[int] = set()
        for n, p in named_parameters:
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            params.append((n, p))
        if not params:
            raise ValueError("GradientCommunicator: no parameters that require grad")
        names = [n for n, _ in params]
        if len(set(names)) != len(names):
            raise ValueError("GradientCommunicator: parameter names must be unique")
        self.compressor = compressor
        self.params = params
        self.backend = make_backend(backend)
        self.world_size = int(self.backend.size)
        self.rank = int(self.backend.rank)
        compressor.set_rank(self.rank, self.world_size)
        self.min_compress_numel = min_compress_numel
        self.sparse_as_dense = bool(sparse_as_dense)
        self.name = name
        self.memory = ResidualMemory()
        self.adaptive: AccordionController | None = build_adaptive(adaptive, compressor)
        self.step = 0
        self.last_stats: CommStats | None = None
        self._totals = CommTotals()
        self._sparse: dict[str, int] = {}  # name -> sparse_dim, for zero-filling missing grads
        # PowerSGD's embedding policy: tables compressed by top-k, or sent as exact rows
        self.embedding_names: set[str] = set()
        self.embedding_compressor: Compressor | None = None
        policy = getattr(compressor, "embedding", None) if isinstance(compressor, PowerSGDCompressor) else None
        if policy in ("topk", "sparse"):
            self.embedding_names = resolve_embedding_names(params, embedding_names, module)
        if policy == "topk":
            self.embedding_compressor = build_compressor("topk", ratio=compressor.embedding_ratio)
            self.embedding_compressor.set_rank(self.rank, self.world_size)
        self._rows_policy = policy == "sparse"

    # ------------------------------------------------------------------------------------
    # collectives (all go through here so the byte accounting is exact)
    # ------------------------------------------------------------------------------------
    def _account(self, st: CommStats, kind: str, nbytes: int) -> None:
        n = self.world_size
        st.bytes_sent += nbytes
        st.n_collectives += 1
        st.by_collective[kind] = st.by_collective.get(kind, 0) + nbytes
        st.wire_bytes += nbytes * (2.0 * (n - 1) / n if kind == "allreduce" else (n - 1))

    def _allreduce(self, st: CommStats, flat: torch.Tensor, op: str, tag: str) -> _Pending:
        flat = flat.contiguous()
        be = self.backend
        if be.supports_allreduce(flat.dtype):
            self._account(st, "allreduce", flat.nbytes)
            if op == AVERAGE and flat.dtype in _HALF and self.world_size > 1:
                # divide, then sum (torch's fp16 hook's order): Horovod's average sums first, so
                # a half-precision sum of N entries each below 65,504 overflowed to inf above
                # 65,504 / N (until the twenty-sixth session)
                flat, op = flat / self.world_size, SUM
            return _Pending(be, be.allreduce_async(flat, op, f"{self.name}.{tag}"), lambda out: out)
        # e.g. bfloat16 on Horovod 0.28: gather the raw bits, reduce locally in fp32
        world, dtype, numel = self.world_size, flat.dtype, flat.numel()
        wire = flat.view(torch.int16) if flat.element_size() == 2 and be.supports_allgather(torch.int16) else _as_bytes(flat)
        self._account(st, "allgather", flat.nbytes)

        def finish(out: torch.Tensor) -> torch.Tensor:
            rows = out.reshape(world, -1).contiguous()
            rows = rows.view(dtype) if rows.dtype != dtype else rows
            red = rows.reshape(world, numel).to(torch.float32).sum(0)
            return (red / world if op == AVERAGE else red).to(dtype)

        return _Pending(be, be.allgather_async(wire, f"{self.name}.{tag}"), finish)

    def _allgather(self, st: CommStats, t: torch.Tensor, tag: str) -> _Pending:
        t = t.contiguous()
        be = self.backend
        dtype = t.dtype
        self._account(st, "allgather", t.nbytes)
        if be.supports_allgather(dtype):
            return _Pending(be, be.allgather_async(t, f"{self.name}.{tag}"), lambda out: out)
        shape_tail = t.shape[1:]
        wire = t.view(torch.int16) if t.element_size() == 2 else _as_bytes(t)

        def finish(out: torch.Tensor) -> torch.Tensor:
            return out.contiguous().view(dtype).reshape(-1, *shape_tail)

        return _Pending(be, be.allgather_async(wire, f"{self.name}.{tag}"), finish)

    def _allreduce_many(self, st, tensors: list[torch.Tensor], op: str, tag: str):
        """Fuse tensors into one flat buffer per dtype and launch one allreduce each.
        Returns a function that waits and gives back the reduced tensors in input order."""
        groups: dict[torch.dtype, list[int]] = defaultdict(list)
        for i, t in enumerate(tensors):
            groups[t.dtype].append(i)
        pending = []
        for dt, idxs in groups.items():
            flat = torch.cat([tensors[i].reshape(-1) for i in idxs]) if len(idxs) > 1 else tensors[idxs[0]].reshape(-1)
            pending.append((idxs, self._allreduce(st, flat, op, f"{tag}.{str(dt).split('.')[-1]}")))

        def wait() -> list[torch.Tensor]:
            out: list[torch.Tensor | None] = [None] * len(tensors)
            for idxs, pend in pending:
                flat = pend.wait()
                off = 0
                for i in idxs:
                    n = tensors[i].numel()
                    out[i] = flat[off : off + n].view(tensors[i].shape)
                    off += n
            return out  # type: ignore[return-value]

        return wait

    # ------------------------------------------------------------------------------------
    def _classify(self):
        """-> dense-exact, sparse, rows (dense tables sent as rows), compressed, and tables
        compressed by the embedding compressor."""
        comp, warm = self.compressor, self.step < self.compressor.warmup_steps
        dense, sparse, rows, compressed, emb = [], [], [], [], []
        for name, p in self.params:
            g = p.grad
            if g is None:  # keep collectives aligned across ranks (as hvd.DistributedOptimizer)
                if name in self._sparse:
                    sd = self._sparse[name]
                    g = torch.sparse_coo_tensor(
                        torch.zeros(sd, 0, dtype=torch.int64, device=p.device),
                        torch.zeros(0, *p.shape[sd:], dtype=p.dtype, device=p.device), p.shape,
                        check_invariants=False)
                else:
                    g = torch.zeros_like(p, memory_format=torch.contiguous_format)
                p.grad = g
            if g.numel() == 0:  # nothing to compress (top-k cannot pick from none)
                dense.append((name, p))
                continue
            if g.is_sparse:
                if self.sparse_as_dense:
                    g = g.to_dense()
                    p.grad = g
                else:
                    self._sparse[name] = g.sparse_dim()
                    sparse.append((name, p))
                    continue
            if name in self.embedding_names:
                if self._rows_policy:  # exact, so also during warm-up
                    rows.append((name, p))
                    continue
                if not warm and g.numel() >= self.min_compress_numel:
                    emb.append((name, p))
                    continue
            if (
                warm
                or comp.lossless
                or (comp.respects_threshold and g.numel() < self.min_compress_numel)
                or (isinstance(comp, PowerSGDCompressor) and not comp.should_compress(g.shape))
            ):
                dense.append((name, p))
            else:
                compressed.append((name, p))
        return dense, sparse, rows, compressed, emb

    def synchronize(self) -> CommStats:
        """Average all gradients across ranks through the compressor; returns this step's stats."""
        comp, world = self.compressor, self.world_size
        st = CommStats(step=self.step)
        tm = _Timer()
        if self.adaptive is not None:
            st.critical, st.level = self.adaptive.critical, self.adaptive.level
        with torch.no_grad():
            dense, sparse, rows, compressed, emb = self._classify()
            st.n_uncompressed, st.n_sparse, st.n_compressed = len(dense), len(sparse) + len(rows), len(compressed) + len(emb)
            interval_metric = None
            if self.adaptive is not None:  # local, uncompressed gradients (before EF / compression)
                interval_metric = self.adaptive.observe([p.grad for _, p in dense + compressed + emb])
            for _, p in dense + compressed + emb + rows:
                st.dense_bytes += p.grad.numel() * p.grad.element_size()
            for name, p in dense:  # sent exactly this step (warm-up, an adaptive switch to a rank the
                # matrix is too small for): its residual goes with it, not held back until it is
                # compressed again (until the twenty-sixth session, maybe hundreds of steps later)
                if (r := self.memory.pop(name)) is not None:
                    p.grad.add_(r.to(p.grad.dtype))

            # 1. dense-exact gradients and sparse rows: launch first, they need (almost) no compute
            with tm("compress"):  # dense tables sent as rows: their non-zero rows only
                as_rows = {name: _nonzero_rows(p.grad) for name, p in rows}
            with tm("communicate"):
                wait_dense = self._allreduce_many(st, [p.grad for _, p in dense], AVERAGE, "dense") if dense else None
                sparse_pending = []
                for name, p in sparse + rows:
                    if name in as_rows:
                        idx, vals = as_rows[name]
                    else:
                        g = p.grad.coalesce()
                        idx, vals = g.indices().t().contiguous(), g.values().contiguous()
                    before = st.bytes_sent
                    sparse_pending.append((p, p.grad.shape, self._allgather(st, idx, f"sparse.{name}.i"),
                                           self._allgather(st, vals, f"sparse.{name}.v")))
                    if p.grad.is_sparse:
                        st.dense_bytes += st.bytes_sent - before  # the dense baseline sends the same rows

            # 2. compressed gradients (the tables' allgather first: it overlaps the PowerSGD rounds)
            finish_emb = self._launch_one_round(st, tm, emb, self.embedding_compressor) if emb else None
            if compressed:
                if comp.collective is Collective.ALLREDUCE_2PHASE:
                    self._powersgd(st, tm, compressed)
                else:
                    self._launch_one_round(st, tm, compressed, comp)()
            if finish_emb is not None:
                finish_emb()

            # 3. finish the dense / sparse collectives
            if wait_dense is not None:
                with tm("communicate"):
                    reduced = wait_dense()
                with tm("decompress"):
                    for (_, p), r in zip(dense, reduced):
                        p.grad.copy_(r)
            for p, shape, pi, pv in sparse_pending:
                with tm("communicate"):
                    idx, vals = pi.wait(), pv.wait()
                with tm("decompress"):
                    if p.grad.is_sparse:
                        p.grad = torch.sparse_coo_tensor(idx.t(), vals / world, shape, check_invariants=False).coalesce()
                    else:  # a dense table sent as rows: the average, dense again
                        p.grad.zero_().index_add_(0, idx[:, 0], vals).div_(world)

            if interval_metric is not None:  # all ranks switch together: payload sizes change
                self.adaptive.update(self._mean_scalar(st, interval_metric, tm))

        st.t_compress, st.t_communicate, st.t_decompress = tm.t["compress"], tm.t["communicate"], tm.t["decompress"]
        self.step += 1
        self._totals.add(st)
        self.last_stats = st
        return st

    def _mean_scalar(self, st: CommStats, value: float, tm: _Timer) -> float:
        """Average a float over ranks (float64 allreduce; identical result on every rank)."""
        if self.world_size == 1:
            return value
        with tm("communicate"):
            t = torch.tensor([value], dtype=torch.float64)
            return float(self._allreduce(st, t, AVERAGE, "adaptive").wait().item())

    # ------------------------------------------------------------------------------------
    def _compress_one(self, name: str, g: torch.Tensor, comp: Compressor):
        x = self.memory.compensate(name, g) if comp.error_feedback else g
        payload, ctx = comp.compress(x, name)
        if comp.error_feedback:
            self.memory.store(name, x - comp.decompress(payload, ctx))
        return payload, ctx

    def _launch_one_round(self, st: CommStats, tm: _Timer, compressed, comp: Compressor) -> Callable[[], None]:
        """Compress ``compressed`` with ``comp`` and launch its collective; returns the function
        that waits, decodes and writes the averaged gradients."""
        world = self.world_size
        with tm("compress"):
            enc = [self._compress_one(name, p.grad, comp) for name, p in compressed]
        use_allreduce = comp.collective is Collective.ALLREDUCE and all(
            self.backend.supports_allreduce(t.dtype) for payload, _ in enc for t in payload
        )
        if use_allreduce:  # linear compressors: average the payloads, decompress once
            flat_payload = [t for payload, _ in enc for t in payload]
            with tm("communicate"):
                wait = self._allreduce_many(st, flat_payload, AVERAGE, f"{comp.name}.payload")

            def finish_allreduce() -> None:
                with tm("communicate"):
                    reduced = wait()
                with tm("decompress"):
                    i = 0
                    for (_, p), (payload, ctx) in zip(compressed, enc):
                        k = len(payload)
                        p.grad.copy_(comp.decompress(reduced[i : i + k], ctx))
                        i += k

            return finish_allreduce
        # allgather: one uint8 buffer with every parameter's payload, same layout on all ranks
        with tm("compress"):
            layout, chunks, off = [], [], 0
            for payload, _ in enc:
                spec = []
                for t in payload:
                    b = _as_bytes(t)
                    spec.append((off, b.numel(), t.dtype, t.shape))
                    chunks.append(b)
                    off += b.numel()
                layout.append(spec)
            buf = torch.cat(chunks)
        with tm("communicate"):
            pending = self._allgather(st, buf, f"{comp.name}.gather")

        def finish_allgather() -> None:
            with tm("communicate"):
                gathered = pending.wait()
            with tm("decompress"):
                if gathered.numel() != world * buf.numel():
                    raise RuntimeError(
                        f"allgather returned {gathered.numel()} bytes, expected {world} x {buf.numel()}: "
                        "ranks disagree on the compressed layout (different parameters or hyperparameters?)")
                rows = gathered.view(world, buf.numel())
                for (_, p), (_, ctx), spec in zip(compressed, enc, layout):
                    payloads = [[_from_bytes(rows[r, o : o + n], dt, sh) for (o, n, dt, sh) in spec]
                                for r in range(world)]
                    p.grad.copy_(comp.aggregate_payloads(payloads, ctx))

        return finish_allgather

    def _powersgd(self, st: CommStats, tm: _Timer, compressed) -> None:
        comp: PowerSGDCompressor = self.compressor  # type: ignore[assignment]
        with tm("compress"):
            xs, ps, states = [], [], []
            for name, p in compressed:
                x = self.memory.compensate(name, p.grad) if comp.error_feedback else p.grad
                P, s = comp.phase1(x, name)
                xs.append(x)
                ps.append(P)
                states.append(s)
        with tm("communicate"):
            p_sum = self._allreduce_many(st, ps, SUM, "powersgd.P")()
        with tm("compress"):
            qs = [comp.phase2(P.clone(), s) for P, s in zip(p_sum, states)]
        with tm("communicate"):
            q_mean = self._allreduce_many(st, qs, AVERAGE, "powersgd.Q")()
        with tm("decompress"):
            for (name, p), x, Q, s in zip(compressed, xs, q_mean, states):
                approx = comp.finish(Q.clone(), s)
                if comp.error_feedback:
                    self.memory.store(name, x - approx)
                p.grad.copy_(approx)

    # ------------------------------------------------------------------------------------
    def totals(self) -> dict[str, float]:
        """Cumulative accounting for the run summary."""
        return self._totals.as_dict()

    def state_dict(self) -> dict[str, Any]:
        """Error-feedback residuals (rank-local!), compressor state (PowerSGD Q, momentum,
        RNG), adaptive state, step counter and totals - for checkpoint/resume."""
        return {
            "version": 1,
            "compressor_name": self.compressor.name,
            "step": self.step,
            "memory": self.memory.state_dict(),
            "compressor": self.compressor.state_dict(),
            "adaptive": None if self.adaptive is None else self.adaptive.state_dict(),
            "totals": self._totals.state_dict(),
            "sparse": dict(self._sparse),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("compressor_name") not in (None, self.compressor.name):
            raise ValueError(
                f"checkpoint is for compressor {state.get('compressor_name')!r}, this communicator uses "
                f"{self.compressor.name!r}")
        devices = {n: p.device for n, p in self.params}
        self.step = int(state["step"])
        self.memory.residuals = {k: v.to(devices.get(k, v.device)).clone() for k, v in state["memory"].items()}
        self.compressor.load_state_dict(state["compressor"])
        if self.adaptive is not None and state.get("adaptive") is not None:
            self.adaptive.load_state_dict(state["adaptive"])
        self._totals = CommTotals()
        self._totals.load_state_dict(state.get("totals", {}))
        self._sparse = dict(state.get("sparse", {}))
