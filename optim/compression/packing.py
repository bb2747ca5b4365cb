"""Bit packing of small unsigned integer codes into bytes.

``pack_bits(codes, b)`` stores ``n`` codes of ``b`` bits each in exactly
``ceil(n * b / 8)`` bytes (``packed_nbytes``). Layout:

* ``b == 8``: one byte per code.
* ``b < 8``: groups of 8 codes are concatenated little-endian into ``b`` bytes
  (8 codes x b bits = b bytes); the tail group is zero-padded and the trailing
  bytes that hold only padding are dropped.
* ``b > 8``: the low byte of every code (``n`` bytes) followed by
  ``pack_bits(codes >> 8, b - 8)``; since ``n + ceil(n (b-8) / 8) == ceil(n b / 8)``
  this is still the minimum number of whole bytes.

Everything is vectorised torch on the codes' device; codes are int64 in ``[0, 2**b)``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["packed_nbytes", "pack_bits", "unpack_bits", "bits_for"]

MAX_BITS = 62


def bits_for(n_values: int) -> int:
    """Fewest bits that distinguish ``n_values`` values (at least 1)."""
    if n_values < 1:
        raise ValueError(f"n_values must be >= 1, got {n_values}")
    return max(1, math.ceil(math.log2(n_values)))


def packed_nbytes(n: int, bits: int) -> int:
    """Exact size in bytes of ``n`` codes of ``bits`` bits: ``ceil(n * bits / 8)``."""
    return (n * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in [1, {MAX_BITS}], got {bits!r}")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a 1-D tensor of non-negative integer codes (< 2**bits) into uint8."""
    _check_bits(bits)
    codes = codes.reshape(-1)
    if bits == 8:
        return codes.to(torch.uint8)
    codes = codes.to(torch.int64)
    n = codes.numel()
    if bits > 8:
        low = (codes & 0xFF).to(torch.uint8)
        return torch.cat([low, pack_bits(codes >> 8, bits - 8)])
    groups = (n + 7) // 8
    padded = torch.zeros(groups * 8, dtype=torch.int64, device=codes.device)
    padded[:n] = codes
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    words = (padded.view(groups, 8) << shifts).sum(dim=1)  # 8*bits <= 56 bits: fits int64
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    out = ((words.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return out[: packed_nbytes(n, bits)]


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: returns ``n`` int64 codes."""
    _check_bits(bits)
    packed = packed.reshape(-1)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    need = packed_nbytes(n, bits)
    if packed.numel() != need:
        raise ValueError(f"expected {need} bytes for {n} codes of {bits} bits, got {packed.numel()}")
    if bits == 8:
        return packed.to(torch.int64)
    if bits > 8:
        low = packed[:n].to(torch.int64)
        high = unpack_bits(packed[n:], bits - 8, n)
        return low | (high << 8)
    groups = (n + 7) // 8
    full = torch.zeros(groups * bits, dtype=torch.int64, device=packed.device)
    full[:need] = packed.to(torch.int64)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    words = (full.view(groups, bits) << byte_shifts).sum(dim=1)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes = (words.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:n]
