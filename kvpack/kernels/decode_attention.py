"""Triton decode attention straight from the packed paged KV cache (flash-decoding with a reduce step).

One query token per sequence attends to (a) its packed tokens, read through the block table from
the paged layout of `kvpack.kernels.paged`, and (b) a dense 16-bit window (attention sinks plus the
residual window of recent tokens) in the same launch. Order does not matter to one query, so the
window is simply one more split.

Kernel 1 (grid ``(kv_heads, splits + 1, batch)``): each program owns one KV head and one range of
tokens (split-K, "flash-decoding", Dao et al. 2023) and scores *all* the query heads of that KV head
(GQA) from one read of the packed bytes: it loads the rows' code planes as int32 words, unpacks them
with shifts, looks the codes up in the codebook (``turbo_mse``: values of the rotated unit vector; ``int``: the integer
code itself), and runs an online softmax (Milakov & Gimelshein 2018) with tensor-core dots. For
``turbo_mse`` the score is ``norm * <R q, c[code]>`` (the query is rotated once, outside), and the
values are accumulated in the rotated domain with ``p * norm``; for ``int``, ``scale * <q, code> +
zero * sum(q)``; for ``turbo_prod`` keys (TurboQuant-prod: the mse stage plus QJL signs of the residual),
``norm * <R q, c[code]> + residual_norm * <sqrt(pi/2) / D * S q, 2 sign - 1>`` with ``S q`` also computed
once outside (the sign plane is one more 1-bit plane and one more dot; tested on an H100, slow there: 0.3x
fp16 SDPA at batch 8 / 32K, BENCHMARKS.md). ``turbo_prod`` values add a second accumulator, ``sum p * residual_norm
* (2 sign - 1)``, in the sketch's domain: kernel 2 merges it like the first and ``S^T`` maps it back once,
outside. Kernel 2 (grid ``(kv_heads, batch)``) merges the splits' partial (max, sum,
accumulator), rotates the packed-value part back once (``acc @ M_v.T``) and adds the window part.
This is TurboQuant's (Zandieh et al., arXiv 2504.19874) "score in the rotated domain" applied to
decode attention.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvpack.kernels.paged import KIND_IDS, PagedCodec, choose_splits

__all__ = ["default_tuning", "paged_decode", "paged_decode_attention"]

LOG2E = 1.4426950408889634


@triton.jit
def _tile_slots(block_tables_ptr, b, stride_bt, t, tmask, BLOCK_SIZE: tl.constexpr, OFF64: tl.constexpr):
    """Flat cache slots of token positions ``t`` of sequence ``b`` through its block table (int64 iff ``OFF64``:
    int32 offsets save the 64-bit multiplies and adds of every row address when the caches hold < 2^31 words)."""
    blk = tl.load(block_tables_ptr + b * stride_bt + t // BLOCK_SIZE, mask=tmask, other=0)
    if OFF64:
        blk = blk.to(tl.int64)
    return blk * BLOCK_SIZE + t % BLOCK_SIZE


@triton.jit
def _load_tile(cache_ptr, row, tmask, KIND: tl.constexpr, BITS: tl.constexpr, D: tl.constexpr, UNPACK: tl.constexpr):
    """Issue the int32 loads of one tile: ``row`` (N,) word offsets -> code plane words and side (a, c).

    Plane 0 is (N, D * W0 / 32) words (W0 = 2 for 3 bits, else BITS); plane 1 (3 bits only) the
    (N, D / 32) words of the high bit; ``a`` the norm (turbo_mse, turbo_prod) or scale (int), ``c`` the int
    zero or the turbo_prod residual norm. ``turbo_prod``: ``BITS`` is its mse stage's; the side word follows
    the sign plane (loaded apart, `_load_signs`).
    """
    W0: tl.constexpr = 2 if BITS == 3 else BITS
    NW0: tl.constexpr = D * W0 // 32
    CODE_WORDS: tl.constexpr = D * BITS // 32
    w0 = tl.load(cache_ptr + row[:, None] + tl.arange(0, NW0)[None, :], mask=tmask[:, None], other=0)
    if BITS == 3:
        if UNPACK == 1:  # the high bits as int16 lanes: lane j holds the high bits of plane-0 word j's 16 codes
            half_ptr = cache_ptr.to(tl.pointer_type(tl.int16))
            w1 = tl.load(half_ptr + 2 * (row[:, None] + NW0) + tl.arange(0, D // 16)[None, :], mask=tmask[:, None],
                         other=0).to(tl.int32)  # fmt: skip
        else:
            w1 = tl.load(cache_ptr + row[:, None] + NW0 + tl.arange(0, D // 32)[None, :], mask=tmask[:, None], other=0)
    else:
        w1 = w0
    SIDE: tl.constexpr = CODE_WORDS + D // 32 if KIND == 2 else CODE_WORDS
    side = tl.load(cache_ptr + row + SIDE, mask=tmask, other=0)  # two float16 in one word, little-endian
    a = (side & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    if KIND == 0:
        c = tl.zeros_like(a)
    else:
        c = (side >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return w0, w1, a, c


@triton.jit
def _load_signs(cache_ptr, row, tmask, BITS: tl.constexpr, D: tl.constexpr):
    """The (N, D / 32) int32 words of a turbo_prod row's QJL sign plane (after the ``BITS``-bit mse planes)."""
    return tl.load(cache_ptr + row[:, None] + D * BITS // 32 + tl.arange(0, D // 32)[None, :], mask=tmask[:, None],
                   other=0)  # fmt: skip


@triton.jit
def _plane(words, W: tl.constexpr, D: tl.constexpr, N: tl.constexpr):
    """Words (N, D * W / 32) of a W-bit plane -> codes (N, D) int32 (32 / W codes per word, lowest first)."""
    PER: tl.constexpr = 32 // W
    k = tl.arange(0, PER)
    codes = (words[:, :, None] >> (k * W)[None, None, :]) & ((1 << W) - 1)
    return tl.reshape(codes, (N, D))


@triton.jit
def _slot(w0, w1, cb_ptr, K: tl.constexpr, KIND: tl.constexpr, BITS: tl.constexpr):
    """Values (N, D / S) float16 of slot ``K`` of every lane: codes ``K`` of the plane words (``w1``: 3-bit high bits)."""
    if BITS == 3:
        c = ((w0 >> (2 * K)) & 3) | (((w1 >> K) & 1) << 2)
    else:
        c = (w0 >> (BITS * K)) & ((1 << BITS) - 1)
    if KIND == 0:
        return tl.load(cb_ptr + c)  # float16 codebook, a few bytes: L1 hits
    else:
        return (c | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0  # 1024 + c exactly, minus 1024


# Slot trees: tl.join puts the new axis in each thread's registers, so the 2^n slots of a lane end up
# contiguous in one thread (index = slot offset, least significant axis last) and the (N, D) result
# feeds the dot operand with vector stores instead of one store per value.
@triton.jit
def _tree2(w0, w1, cb_ptr, K0: tl.constexpr, ST: tl.constexpr, KIND: tl.constexpr, BITS: tl.constexpr):
    return tl.join(_slot(w0, w1, cb_ptr, K0, KIND, BITS), _slot(w0, w1, cb_ptr, K0 + ST, KIND, BITS))


@triton.jit
def _tree4(w0, w1, cb_ptr, K0: tl.constexpr, ST: tl.constexpr, KIND: tl.constexpr, BITS: tl.constexpr):
    return tl.join(_tree2(w0, w1, cb_ptr, K0, 2 * ST, KIND, BITS), _tree2(w0, w1, cb_ptr, K0 + ST, 2 * ST, KIND, BITS))


@triton.jit
def _tree8(w0, w1, cb_ptr, K0: tl.constexpr, ST: tl.constexpr, KIND: tl.constexpr, BITS: tl.constexpr):
    return tl.join(_tree4(w0, w1, cb_ptr, K0, 2 * ST, KIND, BITS), _tree4(w0, w1, cb_ptr, K0 + ST, 2 * ST, KIND, BITS))


@triton.jit
def _tree16(w0, w1, cb_ptr, K0: tl.constexpr, ST: tl.constexpr, KIND: tl.constexpr, BITS: tl.constexpr):
    return tl.join(_tree8(w0, w1, cb_ptr, K0, 2 * ST, KIND, BITS), _tree8(w0, w1, cb_ptr, K0 + ST, 2 * ST, KIND, BITS))


@triton.jit
def _tree32(w0, w1, cb_ptr, K0: tl.constexpr, ST: tl.constexpr, KIND: tl.constexpr, BITS: tl.constexpr):
    return tl.join(
        _tree16(w0, w1, cb_ptr, K0, 2 * ST, KIND, BITS), _tree16(w0, w1, cb_ptr, K0 + ST, 2 * ST, KIND, BITS)
    )


@triton.jit
def _dequant(w0, w1, cb_ptr, KIND: tl.constexpr, BITS: tl.constexpr, D: tl.constexpr, N: tl.constexpr,
             UNPACK: tl.constexpr):  # fmt: skip
    """Plane words -> values (N, D) float16: codebook entries (turbo_mse) or the integer codes (int).

    ``UNPACK`` 1: slot by slot on the words' own layout, joined (see the slot trees); 0: one broadcast shift
    over (N, words, codes per word) and a reshape (faster with a codebook: the gathers stay coalesced).
    Codebook entries are loaded from global memory (L1 hits; a ``tl.gather`` from registers was slower);
    ``int`` codes become float16 exactly with the 0x6400 trick.
    """
    if UNPACK == 1:
        S: tl.constexpr = 4 if BITS == 8 else (8 if BITS == 4 else (32 if BITS == 1 else 16))  # codes per lane
        if S == 4:
            vals = _tree4(w0, w1, cb_ptr, 0, 1, KIND, BITS)
        elif S == 8:
            vals = _tree8(w0, w1, cb_ptr, 0, 1, KIND, BITS)
        elif S == 16:
            vals = _tree16(w0, w1, cb_ptr, 0, 1, KIND, BITS)
        else:
            vals = _tree32(w0, w1, cb_ptr, 0, 1, KIND, BITS)
        return tl.reshape(vals, (N, D))
    else:
        if BITS == 3:
            codes = _plane(w0, 2, D, N) | (_plane(w1, 1, D, N) << 2)
        else:
            codes = _plane(w0, BITS, D, N)
        if KIND == 0:
            return tl.load(cb_ptr + codes)
        else:
            return (codes | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0


@triton.jit
def _attend_tile(q, q_sum, q_sk, k0, k1, k_s, k_a, k_c, v0, v1, v_s, v_a, v_c, tmask, m_i, l_i, acc, k_cb_ptr, v_cb_ptr,
                 acc_qjl, KIND_K: tl.constexpr, BITS_K: tl.constexpr, KIND_V: tl.constexpr,
                 BITS_V: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                 UNPACK: tl.constexpr):  # fmt: skip
    """One tile of online softmax: scores from the key codes, then the value codes accumulated.

    ``q`` and ``q_sk`` come scaled by the softmax scale times log2(e): the scores leave the dots in the log2 domain.
    """
    CB_K: tl.constexpr = 0 if KIND_K == 2 else KIND_K  # turbo_prod's mse stage reads the codebook as turbo_mse
    k_vals = _dequant(k0, k1, k_cb_ptr, CB_K, BITS_K, D, BLOCK_N, UNPACK)
    s = tl.dot(q, tl.trans(k_vals)) * k_a[None, :]
    if KIND_K == 1:
        s += q_sum[:, None] * k_c[None, :]
    if KIND_K == 2:  # QJL part: residual_norm * <q_sk, 2 sign - 1>, q_sk = sqrt(pi/2) / D * S q
        signs = (_plane(k_s, 1, D, BLOCK_N) * 2 - 1).to(tl.float16)
        s += tl.dot(q_sk, tl.trans(signs)) * k_c[None, :]
    s = tl.where(tmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    CB_V: tl.constexpr = 0 if KIND_V == 2 else KIND_V
    v_vals = _dequant(v0, v1, v_cb_ptr, CB_V, BITS_V, D, BLOCK_N, UNPACK)
    acc = acc * alpha[:, None] + tl.dot((p * v_a[None, :]).to(tl.float16), v_vals)
    if KIND_V == 1:
        acc += tl.sum(p * v_c[None, :], axis=1)[:, None]
    if KIND_V == 2:  # the QJL part, S^T applied after the merge: sum p * residual_norm * (2 sign - 1)
        v_signs = (_plane(v_s, 1, D, BLOCK_N) * 2 - 1).to(tl.float16)
        acc_qjl = acc_qjl * alpha[:, None] + tl.dot((p * v_c[None, :]).to(tl.float16), v_signs)
    return m_new, l_i, acc, acc_qjl


@triton.jit
def _split_kernel(
    q_ptr,  # (B, HQ, D) float16: the query as the keys see it (rotated by M_k for turbo_mse, turbo_prod)
    qs_ptr,  # (B, HQ, D) float16: sqrt(pi/2) / D * S q (turbo_prod keys; otherwise not read)
    qw_ptr,  # (B, HQ, D) float16: the query as given (for the window)
    k_cache_ptr,
    v_cache_ptr,  # int32 view of the uint8 (num_blocks, block_size, HKV, row_bytes) caches
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
    part_qjl_ptr,  # float32 (B, HQ, S + 1, D): the QJL accumulator (turbo_prod values; otherwise not written)
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
    UNPACK: tl.constexpr,
    OFF64: tl.constexpr,
):
    h = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2)
    HQ: tl.constexpr = HKV * GQA
    ROW_K: tl.constexpr = D * BITS_K // 32 + 1 + (D // 32 if KIND_K == 2 else 0)  # words: planes (+ signs) + side
    ROW_V: tl.constexpr = D * BITS_V // 32 + 1 + (D // 32 if KIND_V == 2 else 0)
    rows_q = tl.arange(0, GPAD)
    qmask = rows_q < GQA
    d = tl.arange(0, D)
    q_off = (b * HQ + h * GQA + rows_q)[:, None] * D + d[None, :]

    m_i = tl.full((GPAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((GPAD,), dtype=tl.float32)
    acc = tl.zeros((GPAD, D), dtype=tl.float32)
    acc_qjl = acc  # turbo_prod values only

    if split < NUM_SPLITS:
        # the softmax scale goes into the query once instead of into every score
        q = (tl.load(q_ptr + q_off, mask=qmask[:, None], other=0.0).to(tl.float32) * qk_scale).to(tl.float16)
        q_sum = tl.sum(q.to(tl.float32), axis=1)  # used by int keys only
        q_sk = q  # placeholder, read by turbo_prod keys only
        if KIND_K == 2:
            q_sk = (tl.load(qs_ptr + q_off, mask=qmask[:, None], other=0.0).to(tl.float32) * qk_scale).to(tl.float16)
        seq_len = tl.load(seq_lens_ptr + b)
        start = split * tokens_per_split
        end = tl.minimum(start + tokens_per_split, seq_len)
        # software pipeline by hand: block-table entries two tiles ahead, code words one tile ahead
        # (loads in flight while the current tile is unpacked and scored)
        t = start + tl.arange(0, BLOCK_N)
        tmask = t < end
        slot = _tile_slots(block_tables_ptr, b, stride_bt, t, tmask, BLOCK_SIZE, OFF64)
        k0, k1, k_a, k_c = _load_tile(k_cache_ptr, slot * (HKV * ROW_K) + h * ROW_K, tmask, KIND_K, BITS_K, D, UNPACK)
        v0, v1, v_a, v_c = _load_tile(v_cache_ptr, slot * (HKV * ROW_V) + h * ROW_V, tmask, KIND_V, BITS_V, D, UNPACK)
        k_s = k0  # placeholder: the sign words, turbo_prod keys only (then carried through the loop like k0)
        if KIND_K == 2:
            k_s = _load_signs(k_cache_ptr, slot * (HKV * ROW_K) + h * ROW_K, tmask, BITS_K, D)
        v_s = v0
        if KIND_V == 2:
            v_s = _load_signs(v_cache_ptr, slot * (HKV * ROW_V) + h * ROW_V, tmask, BITS_V, D)
        t1 = t + BLOCK_N
        mask1 = t1 < end
        slot1 = _tile_slots(block_tables_ptr, b, stride_bt, t1, mask1, BLOCK_SIZE, OFF64)
        for t0 in range(start, end, BLOCK_N):
            t2 = t0 + 2 * BLOCK_N + tl.arange(0, BLOCK_N)
            mask2 = t2 < end
            slot2 = _tile_slots(block_tables_ptr, b, stride_bt, t2, mask2, BLOCK_SIZE, OFF64)
            k0n, k1n, k_an, k_cn = _load_tile(k_cache_ptr, slot1 * (HKV * ROW_K) + h * ROW_K, mask1, KIND_K,
                                              BITS_K, D, UNPACK)  # fmt: skip
            if KIND_K == 2:
                k_sn = _load_signs(k_cache_ptr, slot1 * (HKV * ROW_K) + h * ROW_K, mask1, BITS_K, D)
            v0n, v1n, v_an, v_cn = _load_tile(v_cache_ptr, slot1 * (HKV * ROW_V) + h * ROW_V, mask1, KIND_V,
                                              BITS_V, D, UNPACK)  # fmt: skip
            if KIND_V == 2:
                v_sn = _load_signs(v_cache_ptr, slot1 * (HKV * ROW_V) + h * ROW_V, mask1, BITS_V, D)
            m_i, l_i, acc, acc_qjl = _attend_tile(q, q_sum, q_sk, k0, k1, k_s, k_a, k_c, v0, v1, v_s, v_a, v_c, tmask,
                                                  m_i, l_i, acc, k_cb_ptr, v_cb_ptr, acc_qjl, KIND_K, BITS_K, KIND_V, BITS_V, D, BLOCK_N,
                                         UNPACK)  # fmt: skip
            k0, k1, k_a, k_c, v0, v1, v_a, v_c, tmask = k0n, k1n, k_an, k_cn, v0n, v1n, v_an, v_cn, mask1
            if KIND_K == 2:
                k_s = k_sn
            if KIND_V == 2:
                v_s = v_sn
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
    if KIND_V == 2:
        tl.store(part_qjl_ptr + part[:, None] * D + d[None, :], acc_qjl, mask=qmask[:, None])


@triton.jit
def _reduce_kernel(
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    packed_out_ptr,  # float32 (B, HQ, D): the packed part, still rotated (ROTATED_V only)
    part_qjl_ptr,  # float32 (B, HQ, S + 1, D), QJL_V only: the splits' QJL accumulators
    qjl_out_ptr,  # float32 (B, HQ, D), QJL_V only: their merge, still in the sketch's domain
    out_ptr,  # (B, HQ, D): the output, or the window part in float32 (ROTATED_V)
    HQ: tl.constexpr,
    D: tl.constexpr,
    NUM_SPLITS,
    SPLIT_CHUNK: tl.constexpr,
    ROTATED_V: tl.constexpr,
    QJL_V: tl.constexpr,
):
    """Merge the splits of one query head: one program per (query head, sequence), splits read in chunks."""
    qh = tl.program_id(0)
    b = tl.program_id(1)
    d = tl.arange(0, D)
    c = tl.arange(0, SPLIT_CHUNK)
    base = (b * HQ + qh) * (NUM_SPLITS + 1)
    m_max = tl.full((SPLIT_CHUNK,), float("-inf"), dtype=tl.float32)
    for s0 in range(0, NUM_SPLITS + 1, SPLIT_CHUNK):
        m_max = tl.maximum(m_max, tl.load(part_m_ptr + base + s0 + c, mask=s0 + c <= NUM_SPLITS, other=float("-inf")))
    m_all = tl.max(m_max, axis=0)
    l_tot = tl.zeros((SPLIT_CHUNK,), dtype=tl.float32)
    acc = tl.zeros((SPLIT_CHUNK, D), dtype=tl.float32)
    acc_qjl = acc
    for s0 in range(0, NUM_SPLITS, SPLIT_CHUNK):
        sm = s0 + c < NUM_SPLITS  # the packed splits; the window's is apart
        w = tl.exp2(tl.load(part_m_ptr + base + s0 + c, mask=sm, other=float("-inf")) - m_all)
        l_tot += w * tl.load(part_l_ptr + base + s0 + c, mask=sm, other=0.0)
        acc += w[:, None] * tl.load(
            part_acc_ptr + (base + s0 + c)[:, None] * D + d[None, :], mask=sm[:, None], other=0.0
        )
        if QJL_V:
            acc_qjl += w[:, None] * tl.load(
                part_qjl_ptr + (base + s0 + c)[:, None] * D + d[None, :], mask=sm[:, None], other=0.0
            )
    w_win = tl.exp2(tl.load(part_m_ptr + base + NUM_SPLITS) - m_all)
    l_all = tl.sum(l_tot, axis=0) + w_win * tl.load(part_l_ptr + base + NUM_SPLITS)
    packed = tl.sum(acc, axis=0) / l_all
    window = w_win * tl.load(part_acc_ptr + (base + NUM_SPLITS) * D + d) / l_all
    o = (b * HQ + qh) * D + d
    if QJL_V:
        tl.store(qjl_out_ptr + o, tl.sum(acc_qjl, axis=0) / l_all)
    if ROTATED_V:  # rotated back outside (one GEMM for the batch)
        tl.store(packed_out_ptr + o, packed)
        tl.store(out_ptr + o, window)
    else:
        tl.store(out_ptr + o, (packed + window).to(out_ptr.dtype.element_ty))


@functools.lru_cache(maxsize=8)
def _no_codebook(device: torch.device) -> torch.Tensor:
    """A float16 (16,) placeholder for the codebook argument of an ``int`` stream (read, never used)."""
    return torch.zeros(16, dtype=torch.float16, device=device)


def default_tuning(key_codec: PagedCodec, value_codec: PagedCodec) -> dict:
    """Launch parameters measured best on an H100 (batch 8, 32K context, Llama-3-8B heads; BENCHMARKS.md).

    ``int`` streams (no codebook): one warp per program, 32-token tiles, codes unpacked slot by slot.
    With a codebook (``turbo_mse``) the per-value gathers dominate and the broadcast unpack of two warps
    over 64-token tiles was faster.
    """
    return _tuning(key_codec.kind, value_codec.kind)


def _tuning(key_kind: str, value_kind: str) -> dict:
    if key_kind == "int" and value_kind == "int":
        return {"block_n": 32, "num_warps": 1, "waves": 32.0, "unpack": 1}
    return {"block_n": 64, "num_warps": 2, "waves": 32.0, "unpack": 0}


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
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
    waves: float | None = None,
    unpack: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the two kernels (inputs already checked by `kvpack.kernels.attention.decode`); returns ``(B, HQ, D)``.

    Tuning (``None``: `default_tuning`): ``block_n`` tokens per tile, ``num_warps``, ``waves`` (programs per SM
    that the split count aims at), ``unpack`` (see ``_dequant``). Loads are issued a tile ahead by hand
    (Triton's own pipeliner, ``tl.range(num_stages=n)``, was slower: BENCHMARKS.md).
    No host synchronisation: every length is read on the device, and the split count depends only
    on shapes (the block table's capacity), so a step can be captured in a CUDA graph.
    """
    return _launch(query, key_cache, value_cache, block_tables, seq_lens, window_keys, window_values, window_lens,
                   _KernelTables.of(key_codec), _KernelTables.of(value_codec), scale, num_splits, block_n, num_warps,
                   num_stages, waves, unpack, out)  # fmt: skip


@dataclass(frozen=True)
class _KernelTables:
    """What the launch reads of a `PagedCodec`: kind, code bits, float16 codebook, rotations, QJL sketch."""

    kind: str
    mse_bits: int
    codebook16: torch.Tensor | None
    rotation16: torch.Tensor | None
    unrotation: torch.Tensor | None
    sketch: torch.Tensor | None

    @staticmethod
    def of(fmt: PagedCodec) -> _KernelTables:
        return _KernelTables(fmt.kind, fmt.mse_bits, fmt.codebook16, fmt.rotation16, fmt.unrotation, fmt.sketch)


def _launch(query, key_cache, value_cache, block_tables, seq_lens, window_keys, window_values, window_lens,
            key_codec: _KernelTables, value_codec: _KernelTables, scale, num_splits=None, block_n=None,
            num_warps=None, num_stages=2, waves=None, unpack=None, out=None) -> torch.Tensor:  # fmt: skip
    tuned = _tuning(key_codec.kind, value_codec.kind)
    block_n = tuned["block_n"] if block_n is None else block_n
    num_warps = tuned["num_warps"] if num_warps is None else num_warps
    waves = tuned["waves"] if waves is None else waves
    unpack = tuned["unpack"] if unpack is None else unpack
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
    q_sketch = q_keys  # not read unless the keys are turbo_prod
    if key_codec.kind == "turbo_prod":  # sketch the query once too: the QJL part of the scores needs S q
        q_sketch = (query.float() @ key_codec.sketch.T * (math.sqrt(math.pi / 2) / d)).to(torch.float16)
    part_m = torch.empty(batch, hq, num_splits + 1, device=query.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(batch, hq, num_splits + 1, d, device=query.device, dtype=torch.float32)
    qjl_v = value_codec.kind == "turbo_prod"
    part_qjl = torch.empty_like(part_acc) if qjl_v else part_acc
    out = torch.empty_like(query) if out is None else out
    k_cb = key_codec.codebook16 if key_codec.codebook16 is not None else _no_codebook(query.device)
    v_cb = value_codec.codebook16 if value_codec.codebook16 is not None else _no_codebook(query.device)

    _split_kernel[(hkv, num_splits + 1, batch)](
        q_keys,
        q_sketch,
        query.contiguous(),
        key_cache.view(torch.int32),
        value_cache.view(torch.int32),
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
        part_qjl,
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
        BITS_K=key_codec.mse_bits,
        KIND_V=KIND_IDS[value_codec.kind],
        BITS_V=value_codec.mse_bits,
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        UNPACK=unpack,
        OFF64=max(key_cache.numel(), value_cache.numel()) // 4 >= 2**31,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    rotated_v = value_codec.unrotation is not None
    packed_part = torch.empty(batch, hq, d, device=query.device, dtype=torch.float32) if rotated_v else part_m
    window_part = torch.empty_like(packed_part) if rotated_v else out
    qjl_part = torch.empty_like(packed_part) if qjl_v else packed_part
    _reduce_kernel[(hq, batch)](
        part_m,
        part_l,
        part_acc,
        packed_part,
        part_qjl,
        qjl_part,
        window_part,
        HQ=hq,
        D=d,
        NUM_SPLITS=num_splits,
        SPLIT_CHUNK=16,
        ROTATED_V=rotated_v,
        QJL_V=qjl_v,
        num_warps=4,
    )
    if rotated_v:  # unrotate the packed values' part once: out = packed @ M_v.T + window
        torch.addmm(
            window_part.view(-1, d), packed_part.view(-1, d), value_codec.unrotation, out=window_part.view(-1, d)
        )
        if qjl_v:  # turbo_prod values: + residual_norm sqrt(pi/2) / D * S^T (2 signs - 1), merged
            window_part.view(-1, d).addmm_(qjl_part.view(-1, d), value_codec.sketch, alpha=math.sqrt(math.pi / 2) / d)
        out.copy_(window_part)
    return out


@torch.library.custom_op("kvpack::paged_decode", mutates_args=())
def paged_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    window_keys: torch.Tensor,
    window_values: torch.Tensor,
    window_lens: torch.Tensor,
    key_kind: str,
    key_bits: int,
    key_codebook16: torch.Tensor | None,
    key_rotation16: torch.Tensor | None,
    key_sketch: torch.Tensor | None,
    value_kind: str,
    value_bits: int,
    value_codebook16: torch.Tensor | None,
    value_unrotation: torch.Tensor | None,
    value_sketch: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """`paged_decode_attention` as the ``torch.library`` op ``kvpack::paged_decode`` (a fake implementation lets
    ``torch.compile`` trace through it; the launch has no host sync, so a compiled step replays in a CUDA graph).

    The codecs come as their kernel tables (``PagedCodec.kind``, ``mse_bits``, ``codebook16``, ``rotation16`` of
    the keys, ``unrotation`` of the values, ``sketch``): derived once by the caller, not per step. Inputs are not
    checked here (`kvpack.kernels.attention.decode` checks them; a graph-safe cache keeps them in range itself).
    """
    from kvpack.kernels.cuda_decode import launch_shape, uses_cuda_kernel

    if uses_cuda_kernel(query, key_cache, key_kind, key_bits, value_kind, value_bits):  # int and turbo_mse
        shape = launch_shape(query, key_cache, value_cache, block_tables, key_kind=key_kind, value_kind=value_kind,
                             window=window_keys.shape[1])  # fmt: skip
        return torch.ops.kvpack.cuda_paged_decode(query, key_cache, value_cache, block_tables, seq_lens, window_keys,
                                                  window_values, window_lens, key_rotation16, value_unrotation,
                                                  key_codebook16, value_codebook16, scale, *shape)  # fmt: skip
    keys = _KernelTables(key_kind, key_bits, key_codebook16, key_rotation16, None, key_sketch)
    values = _KernelTables(value_kind, value_bits, value_codebook16, None, value_unrotation, value_sketch)
    return _launch(query, key_cache, value_cache, block_tables, seq_lens, window_keys, window_values, window_lens,
                   keys, values, scale)  # fmt: skip


@paged_decode.register_fake
def _(query, key_cache, value_cache, block_tables, seq_lens, window_keys, window_values, window_lens, key_kind,
      key_bits, key_codebook16, key_rotation16, key_sketch, value_kind, value_bits, value_codebook16,
      value_unrotation, value_sketch, scale):  # fmt: skip
    return torch.empty_like(query)
