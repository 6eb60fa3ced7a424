"""The ``decode`` protocol: teacher-forced continuation tokens that see exactly what ``generate`` shows them.

In ``model.generate`` through a `KVPackCache`, continuation token ``j`` attends to the cache as it
is after tokens ``0..j-1`` were stored: the sinks and the residual window in 16-bit (`held_dtype`),
every block packed so far decoded, and itself exact. Run one token per forward that costs a full
decode of the packed past per token and layer (:func:`decode_stepwise_logits`, the definition).

:func:`decode_logits` gives the same logits in ONE forward over the continuation. Each layer's
``update()`` stores the new tokens one at a time through the layer's own storage (so blocks are
packed at exactly the tokens and with exactly the bytes generation packs them) and returns every
version of a token any query sees: the past as held at the start, each block packed during the
pass (decoded), the new tokens rounded to the held dtype and the new tokens exact. A per-layer
mask lets query ``j`` see a version when ``j`` falls in its lifetime (a window version until its
block is packed, the decoded block after; a token's exact version only by itself) and, on
sliding-window layers, when it is within the window. A registered attention function hands each
layer its own mask and delegates to the model's attention implementation.
"""

from __future__ import annotations

import logging

import torch
from transformers.cache_utils import Cache

from kvpack.hf.attention import delegate_attention, set_attention
from kvpack.hf.cache import KVPackCache, KVPackLayer
from kvpack.hf.config import cache_kwargs

logger = logging.getLogger(__name__)

__all__ = ["decode_logits", "decode_stepwise_logits"]

ATTENTION_NAME = "kvpack_decode"
NEVER = 1 << 62  # lifetime end of a version no query outgrows


def decode_stepwise_logits(model, cache: KVPackCache, cont: torch.Tensor) -> torch.Tensor:
    """Logits ``(n, vocab)`` of ``cont`` ``(1, n)`` fed one token per forward through ``cache`` (as ``generate``)."""
    return torch.cat([model(cont[:, i : i + 1], **cache_kwargs(model, cache)).logits[0] for i in range(cont.shape[1])])


def _views(layer: KVPackLayer, keys: torch.Tensor, values: torch.Tensor):
    """Store ``keys``/``values`` ``(1, H, n, D)`` one token at a time; every version a query sees and its mask.

    Returns ``(K, V, allowed)``: ``K``/``V`` ``(1, H, S, D)`` and ``allowed`` ``(n, S)`` bool.
    """
    n, start = keys.shape[-2], layer.cumulative_length
    past_k, past_v = layer.past()
    packed_at = torch.full((start + n,), NEVER, dtype=torch.long)  # per position: the step that packed it
    blocks = []
    for i in range(n):
        last = layer.chunks[-1] if layer.chunks else None
        layer.cumulative_length += 1
        layer._store(keys[..., i : i + 1, :], values[..., i : i + 1, :])
        if layer.chunks and layer.chunks[-1] is not last:  # a store packs at most one chunk, appended last
            chunk = layer.chunks[-1]
            packed_at[chunk.start : chunk.start + chunk.tokens] = i
            if chunk.order is not None:
                raise ValueError("the decode protocol runs on a cache without batch reorders")
            blocks.append((i, chunk, *layer.decode_chunk(chunk)))
    # versions: (positions, first query that sees it, first query that no longer does)
    pos = [torch.arange(start - past_k.shape[-2], start)]
    first, end = [torch.zeros_like(pos[0])], [packed_at[pos[0]] + 1]
    for i, chunk, _, _ in blocks:
        p = torch.arange(chunk.start, chunk.start + chunk.tokens)
        pos.append(p), first.append(torch.full_like(p, i + 1)), end.append(torch.full_like(p, NEVER))
    new = torch.arange(n)
    pos += [start + new, start + new]
    first += [new + 1, new]
    end += [packed_at[start + new] + 1, new + 1]
    pos, first, end = torch.cat(pos), torch.cat(first), torch.cat(end)
    j = torch.arange(n)[:, None]
    allowed = (first[None] <= j) & (j < end[None])
    if layer.is_sliding:
        allowed &= (start + j) - pos[None] < layer.sliding_window
    held = layer.held_dtype
    k_all = torch.cat([past_k, *(b[2] for b in blocks), keys.to(held).to(keys.dtype), keys], dim=-2)
    v_all = torch.cat([past_v, *(b[3] for b in blocks), values.to(held).to(values.dtype), values], dim=-2)
    return k_all, v_all, allowed.to(keys.device)


class _DecodeView(Cache):
    """The layers of a filled `KVPackCache`, whose ``update`` returns :func:`_views` and keeps each layer's mask."""

    def __init__(self, cache: KVPackCache) -> None:
        bad = [type(layer).__name__ for layer in cache.layers if type(layer) is not KVPackLayer]
        if not isinstance(cache, KVPackCache) or bad:
            raise TypeError(
                f"the decode protocol needs a KVPackCache of KVPackLayer layers, got {type(cache).__name__}"
            )
        super().__init__(layers=cache.layers)
        self.masks: dict[int, torch.Tensor] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if key_states.shape[0] != 1:
            raise ValueError(f"the decode protocol runs one sequence, got batch {key_states.shape[0]}")
        k, v, self.masks[layer_idx] = _views(self.layers[layer_idx], key_states, value_states)
        return k, v


def decode_logits(model, cache: KVPackCache, cont: torch.Tensor) -> torch.Tensor:
    """Logits ``(n, vocab)`` of ``cont`` ``(1, n)`` equal (to float rounding) to :func:`decode_stepwise_logits`
    through ``cache`` (a `KVPackCache` holding the prefill), in one forward; ``cache`` ends in the same state."""
    from transformers import AttentionInterface

    view = _DecodeView(cache)
    original = model.config._attn_implementation

    def masked_attention(module, query, key, value, attention_mask, **kwargs):
        allowed = view.masks[module.layer_idx]
        mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
        mask = mask.masked_fill(~allowed, torch.finfo(query.dtype).min)[None, None]
        kwargs.pop("sliding_window", None)  # the mask holds the window
        return delegate_attention(module, original)(module, query, key, value, mask, **kwargs)

    AttentionInterface.register(ATTENTION_NAME, masked_attention)
    try:
        if not set_attention(model, ATTENTION_NAME):  # attention outside AttentionInterface (Falcon): the definition
            logger.warning("%s keeps its own attention: the decode protocol runs one token per forward",
                           type(model).__name__)  # fmt: skip
            model.set_attn_implementation(original)
            return decode_stepwise_logits(model, cache, cont)
        return model(cont, **cache_kwargs(model, view)).logits[0]
    finally:
        model.set_attn_implementation(original)
