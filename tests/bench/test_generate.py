"""``kvpack bench generate``: argument errors and the CPU refusal (CLI), and the measurement loop on a tiny CPU model."""

import argparse

import pytest
import torch

from kvpack.bench.generate import build_model, measure, parse_caches
from kvpack.cli import main
from kvpack.hf.paged_cache import PagedLayer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TINY = {"hidden_size": 128, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64, "vocab_size": 256}  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--context", "1"], "--context"),
        (["--context", "4096,1"], "--context"),
        (["--context", "4096,x"], "--context"),
        (["--batch", "0"], "--batch"),
        (["--batch", "1,,-2"], "--batch"),
        (["--max-tokens", "-1"], "--max-tokens"),
        (["--new-tokens", "0"], "--new-tokens"),
        (["--layers", "0"], "--layers"),
        (["--prefill-chunk", "0"], "--prefill-chunk"),
        (["--warmup-tokens", "-1"], "--warmup-tokens"),
        (["--caches", ""], "--caches"),
        (["--caches", "dynamic,fp8"], "--caches: 'fp8'"),
        (["--caches", "int:4:axis=channel"], "--caches"),
        (["--caches", "quanto:3"], "quanto takes 2 or 4"),
        (["--caches", "hqq:8"], "hqq takes 2 or 4"),
        (["--caches", "nonsense:4"], "--caches"),
    ],
)
def test_argument_errors_name_the_option(argv, match, capsys):
    assert main(["bench", "generate", *argv]) == 2
    assert match in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_refuses_without_cuda(capsys):
    assert main(["bench", "generate", "--layers", "2", "--context", "4096"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_parse_caches_defaults():
    assert parse_caches("turbo_mse:4, int:4,dynamic,quanto:4") == ["turbo_mse:4", "int:4", "dynamic", "quanto:4"]
    assert parse_caches("graph:int:4,graph:hf-static,graph:3bit") == ["graph:int:4", "graph:hf-static", "graph:3bit"]
    with pytest.raises(ValueError, match="--caches"):
        parse_caches("graph:dynamic")


@pytest.mark.parametrize("name", ["int:4", "turbo_mse:2", "dynamic", "quanto:4", "hqq:4", "graph:int:4",
                                  "graph:hf-static", "graph:4bit"])
def test_measure_prefills_once_then_decodes_one_token_per_forward(name, monkeypatch):
    model = build_model(2, "cpu", torch.float16, **TINY)
    ids = torch.randint(3, 256, (2, 80), generator=torch.Generator().manual_seed(0))
    decode_steps, masks = [], []
    attend = PagedLayer.attend
    monkeypatch.setattr(PagedLayer, "attend", lambda self, *a: decode_steps.append(1) or attend(self, *a))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        masks.append((0, torch.bool) if attn_mask is None else (attn_mask.numel(), attn_mask.dtype))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    row = measure(model, name, ids, new_tokens=5, warmup_tokens=2, prefill_chunk=32, residual=8, sinks=4)
    if name in ("quanto:4", "hqq:4") and "skipped" in row:
        pytest.skip(row["skipped"])
    assert row["new_tokens"] == 5 and row["tokens_per_s"] > 0 and row["ms_per_token"] > 0
    assert row["cache_seq_length"] == 80 + 2 + 5 - 1  # all but the last generated token are held
    if name in ("int:4", "turbo_mse:2"):
        assert len(decode_steps) == (2 + 5) * 2  # every generate forward, every layer: the paged decode
        assert 0 < row["bits_per_value"] < 16 and row["paged_layers"] == 2
    if name == "dynamic":  # float16 K and V of every held token, 2 layers, 2 KV heads of 64
        assert row["nbytes"] == 2 * 2 * 2 * 86 * 2 * 64 * 2
    # masks of the chunked prefill: at most chunk x context booleans per sequence (the static caches' masks span
    # their max_cache_len, 80 + 2 + 5), never context^2
    keys = 80 + 2 + 5 if name.startswith("graph:") else 80
    assert max(n for n, _ in masks) <= 2 * 32 * keys < 2 * 80 * 80 and {dtype for _, dtype in masks} == {torch.bool}


def test_run_caches_reports_every_row_and_survives_a_failing_cache(monkeypatch, capsys):
    from kvpack.bench.kernels import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["generate", "--layers", "1", "--context", "40", "--new-tokens", "3",
                              "--warmup-tokens", "1", "--prefill-chunk", "16", "--residual", "8"])  # fmt: skip
    import kvpack.bench.generate as bench

    real = bench._make_cache

    def broken(name, *a):
        if name == "dynamic":
            raise RuntimeError("boom")
        return real(name, *a)

    monkeypatch.setattr(bench, "_make_cache", broken)
    result = bench.run_caches(args, ["int:4", "dynamic"], "cpu", **TINY)
    assert [r["cache"] for r in result["rows"]] == ["int:4", "dynamic"]
    assert result["rows"][0]["new_tokens"] == 3 and result["rows"][1]["error"] == "RuntimeError: boom"
    assert result["model"]["layers"] == 1 and result["model"]["head_dim"] == 64
    out = capsys.readouterr().out
    assert "int:4: ctx 40 batch 1" in out and "ERROR RuntimeError: boom" in out


def test_run_caches_measures_the_grid_and_says_what_it_skips(capsys):
    """Every --batch at every --context (contexts outer), each cache in each cell; a cell over --max-tokens is a row
    that says so, the others are measured at their own shape."""
    from kvpack.bench.kernels import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["generate", "--layers", "1", "--context", "40,48", "--batch", "1,2", "--new-tokens",
                              "2", "--warmup-tokens", "0", "--prefill-chunk", "16", "--residual", "8",
                              "--max-tokens", "80"])  # fmt: skip
    import kvpack.bench.generate as bench

    rows = bench.run_caches(args, ["int:4", "dynamic"], "cpu", **TINY)["rows"]
    cells = [(r["cache"], r["batch"], r["context"]) for r in rows]
    assert cells == [(c, b, ctx) for ctx in (40, 48) for b in (1, 2) for c in ("int:4", "dynamic")]
    for row in rows:
        if row["batch"] * row["context"] > 80:
            assert row["skipped"] == "batch x context = 96 tokens > --max-tokens 80" and "new_tokens" not in row
        else:
            assert "skipped" not in row and row["new_tokens"] == 2
            assert row["cache_seq_length"] == row["context"] + 2 - 1
    assert "dynamic: ctx 48 batch 2: skipped (batch x context = 96" in capsys.readouterr().out


def test_a_peer_without_its_package_becomes_a_skipped_row(monkeypatch):
    from kvpack.evaluation import peers

    monkeypatch.setattr(peers, "available", lambda backend: f"pip install {backend}-package")
    model = build_model(1, "cpu", torch.float16, **TINY)
    row = measure(model, "hqq:4", torch.randint(3, 256, (1, 20)), new_tokens=2, warmup_tokens=0)
    assert row == {"cache": "hqq:4", "skipped": "peer 'hqq:4' needs its backend package: pip install hqq-package"}


def test_largest_bisects_a_monotone_predicate():
    from kvpack.bench.generate import _largest

    for limit in (1, 2, 7, 64, 100):
        calls = []
        assert _largest(lambda n, calls=calls, limit=limit: calls.append(n) or n <= limit, 1, 127) == min(limit, 127)
        assert len(calls) <= 7  # bisection: log2 of the range
