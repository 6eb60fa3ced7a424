"""kvpack.evaluate on the real model and WikiText-2 with short windows: exactness of the harness, bits, errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from kvpack import CachePolicy, KVPackCache, evaluate, get_codec
from kvpack.evaluation import presets
from kvpack.evaluation.evaluate import VERDICT, verdict
from kvpack.evaluation.protocol import window_starts
from kvpack.evaluation.text import load_text, tokenize

pytestmark = [pytest.mark.model, pytest.mark.filterwarnings("ignore::UserWarning")]

SHORT = {"ctx": 64, "n_eval": 16, "windows": 2, "progress": False, "protocol": "snapshot"}


def run(smollm2, wikitext_path, **kwargs):
    return evaluate(smollm2, text=wikitext_path, **{**SHORT, **kwargs})


def test_decode_protocol_of_an_uncompressed_cache_is_the_reference(smollm2, wikitext_path):
    result = run(smollm2, wikitext_path, key=None, value=None, protocol="decode", windows=1)
    assert result.protocol == "decode" and result.top1 == 1.0
    assert abs(result.delta_ppl_pct) < 1e-4 and result.kl < 1e-6  # float rounding of a different summation order


def test_decode_protocol_charges_the_newest_tokens(smollm2, wikitext_path, int2):
    """residual=8 < n_eval: continuation tokens get packed in decode and not in snapshot."""
    decode = run(smollm2, wikitext_path, key="int:2", value="int:2", residual=8, sinks=4, protocol="decode")
    assert (decode.bits_k, decode.bits_v) == (int2.bits_k, int2.bits_v)  # held after the same prefill
    assert decode.kl > int2.kl


@pytest.fixture(scope="module")
def int2(smollm2, wikitext_path):
    """int:2 K and V, residual 8: the shared lossy run several tests inspect."""
    return run(smollm2, wikitext_path, key="int:2", value="int:2", residual=8, sinks=4)


@pytest.mark.parametrize("protocol", ["snapshot", "inforward"])
def test_uncompressed_policy_matches_the_reference_exactly(smollm2, wikitext_path, protocol):
    result = run(smollm2, wikitext_path, key=None, value=None, protocol=protocol, windows=1)
    assert result.ppl == result.ppl_ref and result.delta_ppl_pct == 0.0
    assert result.top1 == 1.0 and result.kl == 0.0 and result.verdict == "ACCEPT"
    assert result.bits_k == result.bits_v == 32.0  # float32 model, nothing packed


def test_reference_ppl_equals_a_plain_forward(smollm2, wikitext_path, int2):
    model, tokenizer = smollm2
    ids = tokenize(tokenizer, load_text(wikitext_path))
    nll, n = 0.0, 0
    with torch.inference_mode():
        for start in window_starts(ids.numel(), 80, 2):
            window = ids[start : start + 80][None]
            logits = model(window).logits[0, 63:79]
            nll += F.cross_entropy(logits, window[0, 64:], reduction="sum").item()
            n += 16
    assert int2.ppl_ref == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert [w["start"] for w in int2.windows] == window_starts(ids.numel(), 80, 2)


def test_lossy_codec_costs_and_bits_are_the_measured_bytes(int2):
    assert int2.delta_ppl_pct > 0.5 and int2.top1 < 1.0 and int2.kl > 0.0
    # ctx 64 = 4 sinks + one packed block of 32 + 28 residual tokens, sinks and residual held as float16
    codec_bits = get_codec("int:2", head_dim=64).bits_per_value()
    assert int2.bits_k == int2.bits_v == pytest.approx((32 * 16 + 32 * codec_bits) / 64)
    assert int2.bits_per_value == int2.bits_k
    assert len(int2.windows) == 2 and int2.delta_ppl_pct_std >= 0
    pooled = math.exp(sum(math.log(w["ppl"]) for w in int2.windows) / 2)  # equal token counts per window
    assert int2.ppl == pytest.approx(pooled)


def test_inforward_bits_count_every_position_but_sinks(smollm2, wikitext_path):
    result = run(smollm2, wikitext_path, key="int:2", value="int:4", sinks=4, protocol="inforward")
    n = 64 + 16 - 1  # positions in the single forward
    for bits, spec in ((result.bits_k, "int:2"), (result.bits_v, "int:4")):
        codec_bits = get_codec(spec, head_dim=64).bits_per_value()
        assert bits == pytest.approx((4 * 32 + (n - 4) * codec_bits) / n)
    assert result.delta_ppl_pct > 0.5


@pytest.mark.parametrize("protocol", ["inforward", "decode"])
def test_a_whole_policy_equals_its_plain_fields(smollm2, wikitext_path, protocol):
    """``policy=`` (a policy file's CachePolicy) runs on every protocol, in-forward included, and equals the same
    policy given field by field; with per-layer specs it is the policy that runs, not its plain fields."""
    plain = run(smollm2, wikitext_path, key="int:2", value="int:4", residual=8, sinks=4, protocol=protocol)
    whole = run(smollm2, wikitext_path, policy=CachePolicy("int:2", "int:4", 8, 4), protocol=protocol)
    assert whole.windows == plain.windows and whole.bits_k == plain.bits_k
    layered = CachePolicy("int:2", "int:4", 8, 4, layer_keys=("int:8",) * 30)
    per_layer = run(smollm2, wikitext_path, policy=layered, protocol=protocol)
    assert per_layer.bits_k > plain.bits_k and per_layer.policy["layer_keys"] == ["int:8"] * 30


def test_policy_argument_errors(smollm2, wikitext_path):
    with pytest.raises(TypeError, match="policy must be a CachePolicy"):
        run(smollm2, wikitext_path, policy={"key": "int:4"})
    with pytest.raises(ValueError, match="not both"):
        run(smollm2, wikitext_path, policy=CachePolicy("int:4", "int:4"), preset="4bit")
    with pytest.raises(ValueError, match="not both"):
        run(smollm2, wikitext_path, policy=CachePolicy("int:4", "int:4"), cache_factory=lambda c: DynamicCache())


def test_only_k_keeps_values_exact(smollm2, wikitext_path, int2):
    only_k = run(smollm2, wikitext_path, key="int:2", value="int:2", residual=8, only="k")
    assert only_k.bits_v == 16.0 and only_k.bits_k == int2.bits_k  # V held as float16, as deployed
    assert only_k.policy["value"] is None and only_k.policy["only"] == "k"
    assert only_k.ppl != int2.ppl


def test_cache_factory_reproduces_the_same_run(smollm2, wikitext_path, int2):
    factory = run(
        smollm2, wikitext_path, cache_factory=lambda config: KVPackCache(config, key="int:2", value="int:2", residual=8)
    )
    # same seed, same bits: a separate run through the factory gives the identical numbers
    assert factory.windows == int2.windows and factory.bits_k == int2.bits_k


def test_cache_factory_bits_come_from_the_caller(smollm2, wikitext_path):
    dynamic = lambda config: DynamicCache(config=config)
    result = run(smollm2, wikitext_path, cache_factory=dynamic, windows=1)
    assert result.delta_ppl_pct == 0.0 and math.isnan(result.bits_k)  # DynamicCache reports no bits
    assert run(smollm2, wikitext_path, cache_factory=dynamic, windows=1, bits=(16.0, 8.0)).bits_per_value == 12.0


def test_preset_replaces_the_policy(smollm2, wikitext_path, monkeypatch):
    preset = {
        "key": "int:4",
        "value": "int:4",
        "residual": 8,
        "sinks": 2,
        "layer_keys": ("int:8",),
        "fp_heads": {1: (0,)},
    }
    monkeypatch.setitem(presets.PRESETS, "test-int4", preset)
    result = run(smollm2, wikitext_path, preset="test-int4", windows=1)
    assert result.policy["key"] == "int:4" and result.policy["residual"] == 8 and result.policy["sinks"] == 2
    # the per-layer parts are in the result too, so that its JSON says what ran
    assert result.policy["layer_keys"] == ["int:8"] and result.policy["fp_heads"] == [[1, 0]]
    with pytest.raises(ValueError, match="unknown preset 'nope'; known presets: .*test-int4"):
        run(smollm2, wikitext_path, preset="nope")


def test_token_ids_as_text(smollm2):
    ids = torch.arange(100, 400)
    result = evaluate(smollm2, text=ids, key=None, value=None, **{**SHORT, "windows": 1})
    assert result.text == "token ids" and result.delta_ppl_pct == 0.0


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"protocol": "live"}, ValueError, "protocol must be one of"),
        ({"ctx": 0}, ValueError, "ctx must be an int >= 1"),
        ({"n_eval": 2.5}, ValueError, "n_eval must be an int >= 1"),
        ({"windows": 10_000}, ValueError, "non-overlapping windows"),
        ({"only": "q"}, ValueError, "only must be None"),
        ({"protocol": "inforward", "cache_factory": DynamicCache}, ValueError, "cache_factory works with"),
        ({"key": "int:9"}, ValueError, "bits=9"),
        ({"center_keys": 1}, TypeError, "center_keys must be a bool"),
        ({"center_keys": True, "cache_factory": DynamicCache}, ValueError, "cache_factory works with"),
    ],
)
def test_bad_arguments(smollm2, wikitext_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        run(smollm2, wikitext_path, **kwargs)


def test_bad_model_argument():
    with pytest.raises(TypeError, match="model must be a name/path or a"):
        evaluate(model=3, **SHORT)


def test_verdict_thresholds():
    """The README's targets: ACCEPT within +-0.5% ppl and 97% top-1, MARGINAL within +-5% ppl."""
    assert (VERDICT.accept_delta_ppl_pct, VERDICT.accept_top1, VERDICT.marginal_delta_ppl_pct) == (0.5, 0.97, 5.0)
    assert verdict(0.5, 0.97) == "ACCEPT" and verdict(-0.4, 0.99) == "ACCEPT"
    assert verdict(0.6, 0.99) == "MARGINAL" and verdict(0.3, 0.96) == "MARGINAL" and verdict(4.9, 0.5) == "MARGINAL"
    assert verdict(-5.0, 1.0) == "MARGINAL"
    assert verdict(5.1, 1.0) == "REJECT" and verdict(-7.0, 1.0) == "REJECT"
    assert (
        VERDICT.describe() == "ACCEPT: |delta-ppl| <= 0.5% and top-1 >= 97%; MARGINAL: |delta-ppl| <= 5%; else REJECT"
    )


@pytest.mark.parametrize("protocol", ["snapshot", "inforward"])
def test_reference_memo_reuses_the_reference_and_changes_nothing(smollm2, wikitext_path, int2, protocol):
    model, _ = smollm2
    memo = {}
    kwargs = {"key": "int:2", "value": "int:2", "residual": 8, "sinks": 4, "protocol": protocol}
    first = run(smollm2, wikitext_path, reference_memo=memo, **kwargs)
    assert len(memo) == 2  # one entry per window
    calls = []
    hook = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        second = run(smollm2, wikitext_path, reference_memo=memo, **kwargs)
    finally:
        hook.remove()
    assert len(calls) == 2  # only the compressed forward of each window ran
    assert second.windows == first.windows
    if protocol == "snapshot":
        assert first.windows == int2.windows


def test_pre_rope_keys_run_in_snapshot_and_are_refused_elsewhere(smollm2, wikitext_path):
    result = run(smollm2, wikitext_path, key="int:2:axis=channel", value="int:4", residual=8, windows=1,
                 pre_rope_keys=True)  # fmt: skip
    assert result.policy["pre_rope_keys"] and result.kl > 0
    with pytest.raises(ValueError, match="pre_rope_keys works with protocol='snapshot'"):
        run(smollm2, wikitext_path, key="int:2", value="int:2", protocol="inforward", pre_rope_keys=True)


def test_center_keys_turns_centering_on_in_the_inforward_protocol(smollm2, wikitext_path):
    common = {"key": "int:2", "value": "int:4", "residual": 8, "sinks": 2, "windows": 1, "protocol": "inforward"}
    centered = run(smollm2, wikitext_path, center_keys=True, **common)
    plain = run(smollm2, wikitext_path, **common)
    assert centered.policy["center_keys"] and not plain.policy["center_keys"]
    assert centered.kl < plain.kl  # SmolLM2's keys share a large mean: 2-bit codes of k - mu lose less
    assert centered.bits_k > plain.bits_k  # the mean key is counted


def test_center_keys_turns_a_given_policys_centering_on_and_only_v_off():
    from kvpack.evaluation.evaluate import _resolve_policy

    args = ("int:2", "int:4", 8, 2, (), None, 0)
    given = _resolve_policy(None, *args, policy=CachePolicy("int:2", "int:4", 8, 2), center_keys=True)
    assert given == CachePolicy("int:2", "int:4", 8, 2, center_keys=True)
    assert _resolve_policy(None, *args, policy=given) == given  # the flag never turns it off
    assert _resolve_policy(None, *args, center_keys=True).center_keys
    only_v = _resolve_policy(None, "int:2", "int:4", 8, 2, (), "v", 0, center_keys=True)
    assert not only_v.center_keys and only_v.key is None


def test_only_keeps_the_per_layer_specs_of_the_kept_stream(smollm2, wikitext_path, monkeypatch):
    preset = {"key": "int:4", "value": "int:4", "residual": 8, "sinks": 2, "layer_keys": ("int:8",),
              "layer_values": ("int:2",)}  # fmt: skip
    monkeypatch.setitem(presets.PRESETS, "test-layers", preset)
    only_k = run(smollm2, wikitext_path, preset="test-layers", only="k", windows=1)
    assert only_k.policy["layer_keys"] == ["int:8"] and only_k.policy["layer_values"] == []
    assert only_k.policy["value"] is None and only_k.bits_v == 16.0
    # per-head specs of the dropped stream go too
    heads = ("int:2", "int:8", "int:2")
    monkeypatch.setitem(presets.PRESETS, "test-heads", {**preset, "head_keys": (heads,), "head_values": (heads,)})
    only_v = run(smollm2, wikitext_path, preset="test-heads", only="v", windows=1)
    assert only_v.policy["head_keys"] == [] and only_v.policy["head_values"] == [list(heads)]
    assert only_v.bits_k == 16.0 and only_v.bits_v < 16.0
