"""Analytic payload sizes, shared by the compression tests (test_compression_packing.py,
test_compression_embedding_policy.py, hvd_worker.py)."""

from __future__ import annotations

import math
from fractions import Fraction


def analytic_nbytes(name, hp, shape) -> int:
    """Bytes of ``name``'s payload for a tensor of ``shape``, written out independently of the
    implementation (docs/compression.md)."""
    n = math.prod(shape)
    # k = ceil(ratio * n) of the ratio as written (0.07 * 100 = 7), not of the double product
    k = min(n, max(1, math.ceil(Fraction(str(hp["ratio"])) * n))) if "ratio" in hp else None
    if name == "none":
        return 4 * n
    if name in ("fp16", "bf16"):
        return 2 * n
    if name == "qsgd":
        s = hp.get("levels") or 2 ** (hp.get("bits", 8) - 1) - 1
        b = 1 + math.ceil(math.log2(s + 1))
        bucket = hp.get("bucket_size", 512) or n
        return 4 * math.ceil(n / min(bucket, n)) + math.ceil(n * b / 8)
    if name == "topk":
        return 4 * k + math.ceil(k * max(1, math.ceil(math.log2(n))) / 8)
    if name == "randomk":
        return 4 * k
    if name in ("signsgd", "efsignsgd", "signum_vote"):
        return 4 + math.ceil(n / 8)
    if name == "powersgd":
        rows = shape[0]
        cols = n // rows
        return 4 * (rows + cols) * min(rows, cols, hp["rank"])
    raise AssertionError(name)


def hybrid_nbytes(named_shapes, tables, rank, ratio=0.01, min_numel=1024) -> int:
    """Bytes per step of PowerSGD (``rank``) whose embedding policy sends ``tables`` by top-k
    (``ratio``): each table's top-k payload; 4 r (n + m) per matrix PowerSGD compresses (at
    least ``min_numel`` elements and torch's rule, min_compression_rate 2: (n + m) r 2 < n m);
    4 bytes per element for the rest. ``named_shapes``: (name, shape) pairs. The defaults are
    PowerSGD's embedding_ratio and GradientCommunicator's min_compress_numel."""
    total = 0
    for name, shape in named_shapes:
        numel = math.prod(shape)
        n = shape[0] if len(shape) else 1
        m = numel // n if n else 0
        r = min(n, m, rank)
        if name in tables:
            total += analytic_nbytes("topk", {"ratio": ratio}, shape)
        elif numel >= min_numel and (n + m) * r * 2 < n * m:
            total += analytic_nbytes("powersgd", {"rank": rank}, shape)
        else:
            total += 4 * numel
    return total
