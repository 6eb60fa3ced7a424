"""``kvpack eval``: delta-perplexity, top-1 agreement and KL of a cache policy on a real model and text.

The command line is a contract other tools call::

    kvpack eval --model smollm2 --text PATH --key SPEC --value SPEC [--residual N] [--sinks N]
                --ctx 1024 --n-eval 256 --windows 8 --protocol snapshot|inforward [--only k|v] --json OUT

With no arguments it evaluates the default policy on SmolLM2 and the embedded default text, offline.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

__all__ = ["DEFAULTS", "add_arguments", "run"]

# used when neither --preset nor the option is given: KIVI's layout at 4 bits (keys per channel)
DEFAULTS = {"key": "int:4:axis=channel", "value": "int:4", "residual": 128, "sinks": 4}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="'smollm2', a .gguf file, a model directory or a hub id")
    parser.add_argument("--text", default=None, help="text file, 'wikitext2', or omit for the embedded default text")
    parser.add_argument("--key", default=None, help=f"codec spec for K (default {DEFAULTS['key']})")
    parser.add_argument("--value", default=None, help=f"codec spec for V (default {DEFAULTS['value']})")
    parser.add_argument("--residual", type=int, default=None, help="newest tokens kept in full precision (default 128)")
    parser.add_argument("--sinks", type=int, default=None, help="first tokens kept in full precision (default 4)")
    parser.add_argument("--skip-layers", default=None, help="comma-separated layer indices kept in full precision")
    parser.add_argument("--preset", default=None, help="a named policy instead of --key/--value/--residual/--sinks")
    parser.add_argument(
        "--no-calibration", action="store_true", help="--preset from the model's config alone (no calibration run)"
    )
    parser.add_argument("--policy", default=None, metavar="PATH", help="a policy JSON file (kvpack allocate)")
    parser.add_argument("--ctx", type=int, default=1024, help="context tokens per window")
    parser.add_argument("--n-eval", type=int, default=256, help="continuation tokens scored per window")
    parser.add_argument("--windows", type=int, default=8, help="non-overlapping windows evenly spread over the text")
    parser.add_argument("--protocol", choices=("snapshot", "inforward"), default="snapshot")
    parser.add_argument(
        "--pre-rope-keys", action="store_true", help="pack keys with RoPE undone (KVQuant), re-applied after decoding"
    )
    parser.add_argument("--only", choices=("k", "v"), default=None, help="compress only K or only V")
    parser.add_argument("--seed", type=int, default=0, help="codec seed")
    parser.add_argument("--json", default=None, metavar="OUT", help="write the result as JSON to OUT")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _policy_kwargs(args: argparse.Namespace) -> dict:
    given = {name: getattr(args, name) for name in ("key", "value", "residual", "sinks", "skip_layers")}
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
    return out


def _policy_file_kwargs(path: str) -> dict:
    """evaluate() arguments for a policy file: a KVPackCache under it (its per-layer specs, fp heads...)."""
    from kvpack.hf.cache import KVPackCache
    from kvpack.policy import load_policy

    policy = load_policy(path)

    def cache_factory(config):
        return KVPackCache(config, policy=policy)

    cache_factory.__name__ = f"policy file {path}"
    return {"key": policy.key, "value": policy.value, "residual": policy.residual, "sinks": policy.sinks,
            "skip_layers": policy.skip_layers, "cache_factory": cache_factory}  # fmt: skip


def format_result(result) -> str:
    """A readable table of an `EvalResult`: settings, pooled metrics with their spread, per-window rows, verdict."""
    p = result.policy
    skip = ",".join(map(str, p["skip_layers"])) or "-"
    head = (
        f"kvpack eval  model={result.model}  text={result.text}  protocol={result.protocol}  "
        f"ctx={result.ctx}  n_eval={result.n_eval}  windows={len(result.windows)}"
    )
    policy = (
        f"policy: key={p['key']}  value={p['value']}  residual={p['residual']}  sinks={p['sinks']}  skip_layers={skip}"
    )
    if any(h is not None for h in (*p.get("head_keys", ()), *p.get("head_values", ()))):
        policy += "  (per-head specs override key/value: see --json)"
    elif p.get("layer_keys") or p.get("layer_values"):
        policy += "  (per-layer specs override key/value: see --json)"
    if p.get("fp_heads"):
        policy += f"  fp_heads={len(p['fp_heads'])}"
    policy += (f"  only={p['only']}" if p["only"] else "") + (f"  preset={p['preset']}" if p["preset"] else "")
    policy += f"  ({p['cache_factory']})" if p.get("cache_factory") else ""
    bits = (
        f"{'bits K / V':16}{_bits(result.bits_k):>12} / {_bits(result.bits_v)}   (avg {_bits(result.bits_per_value)}; "
        "measured bytes held, sinks and residual as 16-bit)"
    )
    lines = [
        head,
        policy,
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
    lines += [
        "",
        f"verdict: {result.verdict}  (ACCEPT: |delta-ppl| <= 1% and top-1 >= 95%; MARGINAL: |delta-ppl| <= 5%)",
    ]
    return "\n".join(lines)


def _bits(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def run(args: argparse.Namespace) -> int:
    from kvpack.evaluation.evaluate import evaluate  # heavy (torch, transformers): only when the command runs

    result = evaluate(
        model=args.model, text=args.text, ctx=args.ctx, n_eval=args.n_eval, windows=args.windows,
        protocol=args.protocol, only=args.only, progress=not args.no_progress, seed=args.seed,
        pre_rope_keys=args.pre_rope_keys, **_policy_kwargs(args),
    )  # fmt: skip
    if args.policy is not None:  # the file's policy went through a cache_factory: record all of it
        from kvpack.evaluation.evaluate import policy_record
        from kvpack.policy import load_policy

        result.policy.update(policy_record(load_policy(args.policy)))
    print(format_result(result))
    if args.json:
        out = Path(args.json)
        out.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"wrote {out}")
    return 0
