"""kvpack ruler: task generation, scoring, the run on a tiny random model, CLI errors, and SmolLM2 at 1K."""

import collections
import itertools
import json
import math
import re

import pytest
import torch
from tiny_models import tiny_model

from kvpack.cli import main
from kvpack.evaluation.haystack import REFERENCE
from kvpack.evaluation.ruler import (
    TASKS,
    format_table,
    make_sample,
    parse_context,
    parse_tasks,
    plot_heatmap,
    recall,
    run_ruler,
)
from kvpack.policy import CachePolicy

LENGTH = 1500  # characters: a tiny model's context, long enough for cwe's list


def test_recall_counts_whole_words():
    assert recall(" 1234567 and 7654321", ("1234567", "7654321")) == 1.0
    assert recall(" 12345678", ("1234567",)) == 0.0  # inside a longer number
    assert recall("they are: ABCDE, FGHIJ", ("abcde", "fghij", "KLMNO")) == pytest.approx(2 / 3)
    assert recall("kezo kezolo", ("kezolo", "zolo")) == 0.5
    with pytest.raises(TypeError, match="answer"):
        recall(None, ("1",))
    with pytest.raises(ValueError, match="expected"):
        recall("x", ())


@pytest.mark.parametrize("task", TASKS)
def test_samples_are_seeded_and_of_the_asked_length(char_tokenizer, task):
    a, b = (make_sample(char_tokenizer, task, LENGTH, seed=3, trial=1) for _ in range(2))
    assert torch.equal(a.context, b.context) and torch.equal(a.question, b.question) and a.expected == b.expected
    other = make_sample(char_tokenizer, task, LENGTH, seed=4, trial=1)
    assert other.expected != a.expected and make_sample(char_tokenizer, task, LENGTH, 3, 2).expected != a.expected
    total = a.context.numel() + a.question.numel() + a.answer_tokens
    assert total == LENGTH if task != "cwe" else LENGTH - 40 < total <= LENGTH
    assert a.task == task and a.context.dtype == a.question.dtype == torch.long


def test_what_each_task_hides_and_asks(char_tokenizer):
    text = lambda s: char_tokenizer.decode(s.context)
    mk = make_sample(char_tokenizer, "multikey", LENGTH)
    needles = re.findall(r"magic numbers for (\w+) is: (\d+)\.", text(mk))
    asked = re.search(r"number for (\w+)", char_tokenizer.decode(mk.question)).group(1)
    assert len({k for k, _ in needles}) == 4 and mk.expected == (dict(needles)[asked],)
    mv = make_sample(char_tokenizer, "multivalue", LENGTH)
    needles = re.findall(r"magic numbers for (\w+) is: (\d+)\.", text(mv))
    assert len({k for k, _ in needles}) == 1 and sorted(v for _, v in needles) == sorted(mv.expected)
    vt = make_sample(char_tokenizer, "vartrack", LENGTH)
    chain = re.findall(r"VAR (\w+) = (?:VAR )?(\w+)\.", text(vt))
    assert [n for n, _ in chain] == list(vt.expected) and chain[0][1] in char_tokenizer.decode(vt.question)
    assert all(b == a for (a, _), (_, b) in itertools.pairwise(chain))  # each hop names the previous variable
    cwe = make_sample(char_tokenizer, "cwe", LENGTH)
    entries = re.findall(r" (\d+)\. (\w+)", text(cwe))
    assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
    counts = collections.Counter(w for _, w in entries).most_common()
    assert {w for w, _ in counts[:10]} == set(cwe.expected) and counts[9][1] > counts[10][1] == 3


def test_bad_arguments_name_themselves(char_tokenizer):
    with pytest.raises(ValueError, match="task must be one of"):
        make_sample(char_tokenizer, "qa", LENGTH)
    with pytest.raises(ValueError, match="length must be a positive int"):
        make_sample(char_tokenizer, "multikey", 0)
    with pytest.raises(ValueError, match="length 200 leaves no room"):
        make_sample(char_tokenizer, "vartrack", 200)
    with pytest.raises(ValueError, match="length 400 is too short for common-word"):
        make_sample(char_tokenizer, "cwe", 400)
    model = tiny_model("llama")
    for kwargs, match in [
        ({"tasks": ["qa"]}, "tasks"),
        ({"tasks": []}, "tasks"),
        ({"lengths": []}, "lengths"),
        ({"lengths": [4096]}, "max_position_embeddings"),
        ({"trials": 0}, "trials"),
    ]:
        with pytest.raises(ValueError, match=match):
            run_ruler(model, char_tokenizer, {REFERENCE: None}, **{"lengths": [LENGTH], **kwargs}, progress=False)
    with pytest.raises(TypeError, match="configs"):
        run_ruler(model, char_tokenizer, {"x": "int:4"}, [LENGTH], progress=False)
    assert parse_tasks("all") == list(TASKS) and parse_tasks("cwe, multikey") == ["cwe", "multikey"]
    assert parse_context("4096,8192") == [4096, 8192]
    for bad in ("", "qa", "cwe,qa"):
        with pytest.raises(ValueError, match="--tasks"):
            parse_tasks(bad)
    for bad in ("", "4k", "0"):
        with pytest.raises(ValueError, match="--context"):
            parse_context(bad)


def test_cli_errors_come_before_the_model_loads(capsys):
    assert main(["ruler", "--tasks", "qa"]) == 2
    assert "--tasks" in capsys.readouterr().err
    assert main(["ruler", "--context", "4k"]) == 2
    assert "--context" in capsys.readouterr().err
    assert main(["ruler", "--trials", "0"]) == 2
    assert main(["ruler", "--preset", "no-such-preset"]) == 2
    assert main(["ruler", "--policy", "/no/such/policy.json"]) == 2
    assert "no policy file" in capsys.readouterr().err


def test_run_on_a_tiny_model_scores_every_answer(char_tokenizer, tmp_path):
    model = tiny_model("llama")
    configs = {REFERENCE: None, "int:4": CachePolicy("int:4", "int:4", residual=16, sinks=1, block=16)}
    result = run_ruler(model, char_tokenizer, configs, [LENGTH], TASKS, trials=1, progress=False, model_name="tiny")
    assert len(result.samples) == len(TASKS) * len(configs)
    for s in result.samples:
        assert s["score"] == recall(s["answer"], tuple(s["expected"]))
        i = result.tasks.index(s["task"])
        assert result.accuracy[s["config"]][i][0] == s["score"]  # one trial: the cell is its score
    assert math.isnan(result.bits_per_value[REFERENCE][0])  # held in the model dtype
    assert 4 < result.bits_per_value["int:4"][0] < 16
    table = format_table(result)
    assert all(t in table for t in TASKS) and "int:4" in table and "16*" in table
    assert json.loads(json.dumps(result.to_dict()))["tasks"] == list(TASKS)
    assert plot_heatmap(result, tmp_path / "ruler.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.model
def test_smollm2_at_1k_through_the_harness_answers_as_generate_does(smollm2):
    model, tokenizer = smollm2
    for task in TASKS:
        sample = make_sample(tokenizer, task, 1024)
        total = sample.context.numel() + sample.question.numel() + sample.answer_tokens
        assert total == 1024 if task != "cwe" else 1000 < total <= 1024
    result = run_ruler(model, tokenizer, {REFERENCE: None}, [1024], ["multikey"], trials=1, progress=False)
    (sample,) = result.samples
    assert result.accuracy[REFERENCE] == [[1.0]], sample  # the uncompressed model finds one key of four at 1K
    # the harness (exact prefill recorded, then decoded through a filled cache) answers as plain generate does
    prompt = make_sample(tokenizer, "multikey", 1024)
    full = torch.cat([prompt.context, prompt.question])[None]
    out = model.generate(
        full, attention_mask=torch.ones_like(full), max_new_tokens=prompt.answer_tokens, do_sample=False
    )
    assert tokenizer.decode(out[0, full.shape[1] :], skip_special_tokens=True) == sample["answer"]
