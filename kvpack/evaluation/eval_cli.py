"""``kvpack eval``: delta-perplexity, top-1 agreement and KL of a cache policy on a real model and text.

The command line is a contract other tools call::

    kvpack eval --model smollm2 --text PATH --key SPEC --value SPEC [--residual N] [--sinks N]
                --ctx 1024 --n-eval 256 --windows 8 --protocol decode|snapshot|inforward [--only k|v] --json OUT

With no arguments it evaluates the default policy on SmolLM2 and the embedded default text, offline.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

__all__ = ["DEFAULTS", "add_arguments", "memory_line", "policy_summary", "run"]

# used when neither --preset nor the option is given: KIVI's layout at 4 bits (keys per channel)
DEFAULTS = {"key": "int:4:axis=channel", "value": "int:4", "residual": 128, "sinks": 4}
TEXT_HELP = (
    "the text: omit it for the built-in default (Python's reference documentation, offline), 'wikitext2' "
    "(WikiText-2 test: $KVPACK_WIKITEXT or a download), 'wikitext2-excerpt' (65k characters shipped with kvpack) "
    "or a UTF-8 text file"
)
MODEL_HELP = "'smollm2' (SmolLM2-135M, offline), a .gguf file, a local model directory or a hub id 'org/name'"
CENTER_KEYS_HELP = "pack keys relative to the prefill's mean key, as the presets do (CachePolicy.center_keys)"


def preset_names() -> str:
    from kvpack.evaluation.presets import known_presets

    return ", ".join(known_presets())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kvpack.cli import output_file

    parser.add_argument("--model", default="smollm2", help=MODEL_HELP)
    parser.add_argument("--text", default=None, help=TEXT_HELP)
    parser.add_argument("--key", default=None, help=f"codec spec for K, 'none': 16-bit (default {DEFAULTS['key']})")
    parser.add_argument("--value", default=None, help=f"codec spec for V, 'none': 16-bit (default {DEFAULTS['value']})")
    parser.add_argument("--residual", type=int, default=None,
                        help=f"newest tokens kept in 16 bits (default {DEFAULTS['residual']})")  # fmt: skip
    parser.add_argument("--sinks", type=int, default=None,
                        help=f"first tokens kept in 16 bits (default {DEFAULTS['sinks']})")  # fmt: skip
    parser.add_argument("--block", type=int, default=None,
                        help="tokens packed at once as the residual window ages (default 32; 1 with --residual 0 "
                             "packs every token past the sinks; snapshot protocol)")  # fmt: skip
    parser.add_argument("--skip-layers", default=None, help="comma-separated layer indices kept in full precision")
    parser.add_argument(
        "--preset",
        default=None,
        help=f"a policy derived for the loaded model instead of --key/--value/--residual/--sinks/--block: {preset_names()}",
    )
    parser.add_argument(
        "--no-calibration", action="store_true", help="--preset from the model's config alone (no calibration run)"
    )
    parser.add_argument("--policy", default=None, metavar="PATH", help="a policy JSON file (kvpack allocate)")
    parser.add_argument("--ctx", type=int, default=1024, help="context tokens per window")
    parser.add_argument("--n-eval", type=int, default=256, help="continuation tokens scored per window")
    parser.add_argument("--windows", type=int, default=8, help="non-overlapping windows evenly spread over the text")
    parser.add_argument("--protocol", choices=("decode", "snapshot", "inforward"), default="decode",
                        help="decode: each continuation token attends to the packed past as generate gives it; "
                             "snapshot: compress the prefilled context, score the continuation; inforward: every "
                             "position's K/V round-tripped inside one forward")  # fmt: skip
    parser.add_argument(
        "--pre-rope-keys", action="store_true", help="pack keys with RoPE undone (KVQuant), re-applied after decoding"
    )
    parser.add_argument("--center-keys", action="store_true", help=CENTER_KEYS_HELP)
    parser.add_argument("--only", choices=("k", "v"), default=None, help="compress only K or only V")
    parser.add_argument("--seed", type=int, default=0, help="codec seed")
    parser.add_argument("--json", default=None, metavar="OUT", type=output_file, help="write the result as JSON to OUT")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _policy_kwargs(args: argparse.Namespace) -> dict:
    given = {name: getattr(args, name) for name in ("key", "value", "residual", "sinks", "skip_layers", "block")}
    if getattr(args, "policy", None) is not None:
        clash = [f"--{name.replace('_', '-')}" for name, v in {**given, "preset": args.preset}.items() if v is not None]
        if clash:
            raise ValueError(f"--policy {args.policy} replaces {', '.join(clash)}: give one or the other")
        return _policy_file_kwargs(args.policy)
    if args.preset is not None:
        clash = [f"--{name.replace('_', '-')}" for name, v in given.items() if v is not None]
        if clash:
            raise ValueError(f"--preset {args.preset} replaces {', '.join(clash)}: give one or the other")
        return {"preset": args.preset, "calibration": not getattr(args, "no_calibration", False)}
    out = {name: DEFAULTS[name] if given[name] is None else given[name] for name in DEFAULTS}
    out["key"], out["value"] = (None if s.lower() == "none" else s for s in (out["key"], out["value"]))
    if given["skip_layers"]:
        try:
            out["skip_layers"] = tuple(int(i) for i in given["skip_layers"].split(",") if i.strip())
        except ValueError:
            raise ValueError(f"--skip-layers must be comma-separated ints, got {given['skip_layers']!r}") from None
    if given["block"] is not None:
        return _block_kwargs(args, out, given["block"])
    return out


def _block_kwargs(args: argparse.Namespace, out: dict, block: int) -> dict:
    """``--block``: a whole policy for evaluate() (its plain fields have no block)."""
    from kvpack.policy import CachePolicy

    if args.protocol == "inforward" or args.pre_rope_keys:
        raise ValueError("--block applies to the snapshot and decode protocols' cache (without --pre-rope-keys)")
    key = None if args.only == "v" else out["key"]
    value = None if args.only == "k" else out["value"]
    return {"policy": CachePolicy(key, value, out["residual"], out["sinks"], out.get("skip_layers", ()), block,
                                  args.seed)}  # fmt: skip


def _policy_file_kwargs(path: str) -> dict:
    """evaluate() arguments for a policy file: the whole policy (its per-layer specs, fp heads...)."""
    from kvpack.policy import load_policy

    return {"policy": load_policy(path)}


def policy_summary(record: dict, num_layers: int, num_kv_heads: int) -> str:
    """What each stream is held with over the model's (layer, KV head) pairs, from an `EvalResult.policy` record:
    ``K int:4 (all 90 (layer, KV head))`` or ``K per-(layer, KV head): e8:4 x40, e8:3 x30, int:8 x20``."""
    from kvpack.policy import CachePolicy

    fields = ("key", "value", "residual", "sinks", "block", "layer_keys", "layer_values", "head_keys", "head_values",
              "fp_heads")  # fmt: skip
    policy = CachePolicy(**{k: record[k] for k in fields if k in record}, skip_layers=tuple(record["skip_layers"]))
    counts: tuple[dict, dict] = ({}, {})
    for layer in range(num_layers):
        for stream, specs in zip(counts, policy.held_specs(layer, num_kv_heads)):
            for spec in specs:
                stream[spec or "16-bit"] = stream.get(spec or "16-bit", 0) + 1
    parts = []
    for name, stream in zip("KV", counts):
        if len(stream) == 1:
            parts.append(f"{name} {next(iter(stream))} (all {num_layers * num_kv_heads} (layer, KV head))")
        else:
            ranked = sorted(stream.items(), key=lambda kv: (-kv[1], kv[0]))
            parts.append(f"{name} per-(layer, KV head): " + ", ".join(f"{spec} x{n}" for spec, n in ranked))
    return "; ".join(parts)


def memory_line(bits_per_value: float, values_per_token: int, tokens: int, what: str) -> str:
    """``K+V held 1.23 MiB for the 1024-token context vs 7.50 MiB in fp16: 6.1x smaller than fp16``."""
    if math.isnan(bits_per_value) or bits_per_value <= 0:
        return "memory: n/a (this cache reports no bytes)"
    held, fp16 = bits_per_value * values_per_token * tokens / 8, 2 * values_per_token * tokens
    return (
        f"memory: K+V held {_size(held)} for {what} vs {_size(fp16)} in fp16: {16 / bits_per_value:.1f}x smaller "
        f"than fp16 ({bits_per_value:.3f} bits per value, measured)"
    )


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KiB"


def model_shape(config) -> tuple[int, int, int]:
    """(layers, KV heads, head_dim) of a transformers config."""
    config = getattr(config, "text_config", None) or config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


def format_result(result, shape: tuple[int, int, int] | None = None) -> str:
    """A readable table of an `EvalResult`: settings, pooled metrics with their spread, per-window rows, verdict.
    ``shape``: the model's (layers, KV heads, head_dim), for the per-head policy summary and the bytes held."""
    from kvpack.evaluation.evaluate import VERDICT
    from kvpack.evaluation.text import describe_text

    p = result.policy
    skip = ",".join(map(str, p["skip_layers"])) or "-"
    head = (
        f"kvpack eval  model={result.model}  protocol={result.protocol}  "
        f"ctx={result.ctx}  n_eval={result.n_eval}  windows={len(result.windows)}\ntext: {describe_text(result.text)}"
    )
    block = "" if p.get("block") is None else f"  block={p['block']}"
    policy = f"policy: residual={p['residual']}  sinks={p['sinks']}{block}  skip_layers={skip}"
    policy += (f"  only={p['only']}" if p["only"] else "") + (f"  preset={p['preset']}" if p["preset"] else "")
    policy += f"  ({p['cache_factory']})" if p.get("cache_factory") else ""
    if shape is not None and not (p.get("cache_factory") or "").startswith("peer"):
        policy += "\n  " + policy_summary(p, shape[0], shape[1])
    else:
        policy += f"\n  K {p['key']}; V {p['value']}"
    bits = (
        f"{'bits K / V':16}{_bits(result.bits_k):>12} / {_bits(result.bits_v)}   (avg {_bits(result.bits_per_value)}; "
        "measured bytes held, sinks and residual as 16-bit)"
    )
    lines = [head, policy]
    if shape is not None:
        tokens, what = (
            (result.ctx, f"the {result.ctx}-token context") if result.protocol == "snapshot"
            else (result.ctx + result.n_eval - 1, f"the {result.ctx + result.n_eval - 1} positions of one pass")
        )  # fmt: skip
        lines.append(memory_line(result.bits_per_value, 2 * shape[0] * shape[1] * shape[2], tokens, what))
    lines += [
        "",
        f"{'':16}{'pooled':>12}{'std (windows)':>16}",
        f"{'ppl (reference)':16}{result.ppl_ref:12.4f}",
        f"{'ppl':16}{result.ppl:12.4f}",
        f"{'delta-ppl %':16}{result.delta_ppl_pct:+12.3f}{result.delta_ppl_pct_std:16.3f}",
        f"{'top-1 agreement':16}{100 * result.top1:11.2f}%{100 * result.top1_std:15.2f}%",
        f"{'KL(ref||kv)':16}{result.kl:12.5f}{result.kl_std:16.5f}",
        bits,
        f"{'time / window':16}{result.seconds_per_window:11.1f}s",
        "",
        f"{'window start':>12}{'ppl ref':>10}{'ppl':>10}{'dppl %':>9}{'top-1':>8}{'KL':>10}",
    ]
    for w in result.windows:
        lines.append(
            f"{w['start']:12d}{w['ppl_ref']:10.3f}{w['ppl']:10.3f}{w['delta_ppl_pct']:+9.3f}"
            f"{100 * w['top1']:7.2f}%{w['kl']:10.5f}"
        )
    lines += ["", f"verdict: {result.verdict}  ({VERDICT.describe()})"]
    return "\n".join(lines)


def _bits(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def _preflight(args: argparse.Namespace, kwargs: dict) -> None:
    """What evaluate() checks before it loads a model, checked before `run` loads it: the policy, the text."""
    from kvpack.evaluation.text import load_text
    from kvpack.policy import CachePolicy

    if args.pre_rope_keys and args.protocol == "inforward":
        raise ValueError(
            "--pre-rope-keys works with --protocol decode or snapshot (the inforward round trip sees post-RoPE keys)"
        )
    if "preset" in kwargs:
        from kvpack.evaluation.presets import check_preset

        check_preset(kwargs["preset"])
    elif "policy" not in kwargs:
        CachePolicy(kwargs["key"], kwargs["value"], kwargs["residual"], kwargs["sinks"], kwargs.get("skip_layers", ()))
    load_text(args.text)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from kvpack.evaluation import models
    from kvpack.evaluation.evaluate import evaluate  # heavy: only when the command runs

    kwargs = _policy_kwargs(args)
    _preflight(args, kwargs)  # a bad policy or text fails before the model loads
    lm, tokenizer = models.load(args.model)
    result = evaluate(
        model=(lm, tokenizer), text=args.text, ctx=args.ctx, n_eval=args.n_eval, windows=args.windows,
        protocol=args.protocol, only=args.only, progress=not args.no_progress,
        seed=args.seed, pre_rope_keys=args.pre_rope_keys, center_keys=args.center_keys, **kwargs,
    )  # fmt: skip
    result = replace(result, model=str(args.model))
    print(format_result(result, model_shape(lm.config)))
    if args.json:
        out = Path(args.json)
        out.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"wrote {out}")
    return 0
