"""`PagedKVPackCache`: a `KVPackCache` whose decode steps run `kvpack.kernels.attention.decode` on the packed pages.

Usage (see the README)::

    use_paged_attention(model)  # registers "kvpack_paged" and sets it as the model's attention
    cache = PagedKVPackCache(model.config, key="turbo_mse:4", value="turbo_mse:4")
    model.generate(ids, past_key_values=cache)

A `PagedLayer` holds what a `KVPackLayer` holds (16-bit sinks and residual window, kept as one
``(B, tokens, H, D)`` tensor, the layout `decode` reads; ``sink_keys``/``keys`` are ``(B, H, t, D)`` views)
but its packed tokens live in the paged layout of `kvpack.kernels.paged`: per stream a uint8 pool
``(num_blocks, block_size, kv_heads, row_bytes)``, ``block_tables`` int32 ``(B, max_blocks)`` and
``seq_lens`` int32 ``(B,)``; the pools grow by whole blocks (the vLLM layout, arXiv 2309.06180).

Wiring with transformers 5.x: the attention module calls ``past_key_values.update(k, v, layer_idx)``
and then the function registered under ``config._attn_implementation`` with the tensors ``update``
returned; the cache itself never reaches that function (only transformers' own continuous-batching
cache is passed in kwargs). So a paged layer's ``update`` registers itself (`register_pending`) and
`paged_attention` takes it back by the attention module's ``layer_idx``. If the model's attention is switched away from
"kvpack_paged", a paged layer's ``update`` raises instead of handing SDPA only the new token.


* one query token (decode): ``update`` only appends the new token to the 16-bit window and returns it;
  `paged_attention` calls `kvpack.kernels.attention.decode` over the pages plus sinks and window (the kernel on
  CUDA, `decode_ref` elsewhere). Nothing is dequantized.
* several query tokens (prefill, chunked prefill): ``update`` returns the past (pages dequantized by
  `dequantize_rows`) + the new tokens, exactly as `KVPackLayer` does, and attention is transformers' SDPA.

Packing of aged window tokens happens in `paged_attention`, after the attention of the step, because
only there is the mask known: left-padding tokens are not written to the pages at all (their row keeps
fewer tokens), so the kernel, which has no mask, never sees them. Which tokens are packed and when is
the same as in `KVPackLayer` (its ``past()`` is taken before it packs), so both hold the same bits.

The mask interface of "kvpack_paged" is transformers' ``sdpa_mask`` (boolean, or ``None`` without padding).
Storage is chosen per layer at its first update (`PagedKVPackCache.update`): a `PagedLayer` where `paged_formats`
gives the layer's codecs a paged layout, else a plain `KVPackLayer` (codecs other than
``turbo_mse``/``turbo_prod``/``int`` (token axis, one group) at a head_dim the kernels take, sliding-window layers,
pre-RoPE keys, or a float32 window).
"""

from __future__ import annotations

import logging
import math

import torch

from kvpack.hf.attention import (ATTENTION_NAME, key_validity, paged_attention, past_block_tokens, prefix_attention,
                                 register_pending, use_paged_attention)
from kvpack.hf.cache import (
    KVPackCache, KVPackLayer, _check_like, _check_range, _check_states, check_layer_idx, shift_keys,
)  # fmt: skip
from kvpack.hf.config import text_config
from kvpack.kernels.attention import decode
from kvpack.kernels.paged import PagedCodec, dequantize_rows, paged_codec, rows_from_packed, write_slots
from kvpack.policy import CachePolicy

__all__ = [
    "ATTENTION_NAME",
    "PagedKVPackCache",
    "PagedLayer",
    "paged_attention",
    "paged_formats",
    "register_pending",
    "use_paged_attention",
]

logger = logging.getLogger(__name__)

BLOCK_SIZE = 16  # tokens per page, as in `kvpack bench attention`
_WINDOW_DTYPES = (torch.float16, torch.bfloat16)


def paged_formats(layer: KVPackLayer) -> tuple[PagedCodec, PagedCodec] | None:
    """The paged layouts of an initialized layer's (key, value) codecs, or ``None`` where it cannot be paged."""
    if layer.is_sliding or layer.key_rope is not None or layer.held_dtype not in _WINDOW_DTYPES:
        return None
    try:
        return paged_codec(layer.key_codec, layer.device), paged_codec(layer.value_codec, layer.device)
    except (TypeError, ValueError) as exc:
        logger.info("layer %d keeps KVPackLayer storage: %s", layer.layer_idx, exc)
        return None


class PagedLayer(KVPackLayer):
    """One layer of `PagedKVPackCache` whose packed tokens live in pages: decode steps through
    `kvpack.kernels.attention.decode`. ``formats``: the (key, value) `PagedCodec` of its codecs (`paged_formats`)."""

    def __init__(
        self,
        policy: CachePolicy,
        layer_idx: int,
        sliding_window: int | None,
        formats: tuple[PagedCodec, PagedCodec],
        model_config,
        use_kernel: bool | None = None,
    ) -> None:
        super().__init__(policy, layer_idx, sliding_window)
        self.key_fmt, self.value_fmt = formats
        self.model_config = model_config  # its `_attn_implementation` is checked at each decode
        self._past = None  # a chunk's past (`past_blocks`), from its update to its attention
        self.block_size = BLOCK_SIZE
        self.use_kernel = use_kernel  # Triton encode + decode kernels; None: iff the cache is on CUDA

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        batch, heads = key_states.shape[:2]
        self.use_kernel = self.device.type == "cuda" if self.use_kernel is None else self.use_kernel
        self.key_pages = torch.empty(1, self.block_size, heads, self.key_fmt.row_bytes, dtype=torch.uint8,
                                     device=self.device)  # fmt: skip
        self.value_pages = torch.empty(1, self.block_size, heads, self.value_fmt.row_bytes, dtype=torch.uint8,
                                       device=self.device)  # fmt: skip
        self.block_tables = torch.zeros(batch, 1, dtype=torch.int32, device=self.device)
        self.seq_lens = torch.zeros(batch, dtype=torch.int32, device=self.device)
        self.used_blocks = 0
        self.row_blocks = [0] * batch  # host mirrors: no device sync to plan block allocation
        self.row_tokens = [0] * batch
        self.packed_positions = 0  # token positions behind the pages (padding included), same for every row
        # the 16-bit tokens in the layout `decode` reads, (B, tokens, H, D): sinks, then the residual window;
        # sink_keys/keys (B, H, t, D) are views of it, so a decode step copies nothing to build its window
        self.window_k = key_states.new_empty(batch, 0, heads, key_states.shape[-1], dtype=self.held_dtype)
        self.window_v = value_states.new_empty(batch, 0, heads, value_states.shape[-1], dtype=self.held_dtype)
        self._window_lens: dict[tuple[int, int], torch.Tensor] = {}
        self._sync_views()

    def _sync_views(self) -> None:
        s = min(self.sinks, self.window_k.shape[1])  # the sinks fill first and are never packed
        self.sink_keys, self.keys = self.window_k[:, :s].transpose(1, 2), self.window_k[:, s:].transpose(1, 2)
        self.sink_values, self.values = self.window_v[:, :s].transpose(1, 2), self.window_v[:, s:].transpose(1, 2)

    # ---- update: store, return what attention needs --------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, H, n, D)`` in; decode (n = 1): the new token; else past (dequantized) + new (registered: `register_pending`)."""
        _check_states(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        else:
            _check_like(key_states, self.keys, self.dtype)
        if self.held_dtype != key_states.dtype:
            _check_range(key_states, value_states, self.held_dtype)
        implementation = getattr(self.model_config, "_attn_implementation", None)
        if implementation != ATTENTION_NAME:
            raise ValueError(
                f"PagedKVPackCache needs the model's attention implementation {ATTENTION_NAME!r}, now {implementation!r}:"
                " call kvpack.use_paged_attention(model) before generating"
            )
        n = key_states.shape[-2]
        # a chunk with a past: the attention takes the past block by block (`prefix_attention`), never all of it in
        # 16 bits; what is returned is the chunk itself
        self._past = self.past_blocks() if n > 1 and self.cumulative_length else None
        self.cumulative_length += n
        self._append(key_states, value_states)
        register_pending(self)
        return key_states, value_states

    def _append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """``(B, H, n, D)`` to the 16-bit tokens (sinks first); packing waits for `pack_aged` (after attention)."""
        keys = keys.to(self.held_dtype)
        self._fix_key_reference(keys[..., max(self.sinks - self.window_k.shape[1], 0) :, :])
        self.window_k = torch.cat([self.window_k, keys.transpose(1, 2)], dim=1)
        self.window_v = torch.cat([self.window_v, values.to(self.held_dtype).transpose(1, 2)], dim=1)
        self._sync_views()

    def past(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sinks, dequantized pages (zeros at skipped padding positions) and window: ``(B, H, tokens, D)``, model dtype."""
        keys, values = zip(*self.past_blocks()(max(self.packed_positions, 1)), strict=True)
        return torch.cat(keys, dim=-2), torch.cat(values, dim=-2)

    def past_blocks(self):
        """What `past` returns as blocks, made when taken: ``blocks(tokens)`` yields ``(key, value)`` ``(B, H, t, D)``,
        the sinks, the pages ``tokens`` positions at a time, the window as it is now (a later append is not in it)."""
        sinks = (self.sink_keys.to(self.dtype), self.sink_values.to(self.dtype))
        window = (self.keys.to(self.dtype), self.values.to(self.dtype))
        # a row that skipped padding holds its tokens at the last seq_lens[b] of the packed positions
        positions, skipped = self.packed_positions, self.packed_positions - self.seq_lens.long()

        def blocks(tokens: int):
            yield sinks
            for a in range(0, positions, tokens):
                idx = torch.arange(a, min(a + tokens, positions), device=self.device) - skipped[:, None]
                held, slots = idx >= 0, self._slots(idx.clamp(min=0))  # (B, t), for both streams
                yield (self._dequantized(self.key_pages, self.key_fmt, slots, held, self.key_reference),
                       self._dequantized(self.value_pages, self.value_fmt, slots, held))  # fmt: skip
            yield window

        return blocks

    def _dequantized(
        self, pages: torch.Tensor, fmt: PagedCodec, slots: torch.Tensor, held: torch.Tensor,
        reference: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Rows at ``slots`` (B, positions) decoded (plus ``reference``, `key_reference`), zero where not ``held``:
        ``(B, H, positions, D)``."""
        batch, positions = slots.shape
        rows = pages.view(-1, pages.shape[2], fmt.row_bytes)[slots]  # (B, positions, H, row_bytes)
        values = shift_keys(dequantize_rows(rows, fmt), reference, +1, token_dim=1) * held[:, :, None, None]
        return values.transpose(1, 2).to(self.dtype).reshape(batch, pages.shape[2], positions, fmt.head_dim)

    def _slots(self, positions: torch.Tensor) -> torch.Tensor:
        """Flat page slots of each row's token positions ``(B, n)`` (>= 0) through the block table."""
        blocks = self.block_tables.long().gather(1, positions // self.block_size)
        return blocks * self.block_size + positions % self.block_size

    # ---- attention of one new token, packing after a step --------------------------------------
    def attend(self, query: torch.Tensor, valid: torch.Tensor | None, scale: float) -> torch.Tensor:
        """``query`` (B, Hq, D) of the newest token -> ``(B, Hq, D)``; ``valid`` (B, tokens) bool key mask or None."""
        window_keys, window_values = self.window_k, self.window_v  # (B, W, H, D), contiguous
        batch, width = window_keys.shape[:2]
        if valid is None:  # W takes few values (sinks + residual .. + block): one small tensor each, made once
            lens = self._window_lens.get((batch, width))
            if lens is None:
                lens = torch.full((batch,), width, dtype=torch.int32, device=self.device)
                self._window_lens[(batch, width)] = lens
        else:
            # padding inside sinks/window: move each row's valid tokens first (attention ignores token order)
            held = torch.cat(
                [valid[:, : self.sink_keys.shape[-2]], valid[:, valid.shape[1] - self.keys.shape[-2] :]], 1
            )
            order = torch.argsort((~held).to(torch.int8), dim=1, stable=True)
            take = order[:, :, None, None].expand_as(window_keys)
            window_keys, window_values = window_keys.gather(1, take), window_values.gather(1, take)
            lens = held.sum(1, dtype=torch.int32)
        # pages hold k - mu: the window shifted by the same mu leaves every score shifted alike (softmax-invariant)
        window_keys = shift_keys(window_keys, self.key_reference, -1, token_dim=1)
        out = decode(
            query.to(self.held_dtype), self.key_pages, self.value_pages, self.block_tables, self.seq_lens,
            key_codec=self.key_fmt, value_codec=self.value_fmt, window_keys=window_keys,
            window_values=window_values, window_lens=lens, scale=scale, use_kernel=self.use_kernel,
        )  # fmt: skip
        return out.to(query.dtype)

    def attention_forward(self, module, query, key, value, attention_mask, scaling, dropout, **kwargs):
        """The ``"kvpack_paged"`` attention of this layer's step (`paged_attention`): ``((B, q, Hq, D), None)``."""
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        batch, _, q_len, head_dim = query.shape
        valid = key_validity(attention_mask, batch, self.cumulative_length)
        past, self._past = self._past, None
        scale = head_dim**-0.5 if scaling is None else scaling
        if q_len == 1:
            out = self.attend(query[:, :, 0], valid, scale)[:, None]
        elif past is not None:
            tokens = past_block_tokens(batch, query.shape[1], head_dim, query.element_size())
            out = prefix_attention(query, past(tokens), key, value, attention_mask, scale,
                                   past_count=self.cumulative_length - q_len)
        else:
            out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                            scaling=scaling, **kwargs)  # fmt: skip
        self.pack_aged(valid)
        return out, None

    def pack_aged(self, valid: torch.Tensor | None) -> None:
        """Pack the window's oldest whole blocks beyond ``residual`` (as `KVPackLayer`), skipping invalid tokens."""
        n_pack = (self.keys.shape[-2] - self.residual) // self.block * self.block
        if n_pack <= 0:
            return
        start, s = self.cumulative_length - self.keys.shape[-2], self.sink_keys.shape[-2]
        keep = None if valid is None else valid[:, start : start + n_pack]
        self._write(self.window_k[:, s : s + n_pack], self.window_v[:, s : s + n_pack], keep)
        self.packed_positions += n_pack
        self.window_k = torch.cat([self.window_k[:, :s], self.window_k[:, s + n_pack :]], dim=1)
        self.window_v = torch.cat([self.window_v[:, :s], self.window_v[:, s + n_pack :]], dim=1)
        self._sync_views()

    def _write(self, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor | None) -> None:
        """Encode ``(B, n, H, D)`` tokens into each row's next page slots (``keep`` (B, n) False: not written)."""
        batch, n, heads, _ = keys.shape
        if keep is None:
            counts = [n] * batch
            index = torch.arange(n, device=self.device) + self.seq_lens.long()[:, None]
        else:
            counts = keep.sum(1).tolist()
            for b, c in enumerate(counts):  # left padding only: once a row holds a token, it holds every later one
                if c and (not bool(keep[b, n - c :].all()) or (self.row_tokens[b] and c != n)):
                    raise NotImplementedError(
                        "PagedKVPackCache handles left padding only: a padded position after a real token"
                    )
            index = torch.where(keep, keep.long().cumsum(1) - 1 + self.seq_lens.long()[:, None], -1)
        self._reserve([t + c for t, c in zip(self.row_tokens, counts)])
        slots = torch.where(index >= 0, self._slots(index.clamp(min=0)), -1).reshape(-1)  # (B * n,) token order (b, t)
        keys = shift_keys(keys, self.key_reference, -1, token_dim=1)
        if self.use_kernel:  # K and V in one launch
            from kvpack.kernels.encode import paged_encode_kv

            paged_encode_kv(keys.reshape(batch * n, heads, -1), values.reshape(batch * n, heads, -1), slots,
                            self.key_pages, self.value_pages, self.key_fmt, self.value_fmt)  # fmt: skip
        else:
            for pages, fmt, codec, x in (
                (self.key_pages, self.key_fmt, self.key_codec, keys),
                (self.value_pages, self.value_fmt, self.value_codec, values),
            ):  # the codec itself, called on the same (B, H, n, D) tensor as KVPackLayer: the same bits
                rows = rows_from_packed(codec.encode(x.transpose(1, 2).contiguous()), fmt)
                write_slots(pages, rows.transpose(1, 2).reshape(batch * n, heads, -1), slots)
        self.row_tokens = [t + c for t, c in zip(self.row_tokens, counts)]
        self.seq_lens += torch.tensor(counts, dtype=torch.int32, device=self.device)

    def _reserve(self, lengths: list[int]) -> None:
        """Give each row enough blocks for ``lengths[b]`` tokens; grow the pools by at least 1/8 (amortized copies)."""
        need = [math.ceil(t / self.block_size) for t in lengths]
        extra = sum(max(0, k - have) for k, have in zip(need, self.row_blocks))
        if extra == 0:
            return
        capacity = self.key_pages.shape[0]
        if self.used_blocks + extra > capacity:
            grow = max(self.used_blocks + extra, capacity + capacity // 8) - capacity
            self.key_pages = torch.cat([self.key_pages, self.key_pages.new_empty(grow, *self.key_pages.shape[1:])])
            self.value_pages = torch.cat([self.value_pages,
                                          self.value_pages.new_empty(grow, *self.value_pages.shape[1:])])  # fmt: skip
        width = self.block_tables.shape[1]
        if max(need) > width:
            more = max(max(need), width + width // 8) - width
            self.block_tables = torch.cat([self.block_tables, self.block_tables.new_zeros(len(need), more)], dim=1)
        for b, (k, have) in enumerate(zip(need, self.row_blocks)):
            if k > have:
                self.block_tables[b, have:k] = torch.arange(self.used_blocks, self.used_blocks + k - have)
                self.used_blocks += k - have
                self.row_blocks[b] = k

    # ---- accounting -----------------------------------------------------------------------------
    def stored_bytes(self) -> tuple[int, int]:
        """Bytes of every tensor held: allocated pages (spare capacity included), tables counted with K."""
        window = [t.numel() * t.element_size() for t in (self.sink_keys, self.keys, self.sink_values, self.values)]
        tables = sum(t.numel() * t.element_size() for t in (self.block_tables, self.seq_lens))
        k = window[0] + window[1] + self.key_pages.numel() + tables
        return k, window[2] + window[3] + self.value_pages.numel()

    def stored_values(self) -> int:
        """K values held: 16-bit tokens (padding included, as held) plus the tokens in the pages."""
        return (
            self.sink_keys.numel() + self.keys.numel() + sum(self.row_tokens) * self.keys.shape[1] * self.keys.shape[3]
        )

    # ---- cache management -----------------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        self._past = None
        self.key_pages = self.value_pages = self.block_tables = self.seq_lens = self.window_k = self.window_v = None

    def crop(self, tokens_to_remove: int) -> None:
        """As `KVPackLayer.crop` (only tokens still in the 16-bit window)."""
        super().crop(tokens_to_remove)
        # KVPackLayer replaced keys/values: rebuild the (B, tokens, H, D) window from them
        self.window_k = torch.cat([self.sink_keys, self.keys], dim=-2).transpose(1, 2).contiguous()
        self.window_v = torch.cat([self.sink_values, self.values], dim=-2).transpose(1, 2).contiguous()
        self._sync_views()

    def _select_batch(self, rows: torch.Tensor) -> None:
        """Keep batch rows ``rows``: their blocks are copied into fresh pools (rows may repeat, blocks never shared)."""
        rows = rows.to(self.device)
        self.window_k, self.window_v = self.window_k.index_select(0, rows), self.window_v.index_select(0, rows)
        self._sync_views()
        if self.key_reference is not None:
            self.key_reference = self.key_reference.index_select(0, rows)
        width = self.block_tables.shape[1]
        blocks = self.block_tables.index_select(0, rows).long().reshape(-1)
        self.key_pages, self.value_pages = self.key_pages[blocks], self.value_pages[blocks]
        self.block_tables = torch.arange(blocks.numel(), dtype=torch.int32, device=self.device).view(-1, width)
        self.seq_lens = self.seq_lens.index_select(0, rows)
        host = rows.tolist()
        self.row_tokens = [self.row_tokens[r] for r in host]
        self.row_blocks = [width] * len(host)
        self.used_blocks = blocks.numel()

    def __repr__(self) -> str:
        return f"PagedLayer({self.layer_idx}, tokens={self.cumulative_length}, pages={self.used_blocks})"


class PagedKVPackCache(KVPackCache):
    """`KVPackCache` whose layers hold their packed tokens in pages where the kernels take their codecs: same
    arguments, same held bits, decode through the paged kernel.

    The model must use the ``"kvpack_paged"`` attention (`use_paged_attention`). Each layer's storage is chosen at
    its first update: a `PagedLayer`, or a `KVPackLayer` where `paged_formats` says the layer cannot be paged
    (both work under ``"kvpack_paged"``). ``use_kernel``: the Triton encode and decode kernels (``None``: iff on
    CUDA; ``False``: the codec and `kvpack.kernels.attention.decode_ref`; ``True`` on the CPU runs them through
    ``TRITON_INTERPRET=1``).
    """

    def __init__(self, config=None, *args, use_kernel: bool | None = None, **kwargs) -> None:
        if use_kernel is not None and not isinstance(use_kernel, bool):
            raise TypeError(f"use_kernel must be a bool or None, got {use_kernel!r}")
        super().__init__(config, *args, **kwargs)
        self.model_config, self.use_kernel = text_config(config), use_kernel
        implementation = getattr(self.model_config, "_attn_implementation", None)
        if implementation != ATTENTION_NAME:
            raise ValueError(
                f"config's attention implementation is {implementation!r}: "
                f"call kvpack.use_paged_attention(model) first (it sets {ATTENTION_NAME!r})"
            )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        check_layer_idx(layer_idx, len(self.layers))
        layer = self.layers[layer_idx]
        if type(layer) is KVPackLayer and not layer.is_initialized:  # first update: choose the layer's storage
            layer.lazy_initialization(key_states, value_states)
            formats = paged_formats(layer)
            if formats is not None:
                self.layers[layer_idx] = PagedLayer(self.policy, layer_idx, layer.sliding_window, formats,
                                                    self.model_config, self.use_kernel)  # fmt: skip
                self.layers[layer_idx].rope = layer.rope
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)
