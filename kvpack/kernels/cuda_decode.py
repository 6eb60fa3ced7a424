"""CUDA decode attention over paged packed KV, compiled by NVRTC: ``int`` (token axis, per-token scale/zero, 2-4 or
8 bits, any rotation) and ``turbo_mse`` (1-4 bits) keys and values, each stream its own codec and bits.

The kernel source is ``cuda_decode.cu`` beside this file (it says how the tensor-core fragments are laid out and
how each codec's codes become fp16). `paged_cuda_decode` has the contract of
`kvpack.kernels.decode_attention.paged_decode_attention`: query ``(B, Hq, D)`` fp16/bf16, uint8 paged caches
``(num_blocks, block_size, Hkv, D * bits / 8 + 4)`` (compiled at first use of a pair of codecs), int32 block tables
``(B, max_blocks)`` and lengths ``(B,)``, a 16-bit window ``(B, W, Hkv, D)`` -> ``(B, Hq, D)`` in the query's
dtype. It is the ``torch.library`` op ``kvpack::cuda_paged_decode`` (with a fake implementation, so
``torch.compile`` traces through it); no host synchronisation, so a step can be captured in a CUDA graph.
Launches: the query rotated into the keys' basis (``kvpack_rotate_query``, rotated keys only), the split decode
(``kvpack_cuda_decode``), the merge of its splits (``kvpack_cuda_reduce``, which also takes rotated values back to
their basis; ``kvpack_cuda_reduce_dims``, a CTA per 32 dims, for unrotated values at few sequences): at most three
kernels per layer for every codec pair.

Compilation: ``cuda.core`` (pip ``cuda-core``, ``cuda-bindings``, ``nvidia-cuda-nvrtc``; no CUDA toolkit) turns
the source plus one set of macros (head_dim, code bits, GQA, KV heads, heads per CTA, page size, pipeline depth) into a
cubin for the device's architecture, cached on disk under ``$KVPACK_CACHE`` (default ``~/.cache/kvpack``).
Bytes per decode step: ``B * Hkv * seq_len * (D * (key_bits + value_bits) / 8 + 8)`` packed plus the window, read once.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kvpack.kernels.paged import PagedCodec

__all__ = [
    "Variant", "compile_variant", "cuda_supported", "launch_shape", "paged_cuda_decode", "reduce_by_dims",
    "uses_cuda_kernel", "variant_for", "window_per_split", "window_splits",
]  # fmt: skip

LOG2E = 1.4426950408889634
SOURCE = Path(__file__).with_name("cuda_decode.cu")
HEAD_DIMS = (64, 128, 256)
KIND_IDS = {"int": 0, "turbo_mse": 1}  # the kernel's KKIND / VKIND
BITS = {"int": (2, 3, 4, 8), "turbo_mse": (1, 2, 3, 4)}  # code bits of each kind, K and V each
MAX_GQA = 16
# copies of a 4-bit turbo_mse table: 32 KB each, on top of the pipeline (opted in above 48 KB); H200, 8 / 32K and
# 32 / 128K: 1 copy 218 / 3251 us, 8: 221 / 3331, 16: 193 / 2791, 32: 183 / 2578 (no bank conflicts)
TABLE_COPIES = 32
REDUCE_WARPS = 8  # RW of cuda_decode.cu: warps of the split-merging kernel
ROTATE_ROWS = 4  # RQ of cuda_decode.cu: query rows per CTA of the rotation kernel
# Below this many sequences a CTA takes at most 4 KV heads and the window is split over CTAs (H200, batch 1 / 32K,
# int:4: 4 heads per CTA 35.7-40.8 us at 64-256 splits, 8 heads 39.4-48.6; BENCHMARKS.md)
SMALL_BATCH = 8
# Packed tokens per split at least (H200, batch 1 / 32K, graph replay of the whole op: int:4 one wave of 4-head CTAs,
# 260 splits of 128 tokens, 38.8 us, 128 splits 35.7; the 4bit rule's turbo_mse:4 / rotated int:4 50.1 vs 48.1-48.3;
# each split's prologue and its part in the merge cost more than a fuller wave gains; BENCHMARKS.md, tenth session)
MIN_SPLIT_TOKENS = 256
WINDOW_PER_SPLIT = 32  # 16-bit window tokens per CTA below SMALL_BATCH (else one CTA takes the whole window)


def window_per_split(batch: int, window: int) -> int:
    """Window tokens per CTA (``window``: the window's capacity, a static shape): `WINDOW_PER_SPLIT` at small batch,
    where one CTA's 132 window tokens were the launch's tail; else all of them (at batch 32 / 128K five window CTAs
    per sequence took slots from the packed splits: 3561 us, one CTA 1643 us)."""
    return WINDOW_PER_SPLIT if batch < SMALL_BATCH else max(16, math.ceil(window / 16) * 16)


def window_splits(batch: int, window: int) -> int:
    """CTAs of the 16-bit window per KV-head group and sequence."""
    return max(1, math.ceil(window / window_per_split(batch, window)))


def _stream_supported(kind: str, bits: int, head_dim: int, key: bool) -> bool:
    """A thread reads whole 32-bit words of a key's main plane (D/4 dims: no 1-bit keys at head_dim 64)."""
    if kind not in BITS or bits not in BITS[kind]:
        return False
    plane = 2 if bits == 3 else bits
    return not key or head_dim // 4 * plane >= 32


@dataclass(frozen=True)
class Variant:
    """One compiled kernel: the macros of ``cuda_decode.cu``."""

    head_dim: int
    gqa: int
    kv_heads: int
    heads_per_cta: int
    block_size: int
    stages: int
    out_bf16: bool
    min_blocks: int = 0  # > 0: registers capped so that this many CTAs fit on an SM (may spill)
    key_bits: int = 4
    value_bits: int = 4
    key_kind: str = "int"
    value_kind: str = "int"
    table_copies: int = TABLE_COPIES  # of a 4-bit turbo_mse table in shared memory (fewer bank conflicts; 32: none)

    def __post_init__(self) -> None:
        if self.head_dim not in HEAD_DIMS:
            raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {self.head_dim}")
        if not 1 <= self.gqa <= MAX_GQA:
            raise ValueError(f"gqa must be in [1, {MAX_GQA}], got {self.gqa}")
        if self.kv_heads % self.heads_per_cta or not 1 <= self.heads_per_cta <= 16:
            raise ValueError(f"heads_per_cta ({self.heads_per_cta}) must divide kv_heads ({self.kv_heads}), <= 16")
        if self.block_size % 16 or self.block_size < 16:
            raise ValueError(f"block_size must be a multiple of 16, got {self.block_size}")
        if self.table_copies not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"table_copies must be 1, 2, 4, 8, 16 or 32, got {self.table_copies!r}")
        if not 2 <= self.stages <= 8:
            raise ValueError(f"stages must be in [2, 8], got {self.stages}")
        for stream in ("key", "value"):
            kind, bits = getattr(self, f"{stream}_kind"), getattr(self, f"{stream}_bits")
            if not _stream_supported(kind, bits, self.head_dim, stream == "key"):
                raise ValueError(f"{stream}_kind/{stream}_bits: {kind}:{bits} at head_dim {self.head_dim} is not "
                                 f"in this kernel (kinds and bits {BITS}; keys read >= 32 bits per thread)")

    @property
    def rows(self) -> tuple[int, int]:
        """Bytes of one token of one KV head, K and V: the codes, then 4 side bytes (scale and zero, or the norm)."""
        return self.head_dim * self.key_bits // 8 + 4, self.head_dim * self.value_bits // 8 + 4

    @property
    def chunk(self) -> int:
        """cp.async width: 16 bytes when every copied run of ``heads_per_cta`` rows starts 16-byte aligned, else 4."""
        aligned = all((h * r) % 16 == 0 for h in (self.heads_per_cta, self.kv_heads) for r in self.rows)
        return 16 if aligned else 4

    @property
    def table_words(self) -> int:
        """32-bit words of the turbo_mse tables in shared memory (4 bits: 256 per copy, 3 bits: 32, 2 bits: 16; else 0)."""
        words = {4: 256 * self.table_copies, 3: 32, 2: 16}
        return sum(words.get(b, 0) for k, b in ((self.key_kind, self.key_bits), (self.value_kind, self.value_bits))
                   if k == "turbo_mse")  # fmt: skip

    @property
    def smem_bytes(self) -> int:
        stages = self.stages * 16 * self.heads_per_cta * sum(self.rows)
        return (stages + 15) // 16 * 16 + 4 * self.table_words

    def defines(self) -> list[tuple[str, str]]:
        values = {"D": self.head_dim, "GQA": self.gqa, "HKV": self.kv_heads, "HG": self.heads_per_cta,
                  "BLOCK_SIZE": self.block_size, "STAGES": self.stages, "CHUNK": self.chunk,
                  "OUT_BF16": int(self.out_bf16), "MINB": self.min_blocks, "KBITS": self.key_bits,
                  "VBITS": self.value_bits, "KKIND": KIND_IDS[self.key_kind],
                  "VKIND": KIND_IDS[self.value_kind], "TREP": self.table_copies}  # fmt: skip
        return [(k, str(v)) for k, v in values.items()]


def cuda_supported(key_kind: str, key_bits: int, value_kind: str, value_bits: int, head_dim: int,
                   block_size: int, gqa: int) -> bool:  # fmt: skip
    """Whether this kernel takes the streams: ``int`` (token axis, any rotation) or ``turbo_mse`` K and V at the bits
    of `BITS` each (no 1-bit keys at head_dim 64), head_dim 64/128/256, GQA 1-16, pages of 16k tokens."""
    return (
        head_dim in HEAD_DIMS and block_size % 16 == 0 and 1 <= gqa <= MAX_GQA
        and _stream_supported(key_kind, key_bits, head_dim, True)
        and _stream_supported(value_kind, value_bits, head_dim, False)
    )  # fmt: skip


# This kernel at every batch where it takes the codecs, Triton for the rest (H200, graph replay, Llama-3-8B heads,
# 132-token window; with the window split over CTAs at small batch): int:4 1 / 32K 38.6 vs 58.7 us, 4 / 32K 75.8 vs
# 190, 1 / 128K 78.2 vs 178.9; turbo_mse:4 1 / 32K 63.1 vs 76.9, 4 / 32K 140.6 vs 224.8; batch 8 / 32K int:4 118 vs
# 259, turbo_mse:4 193 vs 390.
MIN_BATCH = 1


def uses_cuda_kernel(query: torch.Tensor, key_cache: torch.Tensor, key_kind: str, key_bits: int,
                     value_kind: str, value_bits: int) -> bool:  # fmt: skip
    """The dispatch rule of every CUDA decode (`kvpack.kernels.attention.decode`, the ``kvpack::paged_decode`` op
    of the caches): this kernel where it takes the codecs (and the batch is at least `MIN_BATCH`), else Triton.
    Shapes only: a compiled step makes the same choice when traced and when replayed."""
    batch, hq, d = query.shape
    _, block_size, hkv, _ = key_cache.shape
    return (
        query.is_cuda and batch >= MIN_BATCH
        and cuda_supported(key_kind, key_bits, value_kind, value_bits, d, block_size, hq // hkv)
    )  # fmt: skip


def variant_for(query: torch.Tensor, key_cache: torch.Tensor, heads_per_cta: int | None = None,
                stages: int | None = None, min_blocks: int = 0, value_cache: torch.Tensor | None = None,
                key_kind: str = "int", value_kind: str = "int",
                table_copies: int | None = None) -> Variant:  # fmt: skip
    """The kernel variant of these shapes (code bits from the pools' row bytes; ``value_cache`` ``None``: as the keys);
    default: up to 8 KV heads per CTA (4 below `SMALL_BATCH` sequences: more, smaller CTAs), a pipeline in 48 KB of
    shared memory, `TABLE_COPIES` of a 4-bit table."""
    batch, hq, d = query.shape
    _, block_size, hkv, _ = key_cache.shape
    key_bits = (key_cache.shape[-1] - 4) * 8 // d
    value_bits = key_bits if value_cache is None else (value_cache.shape[-1] - 4) * 8 // d
    tile = 16 * (d * (key_bits + value_bits) // 8 + 8)  # one stage of one KV head
    if heads_per_cta is None:
        widest = 4 if batch < SMALL_BATCH else 8
        heads_per_cta = max(x for x in (1, 2, 4, 8) if hkv % x == 0 and x <= widest)
        while heads_per_cta > 1 and 2 * tile * heads_per_cta > (48 << 10):
            heads_per_cta //= 2  # two stages must fit the 48 KB launch limit (head_dim 256: measured INVALID_VALUE)
    if stages is None:
        stages = max(2, min(4, (48 << 10) // (tile * heads_per_cta)))
    return Variant(d, hq // hkv, hkv, heads_per_cta, block_size, stages, query.dtype == torch.bfloat16, min_blocks,
                   key_bits, value_bits, key_kind, value_kind, table_copies or TABLE_COPIES)  # fmt: skip


def _cache_dir() -> Path:
    return Path(os.environ.get("KVPACK_CACHE", Path.home() / ".cache" / "kvpack")) / "cubin"


def compile_variant(variant: Variant, arch: str) -> bytes:
    """Cubin of ``variant`` for ``arch`` (e.g. ``"sm_90"``): NVRTC through ``cuda.core``, cached on disk by content."""
    from cuda.core import Program, ProgramOptions

    source = SOURCE.read_text()
    key = hashlib.sha256(f"{source}\n{variant.defines()}\n{arch}".encode()).hexdigest()[:24]
    path = _cache_dir() / f"cuda_decode_{key}.cubin"
    if path.exists():
        return path.read_bytes()
    options = ProgramOptions(arch=arch, std="c++17", define_macro=variant.defines())
    cubin = bytes(Program(source, "c++", options=options).compile("cubin").code)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(cubin)
        tmp.replace(path)  # atomic: concurrent first uses never read half a file
    except OSError:
        pass  # a read-only home still works, uncached
    return cubin


@functools.cache
def _kernels(variant: Variant, device_index: int):
    from cuda.core import Device, ObjectCode

    dev = Device(device_index)
    dev.set_current()
    major, minor = dev.compute_capability
    code = ObjectCode.from_cubin(compile_variant(variant, f"sm_{major}{minor}"))
    decode_kernel = code.get_kernel("kvpack_cuda_decode")
    if variant.smem_bytes > (48 << 10):  # dynamic shared memory beyond 48 KB needs an opt-in per kernel
        _allow_shared_memory(decode_kernel, variant.smem_bytes, device_index)
    return (decode_kernel, code.get_kernel("kvpack_cuda_reduce"), code.get_kernel("kvpack_rotate_query"),
            code.get_kernel("kvpack_cuda_reduce_dims"))


def _allow_shared_memory(kernel, nbytes: int, device_index: int) -> None:
    from cuda.bindings import driver

    attr = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    handle = kernel.handle
    if isinstance(handle, driver.CUkernel):
        (err,) = driver.cuKernelSetAttribute(attr, nbytes, handle, driver.CUdevice(device_index))
    else:
        (err,) = driver.cuFuncSetAttribute(handle, attr, nbytes)
    if err != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cannot allow {nbytes} bytes of shared memory for the decode kernel: {err}")


class _TorchStream:
    """torch's current CUDA stream in the ``__cuda_stream__`` protocol (captured into torch's CUDA graphs)."""

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.handle)


@functools.lru_cache(maxsize=64)
def _stream(handle: int, device_index: int):
    from cuda.core import Device

    return Device(device_index).create_stream(_TorchStream(handle))


def _ptr(t: torch.Tensor):
    import numpy as np

    return np.uint64(t.data_ptr())


@torch.library.custom_op("kvpack::cuda_paged_decode", mutates_args=())
def cuda_paged_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    window_keys: torch.Tensor,
    window_values: torch.Tensor,
    window_lens: torch.Tensor,
    key_rotation: torch.Tensor | None,
    value_unrotation: torch.Tensor | None,
    key_codebook16: torch.Tensor | None,
    value_codebook16: torch.Tensor | None,
    scale: float,
    num_splits: int,
    heads_per_cta: int,
    stages: int,
    min_blocks: int = 0,
    table_copies: int = 0,
) -> torch.Tensor:
    """``key_codebook16``/``value_codebook16``: the fp16 codebook of a ``turbo_mse`` stream, ``None`` for ``int``;
    ``key_rotation``: ``M`` of rotated keys (``q @ M`` goes to the kernel); 0 for a tuning knob: its default."""
    import numpy as np
    from cuda.core import LaunchConfig, launch

    batch, hq, d = query.shape
    num_blocks, _, hkv, _ = key_cache.shape
    key_kind = "int" if key_codebook16 is None else "turbo_mse"
    value_kind = "int" if value_codebook16 is None else "turbo_mse"
    variant = variant_for(query, key_cache, heads_per_cta or None, stages or None, min_blocks, value_cache, key_kind,
                          value_kind, table_copies or None)  # fmt: skip
    dev = query.device.index if query.device.index is not None else torch.cuda.current_device()
    decode_kernel, reduce_kernel, rotate_kernel, reduce_dims_kernel = _kernels(variant, dev)
    stream = _stream(torch.cuda.current_stream(query.device).cuda_stream, dev)
    qscale = scale * LOG2E  # the softmax scale and log2(e) go into the query in the kernel, which also sums it
    q_window = query.contiguous()
    i32 = np.int32
    q_keys = q_window
    if key_rotation is not None:  # rotated keys: q @ M in float32 (one launch), rounded to fp16 in the decode
        rotation = key_rotation.contiguous() if key_rotation.dtype in (torch.float16, torch.float32) else (
            key_rotation.float().contiguous())
        q_keys = torch.empty(batch, hq, d, device=query.device, dtype=torch.float32)
        launch(stream, LaunchConfig(grid=(math.ceil(batch * hq / ROTATE_ROWS),), block=256), rotate_kernel,
               _ptr(q_window), _ptr(rotation), _ptr(q_keys), i32(batch * hq),
               i32(rotation.dtype == torch.float32))  # fmt: skip
    wk = window_keys.to(torch.float16).contiguous()
    wv = window_values.to(torch.float16).contiguous()
    capacity = block_tables.shape[1] * key_cache.shape[1]
    tokens_per_split = math.ceil(capacity / num_splits / 16) * 16
    num_splits = max(1, math.ceil(capacity / tokens_per_split))
    parts = num_splits + window_splits(batch, wk.shape[1])
    part_m = torch.empty(batch, hq, parts, device=query.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(batch, hq, parts, d, device=query.device, dtype=torch.float32)
    grid = (parts, hkv // variant.heads_per_cta, batch)
    config = LaunchConfig(grid=grid, block=32 * variant.heads_per_cta, shmem_size=variant.smem_bytes)
    launch(stream, config, decode_kernel, _ptr(q_keys), _ptr(q_window), _ptr(key_cache),
           _ptr(value_cache), _ptr(block_tables), _ptr(seq_lens), _ptr(wk), _ptr(wv), _ptr(window_lens),
           _ptr(part_m), _ptr(part_l), _ptr(part_acc), _ptr(part_m if key_codebook16 is None else key_codebook16),
           _ptr(part_m if value_codebook16 is None else value_codebook16), i32(num_blocks), i32(block_tables.shape[1]),
           i32(wk.shape[1]), i32(tokens_per_split), i32(num_splits), i32(window_per_split(batch, wk.shape[1])),
           i32(parts), i32(key_rotation is not None), np.float32(qscale))  # fmt: skip
    out = torch.empty_like(query)
    # rotated values: the merge takes the packed part back to the values' basis (out = packed @ M_v.T + window)
    unrotation = None if value_unrotation is None else value_unrotation.float().contiguous()
    if unrotation is None and reduce_by_dims(batch, hq, query.device):
        launch(stream, LaunchConfig(grid=(hq, batch, d // 32), block=32 * REDUCE_WARPS), reduce_dims_kernel,
               _ptr(part_m), _ptr(part_l), _ptr(part_acc), _ptr(out), i32(hq), i32(parts))  # fmt: skip
        return out
    launch(stream, LaunchConfig(grid=(hq, batch), block=32 * REDUCE_WARPS), reduce_kernel, _ptr(part_m),
           _ptr(part_l), _ptr(part_acc), np.uint64(0) if unrotation is None else _ptr(unrotation), _ptr(out),
           i32(hq), i32(num_splits), i32(parts))  # fmt: skip
    return out


def reduce_by_dims(batch: int, hq: int, device: torch.device) -> bool:
    """Whether the merge of unrotated values takes a CTA per 32 dims (``kvpack_cuda_reduce_dims``): when one CTA per
    (query head, sequence) would leave SMs idle (fewer such pairs than SMs). Shapes only (graph safe)."""
    return batch * hq < torch.cuda.get_device_properties(device).multi_processor_count


@cuda_paged_decode.register_fake
def _(query, key_cache, value_cache, block_tables, seq_lens, window_keys, window_values, window_lens, key_rotation,
      value_unrotation, key_codebook16, value_codebook16, scale, num_splits, heads_per_cta, stages, min_blocks=0,
      table_copies=0):  # fmt: skip
    return torch.empty_like(query)


@functools.cache
def _resident_ctas(variant: Variant, device_index: int) -> int:
    """CTAs of ``variant`` that the whole GPU holds at once (registers and shared memory per SM)."""
    decode_kernel = _kernels(variant, device_index)[0]
    per_sm = decode_kernel.occupancy.max_active_blocks_per_multiprocessor(32 * variant.heads_per_cta,
                                                                          variant.smem_bytes)  # fmt: skip
    return max(1, per_sm) * torch.cuda.get_device_properties(device_index).multi_processor_count


def default_splits(variant: Variant, batch: int, capacity: int, device: torch.device, waves: int = 1,
                   window: int = 0) -> int:  # fmt: skip
    """Splits of the packed tokens such that the grid (``splits + window_splits(batch, window)`` CTAs per KV-head
    group and sequence) fills ``waves`` whole waves of the CTAs that fit on the GPU at once (a partial last wave
    leaves SMs idle while it runs), each split at least `MIN_SPLIT_TOKENS` tokens."""
    dev = device.index if device.index is not None else torch.cuda.current_device()
    resident = _resident_ctas(variant, dev)
    ctas = batch * (variant.kv_heads // variant.heads_per_cta)
    return max(1, min(waves * resident // ctas - window_splits(batch, window), math.ceil(capacity / MIN_SPLIT_TOKENS)))


def launch_shape(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor,
                 num_splits: int | None = None, heads_per_cta: int | None = None, stages: int | None = None,
                 min_blocks: int = 0, key_kind: str = "int", value_kind: str = "int",
                 table_copies: int | None = None, window: int = 0) -> tuple[int, int, int, int, int]:  # fmt: skip
    """``(num_splits, heads_per_cta, stages, min_blocks, table_copies)`` of the op for these shapes (``None``: the
    defaults; ``window``: the 16-bit window's capacity)."""
    variant = variant_for(query, key_cache, heads_per_cta, stages, min_blocks, value_cache, key_kind, value_kind,
                          table_copies)  # fmt: skip
    if num_splits is None:
        num_splits = default_splits(variant, query.shape[0], block_tables.shape[1] * key_cache.shape[1], query.device,
                                    window=window)  # fmt: skip
    return int(num_splits), variant.heads_per_cta, variant.stages, min_blocks, variant.table_copies


def paged_cuda_decode(
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
    heads_per_cta: int | None = None,
    stages: int | None = None,
    out: torch.Tensor | None = None,
    min_blocks: int = 0,
    table_copies: int | None = None,
) -> torch.Tensor:
    """Launch the op (inputs checked by `kvpack.kernels.attention.decode`); ``num_splits`` depends on shapes only.
    ``key_codec``/``value_codec``: `PagedCodec` (or anything with its ``kind``, ``rotation``, ``unrotation``,
    ``codebook16``)."""
    shape = launch_shape(query, key_cache, value_cache, block_tables, num_splits, heads_per_cta, stages, min_blocks,
                         key_codec.kind, value_codec.kind, table_copies, window_keys.shape[1])  # fmt: skip
    result = torch.ops.kvpack.cuda_paged_decode(
        query, key_cache, value_cache, block_tables, seq_lens, window_keys, window_values, window_lens,
        key_codec.rotation,
        value_codec.unrotation, key_codec.codebook16, value_codec.codebook16, float(scale), *shape,
    )  # fmt: skip
    return result if out is None else out.copy_(result)
