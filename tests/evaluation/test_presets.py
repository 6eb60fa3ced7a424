"""Preset names: the recipes and fixed ``PRESETS`` entries resolve for the loaded model; unknown names fail early."""

import pytest
import torch
from tiny_models import tiny_model

from kvpack import CachePolicy, KVPackCache
from kvpack.evaluation import presets
from kvpack.evaluation.presets import BUDGET_CTX, BUDGETS, check_preset, known_presets, resolve_preset
from kvpack.tuning.recipe import rule_policy

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_the_three_budgets_are_recipes():
    assert BUDGETS == {"4bit": 4.25, "3bit": 3.25, "2.5bit": 2.5} and BUDGET_CTX == 1024
    assert set(known_presets()) >= set(BUDGETS)


def test_unknown_preset_fails_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown preset 'absent'; known presets: \['2.5bit', '3bit', '4bit'"):
        check_preset("absent")
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_preset("absent", (tiny_model("llama"), None))


@pytest.mark.parametrize("name", sorted(BUDGETS))
def test_recipe_preset_is_derived_for_the_model_and_holds_its_budget(name):
    model = tiny_model("qwen2")
    policy = resolve_preset(name, (model, None), calibration=False, seed=3)
    assert policy == rule_policy(name, model.config, seed=3)
    cache = KVPackCache(model.config, policy=policy)
    gen = torch.Generator().manual_seed(0)
    for layer in range(model.config.num_hidden_layers):
        k, v = (torch.randn(1, 2, BUDGET_CTX, 32, generator=gen) for _ in range(2))
        cache.update(k, v, layer)
    # 6 (layer, stream) items whose codecs differ by 1 bit at head_dim 32: the budget is met to within ~0.6 bits
    assert BUDGETS[name] - 0.6 < cache.bits_per_value() <= BUDGETS[name]


def test_fixed_presets_resolve_with_the_seed(monkeypatch):
    monkeypatch.setitem(presets.PRESETS, "fixed-int4", {"key": "int:4", "value": "int:4", "residual": 8})
    assert "fixed-int4" in known_presets()
    policy = resolve_preset("fixed-int4", (tiny_model("llama"), None), seed=7)
    assert policy == CachePolicy("int:4", "int:4", residual=8, seed=7)
