"""Triton fused encode: new K or V vectors -> packed rows of the paged cache, written through a slot mapping.

One program takes ``BLOCK_T`` tokens of one KV head of one stream (`paged_encode_kv`: the keys and the values in
one launch) and does, in registers: ``turbo_mse`` (TurboQuant,
Zandieh et al., arXiv 2504.19874): norm, ``x / norm``, rotation by ``M`` (a tensor-core dot, 3xTF32 on
the GPU so that it matches float32), bucketize against the Lloyd-Max boundaries (``idx = #{edges <
y}``, as ``torch.bucketize``), packing into the int32 words of the code planes, float16 norm; ``turbo_prod``:
the same at ``bits - 1`` bits, then the residual ``r = x - norm16 * unrotate(codebook[idx])`` in float32
(unrotation and sketch as two more dots), the sign plane of ``S r >= 0`` and float16 ``||r||``; ``int`` (axis token, one group,
KIVI-style): float16 ``zero = min`` and ``scale = (max - min) / (2^b - 1)``, ``round((x - zero) /
scale)`` half to even with an exact floor/fraction test. Rows go to ``slot_mapping[t]`` (negative:
skipped), as vLLM's ``reshape_and_cache``.

The codes equal the PyTorch codec's except where float32 rounding differs: the rotation's
summation order (and the norm's) differs from the BLAS one, so a rotated coordinate within about
1e-6 of a bucket boundary can land in the neighbouring bucket (``turbo_prod``: likewise a sketch
coordinate within rounding of 0 can flip its sign, and ``||r||`` can differ by one float16 step).
`int` is exact. The ``turbo_prod`` path is tested on an H100 but not tuned (each program holds M and
S.T, 64 KB each in float32 at D = 128).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvpack.kernels.paged import KIND_IDS, PagedCodec

__all__ = ["default_tiling", "paged_encode", "paged_encode_kv", "paged_encode_kv_op", "paged_encode_op"]


@triton.jit
def _store_plane(cache_ptr, row, codes, tmask, START: tl.constexpr, W: tl.constexpr, D: tl.constexpr,
                 N: tl.constexpr):  # fmt: skip
    """Codes (N, D) of a W-bit plane -> int32 words at word ``row + START`` (32 / W codes a word, lowest first)."""
    PER: tl.constexpr = 32 // W
    NW: tl.constexpr = D // PER
    k = tl.arange(0, PER)
    word = tl.sum(tl.reshape(codes, (N, NW, PER)) << (k * W)[None, None, :], axis=2)  # disjoint bits: sum == or
    tl.store(cache_ptr + row[:, None] + START + tl.arange(0, NW)[None, :], word, mask=tmask[:, None])


@triton.jit
def _matmul(a, b, DOT_PRECISION: tl.constexpr, BLOCK_T: tl.constexpr):
    """``a (BLOCK_T, D) @ b (D, D)`` in float32: a tensor-core dot for tiles of 16 tokens or more; below that (the few
    tokens of a decode step) a broadcast product summed on the CUDA cores (a dot pads its rows to 16, and its operand
    layouts took the rotated encode of one token to ~15 us on an H200)."""
    if BLOCK_T >= 16:
        out = tl.dot(a, b, input_precision=DOT_PRECISION)
    else:
        out = tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    return out


@triton.jit
def _encode_stream(
    x_ptr,  # (T, HKV, D) float
    slot_ptr,  # int64 (T,)
    cache_ptr,  # int32 view of the uint8 (num_blocks, block_size, HKV, row_bytes) cache
    rot_ptr,  # float32 (D, D): M (turbo_mse, turbo_prod)
    edges_ptr,  # float32 (2^BITS - 1,)
    cb_ptr,  # float32 (2^BITS,) codebook (turbo_prod: the residual needs the decoded mse stage)
    sk_ptr,  # float32 (D, D): the QJL sketch S (turbo_prod)
    num_tokens,
    num_programs,
    pid_t,
    h,
    HKV: tl.constexpr,
    D: tl.constexpr,
    KIND: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ROTATED: tl.constexpr,
):
    """Program ``pid_t`` of KV head ``h``: its tiles of ``BLOCK_T`` tokens of one stream (the module docstring)."""
    CODE_WORDS: tl.constexpr = D * BITS // 32  # turbo_prod: BITS is its mse stage's, the sign plane follows
    SIDE: tl.constexpr = CODE_WORDS + D // 32 if KIND == 2 else CODE_WORDS
    ROW: tl.constexpr = SIDE + 1  # int32 words: code planes, then the side word
    LEVELS: tl.constexpr = (1 << BITS) - 1
    d = tl.arange(0, D)
    if ROTATED:  # loaded once per program (persistent grid): the matrix is 64 KB at D = 128
        rot = tl.load(rot_ptr + d[:, None] * D + d[None, :])
    if KIND == 2:
        sketch_t = tl.load(sk_ptr + d[None, :] * D + d[:, None])  # S.T: S r = r @ S.T
    for tile in range(pid_t, tl.cdiv(num_tokens, BLOCK_T), num_programs):
        t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        slot = tl.load(slot_ptr + t, mask=t < num_tokens, other=-1)
        tmask = slot >= 0
        x = tl.load(x_ptr + (t.to(tl.int64)[:, None] * HKV + h) * D + d[None, :], mask=tmask[:, None], other=0.0)
        x = x.to(tl.float32)
        if KIND != 1:
            norm = tl.sqrt_rn(tl.sum(x * x, axis=1))
            unit = tl.math.div_rn(x, tl.where(norm > 0, norm, 1.0)[:, None])
            y = _matmul(unit, rot, DOT_PRECISION, BLOCK_T)
            idx = tl.zeros((BLOCK_T, D), dtype=tl.int32)
            for i in tl.static_range(LEVELS):
                idx += (y > tl.load(edges_ptr + i)).to(tl.int32)
            side0 = norm.to(tl.float16)
            if KIND == 2:  # the codec's residual: x - unrotate(codebook[idx]) * norm16, all float32
                mse = _matmul(tl.load(cb_ptr + idx), tl.trans(rot), DOT_PRECISION, BLOCK_T)
                res = x - mse * side0.to(tl.float32)[:, None]
                sign = (_matmul(res, sketch_t, DOT_PRECISION, BLOCK_T) >= 0).to(tl.int32)
                side1 = tl.sqrt_rn(tl.sum(res * res, axis=1)).to(tl.float16)
        else:
            if ROTATED:  # int with a rotation: quantize the rotated vector
                x = _matmul(x, rot, DOT_PRECISION, BLOCK_T)
            mn = tl.min(tl.where(tmask[:, None], x, float("inf")), axis=1)
            mx = tl.max(tl.where(tmask[:, None], x, float("-inf")), axis=1)
            zero16 = tl.where(tmask, mn, 0.0).to(tl.float16)
            scale16 = tl.math.div_rn(tl.where(tmask, mx - mn, 0.0), LEVELS * 1.0).to(tl.float16)
            scale16 = tl.where(scale16 == 0, 1.0, scale16.to(tl.float32)).to(tl.float16)
            v = tl.math.div_rn(x - zero16.to(tl.float32)[:, None], scale16.to(tl.float32)[:, None])
            r = tl.floor(v)
            frac = v - r  # exact for v >= -1
            odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
            r = tl.where((frac > 0.5) | ((frac == 0.5) & odd), r + 1.0, r)
            idx = tl.minimum(tl.maximum(r, 0.0), LEVELS * 1.0).to(tl.int32)
            side0 = scale16
            side1 = zero16
        row = slot * (HKV * ROW) + h * ROW
        if BITS == 3:  # planes: the 2 low bits, then the high bit
            _store_plane(cache_ptr, row, idx & 3, tmask, 0, 2, D, BLOCK_T)
            _store_plane(cache_ptr, row, idx >> 2, tmask, D // 16, 1, D, BLOCK_T)
        else:
            _store_plane(cache_ptr, row, idx, tmask, 0, BITS, D, BLOCK_T)
        if KIND == 2:
            _store_plane(cache_ptr, row, sign, tmask, CODE_WORDS, 1, D, BLOCK_T)
        lo = side0.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        if KIND != 0:  # int: zero; turbo_prod: residual norm
            lo = lo | (side1.to(tl.int16, bitcast=True).to(tl.int32) << 16)
        tl.store(cache_ptr + row + SIDE, lo, mask=tmask)  # turbo_mse: the norm and 2 zero bytes



@triton.jit
def _encode_kernel(
    x0, cache0, rot0, edges0, cb0, sk0,  # stream 0 (program_id(2) == 0)
    x1, cache1, rot1, edges1, cb1, sk1,  # stream 1: the values when K and V go in one launch (else unused)
    slot_ptr,
    num_tokens,
    num_programs,
    HKV: tl.constexpr,
    D: tl.constexpr,
    KIND0: tl.constexpr,
    BITS0: tl.constexpr,
    ROTATED0: tl.constexpr,
    KIND1: tl.constexpr,
    BITS1: tl.constexpr,
    ROTATED1: tl.constexpr,
    STREAMS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    if tl.program_id(2) == 0:
        _encode_stream(x0, slot_ptr, cache0, rot0, edges0, cb0, sk0, num_tokens, num_programs, pid_t, h, HKV, D,
                       KIND0, BITS0, BLOCK_T, DOT_PRECISION, ROTATED0)  # fmt: skip
    else:
        if STREAMS == 2:  # compiled only for a two-stream launch
            _encode_stream(x1, slot_ptr, cache1, rot1, edges1, cb1, sk1, num_tokens, num_programs, pid_t, h, HKV,
                           D, KIND1, BITS1, BLOCK_T, DOT_PRECISION, ROTATED1)  # fmt: skip


TILE_TOKENS, NUM_WARPS, PROGRAMS_PER_SM = 32, 8, 4  # the default tiling: tokens per tile, warps, programs per SM
# One token per tile, its products summed on the CUDA cores (no tensor-core dot), for a decode step's few tokens (one
# per sequence, up to FEW_TOKENS; each program's token then runs in parallel) and for rotated streams at head_dim
# above 128 (the dot's operand layouts of a 256 x 256 float32 matrix asked for 576 KB of shared memory: no launch).
# Compiled for sm_90 (benchmarks/encode_sweep.py --decode times it): 4 warps hold M at head_dim 128 without spills
# (167 registers; 2 warps spilled), head_dim 256 needs 8 (255 registers and a small spill).
FEW_TOKENS, FEW_TILE_TOKENS = 16, 1


def default_tiling(tokens: int, head_dim: int, rotated: bool) -> tuple[int, int]:
    """``(tokens per tile, warps)`` of an encode of ``tokens`` tokens, ``rotated``: some stream multiplies by a
    rotation (turbo codecs, rotated int). Shapes only: the same when traced and when replayed."""
    if tokens <= FEW_TOKENS or (rotated and head_dim > 128):
        return FEW_TILE_TOKENS, 4 if head_dim <= 128 else 8
    return TILE_TOKENS, NUM_WARPS


def _check_encode(x: torch.Tensor, slot_mapping: torch.Tensor, cache: torch.Tensor, codec: PagedCodec,
                  name: str = "x") -> None:  # fmt: skip
    if not isinstance(codec, PagedCodec):
        raise TypeError(f"codec must be a PagedCodec, got {type(codec).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a float tensor (tokens, kv_heads, head_dim), got {getattr(x, 'shape', x)!r}")
    if cache.dtype != torch.uint8 or cache.dim() != 4 or cache.shape[2:] != (x.shape[1], codec.row_bytes):
        raise ValueError(
            f"cache must be uint8 (num_blocks, block_size, {x.shape[1]}, {codec.row_bytes}), got {tuple(cache.shape)}"
        )
    if x.shape[-1] != codec.head_dim:
        raise ValueError(f"{name}'s last dim must be head_dim={codec.head_dim}, got {x.shape[-1]}")
    if slot_mapping.dtype != torch.int64 or tuple(slot_mapping.shape) != (x.shape[0],):
        raise TypeError(
            f"slot_mapping must be int64 ({x.shape[0]},), got {slot_mapping.dtype} {tuple(slot_mapping.shape)}"
        )


def paged_encode(
    x: torch.Tensor,
    slot_mapping: torch.Tensor,
    cache: torch.Tensor,
    codec: PagedCodec,
    block_t: int = 0,
    num_warps: int = 0,
    programs_per_sm: int = PROGRAMS_PER_SM,
) -> None:
    """Encode ``x`` (tokens, kv_heads, D) into ``cache`` (num_blocks, block_size, kv_heads, row_bytes) at
    ``slot_mapping``. ``block_t`` (tokens per tile, a power of two), ``num_warps``: 0 for `default_tiling`."""
    _check_encode(x, slot_mapping, cache, codec)
    paged_encode_op(x, slot_mapping, cache, codec.kind, codec.mse_bits, codec.rotation, codec.boundaries,
                    codec.codebook, codec.sketch, block_t, num_warps, programs_per_sm)  # fmt: skip


def paged_encode_kv(keys: torch.Tensor, values: torch.Tensor, slot_mapping: torch.Tensor, key_cache: torch.Tensor,
                    value_cache: torch.Tensor, key_codec: PagedCodec, value_codec: PagedCodec) -> None:  # fmt: skip
    """`paged_encode` of the keys and the values at the same slots in one launch (a decode step encodes one token
    per row and stream: two launches of a few programs each ran one after the other)."""
    _check_encode(keys, slot_mapping, key_cache, key_codec, "keys")
    if isinstance(values, torch.Tensor) and values.shape[:2] != keys.shape[:2]:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must have the same tokens and heads")
    _check_encode(values, slot_mapping, value_cache, value_codec, "values")
    k, v = key_codec, value_codec
    paged_encode_kv_op(keys, values, slot_mapping, key_cache, value_cache, k.kind, k.mse_bits, k.rotation,
                       k.boundaries, k.codebook, k.sketch, v.kind, v.mse_bits, v.rotation, v.boundaries, v.codebook,
                       v.sketch)  # fmt: skip


def _tables(x: torch.Tensor, slot_mapping, kind: str, rotation, boundaries, codebook, sketch) -> tuple:
    """One stream's kernel arguments: x, then its float32 tables (the slot mapping where a table is not read)."""
    turbo = kind != "int"
    return (
        x.contiguous(),
        rotation.float().contiguous() if rotation is not None else slot_mapping,
        boundaries.float().contiguous() if turbo else slot_mapping,
        codebook.float().contiguous() if turbo else slot_mapping,
        sketch.float().contiguous() if kind == "turbo_prod" else slot_mapping,
    )


def _launch(streams: list[tuple], slot_mapping: torch.Tensor, block_t: int, num_warps: int,
            programs_per_sm: int) -> None:  # fmt: skip
    """One launch over 1 or 2 streams, each ``(x, cache, kind, bits, rotation, boundaries, codebook, sketch)``."""
    args, consts = [], []
    for x, cache, kind, bits, rotation, boundaries, codebook, sketch in streams + streams[:1] * (2 - len(streams)):
        x_, rot, edges, cb, sk = _tables(x, slot_mapping, kind, rotation, boundaries, codebook, sketch)
        args += [x_, cache.view(torch.int32), rot, edges, cb, sk]
        consts += [KIND_IDS[kind], bits, rotation is not None]
    x = streams[0][0]
    num_sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    rotated = any(kind != "int" or rotation is not None for _, _, kind, _, rotation, *_ in streams)
    default_t, default_warps = default_tiling(x.shape[0], x.shape[-1], rotated)
    block_t, num_warps = block_t or default_t, num_warps or default_warps
    programs = max(1, min(triton.cdiv(x.shape[0], block_t), triton.cdiv(programs_per_sm * num_sms, x.shape[1])))
    _encode_kernel[(programs, x.shape[1], len(streams))](
        *args, slot_mapping, x.shape[0], programs, HKV=x.shape[1], D=x.shape[-1], KIND0=consts[0], BITS0=consts[1],
        ROTATED0=consts[2], KIND1=consts[3], BITS1=consts[4], ROTATED1=consts[5], STREAMS=len(streams),
        BLOCK_T=block_t, DOT_PRECISION="tf32x3" if x.is_cuda else "ieee", num_warps=num_warps,
    )  # fmt: skip


@torch.library.custom_op("kvpack::paged_encode", mutates_args=("cache",))
def paged_encode_op(
    x: torch.Tensor,
    slot_mapping: torch.Tensor,
    cache: torch.Tensor,
    kind: str,
    bits: int,
    rotation: torch.Tensor | None,
    boundaries: torch.Tensor | None,
    codebook: torch.Tensor | None,
    sketch: torch.Tensor | None,
    block_t: int = 0,
    num_warps: int = 0,
    programs_per_sm: int = PROGRAMS_PER_SM,
) -> None:
    """The launch of `paged_encode` as the ``torch.library`` op ``kvpack::paged_encode`` (it writes ``cache`` in
    place; ``torch.compile`` traces through it and a CUDA graph captures it). ``bits``: the code bits
    (``PagedCodec.mse_bits``); tables as `PagedCodec` holds them. Inputs are not checked here (`paged_encode` does)."""
    _launch([(x, cache, kind, bits, rotation, boundaries, codebook, sketch)], slot_mapping, block_t, num_warps,
            programs_per_sm)  # fmt: skip


@paged_encode_op.register_fake
def _(x, slot_mapping, cache, kind, bits, rotation, boundaries, codebook, sketch, block_t=0, num_warps=0,
      programs_per_sm=PROGRAMS_PER_SM):  # fmt: skip
    return None


@torch.library.custom_op("kvpack::paged_encode_kv", mutates_args=("key_cache", "value_cache"))
def paged_encode_kv_op(
    keys: torch.Tensor,
    values: torch.Tensor,
    slot_mapping: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key_kind: str,
    key_bits: int,
    key_rotation: torch.Tensor | None,
    key_boundaries: torch.Tensor | None,
    key_codebook: torch.Tensor | None,
    key_sketch: torch.Tensor | None,
    value_kind: str,
    value_bits: int,
    value_rotation: torch.Tensor | None,
    value_boundaries: torch.Tensor | None,
    value_codebook: torch.Tensor | None,
    value_sketch: torch.Tensor | None,
) -> None:
    """`paged_encode_kv` as the op ``kvpack::paged_encode_kv``: both caches written in place by one launch
    (`default_tiling`). Inputs are not checked here."""
    _launch([(keys, key_cache, key_kind, key_bits, key_rotation, key_boundaries, key_codebook, key_sketch),
             (values, value_cache, value_kind, value_bits, value_rotation, value_boundaries, value_codebook,
              value_sketch)], slot_mapping, 0, 0, PROGRAMS_PER_SM)  # fmt: skip


@paged_encode_kv_op.register_fake
def _(keys, values, slot_mapping, key_cache, value_cache, key_kind, key_bits, key_rotation, key_boundaries,
      key_codebook, key_sketch, value_kind, value_bits, value_rotation, value_boundaries, value_codebook,
      value_sketch):  # fmt: skip
    return None
