"""`evaluate`: perplexity change, top-1 agreement and KL of a compressed KV cache against the uncompressed model.

Windows: ``windows`` non-overlapping spans of ``ctx + n_eval`` tokens, evenly spaced through the
tokenized text (deterministic). Metrics are over the ``n_eval`` continuation tokens of each window;
the logit at the last context position predicts the first of them and is included.

Protocols (`kvpack.evaluation.protocol`):

- ``decode`` (the default): the clean prefill of ``snapshot``, then every continuation token
  attends to the cache as ``model.generate`` through it would show it: the sinks and residual
  window in 16-bit, every block packed so far (with ``residual=0, block=1``: every earlier
  token) decoded, itself exact (`kvpack.evaluation.decode`, one forward, checked against one
  token per forward). The reference is the same as ``snapshot``'s. Needs a `KVPackCache`.
- ``snapshot``: a clean prefill of the ``ctx`` tokens (its attention uses the exact K/V, as with
  any KV cache), whose K/V are then stored in the compressed cache (sinks and residual window
  kept, the rest packed); the ``n_eval`` continuation tokens are teacher-forced in ONE forward
  through it. Their own K/V enter the cache in that pass and are attended uncompressed within it,
  so this measures what compressing the context costs. The reference is the same prefill and
  continuation through a `DynamicCache`.
- ``inforward``: one forward over the window where every layer's K and V go through
  encode+decode before attention at every position except the first ``sinks`` (no residual
  window: it does not apply to a single pass), against one clean forward.

``bits_k``/``bits_v``: measured bytes of what is held / values held. Snapshot and decode: the compressed
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

from kvpack.evaluation.protocol import (
    PROTOCOLS,
    clean_prefill,
    continue_logits,
    decode_logits,
    inforward_logits,
    store_prefill,
    window_starts,
)
from kvpack.evaluation.text import load_text, text_label, tokenize
from kvpack.hf.cache import KVPackCache
from kvpack.policy import CachePolicy, policy_to_dict

__all__ = ["PROTOCOLS", "VERDICT", "EvalResult", "VerdictThresholds", "evaluate", "verdict"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerdictThresholds:
    """ACCEPT: |delta-ppl| <= ``accept_delta_ppl_pct`` % and top-1 >= ``accept_top1``; MARGINAL: |delta-ppl| <=
    ``marginal_delta_ppl_pct`` %; else REJECT. The README's quality targets are these numbers."""

    accept_delta_ppl_pct: float
    accept_top1: float
    marginal_delta_ppl_pct: float

    def describe(self) -> str:
        return (
            f"ACCEPT: |delta-ppl| <= {self.accept_delta_ppl_pct:g}% and top-1 >= {100 * self.accept_top1:g}%; "
            f"MARGINAL: |delta-ppl| <= {self.marginal_delta_ppl_pct:g}%; else REJECT"
        )


# the one threshold set of the verdict, of `kvpack eval`'s printout and of the README's targets (the `4bit`
# preset's target is ACCEPT, the `2.5bit` one's MARGINAL)
VERDICT = VerdictThresholds(accept_delta_ppl_pct=0.5, accept_top1=0.97, marginal_delta_ppl_pct=5.0)


def verdict(delta_ppl_pct: float, top1: float) -> str:
    """``"ACCEPT"``, ``"MARGINAL"`` or ``"REJECT"`` under `VERDICT` (see `VerdictThresholds`)."""
    if abs(delta_ppl_pct) <= VERDICT.accept_delta_ppl_pct and top1 >= VERDICT.accept_top1:
        return "ACCEPT"
    return "MARGINAL" if abs(delta_ppl_pct) <= VERDICT.marginal_delta_ppl_pct else "REJECT"


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


def _compare(ref_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """Per-window sums over tokens: NLL of both, top-1 agreement and KL(ref || compressed). Logits ``(T, V)``."""
    ref_lp, lp = F.log_softmax(ref_logits.float(), -1), F.log_softmax(logits.float(), -1)
    nll_ref = -ref_lp.gather(-1, targets[:, None]).sum().item()
    nll = -lp.gather(-1, targets[:, None]).sum().item()
    kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1).clamp_min(0).sum().item()
    top1 = (ref_logits.argmax(-1) == logits.argmax(-1)).sum().item()
    return {"nll_ref": nll_ref, "nll": nll, "kl": kl, "top1": top1, "tokens": targets.numel()}


def _prefill_window(
    model, ids: torch.Tensor, ctx: int, make_cache: Callable, memo: dict | None, protocol: str
) -> tuple[dict, object]:
    """``snapshot`` or ``decode``: the clean prefill's K/V stored in ``make_cache``'s cache, the rest teacher-forced
    through it (one forward, or as generation decodes it); against the same through a `DynamicCache`."""
    key = _memo_key("snapshot", model, ids, ctx)  # both protocols share the clean reference
    if memo is not None and key in memo:
        prefill, ref = memo[key]
    else:
        prefill = clean_prefill(model, ids[:, :ctx])
        ref = prefill.logits
        if ids.shape[1] > ctx + 1:
            exact = store_prefill(DynamicCache(config=model.config), prefill)
            ref = torch.cat([ref, continue_logits(model, exact, ids[:, ctx:-1])])
        if memo is not None:
            memo[key] = (prefill, ref)
    cache = store_prefill(make_cache(model.config), prefill)
    held = _bits_of(cache)
    out = prefill.logits  # the prefill's last logit: the prefill attends to its exact K/V
    if ids.shape[1] > ctx + 1:
        run = decode_logits if protocol == "decode" else continue_logits
        out = torch.cat([out, run(model, cache, ids[:, ctx:-1])])
    return _compare(ref, out, ids[0, ctx:]), held


def _inforward_window(
    model, ids: torch.Tensor, n_eval: int, policy: CachePolicy, memo: dict | None
) -> tuple[dict, object]:
    key = _memo_key("inforward", model, ids, n_eval)
    if memo is not None and key in memo:
        ref = memo[key]
    else:
        ref, _ = inforward_logits(model, ids, n_eval, None)
        if memo is not None:
            memo[key] = ref
    out, cache = inforward_logits(model, ids, n_eval, policy)
    return _compare(ref, out, ids[0, -n_eval:]), (cache.bits_per_value("k"), cache.bits_per_value("v"))


def _memo_key(protocol: str, model, ids: torch.Tensor, split: int) -> tuple:
    digest = hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()
    return protocol, id(model), split, digest


def _bits_of(cache) -> tuple[float, float] | None:
    if hasattr(cache, "bits_per_value"):
        return cache.bits_per_value("k"), cache.bits_per_value("v")
    return None


def _resolve_policy(
    preset, key, value, residual, sinks, skip_layers, only, seed, pre_rope_keys=False, model=None, calibration=True,
    policy=None, center_keys=False,
) -> CachePolicy:
    key_flags = {"pre_rope_keys": pre_rope_keys, "center_keys": center_keys}
    for name, flag in key_flags.items():
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    flags = {name: True for name, flag in key_flags.items() if flag}  # they turn a policy's own on, never off
    if policy is not None:
        if not isinstance(policy, CachePolicy):
            raise TypeError(f"policy must be a CachePolicy (e.g. load_policy(file)), got {type(policy).__name__}")
        if preset is not None:
            raise ValueError(f"give a policy or a preset, not both (preset={preset!r})")
        policy = replace(policy, **flags)
    elif preset is not None:
        from kvpack.evaluation.presets import check_preset, resolve_preset

        check_preset(preset)
        if model is None:  # checked before the model loads; resolved (for this model) after
            return CachePolicy(None, None, **flags)
        policy = replace(resolve_preset(preset, model, calibration, seed), **flags)
    else:
        policy = CachePolicy(key, value, residual, sinks, tuple(skip_layers), None, seed, **flags)
    if only not in (None, "k", "v"):
        raise ValueError(f"only must be None, 'k' or 'v', got {only!r}")
    if only == "k":  # compress K only: V stays uncompressed (per-layer K specs kept)
        return replace(policy, value=None, layer_values=(), head_values=())
    if only == "v":
        return replace(policy, key=None, layer_keys=(), head_keys=(), pre_rope_keys=False, center_keys=False)
    return policy


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
    protocol: str = "decode",
    only: str | None = None,
    preset: str | None = None,
    cache_factory: Callable | None = None,
    bits: tuple[float, float] | None = None,
    progress: bool = True,
    seed: int = 0,
    reference_memo: dict | None = None,
    pre_rope_keys: bool = False,
    calibration: bool = True,
    policy: CachePolicy | None = None,
    center_keys: bool = False,
) -> EvalResult:
    """Evaluate a cache policy on ``windows`` windows of ``ctx`` + ``n_eval`` tokens of ``text``.

    ``model``: a name/path for `kvpack.evaluation.models.load` or a ``(model, tokenizer)`` pair. ``text``: a path,
    ``"wikitext2"``, ``None`` (the embedded default) or a 1-D LongTensor of token ids. ``preset``
    replaces key/value/residual/sinks/skip_layers by a named policy from `kvpack.evaluation.presets`, derived for
    the model (calibrated unless ``calibration=False``); ``policy`` (a `CachePolicy`, e.g. ``load_policy(file)``)
    replaces them by that whole policy, on every protocol.
    ``only="k"``/``"v"`` compresses one stream. ``pre_rope_keys``: keys packed with RoPE undone (KVQuant;
    snapshot and decode). ``center_keys``: keys packed relative to the prefill's mean key (`CachePolicy.center_keys`;
    every protocol; the presets have it on). ``cache_factory(config) -> Cache`` evaluates another
    cache (snapshot, or decode for a `KVPackCache`; ``bits`` gives its bits when it cannot report them). ``reference_memo``: a
    dict passed to several calls on the same model and windows keeps each window's uncompressed
    prefill K/V and reference logits, so later calls run only the compressed continuation (about 3x
    faster for snapshot at ctx 1024 / n_eval 256; it holds ~100 MB per window for SmolLM2 in float32).
    """
    _check_arguments(protocol, ctx, n_eval, windows)
    given = policy
    policy = _resolve_policy(preset, key, value, residual, sinks, skip_layers, only, seed, pre_rope_keys, policy=given,
                             center_keys=center_keys)  # fmt: skip
    if policy.pre_rope_keys and protocol == "inforward":
        raise ValueError(
            "pre_rope_keys works with protocol='snapshot' or 'decode' (the inforward round trip sees post-RoPE keys)"
        )
    if cache_factory is not None and (protocol == "inforward" or only is not None or pre_rope_keys or center_keys):
        raise ValueError("cache_factory works with protocol='snapshot' or 'decode', only=None, pre_rope_keys=False "
                         "and center_keys=False")  # fmt: skip
    if cache_factory is not None and given is not None:
        raise ValueError("give a cache_factory or a policy, not both")
    raw_text = None if isinstance(text, torch.Tensor) else load_text(text)  # a bad path fails before the model loads
    model_name, (lm, tokenizer) = _model_pair(model)
    if preset is not None:
        policy = _resolve_policy(preset, key, value, residual, sinks, skip_layers, only, seed, pre_rope_keys,
                                 (lm, tokenizer), calibration, center_keys=center_keys)  # fmt: skip
    if isinstance(text, torch.Tensor):
        ids, label = text.long().flatten(), "token ids"
    else:
        ids, label = tokenize(tokenizer, raw_text), text_label(text)
    make_cache = cache_factory or (lambda config: KVPackCache(config, policy=policy))
    desc = f"{protocol} k={policy.key} v={policy.value}" if cache_factory is None else f"{protocol} custom cache"
    t0 = time.perf_counter()
    rows, held = _run_windows(lm, ids, ctx, n_eval, windows, protocol, policy, make_cache, reference_memo,
                              desc, progress)  # fmt: skip
    seconds = (time.perf_counter() - t0) / len(rows)
    if bits is not None:
        held = (float(bits[0]), float(bits[1]))
    policy_record = {**policy_to_dict(policy), "only": only, "preset": preset,
                     "cache_factory": None if cache_factory is None else getattr(cache_factory, "__name__", "custom")}  # fmt: skip
    return _result(model_name, label, protocol, ctx, n_eval, policy_record, rows, held, seconds)


def _check_arguments(protocol: str, ctx: int, n_eval: int, windows: int) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    _check_int("ctx", ctx, 1)
    _check_int("n_eval", n_eval, 1)
    _check_int("windows", windows, 1)


def _model_pair(model) -> tuple[str, tuple]:
    """``(name, (model, tokenizer))`` of a name/path (loaded) or a ``(model, tokenizer)`` pair."""
    if isinstance(model, (str, Path)):
        from kvpack.evaluation.models import load

        return str(model), load(model)
    if isinstance(model, tuple) and len(model) == 2:
        return getattr(model[0].config, "_name_or_path", "") or type(model[0]).__name__, model
    raise TypeError(f"model must be a name/path or a (model, tokenizer) pair, got {type(model).__name__}")


def _run_windows(
    lm, ids, ctx, n_eval, windows, protocol, policy, make_cache, memo, desc, progress
) -> tuple[list[dict], tuple[float, float] | None]:
    """One row of metrics per window (`_window_row`) and the (K, V) bits per value the first window held."""
    starts = window_starts(ids.numel(), ctx + n_eval, windows)
    device = next(lm.parameters()).device
    rows, held = [], None
    with torch.inference_mode():
        for start in tqdm(starts, desc=desc, unit="window", disable=not progress):
            window = ids[start : start + ctx + n_eval][None].to(device)
            if protocol == "inforward":
                sums, window_bits = _inforward_window(lm, window, n_eval, policy, memo)
            else:
                sums, window_bits = _prefill_window(lm, window, ctx, make_cache, memo, protocol)
            held = held or window_bits
            rows.append(_window_row(start, sums))
    return rows, held


def _result(model_name, label, protocol, ctx, n_eval, policy_record, rows, held, seconds) -> EvalResult:
    """The `EvalResult` of the window rows: pooled metrics, their spread over windows and the verdict."""
    ppl_ref, ppl, delta, top1, kl = _pooled(rows)
    bits_k, bits_v = held if held is not None else (float("nan"), float("nan"))
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    return EvalResult(
        model=model_name, text=label, protocol=protocol, ctx=ctx, n_eval=n_eval, policy=policy_record,
        ppl_ref=ppl_ref, ppl=ppl, delta_ppl_pct=delta, top1=top1, kl=kl,
        delta_ppl_pct_std=_std([r["delta_ppl_pct"] for r in public]), top1_std=_std([r["top1"] for r in public]),
        kl_std=_std([r["kl"] for r in public]), bits_k=bits_k, bits_v=bits_v, bits_per_value=(bits_k + bits_v) / 2,
        seconds_per_window=seconds, verdict=verdict(delta, top1), windows=public,
    )  # fmt: skip


def _window_row(start: int, sums: dict) -> dict:
    """One window's metrics, with its sums kept under ``_``-prefixed keys for pooling."""
    n = sums["tokens"]
    ppl_ref, ppl = math.exp(sums["nll_ref"] / n), math.exp(sums["nll"] / n)
    return {"start": start, "ppl_ref": ppl_ref, "ppl": ppl, "delta_ppl_pct": 100 * (ppl / ppl_ref - 1),
            "top1": sums["top1"] / n, "kl": sums["kl"] / n, **{f"_{k}": v for k, v in sums.items()}}  # fmt: skip


def _pooled(rows: list[dict]) -> tuple[float, float, float, float, float]:
    """``(ppl_ref, ppl, delta_ppl_pct, top1, kl)`` over all continuation tokens of all windows."""
    total = sum(r["_tokens"] for r in rows)
    ppl_ref = math.exp(sum(r["_nll_ref"] for r in rows) / total)
    ppl = math.exp(sum(r["_nll"] for r in rows) / total)
    top1 = sum(r["_top1"] for r in rows) / total
    kl = sum(r["_kl"] for r in rows) / total
    return ppl_ref, ppl, 100 * (ppl / ppl_ref - 1), top1, kl


def _std(xs: list[float]) -> float:
    """Sample standard deviation over windows (0 for one window)."""
    if len(xs) < 2:
        return 0.0
    mean = sum(xs) / len(xs)
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
