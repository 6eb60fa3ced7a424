"""Sensitivities for `kvpack allocate` and the preset recipes: the KL a codec causes at one layer (or one KV head
of it) and stream, measured.

On calibration windows disjoint from the evaluation windows (`kvpack.tuning.calibrate.calibration_ids`), a clean
prefill of ``ctx`` tokens is stored as a `KVPackCache` would hold it with ONE layer's K (or V), or one KV head of
it, through one candidate codec and everything else exact: the sinks and the newest ``residual``.. tokens in the
model dtype, the packed blocks between them decoded. The rest of the window is teacher-forced through it in one
forward (the snapshot protocol of `kvpack.evaluation.protocol`), and the sensitivity is the mean KL(exact ||
compressed) of the next-token distributions per continuation token.

One implementation serves every table (per layer, per KV head, one head's K and V together): each candidate is a
row of a batched `DynamicCache` (``batch`` rows per forward) whose one (layer, stream[, head]) holds the decoded
blocks, the same attention a `KVPackCache` under the one-layer policy gives, since its packed blocks decode to
exactly those values (tests check it against one `KVPackCache` per candidate, for per-token and block codecs). One
clean prefill and one exact continuation per window serve every candidate. ``center_keys``: keys are packed relative to
the mean of the prefill's non-sink keys, as `KVPackCache` under ``CachePolicy(center_keys=True)`` holds them.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvpack.evaluation.protocol import Prefill, clean_prefill
from kvpack.hf.cache import key_reference, layer_kinds, shift_keys
from kvpack.hf.config import model_heads, text_config
from kvpack.policy import CachePolicy
from kvpack.hf.config import cache_kwargs

__all__ = ["head_sensitivity", "measure_head_sensitivity", "measure_sensitivity"]


@dataclass(frozen=True)
class _Item:
    """One measured cache: ``layer``'s K (``key``) and/or V (``value``) through those specs, only KV head ``head``
    of it (``None``: all heads)."""

    layer: int
    key: str | None
    value: str | None
    head: int | None = None


def _packed_range(tokens: int, sinks: int, residual: int, block: int) -> tuple[int, int]:
    """``[lo, hi)``: the tokens of a layer holding ``tokens`` after a prefill that `KVPackCache` packs."""
    sinks = min(sinks, tokens)
    return sinks, sinks + max(tokens - sinks - residual, 0) // block * block


def _through(
    codec, x: torch.Tensor, lo: int, hi: int, block: int, reference: torch.Tensor | None = None
) -> torch.Tensor:
    """``x`` ``(1, kv_heads, T, D)`` with tokens ``[lo, hi)`` encoded and decoded block by block, as packed (relative
    to ``reference`` ``(1, kv_heads, 1, D)`` when given: `kvpack.hf.cache.key_reference`)."""
    y = x.clone()
    step = hi - lo if codec.block_tokens == 1 else block  # per-token codecs: blocks or not, the same values
    for at in range(lo, hi, step):
        part = shift_keys(x[..., at : at + step, :], reference, -1).contiguous()
        y[..., at : at + step, :] = shift_keys(codec.decode(codec.encode(part)), reference, +1).to(x.dtype)
    return y


def _layer_shape(model, item: _Item, residual: int, sinks: int, block: int | None, seed: int):
    """``(key codec, value codec, block)`` that `KVPackCache` uses at ``item.layer`` (``None``: exact)."""
    config = text_config(model.config)
    num_layers, (num_kv_heads, head_dim) = config.num_hidden_layers, model_heads(model.config)
    keys = tuple(item.key if i == item.layer else None for i in range(num_layers))
    values = tuple(item.value if i == item.layer else None for i in range(num_layers))
    policy = CachePolicy(None, None, layer_keys=keys, layer_values=values, residual=residual, sinks=sinks,
                         block=block, seed=seed)  # fmt: skip
    kc, vc = policy.codecs(head_dim, item.layer, num_kv_heads)
    return (None if item.key is None else kc), (None if item.value is None else vc), policy.block_for(kc, vc)


def _batched_cache(model, prefill: Prefill, rows: list[dict[tuple[int, int], torch.Tensor]]):
    """A DynamicCache of ``len(rows)`` rows: the exact ``prefill`` K/V, except row ``r``'s replacements
    ``{(layer, stream): tensor (1, kv_heads, T, D)}`` (stream 0: K, 1: V)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for i in sorted(prefill.kv):
        k, v = prefill.kv[i]
        kv = [k.expand(len(rows), *k.shape[1:]), v.expand(len(rows), *v.shape[1:])]
        for r, replaced in enumerate(rows):
            for (layer, stream), x in replaced.items():
                if layer == i:
                    kv[stream] = kv[stream].clone() if kv[stream].stride(0) == 0 else kv[stream]
                    kv[stream][r] = x[0]
        cache.update(kv[0], kv[1], i)
    return cache


def _replacements(item: _Item, shape, prefill, layer_windows: list[int | None], residual: int, sinks: int,
                  center_keys: bool = False) -> dict:  # fmt: skip
    """``{(layer, stream): K or V as the one-layer cache holds it}`` for one row of the batched cache. A sliding
    layer keeps its last ``window - 1`` tokens (no sinks) and packs those; the older ones are dropped by the
    `DynamicCache` layer anyway, which sees the whole prefill, so that positions stay right."""
    replaced = {}
    *codecs, block = shape
    for stream, codec in enumerate(codecs):
        if codec is None:
            continue
        x = prefill.kv[item.layer][stream]
        window = layer_windows[item.layer]
        kept = x.shape[-2] if window is None else min(x.shape[-2], window - 1)
        lo, hi = _packed_range(kept, sinks if window is None else 0, residual, block)
        offset = x.shape[-2] - kept
        # the prefill is the layer's first update: its non-sink keys (a sliding layer's all) fix the reference
        first = sinks if window is None else 0
        reference = key_reference(x[..., first:, :]) if center_keys and stream == 0 and first < x.shape[-2] else None
        # all heads go through the codec (a calibrated codec's basis is per head: it needs the cache's layout)
        y = _through(codec, x, lo + offset, hi + offset, block, reference)
        if item.head is not None:  # the layer's other heads stay exact
            y, one = x.clone(), y
            y[:, item.head] = one[:, item.head]
        replaced[(item.layer, stream)] = y
    return replaced


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _kl_of_items(model, windows, ctx: int, items: list[_Item], residual: int, sinks: int, block: int | None,
                 desc: str, progress: bool, batch: int = 8, seed: int = 0,
                 center_keys: bool = False) -> torch.Tensor:  # fmt: skip
    """Mean KL(exact || item) per continuation token, float64 ``(len(items),)``, averaged over ``windows``."""
    if not windows:
        raise ValueError("windows must hold at least one window of token ids")
    for w in windows:
        if not isinstance(w, torch.Tensor) or w.dim() != 1 or w.numel() <= ctx:
            raise ValueError(f"each window must be 1-D token ids longer than ctx={ctx}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    shapes = [_layer_shape(model, item, residual, sinks, block, seed) for item in items]
    layer_windows = layer_kinds(model.config)
    kl = torch.zeros(len(items), dtype=torch.float64)
    bar = None
    with torch.inference_mode():
        for w in windows:
            ids = w[None].to(next(model.parameters()).device)
            start = time.perf_counter()
            prefill = clean_prefill(model, ids[:, :ctx])
            cont, prefilled = ids[:, ctx:], time.perf_counter()
            clean = _batched_cache(model, prefill, [{}])
            ref = F.log_softmax(model(cont, **cache_kwargs(model, clean)).logits[0].float(), -1)
            if bar is None:  # one prefill and one continuation measured (rows cost at most their number of them)
                if progress:
                    seconds = (prefilled - start + (time.perf_counter() - prefilled) * (len(items) + 1)) * len(windows)
                    print(f"{desc}: {len(items)} candidates x {len(windows)} windows, about {_duration(seconds)} on "
                          "this machine (measured on the first window)", file=sys.stderr, flush=True)  # fmt: skip
                bar = tqdm(total=len(items) * len(windows), desc=desc, unit="item", disable=not progress)
            for at in range(0, len(items), batch):
                rows = [_replacements(item, shape, prefill, layer_windows, residual, sinks, center_keys)
                        for item, shape in zip(items[at : at + batch], shapes[at : at + batch])]  # fmt: skip
                cache = _batched_cache(model, prefill, rows)
                out = F.log_softmax(model(cont.expand(len(rows), -1), **cache_kwargs(model, cache)).logits.float(), -1)
                kl_rows = (ref.exp() * (ref - out)).sum(-1).clamp_min(0).mean(-1)
                kl[at : at + len(rows)] += kl_rows.double().cpu() / len(windows)
                bar.update(len(rows))
    bar.close()
    return kl


def measure_sensitivity(
    model, windows: list[torch.Tensor], ctx: int, candidates: tuple[str, ...], residual: int = 128, sinks: int = 4,
    progress: bool = True, key_candidates: tuple[str, ...] | None = None,
    value_candidates: tuple[str, ...] | None = None, block: int | None = None, batch: int = 8,
    center_keys: bool = False,
) -> torch.Tensor:  # fmt: skip
    """``D`` float64 ``(layers, 2, len(candidates))``: mean KL per continuation token when only that
    layer's K (stream 0) or V (stream 1) is stored with that candidate codec. ``windows``: 1-D token
    id tensors of ``ctx + n`` tokens each. Sinks and window stay in the model dtype here, so that
    ``D`` is the codec's effect alone. ``key_candidates``/``value_candidates`` (default: all of ``candidates``):
    the ones measured for that stream; the others are NaN (not allowed to the knapsack) and cost no run.
    ``block``: tokens per packed block (``None``: `CachePolicy`'s default); ``batch``: caches per forward.
    ``center_keys``: keys relative to the prefill's mean key (`CachePolicy.center_keys`)."""
    num_layers = text_config(model.config).num_hidden_layers
    allowed = (key_candidates or candidates, value_candidates or candidates)
    for stream, name in enumerate(("key_candidates", "value_candidates")):
        if not set(allowed[stream]) <= set(candidates):
            raise ValueError(f"{name} must be among candidates {list(candidates)}, got {list(allowed[stream])}")
    slots = [(layer, stream, j) for layer in range(num_layers) for stream in range(2)
             for j, spec in enumerate(candidates) if spec in allowed[stream]]  # fmt: skip
    items = [_Item(layer, *((candidates[j], None) if stream == 0 else (None, candidates[j])))
             for layer, stream, j in slots]  # fmt: skip
    measured = _kl_of_items(model, windows, ctx, items, residual, sinks, block, "sensitivity", progress, batch,
                            center_keys=center_keys)  # fmt: skip
    kl = torch.full((num_layers, 2, len(candidates)), float("nan"), dtype=torch.float64)
    for (layer, stream, j), value in zip(slots, measured.tolist(), strict=True):
        kl[layer, stream, j] = value
    return kl


def head_sensitivity(
    model, windows: list[torch.Tensor], ctx: int, key: str | None, value: str | None, residual: int = 128,
    sinks: int = 4, progress: bool = True, block: int | None = None, batch: int = 8, center_keys: bool = False,
) -> torch.Tensor:  # fmt: skip
    """float64 ``(layers, kv_heads)``: mean KL per continuation token when only that KV head of that
    layer is stored with ``key``/``value`` (the layer's other heads and the other layers exact; ``center_keys``:
    keys relative to the prefill's mean key)."""
    if key is None and value is None:
        raise ValueError("head_sensitivity needs a key or a value codec spec")
    num_layers, (num_heads, _) = text_config(model.config).num_hidden_layers, model_heads(model.config)
    items = [_Item(layer, key, value, head) for layer in range(num_layers) for head in range(num_heads)]
    kl = _kl_of_items(model, windows, ctx, items, residual, sinks, block, "head sensitivity", progress, batch,
                      center_keys=center_keys)  # fmt: skip
    return kl.reshape(num_layers, num_heads)


def measure_head_sensitivity(
    model, windows: list[torch.Tensor], ctx: int, key_candidates: tuple[str, ...], value_candidates: tuple[str, ...],
    residual: int = 0, sinks: int = 1, block: int | None = 1, progress: bool = True, batch: int = 8,
    center_keys: bool = False,
) -> torch.Tensor:  # fmt: skip
    """float64 ``(layers, kv_heads, 2, max(len(key_candidates), len(value_candidates)))``: mean KL per
    continuation token when only that KV head's K (stream 0, ``key_candidates``) or V (stream 1,
    ``value_candidates``) of that layer goes through that codec and everything else stays exact. Slots past a
    stream's candidates are NaN. ``residual``/``sinks``/``block``/``center_keys`` should be those of the policy the
    numbers will allocate."""
    if not key_candidates and not value_candidates:
        raise ValueError("measure_head_sensitivity needs key_candidates or value_candidates")
    num_layers, (num_heads, _) = text_config(model.config).num_hidden_layers, model_heads(model.config)
    width = max(len(key_candidates), len(value_candidates))
    items, slots = [], []
    for layer in range(num_layers):
        for head in range(num_heads):
            for stream, candidates in enumerate((key_candidates, value_candidates)):
                for j, spec in enumerate(candidates):
                    items.append(_Item(layer, *((spec, None) if stream == 0 else (None, spec)), head))
                    slots.append(((layer * num_heads + head) * 2 + stream) * width + j)
    kl = _kl_of_items(model, windows, ctx, items, residual, sinks, block, "head sensitivity", progress, batch,
                      center_keys=center_keys)  # fmt: skip
    out = torch.full((num_layers * num_heads * 2 * width,), float("nan"), dtype=torch.float64)
    out[torch.tensor(slots)] = kl
    return out.reshape(num_layers, num_heads, 2, width)
