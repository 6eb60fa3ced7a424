"""`evaluate`: perplexity change, top-1 agreement and KL of a compressed KV cache against the uncompressed model.

Windows: ``windows`` non-overlapping spans of ``ctx + n_eval`` tokens, evenly spaced through the
tokenized text (deterministic). Metrics are over the ``n_eval`` continuation tokens of each window;
the logit at the last context position predicts the first of them and is included.

Protocols:

- ``snapshot``: a clean prefill of the ``ctx`` tokens (its attention uses the exact K/V, as with
  any KV cache), whose K/V are then stored in the compressed cache (sinks and residual window
  kept, the rest packed); the ``n_eval`` continuation tokens are teacher-forced in ONE forward
  through it. Their own K/V enter the cache in that pass and are attended uncompressed within it,
  so this measures what compressing the context costs. The reference is the same prefill and
  continuation through a `DynamicCache`.
- ``inforward``: one forward over the window where every layer's K and V go through
  encode+decode before attention at every position except the first ``sinks`` (no residual
  window: it does not apply to a single pass), against one clean forward.

``bits_k``/``bits_v``: measured bytes of what is held / values held. Snapshot: the compressed
cache right after the prefill of ``ctx`` tokens (sinks, residual window, packed blocks; the
full-precision parts as 16-bit floats, as a deployment holds them, also for a float32 CPU model). Inforward: the encoded K/V of the whole pass.
For a ``cache_factory`` cache they come from its ``bits_per_value(stream)`` when it has one, else
from ``bits=(bits_k, bits_v)``, else they are NaN.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache

from kvpack.evaluation.text import load_text, text_label, tokenize
from kvpack.hf.cache import KVPackCache
from kvpack.policy import CachePolicy

__all__ = ["PROTOCOLS", "EvalResult", "RoundTripCache", "evaluate", "verdict", "window_starts"]

logger = logging.getLogger(__name__)

PROTOCOLS = ("snapshot", "inforward")


def verdict(delta_ppl_pct: float, top1: float) -> str:
    """ACCEPT: |delta-ppl| <= 1% and top-1 >= 95%; MARGINAL: |delta-ppl| <= 5%; else REJECT."""
    if abs(delta_ppl_pct) <= 1.0 and top1 >= 0.95:
        return "ACCEPT"
    return "MARGINAL" if abs(delta_ppl_pct) <= 5.0 else "REJECT"


@dataclass(frozen=True)
class EvalResult:
    """Pooled metrics (ppl over all continuation tokens of all windows), their spread, bits and per-window rows."""

    model: str
    text: str
    protocol: str
    policy: dict
    ctx: int
    n_eval: int
    ppl_ref: float
    ppl: float
    delta_ppl_pct: float
    top1: float
    kl: float
    delta_ppl_pct_std: float
    top1_std: float
    kl_std: float
    bits_k: float
    bits_v: float
    bits_per_value: float
    seconds_per_window: float
    verdict: str
    windows: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def window_starts(n_tokens: int, length: int, windows: int) -> list[int]:
    """``windows`` non-overlapping starts of spans of ``length`` tokens, evenly spread over ``n_tokens``."""
    if windows * length > n_tokens:
        raise ValueError(
            f"the text has {n_tokens} tokens; {windows} non-overlapping windows of ctx + n_eval = {length} "
            f"need {windows * length}: use a longer text or fewer/shorter windows"
        )
    stride = (n_tokens - length) // (windows - 1) if windows > 1 else 0
    return [i * stride for i in range(windows)]


def _compare(ref_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """Per-window sums over tokens: NLL of both, top-1 agreement and KL(ref || compressed). Logits ``(T, V)``."""
    ref_lp, lp = F.log_softmax(ref_logits.float(), -1), F.log_softmax(logits.float(), -1)
    nll_ref = -ref_lp.gather(-1, targets[:, None]).sum().item()
    nll = -lp.gather(-1, targets[:, None]).sum().item()
    kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1).clamp_min(0).sum().item()
    top1 = (ref_logits.argmax(-1) == logits.argmax(-1)).sum().item()
    return {"nll_ref": nll_ref, "nll": nll, "kl": kl, "top1": top1, "tokens": targets.numel()}


class _RecordingCache(DynamicCache):
    """A DynamicCache that keeps the exact K/V each layer received in its first update (the prefill)."""

    def __init__(self, config) -> None:
        super().__init__(config=config)
        self.prefill: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.prefill.setdefault(layer_idx, (key_states, value_states))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


class RoundTripCache(DynamicCache):
    """A DynamicCache whose ``update`` passes the new K and V through the policy's codecs (encode, then decode).

    Used by the ``inforward`` protocol: attention, including the current pass's, sees only decoded
    K/V, except at the first ``policy.sinks`` positions of full-attention layers. A token count that
    is not a multiple of a codec's ``block_tokens`` is padded by repeating the last token (min/max
    and norms unchanged) and the padding's bytes are counted. Tracks the bytes it encoded.
    """

    def __init__(self, config, policy: CachePolicy) -> None:
        super().__init__(config=config)
        self.policy = policy
        self._bytes = {"k": 0, "v": 0}
        self._values = {"k": 0, "v": 0}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        start = layer.get_seq_length()  # position of the first new token
        sinks = 0 if getattr(layer, "is_sliding", False) else self.policy.sinks
        key_codec, value_codec = self.policy.codecs(key_states.shape[-1], layer_idx, key_states.shape[-3])
        key_states = self._roundtrip(key_codec, key_states, max(sinks - start, 0), "k")
        value_states = self._roundtrip(value_codec, value_states, max(sinks - start, 0), "v")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _roundtrip(self, codec, x: torch.Tensor, protect: int, stream: str) -> torch.Tensor:
        kept, rest = x[..., :protect, :], x[..., protect:, :]
        n = rest.shape[-2]
        self._values[stream] += x.numel()
        self._bytes[stream] += kept.numel() * kept.element_size()
        if n == 0:
            return x
        pad = -n % int(codec.block_tokens)
        if pad:
            rest = torch.cat([rest, rest[..., -1:, :].expand(*rest.shape[:-2], pad, rest.shape[-1])], dim=-2)
        packed = codec.encode(rest.contiguous())
        self._bytes[stream] += packed.nbytes
        return torch.cat([kept, codec.decode(packed)[..., :n, :].to(x.dtype)], dim=-2)

    def bits_per_value(self, stream: str) -> float:
        """Measured bits per value of everything encoded so far for ``stream`` ``"k"`` or ``"v"``."""
        return 8 * self._bytes[stream] / self._values[stream] if self._values[stream] else float("nan")


def _snapshot_window(
    model, ids: torch.Tensor, ctx: int, make_cache: Callable, memo: dict | None
) -> tuple[dict, object]:
    key = _memo_key("snapshot", model, ids, ctx)
    if memo is not None and key in memo:
        prefill, ref = memo[key]
    else:
        recorder = _RecordingCache(model.config)
        ref = model(ids[:, :ctx], past_key_values=recorder, logits_to_keep=1).logits[0, -1:]
        prefill = recorder.prefill
        if ids.shape[1] > ctx + 1:
            ref = torch.cat([ref, model(ids[:, ctx:-1], past_key_values=recorder).logits[0]])
        if memo is not None:
            memo[key] = (prefill, ref)
    cache = make_cache(model.config)
    for layer_idx in sorted(prefill):  # the same update() calls a prefill through `cache` makes
        cache.update(*prefill[layer_idx], layer_idx)
    held = _bits_of(cache)
    out = ref[:1]  # the prefill's last logit: the prefill attends to its exact K/V
    if ids.shape[1] > ctx + 1:
        out = torch.cat([out, model(ids[:, ctx:-1], past_key_values=cache).logits[0]])
    return _compare(ref, out, ids[0, ctx:]), held


def _inforward_window(
    model, ids: torch.Tensor, n_eval: int, policy: CachePolicy, memo: dict | None
) -> tuple[dict, object]:
    key = _memo_key("inforward", model, ids, n_eval)
    if memo is not None and key in memo:
        ref = memo[key]
    else:
        ref = model(ids[:, :-1], logits_to_keep=n_eval).logits[0]
        if memo is not None:
            memo[key] = ref
    cache = RoundTripCache(model.config, policy)
    out = model(ids[:, :-1], past_key_values=cache, logits_to_keep=n_eval).logits[0]
    return _compare(ref, out, ids[0, -n_eval:]), (cache.bits_per_value("k"), cache.bits_per_value("v"))


def _memo_key(protocol: str, model, ids: torch.Tensor, split: int) -> tuple:
    digest = hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()
    return protocol, id(model), split, digest


def _bits_of(cache) -> tuple[float, float] | None:
    if hasattr(cache, "bits_per_value"):
        return cache.bits_per_value("k"), cache.bits_per_value("v")
    return None


def _resolve_policy(
    preset, key, value, residual, sinks, skip_layers, only, seed, pre_rope_keys=False, model=None, calibration=True
) -> CachePolicy:
    if preset is not None:
        from kvpack.evaluation.presets import check_preset, resolve_preset

        check_preset(preset)
        if model is None:  # checked before the model loads; resolved (for this model) after
            return CachePolicy(None, None, pre_rope_keys=pre_rope_keys)
        policy = resolve_preset(preset, model, calibration, seed)
        policy = replace(policy, pre_rope_keys=True) if pre_rope_keys else policy
    else:
        policy = CachePolicy(key, value, residual, sinks, tuple(skip_layers), None, seed, pre_rope_keys=pre_rope_keys)
    if only not in (None, "k", "v"):
        raise ValueError(f"only must be None, 'k' or 'v', got {only!r}")
    if only == "k":  # compress K only: V stays uncompressed (per-layer K specs kept)
        return replace(policy, value=None, layer_values=(), head_values=())
    if only == "v":
        return replace(policy, key=None, layer_keys=(), head_keys=(), pre_rope_keys=False)
    return policy


def policy_record(policy: CachePolicy) -> dict:
    """The JSON form of ``policy``'s fields as `EvalResult.policy` records them (per-head specs included)."""

    def heads(specs) -> list:
        return [None if h is None else list(h) for h in specs]

    return {"key": policy.key, "value": policy.value, "residual": policy.residual, "sinks": policy.sinks,
            "skip_layers": list(policy.skip_layers), "block": policy.block,
            "layer_keys": list(policy.layer_keys), "layer_values": list(policy.layer_values),
            "head_keys": heads(policy.head_keys), "head_values": heads(policy.head_values),
            "fp_heads": [list(p) for p in policy.fp_heads], "pre_rope_keys": policy.pre_rope_keys}  # fmt: skip


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def evaluate(
    model="smollm2",
    text: str | Path | torch.Tensor | None = None,
    key: str | None = "fp16",
    value: str | None = "fp16",
    residual: int = 128,
    sinks: int = 4,
    skip_layers: tuple[int, ...] = (),
    ctx: int = 1024,
    n_eval: int = 256,
    windows: int = 8,
    protocol: str = "snapshot",
    only: str | None = None,
    preset: str | None = None,
    cache_factory: Callable | None = None,
    bits: tuple[float, float] | None = None,
    progress: bool = True,
    seed: int = 0,
    reference_memo: dict | None = None,
    pre_rope_keys: bool = False,
    calibration: bool = True,
) -> EvalResult:
    """Evaluate a cache policy on ``windows`` windows of ``ctx`` + ``n_eval`` tokens of ``text``.

    ``model``: a name/path for `kvpack.evaluation.models.load` or a ``(model, tokenizer)`` pair. ``text``: a path,
    ``"wikitext2"``, ``None`` (the embedded default) or a 1-D LongTensor of token ids. ``preset``
    replaces key/value/residual/sinks/skip_layers by a named policy from `kvpack.evaluation.presets`, derived for
    the model (calibrated unless ``calibration=False``).
    ``only="k"``/``"v"`` compresses one stream. ``pre_rope_keys``: keys packed with RoPE undone (KVQuant;
    snapshot only). ``cache_factory(config) -> Cache`` evaluates another
    cache (snapshot only; ``bits`` gives its bits when it cannot report them). ``reference_memo``: a
    dict passed to several calls on the same model and windows keeps each window's uncompressed
    prefill K/V and reference logits, so later calls run only the compressed continuation (about 3x
    faster for snapshot at ctx 1024 / n_eval 256; it holds ~100 MB per window for SmolLM2 in float32).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    _check_int("ctx", ctx, 1)
    _check_int("n_eval", n_eval, 1)
    _check_int("windows", windows, 1)
    policy = _resolve_policy(preset, key, value, residual, sinks, skip_layers, only, seed, pre_rope_keys)
    if policy.pre_rope_keys and protocol != "snapshot":
        raise ValueError("pre_rope_keys works with protocol='snapshot' (the inforward round trip sees post-RoPE keys)")
    if cache_factory is not None and (protocol != "snapshot" or only is not None or pre_rope_keys):
        raise ValueError("cache_factory works with protocol='snapshot', only=None and pre_rope_keys=False")
    raw_text = None if isinstance(text, torch.Tensor) else load_text(text)  # a bad path fails before the model loads
    if isinstance(model, (str, Path)):
        from kvpack.evaluation.models import load

        model_name, (lm, tokenizer) = str(model), load(model)
    elif isinstance(model, tuple) and len(model) == 2:
        (lm, tokenizer), model_name = model, getattr(model[0].config, "_name_or_path", "") or type(model[0]).__name__
    else:
        raise TypeError(f"model must be a name/path or a (model, tokenizer) pair, got {type(model).__name__}")
    if preset is not None:
        policy = _resolve_policy(preset, key, value, residual, sinks, skip_layers, only, seed, pre_rope_keys,
                                 (lm, tokenizer), calibration)  # fmt: skip
    if isinstance(text, torch.Tensor):
        ids, label = text.long().flatten(), "token ids"
    else:
        ids, label = tokenize(tokenizer, raw_text), text_label(text)
    starts = window_starts(ids.numel(), ctx + n_eval, windows)
    make_cache = cache_factory or (lambda config: KVPackCache(config, policy=policy))
    device = next(lm.parameters()).device

    rows, held, t0 = [], None, time.perf_counter()
    desc = f"{protocol} k={policy.key} v={policy.value}" if cache_factory is None else f"{protocol} custom cache"
    with torch.inference_mode():
        for start in tqdm(starts, desc=desc, unit="window", disable=not progress):
            window = ids[start : start + ctx + n_eval][None].to(device)
            if protocol == "snapshot":
                sums, window_bits = _snapshot_window(lm, window, ctx, make_cache, reference_memo)
            else:
                sums, window_bits = _inforward_window(lm, window, n_eval, policy, reference_memo)
            held = held or window_bits
            n = sums["tokens"]
            ppl_ref, ppl = math.exp(sums["nll_ref"] / n), math.exp(sums["nll"] / n)
            rows.append(
                {"start": start, "ppl_ref": ppl_ref, "ppl": ppl, "delta_ppl_pct": 100 * (ppl / ppl_ref - 1),
                 "top1": sums["top1"] / n, "kl": sums["kl"] / n, **{f"_{k}": v for k, v in sums.items()}}
            )  # fmt: skip
    seconds = (time.perf_counter() - t0) / len(starts)
    total = sum(r["_tokens"] for r in rows)
    ppl_ref = math.exp(sum(r["_nll_ref"] for r in rows) / total)
    ppl = math.exp(sum(r["_nll"] for r in rows) / total)
    delta = 100 * (ppl / ppl_ref - 1)
    top1 = sum(r["_top1"] for r in rows) / total
    kl = sum(r["_kl"] for r in rows) / total
    if bits is not None:
        held = (float(bits[0]), float(bits[1]))
    bits_k, bits_v = held if held is not None else (float("nan"), float("nan"))
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    return EvalResult(
        model=model_name, text=label, protocol=protocol, ctx=ctx, n_eval=n_eval,
        policy={**policy_record(policy), "only": only, "preset": preset,
                "cache_factory": None if cache_factory is None else getattr(cache_factory, "__name__", "custom")},
        ppl_ref=ppl_ref, ppl=ppl, delta_ppl_pct=delta, top1=top1, kl=kl,
        delta_ppl_pct_std=_std([r["delta_ppl_pct"] for r in public]), top1_std=_std([r["top1"] for r in public]),
        kl_std=_std([r["kl"] for r in public]), bits_k=bits_k, bits_v=bits_v, bits_per_value=(bits_k + bits_v) / 2,
        seconds_per_window=seconds, verdict=verdict(delta, top1), windows=public,
    )  # fmt: skip


def _std(xs: list[float]) -> float:
    """Sample standard deviation over windows (0 for one window)."""
    if len(xs) < 2:
        return 0.0
    mean = sum(xs) / len(xs)
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
