"""Triton decode attention straight from the packed paged KV cache (flash-decoding with a reduce step).

One query token per sequence attends to (a) its packed tokens, read through the block table from
the paged layout of `kvpack.kernels.paged`, and (b) a dense 16-bit window (attention sinks plus the
residual window of recent tokens) in the same launch. Order does not matter to one query, so the
window is simply one more split.

Kernel 1 (grid ``(kv_heads, splits + 1, batch)``): each program owns one KV head and one range of
tokens (split-K, "flash-decoding", Dao et al. 2023) and scores *all* the query heads of that KV head
(GQA) from one read of the packed bytes: it unpacks the `pack_bits` code words with shifts (4 bits: one table lookup per byte), looks the
codes up in the codebook (``turbo_mse``: values of the rotated unit vector; ``int``: the integer
code itself), and runs an online softmax (Milakov & Gimelshein 2018) with tensor-core dots. For
``turbo_mse`` the score is ``norm * <R q, c[code]>`` (the query is rotated once, outside), and the
values are accumulated in the rotated domain with ``p * norm``; for ``int``, ``scale * <q, code> +
zero * sum(q)``. Kernel 2 (grid ``(kv_heads, batch)``) merges the splits' partial (max, sum,
accumulator), rotates the packed-value part back once (``acc @ M_v.T``) and adds the window part.
This is TurboQuant's (Zandieh et al., arXiv 2504.19874) "score in the rotated domain" applied to
decode attention.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from kvpack.kernels.paged import PagedCodec

__all__ = ["choose_splits", "paged_decode_attention"]

LOG2E = 1.4426950408889634
KIND_IDS = {"turbo_mse": 0, "int": 1}


@triton.jit
def _tile_slots(block_tables_ptr, b, stride_bt, t, tmask, BLOCK_SIZE: tl.constexpr):
    """Flat cache slots (int64) of token positions ``t`` of sequence ``b`` through its block table."""
    blk = tl.load(block_tables_ptr + b * stride_bt + t // BLOCK_SIZE, mask=tmask, other=0)
    return blk.to(tl.int64) * BLOCK_SIZE + t % BLOCK_SIZE


@triton.jit
def _load_raw(cache_ptr, row, tmask, KIND: tl.constexpr, BITS: tl.constexpr, D: tl.constexpr):
    """Issue the loads of one tile: code bytes (N, D/8, 4) uint8 (byte i < BITS of each 8-code word) and side (a, c)."""
    G: tl.constexpr = D // 8
    CODE_BYTES: tl.constexpr = D * BITS // 8
    g = tl.arange(0, G)
    i = tl.arange(0, 4)
    offs = row[:, None, None] + (g * BITS)[None, :, None] + i[None, None, :]
    raw = tl.load(cache_ptr + offs, mask=tmask[:, None, None] & (i < BITS)[None, None, :], other=0)
    side_ptr = (cache_ptr + row + CODE_BYTES).to(tl.pointer_type(tl.float16))
    a = tl.load(side_ptr, mask=tmask, other=0.0).to(tl.float32)
    if KIND == 0:
        c = tl.zeros_like(a)
    else:
        c = tl.load(side_ptr + 1, mask=tmask, other=0.0).to(tl.float32)
    return raw, a, c


@triton.jit
def _unpack(raw, cb_ptr, table, KIND: tl.constexpr, BITS: tl.constexpr, D: tl.constexpr, N: tl.constexpr,
            LUT: tl.constexpr):  # fmt: skip
    """Code bytes (N, D/8, 4) -> values (N, D) float16: codebook entries (turbo_mse) or the integer codes (int).

    ``LUT`` 0: look codes up with loads from the codebook in global memory (L1 hits); 1: ``tl.gather`` from
    ``table``, the codebook broadcast to (2^BITS, D) in registers.
    """
    i = tl.arange(0, 4)
    k = tl.arange(0, 8)
    word = tl.sum(raw.to(tl.int32) << (8 * i)[None, None, :], axis=2)  # (N, G): 8 codes, disjoint bits
    codes = (word[:, :, None] >> (k * BITS)[None, None, :]) & ((1 << BITS) - 1)  # (N, G, 8): dim 8 g + k
    codes = tl.reshape(codes, (N, D))
    if KIND == 0:
        if LUT == 1:
            return tl.gather(table, codes, 0)
        else:
            return tl.load(cb_ptr + codes)  # float16 codebook, a few bytes: L1 hits
    else:
        return codes.to(tl.float16)


@triton.jit
def _split_kernel(
    q_ptr,  # (B, HQ, D) float16: the query as the keys see it (rotated by M_k for turbo_mse)
    qw_ptr,  # (B, HQ, D) float16: the query as given (for the window)
    k_cache_ptr,
    v_cache_ptr,  # uint8 (num_blocks, block_size, HKV, ROW_K / ROW_V)
    k_cb_ptr,
    v_cb_ptr,  # float16 codebooks
    block_tables_ptr,  # int32 (B, max_blocks)
    seq_lens_ptr,  # int32 (B,): packed tokens per sequence
    wk_ptr,
    wv_ptr,  # (B, W, HKV, D) float16/bfloat16 window (sinks + residual)
    window_lens_ptr,  # int32 (B,)
    part_m_ptr,  # float32 (B, HQ, S + 1): running max (log2 domain)
    part_l_ptr,  # float32 (B, HQ, S + 1): running sum
    part_acc_ptr,  # float32 (B, HQ, S + 1, D)
    qk_scale,  # softmax scale * log2(e)
    tokens_per_split,
    stride_bt,
    stride_wb,
    stride_wt,
    HKV: tl.constexpr,
    GQA: tl.constexpr,
    GPAD: tl.constexpr,
    D: tl.constexpr,
    KIND_K: tl.constexpr,
    BITS_K: tl.constexpr,
    KIND_V: tl.constexpr,
    BITS_V: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS,
    LUT: tl.constexpr,
):
    h = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2)
    HQ: tl.constexpr = HKV * GQA
    ROW_K: tl.constexpr = D * BITS_K // 8 + 2 + 2 * KIND_K
    ROW_V: tl.constexpr = D * BITS_V // 8 + 2 + 2 * KIND_V
    rows_q = tl.arange(0, GPAD)
    qmask = rows_q < GQA
    d = tl.arange(0, D)
    q_off = (b * HQ + h * GQA + rows_q)[:, None] * D + d[None, :]

    m_i = tl.full((GPAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((GPAD,), dtype=tl.float32)
    acc = tl.zeros((GPAD, D), dtype=tl.float32)

    if split < NUM_SPLITS:
        q = tl.load(q_ptr + q_off, mask=qmask[:, None], other=0.0).to(tl.float16)
        if KIND_K == 1:
            q_sum = tl.sum(q.to(tl.float32), axis=1)
        k_table = tl.broadcast_to(tl.load(k_cb_ptr + tl.arange(0, 1 << BITS_K))[:, None], (1 << BITS_K, D))
        v_table = tl.broadcast_to(tl.load(v_cb_ptr + tl.arange(0, 1 << BITS_V))[:, None], (1 << BITS_V, D))
        seq_len = tl.load(seq_lens_ptr + b)
        start = split * tokens_per_split
        end = tl.minimum(start + tokens_per_split, seq_len)
        # software pipeline: block-table entries two tiles ahead, code bytes one tile ahead (loads in flight
        # while the current tile is unpacked and scored)
        t = start + tl.arange(0, BLOCK_N)
        tmask = t < end
        slot = _tile_slots(block_tables_ptr, b, stride_bt, t, tmask, BLOCK_SIZE)
        k_raw, k_a, k_c = _load_raw(k_cache_ptr, slot * (HKV * ROW_K) + h * ROW_K, tmask, KIND_K, BITS_K, D)
        v_raw, v_a, v_c = _load_raw(v_cache_ptr, slot * (HKV * ROW_V) + h * ROW_V, tmask, KIND_V, BITS_V, D)
        t1 = t + BLOCK_N
        mask1 = t1 < end
        slot1 = _tile_slots(block_tables_ptr, b, stride_bt, t1, mask1, BLOCK_SIZE)
        for t0 in range(start, end, BLOCK_N):
            t2 = t0 + 2 * BLOCK_N + tl.arange(0, BLOCK_N)
            mask2 = t2 < end
            slot2 = _tile_slots(block_tables_ptr, b, stride_bt, t2, mask2, BLOCK_SIZE)
            k_raw1, k_a1, k_c1 = _load_raw(k_cache_ptr, slot1 * (HKV * ROW_K) + h * ROW_K, mask1, KIND_K, BITS_K, D)
            v_raw1, v_a1, v_c1 = _load_raw(v_cache_ptr, slot1 * (HKV * ROW_V) + h * ROW_V, mask1, KIND_V, BITS_V, D)

            k_vals = _unpack(k_raw, k_cb_ptr, k_table, KIND_K, BITS_K, D, BLOCK_N, LUT)
            s = tl.dot(q, tl.trans(k_vals)) * k_a[None, :]
            if KIND_K == 1:
                s += q_sum[:, None] * k_c[None, :]
            s = tl.where(tmask[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v_vals = _unpack(v_raw, v_cb_ptr, v_table, KIND_V, BITS_V, D, BLOCK_N, LUT)
            acc = acc * alpha[:, None] + tl.dot((p * v_a[None, :]).to(tl.float16), v_vals)
            if KIND_V == 1:
                acc += tl.sum(p * v_c[None, :], axis=1)[:, None]
            m_i = m_new

            k_raw, k_a, k_c, v_raw, v_a, v_c, tmask = k_raw1, k_a1, k_c1, v_raw1, v_a1, v_c1, mask1
            slot1, mask1 = slot2, mask2
    else:
        qw = tl.load(qw_ptr + q_off, mask=qmask[:, None], other=0.0)
        w_len = tl.load(window_lens_ptr + b)
        for t0 in range(0, w_len, BLOCK_N):
            t = t0 + tl.arange(0, BLOCK_N)
            tmask = t < w_len
            off = b * stride_wb + t[:, None] * stride_wt + h * D + d[None, :]
            kw = tl.load(wk_ptr + off, mask=tmask[:, None], other=0.0)
            vw = tl.load(wv_ptr + off, mask=tmask[:, None], other=0.0)
            s = tl.dot(qw.to(kw.dtype), tl.trans(kw))
            s = tl.where(tmask[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(vw.dtype), vw)
            m_i = m_new

    part = (b * HQ + h * GQA + rows_q) * (NUM_SPLITS + 1) + split
    tl.store(part_m_ptr + part, m_i, mask=qmask)
    tl.store(part_l_ptr + part, l_i, mask=qmask)
    tl.store(part_acc_ptr + part[:, None] * D + d[None, :], acc, mask=qmask[:, None])


@triton.jit
def _reduce_kernel(
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    unrot_ptr,  # float32 (D, D): M_v.T (turbo_mse values), unused for int
    out_ptr,  # (B, HQ, D)
    HKV: tl.constexpr,
    GQA: tl.constexpr,
    GPAD: tl.constexpr,
    D: tl.constexpr,
    NUM_SPLITS,
    ROTATED_V: tl.constexpr,
):
    h = tl.program_id(0)
    b = tl.program_id(1)
    HQ: tl.constexpr = HKV * GQA
    rows_q = tl.arange(0, GPAD)
    qmask = rows_q < GQA
    d = tl.arange(0, D)
    base = (b * HQ + h * GQA + rows_q) * (NUM_SPLITS + 1)
    m_max = tl.full((GPAD,), float("-inf"), dtype=tl.float32)
    for s in range(NUM_SPLITS + 1):
        m_max = tl.maximum(m_max, tl.load(part_m_ptr + base + s, mask=qmask, other=float("-inf")))
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)  # padded rows
    l_tot = tl.zeros((GPAD,), dtype=tl.float32)
    acc_packed = tl.zeros((GPAD, D), dtype=tl.float32)
    for s in range(NUM_SPLITS):
        w = tl.exp2(tl.load(part_m_ptr + base + s, mask=qmask, other=float("-inf")) - m_safe)
        l_tot += w * tl.load(part_l_ptr + base + s, mask=qmask, other=0.0)
        acc_s = tl.load(part_acc_ptr + (base + s)[:, None] * D + d[None, :], mask=qmask[:, None], other=0.0)
        acc_packed += w[:, None] * acc_s
    w = tl.exp2(tl.load(part_m_ptr + base + NUM_SPLITS, mask=qmask, other=float("-inf")) - m_safe)
    l_tot += w * tl.load(part_l_ptr + base + NUM_SPLITS, mask=qmask, other=0.0)
    acc_window = tl.load(part_acc_ptr + (base + NUM_SPLITS)[:, None] * D + d[None, :], mask=qmask[:, None], other=0.0)
    if ROTATED_V:
        unrot = tl.load(unrot_ptr + d[:, None] * D + d[None, :])
        acc_packed = tl.dot(acc_packed, unrot, input_precision="ieee")
    out = (acc_packed + w[:, None] * acc_window) / tl.where(qmask, l_tot, 1.0)[:, None]
    q_off = (b * HQ + h * GQA + rows_q)[:, None] * D + d[None, :]
    tl.store(out_ptr + q_off, out.to(out_ptr.dtype.element_ty), mask=qmask[:, None])


@functools.lru_cache(maxsize=8)
def _no_codebook(device: torch.device) -> torch.Tensor:
    """A float16 (16,) placeholder for the codebook argument of an ``int`` stream (read, never used)."""
    return torch.zeros(16, dtype=torch.float16, device=device)


def choose_splits(
    batch: int, kv_heads: int, capacity: int, block_n: int, num_sms: int = 132, waves: float = 2.0
) -> int:
    """Splits of the packed tokens so that ``batch * kv_heads * splits`` programs fill about ``waves`` waves of the GPU."""
    want = max(1, math.ceil(waves * num_sms / max(1, batch * kv_heads)))
    return max(1, min(want, math.ceil(capacity / (4 * block_n))))


def paged_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    window_keys: torch.Tensor,
    window_values: torch.Tensor,
    window_lens: torch.Tensor,
    key_codec: PagedCodec,
    value_codec: PagedCodec,
    scale: float,
    num_splits: int | None = None,
    block_n: int = 32,
    num_warps: int = 4,
    num_stages: int = 2,
    waves: float = 8.0,
    lut: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the two kernels (inputs already checked by `kvpack.attention.decode`); returns ``(B, HQ, D)``.

    No host synchronisation: every length is read on the device, and the split count depends only
    on shapes (the block table's capacity), so a step can be captured in a CUDA graph.
    """
    batch, hq, d = query.shape
    _, block_size, hkv, _ = key_cache.shape
    gqa = hq // hkv
    gpad = max(16, triton.next_power_of_2(gqa))
    if num_splits is None:
        num_sms = torch.cuda.get_device_properties(query.device).multi_processor_count if query.is_cuda else 132
        num_splits = choose_splits(batch, hkv, block_tables.shape[1] * block_size, block_n, num_sms, waves)
    capacity = block_tables.shape[1] * block_size
    tokens_per_split = math.ceil(capacity / num_splits / block_n) * block_n
    q_keys = query.to(torch.float16)
    if key_codec.rotation16 is not None:
        q_keys = torch.matmul(q_keys, key_codec.rotation16)  # rotate the query once; scores need R q
    part_m = torch.empty(batch, hq, num_splits + 1, device=query.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(batch, hq, num_splits + 1, d, device=query.device, dtype=torch.float32)
    out = torch.empty_like(query) if out is None else out
    k_cb = key_codec.codebook16 if key_codec.codebook16 is not None else _no_codebook(query.device)
    v_cb = value_codec.codebook16 if value_codec.codebook16 is not None else _no_codebook(query.device)

    _split_kernel[(hkv, num_splits + 1, batch)](
        q_keys,
        query.contiguous(),
        key_cache,
        value_cache,
        k_cb,
        v_cb,
        block_tables,
        seq_lens,
        window_keys,
        window_values,
        window_lens,
        part_m,
        part_l,
        part_acc,
        scale * LOG2E,
        tokens_per_split,
        block_tables.stride(0),
        window_keys.stride(0),
        window_keys.stride(1),
        HKV=hkv,
        GQA=gqa,
        GPAD=gpad,
        D=d,
        KIND_K=KIND_IDS[key_codec.kind],
        BITS_K=key_codec.bits,
        KIND_V=KIND_IDS[value_codec.kind],
        BITS_V=value_codec.bits,
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        LUT=lut,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    rotated_v = value_codec.unrotation is not None
    unrot = value_codec.unrotation if rotated_v else part_m
    _reduce_kernel[(hkv, batch)](
        part_m,
        part_l,
        part_acc,
        unrot,
        out,
        HKV=hkv,
        GQA=gqa,
        GPAD=gpad,
        D=d,
        NUM_SPLITS=num_splits,
        ROTATED_V=rotated_v,
        num_warps=4,
    )
    return out
