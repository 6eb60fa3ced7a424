"""Shared builders of the kernel tests: a ragged, scattered paged case and the relative error."""

from __future__ import annotations

import math

import torch

from kvpack import get_codec
from kvpack.kernels.paged import paged_codec, rows_from_packed


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def make_case(
    key: str,
    value: str,
    *,
    batch: int,
    kv_heads: int,
    gqa: int,
    head_dim: int,
    block_size: int,
    seq_lens: list[int],
    window_lens: list[int],
    device: str,
    seed: int,
    dtype=torch.float16,
    value_scale: float = 1.0,
    key_ramp: float = 0.0,
):
    """A ragged batch: K/V encoded with the PyTorch codecs, rows scattered into shuffled pages. ``value_scale``
    multiplies the values (packed and window); ``key_ramp`` > 0 grows the keys along the sequence (key at position i
    times ``1 + key_ramp * i / n``), so the running max of the scores keeps moving."""
    g = torch.Generator().manual_seed(seed)
    kc, vc = (get_codec(s, head_dim=head_dim, seed=seed) for s in (key, value))
    kf, vf = paged_codec(kc, device), paged_codec(vc, device)
    max_blocks = max(math.ceil(n / block_size) for n in seq_lens) + 1
    num_blocks = batch * max_blocks + 3
    perm = torch.randperm(num_blocks, generator=g)[: batch * max_blocks].reshape(batch, max_blocks)
    key_cache = torch.randint(0, 256, (num_blocks, block_size, kv_heads, kf.row_bytes), generator=g, dtype=torch.uint8)
    value_cache = torch.randint(
        0, 256, (num_blocks, block_size, kv_heads, vf.row_bytes), generator=g, dtype=torch.uint8
    )
    for b, n in enumerate(seq_lens):  # unused slots keep random bytes: the kernel must not read them
        pos = torch.arange(n)
        blocks, offs = perm[b][pos // block_size], pos % block_size
        k = (torch.randn(n, kv_heads, head_dim, generator=g) * 2 + 0.3) * (1 + key_ramp * pos / n)[:, None, None]
        v = torch.randn(n, kv_heads, head_dim, generator=g) * value_scale
        key_cache[blocks, offs] = rows_from_packed(kc.encode(k), kf)
        value_cache[blocks, offs] = rows_from_packed(vc.encode(v), vf)
    w = max(window_lens + [1])
    case = {
        "query": torch.randn(batch, kv_heads * gqa, head_dim, generator=g).to(dtype),
        "key_cache": key_cache,
        "value_cache": value_cache,
        "block_tables": perm.to(torch.int32),
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32),
        "window_keys": (torch.randn(batch, w, kv_heads, head_dim, generator=g) * 2).to(dtype),
        "window_values": (torch.randn(batch, w, kv_heads, head_dim, generator=g) * value_scale).to(dtype),
        "window_lens": torch.tensor(window_lens, dtype=torch.int32),
    }
    case = {k: t.to(device) for k, t in case.items()}
    return case, kf, vf, (kc, vc)
