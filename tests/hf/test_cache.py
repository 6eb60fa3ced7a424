"""KVPackCache: layout of what it holds, measured bytes, generation against DynamicCache, sliding layers, errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from kvpack import CachePolicy, KVPackCache, get_codec

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def tiny_llama(layers=3):
    """Random-weight GQA Llama: 4 query heads over 2 KV heads, head_dim 16."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_mixed(window=16):
    """Random-weight Qwen2 whose layers alternate sliding-window and full attention."""
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=window,
        use_sliding_window=True,
        max_position_embeddings=512,
        layer_types=["sliding_attention", "full_attention"] * 2,
    )
    return Qwen2ForCausalLM(cfg).eval()


def prompt(batch=2, tokens=70, seed=1):
    return torch.randint(3, 96, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def generate(model, ids, cache, n=30):
    with torch.inference_mode():
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            past_key_values=cache,
            pad_token_id=0,
        )


def raw_kv(model, ids):
    """Per layer, the exact (K, V) the model computes for ``ids``, from a DynamicCache prefill."""
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(ids, past_key_values=cache)
    return [(layer.keys, layer.values) for layer in cache.layers]


@pytest.mark.parametrize("batch", [1, 3])
def test_fp16_generation_equals_dynamic_cache_gqa(batch):
    model = tiny_llama()
    ids = prompt(batch)
    ref = generate(model, ids, DynamicCache(config=model.config))
    # small residual and block: many blocks get packed during the prefill and the decode
    cache = KVPackCache(model.config, key="fp16", value="fp16", residual=8, sinks=4, block=8)
    assert torch.equal(generate(model, ids, cache), ref)
    assert cache.get_seq_length() == ref.shape[1] - 1
    assert len(cache.layers[0].chunks) > 2


def test_layout_after_prefill_sinks_blocks_residual():
    model = tiny_llama()
    ids = prompt(2, 70)
    cache = KVPackCache(model.config, key="int:4", value="int:2", residual=16, sinks=4, block=8)
    with torch.inference_mode():
        model(ids, past_key_values=cache)
    raw = raw_kv(model, ids)
    for layer, (k, v) in zip(cache.layers, raw):
        # 70 = 4 sinks + 48 packed (6 blocks of 8) + 18 residual (16 <= window < 16 + 8)
        assert layer.sink_keys.shape[-2] == 4 and layer.keys.shape[-2] == 18
        assert sum(c.tokens for c in layer.chunks) == 48
        # sinks and residual are held in full precision (16-bit for a float32 model), protected
        # from the first prefill on
        k16, v16 = k.half(), v.half()
        assert layer.sink_keys.dtype == torch.float16
        assert torch.equal(layer.sink_keys, k16[..., :4, :]) and torch.equal(layer.sink_values, v16[..., :4, :])
        assert torch.equal(layer.keys, k16[..., -18:, :]) and torch.equal(layer.values, v16[..., -18:, :])
        past_k, past_v = layer.past()
        assert past_k.dtype == torch.float32
        codec = get_codec("int:4", head_dim=16)
        assert torch.equal(past_k[..., 4:52, :], codec.decode(codec.encode(k16[..., 4:52, :])).float())
        assert not torch.equal(past_v[..., 4:52, :], v[..., 4:52, :])  # 2-bit values are lossy


def test_nbytes_counts_every_tensor_held():
    model = tiny_llama()
    ids = prompt(2, 70)
    caches = {
        spec: KVPackCache(model.config, key=spec, value=spec, residual=16, sinks=4, block=8)
        for spec in ("fp16", "int:4")
    }
    with torch.inference_mode():
        for cache in caches.values():
            model(ids, past_key_values=cache)
    per_token = 2 * 2 * 16  # batch x kv heads x head_dim values per token, per stream
    layers = 3
    fp = (4 + 18) * per_token * 2  # sinks + residual held as float16 (the model computes in float32)
    assert caches["fp16"].nbytes("k") == layers * (fp + 48 * per_token * 2)
    int4 = get_codec("int:4", head_dim=16)
    packed = int4.encode(torch.zeros(2, 2, 48, 16)).nbytes
    assert caches["int:4"].nbytes("k") == layers * (fp + packed)
    assert caches["int:4"].nbytes() == caches["int:4"].nbytes("k") + caches["int:4"].nbytes("v")
    bits = caches["int:4"].bits_per_value()
    assert bits == pytest.approx(8 * caches["int:4"].nbytes() / (2 * layers * 70 * per_token))
    assert caches["int:4"].nbytes() < 0.75 * caches["fp16"].nbytes()


def test_skip_layers_and_unpacked_stream_stay_exact():
    model = tiny_llama()
    ids = prompt(1, 60)
    cache = KVPackCache(model.config, key="int:2", value=None, residual=0, sinks=0, skip_layers=(1,), block=8)
    with torch.inference_mode():
        model(ids, past_key_values=cache)
    raw = raw_kv(model, ids)
    k1, v1 = cache.layers[1].past()
    # uncompressed = 16-bit, as deployed (the model computes in float32 here)
    assert torch.equal(k1, raw[1][0].half().float()) and torch.equal(v1, raw[1][1].half().float())
    k0, v0 = cache.layers[0].past()
    assert torch.equal(v0, raw[0][1].half().float()) and not torch.equal(k0, raw[0][0].half().float())
    assert cache.bits_per_value("v") == 16.0


def test_window_dtype_float32_keeps_model_values_exactly():
    model = tiny_llama()
    ids = prompt(1, 40)
    cache = KVPackCache(model.config, key=None, value="int:4", residual=8, sinks=2, block=8)
    exact = KVPackCache(model.config, policy=CachePolicy(None, "int:4", 8, 2, window_dtype=torch.float32))
    with torch.inference_mode():
        model(ids, past_key_values=cache)
        model(ids, past_key_values=exact)
    raw = raw_kv(model, ids)
    assert torch.equal(exact.layers[0].past()[0], raw[0][0])
    assert exact.bits_per_value("k") == 32.0 and cache.bits_per_value("k") == 16.0
    with pytest.raises(TypeError, match="window_dtype"):
        CachePolicy("fp16", "fp16", window_dtype=torch.int8)


def test_mixed_sliding_and_full_layers():
    model = tiny_mixed(window=16)
    ids = prompt(2, 50)
    ref = generate(model, ids, DynamicCache(config=model.config))
    cache = KVPackCache(model.config, key="fp16", value="fp16", residual=4, sinks=4, block=4)
    assert torch.equal(generate(model, ids, cache), ref)
    sliding, full = cache.layers[0], cache.layers[1]
    assert sliding.is_sliding and not full.is_sliding and sliding.sinks == 0
    # the sliding layer keeps the last 15 tokens plus at most one partial block
    assert 15 <= sliding.stored_values() // (2 * 2 * 16) < 15 + 4
    assert full.stored_values() // (2 * 2 * 16) == 79
    lossy = KVPackCache(model.config, key="int:4", value="int:4", residual=4, sinks=4, block=4)
    out = generate(model, ids, lossy)
    assert out.shape == ref.shape and lossy.nbytes() < cache.nbytes()


def test_batch_reorder_applies_to_packed_chunks():
    model = tiny_llama()
    cache = KVPackCache(model.config, key="int:4", value="int:4", residual=8, sinks=2, block=8)
    with torch.inference_mode():
        model(prompt(3, 40), past_key_values=cache)
    before = cache.layers[0].past()
    order = torch.tensor([2, 0, 0])
    cache.reorder_cache(order)
    after = cache.layers[0].past()
    assert torch.equal(after[0], before[0][order]) and torch.equal(after[1], before[1][order])
    cache.batch_select_indices(torch.tensor([True, False, True]))
    assert torch.equal(cache.layers[0].past()[0], before[0][torch.tensor([2, 0])])
    cache.batch_repeat_interleave(2)
    assert cache.layers[0].past()[0].shape[0] == 4


def test_crop_only_within_residual_window():
    model = tiny_llama()
    cache = KVPackCache(model.config, key="fp16", value="fp16", residual=8, sinks=2, block=8)
    with torch.inference_mode():
        model(prompt(1, 30), past_key_values=cache)
    window = cache.layers[0].keys.shape[-2]
    cache.crop(-3)
    assert cache.get_seq_length() == 27 and cache.layers[0].keys.shape[-2] == window - 3
    with pytest.raises(NotImplementedError, match="full-precision window"):
        cache.crop(-window)
    with pytest.raises(ValueError, match="tokens_to_remove"):
        cache.crop(5)


def test_reset_empties_the_cache():
    model = tiny_llama()
    cache = KVPackCache(model.config, key="int:4", value="int:4", residual=8, sinks=2, block=8)
    with torch.inference_mode():
        model(prompt(1, 30), past_key_values=cache)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes() == 0


def test_policy_object_and_default_block():
    policy = CachePolicy(key="int:4:axis=channel,group=32", value="fp8", residual=0, sinks=0)
    cache = KVPackCache(tiny_llama().config, policy=policy)
    assert cache.policy is policy
    assert policy.block_for(*policy.codecs(64)) == 32
    with pytest.raises(ValueError, match="multiple of the codecs' block_tokens"):
        CachePolicy(key="int:4:axis=channel,group=32", block=48).block_for(*policy.codecs(64))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"key": "nope:3"}, ValueError, "unknown codec"),
        ({"key": 4}, TypeError, "key must be a codec spec"),
        ({"residual": -1}, ValueError, "residual must be an int >= 0"),
        ({"sinks": 1.5}, ValueError, "sinks must be an int >= 0"),
        ({"block": 0}, ValueError, "block must be a positive int"),
        ({"skip_layers": (-1,)}, ValueError, "skip_layers must hold layer indices"),
        ({"skip_layers": (7,)}, ValueError, r"skip_layers/.* name layers \[7\]"),
        ({"config": None}, TypeError, "config must be the model's transformers config"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = {"config": tiny_llama().config, "key": "fp16", "value": "fp16", **kwargs}
    with pytest.raises(error, match=match):
        KVPackCache(**args)


def test_bad_stream_name():
    cache = KVPackCache(tiny_llama().config, key="fp16", value="fp16")
    with pytest.raises(ValueError, match="stream must be"):
        cache.nbytes("q")


@pytest.mark.model
def test_real_model_fp16_generation_is_token_identical(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("The history of the Roman Empire begins", return_tensors="pt").input_ids
    ref = generate(model, ids, DynamicCache(config=model.config), n=20)
    cache = KVPackCache(model.config, key="fp16", value="fp16", residual=4, sinks=4, block=4)
    assert torch.equal(generate(model, ids, cache, n=20), ref)


@pytest.mark.model
def test_real_model_int4_generates_sensible_text_in_fewer_bytes(smollm2):
    model, tokenizer = smollm2
    tokenizer.padding_side = "left"
    texts = ["The capital of France is", "Water is made of hydrogen and"]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    n_prompt = enc.input_ids.shape[1]
    with torch.inference_mode():
        ref = model.generate(
            **enc, max_new_tokens=16, do_sample=False, past_key_values=DynamicCache(config=model.config)
        )
        fp16 = KVPackCache(model.config, key="fp16", value="fp16", residual=4, sinks=2, block=4)
        model.generate(**enc, max_new_tokens=16, do_sample=False, past_key_values=fp16)
        int4 = KVPackCache(model.config, key="int:4", value="int:4", residual=4, sinks=2, block=4)
        out = model.generate(**enc, max_new_tokens=16, do_sample=False, past_key_values=int4)
    agree = (out[:, n_prompt:] == ref[:, n_prompt:]).float().mean().item()
    assert agree >= 0.5, tokenizer.batch_decode(out[:, n_prompt:])
    assert "Paris" in tokenizer.decode(out[0, n_prompt:])

    # same tokens held in both; packed blocks shrink from 16 to 4 + 32/64 bits per value, the
    # float32 sinks and residual window are unchanged
    def packed_bytes(cache):
        return sum(c.key.nbytes + c.value.nbytes for layer in cache.layers for c in layer.chunks)

    assert packed_bytes(int4) == pytest.approx(packed_bytes(fp16) * 4.5 / 16)
    assert fp16.nbytes() - int4.nbytes() == packed_bytes(fp16) - packed_bytes(int4)


def test_update_refuses_mismatched_states_and_fresh_batch_select_is_a_no_op():
    model = tiny_llama(layers=1)
    cache = KVPackCache(config=model.config, key="int:4", value="int:4", residual=4)
    layer = cache.layers[0]
    layer.batch_select_indices(torch.tensor([0]))  # fresh cache: nothing to select, no AttributeError
    with pytest.raises(ValueError, match="same shape"):
        layer.update(torch.randn(1, 2, 40, 16), torch.randn(1, 2, 30, 16))
    with pytest.raises(ValueError, match="range"):
        layer.update(torch.full((1, 2, 3, 16), 1e5), torch.zeros(1, 2, 3, 16))
    assert not layer.is_initialized or layer.get_seq_length() == 0


def test_decode_chunk_is_what_past_shows_of_each_chunk():
    """`past()` is the sinks, every chunk through `decode_chunk` (pre-RoPE keys re-rotated, rows reordered) and the
    window: the one chunk decode that the decode protocol shares."""
    model = tiny_llama()
    cache = KVPackCache(model.config, policy=CachePolicy("int:4", "e8:3", residual=8, sinks=2, block=8,
                                                         pre_rope_keys=True))  # fmt: skip
    with torch.inference_mode():
        model(prompt(3, 40), past_key_values=cache)
        model(prompt(3, 16, seed=2), past_key_values=cache)  # a second chunk, packed at another start
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    layer = cache.layers[1]
    assert len(layer.chunks) >= 2 and layer.key_rope is not None and layer.chunks[0].order is not None
    decoded = [layer.decode_chunk(c) for c in layer.chunks]
    keys, values = layer.past()
    n_sink = layer.sink_keys.shape[-2]
    at = n_sink
    for (k, v), chunk in zip(decoded, layer.chunks):
        assert k.dtype == v.dtype == layer.dtype and k.shape[-2] == chunk.tokens
        assert torch.equal(keys[..., at : at + chunk.tokens, :], k) and torch.equal(
            values[..., at : at + chunk.tokens, :], v
        )
        at += chunk.tokens
    assert at + layer.keys.shape[-2] == keys.shape[-2]
    raw = layer.key_codec.decode(layer.chunks[0].key).to(layer.dtype)[layer.chunks[0].order]
    assert not torch.allclose(raw, decoded[0][0])  # RoPE re-applied, not the stored pre-RoPE keys


def filled_fp16_cache(batch=3, tokens=17):
    """A cache whose held past is exactly its input in float16 (fp16 codec), with sinks, packed chunks and a window."""
    cache = KVPackCache(tiny_llama().config, key="fp16", value="fp16", residual=4, sinks=2, block=4)
    keys = torch.randn(batch, 2, tokens, 16, generator=torch.Generator().manual_seed(0)).half().float()
    for i in range(len(cache.layers)):
        cache.update(keys, keys * 2, i)
    return cache, keys


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.integers(-5, 7), min_size=0, max_size=5), op=st.sampled_from(["select", "reorder"]))
def test_batch_rows_in_range_select_else_refused(rows, op):
    """Rows outside 0..batch-1 raised IndexError from index_select; now ValueError, and valid rows select exactly."""
    cache, keys = filled_fp16_cache()
    fn = cache.batch_select_indices if op == "select" else cache.reorder_cache
    if any(not 0 <= r < 3 for r in rows):
        with pytest.raises(ValueError, match="outside 0..2"):
            fn(torch.tensor(rows, dtype=torch.long))
        return
    fn(torch.tensor(rows, dtype=torch.long))
    assert torch.equal(cache.layers[0].past()[0].float(), keys[rows])


@pytest.mark.parametrize("indices", [None, "0", torch.tensor([0.5]), torch.tensor([[0, 1]]), torch.tensor([True])])
def test_batch_rows_of_the_wrong_kind_refused(indices):
    cache, _ = filled_fp16_cache()
    for fn in (cache.batch_select_indices, cache.reorder_cache):
        with pytest.raises((TypeError, ValueError), match="indices|beam_idx"):
            fn(indices)


@pytest.mark.parametrize("repeats", [0, -1, 1.5, "2", True])
def test_batch_repeat_interleave_needs_a_positive_int(repeats):
    cache, _ = filled_fp16_cache()
    with pytest.raises(ValueError, match="repeats"):
        cache.batch_repeat_interleave(repeats)


@pytest.mark.parametrize("layer_idx", [3, -1, -4, 1.0, "0", None, True])
def test_update_layer_idx_checked(layer_idx):
    """-1 updated the last layer silently; 3, 1.0, None raised IndexError/TypeError inside transformers."""
    cache = KVPackCache(tiny_llama().config, key="int:4", value="int:4")
    kv = torch.randn(1, 2, 5, 16)
    with pytest.raises((TypeError, ValueError), match="layer_idx"):
        cache.update(kv, kv, layer_idx)
    assert not any(layer.is_initialized for layer in cache.layers)


def test_update_refuses_meta_tensors():
    cache = KVPackCache(tiny_llama().config, key="int:4", value="int:4")
    kv = torch.randn(1, 2, 5, 16, device="meta")
    with pytest.raises(ValueError, match="meta"):
        cache.update(kv, kv, 0)
