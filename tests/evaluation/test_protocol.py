"""kvpack.evaluation.protocol: window selection, the padded round trip, Q/K/V capture, snapshot pieces."""

import pytest
import torch

from kvpack import get_codec
from kvpack.evaluation.inspect import attention_output
from kvpack.evaluation.protocol import capture_qkv, roundtrip, window_starts
from kvpack.evaluation.text import load_text, tokenize

CTX = 128


def test_window_starts_are_spread_and_disjoint():
    starts = window_starts(10_000, 1000, 4)
    assert starts == [0, 3000, 6000, 9000]
    assert window_starts(1000, 1000, 1) == [0]
    with pytest.raises(ValueError, match="need 2002"):
        window_starts(2001, 1001, 2)


def test_roundtrip_keeps_sinks_exact_and_counts_padding():
    x = torch.randn(3, 70, 64)
    codec = get_codec("int:2:axis=channel", head_dim=64)  # groups of 32 tokens: 66 packed tokens pad to 96
    x_hat, nbytes = roundtrip(codec, x, protect=4)
    assert x_hat.shape == x.shape and torch.equal(x_hat[:, :4], x[:, :4])
    assert not torch.equal(x_hat[:, 4:], x[:, 4:])
    packed_96 = codec.encode(torch.randn(3, 96, 64)).nbytes
    assert nbytes == 2 * 3 * 4 * 64 + packed_96
    fp16_hat, fp16_bytes = roundtrip(get_codec("fp16", head_dim=64), x)
    assert fp16_bytes == 2 * x.numel() and torch.allclose(fp16_hat, x, rtol=1e-3, atol=1e-3)


@pytest.fixture(scope="module")
def ids(smollm2, wikitext_path):
    return tokenize(smollm2[1], load_text(wikitext_path)[:60_000])


@pytest.mark.model
def test_capture_gives_post_rope_qkv_that_reproduce_the_models_attention(smollm2, ids):
    model, _ = smollm2
    window = ids[:CTX]
    with torch.inference_mode():
        before = model(window[None]).logits
    layers = capture_qkv(model, window, keep_output=True)
    assert model.config._attn_implementation == "sdpa"  # restored
    with torch.inference_mode():
        after = model(window[None]).logits
    assert torch.equal(before, after)
    with pytest.raises(TypeError, match="ids"):
        capture_qkv(model, window.float())
    assert len(layers) == 30
    for layer in (layers[0], layers[-1]):
        assert layer.q.shape == (9, CTX, 64) and layer.k.shape == layer.v.shape == (3, CTX, 64)
        assert layer.scaling == pytest.approx(64**-0.5) and layer.window is None
        out = attention_output(layer.q, layer.k, layer.v, layer.scaling)
        torch.testing.assert_close(out, layer.output, rtol=1e-4, atol=1e-4)
