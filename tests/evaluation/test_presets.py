"""The presets: each is a valid CachePolicy and holds K/V within its bit budget at ctx 1024 (no model needed)."""

import pytest
import torch
from transformers import LlamaConfig

from kvpack import CachePolicy, KVPackCache
from kvpack.evaluation.presets import BUDGET_CTX, BUDGETS, PRESETS


def smollm2_config() -> LlamaConfig:
    """SmolLM2-135M's attention shapes: 30 layers, 9 query / 3 KV heads, head_dim 64."""
    return LlamaConfig(
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576, head_dim=64,
        intermediate_size=64, vocab_size=16,
    )  # fmt: skip


def test_the_three_budgets_have_presets():
    assert set(PRESETS) == {"4bit", "3bit", "2.5bit", "2.5bit-retrieval"} == set(BUDGETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parses_into_a_policy(name):
    policy = CachePolicy(**PRESETS[name])
    for layer in range(smollm2_config().num_hidden_layers):
        key_codec, value_codec = policy.codecs(64, layer, smollm2_config().num_key_value_heads)
        assert policy.block_for(key_codec, value_codec) >= 1


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_bits_as_held_at_ctx_1024_are_within_budget(name):
    config = smollm2_config()
    cache = KVPackCache(config, policy=CachePolicy(**PRESETS[name]))
    gen = torch.Generator().manual_seed(0)
    shape = (1, config.num_key_value_heads, BUDGET_CTX, config.head_dim)
    for layer in range(config.num_hidden_layers):  # one prefill of ctx tokens, as kvpack eval's snapshot
        cache.update(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen), layer)
    bits = cache.bits_per_value()
    assert bits == pytest.approx((cache.bits_per_value("k") + cache.bits_per_value("v")) / 2)
    assert bits <= BUDGETS[name]
    # the budget is used, not wasted: within a quarter bit of it
    assert bits > BUDGETS[name] - 0.25
