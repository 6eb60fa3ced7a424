"""Decode attention over the packed paged KV cache: `decode` (Triton kernel on CUDA) and `decode_ref` (PyTorch).

One new query token per sequence attends to everything the cache holds for it: the packed tokens
(paged layout of `kvpack.kernels.paged`, reached through ``block_tables`` for the first
``seq_lens[b]`` token positions) and a dense 16-bit window ``(B, W, kv_heads, D)`` of which the
first ``window_lens[b]`` rows are valid (the attention sinks and the residual window: softmax
attention of one query does not depend on token order). Heads are grouped as in GQA: query head
``j`` reads KV head ``j // (q_heads / kv_heads)``.

`decode_ref` is the definition: dequantize every held token exactly as the codec decodes it, then
softmax attention in float32. `decode` runs the fused kernel of `kvpack.kernels.decode_attention`
on CUDA tensors and `decode_ref` elsewhere.
"""

from __future__ import annotations

import math
import os

import torch

from kvpack.kernels.paged import PagedCodec, dequantize_rows, graph_capturing

__all__ = ["check_decode_inputs", "decode", "decode_ref"]

_QUERY_DTYPES = (torch.float16, torch.bfloat16)


def _check(
    query,
    key_cache,
    value_cache,
    block_tables,
    seq_lens,
    window_keys,
    window_values,
    window_lens,
    key_codec,
    value_codec,
) -> None:
    if not isinstance(query, torch.Tensor) or query.dim() != 3 or query.dtype not in _QUERY_DTYPES:
        raise TypeError(f"query must be a float16/bfloat16 tensor (batch, q_heads, head_dim), got {_describe(query)}")
    for name, fmt in (("key_codec", key_codec), ("value_codec", value_codec)):
        if not isinstance(fmt, PagedCodec):
            raise TypeError(f"{name} must be a kvpack.kernels.paged.PagedCodec, got {type(fmt).__name__}")
    batch, hq, d = query.shape
    for name, cache, fmt in (("key_cache", key_cache, key_codec), ("value_cache", value_cache, value_codec)):
        if not isinstance(cache, torch.Tensor) or cache.dtype != torch.uint8 or cache.dim() != 4:
            raise TypeError(
                f"{name} must be uint8 (num_blocks, block_size, kv_heads, row_bytes), got {_describe(cache)}"
            )
        if fmt.head_dim != d or cache.shape[-1] != fmt.row_bytes:
            raise ValueError(
                f"{name} rows hold {cache.shape[-1]} bytes; {fmt.kind}:{fmt.bits} at head_dim={d} needs {fmt.row_bytes} "
                f"(codec head_dim {fmt.head_dim})"
            )
        if not cache.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if key_cache.shape[:3] != value_cache.shape[:3]:
        raise ValueError(f"key_cache and value_cache disagree: {tuple(key_cache.shape)} vs {tuple(value_cache.shape)}")
    hkv = key_cache.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of the cache's kv_heads ({hkv})")
    if not isinstance(block_tables, torch.Tensor) or block_tables.dtype != torch.int32 or block_tables.dim() != 2:
        raise TypeError(f"block_tables must be int32 (batch, max_blocks), got {_describe(block_tables)}")
    if block_tables.shape[0] != batch:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for a batch of {batch}")
    for name, lens in (("seq_lens", seq_lens), ("window_lens", window_lens)):
        if not isinstance(lens, torch.Tensor) or lens.dtype != torch.int32 or tuple(lens.shape) != (batch,):
            raise TypeError(f"{name} must be int32 of shape ({batch},), got {_describe(lens)}")
    for name, w in (("window_keys", window_keys), ("window_values", window_values)):
        if not isinstance(w, torch.Tensor) or w.dim() != 4 or w.dtype not in _QUERY_DTYPES:
            raise TypeError(f"{name} must be float16/bfloat16 (batch, window, kv_heads, head_dim), got {_describe(w)}")
        if w.shape[0] != batch or w.shape[2:] != (hkv, d) or not w.is_contiguous():
            raise ValueError(f"{name} must be contiguous ({batch}, window, {hkv}, {d}), got {tuple(w.shape)}")
    if window_keys.shape != window_values.shape or window_keys.dtype != window_values.dtype:
        raise ValueError("window_keys and window_values must have the same shape and dtype")
    devices = {t.device for t in (query, key_cache, value_cache, block_tables, seq_lens, window_keys, window_lens)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def check_decode_inputs(
    key_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    window_keys: torch.Tensor,
    window_lens: torch.Tensor,
    query: torch.Tensor | None = None,
    window_values: torch.Tensor | None = None,
) -> None:
    """Raise ``ValueError`` unless every index the decode will follow stays inside the tensors it indexes.

    ``seq_lens`` and ``window_lens`` in ``0..capacity`` (``block_tables.shape[1] * block_size`` packed tokens,
    ``window_keys.shape[1]`` window rows), at least one token per sequence, and the block ids of the blocks a
    row's ``seq_lens`` reaches in ``0..num_blocks - 1`` (entries past a row's length are never read, so they
    are not checked). The kernel does not bound-check its loads: without this, a bad id reads other memory
    (NaN, garbage, or a crash). It reads one flag on the host, so on CUDA it synchronizes the stream once
    per call (more only to name what is wrong); while a CUDA graph is being captured (``torch.cuda.is_current_stream_capturing()``) it is
    skipped, since capture forbids a sync: the inputs of a captured graph are the caller's to keep in range (the CUDA
    kernel (`cuda_decode`) also clamps lengths and block ids on the device).
    ``query`` and ``window_values``, when given, must be finite (as must the window keys), the window in its
    first ``window_lens[b]`` rows: a NaN/inf there would make the output NaN. The bytes of the pools are not
    read here (that would cost a pass over the whole cache): `decode` refuses a NaN/inf output instead.
    Shapes and dtypes are assumed checked (`decode` checks them first).
    """
    if graph_capturing(seq_lens):
        return
    num_blocks, block_size = key_cache.shape[0], key_cache.shape[1]
    capacity, window = block_tables.shape[1] * block_size, window_keys.shape[1]
    bad_lens = (seq_lens < 0) | (seq_lens > capacity) | (window_lens < 0) | (window_lens > window)
    bad_lens |= (seq_lens + window_lens) == 0
    reached = torch.arange(block_tables.shape[1], device=seq_lens.device) * block_size < seq_lens[:, None].long()
    bad_ids = reached & ((block_tables < 0) | (block_tables >= num_blocks))
    rows = torch.arange(window, device=seq_lens.device) < window_lens[:, None].long()  # (B, W) valid window rows
    bad_values = torch.zeros((), dtype=torch.bool, device=seq_lens.device)
    for t in (window_keys, window_values):
        if t is not None:
            bad_values |= (~torch.isfinite(t).flatten(2).all(-1) & rows).any()
    if query is not None:
        bad_values |= ~torch.isfinite(query).all()
    if not bool(bad_lens.any() | bad_ids.any() | bad_values):  # the one host sync of a valid call
        return
    for name, lens, limit in (("seq_lens", seq_lens, capacity), ("window_lens", window_lens, window)):
        bad = ((lens < 0) | (lens > limit)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"{name}[{bad[0]}] = {int(lens[bad[0]])} is outside 0..{limit} (what block_tables/the window hold)"
            )
    empty = ((seq_lens + window_lens) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"sequence {empty[0]} holds no token (seq_lens and window_lens both 0)")
    if bool(bad_values):
        raise ValueError("query, window_keys or window_values hold NaN/inf (the window in its first window_lens rows)")
    b, j = bad_ids.nonzero()[0].tolist()
    raise ValueError(
        f"block_tables[{b}, {j}] = {int(block_tables[b, j])} is outside 0..{num_blocks - 1} (the pools' blocks), "
        f"and seq_lens[{b}] = {int(seq_lens[b])} reaches it"
    )


def _scale(scale, head_dim: int) -> float:
    """The softmax scale: ``1/sqrt(head_dim)`` by default; a given one must be a finite real number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    try:
        value = float(scale)
    except (TypeError, ValueError, RuntimeError):
        value = math.nan
    if isinstance(scale, (bool, str)) or not math.isfinite(value):
        raise ValueError(f"scale must be a finite float or None (1/sqrt(head_dim)), got {scale!r}")
    return value


def _describe(x) -> str:
    return f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _empty_window(query: torch.Tensor, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, _, d = query.shape
    w = query.new_zeros(batch, 0, kv_heads, d)
    return w, w.clone(), torch.zeros(batch, dtype=torch.int32, device=query.device)


def _checked(query, key_cache, value_cache, block_tables, seq_lens, window_keys, window_values, window_lens,
             key_codec, value_codec):  # fmt: skip
    """What `decode` and `decode_ref` check before any work; returns the window (empty if none was given)."""
    if window_keys is None and window_values is None and window_lens is None:
        if isinstance(query, torch.Tensor) and query.dim() == 3 and isinstance(key_cache, torch.Tensor):
            window_keys, window_values, window_lens = _empty_window(query, key_cache.shape[2])
    elif window_keys is None or window_values is None or window_lens is None:
        raise ValueError("window_keys, window_values and window_lens go together: give all three or none")
    _check(query, key_cache, value_cache, block_tables, seq_lens, window_keys, window_values, window_lens,
           key_codec, value_codec)  # fmt: skip
    check_decode_inputs(key_cache, block_tables, seq_lens, window_keys, window_lens, query, window_values)
    return window_keys, window_values, window_lens


def decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    key_codec: PagedCodec,
    value_codec: PagedCodec,
    window_keys: torch.Tensor | None = None,
    window_values: torch.Tensor | None = None,
    window_lens: torch.Tensor | None = None,
    scale: float | None = None,
    num_splits: int | None = None,
    use_kernel: bool | None = None,
    out: torch.Tensor | None = None,
    kernel: str | None = None,
) -> torch.Tensor:
    """Attention output ``(batch, q_heads, head_dim)`` of one query token per sequence over the packed cache.

    ``query`` (B, Hq, D) float16/bfloat16; ``key_cache``/``value_cache`` uint8 paged rows; ``block_tables``
    int32 (B, max_blocks); ``seq_lens`` int32 (B,) packed tokens per sequence; the window (optional)
    ``(B, W, Hkv, D)`` with ``window_lens`` int32 (B,). Every sequence must hold at least one token.
    ``scale`` defaults to ``1/sqrt(D)``. ``use_kernel``: ``None`` = a GPU kernel iff on CUDA. ``kernel``: which
    (``"cuda"``: the NVRTC kernel of ``int`` and ``turbo_mse`` streams, `kvpack.kernels.cuda_decode`; ``"triton"``;
    ``None``: the CUDA one where it takes the codecs, else Triton:
    `kvpack.kernels.cuda_decode.uses_cuda_kernel`). ``out``: a
    ``(B, Hq, D)`` tensor of the query's dtype to write into (the kernel path; for CUDA graphs).
    """
    window_keys, window_values, window_lens = _checked(query, key_cache, value_cache, block_tables, seq_lens,
                                                      window_keys, window_values, window_lens, key_codec,
                                                      value_codec)  # fmt: skip
    scale = _scale(scale, query.shape[-1])
    if use_kernel is None:
        use_kernel = query.is_cuda
    if kernel not in (None, "cuda", "triton"):
        raise ValueError(f"kernel must be None (chosen by shape), 'cuda' or 'triton', got {kernel!r}")
    if out is not None and (
        not isinstance(out, torch.Tensor) or out.shape != query.shape or out.dtype != query.dtype
        or out.device != query.device
    ):  # fmt: skip
        raise ValueError(
            f"out must be a {query.dtype} tensor {tuple(query.shape)} on {query.device}, got {_describe(out)}"
        )
    if use_kernel and not query.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("use_kernel=True needs CUDA tensors, or TRITON_INTERPRET=1 to run the kernel on the CPU")
    if not use_kernel:
        ref = _reference(query, key_cache, value_cache, block_tables, seq_lens, key_codec, value_codec, window_keys,
                         window_values, window_lens, scale)  # fmt: skip
        if not bool(torch.isfinite(ref).all()):
            raise ValueError("decode: the packed tokens decode to NaN/inf (corrupted side bytes in the pools?)")
        return ref.to(query.dtype) if out is None else out.copy_(ref)
    from kvpack.kernels.cuda_decode import cuda_supported, paged_cuda_decode, uses_cuda_kernel

    streams = (key_codec.kind, key_codec.bits, value_codec.kind, value_codec.bits)
    cuda_ok = query.is_cuda and cuda_supported(*streams, query.shape[-1], key_cache.shape[1],
                                           query.shape[1] // key_cache.shape[2])  # fmt: skip
    if kernel == "cuda" and not cuda_ok:
        raise ValueError(
            f"kernel='cuda' takes int (2-4, 8 bits, token axis) and turbo_mse (1-4 bits) keys and values on CUDA "
            f"(not 1-bit keys at head_dim 64), got {key_codec.kind}:{key_codec.bits} / "
            f"{value_codec.kind}:{value_codec.bits}; use kernel=None or 'triton'"
        )
    if kernel == "cuda" or (kernel is None and uses_cuda_kernel(query, key_cache, *streams)):
        result = paged_cuda_decode(query, key_cache, value_cache, block_tables, seq_lens, window_keys, window_values,
                                   window_lens, key_codec, value_codec, scale, num_splits=num_splits,
                                   out=out)  # fmt: skip
    else:
        from kvpack.kernels.decode_attention import paged_decode_attention

        result = paged_decode_attention(query, key_cache, value_cache, block_tables, seq_lens, window_keys,
                                        window_values, window_lens, key_codec, value_codec, scale,
                                        num_splits=num_splits, out=out)  # fmt: skip
    # the inputs were checked finite, so a NaN/inf out means corrupted side bytes in the pools (as the reference
    # path refuses them); one more host sync, skipped inside a CUDA-graph capture (where no sync is allowed)
    if not graph_capturing(result) and not bool(torch.isfinite(result).all()):
        raise ValueError("decode: the packed tokens decode to NaN/inf (corrupted side bytes in the pools?)")
    return result


def gather_tokens(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Rows of the first ``length`` token positions of one sequence: ``(length, kv_heads, row_bytes)``."""
    block_size = cache.shape[1]
    pos = torch.arange(length, device=cache.device)
    blocks = block_table.long()[pos // block_size]
    return cache[blocks, pos % block_size]


def decode_ref(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    key_codec: PagedCodec,
    value_codec: PagedCodec,
    window_keys: torch.Tensor | None = None,
    window_values: torch.Tensor | None = None,
    window_lens: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """The definition `decode` computes: dequantize (as the codec decodes), then softmax attention; float32 out.

    Checks its inputs as `decode` does (``ValueError``/``TypeError`` naming the argument), and refuses a NaN/inf
    result (corrupted side bytes in the pools)."""
    window_keys, window_values, window_lens = _checked(query, key_cache, value_cache, block_tables, seq_lens,
                                                      window_keys, window_values, window_lens, key_codec,
                                                      value_codec)  # fmt: skip
    out = _reference(query, key_cache, value_cache, block_tables, seq_lens, key_codec, value_codec, window_keys,
                     window_values, window_lens, _scale(scale, query.shape[-1]))  # fmt: skip
    if not bool(torch.isfinite(out).all()):
        raise ValueError("decode_ref: the packed tokens decode to NaN/inf (corrupted side bytes in the pools?)")
    return out


def _reference(query, key_cache, value_cache, block_tables, seq_lens, key_codec, value_codec, window_keys,
               window_values, window_lens, scale: float) -> torch.Tensor:  # fmt: skip
    """`decode_ref`'s arithmetic on checked inputs (`decode` calls it directly: its inputs are checked once)."""
    batch, hq, _ = query.shape
    hkv = key_cache.shape[2]
    seq_lens_host = seq_lens.tolist()
    window_lens_host = window_lens.tolist()
    outs = []
    for b in range(batch):  # one sequence at a time: lengths differ
        keys = dequantize_rows(gather_tokens(key_cache, block_tables[b], seq_lens_host[b]), key_codec)
        values = dequantize_rows(gather_tokens(value_cache, block_tables[b], seq_lens_host[b]), value_codec)
        w = window_lens_host[b]
        if w:
            keys = torch.cat([keys, window_keys[b, :w].float()], dim=0)
            values = torch.cat([values, window_values[b, :w].float()], dim=0)
        keys = keys.transpose(0, 1).repeat_interleave(hq // hkv, dim=0)  # (hq, tokens, d)
        values = values.transpose(0, 1).repeat_interleave(hq // hkv, dim=0)
        scores = torch.einsum("hd,htd->ht", query[b].float(), keys) * scale
        outs.append(torch.einsum("ht,htd->hd", scores.softmax(dim=-1), values))
    return torch.stack(outs)
