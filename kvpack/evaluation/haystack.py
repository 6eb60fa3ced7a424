"""What the retrieval tests (`kvpack needle`, `kvpack ruler`) share: prompts in the model's chat template,
a filler haystack with its sentence starts, answers decoded through a compressed cache, and the options
naming the cache configurations on the command line.

Protocol of every answer (:func:`answer_through`): the context is prefilled once with exact attention
and its K/V recorded (`kvpack.evaluation.protocol.clean_prefill`); for each configuration that K/V is
stored in a fresh cache (`KVPackCache` under its `CachePolicy`, or a `DynamicCache` for the uncompressed
reference) exactly as a prefill through that cache stores it, and the question and the answer are then
decoded through it with ``model.generate(past_key_values=cache)``: each generated token attends to the
packed past as in generation. The prefill is shared by all configurations (the costly part on a CPU).
"""

from __future__ import annotations

import argparse
import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from kvpack.evaluation.protocol import Prefill, clean_prefill, store_prefill
from kvpack.policy import CachePolicy
from kvpack.hf.config import cache_kwargs

__all__ = [
    "DEFAULT_FILLER",
    "REFERENCE",
    "Answer",
    "Filler",
    "accuracy_heatmaps",
    "add_config_arguments",
    "answer_through",
    "chat_frame",
    "check_configs",
    "check_lengths",
    "comma_ints",
    "configs_from_args",
    "filled_cache",
    "haystack",
    "load_filler",
    "sentence_starts",
    "token_ids",
]

REFERENCE = "uncompressed"  # name of the DynamicCache reference configuration
DEFAULT_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def token_ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def chat_frame(tokenizer, before: str, after: str, answer_prefix: str) -> tuple[list[int], list[int]]:
    """``(head, tail)`` token ids of one user turn ``before + CONTEXT + after`` in the tokenizer's chat template
    (plain text for a base model) with the assistant's answer started by ``answer_prefix``: ``head`` is
    everything before the context, ``tail`` everything after it."""
    marker = "\x00HAYSTACK\x00"
    messages = [{"role": "user", "content": before + marker + after}]
    if getattr(tokenizer, "chat_template", None):
        chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:  # a base model: the plain text
        chat = before + marker + after + "\n"
    head, tail = chat.split(marker)
    return token_ids(tokenizer, head), token_ids(tokenizer, tail + answer_prefix)


@dataclass(frozen=True)
class Filler:
    """Token ids of the filler and the offsets in them where a sentence starts (empty: a text, any token)."""

    ids: list[int]
    boundaries: list[int]


def load_filler(tokenizer, filler_text: str | None = None) -> Filler:
    """`DEFAULT_FILLER`'s sentences tokenized one by one (``None``), or ``filler_text`` with its whitespace
    collapsed; ValueError when that text has no tokens."""
    if filler_text is None:
        sentences = [s + "." for s in DEFAULT_FILLER.split(".") if s.strip()]
        pieces = [token_ids(tokenizer, s) for s in sentences]
        starts = [0]
        for p in pieces[:-1]:
            starts.append(starts[-1] + len(p))
        return Filler([t for p in pieces for t in p], starts)
    ids = token_ids(tokenizer, " " + " ".join(filler_text.split()))
    if not ids:
        raise ValueError("the filler text is empty")
    return Filler(ids, [])


def haystack(filler: Filler, n: int, offset: int = 0) -> list[int]:
    """``n`` token ids: the filler repeated, from its token ``offset`` on."""
    reps = math.ceil((n + offset) / len(filler.ids)) + 1
    return (filler.ids * reps)[offset : offset + n]


def sentence_starts(filler: Filler, n: int, offset: int = 0) -> list[int]:
    """Offsets in :func:`haystack` ``(filler, n, offset)`` where a sentence starts, and ``n`` (its end); every
    offset in ``0..n`` for a filler without sentence boundaries."""
    if not filler.boundaries:
        return list(range(n + 1))
    period, bounds = len(filler.ids), set(filler.boundaries)
    return [p for p in range(n) if (p + offset) % period in bounds] + [n]


def check_configs(configs) -> None:
    if not configs or not all(p is None or isinstance(p, CachePolicy) for p in configs.values()):
        raise TypeError("configs must map names to kvpack.CachePolicy or None (the uncompressed reference)")


def check_lengths(model, lengths: list[int]) -> None:
    """ValueError naming ``lengths`` when one is above the model's ``max_position_embeddings``."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max(lengths) > limit:
        raise ValueError(f"lengths {lengths} exceed the model's context length max_position_embeddings={limit}")


def filled_cache(model, policy: CachePolicy | None, prefill: Prefill):
    """A fresh cache under ``policy`` (``None``: `DynamicCache`) holding ``prefill``."""
    from transformers import DynamicCache

    from kvpack.hf.cache import KVPackCache

    cache = DynamicCache(config=model.config) if policy is None else KVPackCache(model.config, policy=policy)
    return store_prefill(cache, prefill)


@dataclass(frozen=True)
class Answer:
    """One configuration's answer: the greedy ``text``, the ``bits`` held after the prefill (NaN for the
    reference) and ``nll``: the mean negative log-likelihood (nats per token) of the expected answer's tokens,
    teacher-forced after the question through a cache holding the same prefill (NaN when none was given)."""

    text: str
    bits: float
    nll: float = float("nan")


def answer_through(
    model, tokenizer, configs: dict[str, CachePolicy | None], context: torch.Tensor, question: torch.Tensor,
    answer_tokens: int, expected: torch.Tensor | None = None,
) -> dict[str, Answer]:  # fmt: skip
    """``{name: Answer}``: ``answer_tokens`` greedy tokens after ``context`` and ``question`` (1-D LongTensors on
    the model's device), decoded through each configuration's cache holding the clean prefill of ``context``;
    bits: ``cache.bits_per_value()`` after the prefill is stored (NaN for the reference). ``expected`` (1-D ids):
    also its NLL after the question, a margin that moves before the greedy answer flips."""
    prefill = clean_prefill(model, context[None])
    full = torch.cat([context, question])[None]
    out = {}
    for name, policy in configs.items():
        cache = filled_cache(model, policy, prefill)
        bits = float("nan") if policy is None else cache.bits_per_value()
        scoring = copy.deepcopy(cache) if expected is not None and expected.numel() else None  # generate advances it
        ids = model.generate(
            full, attention_mask=torch.ones_like(full), **cache_kwargs(model, cache), max_new_tokens=answer_tokens,
            do_sample=False, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        nll = float("nan")
        if scoring is not None:
            forced = torch.cat([question, expected[:-1]])[None]
            logits = model(forced, **cache_kwargs(model, scoring)).logits[0, -expected.numel() :]
            nll = float(torch.nn.functional.cross_entropy(logits.float(), expected))
        out[name] = Answer(tokenizer.decode(ids[0, full.shape[1] :], skip_special_tokens=True), bits, nll)
    return out


# ---- command line -------------------------------------------------------------------------------


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--key/--value/--residual/--block/--sinks`` (repeatable), ``--skip-layers``, ``--center-keys``, ``--preset``,
    ``--no-calibration``, ``--policy`` (repeatable)."""
    from kvpack.evaluation.eval_cli import CENTER_KEYS_HELP, preset_names

    parser.add_argument("--key", action="append", default=None, help="K codec spec; repeat for several configs")
    parser.add_argument("--value", action="append", default=None, help="V codec spec; repeat for several configs")
    parser.add_argument(
        "--residual", action="append", type=int, default=None, help="recent tokens kept in 16 bits (default 128)"
    )
    parser.add_argument(
        "--block",
        action="append",
        type=int,
        default=None,
        help="tokens packed at once (default 32; 1 with --residual 0); repeat for several configs",
    )
    parser.add_argument("--sinks", action="append", type=int, default=None, help="first tokens kept (default 4)")
    parser.add_argument("--skip-layers", default=None, help="comma-separated layer indices kept in full precision")
    parser.add_argument("--center-keys", action="store_true", help=f"--key/--value configs: {CENTER_KEYS_HELP}")
    parser.add_argument(
        "--preset", action="append", default=None, help=f"a named policy; repeat for several: {preset_names()}"
    )
    parser.add_argument("--no-calibration", action="store_true", help="presets from the model's config alone")
    parser.add_argument("--policy", action="append", default=None, metavar="PATH",
                        help="a policy JSON file (kvpack allocate, a preset's cached file); repeat for several")


def configs_from_args(args: argparse.Namespace) -> dict[str, CachePolicy | None]:
    """Named policies from repeated ``--key/--value/--residual/--sinks`` (a single value applies to all) and ``--preset``."""
    from kvpack.evaluation.eval_cli import DEFAULTS

    configs: dict[str, CachePolicy | None] = {} if args.no_reference else {REFERENCE: None}
    skip = ()
    if args.skip_layers:
        try:
            skip = tuple(int(i) for i in args.skip_layers.split(",") if i.strip())
        except ValueError:
            raise ValueError(f"--skip-layers must be comma-separated ints, got {args.skip_layers!r}") from None
    lists = {name: getattr(args, name, None) for name in ("key", "value", "residual", "sinks", "block")}
    n = max((len(v) for v in lists.values() if v), default=0)
    for name, vals in lists.items():
        if vals and len(vals) not in (1, n):
            raise ValueError(f"--{name} given {len(vals)} times; give it once (for all) or {n} times (one per config)")
    for i in range(n):
        pick = {name: DEFAULTS.get(name) if not v else v[0] if len(v) == 1 else v[i] for name, v in lists.items()}
        key, value = (None if s.lower() == "none" else s for s in (pick["key"], pick["value"]))
        centered = bool(getattr(args, "center_keys", False))
        policy = CachePolicy(key, value, pick["residual"], pick["sinks"], skip, pick["block"], args.seed,
                             center_keys=centered)  # fmt: skip
        suffix = ("" if pick["block"] is None else f" b={pick['block']}") + (" centered" if centered else "")
        configs[f"k={key} v={value} r={pick['residual']} s={pick['sinks']}{suffix}"] = policy
    for preset in args.preset or ():  # resolved for the model once it is loaded (`preset_configs`)
        from kvpack.evaluation.presets import check_preset

        check_preset(preset)
    paths = getattr(args, "policy", None) or []
    for i, path in enumerate(paths):  # read now: a missing or malformed file fails before any work
        from kvpack.policy import load_policy

        if Path(path).resolve() in {Path(p).resolve() for p in paths[:i]}:
            raise ValueError(f"--policy {path!r} given twice")
        name = f"policy {Path(path).stem}"
        configs[f"policy {path}" if name in configs else name] = load_policy(path)  # one stem twice: the paths
    others = bool(args.preset or getattr(args, "policy", None))
    if len(configs) == (0 if args.no_reference else 1) and not others:  # nothing asked: the eval default
        configs["k={key} v={value} r={residual} s={sinks}".format(**DEFAULTS)] = CachePolicy(
            DEFAULTS["key"], DEFAULTS["value"], DEFAULTS["residual"], DEFAULTS["sinks"], skip, None, args.seed
        )
    return configs


def comma_ints(text: str, error: str) -> list[int]:
    """``"1024,2048"`` -> ``[1024, 2048]``: comma-separated positive ints, else ``ValueError(error)``."""
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(error) from None
    if not out or any(n < 1 for n in out):
        raise ValueError(error)
    return out


def accuracy_heatmaps(accuracy: dict, rows: list[str], columns: list[str], *, xlabel: str, ylabel: str | None,
                      label: str, title: str, figsize: tuple[float, float], path: str | Path) -> Path:  # fmt: skip
    """One annotated panel per configuration of ``accuracy`` (name -> rows x columns in [0, 1]), saved to ``path``:
    the heatmaps of `kvpack needle` and `kvpack ruler`. ``ylabel`` goes on the first panel only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(accuracy)
    fig, axes = plt.subplots(1, len(names), figsize=figsize, squeeze=False, constrained_layout=True)
    for ax, name in zip(axes[0], names):
        acc = torch.tensor(accuracy[name])
        im = ax.imshow(acc.numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for r in range(acc.shape[0]):
            for c in range(acc.shape[1]):
                ax.text(c, r, f"{100 * float(acc[r, c]):.0f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(columns)), columns, fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_title(name, fontsize=7)
    if ylabel:
        axes[0][0].set_ylabel(ylabel, fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label=label)
    fig.suptitle(title, fontsize=9)
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
