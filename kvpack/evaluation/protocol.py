"""The evaluation protocols: how a compressed KV cache meets the model, written once for every tool.

`kvpack.evaluation.evaluate`, `kvpack.evaluation.needle`, `kvpack.evaluation.inspect`,
`kvpack.tuning.sensitivity` and `kvpack.tuning.calibrate` all run the model through these:

- :func:`window_starts`: evenly spread, non-overlapping evaluation windows of a token stream.
- :func:`clean_prefill` / :func:`store_prefill` / :func:`continue_logits`: the ``snapshot``
  protocol. A clean prefill of the context (exact attention, as with any KV cache) records the
  K/V each layer received; a cache is then filled with the same ``update()`` calls a prefill
  through it makes, and the continuation is teacher-forced through it in one forward (its own
  K/V attended uncompressed within that pass).
- :func:`decode_logits`: the ``decode`` protocol (`kvpack.evaluation.decode`), what ``generate``
  through a `KVPackCache` gives each continuation token, in one forward.
- :class:`RoundTripCache` / :func:`inforward_logits`: the ``inforward`` protocol: every layer's K
  and V go through encode+decode before attention at every position (but the first ``sinks``).
- :func:`roundtrip`: one padded encode/decode of a ``(..., T, D)`` tensor as a cache packs it.
- :func:`capture_qkv`: every attention layer's post-RoPE Q, K, V of one forward.

All K/V tensors are ``(batch, kv_heads, tokens, head_dim)``; token ids ``(1, T)`` LongTensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from kvpack.codec import Codec
from kvpack.codecs.compose import IdentityCodec
from kvpack.hf.attention import delegate_attention, set_attention
from kvpack.hf.cache import key_reference, shift_keys
from kvpack.hf.config import cache_kwargs
from kvpack.policy import CachePolicy

__all__ = [
    "PROTOCOLS",
    "LayerQKV",
    "Prefill",
    "RoundTripCache",
    "capture_qkv",
    "clean_prefill",
    "continue_logits",
    "decode_logits",
    "inforward_logits",
    "roundtrip",
    "store_prefill",
    "window_starts",
]

PROTOCOLS = ("decode", "snapshot", "inforward")
CAPTURE_NAME = "kvpack_capture"


def window_starts(n_tokens: int, length: int, windows: int) -> list[int]:
    """``windows`` non-overlapping starts of spans of ``length`` tokens, evenly spread over ``n_tokens``."""
    if windows * length > n_tokens:
        raise ValueError(
            f"the text has {n_tokens} tokens; {windows} non-overlapping windows of ctx + n_eval = {length} "
            f"need {windows * length}: use a longer text or fewer/shorter windows"
        )
    stride = (n_tokens - length) // (windows - 1) if windows > 1 else 0
    return [i * stride for i in range(windows)]


# ---- snapshot: a clean prefill, stored, then the continuation in one forward ---------------------


@dataclass(frozen=True)
class Prefill:
    """A clean prefill: ``kv[layer] = (keys, values)`` exactly as each layer's ``update()`` received them
    (all ``ctx`` tokens, sliding-window layers too), and ``logits`` ``(1, vocab)`` at the last context position."""

    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]
    logits: torch.Tensor


class _RecordingCache(DynamicCache):
    """A DynamicCache that keeps the exact K/V each layer received in its first update (the prefill)."""

    def __init__(self, config) -> None:
        super().__init__(config=config)
        self.prefill: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.prefill.setdefault(layer_idx, (key_states, value_states))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def clean_prefill(model, context: torch.Tensor) -> Prefill:
    """One exact forward over ``context`` ``(1, ctx)``, recording every layer's K/V."""
    recorder = _RecordingCache(model.config)
    logits = model(context, **cache_kwargs(model, recorder), logits_to_keep=1).logits[0, -1:]
    return Prefill(recorder.prefill, logits)


def store_prefill(cache, prefill: Prefill):
    """``cache`` after the same ``update()`` calls a prefill through it makes (layer by layer); returns it."""
    for layer_idx in sorted(prefill.kv):
        cache.update(*prefill.kv[layer_idx], layer_idx)
    return cache


def continue_logits(model, cache, cont: torch.Tensor) -> torch.Tensor:
    """Logits ``(n, vocab)`` of ``cont`` ``(1, n)`` teacher-forced in one forward through ``cache``."""
    return model(cont, **cache_kwargs(model, cache)).logits[0]


def decode_logits(model, cache, cont: torch.Tensor) -> torch.Tensor:
    """Logits ``(n, vocab)`` of ``cont`` as one-token-per-forward decoding through ``cache`` (a `KVPackCache`
    holding the prefill) gives them, computed in one forward (`kvpack.evaluation.decode`). ``cache`` advances."""
    from kvpack.evaluation.decode import decode_logits as run

    return run(model, cache, cont)


# ---- inforward: every position attends to the codec's K/V ------------------------------------------


def roundtrip(codec: Codec, x: torch.Tensor, protect: int = 0, kept_width: int = 2) -> tuple[torch.Tensor, int]:
    """``(x_hat, bytes held)``: ``x`` ``(..., T, D)`` with its tokens after the first ``protect`` through
    ``codec.encode`` then ``decode``, packed at once as a cache packs a prefill.

    The ``protect`` kept tokens stay exact and count ``kept_width`` bytes per value (16-bit by default).
    A token count that is not a multiple of the codec's ``block_tokens`` is padded by repeating the
    last token (min/max and norms unchanged) and the padding's bytes are counted.
    """
    kept, rest = x[..., :protect, :], x[..., protect:, :]
    n = rest.shape[-2]
    if n == 0:
        return x, kept_width * kept.numel()
    pad = -n % int(codec.block_tokens)
    if pad:
        rest = torch.cat([rest, rest[..., -1:, :].expand(*rest.shape[:-2], pad, rest.shape[-1])], dim=-2)
    packed = codec.encode(rest.contiguous())
    x_hat = torch.cat([kept, codec.decode(packed)[..., :n, :].to(x.dtype)], dim=-2)
    return x_hat, kept_width * kept.numel() + packed.nbytes


class RoundTripCache(DynamicCache):
    """A DynamicCache whose ``update`` passes the new K and V through the policy's codecs (:func:`roundtrip`).

    The ``inforward`` protocol: attention, including the current pass's, sees only decoded K/V, except
    at the first ``policy.sinks`` positions of full-attention layers (held in the model dtype and counted
    at its width). ``policy.center_keys``: a layer's keys go through the codec as ``k - mu``, ``mu`` the mean of the
    non-sink keys of its first update (`kvpack.hf.cache.key_reference`, as `KVPackCache` fixes it; counted once at
    the model dtype's width). Tracks the bytes it encoded.
    """

    def __init__(self, config, policy: CachePolicy) -> None:
        super().__init__(config=config)
        self.policy = policy
        self._bytes = {"k": 0, "v": 0}
        self._values = {"k": 0, "v": 0}
        self._key_references: dict[int, torch.Tensor] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        start = layer.get_seq_length()  # position of the first new token
        sinks = 0 if getattr(layer, "is_sliding", False) else self.policy.sinks
        key_codec, value_codec = self.policy.codecs(key_states.shape[-1], layer_idx, key_states.shape[-3])
        protect = max(sinks - start, 0)
        reference = self._key_reference(key_codec, key_states, protect, layer_idx)
        key_states = self._roundtrip(key_codec, key_states, protect, "k", reference)
        value_states = self._roundtrip(value_codec, value_states, protect, "v")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _key_reference(self, codec, keys: torch.Tensor, protect: int, layer_idx: int) -> torch.Tensor | None:
        if not self.policy.center_keys or isinstance(codec, IdentityCodec):
            return None
        if layer_idx not in self._key_references and keys.shape[-2] > protect:
            self._key_references[layer_idx] = key_reference(keys[..., protect:, :])
            self._bytes["k"] += self._key_references[layer_idx].numel() * keys.element_size()
        return self._key_references.get(layer_idx)

    def _roundtrip(self, codec, x: torch.Tensor, protect: int, stream: str, reference=None) -> torch.Tensor:
        kept = x[..., :protect, :]
        shifted = x if reference is None else torch.cat([kept, shift_keys(x[..., protect:, :], reference, -1)], -2)
        x_hat, nbytes = roundtrip(codec, shifted, protect, kept_width=x.element_size())
        if reference is not None:
            x_hat = torch.cat([kept, shift_keys(x_hat[..., protect:, :], reference, +1)], -2)
        self._values[stream] += x.numel()
        self._bytes[stream] += nbytes
        return x_hat

    def bits_per_value(self, stream: str) -> float:
        """Measured bits per value of everything encoded so far for ``stream`` ``"k"`` or ``"v"``."""
        return 8 * self._bytes[stream] / self._values[stream] if self._values[stream] else float("nan")


def inforward_logits(model, ids: torch.Tensor, n_eval: int, policy: CachePolicy | None) -> tuple[torch.Tensor, object]:
    """Logits ``(n_eval, vocab)`` predicting the last ``n_eval`` tokens of ``ids`` ``(1, T)`` in one forward over
    ``ids[:, :-1]``: clean (``policy=None``, cache ``None``) or through a :class:`RoundTripCache` under ``policy``."""
    cache = None if policy is None else RoundTripCache(model.config, policy)
    return model(ids[:, :-1], **cache_kwargs(model, cache), logits_to_keep=n_eval).logits[0], cache


# ---- capture -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerQKV:
    """One layer's attention inputs for one sequence: ``q`` (q_heads, T, D); ``k``, ``v`` (kv_heads, T, D).

    ``scaling``: the softmax scale the model uses; ``window``: the sliding window or None;
    ``output``: the model's attention output (q_heads, T, D) when recorded (for checks).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scaling: float
    window: int | None = None
    output: torch.Tensor | None = None


def capture_qkv(model, ids: torch.Tensor, keep_output: bool = False) -> list[LayerQKV]:
    """Run ``model`` on ``ids`` (1-D or (1, T) LongTensor) and return each layer's post-RoPE Q, K, V.

    The model's attention implementation is swapped for a recording one for the call (and restored);
    the recording one delegates to the original, so the forward is unchanged.
    """
    from transformers import AttentionInterface

    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long:
        raise TypeError(f"ids must be a LongTensor of token ids, got {type(ids).__name__}")
    ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
        raise ValueError(f"ids must be one sequence, shape (T,) or (1, T), got {tuple(ids.shape)}")
    original = model.config._attn_implementation
    records: list[dict] = []

    def recording_attention(module, query, key, value, attention_mask, **kwargs):
        out, weights = delegate_attention(module, original)(module, query, key, value, attention_mask, **kwargs)
        records.append(
            {"layer": module.layer_idx, "q": query, "k": key, "v": value, "scaling": kwargs.get("scaling"),
             "window": kwargs.get("sliding_window"), "out": out}
        )  # fmt: skip
        return out, weights

    AttentionInterface.register(CAPTURE_NAME, recording_attention)
    try:
        if not set_attention(model, CAPTURE_NAME):
            raise ValueError(f"{type(model).__name__} keeps its own attention (not transformers' AttentionInterface): "
                             "its queries and keys cannot be captured")  # fmt: skip
        with torch.inference_mode():
            model(ids.to(next(model.parameters()).device), use_cache=False, logits_to_keep=1)
    finally:
        model.set_attn_implementation(original)
    layers = []
    for r in sorted(records, key=lambda r: r["layer"]):
        scaling = r["scaling"] if r["scaling"] is not None else r["q"].shape[-1] ** -0.5
        out = r["out"][0].transpose(0, 1) if keep_output else None  # (B, T, H, D) -> (H, T, D)
        layers.append(LayerQKV(r["q"][0], r["k"][0], r["v"][0], float(scaling), r["window"], out))
    return layers
