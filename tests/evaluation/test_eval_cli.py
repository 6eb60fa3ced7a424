"""``kvpack eval``: the command-line contract, the table, the JSON and the error paths (short windows)."""

import json
import os
import subprocess
import sys

import pytest

from kvpack import CachePolicy, get_codec
from kvpack.cli import build_parser, main
from kvpack.evaluation import models, presets
from kvpack.evaluation.eval_cli import format_result, policy_summary
from kvpack.evaluation.evaluate import VERDICT, EvalResult
from kvpack.policy import policy_to_dict

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

JSON_KEYS = {"ppl_ref", "ppl", "delta_ppl_pct", "top1", "kl", "bits_per_value", "bits_k", "bits_v", "windows"}


@pytest.fixture
def loaded(smollm2, monkeypatch):
    """`kvpack eval --model smollm2` gets the session's model instead of loading it again."""
    monkeypatch.setattr(models, "load", lambda name, **kw: smollm2)
    return smollm2


def short(wikitext_path, *extra):
    return [
        "eval",
        "--text",
        str(wikitext_path),
        "--ctx",
        "64",
        "--n-eval",
        "16",
        "--windows",
        "2",
        "--no-progress",
        *extra,
    ]


def test_defaults_are_the_documented_contract():
    args = build_parser().parse_args(["eval"])
    assert (args.model, args.text, args.ctx, args.n_eval, args.windows, args.protocol) == (
        "smollm2", None, 1024, 256, 8, "decode",
    )  # fmt: skip
    assert args.key is None and args.preset is None and args.only is None and args.json is None


@pytest.mark.model
def test_eval_prints_table_and_writes_json(loaded, wikitext_path, tmp_path, capsys):
    out = tmp_path / "result.json"
    argv = short(
        wikitext_path, "--key", "int:4", "--value", "int:2", "--residual", "8", "--sinks", "2", "--json", str(out)
    )
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "delta-ppl %" in printed and "top-1 agreement" in printed and "verdict: " in printed
    data = json.loads(out.read_text())
    assert JSON_KEYS <= set(data) and len(data["windows"]) == 2
    assert data["policy"]["key"] == "int:4" and data["policy"]["residual"] == 8 and data["policy"]["sinks"] == 2
    assert data["verdict"] in printed and data["verdict"] in ("ACCEPT", "MARGINAL", "REJECT")


@pytest.mark.model
def test_eval_inforward_only_v_and_skip_layers(loaded, wikitext_path, tmp_path):
    out = tmp_path / "r.json"
    argv = short(wikitext_path, "--key", "int:2", "--value", "int:2", "--protocol", "inforward", "--only", "v")
    assert main([*argv, "--skip-layers", "0,29", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["protocol"] == "inforward" and data["policy"]["key"] is None and data["bits_k"] == 32.0
    assert data["policy"]["skip_layers"] == [0, 29]


@pytest.mark.model
def test_eval_preset(loaded, wikitext_path, tmp_path, monkeypatch):
    monkeypatch.setitem(presets.PRESETS, "cli-test", {"key": "int:4", "value": "int:4", "residual": 8})
    out = tmp_path / "p.json"
    assert main(short(wikitext_path, "--preset", "cli-test", "--json", str(out))) == 0
    assert json.loads(out.read_text())["policy"]["preset"] == "cli-test"


@pytest.mark.model
def test_eval_policy_file_records_its_per_head_specs(loaded, wikitext_path, tmp_path):
    from kvpack import CachePolicy
    from kvpack.policy import save_policy

    heads = [["e8:3", "int:8", None]] + [None] * 29
    policy = CachePolicy(
        "e8:4", "e8:3", residual=0, sinks=1, block=1, head_keys=heads, head_values=[None, ["e8:2"] * 3]
    )
    save_policy(policy, tmp_path / "p.json")
    out = tmp_path / "r.json"
    assert main(short(wikitext_path, "--policy", str(tmp_path / "p.json"), "--json", str(out))) == 0
    recorded = json.loads(out.read_text())["policy"]
    assert recorded["head_keys"] == heads and recorded["head_values"] == [None, ["e8:2"] * 3]
    assert (recorded["residual"], recorded["sinks"], recorded["block"]) == (0, 1, 1)
    assert CachePolicy(**{k: recorded[k] for k in ("key", "value", "residual", "sinks", "block", "head_keys",
                                                  "head_values")}) == policy  # fmt: skip
    inforward = tmp_path / "i.json"  # a policy file runs in-forward too (llama.cpp's protocol)
    assert main(short(wikitext_path, "--policy", str(tmp_path / "p.json"), "--json", str(inforward), "--protocol",
                      "inforward")) == 0  # fmt: skip
    data = json.loads(inforward.read_text())
    assert data["protocol"] == "inforward" and data["policy"]["head_keys"] == heads


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--preset", "cli-test", "--key", "int:4"], "--preset cli-test replaces --key"),
        (["--preset", "absent"], "unknown preset 'absent'; known presets"),
        (["--key", "nope:4"], "unknown codec 'nope'"),
        (["--skip-layers", "a,b"], "--skip-layers must be comma-separated ints"),
        (["--residual", "-2"], "residual must be an int >= 0"),
    ],
)
def test_eval_errors_exit_2_with_a_message(extra, message, capsys, monkeypatch, wikitext_path):
    monkeypatch.setitem(presets.PRESETS, "cli-test", {"key": "int:4"})
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the model must not load for a bad command line"))
    assert main(short(wikitext_path, *extra)) == 2
    assert message in capsys.readouterr().err


@pytest.mark.model
def test_eval_block_packs_every_token_past_the_sinks(loaded, wikitext_path, tmp_path, capsys):
    outs = {block: tmp_path / f"b{block}.json" for block in ("1", "default")}
    base = short(wikitext_path, "--key", "e8:3", "--value", "e8:3", "--residual", "0", "--sinks", "1")
    assert main([*base, "--block", "1", "--json", str(outs["1"])]) == 0
    printed = capsys.readouterr().out
    assert main([*base, "--json", str(outs["default"])]) == 0
    one, default = (json.loads(outs[b].read_text()) for b in ("1", "default"))
    assert one["policy"]["block"] == 1 and default["policy"]["block"] is None and one["ppl_ref"] == default["ppl_ref"]
    only_k = tmp_path / "k.json"  # --block with --only: the record says which stream was compressed
    assert main([*base, "--block", "1", "--only", "k", "--json", str(only_k)]) == 0
    recorded = json.loads(only_k.read_text())["policy"]
    assert recorded["only"] == "k" and recorded["value"] is None and recorded["block"] == 1
    codec_bits = get_codec("e8:3", head_dim=64).bits_per_value()
    assert one["bits_per_value"] == pytest.approx((16 + 63 * codec_bits) / 64)  # 1 sink, 63 tokens packed
    assert default["bits_per_value"] == pytest.approx((32 * 16 + 32 * codec_bits) / 64)  # 31 + 1 tokens in 16 bits
    assert "block=1" in printed and f"{16 / one['bits_per_value']:.1f}x smaller than fp16" in printed
    centered = tmp_path / "c.json"  # --center-keys with --block: the policy evaluate() ran says so
    assert main([*base, "--block", "1", "--center-keys", "--json", str(centered)]) == 0
    centered_data = json.loads(centered.read_text())
    assert centered_data["policy"]["center_keys"] and centered_data["kl"] != one["kl"]
    assert centered_data["bits_k"] == pytest.approx(one["bits_k"] + 16 / 64)  # one mean key per 64 tokens


def test_policy_summary_counts_what_each_layer_and_head_holds():
    policy = CachePolicy("e8:4", "e8:3", skip_layers=(2,), layer_keys=("int:8",), fp_heads=((1, 0),),
                         head_keys=(None, ("e8:3", "e8:4")))  # fmt: skip
    summary = policy_summary(policy_to_dict(policy), num_layers=4, num_kv_heads=2)
    # ties in name order. K: layer 0 int:8 x2, layer 1 head 0 16-bit (fp head) and head 1 e8:4, layer 2 16-bit x2, layer 3 e8:4 x2
    assert summary == "K per-(layer, KV head): 16-bit x3, e8:4 x3, int:8 x2; V per-(layer, KV head): e8:3 x5, 16-bit x3"
    uniform = policy_summary(policy_to_dict(CachePolicy("int:4:axis=channel", "int:4")), 30, 3)
    assert uniform == "K int:4:axis=channel (all 90 (layer, KV head)); V int:4 (all 90 (layer, KV head))"


def test_printed_result_says_what_was_saved_and_by_which_rule():
    policy = {**policy_to_dict(CachePolicy("e8:4", "e8:3", head_keys=[["e8:3", "int:8", None]] + [None] * 29)),
              "only": None, "preset": "4bit", "cache_factory": None}  # fmt: skip
    result = EvalResult(model="smollm2", text="pydoc", protocol="snapshot", policy=policy, ctx=1024, n_eval=256,
                        ppl_ref=10.0, ppl=10.04, delta_ppl_pct=0.4, top1=0.98, kl=0.001, delta_ppl_pct_std=0.1,
                        top1_std=0.01, kl_std=0.0001, bits_k=5.0, bits_v=3.0, bits_per_value=4.0,
                        seconds_per_window=1.0, verdict="ACCEPT", windows=[])  # fmt: skip
    printed = format_result(result, (30, 3, 64))
    assert "text: pydoc (Python's reference documentation" in printed
    assert "K per-(layer, KV head): e8:4 x87, 16-bit x1, e8:3 x1, int:8 x1; V e8:3 (all 90" in printed
    # 1024 tokens x 30 layers x 3 heads x 64 x 2 streams x 2 bytes = 22.5 MiB in fp16; 4 bits: a quarter
    assert (
        "memory: K+V held 5.62 MiB for the 1024-token context vs 22.50 MiB in fp16: 4.0x smaller than fp16" in printed
    )
    assert f"verdict: ACCEPT  ({VERDICT.describe()})" in printed and "<= 0.5%" in printed


def test_missing_text_file(capsys, tmp_path):
    assert main(["eval", "--text", str(tmp_path / "absent.txt"), "--no-progress"]) == 2
    assert "text file not found" in capsys.readouterr().err


def test_no_argument_run_works_offline_from_a_fresh_process(tmp_path):
    """The README's main job: `kvpack eval` on the embedded text (shortened here to keep it minutes, not tens)."""
    out = tmp_path / "default.json"
    cmd = [
        sys.executable,
        "-m",
        "kvpack.cli",
        "eval",
        "--ctx",
        "128",
        "--n-eval",
        "32",
        "--windows",
        "2",
        "--json",
        str(out),
    ]
    proc = subprocess.run(
        cmd, check=False, capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["text"] == "pydoc" and data["policy"]["key"] == "int:4:axis=channel"
