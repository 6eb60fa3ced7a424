"""``CachePolicy(center_keys=True)``: keys packed relative to the prefill's mean key, in every cache."""

import pytest
import torch
from test_paged_cache import SMALL, generate, prompt, teacher_forced, tiny_llama

from kvpack import CachePolicy, KVPackCache, PagedKVPackCache, StaticKVPackCache, get_codec, use_paged_attention
from kvpack.hf.cache import KVPackLayer, key_reference, shift_keys
from kvpack.kernels.paged import rows_from_packed

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CENTERED = {"policy": CachePolicy("int:4", "turbo_mse:3", center_keys=True, **SMALL)}


def test_chunks_hold_keys_minus_the_prefill_mean_and_decode_adds_it_back():
    torch.manual_seed(0)
    policy = CachePolicy("int:2", "int:4", residual=8, sinks=2, block=8, center_keys=True)
    layer = KVPackLayer(policy, 0)
    keys = torch.randn(2, 3, 40, 64, dtype=torch.float16) + 5.0  # a common part, as real keys have
    values = torch.randn(2, 3, 40, 64, dtype=torch.float16)
    layer.update(keys[..., :30, :], values[..., :30, :])
    want = keys[..., 2:30, :].float().mean(-2, keepdim=True).half()  # the non-sink tokens of the first update
    torch.testing.assert_close(layer.key_reference, want, rtol=0, atol=2e-3)
    assert layer.key_reference.shape == (2, 3, 1, 64) and layer.key_reference.dtype == torch.float16
    ref = layer.key_reference.clone()
    layer.update(keys[..., 30:, :], values[..., 30:, :])  # later updates leave it fixed
    assert torch.equal(layer.key_reference, ref)
    codec = get_codec("int:2", head_dim=64)
    chunk = layer.chunks[0]
    want_packed = codec.encode(shift_keys(keys[..., 2 : 2 + chunk.tokens, :], ref, -1))
    assert all(torch.equal(chunk.key.data[n], want_packed.data[n]) for n in want_packed.data)
    past_k, _ = layer.past()
    decoded = shift_keys(codec.decode(want_packed), ref, +1)
    assert torch.equal(past_k[..., 2 : 2 + chunk.tokens, :], decoded)
    assert torch.equal(past_k[..., :2, :], keys[..., :2, :])  # sinks and window as they are
    # 2-bit codes of k - mu are closer to k than 2-bit codes of k, whose range holds the common part
    plain = codec.decode(codec.encode(keys[..., 2 : 2 + chunk.tokens, :])).float()
    target = keys[..., 2 : 2 + chunk.tokens, :].float()
    assert ((decoded.float() - target) ** 2).mean() < ((plain - target) ** 2).mean()
    k_bytes, _ = layer.stored_bytes()
    plain_layer = KVPackLayer(CachePolicy("int:2", "int:4", 8, 2, block=8), 0)
    plain_layer.update(keys, values)
    assert k_bytes - plain_layer.stored_bytes()[0] == ref.numel() * 2  # the reference, counted
    layer.batch_select_indices(torch.tensor([1]))
    assert torch.equal(layer.key_reference, ref[1:])


def test_uncompressed_keys_are_not_centered():
    layer = KVPackLayer(CachePolicy(None, "int:4", 4, 1, block=4, center_keys=True), 0)
    x = torch.randn(1, 2, 20, 64, dtype=torch.float16) + 3
    layer.update(x, x)
    assert layer.key_reference is None and torch.equal(layer.past()[0], x)


def test_key_reference_of_valid_tokens_only():
    x = torch.arange(24.0).reshape(2, 1, 4, 3)
    valid = torch.tensor([[False, True, True, True], [False, False, False, False]])
    ref = key_reference(x, valid)
    assert torch.equal(ref[0, 0, 0], x[0, 0, 1:].mean(0)) and torch.equal(ref[1], torch.zeros(1, 1, 3))


def test_policy_refuses_a_non_bool():
    with pytest.raises(TypeError, match="center_keys"):
        CachePolicy("int:4", "int:4", center_keys=1)


@pytest.mark.parametrize("pad", [(0, 0), (0, 21)], ids=["no-padding", "left-padding"])
def test_paged_generation_equals_kvpack_cache(pad):
    """The pages hold the bytes KVPackLayer packs; the kernels' window is shifted by -mu, the pages are not read
    shifted back: the greedy tokens are those of SDPA over the decoded past."""
    ids, mask = prompt(pad=pad)
    model = tiny_llama()
    model.set_attn_implementation("sdpa")
    plain = KVPackCache(model.config, **CENTERED)
    ref = generate(model, ids, mask, plain)
    use_paged_attention(model)
    paged = PagedKVPackCache(model.config, **CENTERED)
    assert torch.equal(generate(model, ids, mask, paged), ref)
    a, b = plain.layers[0], paged.layers[0]
    assert torch.equal(a.key_reference, b.key_reference)
    rows = torch.cat([rows_from_packed(c.key, b.key_fmt) for c in a.chunks], dim=2)
    t = torch.arange(b.row_tokens[0])
    assert torch.equal(b.key_pages[b.block_tables[0, t // 16].long(), t % 16], rows[0].transpose(0, 1))


def test_paged_beam_search_reorders_the_reference():
    ids, mask = prompt(batch=1)
    model = tiny_llama()
    model.set_attn_implementation("sdpa")
    ref = generate(model, ids, mask, KVPackCache(model.config, **CENTERED), n=20, num_beams=3)
    use_paged_attention(model)
    assert torch.equal(generate(model, ids, mask, PagedKVPackCache(model.config, **CENTERED), n=20, num_beams=3), ref)


def test_static_teacher_forced_logits_follow_kvpack_cache():
    model = tiny_llama()
    ids, _ = prompt(batch=2, tokens=100)
    model.set_attn_implementation("sdpa")
    plain = KVPackCache(model.config, **CENTERED)
    ref = teacher_forced(model, ids, plain, prefill=37)
    use_paged_attention(model)
    static = StaticKVPackCache(model.config, 160, use_kernel=False, **CENTERED)
    out = teacher_forced(model, ids, static, prefill=37)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-2)
    assert torch.equal(static.layers[0].key_reference, plain.layers[0].key_reference)
    uncentered = teacher_forced(model, ids, KVPackCache(model.config, key="int:4", value="turbo_mse:3", **SMALL), 37)
    assert not torch.equal(uncentered, ref)  # the option changes what is held
    with torch.inference_mode():  # its buffers were made there
        static.reset()
    assert not static.layers[0].reference_fixed and not static.layers[0].key_reference.any()



def test_inforward_round_trip_packs_keys_minus_the_first_updates_mean():
    from dataclasses import replace

    from kvpack.evaluation.protocol import RoundTripCache, roundtrip

    torch.manual_seed(0)
    config = tiny_llama(layers=1).config
    policy = CachePolicy("int:2", "int:4", sinks=2, center_keys=True)
    keys, values = torch.randn(1, 2, 30, 64) + 5.0, torch.randn(1, 2, 30, 64)
    cache = RoundTripCache(config, policy)
    held, _ = cache.update(keys, values, 0)
    ref = key_reference(keys[..., 2:, :])
    codec = get_codec("int:2", head_dim=64)
    packed = roundtrip(codec, shift_keys(keys[..., 2:, :], ref, -1))[0]
    assert torch.equal(held[..., :2, :], keys[..., :2, :])  # sinks as they are
    assert torch.equal(held[..., 2:, :], shift_keys(packed, ref, +1))
    plain = RoundTripCache(config, replace(policy, center_keys=False))
    plain_held, _ = plain.update(keys, values, 0)
    assert ((held - keys) ** 2).mean() < ((plain_held - keys) ** 2).mean()
    assert 8 * (cache._bytes["k"] - plain._bytes["k"]) == 32 * ref.numel()  # the mean key, counted once
    more = torch.randn(1, 2, 4, 64) + 5.0  # a later update: the same mean
    later, _ = cache.update(more, more, 0)
    assert torch.equal(later[..., -4:, :], shift_keys(roundtrip(codec, shift_keys(more, ref, -1))[0], ref, +1))
    uncompressed = RoundTripCache(config, CachePolicy(None, "int:4", sinks=2, center_keys=True))
    assert torch.equal(uncompressed.update(keys, values, 0)[0], keys) and not uncompressed._key_references
