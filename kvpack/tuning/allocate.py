"""`kvpack allocate`: a codec and bit width per layer and stream under an average bits-per-value budget.

The command and the policy files; the steps live in their own modules:

1. Sensitivity (measured, not assumed; `kvpack.tuning.sensitivity`): ``D[layer, stream, codec]`` is
   the mean KL when only that layer's K (or V) goes through that candidate codec. The candidates default to
   the presets' (`DEFAULT_CANDIDATES`, codecs the paged decode kernels read; keys and values each from their own
   list, `stream_candidates`); others are logged as such.
2. Allocation (`kvpack.tuning.knapsack`): one candidate per (layer, stream) minimizing ``sum D``
   under ``mean bits_per_value <= budget``, an exact multiple-choice knapsack.
3. The result is a `CachePolicy` with per-layer specs (``layer_keys``/``layer_values``), written by
   :func:`save_policy`, accepted by ``KVPackCache(config, policy=load_policy(path))`` and
   ``kvpack eval --policy PATH``.

Per head (``--per-head``): `measure_head_sensitivity` measures ``D[layer, kv_head, stream, codec]``
and the same knapsack runs over (layer, KV head, stream) items; `head_policy_for` turns the choice
into ``head_keys``/``head_values``. K's error concentrates in single heads, so this beats the
per-layer choice at equal bits (BENCHMARKS.md, "How the presets were found", 6.).

Outlier heads (``--outlier-heads N``): `head_sensitivity` measures the KL with one KV head (K and V)
of one layer compressed; `choose_outlier_heads` keeps the worst ones in 16-bit (`CachePolicy.fp_heads`).

The budget counts the codecs' own bits per value (scales and norms included); the 16-bit sinks
and residual window are the same for every policy and not counted (``--held-ctx N`` counts them
at N tokens instead, as the presets' budgets do). Keys are measured and packed relative to the prefill's mean key
(``--center-keys``, on by default as in the presets; `CachePolicy.center_keys`); ``--evaluate-windows`` runs the
``decode`` protocol unless ``--protocol`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import torch

from kvpack.codec import get_codec
from kvpack.kernels.paged import paged_codec
from kvpack.policy import CachePolicy, policy_bits, save_policy
from kvpack.tuning.knapsack import allocate_bits, choose_outlier_heads, head_policy_for, policy_for, uniform_pairs
from kvpack.tuning.recipe import CANDIDATES, CENTER_KEYS, KEY_CANDIDATES, VALUE_CANDIDATES, candidates_for
from kvpack.tuning.sensitivity import head_sensitivity, measure_head_sensitivity, measure_sensitivity

__all__ = [
    "DEFAULT_CANDIDATES", "add_arguments", "compare_policies", "log_unpaged", "run", "stream_candidates",
    "unpaged_specs",
]  # fmt: skip

logger = logging.getLogger(__name__)

# The presets' candidates: codecs the paged decode kernels read (turbo_mse 1-4 bits, Hadamard-rotated int 2-4,
# int:8), so that a policy allocated with the defaults runs on them (PagedKVPackCache, StaticKVPackCache); keys
# from KEY_CANDIDATES and values from VALUE_CANDIDATES as the presets do (12 measured per layer instead of 16).
# Others (e8, int:*:axis=channel) can still be given with --candidates; `log_unpaged` then says that a policy
# choosing them will not.
DEFAULT_CANDIDATES = CANDIDATES


def stream_candidates(candidates, value_candidates, head_dim: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(keys, values)`` to measure: the presets' split by default (as `kvpack.tuning.recipe.candidates_for`
    gives them at ``head_dim``); ``--candidates`` alone: both streams; ``--value-candidates``: the values'."""
    if candidates is None:
        values = tuple(value_candidates) if value_candidates else candidates_for(head_dim, VALUE_CANDIDATES)
        return candidates_for(head_dim, KEY_CANDIDATES), values
    return tuple(candidates), tuple(value_candidates or candidates)


def unpaged_specs(specs, head_dim: int) -> dict[str, str]:
    """``{spec: why}`` for each of ``specs`` that the paged decode kernels cannot read at ``head_dim``
    (`kvpack.kernels.paged.paged_codec` refuses it); empty when all of them can."""
    out = {}
    for spec in dict.fromkeys(specs):
        try:
            paged_codec(get_codec(spec, head_dim=head_dim))
        except (TypeError, ValueError) as exc:
            out[spec] = str(exc)
    return out


def log_unpaged(specs, head_dim: int) -> None:
    """One warning line when some of ``specs`` are not codecs the paged decode kernels read."""
    unpaged = unpaged_specs(specs, head_dim)
    if unpaged:
        logger.warning(
            "candidates %s are not read by the paged decode kernels: a policy that chooses them will not run on "
            "them (StaticKVPackCache refuses it, PagedKVPackCache keeps those layers in KVPackLayer storage) (%s)",
            ", ".join(unpaged), "; ".join(f"{s}: {why}" for s, why in unpaged.items()),
        )  # fmt: skip


# ---- command line ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kvpack.cli import output_file
    from kvpack.evaluation.eval_cli import MODEL_HELP, TEXT_HELP

    parser.add_argument("--model", default="smollm2", help=MODEL_HELP)
    parser.add_argument("--text", default=None, help=TEXT_HELP + "; its calibration spans avoid the eval windows")
    parser.add_argument("--budget", type=float, nargs="+", default=None, help="mean bits per value (one or more)")
    parser.add_argument(
        "--outlier-heads",
        type=int,
        default=None,
        metavar="N",
        help="instead of a budget: measure each KV head's sensitivity under --key/--value and write "
        "the policy keeping the N worst heads in 16-bit (and, as a control, the N mildest)",
    )
    parser.add_argument("--key", default="e8:2", help="with --outlier-heads: the K codec of every layer")
    parser.add_argument("--value", default="e8:2", help="with --outlier-heads: the V codec of every layer")
    parser.add_argument("--candidates", nargs="+", default=None,
                        help=f"codec specs to choose from (default: the presets' candidates, which the paged decode "
                        f"kernels read: K {' '.join(KEY_CANDIDATES)}; V {' '.join(VALUE_CANDIDATES)})")  # fmt: skip
    parser.add_argument("--calib-windows", type=int, default=2, help="calibration windows")
    parser.add_argument("--calib-ctx", type=int, default=512, help="context tokens per calibration window")
    parser.add_argument("--calib-n", type=int, default=64, help="continuation tokens scored per calibration window")
    parser.add_argument("--per-head", action="store_true",
                        help="with --budget: choose a candidate per (layer, KV head, stream) (head_keys/head_values) "
                        "from one-head sensitivities instead of one per (layer, stream)")  # fmt: skip
    parser.add_argument("--value-candidates", nargs="+", default=None,
                        help="the V candidates (default: --candidates, or the presets' V candidates)")  # fmt: skip
    parser.add_argument("--held-ctx", type=int, default=None, metavar="N",
                        help="with --per-head: --budget is the bits HELD at N tokens (16-bit sinks and residual "
                        "window included), as the presets' budgets are")  # fmt: skip
    parser.add_argument("--residual", type=int, default=128, help="newest tokens kept in 16 bits")
    parser.add_argument("--sinks", type=int, default=4, help="first tokens kept in 16 bits")
    parser.add_argument("--block", type=int, default=None, help="tokens packed at once (1 with --residual 0)")
    parser.add_argument("--center-keys", action=argparse.BooleanOptionalAction, default=CENTER_KEYS,
                        help="measure and write policies whose keys are packed relative to the prefill's mean key "
                             "(CachePolicy.center_keys), as the presets'")  # fmt: skip
    parser.add_argument(
        "--sensitivity", default=None, type=output_file, help="JSON file: reused if it exists, else written"
    )
    parser.add_argument(
        "--out", default="policy-{budget}.json", type=output_file, help="policy file ({budget} is replaced)"
    )
    parser.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda)")
    parser.add_argument("--evaluate-windows", type=int, default=0,
                        help="then evaluate each policy with kvpack.evaluate (ctx 1024, n_eval 256) on N windows")  # fmt: skip
    parser.add_argument("--protocol", choices=("decode", "snapshot", "inforward"), default="decode",
                        help="the protocol of --evaluate-windows (decode: as generate sees the cache)")  # fmt: skip
    parser.add_argument("--uniform", type=int, default=0, metavar="K",
                        help="with --evaluate-windows: also evaluate the K undominated uniform K/V pairs of the "
                        "candidates within each budget that the measured sensitivities predict best")  # fmt: skip
    parser.add_argument("--results", default=None, type=output_file, help="JSON file for the evaluation results")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _setup(args: argparse.Namespace) -> dict:
    """What a sensitivity table was measured under, besides its text and candidates (saved beside it)."""
    return {"residual": args.residual, "sinks": args.sinks, "block": args.block, "center_keys": args.center_keys}


def _check_saved_setup(saved: dict, path: Path, args: argparse.Namespace) -> None:
    """A saved ``--sensitivity`` table measured under another setup is refused, naming the field. Files written
    before a field was saved lack it: no ``center_keys`` means uncentered keys (they came first); the others are
    then taken as given."""
    recorded = {"center_keys": False}
    recorded.update({k: saved[k] for k in ("residual", "sinks", "block", "center_keys") if k in saved})
    for name, value in _setup(args).items():
        if name in recorded and recorded[name] != value:
            flag = "--center-keys" if name == "center_keys" else f"--{name}"
            raise ValueError(f"{path} was measured with {name}={recorded[name]!r}, not {flag} {value!r}: give the "
                             "same setup or another --sensitivity file")  # fmt: skip


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def run(args: argparse.Namespace) -> int:
    from kvpack.evaluation.models import load
    from kvpack.evaluation.text import load_text, tokenize
    from kvpack.tuning.calibrate import calibration_ids

    if (args.budget is None) == (args.outlier_heads is None):
        raise ValueError("give --budget (per-layer allocation) or --outlier-heads N (16-bit outlier heads), not both")
    if not args.per_head and args.held_ctx is not None:
        raise ValueError("--held-ctx goes with --per-head")
    if args.held_ctx is not None and args.held_ctx <= args.sinks + args.residual:
        raise ValueError(f"--held-ctx must exceed --sinks + --residual ({args.sinks + args.residual})")
    model, tokenizer = load(args.model, device=args.device)
    if args.outlier_heads is not None:
        return _run_outlier_heads(model, tokenizer, args)
    head_dim = _head_dim(model.config)
    keys, values = stream_candidates(args.candidates, args.value_candidates, head_dim)
    candidates = tuple(dict.fromkeys(keys + values))
    log_unpaged(candidates, head_dim)
    if args.per_head:
        return _run_per_head(model, tokenizer, args)
    config = model.config
    num_layers = config.num_hidden_layers
    bits = [get_codec(c, head_dim=head_dim).bits_per_value() for c in candidates]
    path = Path(args.sensitivity) if args.sensitivity else None
    if path is not None and path.is_file():
        saved = json.loads(path.read_text())
        streams = [saved.get("key_candidates", saved["candidates"]), saved.get("value_candidates", saved["candidates"])]
        if saved["candidates"] != list(candidates) or streams != [list(keys), list(values)]:
            raise ValueError(f"{path} holds sensitivities of {saved['candidates']} (K {streams[0]}, V {streams[1]}), "
                             f"not {list(candidates)} (K {list(keys)}, V {list(values)})")  # fmt: skip
        _check_saved_setup(saved, path, args)
        kl = torch.tensor([[[math.nan if x is None else x for x in st] for st in layer] for layer in saved["kl"]],
                          dtype=torch.float64)  # fmt: skip
        print(f"sensitivities from {path}")
    else:
        ids = tokenize(tokenizer, load_text(args.text))
        windows = calibration_ids(ids, args.calib_ctx + args.calib_n, args.calib_windows)
        kl = measure_sensitivity(model, windows, args.calib_ctx, candidates, args.residual, args.sinks,
                                 progress=not args.no_progress, key_candidates=keys, value_candidates=values,
                                 block=args.block, center_keys=args.center_keys)  # fmt: skip
        if path is not None:
            rows = [[[None if math.isnan(x) else x for x in st] for st in layer] for layer in kl.tolist()]
            path.write_text(json.dumps({"candidates": list(candidates), "key_candidates": list(keys),
                                        "value_candidates": list(values), "kl": rows, "text": str(args.text),
                                        "calib_windows": args.calib_windows, "calib_ctx": args.calib_ctx,
                                        "calib_n": args.calib_n, **_setup(args)}))  # fmt: skip
    policies: dict[float, CachePolicy] = {}
    for budget in args.budget:
        choice = allocate_bits(kl.reshape(num_layers * 2, -1), bits, budget)
        policy = policy_for(choice, candidates, num_layers, residual=args.residual, sinks=args.sinks,
                            block=args.block, center_keys=args.center_keys)  # fmt: skip
        predicted = float(kl.reshape(num_layers * 2, -1).gather(1, choice[:, None]).sum())
        mean_bits = policy_bits(policy, head_dim, num_layers, config.num_key_value_heads)
        out = args.out.replace("{budget}", f"{budget:g}")
        save_policy(policy, out, budget=budget, mean_bits=mean_bits, predicted_kl=predicted,
                    candidates=list(candidates), calib={"text": str(args.text), "windows": args.calib_windows,
                    "ctx": args.calib_ctx, "n": args.calib_n})  # fmt: skip
        print(f"budget {budget:g}: mean codec bits {mean_bits:.4f}, predicted KL {predicted:.5f} -> {out}")
        for i in range(num_layers):
            print(f"  layer {i:2d}: K {policy.layer_keys[i]:<20} V {policy.layer_values[i]}")
        policies[budget] = policy
    if args.evaluate_windows:
        rows = compare_policies(model, tokenizer, args, policies, candidates, kl)
        if args.results:
            Path(args.results).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def compare_policies(
    model, tokenizer, args, policies: dict, candidates: tuple[str, ...], kl: torch.Tensor
) -> list[dict]:
    """kvpack.evaluate (``--protocol``, ctx 1024, n_eval 256) of each allocated policy and, with ``--uniform K``,
    of the K undominated uniform pairs within its budget of least predicted KL (sum of the measured
    per-layer sensitivities: the same table the allocation uses, so the baseline is picked as well
    as the policy is), under the same residual, sinks, block and key centering."""
    from kvpack.evaluation.evaluate import evaluate
    from kvpack.evaluation.text import load_text, tokenize

    ids = tokenize(tokenizer, load_text(args.text))
    config = model.config
    head_dim, num_layers = _head_dim(config), config.num_hidden_layers
    memo: dict = {}
    common = {"model": (model, tokenizer), "text": ids, "ctx": 1024, "n_eval": 256, "windows": args.evaluate_windows,
              "progress": not args.no_progress, "reference_memo": memo, "protocol": args.protocol}  # fmt: skip
    index = {c: j for j, c in enumerate(candidates)}

    def predicted(k: str, v: str) -> float:
        return float(kl[:, 0, index[k]].sum() + kl[:, 1, index[v]].sum())

    done: dict[tuple[str, str], dict] = {}
    rows = []
    for budget, policy in policies.items():
        result = evaluate(**common, policy=policy)
        choice_kl = sum(
            float(kl[i, s, index[spec]]) for i in range(num_layers) for s, spec in enumerate(policy.specs(i))
        )  # fmt: skip
        rows.append({"budget": budget, "policy": "allocated", "protocol": args.protocol, "predicted_kl": choice_kl,
                     "mean_bits": policy_bits(policy, head_dim, num_layers, config.num_key_value_heads),
                     **_metrics(result)})  # fmt: skip
        if args.uniform:
            pairs = [p for p in uniform_pairs(candidates, head_dim, budget) if math.isfinite(predicted(p[0], p[1]))]
            for k, v, mean_bits in sorted(pairs, key=lambda p: predicted(p[0], p[1]))[: args.uniform]:
                if (k, v) not in done:
                    uniform = CachePolicy(k, v, args.residual, args.sinks, block=args.block,
                                          center_keys=args.center_keys)  # fmt: skip
                    done[(k, v)] = _metrics(evaluate(**common, policy=uniform))
                rows.append({"budget": budget, "policy": f"{k}/{v}", "protocol": args.protocol,
                             "predicted_kl": predicted(k, v),
                             "mean_bits": mean_bits, **done[(k, v)]})  # fmt: skip
        for r in (r for r in rows if r["budget"] == budget):
            print(f"{budget:>5g} {r['policy']:<36} bits {r['mean_bits']:.3f} (held {r['bits_per_value']:.3f})  "
                  f"delta-ppl {r['delta_ppl_pct']:+.3f}% (+-{r['delta_ppl_pct_std']:.3f})  top1 {r['top1']:.4f}  "
                  f"KL {r['kl']:.5f}  predicted KL {r['predicted_kl']:.5f}")  # fmt: skip
    return rows


def _metrics(result) -> dict:
    keys = ("ppl_ref", "ppl", "delta_ppl_pct", "delta_ppl_pct_std", "top1", "kl", "kl_std", "bits_k", "bits_v",
            "bits_per_value")  # fmt: skip
    return {k: getattr(result, k) for k in keys}


def _run_outlier_heads(model, tokenizer, args: argparse.Namespace) -> int:
    """``--outlier-heads N``: per-head sensitivities under uniform --key/--value, the worst N kept 16-bit."""
    from kvpack.evaluation.text import load_text, tokenize
    from kvpack.tuning.calibrate import calibration_ids

    config = model.config
    ids = tokenize(tokenizer, load_text(args.text))
    windows = calibration_ids(ids, args.calib_ctx + args.calib_n, args.calib_windows)
    scores = head_sensitivity(model, windows, args.calib_ctx, args.key, args.value, args.residual, args.sinks,
                              progress=not args.no_progress, block=args.block,
                              center_keys=args.center_keys)  # fmt: skip
    shape = (config.num_hidden_layers, config.num_key_value_heads)
    for label, heads in (("worst", choose_outlier_heads(scores, args.outlier_heads)),
                         ("mildest", choose_outlier_heads(-scores, args.outlier_heads))):  # fmt: skip
        policy = CachePolicy(args.key, args.value, args.residual, args.sinks, block=args.block, fp_heads=heads,
                             center_keys=args.center_keys)  # fmt: skip
        bits = policy_bits(policy, _head_dim(config), *shape)
        out = args.out.replace("{budget}", f"{label}{args.outlier_heads}heads")
        save_policy(policy, out, mean_bits=bits, head_kl=scores.tolist(), chose=label)
        print(f"{label} {args.outlier_heads} heads {list(heads)}: mean codec bits {bits:.4f} -> {out}")
    return 0


def _run_per_head(model, tokenizer, args: argparse.Namespace) -> int:
    """``--budget B --per-head``: one-head sensitivities, the knapsack over (layer, KV head, stream) items."""
    from kvpack.evaluation.text import load_text, tokenize
    from kvpack.tuning.calibrate import calibration_ids

    config = model.config
    head_dim, num_layers, num_heads = _head_dim(config), config.num_hidden_layers, config.num_key_value_heads
    keys, values = stream_candidates(args.candidates, args.value_candidates, head_dim)
    union = tuple(dict.fromkeys(keys + values))
    path = Path(args.sensitivity) if args.sensitivity else None
    if path is not None and path.is_file():
        saved = json.loads(path.read_text())
        have = (saved.get("key_candidates") or [], saved.get("value_candidates") or [])
        missing = [c for c in keys if c not in have[0]] + [c for c in values if c not in have[1]]
        if missing:
            raise ValueError(f"{path} holds no sensitivities for {missing} (K: {have[0]}, V: {have[1]})")
        _check_saved_setup(saved, path, args)
        full = torch.tensor([[[[math.nan if x is None else x for x in c] for c in st] for st in h] for h in saved["kl"]],
                            dtype=torch.float64)  # fmt: skip
        kl = torch.full((*full.shape[:3], max(len(keys), len(values))), math.nan, dtype=torch.float64)
        for stream, cands in enumerate((keys, values)):  # the requested candidates, a subset of the saved ones
            for j, spec in enumerate(cands):
                kl[:, :, stream, j] = full[:, :, stream, have[stream].index(spec)]
        print(f"sensitivities from {path}")
    else:
        ids = tokenize(tokenizer, load_text(args.text))
        windows = calibration_ids(ids, args.calib_ctx + args.calib_n, args.calib_windows)
        kl = measure_head_sensitivity(model, windows, args.calib_ctx, keys, values, args.residual, args.sinks,
                                      args.block, progress=not args.no_progress,
                                      center_keys=args.center_keys)  # fmt: skip
        if path is not None:
            rows = [[[[None if math.isnan(x) else x for x in c] for c in st] for st in h] for h in kl.tolist()]
            path.write_text(json.dumps({"key_candidates": list(keys), "value_candidates": list(values), "kl": rows,
                                        "text": str(args.text), "calib_windows": args.calib_windows,
                                        "calib_ctx": args.calib_ctx, "calib_n": args.calib_n,
                                        **_setup(args)}))  # fmt: skip
    table = torch.full((num_layers, num_heads, 2, len(union)), math.nan, dtype=torch.float64)
    for stream, cands in enumerate((keys, values)):
        for j, spec in enumerate(cands):
            table[:, :, stream, union.index(spec)] = kl[:, :, stream, j]
    table = table.reshape(-1, len(union))
    bits = [get_codec(c, head_dim=head_dim).bits_per_value() for c in union]
    fp = args.sinks + args.residual
    for budget in args.budget:
        # held bits at N tokens: fp tokens at 16 bits, the rest at the codec bits
        codec_budget = budget if args.held_ctx is None else (budget * args.held_ctx - 16 * fp) / (args.held_ctx - fp)
        choice = allocate_bits(table, bits, codec_budget)
        policy = head_policy_for(choice, union, num_layers, num_heads, residual=args.residual, sinks=args.sinks,
                                 block=args.block, center_keys=args.center_keys)  # fmt: skip
        predicted = float(table.gather(1, choice[:, None]).sum())
        mean_bits = policy_bits(policy, head_dim, num_layers, num_heads)
        out = args.out.replace("{budget}", f"{budget:g}")
        save_policy(policy, out, budget=budget, held_ctx=args.held_ctx, mean_bits=mean_bits, predicted_kl=predicted,
                    candidates=list(union), calib={"text": str(args.text), "windows": args.calib_windows,
                    "ctx": args.calib_ctx, "n": args.calib_n})  # fmt: skip
        print(f"budget {budget:g}: mean codec bits {mean_bits:.4f}, predicted KL {predicted:.5f} -> {out}")
    return 0
