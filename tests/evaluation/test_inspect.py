"""kvpack inspect: capture of the real Q/K/V, per-layer/per-head codec error and attention fidelity, errors."""

import importlib
import json
import sys

import pytest
import torch

from kvpack.cli import main
from kvpack.evaluation.inspect import (
    METRICS,
    attention_output,
    format_report,
    inspect_codecs,
    parse_codecs,
    plot_heatmaps,
)
from kvpack.evaluation.text import load_text, tokenize

CTX = 128


def test_the_module_does_not_shadow_the_standard_library_inspect():
    import inspect as stdlib_inspect

    assert stdlib_inspect is sys.modules["inspect"] and hasattr(stdlib_inspect, "signature")
    assert importlib.import_module("kvpack.evaluation.inspect").__name__ == "kvpack.evaluation.inspect"
    assert sys.modules["inspect"] is not sys.modules["kvpack.evaluation.inspect"]


def test_parse_codecs():
    assert parse_codecs("int:4") == [("int:4", "int:4")]
    assert parse_codecs("int:4:axis=channel,group=32, turbo_mse:3;fp16") == [
        ("int:4:axis=channel,group=32", "int:4:axis=channel,group=32"),
        ("turbo_mse:3", "turbo_mse:3"),
        ("fp16", "fp16"),
    ]
    assert parse_codecs("int:2:axis=channel/int:2,e8:3") == [("int:2:axis=channel", "int:2"), ("e8:3", "e8:3")]
    for bad in ("", "  ", "axis=channel,int:4", "int:4/", "/int:4", "a/b/c"):
        with pytest.raises(ValueError, match="--codecs"):
            parse_codecs(bad)


def test_attention_output_matches_a_loop_over_heads_with_gqa_and_a_window():
    torch.manual_seed(0)
    q, k, v = torch.randn(6, 20, 16), torch.randn(2, 20, 16), torch.randn(2, 20, 16)
    for window in (None, 5):
        out = attention_output(q, k, v, 0.25, window)
        for h in range(6):
            scores = q[h] @ k[h // 3].T * 0.25
            i, j = torch.meshgrid(torch.arange(20), torch.arange(20), indexing="ij")
            allowed = (j <= i) & ((i - j < window) if window else True)
            ref = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v[h // 3]
            torch.testing.assert_close(out[h], ref, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def ids(smollm2, wikitext_path):
    return tokenize(smollm2[1], load_text(wikitext_path)[:60_000])  # ~14k tokens: enough windows, fast


@pytest.fixture(scope="module")
def inspected(smollm2, ids):
    return inspect_codecs(
        *smollm2, ids, [("fp16", "fp16"), ("int:2:axis=channel", "int:2"), ("e8:3", "e8:3")], ctx=CTX, windows=2,
        progress=False, model_name="smollm2", text_name="wikitext2",
    )  # fmt: skip


@pytest.mark.model
def test_fp16_is_near_lossless_and_lossy_codecs_are_not(inspected):
    r = inspected
    assert set(r.metrics) == {"fp16", "int:2:axis=channel / int:2", "e8:3"} and len(r.windows) == 2
    for label in r.metrics:
        for metric in METRICS:
            assert r.table(label, metric).shape == (30, 3)
    fp16, int2 = "fp16", "int:2:axis=channel / int:2"
    for metric in ("k_nmse", "v_nmse", "attn_nmse_k", "attn_nmse_v", "attn_nmse_kv"):
        assert r.table(fp16, metric).max() < 1e-5
        assert r.table(int2, metric).min() > 100 * r.table(fp16, metric).max()
    assert r.table(fp16, "attn_cos_kv").min() > 0.99999
    assert r.table(int2, "attn_cos_kv").mean() < 0.99
    assert r.storage[fp16]["bits_k"] == 16.0 and r.storage[fp16]["bytes_per_token"] == r.fp16_bytes_per_token
    assert r.storage[int2]["bits_k"] == pytest.approx(3.0) and r.storage[int2]["bits_v"] == pytest.approx(2.5)
    assert r.fp16_bytes_per_token == 2 * 2 * 30 * 3 * 64


@pytest.mark.model
def test_key_error_is_amplified_by_attention_value_error_is_not(inspected):
    """e8 (Hadamard rotation) gives K and V about the same relative MSE; through softmax, K's costs more."""
    k_nmse, v_nmse = inspected.table("e8:3", "k_nmse").mean(), inspected.table("e8:3", "v_nmse").mean()
    assert 0.5 < k_nmse / v_nmse < 2
    assert inspected.table("e8:3", "attn_nmse_k").mean() > 2 * inspected.table("e8:3", "attn_nmse_v").mean()
    assert inspected.table("e8:3", "attn_nmse_v").mean() < v_nmse  # averaging over attended tokens shrinks V error


@pytest.mark.model
def test_report_json_and_heatmap(inspected, tmp_path):
    text = format_report(inspected)
    assert "bits K" in text and "int:2:axis=channel / int:2" in text and text.count("\n") > 3 * 30
    assert json.loads(json.dumps(inspected.to_dict()))["metrics"]["e8:3"]["k_nmse"][0][0] > 0
    png = plot_heatmaps(inspected, tmp_path / "inspect.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.model
def test_inspect_errors(smollm2, ids):
    with pytest.raises(ValueError, match="ctx"):
        inspect_codecs(*smollm2, ids, [("fp16", "fp16")], ctx=1)
    with pytest.raises(ValueError, match="sinks"):
        inspect_codecs(*smollm2, ids, [("fp16", "fp16")], ctx=16, sinks=16)
    with pytest.raises(ValueError, match="codecs"):
        inspect_codecs(*smollm2, ids, [], ctx=16)
    with pytest.raises(ValueError, match="unknown codec"):
        inspect_codecs(*smollm2, ids, [("nope:3", "fp16")], ctx=16)
    with pytest.raises(ValueError, match="windows"):
        inspect_codecs(*smollm2, ids[:100], [("fp16", "fp16")], ctx=64, windows=2)


def test_cli_rejects_a_bad_codec_before_loading_the_model(capsys):
    assert main(["inspect", "--codecs", "bogus:3"]) == 2
    assert "unknown codec 'bogus'" in capsys.readouterr().err
    assert main(["inspect", "--codecs", "int:4/"]) == 2
