"""Sensitivities for `kvpack allocate`: the KL a codec causes at one layer, KV head and stream, measured.

On calibration windows disjoint from the evaluation windows (`kvpack.tuning.calibrate.calibration_ids`),
the clean prefill's K/V are stored in a `KVPackCache` where ONE layer's K (or V), or one KV head of
it, goes through one candidate codec and everything else stays exact; the continuation is
teacher-forced through it (the snapshot protocol of `kvpack.evaluation.protocol`, on shorter
windows), and the sensitivity is the mean KL(reference || compressed) of the next-token
distributions. One clean prefill and one exact continuation per window serve every candidate.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvpack.evaluation.protocol import Prefill, clean_prefill, continue_logits, store_prefill
from kvpack.hf.cache import KVPackCache
from kvpack.policy import CachePolicy

__all__ = ["head_sensitivity", "measure_head_sensitivity", "measure_sensitivity"]


def _continue(model, prefill: Prefill, cont: torch.Tensor, policy: CachePolicy) -> torch.Tensor:
    """Log-probs ``(n, vocab)`` of ``cont`` teacher-forced after ``prefill`` stored under ``policy`` (snapshot)."""
    cache = store_prefill(KVPackCache(config=model.config, policy=policy), prefill)
    return F.log_softmax(continue_logits(model, cache, cont).float(), -1)


def _kl_of_policies(model, windows, ctx: int, policies: list[CachePolicy], desc: str, progress: bool) -> torch.Tensor:
    """Mean KL(exact || policy) per continuation token, float64 ``(len(policies),)``, averaged over windows."""
    if not windows:
        raise ValueError("windows must hold at least one window of token ids")
    for w in windows:
        if not isinstance(w, torch.Tensor) or w.dim() != 1 or w.numel() <= ctx:
            raise ValueError(f"each window must be 1-D token ids longer than ctx={ctx}")
    dtype = next(model.parameters()).dtype
    exact = CachePolicy(None, None, policies[0].residual, policies[0].sinks, window_dtype=dtype)
    kl = torch.zeros(len(policies), dtype=torch.float64)
    with torch.inference_mode():
        for i, w in enumerate(windows):
            ids = w[None].to(next(model.parameters()).device)
            start = time.perf_counter()
            prefill = clean_prefill(model, ids[:, :ctx])
            after_prefill = time.perf_counter()
            ref = _continue(model, prefill, ids[:, ctx:], exact)
            if i == 0 and progress:  # one prefill and one continuation measured: what the whole run will take
                per_window = after_prefill - start + (time.perf_counter() - after_prefill) * (len(policies) + 1)
                seconds = per_window * len(windows)
                print(f"{desc}: {len(policies)} candidates x {len(windows)} windows, about {_duration(seconds)} "
                      "on this machine (measured on the first window)", file=sys.stderr, flush=True)  # fmt: skip
            for j, policy in enumerate(tqdm(policies, desc=desc, disable=not progress)):
                out = _continue(model, prefill, ids[:, ctx:], policy)
                kl[j] += (ref.exp() * (ref - out)).sum(-1).clamp_min(0).mean().item() / len(windows)
    return kl


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _only_layer(layer: int, num_layers: int, key: str | None, value: str | None, **fields) -> CachePolicy:
    """A policy compressing only layer ``layer``: its K with ``key``, its V with ``value`` (``None``: exact)."""
    keys = tuple(key if i == layer else None for i in range(num_layers))
    values = tuple(value if i == layer else None for i in range(num_layers))
    return CachePolicy(None, None, layer_keys=keys, layer_values=values, **fields)


def _other_heads(layer: int, head: int, num_heads: int) -> tuple[tuple[int, int], ...]:
    """``fp_heads`` that keep every KV head of ``layer`` but ``head`` exact."""
    return tuple((layer, h) for h in range(num_heads) if h != head)


def measure_sensitivity(
    model, windows: list[torch.Tensor], ctx: int, candidates: tuple[str, ...], residual: int = 128, sinks: int = 4,
    progress: bool = True, key_candidates: tuple[str, ...] | None = None,
    value_candidates: tuple[str, ...] | None = None,
) -> torch.Tensor:  # fmt: skip
    """``D`` float64 ``(layers, 2, len(candidates))``: mean KL per continuation token when only that
    layer's K (stream 0) or V (stream 1) is stored with that candidate codec. ``windows``: 1-D token
    id tensors of ``ctx + n`` tokens each. Sinks and window stay in the model dtype here, so that
    ``D`` is the codec's effect alone. ``key_candidates``/``value_candidates`` (default: all of ``candidates``):
    the ones measured for that stream; the others are NaN (not allowed to the knapsack) and cost no run."""
    num_layers = model.config.num_hidden_layers
    dtype = next(model.parameters()).dtype
    allowed = (key_candidates or candidates, value_candidates or candidates)
    for stream, name in enumerate(("key_candidates", "value_candidates")):
        if not set(allowed[stream]) <= set(candidates):
            raise ValueError(f"{name} must be among candidates {list(candidates)}, got {list(allowed[stream])}")
    items = [(layer, stream, j) for layer in range(num_layers) for stream in range(2)
             for j, spec in enumerate(candidates) if spec in allowed[stream]]  # fmt: skip
    policies = [
        _only_layer(
            layer,
            num_layers,
            *((candidates[j], None) if stream == 0 else (None, candidates[j])),
            residual=residual,
            sinks=sinks,
            window_dtype=dtype,
        )
        for layer, stream, j in items
    ]
    measured = _kl_of_policies(model, windows, ctx, policies, "sensitivity", progress)
    kl = torch.full((num_layers, 2, len(candidates)), float("nan"), dtype=torch.float64)
    for (layer, stream, j), value in zip(items, measured.tolist(), strict=True):
        kl[layer, stream, j] = value
    return kl


def head_sensitivity(
    model, windows: list[torch.Tensor], ctx: int, key: str | None, value: str | None, residual: int = 128,
    sinks: int = 4, progress: bool = True,
) -> torch.Tensor:  # fmt: skip
    """float64 ``(layers, kv_heads)``: mean KL per continuation token when only that KV head of that
    layer is stored with ``key``/``value`` (the other heads of the layer through ``fp_heads``, the
    other layers uncompressed)."""
    if key is None and value is None:
        raise ValueError("head_sensitivity needs a key or a value codec spec")
    config = model.config
    num_layers, num_heads = config.num_hidden_layers, config.num_key_value_heads
    dtype = next(model.parameters()).dtype
    policies = [
        _only_layer(
            layer,
            num_layers,
            key,
            value,
            residual=residual,
            sinks=sinks,
            window_dtype=dtype,
            fp_heads=_other_heads(layer, head, num_heads),
        )
        for layer in range(num_layers)
        for head in range(num_heads)
    ]
    return _kl_of_policies(model, windows, ctx, policies, "head sensitivity", progress).reshape(num_layers, num_heads)


def measure_head_sensitivity(
    model, windows: list[torch.Tensor], ctx: int, key_candidates: tuple[str, ...], value_candidates: tuple[str, ...],
    residual: int = 0, sinks: int = 1, block: int | None = 1, progress: bool = True,
) -> torch.Tensor:  # fmt: skip
    """float64 ``(layers, kv_heads, 2, max(len(key_candidates), len(value_candidates)))``: mean KL per
    continuation token when only that KV head's K (stream 0, ``key_candidates``) or V (stream 1,
    ``value_candidates``) of that layer goes through that codec and everything else stays exact (the
    layer's other heads through ``fp_heads``, 16-bit). Slots past a stream's candidates are NaN.

    One clean prefill and one exact continuation per window serve every candidate (`_kl_of_policies`),
    so the cost is one teacher-forced continuation per (layer, head, stream, candidate) and window.
    ``residual``/``sinks``/``block`` should be those of the policy the numbers will allocate."""
    if not key_candidates and not value_candidates:
        raise ValueError("measure_head_sensitivity needs key_candidates or value_candidates")
    config = model.config
    num_layers, num_heads = config.num_hidden_layers, config.num_key_value_heads
    dtype = next(model.parameters()).dtype
    width = max(len(key_candidates), len(value_candidates))
    policies, slots = [], []
    for layer in range(num_layers):
        for head in range(num_heads):
            for stream, candidates in enumerate((key_candidates, value_candidates)):
                for j, spec in enumerate(candidates):
                    kv = (spec, None) if stream == 0 else (None, spec)
                    policies.append(_only_layer(layer, num_layers, *kv, residual=residual, sinks=sinks, block=block,
                                                window_dtype=dtype, fp_heads=_other_heads(layer, head, num_heads)))  # fmt: skip
                    slots.append(((layer * num_heads + head) * 2 + stream) * width + j)
    kl = _kl_of_policies(model, windows, ctx, policies, "head sensitivity", progress)
    out = torch.full((num_layers * num_heads * 2 * width,), float("nan"), dtype=torch.float64)
    out[torch.tensor(slots)] = kl
    return out.reshape(num_layers, num_heads, 2, width)
