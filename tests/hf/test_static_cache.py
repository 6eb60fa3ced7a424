"""StaticKVPackCache: the graph-safe paged cache against KVPackCache (same policy, same held bits), compiled vs eager."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_paged_cache import generate, prompt, teacher_forced, tiny_llama
from tiny_models import TINY_FAMILIES

from kvpack import CachePolicy, KVPackCache, StaticKVPackCache, use_paged_attention
from kvpack.hf.cache import layer_kinds

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SMALL = {"residual": 8, "sinks": 4, "block": 8}


def static_cache(model, max_cache_len=160, **kwargs):
    use_paged_attention(model)
    return StaticKVPackCache(model.config, max_cache_len, **kwargs)


def plain_cache(model, **kwargs):
    model.set_attn_implementation("sdpa")
    return KVPackCache(model.config, **kwargs)


@pytest.mark.parametrize("key,value", [("int:4", "turbo_mse:3"), ("int:8", "turbo_mse:1")])
def test_teacher_forced_logits_follow_kvpack_cache(key, value):
    """Every step attends to what KVPackLayer holds (packed blocks + window): logits agree to float rounding."""
    model = tiny_llama()
    ids, _ = prompt(batch=2, tokens=100)
    ref = teacher_forced(model, ids, plain_cache(model, key=key, value=value, **SMALL), prefill=37)
    out = teacher_forced(model, ids, static_cache(model, key=key, value=value, use_kernel=False, **SMALL), prefill=37)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-2)
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.97


@pytest.mark.parametrize("pad", [(0, 0), (0, 5)])
def test_generation_equals_kvpack_cache(pad):
    model = tiny_llama()
    ids, mask = prompt(batch=2, tokens=40, pad=pad)
    ref = generate(model, ids, mask, plain_cache(model, key="int:4", value="int:4", **SMALL), n=40)
    out = generate(model, ids, mask, static_cache(model, key="int:4", value="int:4", use_kernel=False, **SMALL), n=40)
    assert (out == ref).float().mean() >= 0.97


def test_padded_row_equals_the_row_alone():
    """Left padding is not stored: the padded row decodes as it does in a batch of one."""
    model = tiny_llama()
    ids, mask = prompt(batch=2, tokens=30, pad=(0, 6))
    both = generate(model, ids, mask, static_cache(model, key="int:4", value="turbo_mse:2", use_kernel=False, **SMALL))
    alone = generate(model, ids[1:, 6:], mask[1:, 6:],
                     static_cache(model, key="int:4", value="turbo_mse:2", use_kernel=False, **SMALL))  # fmt: skip
    assert torch.equal(both[1, 30:], alone[0, 24:])


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_every_family_generates(family):
    """GQA ratios, head_dim 32-256, sliding windows (a 16-bit ring), qk-norm: greedy tokens follow KVPackCache where
    every layer is full attention (sliding layers hold 16 bits here, so there only the run is checked)."""
    torch.manual_seed(0)
    model = TINY_FAMILIES[family]().eval().to(torch.float16)
    ids = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    kw = {"key": "turbo_mse:4", "value": "int:4", "residual": 4, "sinks": 2, "block": 4}
    out = generate(model, ids, mask, static_cache(model, max_cache_len=64, use_kernel=False, **kw), n=24)
    assert out.shape == (2, 48)
    if all(window is None for window in layer_kinds(model.config)):
        ref = generate(model, ids, mask, plain_cache(model, **kw), n=24)
        assert (out == ref).float().mean() >= 0.9


def test_kernel_ops_path_and_compiled_step_equal_eager():
    """The Triton encode/decode ops (Triton's interpreter on the CPU) give the reference path's logits, and a
    torch.compile(fullgraph=True) decode step (no graph break: nothing on the host) gives the eager step's logits."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # on the CPU: Triton's interpreter
    model = tiny_llama(layers=2).to(device)
    ids, _ = (t.to(device) for t in prompt(batch=2, tokens=20))
    kw = {"key": "int:4", "value": "turbo_mse:3", "residual": 4, "sinks": 2, "block": 4}
    # teacher-forced: the same inputs for both paths at every step; 10 steps pack the window twice (block 4)
    long_ids = torch.cat([ids, ids.flip(1)[:, :10]], 1)
    ref = teacher_forced(model, long_ids, static_cache(model, max_cache_len=48, use_kernel=False, **kw), prefill=20)
    ops = teacher_forced(model, long_ids, static_cache(model, max_cache_len=48, use_kernel=True, **kw), prefill=20)
    torch.testing.assert_close(ops, ref, rtol=0, atol=2e-2)  # as the reference path against KVPackCache

    def steps(cache, forward):
        with torch.inference_mode():
            out = model(ids, past_key_values=cache)  # eager prefill
            tok, logits = out.logits[:, -1:].argmax(-1), []
            for t in range(4):  # the window packs a block at the fourth step
                pos = torch.full((2, 1), ids.shape[1] + t, device=device)
                step = forward(input_ids=tok, past_key_values=cache, position_ids=pos, cache_position=pos[0])
                logits.append(step.logits[:, -1].float())
                tok = step.logits[:, -1:].argmax(-1)
        return torch.stack(logits)

    eager = steps(static_cache(model, max_cache_len=48, use_kernel=True, **kw), model.forward)
    torch._dynamo.reset()
    compiled = torch.compile(model.forward, backend="aot_eager", fullgraph=True)
    graph = steps(static_cache(model, max_cache_len=48, use_kernel=True, **kw), compiled)
    torch.testing.assert_close(graph, eager, rtol=0, atol=1e-3)


def test_bytes_count_the_preallocated_pages():
    model = tiny_llama(layers=1)
    cache = static_cache(model, max_cache_len=132, key="int:4", value="int:4", residual=8, sinks=4, block=8,
                         use_kernel=False)  # fmt: skip
    ids, _ = prompt(batch=2, tokens=10)
    with torch.inference_mode():
        model(ids, past_key_values=cache)
    layer = cache.layers[0]
    row = 64 // 2 + 4  # int:4 codes + float16 scale and zero
    pages = 2 * 128 * 2 * row  # batch 2, 128 page tokens, 2 KV heads
    window = 2 * (4 + 16) * 2 * 64 * 2  # sinks + ring of residual + block, float16
    tables = layer.block_tables.numel() * 4 + 2 * 8
    assert cache.nbytes("v") == pages + window
    assert cache.nbytes("k") == pages + window + tables
    assert cache.bits_per_value() == pytest.approx(8 * cache.nbytes() / (2 * 2 * 132 * 2 * 64))


def test_errors():
    model = tiny_llama(layers=1)
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="use_paged_attention"):
        StaticKVPackCache(model.config, 64)
    use_paged_attention(model)
    for bad in (0, -3, 2.5, True, None):
        with pytest.raises(ValueError, match="max_cache_len"):
            StaticKVPackCache(model.config, bad)
    with pytest.raises(TypeError, match="use_kernel"):
        StaticKVPackCache(model.config, 64, use_kernel="yes")
    with pytest.raises(ValueError, match="pre_rope_keys"):
        StaticKVPackCache(model.config, 64, policy=CachePolicy("int:4", "int:4", pre_rope_keys=True))
    with pytest.raises(ValueError, match="no paged layout"), torch.inference_mode():
        model(torch.ones(1, 4, dtype=torch.long), past_key_values=StaticKVPackCache(model.config, 64, key="e8:4"))
    cache = StaticKVPackCache(model.config, 16, key="int:4", value="int:4", use_kernel=False)
    with torch.inference_mode():
        model(torch.ones(1, 12, dtype=torch.long), past_key_values=cache)
        with pytest.raises(ValueError, match="max_cache_len=16"):
            model(torch.ones(1, 5, dtype=torch.long), past_key_values=cache)
    cache = StaticKVPackCache(model.config, 64, key="int:4", value="int:4", use_kernel=False)
    huge = torch.full((1, 2, 3, 64), 1e5)
    with pytest.raises(ValueError, match="range"):
        cache.update(huge, huge, 0)
    cache = StaticKVPackCache(model.config, 64, key="int:4", value="int:4", use_kernel=False)
    ids, mask = prompt(batch=2, tokens=10, pad=(0, 3))
    with torch.inference_mode():
        model(ids, attention_mask=mask, past_key_values=cache)
        with pytest.raises(ValueError, match="different token counts"):
            model(ids[:, :3], past_key_values=cache)


def test_sliding_window_ring_wraps_as_transformers_window():
    """A sliding layer keeps its window in a 16-bit ring: past the window, logits follow DynamicCache's."""
    from transformers import DynamicCache, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=32, sliding_window=12, max_position_embeddings=256)  # fmt: skip
    model = MistralForCausalLM(cfg).eval().to(torch.float16)
    ids, _ = prompt(batch=2, tokens=50)
    model.set_attn_implementation("sdpa")
    ref = teacher_forced(model, ids, DynamicCache(config=model.config), prefill=9)
    out = teacher_forced(model, ids, static_cache(model, max_cache_len=64, use_kernel=False, **SMALL), prefill=9)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-2)


def test_generate_takes_the_cache_under_both_names():
    """transformers >= 5.2x names the argument ``cache`` (``past_key_values`` deprecated): both give the same tokens."""
    import inspect

    model = tiny_llama(layers=1)
    if "cache" not in inspect.signature(model.forward).parameters:
        pytest.skip("this transformers only takes past_key_values")
    ids, mask = prompt(batch=2, tokens=20)
    kw = {"max_cache_len": 48, "key": "int:4", "value": "int:4", "use_kernel": False, **SMALL}
    old = generate(model, ids, mask, static_cache(model, **kw), n=10)
    with torch.inference_mode():
        new = model.generate(ids, attention_mask=mask, cache=static_cache(model, **kw), max_new_tokens=10,
                             do_sample=False, pad_token_id=0)  # fmt: skip
    assert torch.equal(old, new)


def test_reorder_cache_moves_every_row_in_place():
    """After reorder_cache(perm), each row decodes as the row it took would have (same logits as a cache that held
    the permuted batch from the start); beam search runs on it."""
    model = tiny_llama()
    ids, _ = prompt(batch=3, tokens=50)
    perm = torch.tensor([2, 0, 0])
    kw = {"max_cache_len": 64, "key": "int:4", "value": "turbo_mse:2", "use_kernel": False, **SMALL}
    moved, direct = static_cache(model, **kw), static_cache(model, **kw)
    with torch.inference_mode():
        model(ids[:, :30], past_key_values=moved)
        model(ids[perm, :30], past_key_values=direct)
        for t in range(30, 40):
            model(ids[:, t : t + 1], past_key_values=moved)
            model(ids[perm, t : t + 1], past_key_values=direct)
        moved.reorder_cache(perm)
        pointers = moved.layers[0].key_pages.data_ptr()
        for t in range(40, 50):
            a = model(ids[perm, t : t + 1], past_key_values=moved).logits
            b = model(ids[perm, t : t + 1], past_key_values=direct).logits
            torch.testing.assert_close(a, b, rtol=0, atol=1e-3)
    assert moved.layers[0].key_pages.data_ptr() == pointers  # in place: a captured graph stays valid
    beams = static_cache(model, **kw)
    out = generate(model, ids[:1, :40], torch.ones_like(ids[:1, :40]), beams, n=20, num_beams=3)
    assert out.shape == (1, 60) and beams.layers[0].lengths.shape == (3,)
    with pytest.raises(ValueError, match="cannot batch_select_indices"):
        beams.batch_select_indices(torch.tensor([0]))
    with pytest.raises(ValueError, match="cannot crop"):
        beams.crop(2)


@pytest.mark.model
def test_real_model_with_the_4bit_preset_follows_kvpack_cache(smollm2, wikitext_path):
    """SmolLM2 with its shipped 4bit recipe (per-layer turbo_mse and int:8: every layer paged), teacher-forced on
    WikiText-2: the static cache's logits stay within 1/10 of the codecs' own effect of KVPackCache's, and every
    greedy choice agrees (the same bound as the paged cache's test)."""
    from transformers import DynamicCache

    model, tokenizer = smollm2
    ids = tokenizer(wikitext_path.read_text()[2000:4000], return_tensors="pt").input_ids[:, :90]
    policy = CachePolicy.preset("4bit", (model, tokenizer))  # the shipped calibrated result for SmolLM2
    try:
        model.set_attn_implementation("sdpa")
        exact = teacher_forced(model, ids, DynamicCache(config=model.config))
        plain = teacher_forced(model, ids, KVPackCache(model.config, policy=policy))
        cache = static_cache(model, max_cache_len=128, policy=policy, use_kernel=False)
        static = teacher_forced(model, ids, cache)
    finally:
        model.set_attn_implementation("sdpa")
    assert all(not layer.dense for layer in cache.layers)
    codec_error, static_error = (plain - exact).abs().amax(-1), (static - plain).abs().amax(-1)
    assert static_error.max() <= 0.1 * codec_error.max() and static_error.median() <= 0.1 * codec_error.median()
    assert torch.equal(static.argmax(-1), plain.argmax(-1))


@settings(max_examples=40, deadline=None)
@given(sinks=st.integers(0, 3), residual=st.integers(0, 6), block=st.sampled_from([1, 2, 4]),
       prefill=st.integers(0, 9), steps=st.integers(1, 30), sliding=st.sampled_from([None, 5]))  # fmt: skip
def test_decode_steps_hold_the_tokens_kvpack_layer_holds(sinks, residual, block, prefill, steps, sliding):
    """After a prefill (or none) and each decode step, the 16-bit window a query reads is the sinks then the newest
    tokens not yet packed, oldest first (``P = floor((c - 1 - residual) / block) * block`` packed after the sinks),
    and the pages hold every token after the sinks; a sliding layer: its last ``window`` tokens. Tokens are
    numbered so that each one is recognisable in the window."""
    from kvpack.hf.static_cache import StaticPagedLayer

    policy = CachePolicy("int:4", "int:4", residual=residual, sinks=sinks, block=block)
    layer = StaticPagedLayer(policy, 0, sliding, max_cache_len=64, use_kernel=False)
    token = lambda t: torch.full((1, 1, 1, 32), float(t), dtype=torch.float16)  # noqa: E731 - (B, H, 1, D) of value t
    if prefill:
        keys = torch.cat([token(t) for t in range(prefill)], dim=2)
        layer.update(keys, keys.clone())
        if prefill > 1:  # a multi-token update stores its tokens after attention
            layer.store_prefill(None)
    for c in range(prefill + 1, prefill + steps + 1):
        layer.update(token(c - 1), token(c - 1))
        window_k, window_v, counts = layer._window(layer._packed_count())
        if sliding is not None:
            expected = list(range(max(0, c - min(sliding, 64)), c))
        else:
            packed = max(0, (c - sinks - 1 - residual) // block * block)
            expected = list(range(min(c, sinks))) + list(range(sinks + packed, c)) if c > sinks else list(range(c))
            assert int(layer._packed_count()[0]) == packed
        assert int(counts[0]) == len(expected)
        held = window_k[0, : len(expected), 0, 0].tolist()
        assert held == [float(t) for t in expected] == window_v[0, : len(expected), 0, 0].tolist()


def test_a_model_outside_the_attention_interface_is_refused_by_name():
    """Falcon kept its own attention before transformers 5.25 (transformers only warned when asked to switch):
    `use_paged_attention` says so instead of leaving the paged caches to fail later; where Falcon routes its attention
    through the interface, it takes the paged attention."""
    from tiny_models import routes_through_attention_interface
    from transformers import FalconConfig, FalconForCausalLM

    model = FalconForCausalLM(FalconConfig(vocab_size=128, num_hidden_layers=1, hidden_size=64, num_attention_heads=2,
                                           new_decoder_architecture=True, num_kv_heads=1))  # fmt: skip
    if routes_through_attention_interface(model):
        use_paged_attention(model)
        assert model.config._attn_implementation == "kvpack_paged"
        return
    with pytest.raises(ValueError, match="FalconForCausalLM does not route its attention.*use KVPackCache"):
        use_paged_attention(model)
