"""`prefix_attention` (a prefill chunk over its past block by block, merged by log-sum-exp) is SDPA over the whole
context; `past_block_tokens` bounds a block's bytes."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpack.hf.attention import PAST_BLOCK_BYTES, past_block_tokens, plain_prefix_mask, prefix_attention


def sdpa_all(query, keys, values, mask, scale):
    """SDPA over the concatenated context (GQA expanded), ``(B, q, Hq, D)``; the reference."""
    k, v = torch.cat(keys, 2), torch.cat(values, 2)
    groups = query.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    if mask is None:  # past all visible, the chunk causal
        q, past = query.shape[2], k.shape[2] - query.shape[2]
        mask = torch.ones(q, k.shape[2], dtype=torch.bool, device=query.device).tril(past)[None, None]
    return F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scale).transpose(1, 2)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 2), kv_heads=st.integers(1, 3), groups=st.sampled_from([1, 2, 4]),
       blocks=st.lists(st.integers(0, 40), min_size=1, max_size=4), q=st.integers(1, 12),
       masked=st.sampled_from(["none", "bool", "float", "plain"]), seed=st.integers(0, 2**16),
       counted=st.booleans())  # fmt: skip
def test_prefix_attention_is_sdpa_over_the_context(batch, kv_heads, groups, blocks, q, masked, seed, counted):
    """Also with the past's length given (``counted``), when a mask that only says "past visible, chunk causal" is
    dropped ("plain")."""
    g = torch.Generator().manual_seed(seed)
    hq, d = kv_heads * groups, 16
    query = torch.randn(batch, hq, q, d, generator=g)
    keys = [torch.randn(batch, kv_heads, t, d, generator=g) for t in blocks + [q]]
    values = [torch.randn(batch, kv_heads, t, d, generator=g) for t in blocks + [q]]
    total = sum(blocks) + q
    mask = None
    if masked != "none":  # causal over the chunk, some past columns hidden (padding, a sliding window)
        mask = torch.ones(q, total, dtype=torch.bool).tril(total - q)[None, None].repeat(batch, 1, 1, 1)
    if masked in ("bool", "float"):
        mask &= torch.rand(batch, 1, 1, total, generator=g) > 0.3
        mask[..., -q:] |= torch.eye(q, dtype=torch.bool)  # each query sees itself: no row without a key
        if masked == "float":
            mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    count = sum(blocks) if counted else None
    out = prefix_attention(query, zip(keys[:-1], values[:-1]), keys[-1], values[-1], mask, 0.3, past_count=count)
    torch.testing.assert_close(out, sdpa_all(query, keys, values, mask, 0.3), atol=1e-5, rtol=1e-5)


def test_plain_prefix_mask_tells_a_mask_that_hides_nothing():
    past, q = 6, 4
    plain = torch.ones(q, past + q, dtype=torch.bool).tril(past)[None, None].repeat(2, 1, 1, 1)
    additive = torch.zeros(plain.shape).masked_fill(~plain, torch.finfo(torch.float32).min)
    assert plain_prefix_mask(None, past) and plain_prefix_mask(plain, past)
    assert plain_prefix_mask(torch.zeros(plain.shape).masked_fill(~plain, float("-inf")), past)
    assert plain_prefix_mask(additive, past)
    padded = plain.clone()
    padded[1, :, :, 0] = False  # the second row's first token is padding
    windowed = plain.clone()
    windowed[..., -1, 1] = False  # a sliding window: the last query no longer sees an early past token
    within = plain.clone()
    within[..., -1, -2] = False  # a window inside the chunk
    leaky = plain.clone()
    leaky[..., 0, -1] = True  # a query sees a later token: not causal
    for mask in (padded, windowed, within, leaky):
        assert not plain_prefix_mask(mask, past)
    assert not plain_prefix_mask(plain, past - 1)  # the columns are not past + q


def test_a_row_that_sees_nothing_gets_zeros():
    query, key = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    past = [(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))]
    mask = torch.ones(1, 1, 3, 8, dtype=torch.bool).tril(5)
    mask[:, :, 1] = False  # a padding query row
    out = prefix_attention(query, past, key, key, mask, 1.0)
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("batch,heads,head_dim", [(1, 32, 128), (16, 32, 128), (64, 64, 256)])
def test_past_block_tokens_bound_the_block(batch, heads, head_dim):
    tokens = past_block_tokens(batch, heads, head_dim, 2)
    assert tokens % 256 == 0 and tokens >= 256
    assert tokens == 256 or 2 * batch * heads * head_dim * 2 * tokens <= PAST_BLOCK_BYTES


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("masked", ["none", "bool", "plain"])
def test_prefix_attention_on_cuda(dtype, masked):
    """CUDA takes the memory-efficient kernel with a bias (whose rows need 16-element alignment: 37-token blocks),
    the flash kernel over the KV heads as they are without one (16-bit; "plain": a mask that hides nothing, dropped
    as the past's length is given)."""
    g = torch.Generator(device="cuda").manual_seed(3)
    batch, kv_heads, groups, q, d, blocks = 2, 2, 4, 70, 128, [37, 300, 5]
    query = torch.randn(batch, kv_heads * groups, q, d, generator=g, device="cuda")
    keys = [torch.randn(batch, kv_heads, t, d, generator=g, device="cuda") for t in blocks + [q]]
    values = [torch.randn(batch, kv_heads, t, d, generator=g, device="cuda") for t in blocks + [q]]
    total = sum(blocks) + q
    mask = None
    if masked != "none":
        mask = torch.ones(q, total, dtype=torch.bool, device="cuda").tril(total - q)[None, None].repeat(batch, 1, 1, 1)
    if masked == "bool":
        mask[..., : total // 3] = False
    cast = lambda xs: [x.to(dtype) for x in xs]
    out = prefix_attention(query.to(dtype), zip(cast(keys[:-1]), cast(values[:-1])), keys[-1].to(dtype),
                           values[-1].to(dtype), mask, d**-0.5, past_count=total - q)  # fmt: skip
    ref = sdpa_all(query, keys, values, mask, d**-0.5)
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
