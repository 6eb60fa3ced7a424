"""The allocation solve of `kvpack allocate`: one candidate codec per item under a mean-bits budget.

Assuming the KL of independent perturbations adds up (the usual first-order model of
mixed-precision allocation, e.g. HAWQ-V3, Yao et al. arXiv 2011.10680; KVTuner, arXiv 2502.04420,
for KV caches), :func:`allocate_bits` chooses one candidate per item ((layer, stream) or (layer,
KV head, stream)) to minimize the summed sensitivity with ``mean bits_per_value <= budget``: a
multiple-choice knapsack solved exactly by dynamic programming over bits counted in units of the
candidates' common denominator (1/64 for most). :func:`policy_for` / :func:`head_policy_for` turn
a choice into a `CachePolicy`; :func:`choose_outlier_heads` picks the heads to keep in 16-bit;
:func:`uniform_pairs` the uniform K/V baselines within a budget.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from kvpack.codec import get_codec, parse_spec
from kvpack.policy import CachePolicy

__all__ = ["BudgetTooSmall", "allocate_bits", "choose_outlier_heads", "head_policy_for", "policy_for", "uniform_pairs"]

MAX_DP_UNITS = 5_000_000  # capacity cells of the knapsack table


class BudgetTooSmall(ValueError):
    """No choice of allowed candidates is within the budget; ``least`` is the smallest achievable one."""

    def __init__(self, budget: float, least: float):
        super().__init__(
            f"budget {budget:g} is below the cheapest choice of allowed (non-NaN) candidates: the smallest "
            f"achievable budget is {least:g} bits per value"
        )
        self.least = least


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
    that item cannot take (e.g. a K-only codec for a V item). Raises ValueError, naming the smallest
    achievable budget, when no choice of allowed candidates fits."""
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
    if not all(math.isfinite(b) and b > 0 for b in bits):
        raise ValueError(f"bits must be finite and positive, got {bits}")
    cost, den = _bit_units([float(b) for b in bits])
    capacity = math.floor(Fraction(budget) * den * items)  # exact: a float is a rational
    allowed = sensitivity.isfinite()
    least = sum(min(c for c, ok in zip(cost, row) if ok) for row in allowed.tolist())  # each item at its cheapest
    if least > capacity:
        raise BudgetTooSmall(budget, float(Fraction(least, den * items)))
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


def choose_outlier_heads(scores: torch.Tensor, count: int) -> tuple[tuple[int, int], ...]:
    """The ``count`` (layer, kv_head) pairs of largest ``scores`` ``(layers, kv_heads)``, sorted: `CachePolicy.fp_heads`."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(f"scores must be a (layers, kv_heads) tensor, got {scores!r}")
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= scores.numel():
        raise ValueError(f"count must be an int in [0, {scores.numel()}], got {count!r}")
    top = torch.topk(scores.flatten().double(), count).indices.tolist()
    return tuple(sorted(divmod(i, scores.shape[1]) for i in top))
