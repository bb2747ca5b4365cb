"""Analytic payload sizes, shared by the compression tests (test_compression_packing.py,
test_compression_embedding_policy.py, hvd_worker.py)."""

from __future__ import annotations

import math


def analytic_nbytes(name, hp, shape) -> int:
    """Bytes of ``name``'s payload for a tensor of ``shape``, written out independently of the
    implementation (docs/compression.md)."""
    n = math.prod(shape)
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
        k = min(n, max(1, math.ceil(hp["ratio"] * n)))
        return 4 * k + math.ceil(k * max(1, math.ceil(math.log2(n))) / 8)
    if name == "randomk":
        return 4 * min(n, max(1, math.ceil(hp["ratio"] * n)))
    if name in ("signsgd", "efsignsgd", "signum_vote"):
        return 4 + math.ceil(n / 8)
    if name == "powersgd":
        rows = shape[0]
        cols = n // rows
        return 4 * (rows + cols) * min(rows, cols, hp["rank"])
    raise AssertionError(name)
