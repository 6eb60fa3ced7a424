"""The peers (transformers' QuantizedCache backends): spec parsing, true bits of what they hold, the harness run."""

import pytest
import torch
from transformers import LlamaConfig

from kvpack import evaluate
from kvpack.evaluation import peers
from kvpack.evaluation.peers import PEERS, held_bytes, parse_peer, peer_factory

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def tiny_config(layers: int = 2) -> LlamaConfig:
    return LlamaConfig(num_hidden_layers=layers, num_attention_heads=6, num_key_value_heads=2, hidden_size=384,
                       head_dim=64, intermediate_size=64, vocab_size=16)  # fmt: skip


def filled(spec: str, tokens: int = 256, layers: int = 2):
    cache = peer_factory(spec)(tiny_config(layers))
    gen = torch.Generator().manual_seed(0)
    for layer in range(layers):
        k, v = (torch.randn(1, 2, tokens, 64, generator=gen) for _ in range(2))
        cache.update(k, v, layer)
    return cache


def test_parse_peer_specs():
    assert parse_peer("quanto:4").cache_kwargs() == {"nbits": 4}
    assert parse_peer("hqq:2:group=32,residual=64").cache_kwargs() == {
        "nbits": 2, "q_group_size": 32, "residual_length": 64,
    }  # fmt: skip
    assert parse_peer("fp8").cache_kwargs() == {} and parse_peer("FP8").name == "fp8"
    assert [parse_peer(p).name for p in PEERS] == list(PEERS)


@pytest.mark.parametrize(
    ("spec", "match"),
    [("bogus:4", "unknown peer backend"), ("quanto", "needs bits"), ("quanto:3", "supports bits"),
     ("quanto:x", "must be an int"), ("fp8:8", "takes no bits"), ("hqq:4:groups=2", "expected one of"),
     ("hqq:4:group=a", "must be an int"), ("quanto:4:group=32:x", "too many")],
)  # fmt: skip
def test_bad_peer_specs_raise(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_peer(spec)
    with pytest.raises(TypeError):
        parse_peer(4)


@pytest.mark.parametrize(("spec", "nbits"), [("quanto:4", 4), ("quanto:2", 2), ("hqq:4", 4), ("hqq:2", 2)])
def test_group_wise_peers_hold_codes_plus_a_16_bit_scale_and_zero_per_group(spec, nbits):
    cache = filled(spec)
    group = 64  # transformers' default q_group_size
    assert cache.bits_per_value("k") == pytest.approx(nbits + 2 * 16 / group)
    assert cache.bits_per_value("v") == cache.bits_per_value("k") == cache.bits_per_value()
    assert cache.nbytes() == cache.nbytes("k") + cache.nbytes("v")


def test_residual_window_is_counted_at_16_bits():
    cache = filled("quanto:4", tokens=256)
    for layer in range(2):  # one decoded token: kept in the full-precision residual window
        cache.update(torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64), layer)
    assert cache.layers[0].keys.shape[-2] == 1
    assert cache.bits_per_value("k") == pytest.approx((256 * 4.5 + 16) / 257)


def test_fp8_peer_holds_8_bits_and_one_scale_per_layer_and_stream():
    cache = filled("fp8", tokens=256)
    values = 2 * 256 * 2 * 64  # layers x tokens x heads x head_dim
    assert cache.bits_per_value("k") == pytest.approx((values * 8 + 2 * 16) / values)


def test_held_bytes_counts_float32_as_16_bit_and_walks_containers():
    x = torch.zeros(10, dtype=torch.float32)
    assert held_bytes(x) == 20 and held_bytes(torch.zeros(10, dtype=torch.uint8)) == 10
    assert held_bytes((x, {"a": [x]}, "meta", 3)) == 40


def test_missing_backend_package_names_the_install(monkeypatch):
    monkeypatch.setattr(peers, "available", lambda backend: "pip install hqq")
    with pytest.raises(ImportError, match="pip install hqq"):
        peer_factory("hqq:4")
    with pytest.raises(TypeError):
        peer_factory(3.5)


def test_stream_must_be_k_or_v():
    with pytest.raises(ValueError, match="stream"):
        filled("quanto:2").nbytes("q")


@pytest.mark.model
def test_peer_runs_through_the_harness_on_the_same_windows(smollm2, wikitext_path):
    short = {"ctx": 64, "n_eval": 16, "windows": 1, "progress": False, "protocol": "snapshot"}  # peers: no decode
    memo: dict = {}
    ours = evaluate(smollm2, text=wikitext_path, key="int:4", value="int:4", reference_memo=memo, **short)
    peer = evaluate(smollm2, text=wikitext_path, cache_factory=peer_factory("quanto:2"), reference_memo=memo, **short)
    assert peer.ppl_ref == ours.ppl_ref
    assert peer.bits_k == peer.bits_v == pytest.approx(2.5)  # the whole 64-token prefill quantized, no residual
    assert peer.kl > 0 and peer.top1 < 1.0
    assert "quanto:2" in peer.policy["cache_factory"]
