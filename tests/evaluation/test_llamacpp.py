"""The llama.cpp peer: its spec grammar (always), the sweep's refusals before any work, and, where llama-cpp-python
is installed (not in CI's install), a run on SmolLM2's GGUF."""

from __future__ import annotations

import argparse

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvpack.evaluation import llamacpp
from kvpack.evaluation.llamacpp import CACHE_TYPES, LlamaCppSpec, parse_llamacpp

TYPES = sorted(CACHE_TYPES)


@given(key=st.sampled_from(TYPES), value=st.sampled_from(TYPES), prefix=st.booleans())
def test_every_pair_of_cache_types_parses_and_names_itself(key, value, prefix):
    spec = parse_llamacpp(("llamacpp:" if prefix else "") + f"{key}/{value}")
    assert spec == LlamaCppSpec(key, value, True)
    assert parse_llamacpp(spec.name) == spec  # the name is a spec of the same thing
    assert spec.bits == (CACHE_TYPES[key][1], CACHE_TYPES[value][1])


def test_spec_grammar():
    assert parse_llamacpp("q4_0") == LlamaCppSpec("q4_0", "q4_0")
    assert parse_llamacpp("q4_0").name == "llamacpp:q4_0"
    assert parse_llamacpp("q8_0/q4_0").bits == (8.5, 4.5)
    assert parse_llamacpp("llamacpp:f16:fa=off") == LlamaCppSpec("f16", "f16", False)
    assert parse_llamacpp("f16:fa=off").name == "llamacpp:f16:fa=off"
    assert parse_llamacpp("q8_0/f16:fa=off").flash_attn is False  # a quantized K works without flash attention


@pytest.mark.parametrize(
    "spec, match",
    [
        ("q3_k", "unknown K type 'q3_k'"),
        ("q4_0/q2", "unknown V type 'q2'"),
        ("q4_0:fa=maybe", "only option is fa=off"),
        ("q4_0:fa=off", "quantized V cache needs flash attention"),
        ("llamacpp:", "unknown K type ''"),
    ],
)
def test_bad_specs_are_refused_by_name(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_llamacpp(spec)


@pytest.mark.parametrize("spec", [None, 4, ""])
def test_non_string_specs_are_type_errors(spec):
    with pytest.raises(TypeError, match="llama.cpp cache spec"):
        parse_llamacpp(spec)


def test_sweep_refuses_llamacpp_peers_before_loading(monkeypatch):
    from kvpack.evaluation import models, sweep

    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the model must not load"))
    parser = argparse.ArgumentParser()
    sweep.add_arguments(parser)
    if not llamacpp.available():  # CI: the optional package is missing, and the error says how to get it
        with pytest.raises(ImportError, match="pip install llama-cpp-python"):
            sweep.run(parser.parse_args(["--peers", "llamacpp:q4_0"]))
        monkeypatch.setattr(llamacpp, "available", lambda: True)
    with pytest.raises(ValueError, match="unknown K type"):
        sweep.run(parser.parse_args(["--peers", "llamacpp:q9"]))
    with pytest.raises(ValueError, match="--model must be 'smollm2' or a .gguf path"):
        sweep.run(parser.parse_args(["--peers", "llamacpp:q4_0", "--model", "some/dir"]))
    config = sweep.SweepConfig("peer llamacpp:q4_0", peer="llamacpp:q4_0")
    with pytest.raises(ValueError, match="gguf must name one"):
        sweep.run_sweep(("model", "tokenizer"), [config], gguf=None)


needs_llamacpp = pytest.mark.skipif(not llamacpp.available(), reason="needs llama-cpp-python (optional)")


@needs_llamacpp
@pytest.mark.model
def test_llamacpp_on_smollm2(smollm2):
    from kvpack.evaluation.models import smollm2_gguf
    from kvpack.evaluation.text import load_text, tokenize

    ids = tokenize(smollm2[1], load_text())
    memo: dict = {}
    same = llamacpp.evaluate_llamacpp(smollm2_gguf(), ids, "f16", ctx=96, n_eval=32, windows=2, reference_memo=memo)
    assert same.kl == 0 and same.top1 == 1 and same.delta_ppl_pct == 0  # the reference itself
    assert (same.bits_k, same.bits_v, same.protocol) == (16.0, 16.0, "inforward")
    q4 = llamacpp.evaluate_llamacpp(smollm2_gguf(), ids, "q4_0", ctx=96, n_eval=32, windows=2, reference_memo=memo)
    assert q4.kl > 0 and q4.bits_per_value == 4.5
    assert torch.isfinite(torch.tensor([q4.kl, q4.delta_ppl_pct, q4.top1])).all()
    with pytest.raises(ValueError, match="GGUF file"):
        llamacpp.evaluate_llamacpp("missing.gguf", ids, "q4_0", windows=1)
