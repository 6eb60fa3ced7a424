"""PagedKVPackCache: decode through `kvpack.kernels.attention.decode` (decode_ref on the CPU) against KVPackCache."""

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from kvpack import CachePolicy, KVPackCache, PagedKVPackCache, get_codec, save_cache, use_paged_attention
from kvpack.hf.attention import key_validity
from kvpack.hf.paged_cache import PagedLayer
from kvpack.kernels.paged import paged_codec, rows_from_packed

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SPECS = ["int:4", "turbo_mse:3", "turbo_mse:1"]
SMALL = {"residual": 8, "sinks": 4, "block": 8}  # many blocks packed during prefill and decode


def tiny_llama(dtype=torch.float16, layers=3):
    """Random-weight GQA Llama, 4 query over 2 KV heads of head_dim 64 (the kernels take powers of two >= 32)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512)  # fmt: skip
    return LlamaForCausalLM(cfg).eval().to(dtype)


def prompt(batch=2, tokens=70, pad=(0, 0)):
    """Random ids and a left-padding mask: row ``b`` starts with ``pad[b]`` padding positions."""
    ids = torch.randint(3, 96, (batch, tokens), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    for b, p in enumerate(pad[:batch]):
        ids[b, :p], mask[b, :p] = 0, 0
    return ids, mask


def generate(model, ids, mask, cache, n=30, **kwargs):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, past_key_values=cache,
                              pad_token_id=0, **kwargs)  # fmt: skip


def cache_for(model, cls, **kwargs):
    """A ``cls`` cache, with the model's attention set to what it needs (SDPA, or the paged attention)."""
    if cls is PagedKVPackCache:
        use_paged_attention(model)
    else:
        model.set_attn_implementation("sdpa")
    return cls(model.config, **kwargs)


def teacher_forced(model, ids, cache, prefill=60):
    """Last-position logits ``(steps, B, V)`` of a ``prefill``-token prefill, then one step per further token of ``ids``."""
    with torch.inference_mode():
        logits = [model(ids[:, :prefill], past_key_values=cache).logits[:, -1]]
        logits += [model(ids[:, t : t + 1], past_key_values=cache).logits[:, -1] for t in range(prefill, ids.shape[1])]
    return torch.stack(logits).float()


def both(model, ids, mask, n=30, **kwargs):
    """Generation with plain KVPackCache (SDPA over decoded K/V), then with PagedKVPackCache on the same policy."""
    plain = cache_for(model, KVPackCache, **kwargs)
    ref = generate(model, ids, mask, plain, n)
    paged = cache_for(model, PagedKVPackCache, **kwargs)
    return ref, generate(model, ids, mask, paged, n), plain, paged


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("pad", [(0, 0), (0, 21)], ids=["no-padding", "left-padding"])
def test_generation_equals_kvpack_cache(spec, pad):
    ids, mask = prompt(pad=pad)
    ref, out, plain, paged = both(tiny_llama(), ids, mask, key=spec, value=spec, **SMALL)
    assert torch.equal(out, ref)
    assert all(isinstance(layer, PagedLayer) for layer in paged.layers)
    # the first layer's K/V do not depend on attention: bit for bit the same sinks, window and packed bytes
    # (padding positions are not written to the pages); later layers differ by attention's rounding only
    a, b = plain.layers[0], paged.layers[0]
    assert torch.equal(a.keys, b.keys) and torch.equal(a.sink_values, b.sink_values)
    for stream, fmt, pages in (("key", b.key_fmt, b.key_pages), ("value", b.value_fmt, b.value_pages)):
        ref_rows = torch.cat([rows_from_packed(getattr(c, stream), fmt) for c in a.chunks], dim=2)
        for row, tokens in enumerate(b.row_tokens):
            t = torch.arange(tokens)
            got = pages[b.block_tables[row, t // 16].long(), t % 16]  # (tokens, H, row_bytes)
            assert torch.equal(got, ref_rows[row, :, ref_rows.shape[2] - tokens :].transpose(0, 1))
    for a, b in zip(plain.layers, paged.layers):
        packed = sum(c.tokens for c in a.chunks)
        assert b.packed_positions == packed
        assert b.row_tokens == [packed - max(0, p - SMALL["sinks"]) for p in pad]
        assert b.seq_lens.tolist() == b.row_tokens


@pytest.mark.parametrize("spec", ["int:4", "turbo_mse:4"])
def test_pages_hold_the_codec_bytes_and_nbytes_counts_them(spec):
    ids, mask = prompt(batch=1)
    _, _, plain, paged = both(tiny_llama(), ids, mask, key=spec, value=spec, **SMALL)
    codec = get_codec(spec, head_dim=64)
    fmt = paged_codec(codec)
    token_bytes = codec.bits_per_value() * 64 / 8  # bytes of one vector in KVPackCache's Packed
    assert fmt.row_bytes >= token_bytes  # a row: the codec's bytes (plus any alignment of the layout)
    for a, b in zip(plain.layers, paged.layers):
        k, v = b.stored_bytes()
        held = [t.numel() * t.element_size() for t in (b.sink_keys, b.keys, b.sink_values, b.values)]
        tables = b.block_tables.numel() * 4 + b.seq_lens.numel() * 4
        assert k == held[0] + held[1] + b.key_pages.numel() + tables and v == held[2] + held[3] + b.value_pages.numel()
        slots, tokens = b.key_pages.shape[0] * 16, sum(b.row_tokens)
        assert b.key_pages.shape[1:] == (16, 2, fmt.row_bytes)
        # allocated slots: the packed tokens plus spare slots of grown pools (growth by >= 1/8 of the pool)
        assert tokens <= slots < tokens + 16 + b.key_pages.shape[0] // 8 * 16 + 16
        assert k - a.stored_bytes()[0] == 2 * (slots * fmt.row_bytes - tokens * token_bytes) + tables
        assert b.stored_values() == a.stored_values()
    assert paged.bits_per_value() >= plain.bits_per_value()


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="runs the kernels on CPU tensors through TRITON_INTERPRET=1 (set only without CUDA); on a GPU the kernels "
    "are checked by tests/kernels against the reference",
)
@pytest.mark.parametrize(("spec", "pad"), [("int:4", (0, 21)), ("turbo_mse:2", (0, 0))])
def test_triton_kernels_path_equals_kvpack_cache(spec, pad):
    """use_kernel=True: the fused encoder and the decode kernel (the CUDA path; TRITON_INTERPRET=1 on the CPU)."""
    pytest.importorskip("triton")
    model = tiny_llama(layers=2)
    ids, mask = prompt(pad=pad)
    model.set_attn_implementation("sdpa")
    ref = generate(model, ids, mask, KVPackCache(model.config, key=spec, value=spec, **SMALL), n=12)
    use_paged_attention(model)
    cache = PagedKVPackCache(model.config, key=spec, value=spec, use_kernel=True, **SMALL)
    assert torch.equal(generate(model, ids, mask, cache, n=12), ref)
    assert all(layer.use_kernel for layer in cache.layers)


def test_chunked_prefill_and_single_token_prompt_equal_kvpack_cache():
    model = tiny_llama()
    ids, mask = prompt(batch=2, pad=(0, 13))
    outs = []
    for cls in (KVPackCache, PagedKVPackCache):
        cache = cache_for(model, cls, key="turbo_mse:3", value="int:3", **SMALL)
        with torch.inference_mode():  # a 40-token chunk (packs), then a 29-token chunk attends to dequantized pages
            model(ids[:, :40], attention_mask=mask[:, :40], past_key_values=cache)
            model(ids[:, 40:69], attention_mask=mask[:, :69], past_key_values=cache)
        outs.append(generate(model, ids, mask, cache, n=12))
        one = cls(model.config, key="int:2", value="int:2", residual=0, sinks=0, block=1)
        outs.append(generate(model, ids[:1, :1], mask[:1, :1], one, n=12))
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])


def test_crop_within_window_then_generate_equals_kvpack_cache():
    model = tiny_llama()
    ids, mask = prompt(batch=2, pad=(0, 7))
    outs = []
    for cls in (KVPackCache, PagedKVPackCache):
        cache = cache_for(model, cls, key="int:4", value="turbo_mse:3", **SMALL)
        with torch.inference_mode():
            model(ids, attention_mask=mask, past_key_values=cache)
        cache.crop(-3)  # the last 3 prompt tokens leave the 16-bit window; generation re-feeds them
        outs.append(generate(model, ids, mask, cache, n=10))
        assert cache.get_seq_length() == ids.shape[1] + 10 - 1
    assert torch.equal(outs[0], outs[1])


def test_beam_search_reorders_pages():
    ids, mask = prompt(batch=1)
    model = tiny_llama()
    kwargs = dict(key="int:4", value="turbo_mse:2", **SMALL)
    model.set_attn_implementation("sdpa")
    ref = generate(model, ids, mask, KVPackCache(model.config, **kwargs), n=20, num_beams=3)
    use_paged_attention(model)
    paged = PagedKVPackCache(model.config, **kwargs)
    assert torch.equal(generate(model, ids, mask, paged, n=20, num_beams=3), ref)
    assert paged.layers[0].seq_lens.shape == (3,)


def test_unsupported_layers_keep_kvpack_storage():
    ids, mask = prompt(pad=(0, 9))
    ref, out, _, paged = both(tiny_llama(), ids, mask, key="fp8", value="int:4", **SMALL)
    assert torch.equal(out, ref) and not any(isinstance(layer, PagedLayer) for layer in paged.layers)
    ref, out, _, paged = both(tiny_llama(), ids, mask, key="int:4", value="int:4", skip_layers=(1,), **SMALL)
    assert torch.equal(out, ref) and [isinstance(layer, PagedLayer) for layer in paged.layers] == [True, False, True]


def test_errors(tmp_path):
    model = tiny_llama()
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="use_paged_attention"):
        PagedKVPackCache(model.config, key="int:4", value="int:4")
    use_paged_attention(model)
    cache = PagedKVPackCache(model.config, key="int:4", value="int:4", **SMALL)
    ids, mask = prompt(batch=1)
    generate(model, ids, mask, cache, n=2)
    model.set_attn_implementation("sdpa")  # update() would hand SDPA only the new token: refuse
    with pytest.raises(ValueError, match="kvpack_paged"):
        generate(model, ids, mask, cache, n=2)
    use_paged_attention(model)
    right = torch.ones(2, 70, dtype=torch.long)
    right[1, 50:] = 0  # right padding: a padded position after real tokens
    with pytest.raises(NotImplementedError, match="left padding"), torch.inference_mode():
        model(
            prompt()[0],
            attention_mask=right,
            past_key_values=PagedKVPackCache(model.config, key="int:4", value="int:4", **SMALL),
        )
    with pytest.raises(NotImplementedError, match="save_cache"):
        save_cache(cache, tmp_path / "paged.safetensors", config=model.config)
    with pytest.raises(TypeError, match="use_kernel"):
        PagedKVPackCache(model.config, use_kernel="yes")
    with pytest.raises(ValueError, match="attention_mask"):
        key_validity(torch.ones(2, 1, 1, 5, dtype=torch.bool), 2, 6)


@pytest.mark.model
def test_real_model_greedy_choices_and_logits_follow_kvpack_cache(smollm2, wikitext_path):
    """SmolLM2 (float32 on the CPU), 60 decode steps teacher-forced on WikiText-2 after a 60-token prefill.

    The paged decode hands `decode` a float16 query and holds the newest token in the float16 window
    where KVPackCache attends to it in float32 for one step, so logits are not bit-equal: the bound is
    1/10 of the codec's own effect on the logits (measured: ~1/25), and every greedy choice must agree.
    Teacher forcing keeps a near-tie (top-2 margins go down to ~0.02 here) from forking the two runs.
    """
    model, tokenizer = smollm2
    text = wikitext_path.read_text()[2000:4000]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :120]
    kwargs = {"key": "turbo_mse:4", "value": "int:4", "residual": 16, "sinks": 4, "block": 16}

    def forced(cache_class, **kw):
        return teacher_forced(model, ids, cache_class(config=model.config, **kw))

    try:
        model.set_attn_implementation("sdpa")
        exact, plain = forced(DynamicCache), forced(KVPackCache, **kwargs)
        use_paged_attention(model)
        paged = forced(PagedKVPackCache, **kwargs)
    finally:
        model.set_attn_implementation("sdpa")
    codec_error, paged_error = (plain - exact).abs().amax(-1), (paged - plain).abs().amax(-1)
    assert paged_error.max() <= 0.1 * codec_error.max() and paged_error.median() <= 0.1 * codec_error.median()
    assert torch.equal(paged.argmax(-1), plain.argmax(-1))


def test_dynamic_cache_untouched_by_paged_attention():
    """With "kvpack_paged" set, caches other than PagedKVPackCache get transformers' SDPA unchanged."""
    model = tiny_llama()
    ids, mask = prompt(pad=(0, 5))
    model.set_attn_implementation("sdpa")
    ref = generate(model, ids, mask, DynamicCache(config=model.config), n=10)
    use_paged_attention(model)
    assert torch.equal(generate(model, ids, mask, DynamicCache(config=model.config), n=10), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the Triton kernels on the GPU")
@pytest.mark.parametrize(
    "key,value,center",
    [("int:4", "int:4", False), ("turbo_mse:4", "turbo_mse:3", False), ("turbo_prod:4", "turbo_prod:3", False),
     ("int:4", "turbo_mse:3", True)],
)
def test_cuda_kernels_follow_kvpack_cache(key, value, center):
    """On the GPU every decode step runs the fused encode and the decode kernel; teacher-forced logits stay
    within 1/10 of the codec's own effect (against DynamicCache) of KVPackCache's, step by step. ``center``: pages of
    k - mu (`CachePolicy.center_keys`) beside the window shifted by -mu."""
    model = tiny_llama(layers=2).cuda()
    ids = prompt(batch=2, tokens=120)[0].cuda()

    def forced(cache_class, **kw):
        cache = cache_class(config=model.config, **kw)
        return teacher_forced(model, ids, cache), cache

    kwargs = {"policy": CachePolicy(key, value, center_keys=center, **SMALL)}
    try:
        model.set_attn_implementation("sdpa")
        exact, _ = forced(DynamicCache)
        plain, _ = forced(KVPackCache, **kwargs)
        use_paged_attention(model)
        paged, cache = forced(PagedKVPackCache, **kwargs)
    finally:
        model.set_attn_implementation("sdpa")
    assert all(isinstance(layer, PagedLayer) and layer.use_kernel for layer in cache.layers)
    assert all((layer.key_reference is not None) == center for layer in cache.layers)
    codec_error, paged_error = (plain - exact).abs().amax(-1), (paged - plain).abs().amax(-1)
    assert paged_error.max() <= 0.1 * codec_error.max()


def test_update_checks_states_and_layer_idx():
    """PagedLayer.update took a batch of 3 after a batch of 2 (RuntimeError in torch.cat), a float32 1e5 into its
    float16 window (inf) and layer_idx 3 (IndexError); KVPackLayer's checks apply."""
    model = tiny_llama(torch.float32)
    cache = cache_for(model, PagedKVPackCache, key="int:4", value="int:4", residual=8, block=16)
    kv = torch.randn(2, 2, 20, 64)
    cache.update(kv, kv, 0)
    assert isinstance(cache.layers[0], PagedLayer)
    with pytest.raises(ValueError, match="do not match"):
        cache.update(torch.randn(3, 2, 4, 64), torch.randn(3, 2, 4, 64), 0)
    with pytest.raises(ValueError, match="same shape"):
        cache.update(torch.randn(2, 2, 4, 64), torch.randn(2, 2, 3, 64), 0)
    big = torch.randn(2, 2, 4, 64)
    big[0, 0, 0, 0] = 1e5
    with pytest.raises(ValueError, match="range"):
        cache.update(big, big, 0)
    for idx in (3, -1):
        with pytest.raises(ValueError, match="layer_idx"):
            cache.update(kv, kv, idx)
