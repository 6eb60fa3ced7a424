"""`kvpack allocate`: a codec and bit width per layer and stream under an average bits-per-value budget.

1. Sensitivity (measured, not assumed): on calibration windows disjoint from the evaluation windows
   (`kvpack.tuning.calibrate.calibration_ids`), the clean prefill's K/V are stored in a `KVPackCache`
   where ONE layer's K (or V) goes through one candidate codec and everything else stays exact,
   the continuation is teacher-forced through it, and ``D[layer, stream, codec]`` is the mean
   KL(reference || compressed) of the next-token distributions (the snapshot protocol of
   `kvpack.evaluate`, on shorter windows).
2. Allocation: assuming the KL of independent perturbations adds up (the usual first-order model
   of mixed-precision allocation, e.g. HAWQ-V3, Yao et al. arXiv 2011.10680; KVTuner, arXiv
   2502.04420, for KV caches), choose one candidate per (layer, stream) to minimize ``sum D`` with
   ``mean bits_per_value <= budget``: a multiple-choice knapsack solved exactly by dynamic
   programming over bits counted in units of the candidates' common denominator (1/64 for most).
3. The result is a `CachePolicy` with per-layer specs (``layer_keys``/``layer_values``), accepted
   by ``KVPackCache(config, policy=load_policy(path))`` and ``kvpack eval --policy PATH``.

Per head (``--per-head``): :func:`measure_head_sensitivity` measures ``D[layer, kv_head, stream, codec]``
with one KV head's K or V compressed (one clean prefill per window serves every candidate), and the
same knapsack runs over (layer, KV head, stream) items; :func:`head_policy_for` turns the choice into
``head_keys``/``head_values``. K's error concentrates in single heads, so this beats the per-layer
choice at equal bits (BENCHMARKS.md, "How the presets were found", 6.).

Outlier heads: :func:`head_sensitivity` measures the same KL with one KV head (K and V) of one
layer compressed and everything else exact; :func:`choose_outlier_heads` keeps the worst ones in
16-bit (`CachePolicy.fp_heads`).

The budget counts the codecs' own bits per value (scales and norms included); the 16-bit sinks
and residual window are the same for every policy and not counted (``--held-ctx N`` counts them
at N tokens instead, as the presets' budgets do).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from fractions import Fraction
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvpack.codec import get_codec, parse_spec
from kvpack.policy import CachePolicy, policy_bits, save_policy

__all__ = [
    "allocate_bits",
    "choose_outlier_heads",
    "head_policy_for",
    "head_sensitivity",
    "measure_head_sensitivity",
    "measure_sensitivity",
    "policy_for",
    "uniform_pairs",
]

logger = logging.getLogger(__name__)

DEFAULT_CANDIDATES = (
    "e8:2", "e8:3", "e8:4", "turbo_mse:2", "turbo_mse:3", "turbo_mse:4",
    "int:2", "int:3", "int:4", "int:2:axis=channel", "int:3:axis=channel", "int:4:axis=channel",
)  # fmt: skip
MAX_DP_UNITS = 5_000_000  # capacity cells of the knapsack table


# ---- measuring ---------------------------------------------------------------------------------


def _recorded_prefill(model, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Exact K/V ``(1, kv_heads, ctx, head_dim)`` of every layer after a clean prefill of ``ids``."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(ids, past_key_values=cache, logits_to_keep=1)
    return [(layer.keys, layer.values) for layer in cache.layers]


def _continue(model, prefill, cont: torch.Tensor, policy: CachePolicy) -> torch.Tensor:
    """Log-probs ``(n, vocab)`` of ``cont`` teacher-forced after ``prefill`` stored under ``policy``."""
    from kvpack.hf.cache import KVPackCache

    cache = KVPackCache(config=model.config, policy=policy)
    for i, (k, v) in enumerate(prefill):
        cache.update(k, v, i)
    return F.log_softmax(model(cont, past_key_values=cache).logits[0].float(), -1)


def _kl_of_policies(model, windows, ctx: int, policies: list[CachePolicy], desc: str, progress: bool) -> torch.Tensor:
    """Mean KL(exact || policy) per continuation token, float64 ``(len(policies),)``, averaged over windows."""
    if not windows:
        raise ValueError("windows must hold at least one window of token ids")
    for w in windows:
        if not isinstance(w, torch.Tensor) or w.dim() != 1 or w.numel() <= ctx:
            raise ValueError(f"each window must be 1-D token ids longer than ctx={ctx}")
    dtype = next(model.parameters()).dtype
    exact = CachePolicy(None, None, policies[0].residual, policies[0].sinks, window_dtype=dtype)
    kl = torch.zeros(len(policies), dtype=torch.float64)
    with torch.inference_mode():
        for w in windows:
            ids = w[None].to(next(model.parameters()).device)
            prefill = _recorded_prefill(model, ids[:, :ctx])
            ref = _continue(model, prefill, ids[:, ctx:], exact)
            for j, policy in enumerate(tqdm(policies, desc=desc, disable=not progress)):
                out = _continue(model, prefill, ids[:, ctx:], policy)
                kl[j] += (ref.exp() * (ref - out)).sum(-1).clamp_min(0).mean().item() / len(windows)
    return kl


def _only_layer(layer: int, num_layers: int, key: str | None, value: str | None, **fields) -> CachePolicy:
    """A policy compressing only layer ``layer``: its K with ``key``, its V with ``value`` (``None``: exact)."""
    keys = tuple(key if i == layer else None for i in range(num_layers))
    values = tuple(value if i == layer else None for i in range(num_layers))
    return CachePolicy(None, None, layer_keys=keys, layer_values=values, **fields)


def _other_heads(layer: int, head: int, num_heads: int) -> tuple[tuple[int, int], ...]:
    """``fp_heads`` that keep every KV head of ``layer`` but ``head`` exact."""
    return tuple((layer, h) for h in range(num_heads) if h != head)


def measure_sensitivity(
    model, windows: list[torch.Tensor], ctx: int, candidates: tuple[str, ...], residual: int = 128, sinks: int = 4,
    progress: bool = True,
) -> torch.Tensor:  # fmt: skip
    """``D`` float64 ``(layers, 2, len(candidates))``: mean KL per continuation token when only that
    layer's K (stream 0) or V (stream 1) is stored with that candidate codec. ``windows``: 1-D token
    id tensors of ``ctx + n`` tokens each. Sinks and window stay in the model dtype here, so that
    ``D`` is the codec's effect alone."""
    num_layers = model.config.num_hidden_layers
    dtype = next(model.parameters()).dtype
    policies = [
        _only_layer(
            layer,
            num_layers,
            *((spec, None) if stream == 0 else (None, spec)),
            residual=residual,
            sinks=sinks,
            window_dtype=dtype,
        )
        for layer in range(num_layers)
        for stream in range(2)
        for spec in candidates
    ]
    kl = _kl_of_policies(model, windows, ctx, policies, "sensitivity", progress)
    return kl.reshape(num_layers, 2, len(candidates))


def head_sensitivity(
    model, windows: list[torch.Tensor], ctx: int, key: str | None, value: str | None, residual: int = 128,
    sinks: int = 4, progress: bool = True,
) -> torch.Tensor:  # fmt: skip
    """float64 ``(layers, kv_heads)``: mean KL per continuation token when only that KV head of that
    layer is stored with ``key``/``value`` (the other heads of the layer through ``fp_heads``, the
    other layers uncompressed)."""
    if key is None and value is None:
        raise ValueError("head_sensitivity needs a key or a value codec spec")
    config = model.config
    num_layers, num_heads = config.num_hidden_layers, config.num_key_value_heads
    dtype = next(model.parameters()).dtype
    policies = [
        _only_layer(
            layer,
            num_layers,
            key,
            value,
            residual=residual,
            sinks=sinks,
            window_dtype=dtype,
            fp_heads=_other_heads(layer, head, num_heads),
        )
        for layer in range(num_layers)
        for head in range(num_heads)
    ]
    return _kl_of_policies(model, windows, ctx, policies, "head sensitivity", progress).reshape(num_layers, num_heads)


def measure_head_sensitivity(
    model, windows: list[torch.Tensor], ctx: int, key_candidates: tuple[str, ...], value_candidates: tuple[str, ...],
    residual: int = 0, sinks: int = 1, block: int | None = 1, progress: bool = True,
) -> torch.Tensor:  # fmt: skip
    """float64 ``(layers, kv_heads, 2, max(len(key_candidates), len(value_candidates)))``: mean KL per
    continuation token when only that KV head's K (stream 0, ``key_candidates``) or V (stream 1,
    ``value_candidates``) of that layer goes through that codec and everything else stays exact (the
    layer's other heads through ``fp_heads``, 16-bit). Slots past a stream's candidates are NaN.

    One clean prefill and one exact continuation per window serve every candidate (`_kl_of_policies`),
    so the cost is one teacher-forced continuation per (layer, head, stream, candidate) and window.
    ``residual``/``sinks``/``block`` should be those of the policy the numbers will allocate."""
    if not key_candidates and not value_candidates:
        raise ValueError("measure_head_sensitivity needs key_candidates or value_candidates")
    config = model.config
    num_layers, num_heads = config.num_hidden_layers, config.num_key_value_heads
    dtype = next(model.parameters()).dtype
    width = max(len(key_candidates), len(value_candidates))
    policies, slots = [], []
    for layer in range(num_layers):
        for head in range(num_heads):
            for stream, candidates in enumerate((key_candidates, value_candidates)):
                for j, spec in enumerate(candidates):
                    kv = (spec, None) if stream == 0 else (None, spec)
                    policies.append(_only_layer(layer, num_layers, *kv, residual=residual, sinks=sinks, block=block,
                                                window_dtype=dtype, fp_heads=_other_heads(layer, head, num_heads)))  # fmt: skip
                    slots.append(((layer * num_heads + head) * 2 + stream) * width + j)
    kl = _kl_of_policies(model, windows, ctx, policies, "head sensitivity", progress)
    out = torch.full((num_layers * num_heads * 2 * width,), float("nan"), dtype=torch.float64)
    out[torch.tensor(slots)] = kl
    return out.reshape(num_layers, num_heads, 2, width)


def choose_outlier_heads(scores: torch.Tensor, count: int) -> tuple[tuple[int, int], ...]:
    """The ``count`` (layer, kv_head) pairs of largest ``scores`` ``(layers, kv_heads)``, sorted: `CachePolicy.fp_heads`."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(f"scores must be a (layers, kv_heads) tensor, got {scores!r}")
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= scores.numel():
        raise ValueError(f"count must be an int in [0, {scores.numel()}], got {count!r}")
    top = torch.topk(scores.flatten().double(), count).indices.tolist()
    return tuple(sorted(divmod(i, scores.shape[1]) for i in top))


# ---- allocating --------------------------------------------------------------------------------


def _bit_units(bits: list[float]) -> tuple[list[int], int]:
    """Integer costs of ``bits`` in units of ``1/denominator`` (the least common denominator)."""
    fracs = [Fraction(b).limit_denominator(1 << 16) for b in bits]
    if any(abs(float(f) - b) > 1e-9 for f, b in zip(fracs, bits)):
        raise ValueError(f"candidate bits {bits} are not rationals with denominators <= 65536")
    den = math.lcm(*(f.denominator for f in fracs))
    return [int(f * den) for f in fracs], den


def allocate_bits(sensitivity: torch.Tensor, bits: list[float], budget: float) -> torch.Tensor:
    """Choice ``(items,)`` of a candidate per row of ``sensitivity`` ``(items, candidates)`` minimizing the
    summed sensitivity with ``mean(bits[choice]) <= budget``; exact (dynamic programming over bits in units
    of the candidates' common denominator). Ties go to the cheaper total. A NaN entry marks a candidate
    that item cannot take (e.g. a K-only codec for a V item)."""
    if not isinstance(sensitivity, torch.Tensor) or sensitivity.dim() != 2 or 0 in sensitivity.shape:
        raise ValueError(f"sensitivity must be a non-empty (items, candidates) tensor, got {sensitivity!r}")
    sensitivity = sensitivity.double().nan_to_num(nan=float("inf"), posinf=float("inf"))
    if not bool(sensitivity.isfinite().any(dim=1).all()):
        raise ValueError("every item of sensitivity needs at least one finite (non-NaN) candidate")
    items, n_cand = sensitivity.shape
    if len(bits) != n_cand:
        raise ValueError(f"bits has {len(bits)} entries for {n_cand} candidates")
    if not math.isfinite(budget):
        raise ValueError(f"budget must be a finite number of bits per value, got {budget!r}")
    cost, den = _bit_units([float(b) for b in bits])
    capacity = math.floor(Fraction(budget).limit_denominator(1 << 20) * den * items)
    if min(cost) * items > capacity:
        raise ValueError(f"budget {budget} is below the cheapest candidate ({min(bits)} bits per value)")
    capacity = min(capacity, max(cost) * items)  # more is never needed
    if (capacity + 1) * items > MAX_DP_UNITS:
        raise ValueError(
            f"knapsack table too large ({items} items x {capacity + 1} units): fewer or coarser candidates"
        )
    inf = float("inf")
    best = torch.full((capacity + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    picks = torch.zeros(items, capacity + 1, dtype=torch.int64)
    for i in range(items):  # best[c]: least total sensitivity of the items so far using exactly c units
        options = torch.full((n_cand, capacity + 1), inf, dtype=torch.float64)
        for j, c in enumerate(cost):
            if c > capacity:
                continue
            options[j, c:] = best[: capacity + 1 - c] + float(sensitivity[i, j])
        best, picks[i] = options.min(dim=0)
    used = int(torch.nonzero(best == best.min())[0])  # the cheapest total among the optima
    choice = torch.zeros(items, dtype=torch.int64)
    for i in reversed(range(items)):
        choice[i] = picks[i, used]
        used -= cost[int(choice[i])]
    return choice


def policy_for(choice: torch.Tensor, candidates: tuple[str, ...], num_layers: int, **policy_fields) -> CachePolicy:
    """The `CachePolicy` of an :func:`allocate_bits` choice over items ordered (layer, stream)."""
    if choice.numel() != 2 * num_layers:
        raise ValueError(f"choice has {choice.numel()} items, expected 2 * num_layers = {2 * num_layers}")
    specs = [candidates[int(j)] for j in choice]
    return CachePolicy(None, None, layer_keys=tuple(specs[0::2]), layer_values=tuple(specs[1::2]), **policy_fields)


def head_policy_for(
    choice: torch.Tensor, candidates: tuple[str, ...], num_layers: int, num_kv_heads: int, **policy_fields
) -> CachePolicy:
    """The `CachePolicy` (``head_keys``/``head_values``) of an :func:`allocate_bits` choice over items
    ordered (layer, KV head, stream), as :func:`measure_head_sensitivity` ``.reshape(-1, candidates)`` gives."""
    if choice.numel() != 2 * num_layers * num_kv_heads:
        raise ValueError(
            f"choice has {choice.numel()} items, expected 2 * num_layers * num_kv_heads = "
            f"{2 * num_layers * num_kv_heads}"
        )
    specs = [candidates[int(j)] for j in choice.reshape(num_layers, num_kv_heads, 2).flatten()]
    keys = tuple(tuple(specs[(i * num_kv_heads + h) * 2] for h in range(num_kv_heads)) for i in range(num_layers))
    values = tuple(tuple(specs[(i * num_kv_heads + h) * 2 + 1] for h in range(num_kv_heads)) for i in range(num_layers))
    return CachePolicy(None, None, head_keys=keys, head_values=values, **policy_fields)


def uniform_pairs(candidates: tuple[str, ...], head_dim: int, budget: float) -> list[tuple[str, str, float]]:
    """Every uniform (K spec, V spec, mean bits) within ``budget`` that no other pair of the same codec
    families within the budget beats in bits for both streams (a pair with room to spare is dominated)."""
    bits = {c: get_codec(c, head_dim=head_dim).bits_per_value() for c in candidates}

    def family(spec: str) -> tuple:
        name, _, options = parse_spec(spec)
        return name, tuple(sorted(options.items()))

    fits = [
        (k, v, (bits[k] + bits[v]) / 2)
        for k in candidates
        for v in candidates
        if bits[k] + bits[v] <= 2 * budget + 1e-9
    ]
    return [
        (k, v, m)
        for k, v, m in fits
        if not any(
            family(k2) == family(k)
            and family(v2) == family(v)
            and bits[k2] >= bits[k]
            and bits[v2] >= bits[v]
            and m2 > m
            for k2, v2, m2 in fits
        )
    ]


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
    parser.add_argument("--candidates", nargs="+", default=list(DEFAULT_CANDIDATES), help="codec specs to choose from")
    parser.add_argument("--calib-windows", type=int, default=2, help="calibration windows")
    parser.add_argument("--calib-ctx", type=int, default=512, help="context tokens per calibration window")
    parser.add_argument("--calib-n", type=int, default=64, help="continuation tokens scored per calibration window")
    parser.add_argument("--per-head", action="store_true",
                        help="with --budget: choose a candidate per (layer, KV head, stream) (head_keys/head_values) "
                        "from one-head sensitivities instead of one per (layer, stream)")  # fmt: skip
    parser.add_argument("--value-candidates", nargs="+", default=None,
                        help="with --per-head: the V candidates (default: --candidates)")  # fmt: skip
    parser.add_argument("--held-ctx", type=int, default=None, metavar="N",
                        help="with --per-head: --budget is the bits HELD at N tokens (16-bit sinks and residual "
                        "window included), as the presets' budgets are")  # fmt: skip
    parser.add_argument("--residual", type=int, default=128, help="newest tokens kept in 16 bits")
    parser.add_argument("--sinks", type=int, default=4, help="first tokens kept in 16 bits")
    parser.add_argument("--block", type=int, default=None, help="tokens packed at once (1 with --residual 0)")
    parser.add_argument(
        "--sensitivity", default=None, type=output_file, help="JSON file: reused if it exists, else written"
    )
    parser.add_argument(
        "--out", default="policy-{budget}.json", type=output_file, help="policy file ({budget} is replaced)"
    )
    parser.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda)")
    parser.add_argument("--evaluate-windows", type=int, default=0,
                        help="then evaluate each policy with kvpack.evaluate (ctx 1024, n_eval 256) on N windows")  # fmt: skip
    parser.add_argument("--uniform", type=int, default=0, metavar="K",
                        help="with --evaluate-windows: also evaluate the K undominated uniform K/V pairs of the "
                        "candidates within each budget that the measured sensitivities predict best")  # fmt: skip
    parser.add_argument("--results", default=None, type=output_file, help="JSON file for the evaluation results")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def run(args: argparse.Namespace) -> int:
    from kvpack.evaluation.models import load
    from kvpack.evaluation.text import load_text, tokenize
    from kvpack.tuning.calibrate import calibration_ids

    if (args.budget is None) == (args.outlier_heads is None):
        raise ValueError("give --budget (per-layer allocation) or --outlier-heads N (16-bit outlier heads), not both")
    if not args.per_head and (args.value_candidates is not None or args.held_ctx is not None):
        raise ValueError("--value-candidates and --held-ctx go with --per-head")
    if args.held_ctx is not None and args.held_ctx <= args.sinks + args.residual:
        raise ValueError(f"--held-ctx must exceed --sinks + --residual ({args.sinks + args.residual})")
    candidates = tuple(args.candidates)
    model, tokenizer = load(args.model, device=args.device)
    if args.outlier_heads is not None:
        return _run_outlier_heads(model, tokenizer, args)
    if args.per_head:
        return _run_per_head(model, tokenizer, args)
    config = model.config
    head_dim, num_layers = _head_dim(config), config.num_hidden_layers
    bits = [get_codec(c, head_dim=head_dim).bits_per_value() for c in candidates]
    path = Path(args.sensitivity) if args.sensitivity else None
    if path is not None and path.is_file():
        saved = json.loads(path.read_text())
        if saved["candidates"] != list(candidates):
            raise ValueError(f"{path} holds sensitivities of {saved['candidates']}, not {list(candidates)}")
        kl = torch.tensor(saved["kl"], dtype=torch.float64)
        print(f"sensitivities from {path}")
    else:
        ids = tokenize(tokenizer, load_text(args.text))
        windows = calibration_ids(ids, args.calib_ctx + args.calib_n, args.calib_windows)
        kl = measure_sensitivity(model, windows, args.calib_ctx, candidates, args.residual, args.sinks,
                                 progress=not args.no_progress)  # fmt: skip
        if path is not None:
            path.write_text(json.dumps({"candidates": list(candidates), "kl": kl.tolist(), "text": str(args.text),
                                        "calib_windows": args.calib_windows, "calib_ctx": args.calib_ctx,
                                        "calib_n": args.calib_n}))  # fmt: skip
    policies: dict[float, CachePolicy] = {}
    for budget in args.budget:
        choice = allocate_bits(kl.reshape(num_layers * 2, -1), bits, budget)
        policy = policy_for(choice, candidates, num_layers, residual=args.residual, sinks=args.sinks)
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
    """kvpack.evaluate (snapshot, ctx 1024, n_eval 256) of each allocated policy and, with ``--uniform K``,
    of the K undominated uniform pairs within its budget of least predicted KL (sum of the measured
    per-layer sensitivities: the same table the allocation uses, so the baseline is picked as well
    as the policy is)."""
    from kvpack.evaluation.evaluate import evaluate
    from kvpack.evaluation.text import load_text, tokenize
    from kvpack.hf.cache import KVPackCache

    ids = tokenize(tokenizer, load_text(args.text))
    config = model.config
    head_dim, num_layers = _head_dim(config), config.num_hidden_layers
    memo: dict = {}
    common = {"model": (model, tokenizer), "text": ids, "ctx": 1024, "n_eval": 256, "residual": args.residual,
              "sinks": args.sinks, "progress": not args.no_progress, "reference_memo": memo}  # fmt: skip
    index = {c: j for j, c in enumerate(candidates)}

    def predicted(k: str, v: str) -> float:
        return float(kl[:, 0, index[k]].sum() + kl[:, 1, index[v]].sum())

    done: dict[tuple[str, str], dict] = {}
    rows = []
    for budget, policy in policies.items():
        result = evaluate(**common, windows=args.evaluate_windows,
                          cache_factory=lambda config, p=policy: KVPackCache(config, policy=p))  # fmt: skip
        choice_kl = sum(
            float(kl[i, s, index[spec]]) for i in range(num_layers) for s, spec in enumerate(policy.specs(i))
        )  # fmt: skip
        rows.append({"budget": budget, "policy": "allocated", "predicted_kl": choice_kl,
                     "mean_bits": policy_bits(policy, head_dim, num_layers, config.num_key_value_heads),
                     **_metrics(result)})  # fmt: skip
        if args.uniform:
            pairs = uniform_pairs(candidates, head_dim, budget)
            for k, v, mean_bits in sorted(pairs, key=lambda p: predicted(p[0], p[1]))[: args.uniform]:
                if (k, v) not in done:
                    done[(k, v)] = _metrics(evaluate(**common, windows=args.evaluate_windows, key=k, value=v))
                rows.append({"budget": budget, "policy": f"{k}/{v}", "predicted_kl": predicted(k, v),
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
                              progress=not args.no_progress)  # fmt: skip
    shape = (config.num_hidden_layers, config.num_key_value_heads)
    for label, heads in (("worst", choose_outlier_heads(scores, args.outlier_heads)),
                         ("mildest", choose_outlier_heads(-scores, args.outlier_heads))):  # fmt: skip
        policy = CachePolicy(args.key, args.value, args.residual, args.sinks, fp_heads=heads)
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
    keys, values = tuple(args.candidates), tuple(args.value_candidates or args.candidates)
    union = tuple(dict.fromkeys(keys + values))
    path = Path(args.sensitivity) if args.sensitivity else None
    if path is not None and path.is_file():
        saved = json.loads(path.read_text())
        have = (saved.get("key_candidates") or [], saved.get("value_candidates") or [])
        missing = [c for c in keys if c not in have[0]] + [c for c in values if c not in have[1]]
        if missing:
            raise ValueError(f"{path} holds no sensitivities for {missing} (K: {have[0]}, V: {have[1]})")
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
                                      args.block, progress=not args.no_progress)  # fmt: skip
        if path is not None:
            rows = [[[[None if math.isnan(x) else x for x in c] for c in st] for st in h] for h in kl.tolist()]
            path.write_text(json.dumps({"key_candidates": list(keys), "value_candidates": list(values), "kl": rows,
                                        "text": str(args.text), "calib_windows": args.calib_windows,
                                        "calib_ctx": args.calib_ctx, "calib_n": args.calib_n}))  # fmt: skip
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
                                 block=args.block)  # fmt: skip
        predicted = float(table.gather(1, choice[:, None]).sum())
        mean_bits = policy_bits(policy, head_dim, num_layers, num_heads)
        out = args.out.replace("{budget}", f"{budget:g}")
        save_policy(policy, out, budget=budget, held_ctx=args.held_ctx, mean_bits=mean_bits, predicted_kl=predicted,
                    candidates=list(union), calib={"text": str(args.text), "windows": args.calib_windows,
                    "ctx": args.calib_ctx, "n": args.calib_n})  # fmt: skip
        print(f"budget {budget:g}: mean codec bits {mean_bits:.4f}, predicted KL {predicted:.5f} -> {out}")
    return 0
