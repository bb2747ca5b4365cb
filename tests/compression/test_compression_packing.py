"""Bit packing and analytic payload sizes."""

from __future__ import annotations

import math

import pytest
import torch

from optim.compression import available_compressors, build_compressor, pack_bits, packed_nbytes, unpack_bits
from payload_sizes import analytic_nbytes


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8, 9, 12, 17, 20, 31, 32])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000, 1001])
def test_pack_roundtrip_and_size(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.int64)
    if n:
        codes[0] = 2**bits - 1  # extremes survive
        codes[-1] = 0
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(n, bits) == math.ceil(n * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_pack_rejects_bad_sizes():
    with pytest.raises(ValueError):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 10)
    with pytest.raises(ValueError):
        pack_bits(torch.zeros(3, dtype=torch.int64), 0)


CASES = [
    ("none", {}), ("fp16", {}), ("bf16", {}),
    ("qsgd", {"bits": 8}), ("qsgd", {"bits": 4, "bucket_size": 128}), ("qsgd", {"levels": 5, "bucket_size": None}),
    ("topk", {"ratio": 0.01}), ("topk", {"ratio": 0.3}), ("randomk", {"ratio": 0.05}),
    ("topk", {"ratio": 0.07}), ("randomk", {"ratio": 0.14}),  # ratio * 100 is a hair above an integer
    ("signsgd", {}), ("efsignsgd", {}), ("signum_vote", {}),
    ("powersgd", {"rank": 4}), ("powersgd", {"rank": 1}),
]


def test_every_method_has_a_size_case():
    assert {c for c, _ in CASES} == set(available_compressors())


@pytest.mark.parametrize("name,hp", CASES)
@pytest.mark.parametrize("shape", [(1000,), (64, 129), (7, 3, 5), (4096, 16), (10, 10)])
def test_payload_bytes_equal_analytic(name, hp, shape):
    comp = build_compressor(name, **hp)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    payload, _ = comp.compress(x, "w")
    actual = sum(t.numel() * t.element_size() for t in payload)
    assert actual == comp.payload_nbytes(shape) == analytic_nbytes(name, hp, shape)
