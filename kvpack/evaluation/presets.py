"""Named cache policies for `kvpack eval --preset NAME` / `kvpack sweep --preset NAME` / `kvpack needle --preset`.

``4bit``, ``3bit`` and ``2.5bit`` are recipes (`kvpack.tuning.recipe`): a policy derived for the loaded model
within ``BUDGETS`` bits as held at ``BUDGET_CTX`` tokens, calibrated on the model and cached by model hash, or
from its config alone (``calibration=False``, ``--no-calibration``). :func:`resolve_preset` is the one place
the evaluation commands turn a preset name into a policy.

SmolLM2-135M's calibrated recipes ship as package data (``kvpack/presets/{key}-{preset}.json``), so that model
needs no calibration run; any other model calibrates once (minutes) and reuses its cached result.

``PRESETS`` maps other names to fixed `kvpack.CachePolicy` keyword arguments (none ship now; tests and
callers may add some). The SmolLM2-only tables that used to ship here (``residual=0, block=1``, chosen on the
snapshot protocol) lost ~+8.8% ppl in generation-like decoding; they are kept, with their results, in
``benchmarks/results/cpu-smollm2-2026-11/smollm2-heads-*.json``.
"""

from __future__ import annotations

from kvpack.policy import CachePolicy
from kvpack.tuning.recipe import BUDGET_CTX, BUDGETS, recipe_policy

__all__ = ["BUDGETS", "BUDGET_CTX", "PRESETS", "check_preset", "known_presets", "resolve_preset"]

PRESETS: dict[str, dict] = {}  # fixed policies by name: CachePolicy keyword arguments


def known_presets() -> list[str]:
    """Every preset name :func:`resolve_preset` accepts."""
    return sorted({*BUDGETS, *PRESETS})


def check_preset(name) -> None:
    """``ValueError`` unless ``name`` is a known preset (before any model loads)."""
    if not isinstance(name, str) or name not in {*BUDGETS, *PRESETS}:
        raise ValueError(f"unknown preset {name!r}; known presets: {known_presets()}")


def resolve_preset(name: str, model, calibration: bool = True, seed: int = 0, progress: bool = True) -> CachePolicy:
    """The policy of preset ``name`` for ``model`` (a ``(model, tokenizer)`` pair): a recipe (`kvpack.tuning.recipe`,
    calibrated unless ``calibration=False``) or a fixed ``PRESETS`` entry."""
    check_preset(name)
    if name in PRESETS:
        return CachePolicy(**{"seed": seed, **PRESETS[name]})
    return recipe_policy(name, model, calibration=calibration, seed=seed, progress=progress)
