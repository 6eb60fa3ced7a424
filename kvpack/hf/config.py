"""What kvpack reads from a transformers model and its config: the decoder's text config, its KV heads' shape, and
the name its forward gives the cache argument."""

from __future__ import annotations

import inspect

__all__ = ["cache_kwargs", "model_heads", "text_config"]


def text_config(config):
    """The decoder's config (multimodal configs nest it; plain ones are it)."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def model_heads(config) -> tuple[int, int]:
    """``(num_kv_heads, head_dim)`` of the decoder: ``num_key_value_heads`` (else the query heads, MHA) and
    ``head_dim`` (else ``hidden_size // num_attention_heads``)."""
    text = text_config(config)
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return int(heads), int(head_dim)


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` for ``model(...)`` / ``model.generate(...)``: transformers 5.24 renamed ``past_key_values``
    to ``cache`` (the old name warns, removal announced for 5.40); 5.17 knows only ``past_key_values``."""
    forward = getattr(type(model), "forward", model)
    try:
        names = inspect.signature(forward).parameters
    except (TypeError, ValueError):  # a forward without a signature: the name every version still takes
        names = ()
    return {"cache": cache} if "cache" in names else {"past_key_values": cache}
