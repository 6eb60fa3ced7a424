"""What kvpack reads from a transformers model config: the decoder's text config and its KV heads' shape."""

from __future__ import annotations

__all__ = ["model_heads", "text_config"]


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
