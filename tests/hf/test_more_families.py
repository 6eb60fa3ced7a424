"""Decoder families beyond the tiny six (tests/tiny_models.py), each a tiny random config: the presets derive a
policy, the decode protocol's one forward equals one token per forward, and where the paged caches take the model
the graph loop's tokens equal `KVPackCache` generation's; where they do not, the refusal names the reason."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from tiny_models import routes_through_attention_interface

from kvpack import CachePolicy, KVPackCache, StaticKVPackCache, graph_generate, use_paged_attention
from kvpack.evaluation.decode import decode_logits, decode_stepwise_logits
from kvpack.evaluation.protocol import clean_prefill, store_prefill
from kvpack.hf.cache import layer_kinds

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

COMMON = {"vocab_size": 96, "max_position_embeddings": 512, "num_hidden_layers": 2}
LAYERS = {**COMMON, "hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 128}
FAMILIES = {  # name: (model class, config, why the paged caches refuse it, or None)
    "gpt2": (T.GPT2LMHeadModel, T.GPT2Config(vocab_size=96, n_positions=512, n_layer=2, n_embd=128, n_head=2), None),
    "gpt_neox": (T.GPTNeoXForCausalLM, T.GPTNeoXConfig(**LAYERS, rotary_pct=0.25), None),
    "stablelm": (T.StableLmForCausalLM, T.StableLmConfig(**{**LAYERS, "hidden_size": 160}, num_key_value_heads=2,
                                                         partial_rotary_factor=0.25), "head_dim must be a power"),
    "olmo2": (T.Olmo2ForCausalLM, T.Olmo2Config(**LAYERS, num_key_value_heads=1), None),
    "granite": (T.GraniteForCausalLM, T.GraniteConfig(**LAYERS, num_key_value_heads=1), None),
    "cohere2": (T.Cohere2ForCausalLM, T.Cohere2Config(**{**LAYERS, "num_hidden_layers": 4}, num_key_value_heads=1,
                                                      sliding_window=24), None),  # 3 sliding layers, 1 full
    "smollm3": (T.SmolLM3ForCausalLM, T.SmolLM3Config(**LAYERS, num_key_value_heads=1, pad_token_id=0), None),
    "gpt_oss": (T.GptOssForCausalLM, T.GptOssConfig(**LAYERS, num_key_value_heads=1, head_dim=64, num_local_experts=2,
                                                   num_experts_per_tok=1, sliding_window=24), "attention sinks"),
    "starcoder2": (T.Starcoder2ForCausalLM, T.Starcoder2Config(**LAYERS, num_key_value_heads=1, sliding_window=24),
                   None),
    "gemma2": (T.Gemma2ForCausalLM, T.Gemma2Config(**LAYERS, num_key_value_heads=1, head_dim=64, sliding_window=24,
                                                  attn_logit_softcapping=50.0), "soft-caps"),
    "falcon": (T.FalconForCausalLM, T.FalconConfig(vocab_size=96, num_hidden_layers=2, hidden_size=128,
                                                   num_attention_heads=2, new_decoder_architecture=True,
                                                   num_kv_heads=1), "AttentionInterface"),
}  # fmt: skip
POLICY = CachePolicy("int:4", "int:3", residual=4, sinks=2, block=2)


def build(name: str, dtype=torch.float32):
    cls, config, _ = FAMILIES[name]
    torch.manual_seed(0)
    return cls(config).to(dtype).eval()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_presets_and_the_decode_protocol(name):
    # float64: rounding cannot flip a code between the two decodings (GPT-OSS's experts take float32 at most)
    model = build(name, torch.float32 if name == "gpt_oss" else torch.float64)
    try:
        policy = CachePolicy.preset("4bit", model, calibration=False)
    except ValueError as exc:  # layers sliding over a few tokens hold them all in 16 bits: the budget at 1024
        assert any(w is not None and w < 64 for w in layer_kinds(model.config)), exc  # tokens is out of reach
        assert "cannot be met" in str(exc) or "nothing is packed" in str(exc)
        policy = POLICY
    ids = torch.randint(3, 96, (1, 60), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = model.generate(ids[:, :40], past_key_values=KVPackCache(model.config, policy=policy), max_new_tokens=4,
                             do_sample=False)  # fmt: skip
        assert out.shape == (1, 44)
        prefill = clean_prefill(model, ids[:, :40])
        caches = [store_prefill(KVPackCache(model.config, policy=POLICY), prefill) for _ in range(2)]
        fast = decode_logits(model, caches[0], ids[:, 40:])
        slow = decode_stepwise_logits(model, caches[1], ids[:, 40:])
    # Gemma2's RMSNorm runs in float32 whatever the model's dtype: float32 rounding between the two batch shapes
    tight = fast.dtype == torch.float64 and name != "gemma2"
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-9 if tight else 1e-5)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_graph_loop_over_the_static_cache(name):
    model = build(name)
    ids = torch.randint(3, 96, (1, 40), generator=torch.Generator().manual_seed(2))
    refused = FAMILIES[name][2]
    if refused == "AttentionInterface" and routes_through_attention_interface(model):  # Falcon from transformers 5.25
        refused = None
    if refused is not None:
        with pytest.raises(ValueError, match=refused):
            use_paged_attention(model)
            with torch.inference_mode():
                model(ids, past_key_values=StaticKVPackCache(model.config, 64, policy=POLICY, use_kernel=False))
        return
    with torch.inference_mode():
        ref = model.generate(ids, past_key_values=KVPackCache(model.config, policy=POLICY), max_new_tokens=10,
                             do_sample=False)  # fmt: skip
        use_paged_attention(model)
        out = graph_generate(model, ids, StaticKVPackCache(model.config, 64, policy=POLICY, use_kernel=False), 10)
    assert torch.equal(out, ref)
