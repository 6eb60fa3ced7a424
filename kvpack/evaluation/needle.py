"""``kvpack needle``: passkey retrieval (needle in a haystack) through a compressed KV cache.

The passkey test of Mohtashami & Jaggi (Landmark Attention, arXiv 2305.16300), as used by KIVI
(arXiv 2402.02750) and LongBench-style evaluations of KV compression: a random 5-digit passkey
("The pass key is 71432. Remember it. 71432 is the pass key.") is hidden at a relative ``depth``
of a filler context (repeated neutral sentences, or a span of a given text) whose prompt is
``length`` tokens long including the answer; the model is asked for it in its chat template and
answers by greedy decoding. A trial is correct when the first number in the answer is the passkey.

Protocol (the ``snapshot`` of `kvpack.evaluate`): the context (chat header, instruction and the
haystack with the needle) is prefilled once with exact attention and its K/V recorded; for each
configuration that K/V is stored in a fresh cache (`KVPackCache` under the configuration's
`CachePolicy`, or a `DynamicCache` for the uncompressed reference), and the question and the answer
are then decoded through it with ``model.generate(past_key_values=cache)``. So the question reads
the compressed haystack, as it does when a long document is cached and queried later; the
prefill is shared by all configurations (the costly part on a CPU). Passkeys are drawn from a
seeded generator per (length, depth, trial): same seed, same prompts, same answers.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kvpack.evaluation.haystack import (
    DEFAULT_FILLER,
    REFERENCE,
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
    "DEFAULT_FILLER",
    "REFERENCE",
    "NeedleResult",
    "add_arguments",
    "build_prompt",
    "configs_from_args",
    "format_table",
    "parse_fractions",
    "parse_lengths",
    "passkey_for",
    "plot_heatmap",
    "run",
    "run_needle",
    "score_answer",
]

logger = logging.getLogger(__name__)

INSTRUCTION = (
    "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the pass key.\n\n"
)
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
# "5-digit" in the question: without it SmolLM2-135M answers "a magical item ..." at 4K tokens (measured)
QUESTION = "\n\nWhat is the 5-digit pass key?"
ANSWER_PREFIX = "The 5-digit pass key is"


def passkey_for(seed: int, length: int, depth: float, trial: int) -> int:
    """The 5-digit passkey of one trial: seeded by (seed, length, depth, trial), independent of the grid."""
    return random.Random(f"kvpack-needle:{seed}:{length}:{depth:.4f}:{trial}").randint(10000, 99999)


def score_answer(answer: str, passkey: int) -> bool:
    """True when the first number in ``answer`` is ``passkey`` (digits separated by spaces/commas are joined)."""
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__}")
    match = re.search(r"\d[\d ,]*", answer)
    return match is not None and re.sub(r"[ ,]", "", match.group()) == str(passkey)


def build_prompt(
    tokenizer,
    length: int,
    depth: float,
    passkey: int,
    filler_text: str | None = None,
    answer_tokens: int = 8,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(context_ids, question_ids)`` 1-D LongTensors whose lengths sum to ``length - answer_tokens``.

    The haystack is the filler repeated (or the text from token ``offset`` on) cut to fit, with the
    needle inserted at the sentence start nearest to ``depth`` of it (``filler_text``: at the token
    nearest to ``depth``). ``context_ids``: chat header, instruction, haystack; ``question_ids``:
    question, assistant header and the answer prefix `ANSWER_PREFIX`.
    """
    head, tail = chat_frame(tokenizer, INSTRUCTION, QUESTION, ANSWER_PREFIX)
    filler = load_filler(tokenizer, filler_text)
    needle = token_ids(tokenizer, NEEDLE.format(key=passkey))
    n_hay = length - answer_tokens - len(head) - len(tail) - len(needle)
    if n_hay < 1:
        raise ValueError(
            f"length {length} leaves no room for a haystack: the prompt's fixed parts take "
            f"{length - n_hay - 1} tokens; use a longer length"
        )
    hay = haystack(filler, n_hay, offset)
    if filler.boundaries:  # the sentence starts of the filler from its start (not from ``offset``), as always here
        at = min(sentence_starts(filler, n_hay), key=lambda s: (abs(s - depth * n_hay), s))
    else:
        at = round(depth * n_hay)
    context = head + hay[:at] + needle + hay[at:]
    return torch.tensor(context, dtype=torch.long), torch.tensor(tail, dtype=torch.long)


@dataclass(frozen=True)
class NeedleResult:
    """Accuracy per configuration, length and depth; every trial's answer; bits held at each length."""

    model: str
    filler: str
    lengths: list[int]
    depths: list[float]
    trials: int
    configs: dict[str, dict]  # name -> policy fields (None for the reference)
    accuracy: dict[str, list[list[float]]]  # name -> [length][depth]
    bits_per_value: dict[str, list[float]]  # name -> [length], measured after the context is stored
    # name -> [length][depth]: mean NLL (nats per token) of the passkey's tokens, teacher-forced after the question
    answer_nll: dict[str, list[list[float]]] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _check_grid(lengths, depths, trials) -> None:
    if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lengths):
        raise ValueError(f"lengths must be a non-empty list of positive ints, got {lengths!r}")
    if not depths or any(isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 1 for d in depths):
        raise ValueError(f"depths must be a non-empty list of fractions in [0, 1], got {depths!r}")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be an int >= 1, got {trials!r}")


def run_needle(
    model,
    tokenizer,
    configs: dict[str, CachePolicy | None],
    lengths: list[int],
    depths: list[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    trials: int = 3,
    filler_text: str | None = None,
    seed: int = 0,
    answer_tokens: int = 8,
    progress: bool = True,
    model_name: str = "",
    filler_label: str = "sentences",
) -> NeedleResult:
    """Passkey accuracy of each configuration (``None``: `DynamicCache`) over lengths x depths x trials.

    Each prompt is prefilled once; every configuration decodes ``answer_tokens`` tokens greedily
    through its own cache holding that prefill. ``lengths`` above the model's
    ``max_position_embeddings`` are refused.
    """
    lengths, depths = list(lengths), [float(d) for d in depths]
    _check_grid(lengths, depths, trials)
    check_configs(configs)
    check_lengths(model, lengths)
    device = next(model.parameters()).device
    correct = {name: torch.zeros(len(lengths), len(depths)) for name in configs}
    nll = {name: torch.zeros(len(lengths), len(depths), dtype=torch.float64) for name in configs}
    bits = {name: [float("nan")] * len(lengths) for name in configs}
    samples, t0 = [], time.perf_counter()
    grid = [(i, j, t) for i in range(len(lengths)) for j in range(len(depths)) for t in range(trials)]
    with torch.inference_mode():
        for i, j, t in tqdm(grid, desc="needle", unit="prompt", disable=not progress):
            length, depth = lengths[i], depths[j]
            key = passkey_for(seed, length, depth, t)
            context, question = build_prompt(tokenizer, length, depth, key, filler_text, answer_tokens, offset=997 * t)
            context, question = context.to(device), question.to(device)
            expected = torch.tensor(token_ids(tokenizer, f" {key}"), dtype=torch.long, device=device)
            answers = answer_through(model, tokenizer, configs, context, question, answer_tokens, expected)
            for name, got in answers.items():
                if configs[name] is not None and math.isnan(bits[name][i]):
                    bits[name][i] = got.bits
                ok = score_answer(got.text, key)
                correct[name][i, j] += ok
                nll[name][i, j] += got.nll / trials
                samples.append(
                    {"config": name, "length": length, "depth": depth, "trial": t, "passkey": key,
                     "answer": got.text, "correct": ok, "answer_nll": got.nll,
                     "prompt_tokens": context.numel() + question.numel()}
                )  # fmt: skip
    return NeedleResult(
        model=model_name, filler=filler_label, lengths=lengths, depths=depths, trials=trials,
        configs={n: None if p is None else policy_to_dict(p) for n, p in configs.items()},
        accuracy={n: (c / trials).tolist() for n, c in correct.items()}, bits_per_value=bits,
        answer_nll={n: v.tolist() for n, v in nll.items()}, samples=samples, seconds=time.perf_counter() - t0,
    )  # fmt: skip


def format_table(result: NeedleResult) -> str:
    """Accuracy per length (rows) and depth (columns) for each configuration, with the bits held."""
    width = max(len(name) for name in result.accuracy) + 2
    depth_cols = "".join(f"{f'{100 * d:.0f}%':>7}" for d in result.depths)
    lines = [
        f"kvpack needle  model={result.model}  filler={result.filler}  trials per cell={result.trials}  "
        + f"({result.seconds:.0f} s)",
        "",
        f"{'config':{width}}{'length':>7}{'bits':>7}{depth_cols}{'mean':>7}",
    ]
    for name, acc in result.accuracy.items():
        for i, length in enumerate(result.lengths):
            b = result.bits_per_value[name][i]
            row = "".join(f"{100 * a:6.0f}%" for a in acc[i])
            mean = 100 * sum(acc[i]) / len(acc[i])
            lines.append(f"{name:{width}}{length:7d}{'16*' if math.isnan(b) else f'{b:.2f}':>7}{row}{mean:6.0f}%")
    if result.answer_nll:
        lines += ["", "passkey NLL (nats per token, teacher-forced after the question; mean over trials):", ""]
        lines.append(f"{'config':{width}}{'length':>7}{'':>7}{depth_cols}{'mean':>7}")
        for name, nll in result.answer_nll.items():
            for i, length in enumerate(result.lengths):
                row = "".join(f"{v:7.3f}" for v in nll[i])
                lines.append(f"{name:{width}}{length:7d}{'':>7}{row}{sum(nll[i]) / len(nll[i]):7.3f}")
    lines += ["", "bits: measured average bits per K/V value held after the context is stored (* model dtype)."]
    return "\n".join(lines)


def plot_heatmap(result: NeedleResult, path: str | Path) -> Path:
    """One panel per configuration: accuracy, lengths (rows) x depths (columns), annotated."""
    panels = len(result.accuracy)
    return accuracy_heatmaps(
        result.accuracy, [str(n) for n in result.lengths], [f"{100 * d:.0f}" for d in result.depths],
        xlabel="depth %", ylabel="length (tokens)", label="accuracy",
        title=f"passkey retrieval, {result.model}, {result.trials} trials per cell",
        figsize=(1.0 + 0.55 * len(result.depths) * panels, 0.6 + 0.45 * len(result.lengths) + 0.8), path=path,
    )  # fmt: skip


# ---- command line -------------------------------------------------------------------------------


def parse_lengths(text: str) -> list[int]:
    """``"1024,2048"`` -> ``[1024, 2048]``; ValueError naming ``--lengths`` otherwise."""
    return comma_ints(text, f"--lengths must be comma-separated positive ints, got {text!r}")


def parse_fractions(text: str) -> list[float]:
    """``"0,25,50"`` (percent) or ``"0,0.5,1"`` (fractions) -> fractions in [0, 1]; ValueError naming ``--depths``."""
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(
            f"--depths must be comma-separated numbers (percent 0..100 or fractions), got {text!r}"
        ) from None
    if vals and max(vals) > 1:
        vals = [v / 100 for v in vals]
    if not vals or any(not 0 <= v <= 1 for v in vals):
        raise ValueError(f"--depths must be in 0..100 (percent) or 0..1 (fractions), got {text!r}")
    return vals


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kvpack.cli import output_file
    from kvpack.evaluation.eval_cli import MODEL_HELP

    parser.add_argument("--model", default="smollm2", help=MODEL_HELP)
    parser.add_argument(
        "--text",
        default=None,
        help="filler text (a file, 'wikitext2', 'wikitext2-excerpt', 'pydoc'); default: repeated sentences",
    )
    add_config_arguments(parser)
    parser.add_argument("--lengths", default="1024,2048,4096", help="prompt lengths in tokens, answer included")
    parser.add_argument("--depths", default="0,25,50,75,100", help="needle depths, percent of the haystack")
    parser.add_argument("--trials", type=int, default=3, help="passkeys per (length, depth) cell")
    parser.add_argument("--seed", type=int, default=0, help="passkey and codec seed")
    parser.add_argument("--no-reference", action="store_true", help="skip the uncompressed DynamicCache reference")
    parser.add_argument("--json", default=None, metavar="OUT", type=output_file, help="write the result as JSON to OUT")
    parser.add_argument(
        "--plot", default=None, metavar="PNG", type=output_file, help="write the accuracy heatmap to PNG"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from kvpack.evaluation.models import load
    from kvpack.evaluation.text import load_text, text_label

    lengths, depths = parse_lengths(args.lengths), parse_fractions(args.depths)
    _check_grid(lengths, depths, args.trials)
    configs = configs_from_args(args)
    filler = None if args.text is None else load_text(args.text)
    model, tokenizer = load(args.model)
    from kvpack.evaluation.presets import resolve_preset

    for preset in args.preset or ():
        configs[f"preset {preset}"] = resolve_preset(preset, (model, tokenizer), not args.no_calibration, args.seed)
    result = run_needle(
        model, tokenizer, configs, lengths, depths, args.trials, filler, args.seed, progress=not args.no_progress,
        model_name=str(args.model), filler_label="sentences" if args.text is None else text_label(args.text),
    )  # fmt: skip
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {plot_heatmap(result, args.plot)}")
    return 0
