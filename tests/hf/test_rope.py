"""kvpack.hf.rope and pre-RoPE key packing (KVQuant): exact inverses, positions, the cache round trip, errors."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from kvpack import CachePolicy, KVPackCache, load_cache, save_cache
from kvpack.hf.rope import rerope, rope_table, unrope

CONFIG = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=256)


def test_rerope_is_the_models_rope_and_unrope_inverts_it():
    pre = torch.randn(2, 2, 40, 64, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(17, 57)[None].expand(2, -1)
    cos, sin = LlamaRotaryEmbedding(CONFIG)(pre, positions)
    _, post = apply_rotary_pos_emb(pre, pre, cos, sin)
    table = rope_table(CONFIG)
    assert torch.allclose(rerope(pre, 17, table), post, atol=1e-5)
    assert torch.allclose(unrope(post, 17, table), pre, atol=1e-5)
    assert not torch.allclose(unrope(post, 16, table), pre, atol=1e-2)  # the position matters


def test_pre_rope_keys_with_a_lossless_codec_keep_the_keys():
    policy = CachePolicy("fp16", "fp16", residual=8, sinks=2, block=8, pre_rope_keys=True)
    cache = KVPackCache(config=CONFIG, policy=policy)
    k = torch.randn(1, 2, 50, 64, dtype=torch.float16)
    v = torch.randn(1, 2, 50, 64, dtype=torch.float16)
    cache.layers[0].update(k[..., :30, :], v[..., :30, :])
    for t in range(30, 50):  # decode steps pack blocks at later positions
        cache.layers[0].update(k[..., t : t + 1, :], v[..., t : t + 1, :])
    keys, values = cache.layers[0].past()
    assert [c.start for c in cache.layers[0].chunks] == [2, 18, 26, 34]  # sinks 2, prefill packs 16, then blocks of 8
    assert torch.allclose(keys.float(), k.float(), atol=2e-2) and torch.equal(values, v)


def test_pre_rope_keys_change_the_codes_and_survive_persistence(tmp_path):
    k = torch.randn(1, 2, 48, 64) * torch.linspace(0.2, 3, 64)  # per-channel scales, as real keys have
    caches = {}
    for pre in (False, True):
        policy = CachePolicy("int:2:axis=channel", "int:4", residual=0, sinks=0, block=32, pre_rope_keys=pre)
        cache = KVPackCache(config=CONFIG, policy=policy)
        for layer in cache.layers:
            layer.update(k, k)
        caches[pre] = cache
    post_k, pre_k = caches[False].layers[0].past()[0], caches[True].layers[0].past()[0]
    assert not torch.equal(post_k, pre_k) and caches[True].nbytes() == caches[False].nbytes()
    save_cache(caches[True], tmp_path / "c.safetensors", config=CONFIG)
    loaded = load_cache(tmp_path / "c.safetensors", config=CONFIG)
    assert loaded.policy.pre_rope_keys and torch.equal(loaded.layers[0].past()[0], pre_k)


def test_errors():
    with pytest.raises(TypeError, match="pre_rope_keys must be a bool"):
        CachePolicy("int:4", "int:4", pre_rope_keys="yes")
    no_rope = LlamaConfig(num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, hidden_size=256)
    no_rope.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(ValueError, match="dynamic"):
        KVPackCache(config=no_rope, policy=CachePolicy("int:4", "int:4", pre_rope_keys=True))
    no_rope.rope_parameters = {}
    with pytest.raises(ValueError, match="rope_theta"):
        rope_table(no_rope)


def test_pre_rope_keys_leave_uncompressed_key_streams_as_they_are():
    # a skipped layer and a key=None stream hold their 16-bit post-RoPE keys, as without pre_rope_keys
    k = torch.randn(1, 2, 48, 64, dtype=torch.float16)
    for key, skip in (("int:4", (0,)), (None, ())):
        held = {}
        for pre in (False, True):
            policy = CachePolicy(key, "int:4", residual=0, sinks=0, block=16, skip_layers=skip, pre_rope_keys=pre)
            cache = KVPackCache(config=CONFIG, policy=policy)
            cache.layers[0].update(k, k)
            held[pre] = (cache.nbytes(), cache.layers[0].past()[0])
        assert held[True][0] == held[False][0] and torch.equal(held[True][1], held[False][1])
