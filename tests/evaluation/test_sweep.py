"""kvpack sweep: configurations from the command line and JSON/TOML files, errors, and a short real run."""

import csv
import json

import pytest

from kvpack import CachePolicy
from kvpack.cli import build_parser, main
from kvpack.evaluation.sweep import (
    SweepConfig,
    configs_from_args,
    format_markdown,
    format_table,
    load_config_file,
    run_sweep,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def parse(*argv):
    return configs_from_args(build_parser().parse_args(["sweep", *argv]))


def test_center_keys_applies_to_every_command_line_config():
    configs = parse("--key", "int:4", "int:3", "--value", "int:2", "--center-keys")
    assert [c.policy.center_keys for c in configs] == [True, True]
    assert not any(c.policy.center_keys for c in parse("--key", "int:4"))


def test_command_line_lists_are_swept_as_a_product():
    configs = parse("--key", "int:4", "e8:3", "--value", "int:2", "--residual", "8", "16", "--sinks", "4")
    assert len(configs) == 4
    assert {(c.key, c.value, c.residual, c.sinks) for c in configs} == {
        (k, "int:2", r, 4) for k in ("int:4", "e8:3") for r in (8, 16)
    }
    assert len({c.name for c in configs}) == 4 and all(c.kind == "kvpack" for c in configs)


def test_block_joins_the_product():
    configs = parse("--key", "e8:3", "--value", "e8:3", "--residual", "0", "--block", "1", "32")
    assert [(c.residual, c.block) for c in configs] == [(0, 1), (0, 32)]
    assert [c.name for c in configs] == ["K=e8:3 V=e8:3 r=0 s=4 block=1", "K=e8:3 V=e8:3 r=0 s=4 block=32"]
    assert parse("--key", "int:4")[0].block is None


def test_table_says_how_much_smaller_than_fp16():
    row = {"name": "x", "bits_k": 5.0, "bits_v": 3.0, "bits_per_value": 4.0, "ppl_ref": 10.0, "ppl": 10.1,
           "delta_ppl_pct": 1.0, "delta_ppl_pct_std": 0.1, "top1": 0.97, "kl": 0.01, "verdict": "MARGINAL"}  # fmt: skip
    head, _, line = format_table([row]).splitlines()
    assert "vs fp16" in head and " 4.0x " in line
    assert " n/a " in format_table([{**row, "bits_per_value": float("nan")}]).splitlines()[2]


def test_peers_and_presets_from_the_command_line():
    configs = parse("--peers", "quanto:4", "fp8", "--preset", "4bit")
    assert [c.name for c in configs] == ["preset 4bit", "peer quanto:4", "peer fp8"]
    assert [c.kind for c in configs] == ["kvpack", "peer", "peer"]
    assert len(parse("--peers")) == 5  # alone: every default peer


def test_json_and_toml_files(tmp_path):
    entries = [{"name": "a", "key": "int:4", "value": "none", "residual": 8, "sinks": 1, "skip_layers": [0, 29]},
               {"key": "e8:3", "layer_keys": ["e8:4", None], "block": 1}, {"preset": "3bit"}]  # fmt: skip
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"configs": entries, "peers": ["hqq:2"]}))
    configs, peers = load_config_file(path)
    assert peers == ["hqq:2"]
    assert configs[0] == SweepConfig("a", "int:4", None, 8, 1, (0, 29))
    assert configs[1].layer_keys == ("e8:4", None) and configs[1].block == 1 and "e8:4x1" in configs[1].name
    assert configs[2].preset == "3bit"
    toml = tmp_path / "s.toml"
    toml.write_text('peers = ["fp8"]\n[[configs]]\nkey = "int:4"\nvalue = "int:2"\nresidual = 8\n')
    configs, peers = load_config_file(toml)
    assert peers == ["fp8"] and (configs[0].key, configs[0].value, configs[0].residual) == ("int:4", "int:2", 8)
    heads = tmp_path / "h.json"
    entry = {"key": "e8:4", "head_keys": [None, ["e8:3", "none", "int:8"]], "block": 1, "pre_rope_keys": True}
    heads.write_text(json.dumps([entry]))
    config = load_config_file(heads)[0][0]
    assert config.pre_rope_keys and config.policy_kwargs()["pre_rope_keys"]
    assert config.head_keys == (None, ("e8:3", None, "int:8")) and "per-head" in config.name
    assert config.policy_kwargs()["head_keys"] == config.head_keys
    centered = tmp_path / "c.json"
    centered.write_text(json.dumps([{"key": "int:4", "center_keys": True}, {"key": "int:4"}]))
    configs = load_config_file(centered)[0]
    assert configs[0].policy.center_keys and configs[0].name.endswith("centered K")
    assert not configs[1].policy.center_keys and configs[0].name != configs[1].name
    listed = tmp_path / "l.json"
    listed.write_text(json.dumps([{"key": "int:4"}]))
    assert load_config_file(listed)[0][0].value is None and parse("--config", str(listed))[0].key == "int:4"


@pytest.mark.parametrize(
    ("content", "error", "match"),
    [({"configs": [{"key": "int:4", "colour": 1}]}, ValueError, "unknown fields"),
     ({"configs": [{"residual": 8}]}, ValueError, "needs 'key'"),
     ({"configs": [{"key": "bogus:4"}]}, ValueError, "bogus"),
     ({"configs": [{"key": "int:4", "residual": -1}]}, ValueError, "residual"),
     ({"configs": [{"key": 4}]}, TypeError, "codec spec"),
     ({"configs": [{"preset": "4bit", "key": "int:4"}]}, ValueError, "replaces"),
     ({"configs": [{"preset": "9bit"}]}, ValueError, "unknown preset"),
     ({"configs": [{"key": "int:4", "skip_layers": "a,b"}]}, ValueError, "layer indices"),
     ({"configs": [{"key": "int:4", "layer_values": "e8:3"}]}, TypeError, "per layer"),
     ({"configs": [{"head_keys": "e8:3"}]}, TypeError, "head_keys must be a list over layers"),
     ({"configs": [{"head_values": [["e8:3", 4]]}]}, TypeError, r"head_values\[0\]\[1\]"),
     ({"configs": [{"head_keys": [["bogus:3"]]}]}, ValueError, "bogus"),
     ({"configs": [{"key": "int:4", "pre_rope_keys": "yes"}]}, TypeError, "pre_rope_keys must be true or false"),
     ({"configs": [{"key": "int:4", "center_keys": 1}]}, TypeError, "center_keys must be true or false"),
     ({"configs": {"key": "int:4"}}, TypeError, "must be lists"),
     ({"configs": [], "peers": [4]}, TypeError, "peer spec strings"),
     ({"configs": [], "runs": []}, ValueError, "unknown top-level"),
     ("not json", ValueError, "cannot parse")],
)  # fmt: skip
def test_bad_config_files_raise(tmp_path, content, error, match):
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(error, match=match):
        load_config_file(path)


def test_bad_command_lines_raise(tmp_path):
    with pytest.raises(ValueError, match="nothing to sweep"):
        parse()
    with pytest.raises(ValueError, match="need --key"):
        parse("--residual", "8")
    with pytest.raises(ValueError, match="need --key"):
        parse("--preset", "4bit", "--center-keys")
    with pytest.raises(ValueError, match="unique"):
        parse("--key", "int:4", "int:4")
    with pytest.raises(ValueError, match="unknown peer backend"):
        parse("--peers", "vllm:4")
    with pytest.raises(FileNotFoundError):
        parse("--config", str(tmp_path / "missing.json"))
    (tmp_path / "s.yaml").write_text("configs: []")
    with pytest.raises(ValueError, match=r"\.json or \.toml"):
        parse("--config", str(tmp_path / "s.yaml"))
    with pytest.raises(ValueError):
        run_sweep(("model", "tok"), [])
    with pytest.raises(TypeError):
        run_sweep(("model", "tok"), [{"key": "int:4"}])


def test_cli_reports_errors_with_exit_code_2(capsys):
    assert main(["sweep", "--key", "bogus:4"]) == 2
    assert "bogus" in capsys.readouterr().err


@pytest.mark.model
def test_sweep_runs_configs_presets_and_peers_on_the_same_windows(smollm2, wikitext_path, tmp_path, monkeypatch):
    import kvpack.evaluation.models

    monkeypatch.setattr(kvpack.evaluation.models, "load", lambda name, device="cpu": smollm2)  # the session's model
    config = tmp_path / "s.json"
    config.write_text(json.dumps({"configs": [{"name": "exact", "key": "none", "value": "none"},
                                              {"name": "e8 block 1", "key": "e8:3", "value": "e8:2", "residual": 0,
                                               "block": 1}]}))  # fmt: skip
    out = {s: tmp_path / f"out.{s}" for s in ("json", "csv", "png", "md")}
    argv = ["sweep", "--text", str(wikitext_path), "--ctx", "64", "--n-eval", "16", "--windows", "1", "--no-progress",
            "--config", str(config), "--key", "int:2", "--value", "int:4", "--residual", "8", "--preset", "3bit",
            "--peers", "quanto:2", "--json", str(out["json"]), "--csv", str(out["csv"]), "--plot", str(out["png"]),
            "--markdown", str(out["md"])]  # fmt: skip
    assert main(argv) == 0
    data = json.loads(out["json"].read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert set(rows) == {"exact", "e8 block 1", "K=int:2 V=int:4 r=8 s=4", "preset 3bit", "peer quanto:2"}
    assert len({r["ppl_ref"] for r in rows.values()}) == 1  # the same windows, one shared reference
    # no compression: the decode protocol's forward differs from the reference's only in float summation order
    # (exactly 0 with 2 threads, -2.4e-5 % with OMP_NUM_THREADS=1)
    assert abs(rows["exact"]["delta_ppl_pct"]) < 1e-3 and rows["exact"]["top1"] == 1.0
    for name in ("e8 block 1", "K=int:2 V=int:4 r=8 s=4", "peer quanto:2"):
        assert rows[name]["kl"] > 0
    # block 1: only the 4 sinks stay 16-bit; e8:3 holds 3 + 16/64 bits per value
    assert rows["e8 block 1"]["bits_k"] == pytest.approx((4 * 16 + 60 * 3.25) / 64)
    assert rows["peer quanto:2"]["kind"] == "peer" and rows["peer quanto:2"]["bits_k"] == pytest.approx(2.5)
    preset = rows["preset 3bit"]  # what the recipe stands for on this model: its per-layer specs, as JSON lists
    from kvpack.tuning import recipe

    assert len(preset["layer_keys"]) == 30 and all(isinstance(s, str) for s in preset["layer_keys"])
    assert (preset["residual"], preset["sinks"], preset["block"]) == (recipe.RESIDUAL, recipe.SINKS, recipe.BLOCK)
    assert data["setup"]["ctx"] == 64 and data["setup"]["windows"] == 1
    with open(out["csv"]) as f:
        assert len(list(csv.DictReader(f))) == 5
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out["md"].read_text().count("\n| `") == 5
    assert format_markdown(data["rows"]).startswith("| config |")


def test_plain_policies_go_to_evaluate_as_fields_and_the_rest_whole():
    from kvpack.evaluation.sweep import _evaluate_kwargs

    plain = _evaluate_kwargs(SweepConfig("p", "int:4", None, 8, 1, (3, 1)))
    assert plain == {"key": "int:4", "value": None, "residual": 8, "sinks": 1, "skip_layers": (1, 3),
                     "center_keys": False}
    centered = _evaluate_kwargs(SweepConfig("c", "int:4", None, 8, 1, center_keys=True))  # the sweep's --seed applies
    assert centered == {**plain, "skip_layers": (), "center_keys": True}
    full = _evaluate_kwargs(SweepConfig("f", "int:4", block=1, center_keys=True))
    assert full == {"policy": CachePolicy("int:4", None, block=1, center_keys=True)}
    assert _evaluate_kwargs(SweepConfig("s", preset="3bit")) == {"preset": "3bit"}
