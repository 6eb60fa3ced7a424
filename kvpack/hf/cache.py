"""`KVPackCache`: a transformers `Cache` that holds K and V packed by kvpack codecs, one `KVPackLayer` per layer.

Each layer holds, in token order (all K/V tensors ``(batch, kv_heads, tokens, head_dim)``):

1. ``sinks``: the first ``sinks`` tokens in full precision (16-bit: `CachePolicy.held_dtype`) (attention sinks, Xiao et al.,
   arXiv 2309.17453), protected from the first prefill on;
2. packed chunks: `kvpack.Packed` K and V of ``block`` tokens each (or a multiple of it, as a
   prefill packs its whole middle at once);
3. the residual window ``keys``/``values`` in full precision: the newest tokens. Once it reaches
   ``residual + block`` tokens, its oldest whole blocks are packed, so it keeps between ``residual``
   and ``residual + block - 1`` tokens (KIVI, Liu et al., arXiv 2402.02750, packs the same way).

``update()`` returns the past as decoded (chunks decoded at every call, nothing decoded is kept)
concatenated with the new tokens uncompressed: a prefill attends to its exact K/V, as transformers'
`QuantizedLayer` does, and packing happens after. Sliding-window layers (``config.layer_types``)
keep only the last ``sliding_window - 1`` tokens as transformers' `DynamicSlidingWindowLayer` does
(whole chunks are dropped once out of the window) and hold no sinks, which would leave the window.

``CachePolicy(center_keys=True)``: a compressed key stream is packed as ``k - mu``, where ``mu``
(`key_reference`, ``(batch, kv_heads, 1, head_dim)`` 16-bit, counted in ``nbytes``) is the mean of the non-sink
keys of the first update that stores any (the prefill), fixed from then on and added back when a chunk is decoded.
Keys share a large common part (on SmolLM2-135M 30-74% of a key's energy is the mean over a 1K context); what a
codec's error scales with is then the rest. Attention is unchanged by a shift of every key by the same ``mu``
(``q . mu`` is the same for every key a query scores), so the paged caches give their kernels the 16-bit window
shifted by ``-mu`` and the pages as stored: no kernel reads ``mu``.

``nbytes()`` sums the bytes of every tensor a layer holds (sinks, packed chunks, residual window),
so ``bits_per_value()`` is measured, not derived from a formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvpack.codec import Packed
from kvpack.codecs.compose import IdentityCodec
from kvpack.hf.config import model_heads, text_config
from kvpack.hf.rope import rerope, rope_table, unrope
from kvpack.policy import CachePolicy

__all__ = ["KVPackCache", "KVPackLayer", "key_reference", "layer_kinds"]

_SLIDING_TYPES = ("sliding_attention", "chunked_attention")


def key_reference(keys: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The mean of ``keys`` ``(B, H, n, D)`` over its tokens (``valid`` ``(B, n)`` bool: those only; a row with none
    gets zeros), ``(B, H, 1, D)`` in ``keys``' dtype: every cache computes it with this one reduction, so that the
    same tokens give the same bits in each."""
    keep = torch.ones(keys.shape[0], keys.shape[-2], dtype=torch.bool, device=keys.device) if valid is None else valid
    total = torch.where(keep[:, None, :, None], keys.float(), 0.0).sum(-2, keepdim=True)
    count = keep.sum(-1).clamp(min=1)[:, None, None, None]
    return (total / count).to(keys.dtype)


def shift_keys(keys: torch.Tensor, reference: torch.Tensor | None, sign: int, token_dim: int = -2) -> torch.Tensor:
    """``keys + sign * reference`` in float32, back in ``keys``' dtype; ``reference`` ``(B, H, 1, D)`` broadcast
    over the tokens at ``token_dim`` (-2: ``(B, H, n, D)``, 1: ``(B, n, H, D)``); ``None``: ``keys`` as they are."""
    if reference is None:
        return keys
    ref = reference if token_dim == -2 else reference.transpose(1, 2)
    return (keys.float() + sign * ref.float()).to(keys.dtype)


@dataclass(frozen=True)
class _Chunk:
    """Packed K and V of ``tokens`` consecutive tokens; ``order``: batch rows to take after decode (beam reorder)."""

    key: Packed
    value: Packed
    tokens: int
    order: torch.Tensor | None = None
    start: int = 0  # position of the first token (pre-RoPE keys are re-rotated from it)


class KVPackLayer(CacheLayerMixin):
    """One layer's cache under a `CachePolicy`; ``sliding_window`` set for sliding/chunked layers.

    The small interface the container uses: ``update``, ``get_seq_length``, ``get_mask_sizes``,
    ``get_max_length``, ``stored_bytes``/``stored_values``, ``reset``, ``crop`` and the batch
    reorders. `kvpack.hf.paged_cache.PagedLayer` keeps the packed tokens in pages instead.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, policy: CachePolicy, layer_idx: int, sliding_window: int | None = None) -> None:
        super().__init__()
        self.policy, self.layer_idx, self.sliding_window = policy, layer_idx, sliding_window
        self.is_sliding = sliding_window is not None
        self.sinks = 0 if self.is_sliding else policy.sinks
        self.residual = policy.residual
        self.cumulative_length = 0
        self.chunks: list[_Chunk] = []
        self.rope = None  # a `kvpack.hf.rope.RopeTable` when keys are packed before RoPE (`pre_rope_keys`)
        self.key_reference = None  # the mean key packed chunks are relative to (`center_keys`), once stored

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.held_dtype = self.policy.held_dtype(self.dtype)
        self.key_codec, self.value_codec = self.policy.codecs(
            key_states.shape[-1], self.layer_idx, key_states.shape[-3]
        )
        self.block = self.policy.block_for(self.key_codec, self.value_codec)
        # an uncompressed key stream keeps its post-RoPE keys: undoing RoPE would only cost time and a float32 copy
        self.key_rope = None if isinstance(self.key_codec, IdentityCodec) else self.rope
        self.centers_keys = self.policy.center_keys and not isinstance(self.key_codec, IdentityCodec)
        self.key_reference = None
        empty_k = key_states[..., :0, :].to(self.held_dtype)
        empty_v = value_states[..., :0, :].to(self.held_dtype)
        self.sink_keys, self.sink_values = empty_k.clone(), empty_v.clone()
        self.keys, self.values = empty_k.clone(), empty_v.clone()
        self.chunks = []
        self.is_initialized = True

    # ---- what attention sees ------------------------------------------------------------------
    def past(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The held past as the model sees it, decoded to the model dtype: ``(B, H, tokens, D)`` each."""
        keys, values = [self.sink_keys.to(self.dtype)], [self.sink_values.to(self.dtype)]
        for chunk in self.chunks:
            k, v = self.decode_chunk(chunk)
            keys.append(k)
            values.append(v)
        keys.append(self.keys.to(self.dtype))
        values.append(self.values.to(self.dtype))
        keys, values = torch.cat(keys, dim=-2), torch.cat(values, dim=-2)
        if self.is_sliding and keys.shape[-2] > self.sliding_window - 1:
            keys, values = keys[..., -(self.sliding_window - 1) :, :], values[..., -(self.sliding_window - 1) :, :]
        return keys, values

    def decode_chunk(self, chunk: _Chunk) -> tuple[torch.Tensor, torch.Tensor]:
        """One packed chunk's K and V ``(B, H, chunk.tokens, D)`` as attention sees them: decoded to the model
        dtype, RoPE re-applied to pre-RoPE keys, batch rows in the chunk's ``order``."""
        k, v = self.key_codec.decode(chunk.key), self.value_codec.decode(chunk.value).to(self.dtype)
        k = k if self.key_rope is None else rerope(k, chunk.start, self.key_rope)
        if chunk.order is not None:
            k, v = k.index_select(0, chunk.order), v.index_select(0, chunk.order)
        # the reference follows the batch rows as they are now, as the chunk's order does
        return shift_keys(k, self.key_reference, +1).to(self.dtype), v

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``key_states``/``value_states`` ``(B, H, n, D)``; return the past (decoded) + them, uncompressed."""
        _check_states(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        else:
            _check_like(key_states, self.keys, self.dtype)
        if self.held_dtype != key_states.dtype:
            _check_range(key_states, value_states, self.held_dtype)
        past_keys, past_values = self.past()
        self.cumulative_length += key_states.shape[-2]
        self._store(key_states, value_states)
        return torch.cat([past_keys, key_states], dim=-2), torch.cat([past_values, value_states], dim=-2)

    def _store(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        keys, values = keys.to(self.held_dtype), values.to(self.held_dtype)
        n_sink = min(self.sinks - self.sink_keys.shape[-2], keys.shape[-2])
        if n_sink > 0:
            self.sink_keys = torch.cat([self.sink_keys, keys[..., :n_sink, :]], dim=-2)
            self.sink_values = torch.cat([self.sink_values, values[..., :n_sink, :]], dim=-2)
            keys, values = keys[..., n_sink:, :], values[..., n_sink:, :]
        self._fix_key_reference(keys)
        self.keys = torch.cat([self.keys, keys], dim=-2)
        self.values = torch.cat([self.values, values], dim=-2)
        if self.is_sliding:
            self._drop_outside_window()
        n_pack = (self.keys.shape[-2] - self.residual) // self.block * self.block
        if n_pack > 0:
            start = self.cumulative_length - self.keys.shape[-2]  # position of the window's first token
            keys = shift_keys(self.keys[..., :n_pack, :], self.key_reference, -1)
            if self.key_rope is not None:
                keys = unrope(keys, start, self.key_rope)
            self.chunks.append(
                _Chunk(
                    key=self.key_codec.encode(keys.contiguous()),
                    value=self.value_codec.encode(self.values[..., :n_pack, :].contiguous()),
                    tokens=n_pack,
                    start=start,
                )
            )
            # clone: a view would keep the whole pre-packing window alive behind a small tensor
            self.keys, self.values = self.keys[..., n_pack:, :].clone(), self.values[..., n_pack:, :].clone()

    def _fix_key_reference(self, keys: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """The first non-sink ``keys`` ``(B, H, n, D)`` stored (held dtype) fix `key_reference` (``center_keys``)."""
        if self.centers_keys and self.key_reference is None and keys.shape[-2]:
            self.key_reference = key_reference(keys, valid)

    def _drop_outside_window(self) -> None:
        """Forget what the sliding window no longer sees: whole chunks, then the window's own oldest tokens."""
        excess = sum(c.tokens for c in self.chunks) + self.keys.shape[-2] - (self.sliding_window - 1)
        while self.chunks and self.chunks[0].tokens <= excess:
            excess -= self.chunks.pop(0).tokens
        if not self.chunks and excess > 0:
            self.keys, self.values = self.keys[..., excess:, :].clone(), self.values[..., excess:, :].clone()

    # ---- sizes transformers asks for ----------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.sliding_window if self.is_sliding else -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of what `update` will return, as transformers' dynamic layers report it."""
        if not self.is_sliding:
            return self.cumulative_length + query_length, 0
        offset = max(self.cumulative_length - self.sliding_window + 1, 0)
        visible = min(self.cumulative_length, self.sliding_window - 1)
        return visible + query_length, offset

    # ---- accounting ---------------------------------------------------------------------------
    def stored_bytes(self) -> tuple[int, int]:
        """Bytes of every tensor held for K and for V (beam-order indices counted with K)."""
        k = _tensor_bytes(self.sink_keys) + _tensor_bytes(self.keys) if self.is_initialized else 0
        v = _tensor_bytes(self.sink_values) + _tensor_bytes(self.values) if self.is_initialized else 0
        k += _tensor_bytes(self.key_reference)
        for chunk in self.chunks:
            k += chunk.key.nbytes + (_tensor_bytes(chunk.order) if chunk.order is not None else 0)
            v += chunk.value.nbytes
        return k, v

    def stored_values(self) -> int:
        """Number of K values held (the same for V): held tokens x batch x heads x head_dim."""
        if not self.is_initialized:
            return 0
        n = self.sink_keys.numel() + self.keys.numel()
        return n + sum(math.prod(c.key.shape) for c in self.chunks)

    # ---- cache management ---------------------------------------------------------------------
    def reset(self) -> None:
        self.keys = self.values = self.key_reference = None
        self.chunks = []
        self.cumulative_length = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the newest ``-tokens_to_remove`` tokens; only those still in the full-precision window."""
        if isinstance(tokens_to_remove, bool) or not isinstance(tokens_to_remove, int) or tokens_to_remove > 0:
            raise ValueError(
                f"tokens_to_remove must be an int <= 0 (tokens to drop, negated), got {tokens_to_remove!r}"
            )
        n = -tokens_to_remove
        if n == 0 or not self.is_initialized:
            return
        if n > self.keys.shape[-2] or (self.is_sliding and self.cumulative_length >= self.sliding_window):
            raise NotImplementedError(
                f"KVPackLayer can crop only tokens still in the full-precision window ({self.keys.shape[-2]} now, "
                f"asked {n}) and not once a sliding window is full: packed tokens cannot be un-appended"
            )
        self.keys, self.values = self.keys[..., :-n, :].clone(), self.values[..., :-n, :].clone()
        self.cumulative_length -= n

    def _select_batch(self, rows: torch.Tensor) -> None:
        """Keep batch rows ``rows`` (LongTensor) in that order; packed chunks record it and apply it after decode."""
        if not self.is_initialized:
            return
        rows = rows.to(self.device)
        self.sink_keys, self.sink_values = self.sink_keys.index_select(0, rows), self.sink_values.index_select(0, rows)
        self.keys, self.values = self.keys.index_select(0, rows), self.values.index_select(0, rows)
        if self.key_reference is not None:
            self.key_reference = self.key_reference.index_select(0, rows)
        self.chunks = [replace(c, order=rows.clone() if c.order is None else c.order[rows]) for c in self.chunks]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._select_batch(_batch_rows(beam_idx, self.keys.shape[0], self.device, "beam_idx"))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be a positive int, got {repeats!r}")
        if self.is_initialized:
            self._select_batch(torch.arange(self.keys.shape[0], device=self.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:  # nothing held yet: a no-op, as transformers' DynamicLayer does
            return
        self._select_batch(_batch_rows(indices, self.keys.shape[0], self.device, "indices"))

    def __repr__(self) -> str:
        kind = f"sliding={self.sliding_window}" if self.is_sliding else "full"
        return f"KVPackLayer({self.layer_idx}, {kind}, tokens={self.cumulative_length}, chunks={len(self.chunks)})"


def _batch_rows(indices, batch: int, device: torch.device, name: str) -> torch.Tensor:
    """``indices`` (1-D integer rows in ``0..batch - 1``, or a bool mask of ``batch``) as a LongTensor of rows."""
    try:
        rows = torch.as_tensor(indices, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a 1-D tensor of batch rows, got {type(indices).__name__}") from None
    if rows.dim() != 1 or not (rows.dtype == torch.bool or not rows.is_floating_point() and not rows.is_complex()):
        raise TypeError(
            f"{name} must be a 1-D integer (or bool) tensor of batch rows, got {rows.dtype} {tuple(rows.shape)}"
        )
    if rows.dtype == torch.bool:
        if rows.numel() != batch:
            raise ValueError(f"{name} is a bool mask of {rows.numel()} rows for a batch of {batch}")
        return rows.nonzero().flatten()
    rows = rows.long()
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= batch):
        raise ValueError(f"{name} holds rows outside 0..{batch - 1} (the cache's batch): {rows.tolist()[:8]}")
    return rows


def _check_states(keys, values) -> None:
    """``update``'s input: two float tensors ``(B, H, n, D)`` of one shape (the same tokens for K and V)."""
    for name, t in (("key_states", keys), ("value_states", values)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point() or t.dim() != 4:
            raise ValueError(
                f"{name} must be a float (batch, kv_heads, tokens, head_dim) tensor, got {t.dtype} {tuple(t.shape)}"
            )
        if t.is_meta:
            raise ValueError(f"{name} is on the meta device: it holds no values to cache")
    if keys.shape != values.shape or keys.dtype != values.dtype or keys.device != values.device:
        raise ValueError(
            f"key_states {tuple(keys.shape)} {keys.dtype} and value_states {tuple(values.shape)} {values.dtype} "
            "must have the same shape (token count included), dtype and device"
        )


def _check_like(keys: torch.Tensor, held: torch.Tensor, dtype: torch.dtype) -> None:
    """Later updates must match the first one's batch, heads, head_dim and dtype."""
    if keys.shape[:2] != held.shape[:2] or keys.shape[-1] != held.shape[-1] or keys.dtype != dtype:
        raise ValueError(
            f"key_states {tuple(keys.shape)} {keys.dtype} do not match the cache's (batch, kv_heads, _, head_dim) "
            f"= {(*held.shape[:2], '_', held.shape[-1])} {dtype}"
        )


def _check_range(keys: torch.Tensor, values: torch.Tensor, held: torch.dtype) -> None:
    """The full-precision window holds ``held``: refuse values it would turn into inf (a float32 model's 1e5)."""
    limit = torch.finfo(held).max
    for name, t in (("key_states", keys), ("value_states", values)):
        if t.numel() and not bool((t.abs() <= limit).all()):
            raise ValueError(
                f"{name} hold values beyond {held}'s range (|x| <= {limit:g}) of the full-precision window "
                "(or NaN); set CachePolicy(window_dtype=torch.bfloat16 or torch.float32)"
            )


def _tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def layer_kinds(config) -> list[int | None]:
    """Per decoder layer: ``None`` for full attention, the window for sliding/chunked layers.

    Reads ``config.layer_types`` (inferred from ``sliding_window`` when absent, as transformers
    does); other layer types (linear attention, shared KV) are not supported by this cache.
    """
    text = text_config(config)
    n_layers = text.num_hidden_layers
    types = getattr(text, "layer_types", None)
    if types is None:
        if getattr(text, "sliding_window", None) is not None:
            types = ["sliding_attention"] * n_layers
        elif getattr(text, "attention_chunk_size", None) is not None:
            types = ["chunked_attention"] * n_layers
        else:
            types = ["full_attention"] * n_layers
    kinds: list[int | None] = []
    for i, kind in enumerate(types):
        if kind == "full_attention":
            kinds.append(None)
        elif kind in _SLIDING_TYPES:
            window = text.sliding_window if kind == "sliding_attention" else text.attention_chunk_size
            kinds.append(int(window))
        else:
            raise ValueError(f"layer {i} has type {kind!r}; KVPackCache supports full, sliding and chunked attention")
    return kinds


class KVPackCache(Cache):
    """A drop-in transformers cache holding K and V packed with kvpack codecs.

    ``KVPackCache(config=model.config, key="turbo_prod:3", value="turbo_mse:2", residual=128,
    sinks=4, skip_layers=())`` (or ``policy=CachePolicy(...)``); pass it as ``past_key_values`` to
    ``model(...)`` or ``model.generate(...)``. K/V tensors are ``(batch, kv_heads, tokens, head_dim)``
    (GQA: the cache holds the KV heads only). ``key``/``value`` ``None`` keep that stream unpacked.
    """

    def __init__(
        self,
        config=None,
        key: str | None = "turbo_prod:3",
        value: str | None = "turbo_mse:2",
        residual: int = 128,
        sinks: int = 4,
        skip_layers: tuple[int, ...] = (),
        block: int | None = None,
        seed: int = 0,
        *,
        policy: CachePolicy | None = None,
    ) -> None:
        self.policy = policy = cache_policy(config, policy, key, value, residual, sinks, skip_layers, block, seed)
        kinds = layer_kinds(config)
        policy.check_model(len(kinds), *model_heads(config))
        super().__init__(layers=[KVPackLayer(policy, i, window) for i, window in enumerate(kinds)])
        if policy.pre_rope_keys:
            table = rope_table(config)
            for layer in self.layers:
                layer.rope = table

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """transformers' `Cache.update`, after checking ``layer_idx`` names one of the model's layers."""
        check_layer_idx(layer_idx, len(self.layers))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def nbytes(self, stream: str | None = None) -> int:
        """Bytes of every tensor held: ``stream`` ``"k"``, ``"v"`` or ``None`` (both)."""
        k, v = (sum(x) for x in zip(*(layer.stored_bytes() for layer in self.layers)))
        return {"k": k, "v": v, None: k + v}[_check_stream(stream)]

    def bits_per_value(self, stream: str | None = None) -> float:
        """Average bits per held value (``8 * nbytes / values``); NaN while the cache is empty."""
        values = sum(layer.stored_values() for layer in self.layers) * (1 if stream else 2)
        return 8 * self.nbytes(stream) / values if values else float("nan")


def cache_policy(config, policy, key, value, residual, sinks, skip_layers, block, seed) -> CachePolicy:
    """The policy of a kvpack cache from its constructor's arguments: ``policy``, else one built from the rest;
    ``config`` must be a transformers config (the caches' first check)."""
    if config is None or not hasattr(config, "num_hidden_layers") and not hasattr(config, "get_text_config"):
        raise TypeError(f"config must be the model's transformers config (model.config), got {config!r}")
    if policy is None:
        return CachePolicy(key, value, residual, sinks, tuple(skip_layers), block, seed)
    if not isinstance(policy, CachePolicy):
        raise TypeError(f"policy must be a kvpack.CachePolicy, got {type(policy).__name__}")
    return policy


def check_layer_idx(layer_idx, num_layers: int) -> None:
    """Raise unless ``layer_idx`` is an int in ``0..num_layers - 1`` (a negative index would name another layer)."""
    if isinstance(layer_idx, bool) or not isinstance(layer_idx, int):
        raise TypeError(f"layer_idx must be an int, got {layer_idx!r}")
    if not 0 <= layer_idx < num_layers:
        raise ValueError(f"layer_idx {layer_idx} is outside 0..{num_layers - 1} (the model's layers)")


def _check_stream(stream: str | None) -> str | None:
    if stream not in ("k", "v", None):
        raise ValueError(f"stream must be 'k', 'v' or None, got {stream!r}")
    return stream
