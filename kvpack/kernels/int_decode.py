"""CUDA decode attention over ``int:4`` paged KV (token axis, per-token scale/zero), compiled at first use by NVRTC.

The kernel source is ``int_decode.cu`` beside this file (it says how the tensor-core fragments are laid out).
`paged_int4_decode` has the contract of `kvpack.kernels.decode_attention.paged_decode_attention`: query
``(B, Hq, D)`` fp16/bf16, uint8 paged caches ``(num_blocks, block_size, Hkv, D / 2 + 4)``, int32 block tables
``(B, max_blocks)`` and lengths ``(B,)``, a 16-bit window ``(B, W, Hkv, D)`` -> ``(B, Hq, D)`` in the query's
dtype. It is the ``torch.library`` op ``kvpack::int4_paged_decode`` (with a fake implementation, so
``torch.compile`` traces through it); no host synchronisation, so a step can be captured in a CUDA graph.

Compilation: ``cuda.core`` (pip ``cuda-core``, ``cuda-bindings``, ``nvidia-cuda-nvrtc``; no CUDA toolkit) turns
the source plus one set of macros (head_dim, GQA, KV heads, heads per CTA, page size, pipeline depth) into a
cubin for the device's architecture, cached on disk under ``$KVPACK_CACHE`` (default ``~/.cache/kvpack``).
Bytes per decode step: ``B * Hkv * seq_len * 2 * (D / 2 + 4)`` packed plus the window, read once.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kvpack.kernels.paged import PagedCodec, choose_splits

__all__ = ["Variant", "compile_variant", "int4_supported", "paged_int4_decode", "variant_for"]

LOG2E = 1.4426950408889634
SOURCE = Path(__file__).with_name("int_decode.cu")
HEAD_DIMS = (64, 128, 256)
MAX_GQA = 16


@dataclass(frozen=True)
class Variant:
    """One compiled kernel: the macros of ``int_decode.cu``."""

    head_dim: int
    gqa: int
    kv_heads: int
    heads_per_cta: int
    block_size: int
    stages: int
    out_bf16: bool

    def __post_init__(self) -> None:
        if self.head_dim not in HEAD_DIMS:
            raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {self.head_dim}")
        if not 1 <= self.gqa <= MAX_GQA:
            raise ValueError(f"gqa must be in [1, {MAX_GQA}], got {self.gqa}")
        if self.kv_heads % self.heads_per_cta or not 1 <= self.heads_per_cta <= 16:
            raise ValueError(f"heads_per_cta ({self.heads_per_cta}) must divide kv_heads ({self.kv_heads}), <= 16")
        if self.block_size % 16 or self.block_size < 16:
            raise ValueError(f"block_size must be a multiple of 16, got {self.block_size}")
        if not 2 <= self.stages <= 8:
            raise ValueError(f"stages must be in [2, 8], got {self.stages}")

    @property
    def row_bytes(self) -> int:
        return self.head_dim // 2 + 4

    @property
    def chunk(self) -> int:
        """cp.async width: 16 bytes when every copied run of ``heads_per_cta`` rows starts 16-byte aligned, else 4."""
        aligned = (self.heads_per_cta * self.row_bytes) % 16 == 0 and (self.kv_heads * self.row_bytes) % 16 == 0
        return 16 if aligned else 4

    @property
    def smem_bytes(self) -> int:
        return self.stages * 2 * 16 * self.heads_per_cta * self.row_bytes

    def defines(self) -> list[tuple[str, str]]:
        values = {"D": self.head_dim, "GQA": self.gqa, "HKV": self.kv_heads, "HG": self.heads_per_cta,
                  "BLOCK_SIZE": self.block_size, "STAGES": self.stages, "CHUNK": self.chunk,
                  "OUT_BF16": int(self.out_bf16)}  # fmt: skip
        return [(k, str(v)) for k, v in values.items()]


def int4_supported(key_codec: PagedCodec, value_codec: PagedCodec, block_size: int, gqa: int) -> bool:
    """Whether this kernel takes the streams: ``int`` 4-bit K and V (any rotation), pages of 16k tokens."""
    return (
        key_codec.kind == "int" and value_codec.kind == "int" and key_codec.bits == 4 and value_codec.bits == 4
        and key_codec.head_dim in HEAD_DIMS and block_size % 16 == 0 and 1 <= gqa <= MAX_GQA
    )  # fmt: skip


def variant_for(query: torch.Tensor, key_cache: torch.Tensor, heads_per_cta: int | None = None,
                stages: int | None = None) -> Variant:  # fmt: skip
    """The kernel variant of these shapes; default: up to 8 KV heads per CTA and a pipeline in 48 KB of shared memory."""
    _, hq, d = query.shape
    _, block_size, hkv, _ = key_cache.shape
    if heads_per_cta is None:
        heads_per_cta = max(x for x in (1, 2, 4, 8) if hkv % x == 0 and x <= hkv)
        while heads_per_cta > 1 and 2 * 2 * 16 * heads_per_cta * (d // 2 + 4) > (48 << 10):
            heads_per_cta //= 2  # two stages must fit the 48 KB launch limit (head_dim 256: measured INVALID_VALUE)
    tile = 2 * 16 * heads_per_cta * (d // 2 + 4)
    if stages is None:
        stages = max(2, min(4, (48 << 10) // tile))
    return Variant(d, hq // hkv, hkv, heads_per_cta, block_size, stages, query.dtype == torch.bfloat16)


def _cache_dir() -> Path:
    return Path(os.environ.get("KVPACK_CACHE", Path.home() / ".cache" / "kvpack")) / "cubin"


def compile_variant(variant: Variant, arch: str) -> bytes:
    """Cubin of ``variant`` for ``arch`` (e.g. ``"sm_90"``): NVRTC through ``cuda.core``, cached on disk by content."""
    from cuda.core import Program, ProgramOptions

    source = SOURCE.read_text()
    key = hashlib.sha256(f"{source}\n{variant.defines()}\n{arch}".encode()).hexdigest()[:24]
    path = _cache_dir() / f"int4_decode_{key}.cubin"
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
    return code.get_kernel("kvpack_int4_decode"), code.get_kernel("kvpack_int4_reduce")


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


@torch.library.custom_op("kvpack::int4_paged_decode", mutates_args=())
def int4_paged_decode(
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
    scale: float,
    num_splits: int,
    heads_per_cta: int,
    stages: int,
) -> torch.Tensor:
    import numpy as np
    from cuda.core import LaunchConfig, launch

    batch, hq, d = query.shape
    num_blocks, _, hkv, _ = key_cache.shape
    variant = variant_for(query, key_cache, heads_per_cta or None, stages or None)
    dev = query.device.index if query.device.index is not None else torch.cuda.current_device()
    decode_kernel, reduce_kernel = _kernels(variant, dev)
    stream = _stream(torch.cuda.current_stream(query.device).cuda_stream, dev)
    q = query.float() * (scale * LOG2E)  # the softmax scale and log2(e) go into the query once
    q_keys = (q if key_rotation is None else q @ key_rotation).to(torch.float16).contiguous()
    q_window = q.to(torch.float16).contiguous()
    q_sum = q_keys.float().sum(-1).contiguous()
    wk = window_keys.to(torch.float16).contiguous()
    wv = window_values.to(torch.float16).contiguous()
    capacity = block_tables.shape[1] * key_cache.shape[1]
    tokens_per_split = math.ceil(capacity / num_splits / 16) * 16
    num_splits = max(1, math.ceil(capacity / tokens_per_split))
    part_m = torch.empty(batch, hq, num_splits + 1, device=query.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(batch, hq, num_splits + 1, d, device=query.device, dtype=torch.float32)
    grid = (num_splits + 1, hkv // variant.heads_per_cta, batch)
    config = LaunchConfig(grid=grid, block=32 * variant.heads_per_cta, shmem_size=variant.smem_bytes)
    i32 = np.int32
    launch(stream, config, decode_kernel, _ptr(q_keys), _ptr(q_window), _ptr(q_sum), _ptr(key_cache),
           _ptr(value_cache), _ptr(block_tables), _ptr(seq_lens), _ptr(wk), _ptr(wv), _ptr(window_lens),
           _ptr(part_m), _ptr(part_l), _ptr(part_acc), i32(num_blocks), i32(block_tables.shape[1]),
           i32(wk.shape[1]), i32(tokens_per_split), i32(num_splits))  # fmt: skip
    out = torch.empty_like(query)
    rotated = value_unrotation is not None
    packed = torch.empty(batch, hq, d, device=query.device, dtype=torch.float32) if rotated else part_m
    window = torch.empty_like(packed) if rotated else part_m
    launch(stream, LaunchConfig(grid=(hq, batch), block=d), reduce_kernel, _ptr(part_m), _ptr(part_l),
           _ptr(part_acc), _ptr(packed), _ptr(window), _ptr(out), i32(hq), i32(num_splits), i32(int(rotated)))  # fmt: skip
    if rotated:  # the packed values' part goes back to the unrotated basis once: out = packed @ M_v.T + window
        out.copy_(torch.addmm(window.view(-1, d), packed.view(-1, d), value_unrotation).view(batch, hq, d))
    return out


@int4_paged_decode.register_fake
def _(query, key_cache, value_cache, block_tables, seq_lens, window_keys, window_values, window_lens, key_rotation,
      value_unrotation, scale, num_splits, heads_per_cta, stages):  # fmt: skip
    return torch.empty_like(query)


def paged_int4_decode(
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
) -> torch.Tensor:
    """Launch the op (inputs checked by `kvpack.kernels.attention.decode`); ``num_splits`` depends on shapes only."""
    batch, _, _ = query.shape
    hkv = key_cache.shape[2]
    variant = variant_for(query, key_cache, heads_per_cta, stages)
    if num_splits is None:
        sms = torch.cuda.get_device_properties(query.device).multi_processor_count
        capacity = block_tables.shape[1] * key_cache.shape[1]
        num_splits = choose_splits(batch, hkv // variant.heads_per_cta, capacity, 16, sms, waves=4.0)  # 16-token tiles
    key_rotation = None if key_codec.rotation is None else key_codec.rotation.float()
    result = torch.ops.kvpack.int4_paged_decode(
        query, key_cache, value_cache, block_tables, seq_lens, window_keys, window_values, window_lens, key_rotation,
        value_codec.unrotation, float(scale), int(num_splits), variant.heads_per_cta, variant.stages,
    )  # fmt: skip
    return result if out is None else out.copy_(result)
