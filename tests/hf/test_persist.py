"""Saving and loading a packed KVPackCache: bit-identical reload, clear errors for bad files."""

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from transformers import LlamaConfig

from kvpack.hf.cache import KVPackCache
from kvpack.hf.persist import _digest, load_cache, save_cache
from kvpack.policy import CachePolicy

POLICY = CachePolicy("int:4", "int:2", residual=16, sinks=4, skip_layers=(1,), block=32)


def toy_config(layers=3, kv_heads=2):
    return LlamaConfig(num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=kv_heads, hidden_size=256)


def filled_cache(config=None, policy=POLICY, tokens=(90, 1, 40)):
    config = config or toy_config()
    cache = KVPackCache(config=config, policy=policy)
    g = torch.Generator().manual_seed(0)
    for n in tokens:  # a prefill, a decode step, another chunk: several packed chunks per layer
        for layer in cache.layers:
            kv = torch.randn(2, 2, n, 64, generator=g, dtype=torch.float32).to(torch.bfloat16)
            layer.update(kv, kv * 0.5 + 1)
    return cache


def same_state(a, b):
    for la, lb in zip(a.layers, b.layers):
        assert la.cumulative_length == lb.cumulative_length and len(la.chunks) == len(lb.chunks)
        for ca, cb in zip(la.chunks, lb.chunks):
            for pa, pb in ((ca.key, cb.key), (ca.value, cb.value)):
                assert pa.codec == pb.codec and pa.shape == pb.shape and pa.dtype == pb.dtype
                assert all(torch.equal(pa.data[k], pb.data[k]) for k in pa.data) and pa.data.keys() == pb.data.keys()
        ka, va = la.past()
        kb, vb = lb.past()
        assert torch.equal(ka, kb) and torch.equal(va, vb)


def test_round_trip_bit_identical(tmp_path):
    config = toy_config()
    cache = filled_cache(config)
    assert cache.layers[0].chunks and cache.layers[1].chunks  # packed (0) and identity-skipped (1) layers
    save_cache(cache, tmp_path / "c.safetensors", config=config, model_id="toy")
    loaded = load_cache(tmp_path / "c.safetensors", config=config, model_id="toy", policy=POLICY)
    same_state(cache, loaded)
    assert loaded.nbytes() == cache.nbytes() and loaded.policy == POLICY
    kv = torch.ones(2, 2, 1, 64, dtype=torch.bfloat16)  # both go on identically
    for la, lb in zip(cache.layers, loaded.layers):
        assert all(torch.equal(x, y) for x, y in zip(la.update(kv, kv), lb.update(kv, kv)))


def test_beam_order_and_empty_layers(tmp_path):
    config = toy_config()
    cache = filled_cache(config)
    cache.layers[0].reorder_cache(torch.tensor([1, 0]))
    empty = KVPackCache(config=config, policy=POLICY)
    save_cache(cache, tmp_path / "a.safetensors", config=config)
    save_cache(empty, tmp_path / "b.safetensors", config=config)
    same_state(cache, load_cache(tmp_path / "a.safetensors", config=config))
    assert load_cache(tmp_path / "b.safetensors", config=config).get_seq_length() == 0


def test_corrupt_and_truncated(tmp_path):
    config = toy_config()
    path = tmp_path / "c.safetensors"
    save_cache(filled_cache(config), path, config=config)
    raw = path.read_bytes()
    (tmp_path / "trunc").write_bytes(raw[: len(raw) - 100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_cache(tmp_path / "trunc", config=config)
    (tmp_path / "junk").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_cache(tmp_path / "junk", config=config)
    flipped = bytearray(raw)
    flipped[-5] ^= 0x10  # a bit of tensor data
    (tmp_path / "flip").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="checksum"):
        load_cache(tmp_path / "flip", config=config)
    with pytest.raises(TypeError, match="config"):
        load_cache(path, config=None)
    with pytest.raises(FileNotFoundError, match="no saved cache"):
        load_cache(tmp_path / "missing", config=config)


def rewrite_header(src, dst, change):
    """Same tensors, header edited by ``change`` (a dict -> None)."""
    raw = src.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    meta = json.loads(raw[8 : 8 + n])
    header = json.loads(meta["__metadata__"]["kvpack"])
    change(header)
    meta["__metadata__"]["kvpack"] = json.dumps(header)
    new = json.dumps(meta).encode()
    new += b" " * (-len(new) % 8)
    dst.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def test_mismatches(tmp_path):
    config = toy_config()
    path = tmp_path / "c.safetensors"
    save_cache(filled_cache(config), path, config=config, model_id="toy")
    with pytest.raises(ValueError, match="another model: num_layers"):
        load_cache(path, config=toy_config(layers=4))
    with pytest.raises(ValueError, match="another model: num_kv_heads"):
        load_cache(path, config=toy_config(kv_heads=4))
    with pytest.raises(ValueError, match="of model 'toy', not 'other'"):
        load_cache(path, config=config, model_id="other")
    with pytest.raises(ValueError, match="saved under policy"):
        load_cache(path, config=config, policy=CachePolicy("int:4", "int:4", residual=16, sinks=4, skip_layers=(1,)))

    def version(h):
        h["version"] = 99

    def codec(h):
        h["layers"][0]["chunks"][0]["key"]["codec"] = "int:3"

    def not_kvpack(h):
        h["format"] = "something-else"

    for change, match in ((version, "format version 99"), (codec, "checksum"), (not_kvpack, "format")):
        rewrite_header(path, tmp_path / "x", change)
        with pytest.raises(ValueError, match=match):
            load_cache(tmp_path / "x", config=config)


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="KVPackCache"):
        save_cache({}, tmp_path / "x", config=toy_config())
    with pytest.raises(TypeError, match="config"):
        save_cache(filled_cache(), tmp_path / "x")
    save_cache(filled_cache(), tmp_path / "c", config=toy_config())
    with pytest.raises(ValueError, match="device must name a torch device"):
        load_cache(tmp_path / "c", config=toy_config(), device="nowhere")


@pytest.mark.model
def test_real_model_continues_identically(smollm2, tmp_path, wikitext_path):
    """A prompt's cache saved and loaded: the next tokens' logits equal those of the original cache exactly."""
    model, tok = smollm2
    ids = tok(wikitext_path.read_text()[:3000], return_tensors="pt").input_ids[:, :200]
    policy = CachePolicy("int:4", "int:2", residual=32, sinks=4)
    cache = KVPackCache(config=model.config, policy=policy)
    with torch.no_grad():
        model(ids[:, :180], past_key_values=cache, use_cache=True)
        save_cache(cache, tmp_path / "p.safetensors", config=model.config, model_id="smollm2")
        loaded = load_cache(tmp_path / "p.safetensors", config=model.config, model_id="smollm2", policy=policy)
        a = model(ids[:, 180:], past_key_values=cache, use_cache=True).logits
        b = model(ids[:, 180:], past_key_values=loaded, use_cache=True).logits
    assert torch.equal(a, b)


def test_checksum_covers_the_header_and_no_temp_file_is_left(tmp_path):
    config = toy_config()
    path = tmp_path / "c.safetensors"
    (tmp_path / ".c.safetensors.kvpack-tmp").write_bytes(b"left by a killed save")
    save_cache(filled_cache(config), path, config=config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]

    def drop_chunks(h):
        h["layers"][0]["chunks"] = []

    def move_positions(h):
        h["layers"][0]["cumulative_length"] += 7

    for change in (drop_chunks, move_positions):
        rewrite_header(path, tmp_path / "x", change)
        with pytest.raises(ValueError, match="checksum"):
            load_cache(tmp_path / "x", config=config)


# ---- header edits that are re-checksummed, corrupt bytes, every policy savable ------------------------------


def mixed_config():
    """A full, a sliding and a full layer: chunk starts of both kinds of layer are checked."""
    return LlamaConfig(
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_size=256,
        layer_types=["full_attention", "sliding_attention", "full_attention"],
        sliding_window=48,
    )


def read_header(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(json.loads(raw[8 : 8 + n])["__metadata__"]["kvpack"])


def rechecksummed(change, path):
    """``change`` applied to the header, then the checksum recomputed: only the field checks can refuse it."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118

    def apply(h):
        change(h)
        h["sha256"] = _digest(tensors, h)

    return apply


FIXTURE_POLICIES = [
    CachePolicy("int:4", "int:2", residual=16, sinks=4, skip_layers=(2,), block=16),
    # pre-RoPE keys, a 16-bit window, a per-head layer and a kept head: the other code paths of a layer
    CachePolicy(
        "int:4",
        "int:2",
        residual=16,
        sinks=4,
        block=32,
        window_dtype=torch.bfloat16,
        pre_rope_keys=True,
        head_keys=(("int:2", None),),
        fp_heads=((2, 1),),
    ),
]


def save_fixture(tmp_path_factory, policy):
    config = mixed_config()
    cache = filled_cache(config, policy)
    cache.layers[0].reorder_cache(torch.tensor([1, 0]))  # a beam order on layer 0's chunks
    path = tmp_path_factory.mktemp("saved") / "c.safetensors"
    save_cache(cache, path, config=config)
    return config, cache, path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_fixture(tmp_path_factory, FIXTURE_POLICIES[0])


@pytest.fixture(scope="module", params=range(len(FIXTURE_POLICIES)))
def any_saved(tmp_path_factory, request):
    return save_fixture(tmp_path_factory, FIXTURE_POLICIES[request.param])


def leaves(obj, at=()):
    """Every path into the header (containers too), but not the checksum itself."""
    yield at
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        if at + (k,) != ("sha256",):
            yield from leaves(v, at + (k,))


MUTATIONS = [
    lambda v: v + 1 if isinstance(v, int) and not isinstance(v, bool) else "x",
    lambda v: v - 1 if isinstance(v, int) and not isinstance(v, bool) else None,
    lambda v: -v if isinstance(v, int) else [],
    lambda v: not v if isinstance(v, bool) else {},
    lambda v: v[:-1] if isinstance(v, (list, str)) else 2**40,
    lambda v: v + v if isinstance(v, (list, str)) else "int:3",
    lambda v: {k: x for k, x in list(v.items())[1:]} if isinstance(v, dict) else [[[[[[v]]]]]],
    lambda v: {**v, "extra": 1} if isinstance(v, dict) else 1.5,
]


def same_or_refused(path, config, original):
    """A load either refuses with ValueError or gives the original's state (an edit that changes nothing)."""
    try:
        loaded = load_cache(path, config=config)
    except ValueError:
        return
    same_state(original, loaded)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_edited_header_is_refused_even_rechecksummed(any_saved, tmp_path, data):
    """Any field (drawn by name, so rare fields come up as often as chunk fields) under every mutation."""
    config, cache, path = any_saved
    header = read_header(path)
    by_name = {}
    for p in leaves(header):
        if p:
            by_name.setdefault(".".join(str(k) for k in p if not isinstance(k, int)), []).append(p)
    where = data.draw(st.sampled_from(by_name[data.draw(st.sampled_from(sorted(by_name)))]))
    for mutate in MUTATIONS:

        def change(h, mutate=mutate):
            node = h
            for k in where[:-1]:
                node = node[k]
            node[where[-1]] = mutate(node[where[-1]])

        rewrite_header(path, tmp_path / "x", rechecksummed(change, path))
        same_or_refused(tmp_path / "x", config, cache)
    rewrite_header(path, tmp_path / "x", change)  # not re-checksummed: the checksum refuses it
    same_or_refused(tmp_path / "x", config, cache)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda h: h["layers"][0].update(chunks=[]), "packed tokens start at 100"),
        (lambda h: h["layers"][0].update(cumulative_length=h["layers"][0]["cumulative_length"] + 7), "cumulative"),
        (lambda h: h["layers"][2]["chunks"][0].update(start=5), "start"),
        (lambda h: h["layers"][0]["chunks"][0]["key"]["shape"].__setitem__(-1, 32), "shape"),
        (lambda h: h["layers"][0]["chunks"][0]["key"].update(codec="int:3"), "policy gives"),
        (lambda h: h["policy"].update(sinks=2), "sink"),
        (lambda h: h["policy"].update(key="int:2"), "policy gives"),
        (lambda h: h["layers"][0].pop("dtype"), r"layers\[0\].*missing fields \['dtype'\]"),
        (lambda h: h["layers"][0].update(chunks={"a": 1}), r"layers\[0\].chunks must be list"),
        (lambda h: h["layers"].append({"initialized": True}), r"layers\[3\]: missing"),
        (lambda h: h["policy"].update(layer_keys=[[[[[[["int:4"]]]]]]]), "nests deeper"),
        (lambda h: h.update(model=None), "header.model must be dict"),
        (lambda h: h["layers"][0]["chunks"][0].update(order=False), "does not describe"),
        (lambda h: h["layers"][1].update(initialized=False), r"layers\[1\]: .*unknown fields \['chunks'"),
    ],
)
def test_inconsistent_header_named(saved, tmp_path, change, match):
    config, _, path = saved
    rewrite_header(path, tmp_path / "x", rechecksummed(change, path))
    with pytest.raises(ValueError, match=match):
        load_cache(tmp_path / "x", config=config)


def test_deeply_nested_header_is_a_value_error(saved, tmp_path):
    config, _, path = saved
    rewrite_header(path, tmp_path / "x", lambda h: h["policy"].update(key=[[[[[[[[[]]]]]]]]]))
    with pytest.raises(ValueError, match="nests deeper"):
        load_cache(tmp_path / "x", config=config)
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    meta = json.loads(raw[8 : 8 + n])
    meta["__metadata__"]["kvpack"] = "[" * 100_000 + "]" * 100_000
    new = json.dumps(meta).encode()
    new += b" " * (-len(new) % 8)
    (tmp_path / "deep").write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])
    with pytest.raises(ValueError):
        load_cache(tmp_path / "deep", config=config)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.integers(0, 10**9), bit=st.integers(0, 7), truncate=st.booleans())
def test_fuzz_flipped_or_truncated_bytes_are_refused(any_saved, tmp_path, offset, bit, truncate):
    config, _, path = any_saved
    raw = bytearray(path.read_bytes())
    offset %= len(raw)
    if truncate:
        raw = raw[:offset]
    else:
        raw[offset] ^= 1 << bit
    (tmp_path / "x").write_bytes(bytes(raw))
    with pytest.raises(ValueError):
        load_cache(tmp_path / "x", config=config)


@pytest.mark.parametrize(
    "policy",
    [
        CachePolicy("int:4", "int:2", residual=16, sinks=4, block=32, window_dtype=torch.float32),
        CachePolicy("int:4", None, residual=16, sinks=4, block=32, window_dtype=torch.bfloat16, pre_rope_keys=True),
        CachePolicy("int:4", "int:2", residual=16, sinks=4, block=32, head_keys=(("int:2", None),), fp_heads=((2, 1),)),
        CachePolicy("int:4", "int:2", residual=16, sinks=4, block=32, center_keys=True),
    ],
)
def test_every_policy_saves_and_loads(tmp_path, policy):
    config = mixed_config()
    cache = filled_cache(config, policy)
    save_cache(cache, tmp_path / "p.safetensors", config=config)
    loaded = load_cache(tmp_path / "p.safetensors", config=config, policy=policy)
    assert loaded.policy == policy
    same_state(cache, loaded)


def test_paths_configs_and_devices_named(tmp_path):
    """A None/int path, a missing folder, a model or dict as config and device='meta' raised TypeError from pathlib,
    SafetensorError, AttributeError or RuntimeError; each is now named."""
    cache = filled_cache()
    config = toy_config()
    for path in (None, 3):
        with pytest.raises(TypeError, match="path must be"):
            save_cache(cache, path, config=config)
        with pytest.raises(TypeError, match="path must be"):
            load_cache(path, config=config)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_cache(cache, tmp_path / "missing" / "c.safetensors", config=config)
    for bad in ({}, torch.nn.Linear(2, 2)):
        with pytest.raises(TypeError, match="config"):
            save_cache(cache, tmp_path / "c.safetensors", config=bad)
    save_cache(cache, tmp_path / "c.safetensors", config=config)
    with pytest.raises(ValueError, match="meta"):
        load_cache(tmp_path / "c.safetensors", config=config, device="meta")


def test_key_reference_flag_must_match_the_policy(tmp_path):
    config = mixed_config()
    centered = CachePolicy("int:4", "int:2", residual=16, sinks=4, block=32, center_keys=True)
    for policy, flag, match in ((centered, False, "no key_reference"), (POLICY, True, "keys as they are")):
        path = tmp_path / f"{flag}.safetensors"
        save_cache(filled_cache(config, policy), path, config=config)

        def change(h, flag=flag):
            h["layers"][0]["key_reference"] = flag

        rewrite_header(path, tmp_path / "x", rechecksummed(change, path))
        with pytest.raises(ValueError, match=match):
            load_cache(tmp_path / "x", config=config)
