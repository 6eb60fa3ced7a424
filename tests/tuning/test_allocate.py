"""kvpack allocate: exact knapsack, per-layer policies and their files, fp (outlier) heads, sensitivities."""

import itertools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from kvpack import CachePolicy, KVPackCache, get_codec
from kvpack.codecs.compose import PerHeadCodec
from kvpack.policy import load_policy, policy_bits, save_policy
from kvpack.tuning.allocate import (
    allocate_bits,
    choose_outlier_heads,
    head_policy_for,
    head_sensitivity,
    measure_head_sensitivity,
    measure_sensitivity,
    policy_for,
    uniform_pairs,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def tiny_llama(layers=3, kv_heads=2):
    """Random-weight GQA Llama: 4 query heads, head_dim 16."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=512,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def windows(n=1, length=60, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (length,), generator=g) for _ in range(n)]


# ---- the knapsack ------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    items=st.integers(1, 5),
    seed=st.integers(0, 10_000),
    budget=st.floats(2.25, 5.0),
)
def test_allocate_bits_is_the_brute_force_optimum(items, seed, budget):
    bits = [2.25, 2.5, 3.25, 4.5]
    s = torch.rand(items, len(bits), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    choice = allocate_bits(s, bits, budget)
    assert sum(bits[j] for j in choice.tolist()) / items <= budget + 1e-12
    best = min(
        sum(float(s[i, j]) for i, j in enumerate(c))
        for c in itertools.product(range(len(bits)), repeat=items)
        if sum(bits[j] for j in c) / items <= budget + 1e-12
    )
    assert float(s.gather(1, choice[:, None]).sum()) == pytest.approx(best, rel=1e-12)


def test_allocate_bits_spends_the_budget_where_it_pays():
    # item 0 gains a lot from more bits, item 1 nothing: a budget for one upgrade goes to item 0
    s = torch.tensor([[1.0, 0.1], [0.5, 0.5]], dtype=torch.float64)
    assert allocate_bits(s, [2.0, 4.0], 3.0).tolist() == [1, 0]
    # with equal gains, the tie goes to the cheaper total
    assert allocate_bits(torch.tensor([[1.0, 1.0]], dtype=torch.float64), [2.0, 4.0], 4.0).tolist() == [0]


def test_allocate_bits_non_dyadic_bits():
    # channel outliers give bits like 2 + 8*2/64 + 2*24/(32*64); a common denominator makes them exact
    bits = [get_codec(s, head_dim=64).bits_per_value() for s in ("int:2", "outlier_channels:2:channels=2", "e8:3")]
    s = torch.tensor([[3.0, 2.0, 1.0]] * 4, dtype=torch.float64)
    budget = (bits[1] * 3 + bits[0]) / 4
    choice = allocate_bits(s, bits, budget).tolist()
    assert sorted(choice) == [0, 1, 1, 1]


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.zeros(2, 3), [2.0, 3.0], 3.0), "bits has 2 entries"),
        ((torch.zeros(2, 2), [2.0, 3.0], 1.5), "below the cheapest"),
        ((torch.zeros(2, 2), [2.0, 3.0], float("nan")), "finite"),
        ((torch.zeros(0, 2), [2.0, 3.0], 3.0), "non-empty"),
        ((torch.zeros(2, 2), [2.0, 3.1234567891], 3.0), "rationals"),
    ],
)
def test_allocate_bits_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        allocate_bits(*args)


def test_allocate_bits_never_picks_a_nan_candidate():
    # a K-only candidate (NaN for the V item) is skipped even when it would be the best use of the budget
    s = torch.tensor([[1.0, 0.5, 0.4], [1.0, 0.2, float("nan")]], dtype=torch.float64)
    choice = allocate_bits(s, [2.0, 3.0, 4.0], 4.0).tolist()
    assert choice[1] != 2 and choice == [2, 1]
    with pytest.raises(ValueError, match="at least one finite"):
        allocate_bits(torch.tensor([[1.0, float("nan")], [float("nan")] * 2]), [2.0, 3.0], 3.0)


def test_head_policy_for_orders_items_layer_head_stream():
    # items (layer, head, stream): L0H0K L0H0V L0H1K L0H1V L1H0K ...
    choice = torch.tensor([0, 1, 1, 0, 1, 1, 0, 0])
    policy = head_policy_for(choice, ("e8:2", "int:8"), 2, 2, residual=0, sinks=1, block=1)
    assert policy.head_keys == (("e8:2", "int:8"), ("int:8", "e8:2"))
    assert policy.head_values == (("int:8", "e8:2"), ("int:8", "e8:2"))
    assert (policy.residual, policy.sinks, policy.block) == (0, 1, 1)
    assert policy_bits(policy, 64, 2, 2) == pytest.approx((2.25 + 8.5) / 2)
    with pytest.raises(ValueError, match="expected 2 \\* num_layers \\* num_kv_heads = 8"):
        head_policy_for(choice[:6], ("e8:2", "int:8"), 2, 2)


def test_measure_head_sensitivity_is_the_kl_of_the_one_head_policy():
    from kvpack.tuning.allocate import _kl_of_policies

    model, ws = tiny_llama(layers=2, kv_heads=2), windows(1, 60)
    kl = measure_head_sensitivity(model, ws, 56, ("int:2", "int:4"), ("int:2",), residual=0, sinks=1, block=1,
                                  progress=False)  # fmt: skip
    assert kl.shape == (2, 2, 2, 2) and kl.dtype == torch.float64
    assert torch.isnan(kl[:, :, 1, 1]).all() and not torch.isnan(kl[:, :, 0]).any()
    # each slot is the KL of that one head's policy (layer 1, head 0's V in int:2; layer 0, head 1's K in
    # int:4), measured on its own: the one shared prefill and reference change nothing
    one_head = [
        CachePolicy(None, None, 0, 1, block=1, window_dtype=torch.float32, head_values=(None, ("int:2", None))),
        CachePolicy(None, None, 0, 1, block=1, window_dtype=torch.float32, head_keys=((None, "int:4"),)),
    ]
    alone = _kl_of_policies(model, ws, 56, one_head, "", False)
    assert alone.tolist() == pytest.approx([float(kl[1, 0, 1, 0]), float(kl[0, 1, 0, 1])], rel=1e-9)
    assert (kl[:, :, 1, 0] > 0).all()
    with pytest.raises(ValueError, match="key_candidates or value_candidates"):
        measure_head_sensitivity(model, ws, 56, (), ())


def test_per_head_policy_file_and_saved_cache_round_trip(tmp_path):
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


def test_uniform_pairs_are_within_budget_and_undominated():
    cands = ("e8:2", "e8:3", "e8:4", "int:2:axis=channel", "int:3:axis=channel")
    pairs = uniform_pairs(cands, 64, 3.0)
    assert ("e8:3", "e8:2", 2.75) in pairs and ("e8:2", "e8:3", 2.75) in pairs
    assert ("e8:2", "e8:2", 2.25) not in pairs  # e8:3/e8:2 fits and has more bits
    assert ("int:2:axis=channel", "e8:2", 2.625) in pairs  # int:3:axis=channel (4 bits) would not fit
    assert all(m <= 3.0 for _, _, m in pairs)


# ---- per-layer policies, fp heads, files -------------------------------------------------------


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


def test_policy_errors():
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


def test_cache_with_fp_heads_holds_them_exactly_and_measures_bytes():
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


def test_policy_for_orders_items_layer_then_stream():
    policy = policy_for(torch.tensor([0, 1, 1, 0]), ("e8:2", "int:4"), 2, residual=32)
    assert policy.layer_keys == ("e8:2", "int:4") and policy.layer_values == ("int:4", "e8:2")
    assert policy.residual == 32
    with pytest.raises(ValueError, match="2 \\* num_layers"):
        policy_for(torch.tensor([0, 1]), ("e8:2",), 2)


# ---- measured sensitivities (tiny random model) -------------------------------------------------


def test_measure_sensitivity_orders_bits_and_drives_the_policy():
    model = tiny_llama()
    with torch.no_grad():  # sharper attention than random init gives, so that K errors matter too
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(3.0)
            layer.self_attn.k_proj.weight.mul_(3.0)
    cands = ("int:2", "int:4", "fp16")
    kl = measure_sensitivity(model, windows(1, 72), 56, cands, residual=8, sinks=2, progress=False)
    assert kl.shape == (3, 2, 3)
    assert (kl[..., 0] > kl[..., 1]).all()  # 2 bits hurt more than 4 bits in every layer and stream
    assert (kl[..., 2] < kl[..., 0] / 3).all()  # fp16 rounding costs much less
    # the allocated policy (predicted best) beats uniform int:4/int:2 at the same budget when re-measured
    bits = [get_codec(c, head_dim=16).bits_per_value() for c in cands[:2]]
    choice = allocate_bits(kl[..., :2].reshape(6, 2), bits, (bits[0] + bits[1]) / 2)
    assert float(kl[..., :2].reshape(6, 2).gather(1, choice[:, None]).sum()) <= float(
        kl[:, 0, 1].sum() + kl[:, 1, 0].sum()
    )


def test_choose_outlier_heads_from_measured_head_error():
    model = tiny_llama(layers=2)
    ws = windows(1, 72)
    scores = head_sensitivity(model, ws, 56, "int:2", "int:2", residual=8, sinks=2, progress=False)
    assert scores.shape == (2, 2) and (scores > 0).all()
    worst = choose_outlier_heads(scores, 1)
    best = choose_outlier_heads(-scores, 1)
    assert worst != best
    # keeping the head the measurement calls worst in 16-bit helps more than keeping the mildest one
    from kvpack.tuning.allocate import _kl_of_policies

    make = lambda heads: CachePolicy("int:2", "int:2", 8, 2, window_dtype=torch.float32, fp_heads=heads)
    kl = _kl_of_policies(model, ws, 56, [make(worst), make(best)], "", False)
    assert kl[0] < kl[1]
    assert choose_outlier_heads(torch.tensor([[0.1, 0.5], [0.3, 0.2]]), 2) == ((0, 1), (1, 0))
    with pytest.raises(ValueError, match="count"):
        choose_outlier_heads(scores, 5)
    with pytest.raises(ValueError, match="needs a key or a value"):
        head_sensitivity(model, ws, 56, None, None)


def test_per_layer_policy_with_fp_heads_persists(tmp_path):
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
    cache = kwargs["cache_factory"](tiny_llama().config)
    assert cache.policy == policy and kwargs["residual"] == 32 and kwargs["sinks"] == 2
    with pytest.raises(ValueError, match="replaces --key"):
        eval_cli._policy_kwargs(parser.parse_args(["--policy", str(path), "--key", "int:4"]))


def test_allocate_cli_needs_a_budget_or_outlier_heads():
    import argparse

    from kvpack import allocate

    parser = argparse.ArgumentParser()
    allocate.add_arguments(parser)
    for argv in ([], ["--budget", "3", "--outlier-heads", "2"]):
        with pytest.raises(ValueError, match="--budget .* or --outlier-heads"):
            allocate.run(parser.parse_args(argv))


def test_allocate_cli_per_head_from_a_saved_table(tmp_path, monkeypatch):
    import argparse

    from kvpack import allocate, models

    model = tiny_llama(layers=3, kv_heads=2)
    monkeypatch.setattr(models, "load", lambda name, **kw: (model, None))
    # K: e8:2, int:8; V: e8:2, e8:3 (a superset of what is asked is fine); layer 1 head 0's K is sensitive
    kl = torch.full((3, 2, 2, 2), 0.01, dtype=torch.float64)
    kl[:, :, :, 1] = 0.001
    kl[1, 0, 0, 0] = 1.0
    rows = kl.tolist()
    table = tmp_path / "heads.json"
    table.write_text(
        json.dumps({"key_candidates": ["e8:2", "int:8"], "value_candidates": ["e8:2", "e8:3"], "kl": rows})
    )
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
    assert (policy.residual, policy.sinks, policy.block) == (0, 1, 1)
    bad = [*argv[: argv.index("--value-candidates") + 1], "turbo_mse:1", *argv[argv.index("--sensitivity") :]]
    with pytest.raises(ValueError, match="no sensitivities for \\['turbo_mse:1'\\]"):
        allocate.run(parser.parse_args(bad))
    with pytest.raises(ValueError, match="go with --per-head"):
        allocate.run(parser.parse_args(["--budget", "3", "--held-ctx", "64"]))
    with pytest.raises(ValueError, match="--held-ctx must exceed"):
        allocate.run(parser.parse_args(["--per-head", "--budget", "3", "--held-ctx", "4", "--sinks", "4"]))
