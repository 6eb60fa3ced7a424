"""`kvpack memory`: cache bytes per token, totals and the longest context that fits."""

import json

import pytest
import torch

from kvpack.cli import main
from kvpack.policy import CachePolicy
from kvpack.tuning.memory import ModelShape, cache_bytes, max_context, model_shape, parse_bytes, parse_pair


def test_known_models():
    llama = model_shape("llama-3-8b")
    assert (llama.num_layers, llama.num_kv_heads, llama.head_dim) == (32, 8, 128)
    assert llama.weight_bytes == pytest.approx(16.06e9, rel=0.002)  # 8.03 B parameters in bf16
    smol = model_shape("smollm2")
    assert (smol.num_layers, smol.num_kv_heads, smol.head_dim) == (30, 3, 64)
    assert smol.weight_bytes == pytest.approx(2 * 134.5e6, rel=0.005)


def test_fp16_bytes_per_token_and_policy_parts():
    llama = model_shape("llama-3-8b")
    fp16 = CachePolicy("fp16", "fp16", residual=0, sinks=0)
    assert cache_bytes(llama, fp16, 1) == 32 * 8 * 128 * 2 * 2  # 128 KiB per token
    shape = ModelShape("toy", num_layers=4, num_kv_heads=2, head_dim=64, weight_bytes=0)
    fp8 = CachePolicy("fp8", "fp8", residual=8, sinks=2, skip_layers=(0,))
    fp_tok = 4 * 2 * 64 * 2 * 2
    packed_tok = 1 * 2 * 64 * 2 * 2 + 3 * 2 * 64 * 2 * (8 + 16 / 64) / 8  # skipped layer stays fp16
    assert cache_bytes(shape, fp8, 5) == 5 * fp_tok  # all within sinks + residual
    assert cache_bytes(shape, fp8, 100, batch=3) == pytest.approx(3 * (10 * fp_tok + 90 * packed_tok))


@pytest.mark.parametrize("spec", ["fp16", "fp8", "int:2"])
@pytest.mark.parametrize("batch", [1, 4])
def test_max_context_is_the_largest_that_fits(spec, batch):
    if spec.startswith("int") and "int" not in __import__("kvpack").list_codecs():
        pytest.skip("int codec not registered yet")
    llama = model_shape("llama-3-8b")
    policy = CachePolicy(spec, spec)
    gpu = parse_bytes("80GB")
    n = max_context(llama, policy, gpu, batch)
    assert n > 0
    assert llama.weight_bytes + cache_bytes(llama, policy, n, batch) <= gpu
    assert llama.weight_bytes + cache_bytes(llama, policy, n + 1, batch) > gpu
    assert max_context(llama, policy, parse_bytes("16GB"), batch) == 0  # weights alone do not fit


def test_parse_bytes():
    assert parse_bytes("80GB") == 80e9
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("512 MB") == 512e6
    assert parse_bytes("24") == 24e9
    with pytest.raises(ValueError, match="must look like"):
        parse_bytes("80XB")
    with pytest.raises(ValueError, match="must look like"):
        parse_bytes("lots")


def test_config_json_path(tmp_path):
    cfg = {
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_size": 256,
        "intermediate_size": 512,
        "vocab_size": 1000,
        "torch_dtype": "float16",
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = model_shape(str(tmp_path))
    assert (shape.num_layers, shape.num_kv_heads, shape.head_dim) == (2, 2, 64)
    per_layer = 256 * 256 * 2 + 256 * 128 * 2 + 3 * 256 * 512 + 2 * 256
    assert shape.weight_bytes == 2 * (2 * per_layer + 2 * 1000 * 256 + 256)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        model_shape(str(tmp_path / "bad.json"))
    (tmp_path / "enc.json").write_text(json.dumps({"d_model": 3}))
    with pytest.raises(ValueError, match="lacks"):
        model_shape(str(tmp_path / "enc.json"))


def test_bad_arguments():
    with pytest.raises(ValueError, match="neither a known name"):
        model_shape("no-such-model")
    with pytest.raises(ValueError, match="residual"):
        CachePolicy("fp16", "fp16", residual=-1)
    with pytest.raises(ValueError, match="skip_layers"):
        cache_bytes(model_shape("smollm2"), CachePolicy("fp16", "fp16", skip_layers=(30,)), 10)
    with pytest.raises(ValueError, match="unknown codec"):
        cache_bytes(model_shape("smollm2"), CachePolicy("nope", "fp16"), 10)


def test_cli(capsys):
    assert main(["memory", "--model", "llama-3-8b", "--context", "1000", "--codecs", "fp16", "fp16/fp8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    fp16, mixed = out["rows"]
    assert fp16["bytes_per_token"] == 131072 and fp16["total_bytes"] == 1000 * 131072
    assert mixed["policy"] == "fp16/fp8" and mixed["v_bits"] == pytest.approx(8.125)
    assert main(["memory", "--model", "smollm2"]) == 0
    assert "max context" in capsys.readouterr().out
    assert main(["memory", "--model", "nope"]) == 2
    assert "neither a known name" in capsys.readouterr().err


def test_per_head_specs_match_the_bytes_kvpackcache_holds(tmp_path, capsys):
    """Per-(layer, KV head) specs, with an fp16 head on top, against a real cache; and `kvpack memory`'s label."""
    from kvpack.tuning.allocate import save_policy

    policy = CachePolicy(
        "int:4", "int:4", residual=16, sinks=4, block=32, head_keys=(("e8:2", "int:8"), None, ("int:2", None)),
        head_values=(None, ("e8:3", "e8:4")), fp_heads={1: (1,)},
    )  # fmt: skip
    held, formula = _toy_cache_bytes(policy)
    assert held == formula
    path = tmp_path / "policy.json"
    save_policy(policy, path)
    assert main(["memory", "--model", "smollm2", "--policy", str(path)]) == 2  # 2 specs, smollm2 has 3 KV heads
    assert "2 per-head specs for 3 KV heads" in capsys.readouterr().err
    heads = [["e8:3", "e8:2", "int:8"]] * 30
    save_policy(CachePolicy(None, None, residual=0, sinks=1, block=1, head_keys=heads, head_values=heads), path)
    assert main(["memory", "--model", "smollm2", "--policy", str(path), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    bits = (3.25 + 2.25 + 8.5) / 3
    assert row["policy"].startswith("per-head") and row["k_bits"] == pytest.approx(bits)
    with pytest.raises(ValueError, match="head_keys/head_values layer 3"):
        cache_bytes(ModelShape("toy", 3, 2, 64, 0), CachePolicy(head_keys=[None] * 3 + [("e8:2",) * 2]), 10)


def _toy_cache_bytes(policy: CachePolicy) -> tuple[int, float]:
    """(bytes a real KVPackCache holds, the formula's bytes) for random K/V of a 3-layer toy model."""
    from transformers import LlamaConfig

    from kvpack.hf.cache import KVPackCache

    config = LlamaConfig(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=256)
    cache = KVPackCache(config=config, policy=policy)
    tokens = 4 + 3 * 32 + 16  # the window holds exactly ``residual`` tokens
    for layer in range(3):
        cache.layers[layer].update(
            torch.randn(2, 2, tokens, 64, dtype=torch.float16), torch.randn(2, 2, tokens, 64, dtype=torch.float16)
        )
    shape = ModelShape("toy", num_layers=3, num_kv_heads=2, head_dim=64, weight_bytes=0)
    return cache.nbytes(), cache_bytes(shape, policy, tokens, batch=2)


@pytest.mark.parametrize("spec", ["fp8", "int:2", "fp16/int:4"])
def test_matches_the_bytes_kvpackcache_holds(spec):
    held, formula = _toy_cache_bytes(CachePolicy(*parse_pair(spec), residual=16, sinks=4, skip_layers=(1,), block=32))
    assert held == formula


def test_per_layer_specs_and_fp_heads_match_the_bytes_kvpackcache_holds(tmp_path, capsys):
    """Per-layer specs (as `kvpack allocate` writes them) and 16-bit outlier heads, against a real cache."""
    from kvpack.tuning.allocate import save_policy

    policy = CachePolicy(
        "int:4", "int:4", residual=16, sinks=4, block=32, layer_keys=("e8:2", "int:2"), layer_values=("e8:3",),
        fp_heads={2: (1,)},
    )  # fmt: skip
    held, formula = _toy_cache_bytes(policy)
    assert held == formula
    path = tmp_path / "policy.json"
    save_policy(policy, path)
    assert main(["memory", "--model", "smollm2", "--policy", str(path)]) == 0
    assert "per-layer (else int:4) +1 fp16 heads" in capsys.readouterr().out
    # the policy's own window and sinks are reported, not the CLI defaults (128 and 4)
    assert main(["memory", "--model", "smollm2", "--policy", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["residual"], report["sinks"]) == (16, 4) and len(report["rows"]) == 1
    assert main(["memory", "--model", "smollm2", "--policy", str(path), "--codecs", "int:4"]) == 2
    assert "--policy replaces --codecs" in capsys.readouterr().err
    with pytest.raises(ValueError, match="fp_heads"):
        cache_bytes(model_shape("smollm2"), CachePolicy("int:4", "int:4", fp_heads={2: (5,)}), 100)
