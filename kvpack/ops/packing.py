"""Exact bit packing of small integer codes along the last dimension.

Layout (shared by the PyTorch reference and the Triton kernels): code ``i`` of a row occupies
bits ``[i * bits, (i + 1) * bits)`` of the row's bit stream, least significant bit first, and byte
``j`` holds stream bits ``[8 j, 8 j + 8)``. A row of ``n`` codes takes ``ceil(n * bits / 8)`` bytes.
For 4 bits: ``byte[j] = code[2j] | code[2j+1] << 4``.
"""

from __future__ import annotations

import torch

__all__ = ["pack_bits", "packed_nbytes", "unpack_bits"]


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take once packed: ``ceil(n * bits / 8)``."""
    return (n * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int in 1..8, got {type(bits).__name__}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``(..., n)`` in ``[0, 2**bits)`` into uint8 ``(..., ceil(n*bits/8))``.

    Vectorized: 8 codes make ``bits`` whole bytes, so each group of 8 is combined into one int64
    (at most 56 bits) and split into bytes; no Python loop over elements.
    """
    _check_bits(bits)
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"codes must have an integer dtype, got {codes.dtype}")
    if codes.dim() == 0:
        raise ValueError("codes must have at least one dimension (the one packed)")
    n = codes.shape[-1]
    lead = codes.shape[:-1]
    if codes.numel() > 0:
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= (1 << bits):
            raise ValueError(f"codes must lie in [0, {1 << bits}) for bits={bits}, got range [{lo}, {hi}]")
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    groups = (n + 7) // 8
    c = codes.to(torch.int64)
    if groups * 8 != n:
        c = torch.nn.functional.pad(c, (0, groups * 8 - n))
    c = c.reshape(*lead, groups, 8)
    shifts = torch.arange(8, device=c.device, dtype=torch.int64) * bits
    word = (c << shifts).sum(dim=-1, keepdim=True)  # (..., groups, 1), disjoint bit ranges
    byte_shifts = torch.arange(bits, device=c.device, dtype=torch.int64) * 8
    out = ((word >> byte_shifts) & 0xFF).to(torch.uint8).reshape(*lead, groups * bits)
    return out[..., : packed_nbytes(n, bits)].contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``(..., ceil(n*bits/8))`` -> uint8 codes ``(..., n)``."""
    _check_bits(bits)
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if packed.dim() == 0:
        raise ValueError("packed must have at least one dimension")
    if packed.shape[-1] != packed_nbytes(n, bits):
        raise ValueError(
            f"packed has {packed.shape[-1]} bytes in its last dim; {n} codes of {bits} bits need "
            f"{packed_nbytes(n, bits)}"
        )
    if bits == 8:
        return packed.clone()
    lead = packed.shape[:-1]
    groups = (n + 7) // 8
    b = packed.to(torch.int64)
    if groups * bits != b.shape[-1]:
        b = torch.nn.functional.pad(b, (0, groups * bits - b.shape[-1]))
    b = b.reshape(*lead, groups, bits)
    byte_shifts = torch.arange(bits, device=b.device, dtype=torch.int64) * 8
    word = (b << byte_shifts).sum(dim=-1, keepdim=True)
    shifts = torch.arange(8, device=b.device, dtype=torch.int64) * bits
    codes = ((word >> shifts) & ((1 << bits) - 1)).to(torch.uint8).reshape(*lead, groups * 8)
    return codes[..., :n].contiguous()
