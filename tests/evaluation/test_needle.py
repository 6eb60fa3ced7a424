"""kvpack needle: prompts, scoring, retrieval through the uncompressed and a destroyed cache, CLI errors."""

import json

import pytest
import torch

from kvpack.cli import build_parser, main
from kvpack.evaluation.needle import (
    ANSWER_PREFIX,
    NEEDLE,
    QUESTION,
    REFERENCE,
    build_prompt,
    configs_from_args,
    format_table,
    parse_fractions,
    parse_lengths,
    passkey_for,
    plot_heatmap,
    run_needle,
    score_answer,
)
from kvpack.policy import CachePolicy


def test_score_answer():
    assert score_answer(" 71432.", 71432)
    assert score_answer(" 71 432 is the key", 71432)
    assert not score_answer(" 7143.", 71432)
    assert not score_answer(" 714321", 71432)
    assert not score_answer(" the grass is green", 71432)
    assert not score_answer(" 12345, or 71432", 71432)  # the first number counts
    with pytest.raises(TypeError, match="answer"):
        score_answer(None, 1)


def test_passkeys_are_seeded_five_digit_and_vary():
    keys = [passkey_for(0, 1024, d, t) for d in (0.0, 0.5, 1.0) for t in range(3)]
    assert keys == [passkey_for(0, 1024, d, t) for d in (0.0, 0.5, 1.0) for t in range(3)]
    assert all(10000 <= k <= 99999 for k in keys) and len(set(keys)) == len(keys)
    assert passkey_for(1, 1024, 0.0, 0) != passkey_for(0, 1024, 0.0, 0)


def test_parse_lengths_and_depths():
    assert parse_lengths("1024, 2048") == [1024, 2048]
    assert parse_fractions("0,25,50,75,100") == [0, 0.25, 0.5, 0.75, 1.0]
    assert parse_fractions("0,0.5,1") == [0, 0.5, 1.0]
    for bad in ("", "a,b", "0,-5", "1.5"):
        with pytest.raises(ValueError, match="--lengths"):
            parse_lengths(bad)
    for bad in ("", "x", "-10,50", "50,150"):
        with pytest.raises(ValueError, match="--depths"):
            parse_fractions(bad)


def _args(*argv):
    return build_parser().parse_args(["needle", *argv])


def test_configs_from_args():
    configs = configs_from_args(_args("--key", "int:4", "--value", "int:4", "--key", "int:2", "--value", "int:2"))
    assert next(iter(configs)) == REFERENCE and configs[REFERENCE] is None
    assert [(p.key, p.value) for p in list(configs.values())[1:]] == [("int:4", "int:4"), ("int:2", "int:2")]
    one = configs_from_args(
        _args("--key", "int:4:axis=channel", "--key", "e8:3", "--value", "int:4", "--residual", "0")
    )
    assert [(p.key, p.value, p.residual) for p in list(one.values())[1:]] == [
        ("int:4:axis=channel", "int:4", 0),
        ("e8:3", "int:4", 0),
    ]
    blocks = configs_from_args(_args("--key", "e8:3", "--value", "e8:3", "--residual", "0", "--block", "1"))
    assert [p.block for p in list(blocks.values())[1:]] == [1] and "k=e8:3 v=e8:3 r=0 s=4 b=1" in blocks
    centered = configs_from_args(_args("--no-reference", "--key", "int:4", "--value", "int:4", "--center-keys"))
    assert list(centered) == ["k=int:4 v=int:4 r=128 s=4 centered"] and centered[next(iter(centered))].center_keys
    default = configs_from_args(_args("--no-reference"))
    assert len(default) == 1 and isinstance(next(iter(default.values())), CachePolicy)


def test_policy_files_are_configs(tmp_path, capsys):
    from kvpack.policy import save_policy

    policy = CachePolicy(None, None, 16, 1, layer_keys=("int:4", "turbo_mse:3"), layer_values=("int:2", None))
    save_policy(policy, tmp_path / "mine.json")
    configs = configs_from_args(_args("--no-reference", "--policy", str(tmp_path / "mine.json")))
    assert configs == {"policy mine": policy}
    (tmp_path / "b").mkdir()
    other = CachePolicy("int:4", "int:4", 16, 1)
    save_policy(other, tmp_path / "b" / "mine.json")
    both = configs_from_args(_args("--no-reference", "--policy", str(tmp_path / "mine.json"),
                                   "--policy", str(tmp_path / "b" / "mine.json")))  # fmt: skip
    assert both == {"policy mine": policy, f"policy {tmp_path / 'b' / 'mine.json'}": other}  # none lost
    with pytest.raises(ValueError, match="given twice"):
        same = str(tmp_path / "b" / ".." / "mine.json")
        configs_from_args(_args("--policy", str(tmp_path / "mine.json"), "--policy", same))
    assert main(["needle", "--policy", str(tmp_path / "missing.json")]) == 2
    assert "no policy file" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{")
    assert main(["needle", "--policy", str(tmp_path / "bad.json")]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_cli_errors_come_before_the_model_loads(capsys):
    assert main(["needle", "--lengths", "abc"]) == 2
    assert "--lengths" in capsys.readouterr().err
    assert main(["needle", "--depths", "50,150"]) == 2
    assert main(["needle", "--trials", "0"]) == 2
    assert (
        main(["needle", "--key", "a:1", "--key", "b:1", "--value", "int:4", "--value", "int:4", "--value", "fp16"]) == 2
    )
    assert "--key given 2 times" in capsys.readouterr().err
    assert main(["needle", "--key", "nope:3"]) == 2
    assert "unknown codec" in capsys.readouterr().err
    assert main(["needle", "--preset", "no-such-preset"]) == 2


@pytest.mark.model
def test_prompt_has_the_asked_length_and_the_needle_at_its_depth(smollm2):
    tokenizer = smollm2[1]
    positions = []
    for depth in (0.0, 0.5, 1.0):
        context, question = build_prompt(tokenizer, 512, depth, 12345, answer_tokens=8)
        assert context.numel() + question.numel() == 512 - 8
        text = tokenizer.decode(context)
        assert text.count("12345") == 2 and NEEDLE.format(key=12345).strip() in text
        assert tokenizer.decode(question).endswith(ANSWER_PREFIX) and QUESTION.strip() in tokenizer.decode(question)
        positions.append(text.index("12345") / len(text))
    assert positions[0] < 0.3 < positions[1] < 0.7 < positions[2]
    context, _ = build_prompt(tokenizer, 512, 0.5, 12345, filler_text="Alpha beta gamma delta. " * 100)
    assert "Alpha beta" in tokenizer.decode(context)
    with pytest.raises(ValueError, match="no room"):
        build_prompt(tokenizer, 60, 0.5, 12345)


@pytest.mark.model
def test_uncompressed_retrieves_and_a_destroyed_cache_does_not(smollm2, tmp_path):
    model, tokenizer = smollm2
    configs = {REFERENCE: None, "int:2 r0 s0": CachePolicy("int:2", "int:2", residual=0, sinks=0)}
    result = run_needle(model, tokenizer, configs, [256], [0.25, 0.75], trials=1, progress=False, model_name="smollm2")
    assert result.accuracy[REFERENCE] == [[1.0, 1.0]]
    assert sum(result.accuracy["int:2 r0 s0"][0]) < sum(result.accuracy[REFERENCE][0])
    # bits held after the context: whole blocks of 32 at 2.5 bits (int:2 + fp16 scale/zero per 64), the rest 16-bit
    n = build_prompt(tokenizer, 256, 0.25, 12345)[0].numel()
    packed = n // 32 * 32
    assert result.bits_per_value["int:2 r0 s0"][0] == pytest.approx((2.5 * packed + 16 * (n - packed)) / n)
    # the harness (exact prefill recorded, then decoded through a filled cache) answers as plain generate does
    sample = next(s for s in result.samples if s["config"] == REFERENCE)
    context, question = build_prompt(tokenizer, 256, sample["depth"], sample["passkey"])
    full = torch.cat([context, question])[None]
    out = model.generate(full, attention_mask=torch.ones_like(full), max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(out[0, full.shape[1] :], skip_special_tokens=True) == sample["answer"]
    table = format_table(result)
    assert REFERENCE in table and "100%" in table
    assert json.loads(json.dumps(result.to_dict()))["accuracy"][REFERENCE] == [[1.0, 1.0]]
    assert plot_heatmap(result, tmp_path / "needle.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.model
def test_run_needle_errors(smollm2):
    model, tokenizer = smollm2
    with pytest.raises(ValueError, match="max_position_embeddings"):
        run_needle(model, tokenizer, {REFERENCE: None}, [100_000], [0.5], progress=False)
    with pytest.raises(ValueError, match="depths"):
        run_needle(model, tokenizer, {REFERENCE: None}, [256], [1.5], progress=False)
    with pytest.raises(ValueError, match="lengths"):
        run_needle(model, tokenizer, {REFERENCE: None}, [], [0.5], progress=False)
    with pytest.raises(ValueError, match="trials"):
        run_needle(model, tokenizer, {REFERENCE: None}, [256], [0.5], trials=0, progress=False)
    with pytest.raises(TypeError, match="configs"):
        run_needle(model, tokenizer, {"x": "int:4"}, [256], [0.5], progress=False)
