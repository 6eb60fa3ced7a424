"""``kvpack ruler``: RULER-style synthetic retrieval tasks through a compressed KV cache, generated locally.

Four task kinds of RULER (Hsieh et al., arXiv 2404.06654), written here from the paper's descriptions:

- ``multikey`` (MK-NIAH): four needles "One of the special magic numbers for KEY is: VALUE." with distinct
  keys hidden in the filler; the question asks for one key's 7-digit value.
- ``multivalue`` (MV-NIAH): four needles with the same key and different values; all four are asked for.
- ``vartrack`` (variable tracking): a chain ``VAR A = 12345. VAR B = VAR A. ...`` (4 hops) hidden in the
  filler, in order; the question asks for every variable that holds the value (all 5 names).
- ``cwe`` (common-word extraction): a numbered list of words, 10 of them repeated far more often than the
  rest; the question asks for the 10 most common.

Keys, values, variable names and words are drawn from a generator seeded by (seed, task, length, trial),
words as pseudo-words of 2-3 syllables, so nothing is downloaded and the same seed gives the same prompts.
A prompt is ``length`` tokens long including the answer budget; a trial scores the fraction of the expected
strings the greedy answer contains as whole words, case-insensitive (RULER's recall of all references).
Every answer is decoded as generation does (`kvpack.evaluation.haystack.answer_through`): a clean prefill
of the context stored in each configuration's cache, then the question and answer through it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kvpack.evaluation.haystack import (
    accuracy_heatmaps,
    add_config_arguments,
    answer_through,
    chat_frame,
    check_configs,
    check_lengths,
    comma_ints,
    configs_from_args,
    haystack,
    load_filler,
    sentence_starts,
    token_ids,
)
from kvpack.policy import CachePolicy, policy_to_dict

__all__ = [
    "TASKS",
    "RulerResult",
    "RulerSample",
    "add_arguments",
    "format_table",
    "make_sample",
    "parse_context",
    "parse_tasks",
    "plot_heatmap",
    "recall",
    "run",
    "run_ruler",
]

TASKS = ("multikey", "multivalue", "vartrack", "cwe")
NUM_NEEDLES = 4  # keys of multikey, values of multivalue
HOPS = 4  # assignments after the first in vartrack: 5 variables hold the value
COMMON, COMMON_FREQ, RARE_FREQ = 10, 30, 3  # cwe: 10 words 30 times each (fewer at short lengths), the rest 3
MAGIC = "Some special magic numbers are hidden inside the following text. Memorize them: I will ask about them.\n\n"
MAGIC_NEEDLE = " One of the special magic numbers for {key} is: {value}."
ANSWER_TOKENS = {"multikey": 16, "multivalue": 48, "vartrack": 32, "cwe": 48}


def recall(answer: str, expected: tuple[str, ...]) -> float:
    """Fraction of ``expected`` found in ``answer`` as whole words (not inside a longer word or number),
    case-insensitive."""
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__}")
    if not expected:
        raise ValueError("expected must name at least one string")
    found = [re.search(rf"(?<!\w){re.escape(e)}(?!\w)", answer, re.IGNORECASE) is not None for e in expected]
    return sum(found) / len(found)


@dataclass(frozen=True)
class RulerSample:
    """One prompt: ``context`` and ``question`` 1-D LongTensors whose lengths plus ``answer_tokens`` make the
    asked length (``cwe``: at most, its list ends at a whole group of words) and the strings a correct answer
    contains."""

    task: str
    context: torch.Tensor
    question: torch.Tensor
    expected: tuple[str, ...]
    answer_tokens: int


def _words(rng: random.Random, n: int, taken: set[str] = frozenset()) -> list[str]:
    """``n`` distinct pseudo-words (2-3 consonant-vowel syllables) not in ``taken``."""
    out: list[str] = []
    while len(out) < n:
        word = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 3)))
        if word not in taken and word not in out:
            out.append(word)
    return out


def _numbers(rng: random.Random, n: int, digits: int) -> list[str]:
    return [str(v) for v in rng.sample(range(10 ** (digits - 1), 10**digits), n)]


def _in_haystack(tokenizer, rng, filler, length, head, tail, answer_tokens, needles, ordered) -> torch.Tensor:
    """Context ids: ``head`` then the filler with ``needles`` (texts) at distinct random sentence starts (in the
    given order when ``ordered``), cut so that context, ``tail`` and the answer make ``length`` tokens."""
    pieces = [token_ids(tokenizer, n) for n in needles]
    n_hay = length - answer_tokens - len(head) - len(tail) - sum(map(len, pieces))
    if n_hay < len(pieces):
        raise ValueError(
            f"length {length} leaves no room for a haystack: the prompt's fixed parts and needles take "
            f"{length - max(n_hay, 0)} tokens; use a longer length"
        )
    offset = rng.randrange(len(filler.ids))
    hay, starts = haystack(filler, n_hay, offset), sentence_starts(filler, n_hay, offset)
    at = sorted(rng.sample(starts, len(pieces))) if len(starts) >= len(pieces) else [n_hay] * len(pieces)
    if not ordered:
        rng.shuffle(pieces)
    context, prev = list(head), 0
    for pos, piece in zip(at, pieces):
        context += hay[prev:pos] + piece
        prev = pos
    return torch.tensor(context + hay[prev:], dtype=torch.long)


def _magic(tokenizer, rng, filler, length, multivalue: bool) -> RulerSample:
    task = "multivalue" if multivalue else "multikey"
    keys = _words(rng, 1 if multivalue else NUM_NEEDLES)
    values = _numbers(rng, NUM_NEEDLES, 7)
    pairs = [(keys[0], v) for v in values] if multivalue else list(zip(keys, values))
    key = keys[0] if multivalue else rng.choice(keys)
    if multivalue:
        question = f"\n\nWhat are all the special magic numbers for {key} mentioned in the text?"
        prefix, expected = f"The special magic numbers for {key} mentioned in the text are", tuple(values)
    else:
        question = f"\n\nWhat is the special magic number for {key} mentioned in the text?"
        prefix, expected = f"The special magic number for {key} mentioned in the text is", (dict(pairs)[key],)
    head, tail = chat_frame(tokenizer, MAGIC, question, prefix)
    needles = [MAGIC_NEEDLE.format(key=k, value=v) for k, v in pairs]
    context = _in_haystack(tokenizer, rng, filler, length, head, tail, ANSWER_TOKENS[task], needles, ordered=False)
    return RulerSample(task, context, torch.tensor(tail, dtype=torch.long), expected, ANSWER_TOKENS[task])


def _vartrack(tokenizer, rng, filler, length) -> RulerSample:
    names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(HOPS + 1)]
    if len(set(names)) < len(names):  # 26^5 draws: a repeat is rare; redraw deterministically
        names = [f"{n}{i}" for i, n in enumerate(names)]
    value = _numbers(rng, 1, 5)[0]
    chain = [f" VAR {names[0]} = {value}."] + [f" VAR {b} = VAR {a}." for a, b in itertools.pairwise(names)]
    question = f"\n\nFind all variables that are assigned the value {value} in the text above."
    prefix = (
        f"Answer: According to the chain of variable assignments in the text above, {HOPS + 1} variables are "
        f"assigned the value {value}, they are:"
    )
    head, tail = chat_frame(tokenizer, "Memorize and track the chain of variable assignments in this text.\n\n",
                            question, prefix)  # fmt: skip
    context = _in_haystack(tokenizer, rng, filler, length, head, tail, ANSWER_TOKENS["vartrack"], chain, True)
    return RulerSample(
        "vartrack", context, torch.tensor(tail, dtype=torch.long), tuple(names), ANSWER_TOKENS["vartrack"]
    )


def _cwe(tokenizer, rng, length) -> RulerSample:
    question = f"\n\nWhat are the {COMMON} most common words in the above list?"
    prefix = f"Answer: The top {COMMON} words that appear most often in the list are:"
    head, tail = chat_frame(tokenizer, "Below is a numbered list of words. Some of them appear more often than "
                            "the others: memorize which.\n\n", question, prefix)  # fmt: skip
    budget = length - ANSWER_TOKENS["cwe"] - len(head) - len(tail)
    common = _words(rng, COMMON)
    cost = {w: len(token_ids(tokenizer, " " + w)) for w in common}
    number_cost = [0]  # number_cost[n]: tokens of the labels " 1." .. " n."

    def list_tokens(words: list[str], count: int) -> int:
        while len(number_cost) <= count:
            number_cost.append(number_cost[-1] + len(token_ids(tokenizer, f" {len(number_cost)}.")))
        return number_cost[count] + sum(cost[w] for w in words)

    freq = COMMON_FREQ  # at short lengths the common words take at most 3/4 of the list's tokens
    while freq > RARE_FREQ + 1 and list_tokens(common * freq, COMMON * freq) > budget * 3 // 4:
        freq -= 1
    if list_tokens(common * freq, COMMON * freq) > budget * 3 // 4:
        raise ValueError(f"length {length} is too short for common-word extraction: use a longer length")
    rare: list[str] = []
    while True:  # add rare words while the list still fits
        word = _words(rng, 1, set(common) | set(rare))[0]
        cost[word] = len(token_ids(tokenizer, " " + word))
        words = common * freq + (rare + [word]) * RARE_FREQ
        if list_tokens(words, len(words)) > budget:
            break
        rare.append(word)
    entries = common * freq + rare * RARE_FREQ
    rng.shuffle(entries)
    ids = [t for i, w in enumerate(entries, 1) for t in token_ids(tokenizer, f" {i}.") + token_ids(tokenizer, " " + w)]
    context = torch.tensor(head + ids, dtype=torch.long)
    return RulerSample("cwe", context, torch.tensor(tail, dtype=torch.long), tuple(common), ANSWER_TOKENS["cwe"])


def make_sample(tokenizer, task: str, length: int, seed: int = 0, trial: int = 0, filler_text: str | None = None):
    """The `RulerSample` of ``task`` at ``length`` tokens for (``seed``, ``trial``); deterministic."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    rng = random.Random(f"kvpack-ruler:{seed}:{task}:{length}:{trial}")
    if task == "cwe":
        return _cwe(tokenizer, rng, length)
    filler = load_filler(tokenizer, filler_text)
    if task == "vartrack":
        return _vartrack(tokenizer, rng, filler, length)
    return _magic(tokenizer, rng, filler, length, multivalue=task == "multivalue")


@dataclass(frozen=True)
class RulerResult:
    """Mean recall per configuration, task and length; every trial's answer; bits held at each length."""

    model: str
    tasks: list[str]
    lengths: list[int]
    trials: int
    configs: dict[str, dict | None]  # name -> policy fields (None for the reference)
    accuracy: dict[str, list[list[float]]]  # name -> [task][length]
    bits_per_value: dict[str, list[float]]  # name -> [length], measured after the context is stored
    samples: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _check_grid(tasks, lengths, trials) -> None:
    if not tasks or any(t not in TASKS for t in tasks):
        raise ValueError(f"tasks must be a non-empty list of {TASKS}, got {tasks!r}")
    if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lengths):
        raise ValueError(f"lengths must be a non-empty list of positive ints, got {lengths!r}")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be an int >= 1, got {trials!r}")


def run_ruler(
    model, tokenizer, configs: dict[str, CachePolicy | None], lengths: list[int], tasks: list[str] = TASKS,
    trials: int = 2, filler_text: str | None = None, seed: int = 0, progress: bool = True, model_name: str = "",
) -> RulerResult:  # fmt: skip
    """Mean `recall` of each configuration (``None``: `DynamicCache`) over tasks x lengths x trials; each prompt is
    prefilled once and answered through every configuration's cache. ``lengths`` above the model's
    ``max_position_embeddings`` are refused."""
    tasks, lengths = list(tasks), list(lengths)
    _check_grid(tasks, lengths, trials)
    check_configs(configs)
    check_lengths(model, lengths)
    device = next(model.parameters()).device
    score = {name: torch.zeros(len(tasks), len(lengths), dtype=torch.float64) for name in configs}
    bits = {name: [float("nan")] * len(lengths) for name in configs}
    samples, t0 = [], time.perf_counter()
    grid = [(i, j, t) for j in range(len(lengths)) for i in range(len(tasks)) for t in range(trials)]
    with torch.inference_mode():
        for i, j, t in tqdm(grid, desc="ruler", unit="prompt", disable=not progress):
            sample = make_sample(tokenizer, tasks[i], lengths[j], seed, t, filler_text)
            context, question = sample.context.to(device), sample.question.to(device)
            answers = answer_through(model, tokenizer, configs, context, question, sample.answer_tokens)
            for name, got in answers.items():
                bits[name][j], answer = got.bits, got.text
                s = recall(answer, sample.expected)
                score[name][i, j] += s
                samples.append(
                    {"config": name, "task": tasks[i], "length": lengths[j], "trial": t, "answer": answer,
                     "expected": list(sample.expected), "score": s,
                     "prompt_tokens": context.numel() + question.numel()}
                )  # fmt: skip
    return RulerResult(
        model=model_name, tasks=tasks, lengths=lengths, trials=trials,
        configs={n: None if p is None else policy_to_dict(p) for n, p in configs.items()},
        accuracy={n: (s / trials).tolist() for n, s in score.items()}, bits_per_value=bits,
        samples=samples, seconds=time.perf_counter() - t0,
    )  # fmt: skip


def format_table(result: RulerResult) -> str:
    """Mean recall per task (rows) and length (columns) for each configuration, with the bits held."""
    width = max(len(name) for name in result.accuracy) + 2
    cols = "".join(f"{n:>8}" for n in result.lengths)
    lines = [
        f"kvpack ruler  model={result.model}  trials per cell={result.trials}  ({result.seconds:.0f} s)",
        "",
        f"{'config':{width}}{'task':<12}{cols}",
    ]
    for name, acc in result.accuracy.items():
        for i, task in enumerate(result.tasks):
            lines.append(f"{name:{width}}{task:<12}" + "".join(f"{100 * a:7.0f}%" for a in acc[i]))
        mean = [
            sum(acc[i][j] for i in range(len(result.tasks))) / len(result.tasks) for j in range(len(result.lengths))
        ]
        held = "".join("     16*" if math.isnan(b) else f"{b:8.2f}" for b in result.bits_per_value[name])
        lines += [
            f"{name:{width}}{'mean':<12}" + "".join(f"{100 * m:7.0f}%" for m in mean),
            f"{'':{width}}{'bits':<12}{held}",
        ]
    note = "score: fraction of the expected strings in the answer; bits: measured after the context is stored"
    lines += ["", note + " (* model dtype)."]
    return "\n".join(lines)


def plot_heatmap(result: RulerResult, path: str | Path) -> Path:
    """One panel per configuration: mean recall, tasks (rows) x lengths (columns), annotated."""
    panels = len(result.accuracy)
    return accuracy_heatmaps(
        result.accuracy, list(result.tasks), [str(n) for n in result.lengths], xlabel="context (tokens)", ylabel=None,
        label="recall", title=f"RULER-style tasks, {result.model}, {result.trials} trials per cell",
        figsize=(1.6 + 0.8 * len(result.lengths) * panels, 1.4 + 0.45 * len(result.tasks)), path=path,
    )  # fmt: skip


# ---- command line -------------------------------------------------------------------------------


def parse_tasks(text: str) -> list[str]:
    """``"multikey,cwe"`` or ``"all"`` -> task names; ValueError naming ``--tasks`` otherwise."""
    tasks = list(TASKS) if text.strip() == "all" else [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if not tasks or bad:
        raise ValueError(f"--tasks must be 'all' or comma-separated names of {TASKS}, got {text!r}")
    return tasks


def parse_context(text: str) -> list[int]:
    """``"4096,8192"`` -> ``[4096, 8192]``; ValueError naming ``--context`` otherwise."""
    return comma_ints(text, f"--context must be comma-separated positive ints (tokens), got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kvpack.cli import output_file
    from kvpack.evaluation.eval_cli import MODEL_HELP

    parser.add_argument("--model", default="smollm2", help=MODEL_HELP)
    parser.add_argument(
        "--text", default=None, help="filler text (a file, 'wikitext2', 'pydoc', ...); default: repeated sentences"
    )
    add_config_arguments(parser)
    parser.add_argument("--context", default="4096", help="prompt lengths in tokens, answer included")
    parser.add_argument("--tasks", default="all", help=f"comma-separated tasks of {', '.join(TASKS)}, or all")
    parser.add_argument("--trials", type=int, default=2, help="prompts per (task, length) cell")
    parser.add_argument("--seed", type=int, default=0, help="task and codec seed")
    parser.add_argument("--no-reference", action="store_true", help="skip the uncompressed DynamicCache reference")
    parser.add_argument("--json", default=None, metavar="OUT", type=output_file, help="write the result as JSON to OUT")
    parser.add_argument("--plot", default=None, metavar="PNG", type=output_file, help="write the heatmap to PNG")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from kvpack.evaluation.models import load
    from kvpack.evaluation.presets import resolve_preset
    from kvpack.evaluation.text import load_text

    lengths, tasks = parse_context(args.context), parse_tasks(args.tasks)
    _check_grid(tasks, lengths, args.trials)
    configs = configs_from_args(args)
    filler = None if args.text is None else load_text(args.text)
    model, tokenizer = load(args.model)
    for preset in args.preset or ():
        configs[f"preset {preset}"] = resolve_preset(preset, (model, tokenizer), not args.no_calibration, args.seed)
    result = run_ruler(
        model, tokenizer, configs, lengths, tasks, args.trials, filler, args.seed, progress=not args.no_progress,
        model_name=str(args.model),
    )  # fmt: skip
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {plot_heatmap(result, args.plot)}")
    return 0
