"""Undo and redo a model's rotary position embedding (RoPE) on cached keys.

KVQuant (Hooper et al., arXiv 2401.18079, sec. 3.2) quantizes keys *before* RoPE: per-channel
outliers sit in fixed channels there, while RoPE mixes each channel pair with a position-dependent
rotation and smears them. A transformers cache only ever sees post-RoPE keys, so the cache undoes
RoPE before encoding (``unrope``) and redoes it after decoding (``rerope``). Both are the exact
per-position 2-D rotations of ``rotate_half`` RoPE (Llama, Qwen2, Mistral), so without quantization
the round trip is the identity up to float rounding, whatever the positions (left padding included).
"""

from __future__ import annotations

import torch

__all__ = ["RopeTable", "rerope", "rope_table", "unrope"]

RopeTable = tuple[torch.Tensor, float]  # (inv_freq (head_dim/2,) float64, attention scaling)


def rope_table(config) -> RopeTable:
    """The inverse frequencies and cos/sin scaling of ``config``'s RoPE (default, linear, llama3, yarn, ...).

    Raises ``ValueError`` for a model without RoPE parameters or with ``dynamic`` RoPE, whose frequencies
    depend on the sequence length seen so far.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    params = getattr(text, "rope_parameters", None) or {}
    if "rope_theta" not in params:
        raise ValueError("pre_rope_keys needs a RoPE model: config.rope_parameters has no 'rope_theta'")
    kind = params.get("rope_type", "default")
    if kind == "dynamic":
        raise ValueError("pre_rope_keys does not support dynamic RoPE (frequencies change with the length)")
    if kind == "default":
        dim = int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
        dim = int(dim * params.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        return inv_freq, 1.0
    if kind not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"pre_rope_keys does not know rope_type {kind!r}")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[kind](text, "cpu")
    return inv_freq.double(), float(scaling)


def _cos_sin(table: RopeTable, start: int, n: int, device, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq, scaling = table
    if 2 * inv_freq.numel() != head_dim:
        raise ValueError(f"RoPE covers {2 * inv_freq.numel()} of head_dim {head_dim}: partial RoPE is not supported")
    pos = torch.arange(start, start + n, dtype=torch.float64)
    freqs = pos[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(device, torch.float32), (emb.sin() * scaling).to(device, torch.float32)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rerope(keys: torch.Tensor, start: int, table: RopeTable) -> torch.Tensor:
    """RoPE of tokens at positions ``start, start + 1, ...`` on ``keys`` (..., tokens, head_dim); float32 out."""
    cos, sin = _cos_sin(table, start, keys.shape[-2], keys.device, keys.shape[-1])
    k = keys.float()
    return k * cos + _rotate_half(k) * sin


def unrope(keys: torch.Tensor, start: int, table: RopeTable) -> torch.Tensor:
    """Inverse of :func:`rerope` (the transposed rotation, divided by the scaling squared); float32 out."""
    cos, sin = _cos_sin(table, start, keys.shape[-2], keys.device, keys.shape[-1])
    scale2 = table[1] ** 2
    k = keys.float()
    # the rotation is [[c, -s], [s, c]] per pair; its transpose flips the sign of the sin term
    return (k * cos - _rotate_half(k) * sin) / scale2
