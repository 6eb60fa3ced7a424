"""kvpack allocate: policy files, per-layer policies, fp (outlier) heads, the command line."""

import json
import logging

import pytest
import torch

from kvpack import CachePolicy, KVPackCache, get_codec
from kvpack.codecs.compose import PerHeadCodec
from kvpack.policy import load_policy, policy_bits, save_policy

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_per_head_policy_file_and_saved_cache_round_trip(tmp_path, tiny_llama, windows):
    import kvpack

    policy = CachePolicy(None, "int:4", 8, 2, block=8, head_keys=(("int:2", None), None, ("e8:3", "int:8")),
                         head_values=(None, ("int:2", "int:2")), fp_heads={2: (0,)})  # fmt: skip
    save_policy(policy, tmp_path / "p.json")
    assert load_policy(tmp_path / "p.json") == policy
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["policy"]["head_keys"] == [["int:2", None], None, ["e8:3", "int:8"]]
    doc["policy"]["head_keys"] = [["int:2"], "e8:3"]
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="bad fields.*head_keys\\[1\\]"):
        load_policy(tmp_path / "bad.json")
    model = tiny_llama()
    cache = KVPackCache(model.config, policy=policy)
    with torch.inference_mode():
        model(windows(1, 60)[0][None], past_key_values=cache)
    kvpack.save_cache(cache, tmp_path / "c.safetensors", config=model.config)
    loaded = kvpack.load_cache(tmp_path / "c.safetensors", config=model.config)
    assert loaded.policy == policy and loaded.nbytes() == cache.nbytes()
    for a, b in zip(cache.layers, loaded.layers):
        assert all(torch.equal(x, y) for x, y in zip(a.past(), b.past()))


def test_per_layer_policy_codecs_and_bits():
    policy = CachePolicy(None, None, layer_keys=("e8:2", "int:4", None), layer_values=("e8:3", None, "e8:2"))
    k, v = policy.codecs(16, 1, 3)
    assert k.spec == "int:4" and v.spec == "none"
    assert policy.codecs(16, 2, 3)[0].spec == "none"
    assert policy.held_dtype(torch.float32) == torch.float16  # it compresses something: 16-bit window
    expected = (2.25 + 3.25 + 4.5 + 16 + 16 + 2.25) / 6
    assert policy_bits(policy, 64, 3, 3) == pytest.approx(expected)
    fp = CachePolicy(None, None, layer_keys=("e8:2",) * 3, layer_values=("e8:2",) * 3, fp_heads={1: (0,)})
    assert policy_bits(fp, 64, 3, 3) == pytest.approx(2.25 + (16 - 2.25) / 9)


def test_policy_errors(tiny_llama):
    with pytest.raises(TypeError, match="layer_keys"):
        CachePolicy(layer_keys=("int:4", 3))
    with pytest.raises(ValueError, match="unknown codec"):
        CachePolicy(layer_values=("nope:3",))
    with pytest.raises(ValueError, match="fp_heads"):
        CachePolicy(fp_heads=[(0, -1)])
    with pytest.raises(TypeError, match="fp_heads"):
        CachePolicy(fp_heads=3)
    with pytest.raises(ValueError, match="layers \\[3\\]"):
        KVPackCache(tiny_llama().config, policy=CachePolicy(fp_heads={3: (0,)}))
    with pytest.raises(ValueError, match="layers \\[3\\]"):
        KVPackCache(tiny_llama().config, policy=CachePolicy(layer_keys=("int:4",) * 4))


def test_fp_heads_codec_keeps_heads_exact_and_counts_them():
    inner = get_codec("int:2", head_dim=16)
    codec = PerHeadCodec((inner, None, inner), 16)
    x = torch.randn(2, 3, 32, 16, generator=torch.Generator().manual_seed(0)).half()
    packed = codec.encode(x)
    out = codec.decode(packed)
    assert torch.equal(out[:, 1], x[:, 1])
    rest = x[:, [0, 2]]
    assert torch.equal(out[:, [0, 2]], inner.decode(inner.encode(rest.contiguous())))
    assert packed.nbytes == inner.encode(rest.contiguous()).nbytes + x[:, 1].numel() * 2
    with pytest.raises(ValueError, match="3 KV heads, the input has 4"):
        codec.encode(torch.randn(2, 4, 32, 16))


def test_cache_with_fp_heads_holds_them_exactly_and_measures_bytes(tiny_llama, windows):
    model = tiny_llama()
    ids = windows(1, 70)[0][None]
    policy = CachePolicy("int:2", "int:2", residual=16, sinks=4, block=8, fp_heads={0: (1,), 2: (0, 1)})
    plain = CachePolicy("int:2", "int:2", residual=16, sinks=4, block=8)
    caches = {p: KVPackCache(model.config, policy=p) for p in (policy, plain)}
    with torch.inference_mode():
        for cache in caches.values():
            model(ids, past_key_values=cache)
    held = caches[policy].layers[0]
    k, _ = held.past()
    exact = caches[plain].layers[0]
    packed_k = exact.key_codec.decode(exact.chunks[0].key)
    assert torch.equal(k[:, 0, 4:52], packed_k[:, 0].float())  # head 0 packed as without fp heads
    layer2 = caches[policy].layers[2]
    assert torch.equal(layer2.past()[0], layer2.past()[0].half().float())  # all heads 16-bit, none packed lossy
    per_head = 48 * 16  # packed tokens x head_dim values of one head, one stream
    int2 = get_codec("int:2", head_dim=16)
    one = int2.encode(torch.zeros(1, 1, 48, 16)).nbytes
    extra = {0: per_head * 2 - one, 1: 0, 2: 2 * (per_head * 2 - one)}
    for i in range(3):
        assert caches[policy].layers[i].stored_bytes()[0] == caches[plain].layers[i].stored_bytes()[0] + extra[i]


def test_policy_file_round_trip_and_errors(tmp_path):
    policy = CachePolicy(None, None, 64, 2, layer_keys=("e8:2", None), layer_values=("int:4", "e8:3"),
                         fp_heads={1: (0,)}, window_dtype=torch.bfloat16)  # fmt: skip
    path = tmp_path / "p.json"
    save_policy(policy, path, budget=3.0)
    assert load_policy(path) == policy
    assert json.loads(path.read_text())["budget"] == 3.0
    with pytest.raises(FileNotFoundError):
        load_policy(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_policy(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "x"}))
    with pytest.raises(ValueError, match="not a kvpack policy"):
        load_policy(tmp_path / "other.json")
    doc = json.loads(path.read_text())
    doc["policy"]["colour"] = "red"
    (tmp_path / "extra.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="unknown fields"):
        load_policy(tmp_path / "extra.json")
    with pytest.raises(TypeError, match="CachePolicy"):
        save_policy({"key": "int:4"}, path)


def test_per_layer_policy_with_fp_heads_persists(tmp_path, tiny_llama, windows):
    import kvpack

    model = tiny_llama()
    policy = CachePolicy(None, None, 8, 2, layer_keys=("int:2", "e8:3", None), layer_values=("int:4", None, "int:2"),
                         fp_heads={0: (1,)}, block=8)  # fmt: skip
    cache = KVPackCache(model.config, policy=policy)
    with torch.inference_mode():
        model(windows(1, 60)[0][None], past_key_values=cache)
    kvpack.save_cache(cache, tmp_path / "c.safetensors", config=model.config)
    loaded = kvpack.load_cache(tmp_path / "c.safetensors", config=model.config)
    assert loaded.policy == policy
    for a, b in zip(cache.layers, loaded.layers):
        assert all(torch.equal(x, y) for x, y in zip(a.past(), b.past()))


def test_eval_cli_takes_a_policy_file(tmp_path):
    import argparse

    from kvpack.evaluation import eval_cli

    path = tmp_path / "p.json"
    policy = CachePolicy(None, None, 32, 2, layer_keys=("e8:2", "int:4", None), layer_values=("e8:3",) * 3)
    save_policy(policy, path)
    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    kwargs = eval_cli._policy_kwargs(parser.parse_args(["--policy", str(path)]))
    assert kwargs == {"policy": policy}  # the whole policy, for every protocol (evaluate(policy=...))
    with pytest.raises(ValueError, match="replaces --key"):
        eval_cli._policy_kwargs(parser.parse_args(["--policy", str(path), "--key", "int:4"]))


def test_allocate_cli_needs_a_budget_or_outlier_heads():
    import argparse

    from kvpack.tuning import allocate

    parser = argparse.ArgumentParser()
    allocate.add_arguments(parser)
    for argv in ([], ["--budget", "3", "--outlier-heads", "2"]):
        with pytest.raises(ValueError, match="--budget .* or --outlier-heads"):
            allocate.run(parser.parse_args(argv))


def test_allocate_cli_per_head_from_a_saved_table(tmp_path, monkeypatch, tiny_llama):
    import argparse

    from kvpack.evaluation import models
    from kvpack.tuning import allocate

    model = tiny_llama(layers=3, kv_heads=2)
    monkeypatch.setattr(models, "load", lambda name, **kw: (model, None))
    # K: e8:2, int:8; V: e8:2, e8:3 (a superset of what is asked is fine); layer 1 head 0's K is sensitive
    kl = torch.full((3, 2, 2, 2), 0.01, dtype=torch.float64)
    kl[:, :, :, 1] = 0.001
    kl[1, 0, 0, 0] = 1.0
    rows = kl.tolist()
    table = tmp_path / "heads.json"
    saved = {"key_candidates": ["e8:2", "int:8"], "value_candidates": ["e8:2", "e8:3"], "kl": rows}
    table.write_text(json.dumps({**saved, "center_keys": True}))
    parser = argparse.ArgumentParser()
    allocate.add_arguments(parser)
    out = tmp_path / "p-{budget}.json"
    argv = ["--per-head", "--budget", "3.5", "--held-ctx", "64", "--residual", "0", "--sinks", "1", "--block", "1",
            "--candidates", "e8:2", "int:8", "--value-candidates", "e8:2", "--sensitivity", str(table),
            "--out", str(out)]  # fmt: skip
    assert allocate.run(parser.parse_args(argv)) == 0
    policy = load_policy(tmp_path / "p-3.5.json")
    # at head_dim 16, e8:2 is 3 bits and int:8 10; (3.5 * 64 - 16) / 63 = 3.30 codec bits: one int:8 item among
    # 12 would be 3.58, too much, so everything stays e8:2
    assert policy.head_keys == (("e8:2", "e8:2"),) * 3 and policy.head_values == (("e8:2", "e8:2"),) * 3
    argv[2] = "3.8"  # (3.8 * 64 - 16) / 63 = 3.61 codec bits: room for one int:8 item, layer 1 head 0's K
    assert allocate.run(parser.parse_args(argv)) == 0
    policy = load_policy(tmp_path / "p-3.8.json")
    assert policy.head_keys == (("e8:2", "e8:2"), ("int:8", "e8:2"), ("e8:2", "e8:2"))
    assert (policy.residual, policy.sinks, policy.block, policy.center_keys) == (0, 1, 1, True)
    table.write_text(json.dumps(saved))  # written before centering: measured on keys as they are
    with pytest.raises(ValueError, match="measured with center_keys=False, not --center-keys True"):
        allocate.run(parser.parse_args(argv))
    assert allocate.run(parser.parse_args([*argv, "--no-center-keys"])) == 0
    assert not load_policy(tmp_path / "p-3.8.json").center_keys
    table.write_text(json.dumps({**saved, "center_keys": True, "block": 16}))
    with pytest.raises(ValueError, match="measured with block=16, not --block 1"):
        allocate.run(parser.parse_args(argv))
    bad = [*argv[: argv.index("--value-candidates") + 1], "turbo_mse:1", *argv[argv.index("--sensitivity") :]]
    with pytest.raises(ValueError, match="no sensitivities for \\['turbo_mse:1'\\]"):
        allocate.run(parser.parse_args(bad))
    with pytest.raises(ValueError, match="goes with --per-head"):
        allocate.run(parser.parse_args(["--budget", "3", "--held-ctx", "64"]))
    with pytest.raises(ValueError, match="--held-ctx must exceed"):
        allocate.run(parser.parse_args(["--per-head", "--budget", "3", "--held-ctx", "4", "--sinks", "4"]))


def test_default_candidates_are_codecs_the_paged_kernels_read():
    import argparse

    from kvpack.kernels.paged import paged_codec
    from kvpack.tuning import allocate, recipe

    parser = argparse.ArgumentParser()
    allocate.add_arguments(parser)
    args = parser.parse_args([])
    keys, values = allocate.stream_candidates(args.candidates, args.value_candidates, 64)
    assert (keys, values) == (recipe.KEY_CANDIDATES, recipe.VALUE_CANDIDATES)
    assert set(keys + values) == set(allocate.DEFAULT_CANDIDATES) == set(recipe.CANDIDATES)
    assert allocate.stream_candidates(["int:8", "e8:2"], None, 64) == (("int:8", "e8:2"), ("int:8", "e8:2"))
    assert allocate.stream_candidates(["int:8"], ["e8:2"], 64) == (("int:8",), ("e8:2",))
    keys96, values96 = allocate.stream_candidates(None, None, 96)  # no Hadamard at head_dim 96: Haar instead
    assert keys96 == recipe.candidates_for(96, recipe.KEY_CANDIDATES) and "int:4:rotation=haar" in keys96
    assert all("hadamard" not in s for s in keys96 + values96)
    for head_dim in (64, 128):
        assert allocate.unpaged_specs(allocate.DEFAULT_CANDIDATES, head_dim) == {}
        for spec in allocate.DEFAULT_CANDIDATES:
            assert paged_codec(get_codec(spec, head_dim=head_dim)).bits == get_codec(spec, head_dim=head_dim).bits
    unpaged = allocate.unpaged_specs(("e8:2", "turbo_mse:3", "int:3:axis=channel", "e8:2"), 64)
    assert list(unpaged) == ["e8:2", "int:3:axis=channel"]
    assert "axis=token" in unpaged["int:3:axis=channel"]


def test_allocate_with_an_unpaged_candidate_says_so_once_and_still_allocates(tmp_path, monkeypatch, caplog):
    import argparse
    from types import SimpleNamespace

    from transformers import LlamaConfig

    from kvpack.evaluation import models
    from kvpack.tuning import allocate

    config = LlamaConfig(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2)  # hd 64
    monkeypatch.setattr(models, "load", lambda name, **kw: (SimpleNamespace(config=config), None))
    parser = argparse.ArgumentParser()
    allocate.add_arguments(parser)

    def run(candidates, kl):
        table = tmp_path / f"{len(candidates)}.json"
        table.write_text(json.dumps({"candidates": candidates, "kl": kl, "center_keys": True}))
        argv = ["--budget", "2.5", "--candidates", *candidates, "--sensitivity", str(table),
                "--out", str(tmp_path / f"p{len(candidates)}.json")]  # fmt: skip
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kvpack.tuning.allocate"):
            assert allocate.run(parser.parse_args(argv)) == 0
        return load_policy(tmp_path / f"p{len(candidates)}.json"), [r.getMessage() for r in caplog.records]

    # e8:2 is the least sensitive codec: the knapsack takes it and the run says the result is not paged
    policy, messages = run(["turbo_mse:2", "e8:2"], [[[0.01, 0.001]] * 2] * 2)
    assert set(policy.layer_keys + policy.layer_values) == {"e8:2"}
    assert len(messages) == 1 and messages[0].startswith("candidates e8:2 are not read by the paged decode kernels")
    policy, messages = run(["turbo_mse:2", "turbo_mse:3"], [[[0.01, 0.001]] * 2] * 2)
    assert set(policy.layer_keys + policy.layer_values) <= {"turbo_mse:2", "turbo_mse:3"} and messages == []


def test_allocate_measures_centered_keys_and_evaluates_on_the_decode_protocol(tmp_path, monkeypatch):
    import argparse

    from transformers import LlamaConfig, LlamaForCausalLM

    from kvpack.evaluation import models
    from kvpack.tuning import allocate

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048)  # head_dim 64
    model = LlamaForCausalLM(config).eval()

    def tokenizer(text, add_special_tokens=False, verbose=False):  # one id per character
        return {"input_ids": [3 + ord(c) % 90 for c in text]}

    monkeypatch.setattr(models, "load", lambda name, **kw: (model, tokenizer))
    parser = argparse.ArgumentParser()
    allocate.add_arguments(parser)
    table, results = tmp_path / "kl.json", tmp_path / "rows.json"
    argv = ["--budget", "3", "--calib-windows", "1", "--calib-ctx", "48", "--calib-n", "8", "--residual", "8",
            "--sinks", "1", "--candidates", "int:2", "int:4", "--sensitivity", str(table), "--out",
            str(tmp_path / "p-{budget}.json"), "--evaluate-windows", "1", "--uniform", "1", "--results", str(results),
            "--no-progress"]  # fmt: skip
    assert allocate.run(parser.parse_args(argv)) == 0
    saved = json.loads(table.read_text())
    assert (saved["center_keys"], saved["residual"], saved["sinks"], saved["block"]) == (True, 8, 1, None)
    policy = load_policy(tmp_path / "p-3.json")
    assert policy.center_keys and (policy.residual, policy.sinks) == (8, 1)
    rows = json.loads(results.read_text())
    assert rows[0]["policy"] == "allocated" and len(rows) == 2 and {r["protocol"] for r in rows} == {"decode"}
    assert all(r["kl"] > 0 for r in rows)
    plain = [*argv[: argv.index("--sensitivity")], "--no-center-keys", "--protocol", "snapshot"]
    assert allocate.run(parser.parse_args([*plain, "--out", str(tmp_path / "q-{budget}.json")])) == 0
    assert not load_policy(tmp_path / "q-3.json").center_keys
