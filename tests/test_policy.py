"""CachePolicy per-KV-head specs (``head_keys``/``head_values``) and `PerHeadCodec`."""

import dataclasses
import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig

from kvpack import CachePolicy, KVPackCache, get_codec
from kvpack.codecs.compose import IdentityCodec, PerHeadCodec
from kvpack.policy import POLICY_FORMAT, load_policy, policy_to_dict, save_policy


def _x(heads=3, tokens=8, dtype=torch.float32):
    return torch.randn(2, heads, tokens, 16, generator=torch.Generator().manual_seed(0)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_head_codec_matches_each_heads_own_codec_and_counts_its_bytes(dtype):
    specs = ("int:2", None, "e8:3", "int:2")
    codecs = tuple(None if s is None else get_codec(s, head_dim=16) for s in specs)
    codec = PerHeadCodec(codecs, 16)
    x = _x(4, 8, dtype)
    packed = codec.encode(x)
    out = codec.decode(packed)
    assert out.dtype == dtype and out.shape == x.shape
    fp_dtype = torch.float16 if dtype == torch.float32 else dtype
    assert torch.equal(out[:, 1], x[:, 1].to(fp_dtype).to(dtype))  # the None head: 16-bit
    nbytes = x[:, 1].numel() * 2
    for h in (0, 2, 3):
        own = codecs[h].encode(x[:, h : h + 1].contiguous())
        assert torch.equal(out[:, h : h + 1], codecs[h].decode(own).to(dtype))  # per-vector: as if alone
        nbytes += own.nbytes
    assert packed.nbytes == nbytes
    assert codec.bits_per_value() == 8 * nbytes / x.numel()  # the declared bits are the bytes held
    assert codec.spec == "heads[int:2|fp16|e8:3|int:2]"
    assert codec.block_tokens == 1
    channel = PerHeadCodec((get_codec("int:2:axis=channel", head_dim=16), None), 16)
    assert channel.block_tokens == 32  # the least common multiple of the heads' codecs


def test_per_head_codec_errors():
    int2 = get_codec("int:2", head_dim=16)
    codec = PerHeadCodec((int2, None), 16)
    with pytest.raises(ValueError, match="2 KV heads, the input has 3"):
        codec.encode(_x(3))
    with pytest.raises(ValueError, match="kv_heads, tokens, head_dim"):
        codec.encode(torch.zeros(4, 16))
    with pytest.raises(ValueError, match="not by"):
        codec.decode(PerHeadCodec((int2, int2), 16).encode(_x(2)))
    with pytest.raises(TypeError, match="Packed"):
        codec.decode(torch.zeros(2))
    with pytest.raises(ValueError, match="at least one"):
        PerHeadCodec((), 16)
    with pytest.raises(ValueError, match="head_dim=16"):
        PerHeadCodec((get_codec("int:2", head_dim=32),), 16)


def test_policy_builds_per_head_codecs_with_fp_heads_on_top():
    policy = CachePolicy(
        "int:4", "int:4", head_keys=(None, ("e8:2", "int:8", None)), head_values=(("e8:3", "e8:3", "e8:4"),),
        fp_heads={1: (0,)}, skip_layers=(2,),
    )  # fmt: skip
    k0, v0 = policy.codecs(16, 0, 3)
    assert k0.spec == "int:4" and v0.spec == "heads[e8:3|e8:3|e8:4]"
    k1, v1 = policy.codecs(16, 1, 3)
    assert k1.spec == "heads[fp16|int:8|fp16]"  # fp_heads 16-bit over the per-head spec
    assert v1.spec == "heads[fp16|int:4|int:4]"  # no per-head V spec in layer 1: the layer spec, head 0 in 16-bit
    assert all(isinstance(c, IdentityCodec) for c in policy.codecs(16, 2, 3))
    with pytest.raises(ValueError, match="num_kv_heads"):
        policy.codecs(16, 1)
    assert policy.held_specs(1, 3) == ((None, "int:8", None), (None, "int:4", "int:4"))
    assert policy.held_specs(2, 3) == ((None,) * 3, (None,) * 3)
    assert policy.num_layers_named() == 2
    # JSON lists normalize to tuples: equal policies
    assert CachePolicy(head_keys=[None, ["e8:2", None]]) == CachePolicy(head_keys=(None, ("e8:2", None)))
    assert CachePolicy(None, None, head_keys=(("e8:2", None),)).compresses_anything()
    assert not CachePolicy(None, None, head_keys=((None, None),)).compresses_anything()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [({"head_keys": "e8:2"}, TypeError, "head_keys must be a sequence"),
     ({"head_values": 3}, TypeError, "head_values must be a sequence"),
     ({"head_keys": ["e8:2"]}, TypeError, r"head_keys\[0\] must be None or a sequence"),
     ({"head_keys": [()]}, ValueError, r"head_keys\[0\] must name at least one"),
     ({"head_values": [None, ("e8:2", 3)]}, TypeError, r"head_values\[1\] must hold codec spec strings"),
     ({"head_keys": [("nope:3",)]}, ValueError, "unknown codec"),
     ({"head_keys": [("e8:2", "e8:2")], "fp_heads": {0: (2,)}}, ValueError, "fp_heads .* out of range")],
)  # fmt: skip
def test_policy_rejects_bad_head_specs(kwargs, error, match):
    with pytest.raises(error, match=match):
        CachePolicy(**kwargs)


def test_held_specs_needs_one_spec_per_kv_head():
    with pytest.raises(ValueError, match="2 per-head specs for 3 KV heads"):
        CachePolicy(head_keys=[("e8:2", "e8:3")]).held_specs(0, 3)


def test_cache_checks_head_specs_against_the_model():
    config = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64)
    with pytest.raises(ValueError, match=r"head_keys/head_values of layers \[1\] need 2 specs"):
        KVPackCache(config, policy=CachePolicy(head_values=(None, ("e8:2",) * 3)))
    with pytest.raises(ValueError, match=r"name layers \[2\]"):
        KVPackCache(config, policy=CachePolicy(head_keys=(None, None, ("e8:2", "e8:2"))))


def test_cache_under_per_head_specs_holds_what_each_head_codec_gives():
    config = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64)
    policy = CachePolicy(
        "int:4", "int:4", residual=0, sinks=1, block=1, head_keys=(("int:2", None), ("int:8", "int:2"))
    )  # fmt: skip
    cache = KVPackCache(config, policy=policy)
    k, v = torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    cache.layers[0].update(k, v)
    keys, values = cache.layers[0].past()
    int2 = get_codec("int:2", head_dim=16)
    expected = int2.decode(int2.encode(k[:, :1, 1:].half().contiguous())).float()
    assert torch.equal(keys[:, :1, 1:], expected)
    assert torch.equal(keys[:, 1], k[:, 1].half().float())  # head 1 of layer 0: 16-bit
    int4 = get_codec("int:4", head_dim=16)
    assert torch.equal(values[:, :, 1:], int4.decode(int4.encode(v[:, :, 1:].half().contiguous())).float())
    k_bytes = cache.layers[0].stored_bytes()[0]
    assert k_bytes == 2 * 16 * 2 + int2.encode(k[:, :1, 1:].half().contiguous()).nbytes + 8 * 16 * 2


# ---- fuzzed policy files: only ValueError/TypeError -------------------------------------------------------

_FIELDS = [f.name for f in dataclasses.fields(CachePolicy)]
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["int:4", "e8:3", "fp16", "float16", "bfloat16", "float8_e4m3fn", "Tensor", "", "int:x", "heads"]),
    st.text(max_size=8),
)
_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4), max_leaves=12)  # fmt: skip


def _write(doc) -> Path:
    path = Path(tempfile.mkdtemp()) / "p.json"
    path.write_text(json.dumps(doc))
    return path


@settings(max_examples=50, deadline=None)
@given(
    fields=st.dictionaries(st.sampled_from(_FIELDS), _JSON, max_size=5),
    extra=st.dictionaries(st.text(max_size=5), _SCALARS, max_size=1),
    doc=st.one_of(st.none(), _JSON),
)
def test_fuzz_policy_files_fail_only_with_value_or_type_error(fields, extra, doc):
    for content in ({"format": POLICY_FORMAT, "version": 1, "policy": {**fields, **extra}}, doc):
        path = _write(content)
        try:
            policy = load_policy(path)
        except (ValueError, TypeError):
            continue
        assert isinstance(policy, CachePolicy)
        save_policy(policy, path)  # whatever loads also saves and loads back equal
        assert load_policy(path) == policy and policy_to_dict(load_policy(path)) == policy_to_dict(policy)


def test_window_dtype_policy_file_round_trips(tmp_path):
    policy = CachePolicy("int:4", "int:2", window_dtype=torch.bfloat16, head_keys=(("int:2", None),))
    save_policy(policy, tmp_path / "p.json")
    assert load_policy(tmp_path / "p.json") == policy
    with pytest.raises(FileNotFoundError):
        load_policy(tmp_path / "missing.json")


def test_deeply_nested_policy_file_is_a_value_error(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(
        '{"format": "kvpack-policy", "version": 1, "policy": {"layer_keys": ' + "[" * 10**5 + "]" * 10**5 + "}}"
    )
    with pytest.raises(ValueError):
        load_policy(path)


def test_policy_file_paths_and_info_named(tmp_path):
    """An int of 5000 digits (json's ValueError), a None path and a tensor in info escaped from json/pathlib."""
    path = tmp_path / "p.json"
    path.write_text('{"format": "kvpack-policy", "version": 1, "policy": {"residual": ' + "9" * 5000 + "}}")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_policy(path)
    with pytest.raises(TypeError, match="path must be"):
        load_policy(None)
    with pytest.raises(TypeError, match="JSON values"):
        save_policy(CachePolicy(), path, note=torch.zeros(1))
    with pytest.raises(ValueError, match="policy file's own fields"):
        save_policy(CachePolicy(), path, format="other")
    save_policy(CachePolicy(key="int:4"), path, budget=3.5)
    assert load_policy(path) == CachePolicy(key="int:4")
