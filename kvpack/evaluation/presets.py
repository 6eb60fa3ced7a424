"""Named cache policies for `kvpack eval --preset NAME` / `kvpack sweep --preset NAME`: package data.

Each preset is a policy file in ``kvpack/presets/`` (`kvpack.save_policy` format, with ``preset``, ``budget``
and ``budget_ctx`` beside the policy); ``PRESETS`` maps a name to the keyword arguments of its `kvpack.CachePolicy`. ``BUDGETS`` gives the average bits
per value (K and V averaged, everything held counted: sinks, residual window, packed blocks, side
data) that a preset must not exceed at ``BUDGET_CTX`` tokens; ``tests/evaluation/test_presets.py``
checks it on a `KVPackCache` holding random K/V of SmolLM2's shapes.

How they were chosen (BENCHMARKS.md, "End-to-end quality", has the numbers and the commands):
SmolLM2-135M, WikiText-2. The loss is almost all in K and concentrated in a few layers
(17, 18, 20, 23, 24 for K). Per layer and per stream, each option (``e8:2``/``e8:3``/``e8:4``, and
``int:8`` for K) was measured alone on 4 calibration windows of ctx 1024 that do not overlap the 8
evaluation windows; the KL of a whole-model policy is close to the sum of its layers' KLs (e.g.
0.00444 summed vs 0.00441 measured for K = e8:4 everywhere), so the per-layer choice under a bit
budget is a multiple-choice knapsack solved exactly (by dynamic programming) on those numbers.
``e8`` (Hadamard + E8 lattice) beat ``turbo_mse``, ``polar``, per-token ``int`` and ``turbo_prod``
at equal bits for both K and V (``turbo_prod`` was the worst: its QJL residual adds variance that
softmax amplifies). ``residual=0, block=1``: a residual window barely helps on this snapshot
protocol and costs 16 bits a token, and ``block=1`` packs every token past the sinks (per-token
codecs allow it), so only the sinks are held in 16 bits. Sinks: dropping them doubles K's KL; one
is as good as four; the presets keep 1 (the knapsack spends the 3 freed tokens' bits; measured on
the evaluation windows with the per-layer allocation: 3bit top-1 93.8% -> 94.2%).

All three are allocated per (layer, KV head, stream) (``head_keys``/``head_values``):
the same knapsack over 180 items, on KLs measured with one KV head's K or V of one layer compressed
(`kvpack.tuning.allocate.measure_head_sensitivity`, 4 calibration windows of ctx 1024 + 64,
``benchmarks/results/cpu-smollm2-2026-11/smollm2-head-sensitivity.json``); the K error sits in a few heads (layer 23 head 0, layer
18 head 2, layer 20 heads 1-2), so bits go to those heads instead of to whole layers. On the 8
evaluation windows: ``4bit`` +0.24% -> +0.18% (4.234 -> 4.246 bits, within 4.25), ``3bit`` +1.60% ->
+0.71% at the same held bits. ``2.5bit`` also offers V ``turbo_mse:1`` (1.25 bits; +35% on every V
head at once, but mild on many single heads): 40 of 90 V heads take it and pay for ``e8:3``/``e8:4`` on
the sensitive K heads; +7.13% (per layer) -> +5.82% (per head, ``e8`` only) -> +3.42% (2.480 -> 2.497 bits).
Caveat: that ``2.5bit`` fails the 4K passkey test (`kvpack needle`, 0 of 4 depths; per layer: 3 of 4):
it is tuned for perplexity at ctx 1024, not for long-context retrieval.

``2.5bit-retrieval``: the per-head 2.5-bit allocation with ``e8`` codecs only (no V ``turbo_mse:1``), +5.82%
on the 8 evaluation windows (misses the +5% target) but it keeps long-context retrieval that ``2.5bit``
loses: passkey at 4K tokens 3 of 4 depths against 0 of 4 (one trial per depth, BENCHMARKS.md).

The presets are tuned on SmolLM2-135M (30 layers, 3 KV heads): ``layer_keys``/``layer_values`` and
``head_keys``/``head_values`` name its layers and heads; on another model the layers past 30 use
``key``/``value``, and the per-head presets need 3 KV heads (`KVPackCache` says so otherwise).
"""

from __future__ import annotations

import json
from importlib import resources

from kvpack.policy import load_policy, policy_to_dict

__all__ = ["BUDGETS", "BUDGET_CTX", "PRESETS"]

BUDGET_CTX = 1024  # the context length at which a preset's bits are held within its budget


def _load_presets() -> tuple[dict[str, dict], dict[str, float]]:
    """(``{name: CachePolicy kwargs}``, ``{name: bits budget}``) from the policy files in ``kvpack/presets``."""
    presets, budgets = {}, {}
    for entry in sorted(resources.files("kvpack.presets").iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".json"):
            continue
        with resources.as_file(entry) as path:
            doc = json.loads(path.read_text())
            if doc.get("budget_ctx") != BUDGET_CTX:
                raise ValueError(f"preset file {entry.name}: budget_ctx must be {BUDGET_CTX}")
            presets[doc["preset"]] = policy_to_dict(load_policy(path))
            budgets[doc["preset"]] = float(doc["budget"])
    return presets, budgets


PRESETS, BUDGETS = _load_presets()
