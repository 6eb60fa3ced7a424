"""Preset recipes on tiny random-weight models of every family: they run, hold their budget, and cache."""

import pytest
import torch
from tiny_models import TINY_FAMILIES, VOCAB, tiny_model, tiny_phi3_head_dim
from transformers import LlamaConfig

from kvpack import CachePolicy, KVPackCache
from kvpack.policy import load_policy
from kvpack.tuning import recipe
from kvpack.tuning.recipe import BUDGET_CTX, BUDGETS, CANDIDATES, held_bits, model_hash, rule_policy

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def smollm2_config() -> LlamaConfig:
    return LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                       head_dim=64, intermediate_size=64, vocab_size=16)  # fmt: skip


def held_after_prefill(config, policy: CachePolicy, ctx: int = BUDGET_CTX) -> float:
    """Bits per value a real `KVPackCache` holds after one prefill of ``ctx`` random tokens' K/V."""
    from kvpack.hf.config import model_heads, text_config

    heads, head_dim = model_heads(config)
    cache = KVPackCache(config, policy=policy)
    gen = torch.Generator().manual_seed(0)
    for layer in range(text_config(config).num_hidden_layers):
        k, v = (torch.randn(1, heads, ctx, head_dim, generator=gen) for _ in range(2))
        cache.update(k, v, layer)
    return cache.bits_per_value()


def calibration_ids(n: int = 20_000) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(3))


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVPACK_CACHE_DIR", str(tmp_path / "kvpack-cache"))


@pytest.mark.parametrize("name", sorted(BUDGETS))
def test_rule_policy_on_smollm2_shapes_holds_within_and_near_its_budget(name):
    config = smollm2_config()
    policy = rule_policy(name, config)
    bits = held_after_prefill(config, policy)
    assert bits == pytest.approx(held_bits(policy, config))  # the recipe's count is the cache's
    assert BUDGETS[name] - 0.1 < bits <= BUDGETS[name]
    # K at least as many code bits as V in every layer (K carries the loss); code bits, not bits per value: a
    # rotated int value stores a scale and a zero (2.5 bits per value at 2 bits), turbo_mse a norm (2.25)
    from kvpack.codec import parse_spec

    assert all(parse_spec(k)[1] >= parse_spec(v)[1] for k, v in zip(policy.layer_keys, policy.layer_values))
    assert policy.residual == recipe.RESIDUAL and policy.sinks == recipe.SINKS


# the tiny Mistral's layers all slide with a 512-token window, so at the budget context half the tokens a layer holds
# are past it and the 16-bit window, sink and block slack weigh twice: 2.5 bits as held is out of the codecs' reach
UNREACHABLE = {("2.5bit", "mistral")}


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
@pytest.mark.parametrize("name", sorted(BUDGETS))
def test_every_preset_runs_on_every_family_and_holds_its_budget(family, name):
    model = tiny_model(family)
    if (name, family) in UNREACHABLE:  # a known miss, reported in the issue note: a clear error, not a bad policy
        with pytest.raises(ValueError, match=f"budget {BUDGETS[name]} bits cannot be met"):
            CachePolicy.preset(name, model, calibration=False)
        return
    policy = CachePolicy.preset(name, model, calibration=False)
    bits = held_after_prefill(model.config, policy)
    assert bits == pytest.approx(held_bits(policy, model.config))
    assert bits <= BUDGETS[name]
    prompt = torch.randint(1, VOCAB, (1, 560), generator=torch.Generator().manual_seed(1))  # past the windows
    cache = KVPackCache(model.config, policy=policy)
    out = model.generate(prompt, past_key_values=cache, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 566)
    assert any(layer.chunks for layer in cache.layers)  # something was packed


@pytest.mark.parametrize("head_dim", [96, 80])
def test_presets_at_a_head_dim_without_hadamard(head_dim):
    """Phi-3-mini's head_dim 96 (and 80): a Hadamard rotation needs a power of two, so the rotated int candidates
    take a Haar rotation there; the config rule and the calibrated preset derive policies within their budgets that
    generate through `KVPackCache` (both refused such a model before)."""
    assert recipe.candidates_for(64) == CANDIDATES
    swapped = recipe.candidates_for(head_dim)
    assert len(swapped) == len(CANDIDATES) and all("hadamard" not in s for s in swapped)
    assert swapped[CANDIDATES.index("int:3:rotation=hadamard")] == "int:3:rotation=haar"
    torch.manual_seed(0)
    model = tiny_phi3_head_dim(head_dim).eval()
    for name, policy in (("4bit", CachePolicy.preset("4bit", model, calibration=False)),
                         ("3bit", CachePolicy.preset("3bit", model, text=calibration_ids(), progress=False))):
        assert set(policy.all_specs()) <= set(swapped)
        assert held_after_prefill(model.config, policy) <= BUDGETS[name]
        prompt = torch.randint(1, VOCAB, (1, 80), generator=torch.Generator().manual_seed(2))
        out = model.generate(prompt, past_key_values=KVPackCache(model.config, policy=policy), max_new_tokens=4,
                             do_sample=False)  # fmt: skip
        assert out.shape == (1, 84)


def test_no_calibration_needs_the_config_only():
    model = tiny_model("gemma3")
    assert CachePolicy.preset("3bit", model.config, calibration=False) == rule_policy("3bit", model.config)
    with pytest.raises(TypeError, match="calibration needs the model"):
        CachePolicy.preset("3bit", model.config)
    with pytest.raises(ValueError, match="unknown preset '5bit'"):
        CachePolicy.preset("5bit", model, calibration=False)


def test_calibration_is_cached_by_model_hash_and_reused(monkeypatch, tmp_path):
    model = tiny_model("qwen3")
    calls = []
    measure = recipe.measure_sensitivity

    def counting(*args, **kwargs):
        calls.append(1)
        return measure(*args, **kwargs)

    monkeypatch.setattr(recipe, "measure_sensitivity", counting)
    ids = calibration_ids()
    first = CachePolicy.preset("4bit", model, text=ids, progress=False)
    assert len(calls) == 1
    assert held_after_prefill(model.config, first) <= BUDGETS["4bit"]
    files = sorted(p.name for p in recipe.cache_dir().iterdir())
    assert any(f.endswith("-4bit.json") for f in files) and any(f.endswith("-sensitivity.safetensors") for f in files)
    again = CachePolicy.preset("4bit", model, text=ids, progress=False)
    other = CachePolicy.preset("2.5bit", model, text=ids, progress=False, seed=5)  # reuses the measured table
    assert len(calls) == 1 and again == first
    assert other.seed == 5 and held_after_prefill(model.config, other) <= BUDGETS["2.5bit"]
    path = next(p for p in recipe.cache_dir().iterdir() if p.name.endswith("-4bit.json"))
    assert load_policy(path) == first
    tiny_model("qwen3", seed=1)  # other weights: another hash, measured again
    CachePolicy.preset("4bit", tiny_model("qwen3", seed=1), text=ids, progress=False)
    assert len(calls) == 2


def test_model_hash_follows_weights_and_config_not_the_path():
    a, b = tiny_model("llama"), tiny_model("llama")
    assert model_hash(a) == model_hash(b)
    b.config._name_or_path = "/somewhere/else"
    assert model_hash(a) == model_hash(b)
    assert model_hash(tiny_model("llama", seed=1)) != model_hash(a)
    assert model_hash(tiny_model("qwen2")) != model_hash(a)


def test_measured_sensitivity_is_zero_for_8_bits_and_grows_as_bits_drop():
    model = tiny_model("llama")
    ids = calibration_ids()
    windows = [ids[:300], ids[300:600]]
    d = recipe.measure_sensitivity(model, windows, 256, progress=False)
    assert d.shape == (3, 2, len(CANDIDATES))
    assert torch.isnan(d[:, 0, CANDIDATES.index("turbo_mse:1")]).all()  # no 1-bit keys
    tm = [CANDIDATES.index(f"int:{b}:rotation=hadamard") for b in (2, 3, 4)]
    v = d[:, 1, tm].sum(0)  # summed over layers: fewer bits cost more
    assert torch.isnan(d[:, 1, CANDIDATES.index("turbo_mse:3")]).all()  # values: rotated int, or 1 bit
    assert (v[:-1] > v[1:]).all()
    assert torch.isnan(d[:, 1, CANDIDATES.index("int:8")]).all()  # no 8-bit values
    assert d[:, 0, CANDIDATES.index("int:8")].max() < 1e-5  # 8-bit keys: at the float-rounding floor


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_batched_measurement_equals_one_kvpackcache_per_item(family):
    model = tiny_model(family)
    ids = calibration_ids()[:600]
    d = recipe.measure_sensitivity(model, [ids], 540, progress=False, batch=3)
    from kvpack.evaluation.protocol import clean_prefill, store_prefill

    with torch.inference_mode():
        # the prefill as a user's forward stores it: sliding layers (gemma3: window 512) see all 540 tokens and
        # keep the last 511, positions continue at 540
        prefill = clean_prefill(model, ids[None, :540])
        for layer, stream, spec in [(0, 0, "turbo_mse:2"), (2, 1, "turbo_mse:1"), (1, 0, "int:8")]:
            logps = []
            for key, value in ((None, None), (spec, None) if stream == 0 else (None, spec)):
                keys, values = (tuple(x if i == layer else None for i in range(3)) for x in (key, value))
                policy = CachePolicy(None, None, layer_keys=keys, layer_values=values, residual=recipe.RESIDUAL,
                                     sinks=recipe.SINKS, block=recipe.BLOCK, window_dtype=torch.float32,
                                     center_keys=recipe.CENTER_KEYS)  # fmt: skip
                cache = store_prefill(KVPackCache(model.config, policy=policy), prefill)
                logps.append(torch.log_softmax(model(ids[None, 540:], past_key_values=cache).logits[0], -1))
            kl = (logps[0].exp() * (logps[0] - logps[1])).sum(-1).clamp_min(0).mean().item()
            assert d[layer, stream, CANDIDATES.index(spec)].item() == pytest.approx(kl, rel=1e-3, abs=1e-7)


def test_solve_budget_refuses_an_impossible_budget():
    config = smollm2_config()
    with pytest.raises(ValueError, match="cannot be met"):
        recipe.solve_budget(recipe.rule_sensitivity(config), config, 1.0)
    only_two_bits_and_up = recipe.rule_sensitivity(config)
    only_two_bits_and_up[:, 1, CANDIDATES.index("turbo_mse:1")] = float("nan")
    with pytest.raises(ValueError, match="cannot be met"):  # 2.25 bits at the least: never a NaN candidate
        recipe.solve_budget(only_two_bits_and_up, config, 2.5)
    policy = rule_policy("2.5bit", config)  # falls back to 1-bit values, never to 1-bit keys
    assert "turbo_mse:1" not in policy.layer_keys and "turbo_mse:1" in policy.layer_values
