"""The ``"kvpack_paged"`` attention: how a paged kvpack cache's layer gets the query of its step.

transformers calls ``cache.update(k, v, layer_idx)`` and then the function registered under
``config._attn_implementation`` with the tensors ``update`` returned; the cache itself never reaches that function.
So a paged layer's ``update`` registers itself (`register_pending`) and `paged_attention` takes it back by the
attention module's ``layer_idx`` and lets the layer run the step (``layer.attention_forward``). Used by
`kvpack.hf.paged_cache.PagedKVPackCache` and `kvpack.hf.static_cache.StaticKVPackCache`; any other cache (or none)
gets transformers' SDPA. The mask interface is transformers' ``sdpa_mask``.
"""

from __future__ import annotations

import sys

import torch

from kvpack.hf.config import text_config

__all__ = [
    "ATTENTION_NAME", "attention_lse", "delegate_attention", "key_validity", "paged_attention", "past_block_tokens",
    "plain_prefix_mask", "prefix_attention", "register_pending", "set_attention", "use_paged_attention",
]  # fmt: skip

ATTENTION_NAME = "kvpack_paged"
# bytes of one block of the past in a prefill with a past: its K and V expanded to the query heads
PAST_BLOCK_BYTES = 256 << 20


def key_validity(mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """Per row, which of the ``length`` key positions the newest query may see: ``(B, length)`` bool, or None (all)."""
    if mask is None:
        return None
    if mask.dim() != 4 or mask.shape[-1] != length:
        raise ValueError(f"attention_mask must be (batch, 1, queries, {length}), got {tuple(mask.shape)}")
    last = mask[:, 0, -1, :]
    valid = last if last.dtype == torch.bool else last == 0  # additive float mask: 0 where attended
    return valid.expand(batch, length)


def register_pending(layer) -> None:
    """Hand ``layer`` to the next ``"kvpack_paged"`` attention call of its ``layer_idx`` (`paged_attention`).

    transformers calls ``cache.update(k, v, layer_idx)`` and then the attention function with what ``update``
    returned, never with the cache; so a paged layer's ``update`` registers itself here and the attention, which
    gets the attention module (``module.layer_idx``), takes it back. A module-level dict keyed by layer index is
    what torch.compile traces (an attribute set on a returned tensor is lost under dynamo: the attention would
    silently see a plain tensor). Rejected: passing the cache through ``generate(**kwargs)`` (twice, by hand),
    patching attention modules (per model). Not thread-safe: one forward at a time per process.
    """
    _PENDING[layer.layer_idx] = layer


_PENDING: dict[int, object] = {}


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The ``"kvpack_paged"`` attention: ``query`` (B, Hq, q, D) -> ``((B, q, Hq, D), None)``.

    A layer that registered itself in its ``update`` (`register_pending`: `PagedLayer`,
    `kvpack.hf.static_cache.StaticPagedLayer`) runs the step (one query token: the paged decode; several: SDPA,
    then it stores what it must). Otherwise (other caches, no cache, KVPackLayer storage): transformers' SDPA.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if kwargs.get("s_aux") is not None:  # use_paged_attention refuses such models; a model built around it may not
        raise ValueError(f"{type(module).__name__} has learned attention sinks (s_aux), which the paged attention "
                         "does not take: use KVPackCache with this model")  # fmt: skip
    layer_idx = getattr(module, "layer_idx", None)
    if layer_idx is None and _PENDING:
        raise ValueError(
            f"{type(module).__name__} has no layer_idx: the kvpack paged caches need it to find their layer"
        )
    layer = _PENDING.pop(layer_idx, None)
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)  # fmt: skip
    return layer.attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


def use_paged_attention(model) -> None:
    """Register ``"kvpack_paged"`` (attention and mask) with transformers and make it ``model``'s attention."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    softcap = getattr(text_config(model.config), "attn_logit_softcapping", None)
    if softcap is not None:  # Gemma2: tanh soft-capping of every score, which SDPA and the paged decode leave out
        raise ValueError(f"{type(model).__name__} soft-caps its attention scores (attn_logit_softcapping={softcap}), "
                         "which the paged attention does not: use KVPackCache with this model")  # fmt: skip
    sinks = [name for name, m in model.named_modules() if isinstance(getattr(m, "sinks", None), torch.nn.Parameter)]
    if sinks:  # GPT-OSS: a learned logit per head joins each softmax; the paged decode would leave it out
        raise ValueError(
            f"{type(model).__name__} has learned attention sinks ({sinks[0]}.sinks, ...), which the paged attention "
            "does not take: use KVPackCache with this model"
        )
    AttentionInterface.register(ATTENTION_NAME, paged_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
    if not set_attention(model, ATTENTION_NAME):
        raise ValueError(
            f"{type(model).__name__} does not route its attention through transformers' AttentionInterface (its "
            f"attention stays {text_config(model.config)._attn_implementation!r}), which the paged caches need: "
            "use KVPackCache with this model"
        )


def delegate_attention(module: torch.nn.Module, implementation: str):
    """The attention function ``module`` calls under ``implementation``: a registered one, else (``"eager"``) the
    eager function of the module's own modeling file, which carries terms SDPA lacks (GPT-OSS's learned sinks,
    Gemma2's logit soft-capping); transformers' SDPA when the file has none."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    registered = ALL_ATTENTION_FUNCTIONS.get(implementation)
    if registered is not None:
        return registered
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return eager if eager is not None else sdpa_attention_forward


def set_attention(model, name: str) -> bool:
    """``model.set_attn_implementation(name)`` (a registered AttentionInterface function); whether the model took
    it: one whose attention bypasses the interface (Falcon, ...) keeps its own, and transformers only warns."""
    model.set_attn_implementation(name)
    return getattr(text_config(model.config), "_attn_implementation", None) == name


def past_block_tokens(batch: int, q_heads: int, head_dim: int, itemsize: int) -> int:
    """Tokens of the past that one block of `prefix_attention` holds (K and V at the query heads: `PAST_BLOCK_BYTES`),
    a multiple of 256, at least 256."""
    return max(256, PAST_BLOCK_BYTES // (2 * batch * q_heads * head_dim * itemsize) // 256 * 256)


def _bias_block(mask: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns of a (B, 1, q, t) bool or additive mask as an additive bias in ``dtype`` whose rows start 16-element
    aligned (the CUDA memory-efficient kernel's requirement on a bias), and which query rows see any of them
    ``(B, 1, q)`` (the CPU kernel gives a row that sees none log-sum-exp 0, not -inf)."""
    batch, heads, q, t = mask.shape
    out = torch.empty(batch, heads, q, -(-t // 16) * 16, dtype=dtype, device=mask.device)[..., :t]
    if mask.dtype == torch.bool:
        return out.fill_(0.0).masked_fill_(~mask, float("-inf")), mask.any(-1)
    return out.copy_(mask), (mask > float("-inf")).any(-1)


def _block_mask(mask: torch.Tensor | None, col: int, t: int, dtype: torch.dtype):
    """``(bias, seen)`` of columns ``[col, col + t)`` of ``mask`` (`_bias_block`), ``(None, None)`` without one."""
    return (None, None) if mask is None else _bias_block(mask[..., col : col + t], dtype)


def _flash_ready(query: torch.Tensor) -> bool:
    """Whether torch's flash kernel takes this CUDA query with a GQA key/value as they are (16-bit, head_dim a
    multiple of 8 up to 256): no bias, no heads expanded."""
    return query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] % 8 == 0 \
        and query.shape[-1] <= 256


def attention_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None,
                  seen: torch.Tensor | None, scale: float, causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA of ``query`` (B, Hq, q, D) over ``key``/``value`` (B, Hkv, t, D) (Hq a multiple of Hkv) with its
    log-sum-exp: ``(out (B, Hq, q, D), lse (B, Hq, q) float32)``; ``bias``: additive (B, 1, q, t) or None, ``seen``
    (B, 1, q) the rows it lets see a key (the others get lse -inf); ``causal``: query i sees keys <= i (q == t).
    torch's own fused kernels (the public SDPA drops the log-sum-exp that a merge over blocks needs): on CUDA with
    no bias the flash kernel, which reads the KV heads as they are (GQA); with a bias the memory-efficient one over
    the heads expanded; on the CPU its flash kernel."""
    if bias is None and _flash_ready(query):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, causal, False,
                                                                      scale=scale)[:2]  # fmt: skip
        return out, lse.float()
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    if bias is not None:
        bias = bias.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    if query.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, bias, True, 0.0, causal,
                                                                          scale=scale)[:2]  # fmt: skip
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, causal,
                                                                              attn_mask=bias, scale=scale)  # fmt: skip
    lse = lse[..., : query.shape[2]].float()
    return out, lse if seen is None else lse.masked_fill(~seen, float("-inf"))


def plain_prefix_mask(mask: torch.Tensor | None, past: int) -> bool:
    """Whether ``mask`` (B, 1, q, past + q; bool or additive) lets every query see the whole past and its own chunk
    causally, as no mask at all would (then the attention needs no bias: one device check, one host sync; an eager
    prefill syncs anyway). Traced by torch.compile or captured in a CUDA graph: False (the mask is taken as it is)."""
    if mask is None:
        return True
    if torch.compiler.is_compiling() or (mask.is_cuda and torch.cuda.is_current_stream_capturing()):
        return False
    visible = mask if mask.dtype == torch.bool else mask == 0
    q = visible.shape[-2]
    if visible.shape[-1] != past + q:
        return False
    causal = torch.ones(q, q, dtype=torch.bool, device=mask.device).tril_()
    return bool((visible[..., :past].all() & (visible[..., past:] == causal).all()).item())


def prefix_attention(query: torch.Tensor, past, key: torch.Tensor, value: torch.Tensor,
                     mask: torch.Tensor | None, scale: float, past_count: int | None = None) -> torch.Tensor:
    """Attention of a prefill chunk with a past: ``query`` (B, Hq, q, D) over the past, ``past`` an iterable of
    ``(key, value)`` blocks (B, Hkv, t, D) in position order, made one at a time (a paged cache dequantizes one block
    of its pages per step, never the whole context), then over the chunk's own ``key``/``value`` (B, Hkv, q, D).
    ``mask``: (B, 1, q, past + q) bool or additive, the columns of those keys, or None (the past all visible, the
    chunk causal); ``past_count``: the past's tokens, if known, so that a mask that says just that is dropped
    (`plain_prefix_mask`: no bias, the flash kernel on CUDA). The blocks meet by their log-sum-exp. -> ``(B, q, Hq,
    D)`` in the query's dtype; a query row that sees no key at all gets zeros."""
    if past_count is not None and plain_prefix_mask(mask, past_count):
        mask = None
    out_all, lse_all, col = None, None, 0

    def add(out: torch.Tensor, lse: torch.Tensor) -> None:
        nonlocal out_all, lse_all
        out = out.float().nan_to_num_(0.0)  # rows that see none of this block's keys: lse -inf, weight 0 below
        if out_all is None:
            out_all, lse_all = out, lse
            return
        new = torch.logaddexp(lse_all, lse)
        keep, take = (lse_all - new).exp().nan_to_num_(0.0), (lse - new).exp().nan_to_num_(0.0)
        out_all = out_all * keep[..., None] + out * take[..., None]
        lse_all = new

    for past_key, past_value in past:
        t = past_key.shape[2]
        if t == 0:
            continue
        add(*attention_lse(query, past_key, past_value, *_block_mask(mask, col, t, query.dtype), scale))
        col += t
    add(*attention_lse(query, key, value, *_block_mask(mask, col, key.shape[2], query.dtype), scale,
                       causal=mask is None))  # fmt: skip
    if mask is not None:  # rows that saw no key at all (a padded row): zeros, not NaN
        out_all = torch.where(torch.isneginf(lse_all)[..., None], 0.0, out_all)
    return out_all.to(query.dtype).transpose(1, 2).contiguous()
