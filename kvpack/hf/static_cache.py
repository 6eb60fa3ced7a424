"""`StaticKVPackCache`: a graph-safe paged kvpack cache, pre-allocated for ``max_cache_len`` tokens.

Usage (see the README)::

    use_paged_attention(model)
    cache = StaticKVPackCache(model.config, max_cache_len=4096, policy=CachePolicy.preset("4bit", (model, tokenizer)))
    model.generate(ids, past_key_values=cache, max_new_tokens=256)   # compiled by transformers on CUDA

Everything a decode step touches is allocated at the first update and then changed in place on the
device: no host sync, no Python branch on a tensor's value, no tensor whose shape depends on the step, so
transformers' compile path (``torch.compile(mode="reduce-overhead")``, a CUDA graph of the whole model step)
replays it. Per full-attention layer and stream (K, V):

* ``sinks`` 16-bit tokens ``(B, sinks, H, D)``;
* pages ``(B * blocks, BLOCK_SIZE, H, row_bytes)`` in the layout of `kvpack.kernels.paged` (row ``b`` owns
  blocks ``b * blocks ..``: the block table is fixed) that hold *every* token after the sinks, encoded when it
  arrives (the fused encode kernel, K and V in one launch: ``kvpack::paged_encode_kv``);
* a 16-bit ring of ``residual + block`` tokens, the newest ones.

A query attends to the sinks, the first ``P`` page tokens and the ring's ``c - P`` newest tokens (``c``
tokens after the sinks, ``P = max(0, floor((c - 1 - residual) / block) * block)``): exactly the tokens that
`KVPackLayer` holds packed and in its window when that query runs, so both caches hold the same bits and
attend to the same values (the codecs are per token: a token's codes do not depend on when it is encoded).
One ``kvpack::paged_decode`` launch per layer reads it all. Layers without a paged codec (a 16-bit
``skip_layers`` layer) and sliding-window layers keep a 16-bit ring (``max_cache_len`` tokens, or the
window's): the same decode with no pages.

Prefill (several tokens per update) is eager: the layer returns the past (pages decoded) and the new tokens
for SDPA, and writes the new tokens after attention, where the mask says which are padding; left padding is
not stored (each row holds its own count). A multi-token update on a non-empty cache needs equal row lengths.
Past ``max_cache_len`` an eager update raises; a compiled step cannot raise, so it drops the tokens beyond the
pages (``generate`` stops at ``max_length``, which must not exceed ``max_cache_len``).
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvpack.codecs.compose import IdentityCodec
from kvpack.hf.attention import ATTENTION_NAME, key_validity, past_block_tokens, prefix_attention, register_pending
from kvpack.hf.cache import (
    _check_range, _check_states, _check_stream, cache_policy, check_layer_idx, key_reference, layer_kinds, shift_keys,
)  # fmt: skip
from kvpack.hf.config import model_heads, text_config
from kvpack.hf.paged_cache import BLOCK_SIZE
from kvpack.kernels.paged import (PagedCodec, dequantize_rows, graph_capturing, paged_codec, rows_from_packed,
                                  write_slots)  # fmt: skip
from kvpack.policy import CachePolicy

__all__ = ["StaticKVPackCache", "StaticPagedLayer"]

_DENSE_FORMAT_BITS = 4  # the unused pool of a layer without pages: one block of int:4 rows


def _static(*tensors: torch.Tensor) -> None:
    """Fixed addresses for torch.compile / CUDA graphs (as transformers' StaticLayer; not while tracing)."""
    if not torch.compiler.is_compiling():
        for t in tensors:
            torch._dynamo.mark_static_address(t)


class StaticPagedLayer(CacheLayerMixin):
    """One layer of `StaticKVPackCache` (see the module docstring): pages, sinks and ring, or a 16-bit ring only."""

    is_compileable = True
    is_croppable = False

    def __init__(
        self, policy: CachePolicy, layer_idx: int, sliding_window: int | None, max_cache_len: int, use_kernel
    ) -> None:
        super().__init__()
        self.policy, self.layer_idx, self.sliding_window = policy, layer_idx, sliding_window
        self.is_sliding = sliding_window is not None
        self.max_cache_len, self.use_kernel = max_cache_len, use_kernel
        self.cumulative_length = torch.tensor(0, dtype=torch.int64)
        self._prefill = None
        self._past_count, self._past = 0, None  # a chunk's past, from its update to its attention

    # ---- allocation -----------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.held_dtype = self.policy.held_dtype(self.dtype)
        if self.held_dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"StaticKVPackCache holds 16-bit tokens; the policy's window dtype is {self.held_dtype}")
        self.use_kernel = self.device.type == "cuda" if self.use_kernel is None else self.use_kernel
        if self.use_kernel:  # registers the ops kvpack::paged_encode_kv and kvpack::paged_decode
            import kvpack.kernels.decode_attention
            import kvpack.kernels.encode  # noqa: F401
        key_codec, value_codec = self.policy.codecs(d, self.layer_idx, heads)
        self.key_codec, self.value_codec = key_codec, value_codec
        dense = self.is_sliding or (isinstance(key_codec, IdentityCodec) and isinstance(value_codec, IdentityCodec))
        if dense:  # a 16-bit ring: the sliding window's tokens, or all of them
            self.sinks, self.ring_size, self.capacity = 0, min(self.sliding_window or self.max_cache_len,
                                                                self.max_cache_len), BLOCK_SIZE  # fmt: skip
            self.residual = self.block = 0
            self.key_fmt = self.value_fmt = PagedCodec("int", d, _DENSE_FORMAT_BITS)
        else:
            try:
                self.key_fmt, self.value_fmt = (
                    paged_codec(key_codec, self.device),
                    paged_codec(value_codec, self.device),
                )
            except (TypeError, ValueError) as exc:
                raise ValueError(
                    f"StaticKVPackCache pages every layer; layer {self.layer_idx}'s codecs ({key_codec!r}, "
                    f"{value_codec!r}) have no paged layout: {exc}"
                ) from exc
            self.sinks, self.residual = self.policy.sinks, self.policy.residual
            self.block = self.policy.block_for(key_codec, value_codec)
            self.ring_size = self.residual + self.block
            tokens = max(1, self.max_cache_len - self.sinks)
            self.capacity = math.ceil(tokens / BLOCK_SIZE) * BLOCK_SIZE
        self.dense = dense
        blocks = self.capacity // BLOCK_SIZE
        self.key_pages = torch.zeros(batch * blocks, BLOCK_SIZE, heads, self.key_fmt.row_bytes, dtype=torch.uint8,
                                     device=self.device)  # fmt: skip
        self.value_pages = torch.zeros(batch * blocks, BLOCK_SIZE, heads, self.value_fmt.row_bytes,
                                       dtype=torch.uint8, device=self.device)  # fmt: skip
        self.block_tables = torch.arange(batch * blocks, dtype=torch.int32, device=self.device).view(batch, blocks)
        # K and V windows in one buffer (sinks, then the ring): a decode step writes and gathers both at once
        self.window = torch.zeros(2, batch, self.sinks + self.ring_size, heads, d, dtype=self.held_dtype,
                                  device=self.device)  # fmt: skip
        self.window_k, self.window_v = self.window[0], self.window[1]
        self.lengths = torch.zeros(batch, dtype=torch.int64, device=self.device)  # tokens held per row
        # `center_keys`: the pages hold k - mu, mu fixed by the prefill (`KVPackLayer`'s rule); a static buffer, so
        # that a captured step reads the value the prefill wrote (zeros until then: no shift)
        centers = self.policy.center_keys and not dense and not isinstance(key_codec, IdentityCodec)
        self.key_reference = (torch.zeros(batch, heads, 1, d, dtype=self.held_dtype, device=self.device) if centers
                              else None)  # fmt: skip
        self.reference_fixed = False
        self.cumulative_length = self.cumulative_length.to(self.device)
        self.rows = torch.arange(batch, device=self.device)
        self.ring_steps = torch.arange(self.ring_size, device=self.device)
        self.host_tokens = 0  # eager updates (a compiled step cannot keep a host count: a prefill re-reads the device's)
        _static(self.key_pages, self.value_pages, self.block_tables, self.window, self.window_k, self.window_v,
                self.lengths, self.cumulative_length, *[t for t in (self.key_reference,) if t is not None])  # fmt: skip
        self.is_initialized = True

    # ---- update ---------------------------------------------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, H, n, D)``; n = 1: stored now, the new token returned; else past + new returned, stored after SDPA."""
        if not torch.compiler.is_compiling():
            _check_states(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if not torch.compiler.is_compiling():
            self._check_update(key_states, n)
            # a float32 model's 1e5 would be inf in the 16-bit window (a host check: not inside a graph capture)
            if self.held_dtype != key_states.dtype and not graph_capturing(key_states):
                _check_range(key_states, value_states, self.held_dtype)
        self.cumulative_length.add_(n)
        if n == 1:
            self._write_token(key_states[:, :, 0], value_states[:, :, 0])
            register_pending(self)
            return key_states, value_states
        # a chunk with a past: the attention takes the past block by block (`prefix_attention`), never all of it in
        # 16 bits; what is returned is the chunk itself
        self._past_count, self._past = self.past_blocks()
        self._mask_start = self.host_tokens - n - self._past_count  # mask column of the first past key
        self._prefill = (key_states, value_states)
        register_pending(self)
        return key_states, value_states

    def _check_update(self, key_states: torch.Tensor, n: int) -> None:
        shape = (self.rows.numel(), self.window_k.shape[2], self.window_k.shape[3])
        if (key_states.shape[0], key_states.shape[1], key_states.shape[3]) != shape or key_states.dtype != self.dtype:
            raise ValueError(
                f"key_states {tuple(key_states.shape)} {key_states.dtype} do not match the cache's (batch, kv_heads, "
                f"_, head_dim) = {shape} {self.dtype}"
            )
        if n > 1:  # a prefill syncs anyway: take the device's count (steps replayed from a graph or run compiled
            self.host_tokens = int(self.cumulative_length)  # moved it, not the host's)
        if self.host_tokens + n > self.max_cache_len:
            raise ValueError(
                f"layer {self.layer_idx} would hold {self.host_tokens + n} tokens; max_cache_len={self.max_cache_len}"
            )
        self.host_tokens += n

    def _write_token(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """One token per row ``(B, H, D)`` at each row's next position, in place: its sink or ring slot (K and V in
        one write; the token is always held there), and its page slot (K and V in one encode)."""
        after = self.lengths - self.sinks  # position after the sinks
        slot = torch.where(after < 0, self.lengths, self.sinks + after.remainder(self.ring_size))
        held = torch.stack([key, value]).to(self.held_dtype)  # the pages encode the held 16-bit token
        self.window[:, self.rows, slot] = held
        if not self.dense:
            paged = (after >= 0) & (after < self.capacity)
            key = shift_keys(held[0][:, :, None], self.key_reference, -1)[:, :, 0]
            self._encode(key, held[1], torch.where(paged, self.rows * self.capacity + after, -1))
        self.lengths.add_(1)

    def _write(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Tokens ``(B, n, H, D)`` at row positions ``(B, n)`` (negative: not stored): an eager prefill.

        The ring keeps only positions within ``ring_size`` of the row's newest one (a long prefill writes each ring
        slot once)."""
        keys, values = keys.to(self.held_dtype), values.to(self.held_dtype)
        batch, n = positions.shape
        newest = positions.max(dim=1, keepdim=True).values
        after = positions - self.sinks  # position after the sinks
        at_sink = (positions >= 0) & (after < 0)
        in_ring = (after >= 0) & (positions > newest - self.ring_size)
        at_ring = self.sinks + after.remainder(self.ring_size)
        slot = torch.where(after < 0, positions.clamp(0, max(self.sinks - 1, 0)), at_ring)
        self._put(slot, at_sink | in_ring, keys, values)
        if self.dense:
            return
        paged = (after >= 0) & (after < self.capacity)
        if self.key_reference is not None and not self.reference_fixed and bool(paged.any()):
            # the first non-sink tokens stored fix mu, as in KVPackLayer (a prefill is eager: one sync is fine)
            self.key_reference.copy_(key_reference(keys.transpose(1, 2), paged))
            self.reference_fixed = True
        keys = shift_keys(keys, self.key_reference, -1, token_dim=1)
        rows = self.rows[:, None].expand(batch, n)
        heads, d = keys.shape[2:]
        self._encode(keys.reshape(batch * n, heads, d), values.reshape(batch * n, heads, d),
                     torch.where(paged, rows * self.capacity + after, -1).reshape(-1))  # fmt: skip

    def _encode(self, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor) -> None:
        """Tokens ``(T, H, D)`` into the pages at ``slots`` ``(T,)`` (negative: not stored)."""
        if self.use_kernel:  # K and V in one launch
            k, v = self.key_fmt, self.value_fmt
            torch.ops.kvpack.paged_encode_kv(keys, values, slots, self.key_pages, self.value_pages, k.kind, k.mse_bits,
                                             k.rotation, k.boundaries, k.codebook, k.sketch, v.kind, v.mse_bits,
                                             v.rotation, v.boundaries, v.codebook, v.sketch)  # fmt: skip
            return
        for pages, fmt, codec, x in ((self.key_pages, self.key_fmt, self.key_codec, keys),
                                     (self.value_pages, self.value_fmt, self.value_codec, values)):  # fmt: skip
            # the codec itself, on the held 16-bit tokens (as KVPackLayer packs them): the same bits
            rows_ = rows_from_packed(codec.encode(x.transpose(0, 1).contiguous()), fmt).transpose(0, 1)
            write_slots(pages, rows_.contiguous(), slots)

    def _put(self, slot: torch.Tensor, keep: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """``window[row, slot] = token`` for the kept tokens ``(B, n, H, D)`` (their slots ``(B, n)`` distinct), in
        place and with no host sync: each window slot finds the kept token that maps to it by a scatter of token
        indices (a boolean index would sync; index_put with the dropped tokens' repeated slots has no defined
        order)."""
        batch, n = slot.shape
        token = torch.arange(n, device=self.device).expand(batch, n)
        source = torch.full((batch, self.window.shape[2]), -1, dtype=torch.long, device=self.device)
        source.scatter_reduce_(1, slot, torch.where(keep, token, -1), "amax")
        take = source.clamp(min=0)[:, :, None, None].expand(-1, -1, *keys.shape[2:])
        new = torch.stack([keys.gather(1, take), values.gather(1, take)])
        self.window.copy_(torch.where((source >= 0)[None, :, :, None, None], new, self.window))

    # ---- what attention reads -------------------------------------------------------------------
    def _packed_count(self) -> torch.Tensor:
        """Page tokens a query attends to (the rest sit in the ring): ``(B,)`` int64, as `KVPackLayer` packs."""
        if self.dense:
            return torch.zeros_like(self.lengths)
        after = self.lengths - self.sinks
        packed = torch.div(after - 1 - self.residual, self.block, rounding_mode="floor") * self.block
        return packed.clamp(0, self.capacity)

    def _window(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The 16-bit tokens a query attends to, valid ones first: keys, values ``(B, W, H, D)``, counts ``(B,)``."""
        if self.dense and not self.is_sliding:  # all tokens, never wrapped: the buffer itself (no copy)
            return self.window_k, self.window_v, self.lengths
        after = (self.lengths - self.sinks).clamp(min=0)
        in_ring = (after - packed).clamp(max=self.ring_size)
        start = packed if not self.dense else after - in_ring
        order = self.sinks + (start[:, None] + self.ring_steps).remainder(self.ring_size)  # oldest first
        if self.sinks:
            order = torch.cat([torch.arange(self.sinks, device=self.device).expand(order.shape[0], -1), order], 1)
        take = order[None, :, :, None, None].expand(2, -1, -1, *self.window.shape[3:])
        counts = self.lengths.clamp(max=self.sinks) + in_ring
        window = self.window.gather(2, take)  # K and V in one gather
        return window[0], window[1], counts

    def attend(self, query: torch.Tensor, scale: float) -> torch.Tensor:
        """``query`` (B, Hq, D) of the newest token -> ``(B, Hq, D)`` over everything held (one decode launch)."""
        packed = self._packed_count()
        window_k, window_v, counts = self._window(packed)
        window_k = shift_keys(window_k, self.key_reference, -1, token_dim=1)  # as the pages: k - mu (`PagedLayer`)
        args = (query.to(self.held_dtype), self.key_pages, self.value_pages, self.block_tables, packed.int(),
                window_k, window_v, counts.int())  # fmt: skip
        if self.use_kernel:
            k, v = self.key_fmt, self.value_fmt
            out = torch.ops.kvpack.paged_decode(*args, k.kind, k.mse_bits, k.codebook16, k.rotation16, k.sketch,
                                                v.kind, v.mse_bits, v.codebook16, v.unrotation, v.sketch, scale)  # fmt: skip
        else:
            from kvpack.kernels.attention import decode_ref

            out = decode_ref(*args[:5], key_codec=self.key_fmt, value_codec=self.value_fmt, window_keys=args[5],
                             window_values=args[6], window_lens=args[7], scale=scale)  # fmt: skip
        return out.to(query.dtype)

    def attention_forward(self, module, query, key, value, attention_mask, scaling, dropout, **kwargs):
        """The ``"kvpack_paged"`` attention of this layer's step: ``((B, q, Hq, D), None)``. One query: the paged
        decode (the mask is not read: padding is never stored); several: SDPA over what `update` returned with the
        mask's matching columns, then the new tokens are stored."""
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        batch, _, q_len, head_dim = query.shape
        scale = head_dim**-0.5 if scaling is None else scaling
        if q_len == 1 and self._prefill is None:
            return self.attend(query[:, :, 0], scale)[:, None], None
        past, self._past = self._past, None
        start, stop = self._mask_start, self._mask_start + self._past_count + q_len
        mask = None if attention_mask is None else attention_mask[..., start:stop]
        if self._past_count:
            tokens = past_block_tokens(batch, query.shape[1], head_dim, query.element_size())
            out = prefix_attention(query, past(tokens), key, value, mask, scale, past_count=self._past_count)
        else:
            out, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                            **kwargs)  # fmt: skip
        valid = key_validity(mask, batch, stop - start)
        self.store_prefill(None if valid is None else valid[:, -q_len:])
        return out, None

    def past(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The held tokens in position order, ``(B, H, tokens, D)`` in the model dtype (all of them at once)."""
        _, blocks = self.past_blocks()
        keys, values = zip(*blocks(max(self.capacity, 1)), strict=True)
        return torch.cat(keys, dim=2), torch.cat(values, dim=2)

    def past_blocks(self):
        """The held tokens in position order as ``(count, blocks)``: ``blocks(tokens)`` yields ``(key, value)`` ``(B,
        H, t, D)`` in the model dtype, the sinks, the pages ``tokens`` at a time (each dequantized when its block is
        taken) and the ring (two blocks at least, maybe empty). Rows must hold the same count (checked here)."""
        packed = self._packed_count()
        window_k, window_v, counts = self._window(packed)
        lengths, packed, counts = torch.stack([self.lengths, packed, counts.to(packed.dtype)]).tolist()  # one sync
        if len(set(lengths)) > 1:
            raise ValueError(
                f"layer {self.layer_idx}: rows hold different token counts {lengths} (a padded prefill); a multi-token "
                "update after it is not supported: decode one token at a time"
            )
        s, p, w = min(lengths[0], self.sinks), packed[0], counts[0]
        batch, heads, d = len(lengths), window_k.shape[2], window_k.shape[3]
        held = lambda x: x.to(self.dtype).transpose(1, 2)

        def blocks(tokens: int):
            yield held(window_k[:, :s]), held(window_v[:, :s])
            for a in range(0, p, tokens):
                b = min(a + tokens, p)
                slots = (self.rows[:, None] * self.capacity + torch.arange(a, b, device=self.device)).reshape(-1)
                yield tuple(
                    held(shift_keys(dequantize_rows(pages.view(-1, heads, pages.shape[3])[slots], fmt)
                                    .view(batch, b - a, heads, d), ref, +1, token_dim=1))
                    for pages, fmt, ref in ((self.key_pages, self.key_fmt, self.key_reference),
                                            (self.value_pages, self.value_fmt, None))
                )  # fmt: skip
            yield held(window_k[:, s:w]), held(window_v[:, s:w])

        return p + w, blocks

    def store_prefill(self, valid: torch.Tensor | None) -> None:
        """Write the tokens of the last multi-token update (``valid`` (B, n) False: padding, not stored)."""
        keys, values = self._prefill
        self._prefill = None
        batch, _, n, _ = keys.shape
        if valid is None:
            valid = torch.ones(batch, n, dtype=torch.bool, device=self.device)
        positions = torch.where(valid, valid.long().cumsum(1) - 1 + self.lengths[:, None], -1)
        self._write(keys.transpose(1, 2), values.transpose(1, 2), positions)
        self.lengths.add_(valid.sum(1))

    # ---- the container's interface --------------------------------------------------------------
    def get_seq_length(self) -> torch.Tensor | int:
        return self.cumulative_length if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        """Masks over every position ``0..max_cache_len`` (static shapes); the attention slices what it needs."""
        return self.max_cache_len, 0

    def stored_bytes(self) -> tuple[int, int]:
        """Bytes allocated: pages (the whole pre-allocated pool), sinks and ring; tables and lengths counted with K."""
        tables = sum(t.numel() * t.element_size() for t in (self.block_tables, self.lengths))
        window = self.window_k.numel() * self.window_k.element_size()
        pages_k = 0 if self.dense else self.key_pages.numel()
        pages_v = 0 if self.dense else self.value_pages.numel()
        return window + pages_k + tables, window + pages_v

    def stored_values(self) -> int:
        """K values the allocation holds room for: ``max_cache_len`` tokens per row (the ring's, where dense)."""
        tokens = self.ring_size if self.dense else self.sinks + self.capacity
        return self.rows.numel() * tokens * self.window_k.shape[2] * self.window_k.shape[3]

    def reset(self) -> None:
        """Empty the layer in place (addresses kept: a captured graph stays valid)."""
        if self.is_initialized:
            self.lengths.zero_()
            self.cumulative_length.zero_()
            self.host_tokens = 0
            self._prefill = None
            self._past_count, self._past = 0, None
            if self.key_reference is not None:
                self.key_reference.zero_()
                self.reference_fixed = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``b`` takes row ``beam_idx[b]``'s tokens, in place (addresses kept; no host sync)."""
        if not self.is_initialized:
            return
        rows = beam_idx.to(self.device)
        batch = self.rows.numel()
        held = (self.key_pages, self.value_pages, self.window_k, self.window_v, self.lengths, self.key_reference)
        for t in (t for t in held if t is not None):
            view = t.view(batch, -1, *t.shape[1:]) if t.shape[0] != batch else t  # pages: a row's blocks
            view.copy_(view.index_select(0, rows))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._refuse_resize("batch_repeat_interleave")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._refuse_resize("batch_select_indices")

    def _refuse_resize(self, what: str) -> None:
        if self.is_initialized:  # before the first update there is nothing to resize: the pages take its batch
            raise ValueError(
                f"StaticKVPackCache cannot {what} after its first update (its pages are sized for the batch)"
            )

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("StaticKVPackCache cannot crop (assisted decoding): use PagedKVPackCache or KVPackCache")

    def __repr__(self) -> str:
        return f"StaticPagedLayer({self.layer_idx}, max_cache_len={self.max_cache_len}, dense={self.dense})"


class StaticKVPackCache(Cache):
    """A compiled-generate-ready kvpack cache: ``StaticKVPackCache(model.config, max_cache_len, key=..., value=...,
    residual=..., sinks=..., block=..., policy=...)``, the arguments of `KVPackCache` plus ``max_cache_len`` (tokens
    per row, prompt included) and ``use_kernel`` (the Triton encode/decode ops; ``None``: iff on CUDA; ``False``: the
    codecs and `kvpack.kernels.attention.decode_ref`). The model must use ``"kvpack_paged"`` attention
    (`kvpack.use_paged_attention`). Pages are allocated at the first update, for its batch size."""

    def __init__(
        self,
        config=None,
        max_cache_len: int | None = None,
        key: str | None = "turbo_mse:4",
        value: str | None = "turbo_mse:4",
        residual: int = 128,
        sinks: int = 4,
        skip_layers: tuple[int, ...] = (),
        block: int | None = None,
        seed: int = 0,
        *,
        policy: CachePolicy | None = None,
        use_kernel: bool | None = None,
    ) -> None:
        policy = cache_policy(config, policy, key, value, residual, sinks, skip_layers, block, seed)
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"max_cache_len must be a positive int (tokens per sequence), got {max_cache_len!r}")
        if use_kernel is not None and not isinstance(use_kernel, bool):
            raise TypeError(f"use_kernel must be a bool or None, got {use_kernel!r}")
        if policy.pre_rope_keys:
            raise ValueError(
                "StaticKVPackCache does not take pre_rope_keys policies (the paged kernels read post-RoPE keys)"
            )
        model_config = text_config(config)
        implementation = getattr(model_config, "_attn_implementation", None)
        if implementation != ATTENTION_NAME:
            raise ValueError(
                f"config's attention implementation is {implementation!r}: "
                f"call kvpack.use_paged_attention(model) first (it sets {ATTENTION_NAME!r})"
            )
        kinds = layer_kinds(config)
        if getattr(model_config, "attention_chunk_size", None) is not None and None not in kinds:
            raise ValueError("StaticKVPackCache does not support chunked attention layers")
        policy.check_model(len(kinds), *model_heads(config))
        self.policy, self.max_tokens = policy, max_cache_len  # (transformers 5.17's Cache has a max_cache_len property)
        layers = [StaticPagedLayer(policy, i, w, max_cache_len, use_kernel) for i, w in enumerate(kinds)]
        super().__init__(layers=layers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if not torch.compiler.is_compiling():
            check_layer_idx(layer_idx, len(self.layers))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_tokens

    def nbytes(self, stream: str | None = None) -> int:
        """Bytes allocated (the pre-allocated pools included): ``stream`` ``"k"``, ``"v"`` or ``None`` (both)."""
        k, v = (sum(x) for x in zip(*(layer.stored_bytes() for layer in self.layers if layer.is_initialized)))
        return {"k": k, "v": v, None: k + v}[_check_stream(stream)]

    def bits_per_value(self, stream: str | None = None) -> float:
        """Bits per value of the allocation at ``max_cache_len`` tokens (``8 * nbytes / values``); NaN when empty."""
        values = sum(layer.stored_values() for layer in self.layers if layer.is_initialized) * (1 if stream else 2)
        return 8 * self.nbytes(stream) / values if values else float("nan")
