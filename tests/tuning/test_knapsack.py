"""kvpack.tuning.knapsack: the exact multiple-choice knapsack and the policies of its choices."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpack import get_codec
from kvpack.policy import policy_bits
from kvpack.tuning.knapsack import BudgetTooSmall, allocate_bits, head_policy_for, policy_for, uniform_pairs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@settings(max_examples=40, deadline=None)
@given(
    items=st.integers(1, 5),
    seed=st.integers(0, 10_000),
    budget=st.floats(2.25, 5.0),
)
def test_allocate_bits_is_the_brute_force_optimum(items, seed, budget):
    bits = [2.25, 2.5, 3.25, 4.5]
    s = torch.rand(items, len(bits), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    choice = allocate_bits(s, bits, budget)
    assert sum(bits[j] for j in choice.tolist()) / items <= budget + 1e-12
    best = min(
        sum(float(s[i, j]) for i, j in enumerate(c))
        for c in itertools.product(range(len(bits)), repeat=items)
        if sum(bits[j] for j in c) / items <= budget + 1e-12
    )
    assert float(s.gather(1, choice[:, None]).sum()) == pytest.approx(best, rel=1e-12)


def test_allocate_bits_spends_the_budget_where_it_pays():
    # item 0 gains a lot from more bits, item 1 nothing: a budget for one upgrade goes to item 0
    s = torch.tensor([[1.0, 0.1], [0.5, 0.5]], dtype=torch.float64)
    assert allocate_bits(s, [2.0, 4.0], 3.0).tolist() == [1, 0]
    # with equal gains, the tie goes to the cheaper total
    assert allocate_bits(torch.tensor([[1.0, 1.0]], dtype=torch.float64), [2.0, 4.0], 4.0).tolist() == [0]


def test_allocate_bits_non_dyadic_bits():
    # channel outliers give bits like 2 + 8*2/64 + 2*24/(32*64); a common denominator makes them exact
    bits = [get_codec(s, head_dim=64).bits_per_value() for s in ("int:2", "outlier_channels:2:channels=2", "e8:3")]
    s = torch.tensor([[3.0, 2.0, 1.0]] * 4, dtype=torch.float64)
    budget = (bits[1] * 3 + bits[0]) / 4
    choice = allocate_bits(s, bits, budget).tolist()
    assert sorted(choice) == [0, 1, 1, 1]


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.zeros(2, 3), [2.0, 3.0], 3.0), "bits has 2 entries"),
        ((torch.zeros(2, 2), [2.0, 3.0], 1.5), "below the cheapest"),
        ((torch.zeros(2, 2), [2.0, 3.0], float("nan")), "finite"),
        ((torch.zeros(0, 2), [2.0, 3.0], 3.0), "non-empty"),
        ((torch.zeros(2, 2), [2.0, 3.1234567891], 3.0), "rationals"),
    ],
)
def test_allocate_bits_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        allocate_bits(*args)


def test_allocate_bits_never_picks_a_nan_candidate():
    # a K-only candidate (NaN for the V item) is skipped even when it would be the best use of the budget
    s = torch.tensor([[1.0, 0.5, 0.4], [1.0, 0.2, float("nan")]], dtype=torch.float64)
    choice = allocate_bits(s, [2.0, 3.0, 4.0], 4.0).tolist()
    assert choice[1] != 2 and choice == [2, 1]
    with pytest.raises(ValueError, match="at least one finite"):
        allocate_bits(torch.tensor([[1.0, float("nan")], [float("nan")] * 2]), [2.0, 3.0], 3.0)


def test_head_policy_for_orders_items_layer_head_stream():
    # items (layer, head, stream): L0H0K L0H0V L0H1K L0H1V L1H0K ...
    choice = torch.tensor([0, 1, 1, 0, 1, 1, 0, 0])
    policy = head_policy_for(choice, ("e8:2", "int:8"), 2, 2, residual=0, sinks=1, block=1)
    assert policy.head_keys == (("e8:2", "int:8"), ("int:8", "e8:2"))
    assert policy.head_values == (("int:8", "e8:2"), ("int:8", "e8:2"))
    assert (policy.residual, policy.sinks, policy.block) == (0, 1, 1)
    assert policy_bits(policy, 64, 2, 2) == pytest.approx((2.25 + 8.5) / 2)
    with pytest.raises(ValueError, match="expected 2 \\* num_layers \\* num_kv_heads = 8"):
        head_policy_for(choice[:6], ("e8:2", "int:8"), 2, 2)


def test_uniform_pairs_are_within_budget_and_undominated():
    cands = ("e8:2", "e8:3", "e8:4", "int:2:axis=channel", "int:3:axis=channel")
    pairs = uniform_pairs(cands, 64, 3.0)
    assert ("e8:3", "e8:2", 2.75) in pairs and ("e8:2", "e8:3", 2.75) in pairs
    assert ("e8:2", "e8:2", 2.25) not in pairs  # e8:3/e8:2 fits and has more bits
    assert ("int:2:axis=channel", "e8:2", 2.625) in pairs  # int:3:axis=channel (4 bits) would not fit
    assert all(m <= 3.0 for _, _, m in pairs)


def test_policy_for_orders_items_layer_then_stream():
    policy = policy_for(torch.tensor([0, 1, 1, 0]), ("e8:2", "int:4"), 2, residual=32)
    assert policy.layer_keys == ("e8:2", "int:4") and policy.layer_values == ("int:4", "e8:2")
    assert policy.residual == 32
    with pytest.raises(ValueError, match="2 \\* num_layers"):
        policy_for(torch.tensor([0, 1]), ("e8:2",), 2)


def test_allocate_bits_when_the_cheapest_candidate_is_not_allowed_for_an_item():
    # item 0 cannot take the 2-bit candidate: the least mean any allowed choice reaches is (4 + 2) / 2 = 3,
    # above the budget of 2.5, though the cheapest candidate overall (2 bits) is below it
    s = torch.tensor([[float("nan"), 1.0], [1.0, 1.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="smallest achievable budget is 3 bits"):
        allocate_bits(s, [2.0, 4.0], 2.5)
    assert allocate_bits(s, [2.0, 4.0], 3.0).tolist() == [1, 0]
    with pytest.raises(ValueError, match="smallest achievable budget is 4 bits"):
        allocate_bits(torch.tensor([[float("nan"), 1.0]] * 2, dtype=torch.float64), [2.0, 4.0], 3.0)


def test_allocate_bits_budget_holds_exactly():
    # a budget a hair below a candidate's bits must not round up to it
    budget = 2.25 - 1e-10
    with pytest.raises(ValueError, match="smallest achievable budget is 2.25 bits"):
        allocate_bits(torch.zeros(1, 2, dtype=torch.float64), [2.25, 4.5], budget)


@settings(max_examples=60, deadline=None)
@given(
    items=st.integers(1, 4),
    seed=st.integers(0, 10_000),
    budget=st.floats(2.0, 5.0),
    nan_rate=st.floats(0.0, 0.7),
)
def test_allocate_bits_holds_the_budget_or_says_the_least_it_can(items, seed, budget, nan_rate):
    bits = [2.25, 2.5, 3.25, 4.5]
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(items, len(bits), generator=g, dtype=torch.float64)
    s[torch.rand(items, len(bits), generator=g) < nan_rate] = float("nan")
    s[torch.arange(items), torch.randint(len(bits), (items,), generator=g)] = 0.5  # one allowed per item
    allowed = [[j for j in range(len(bits)) if not s[i, j].isnan()] for i in range(items)]
    feasible = [c for c in itertools.product(*allowed) if sum(bits[j] for j in c) / items <= budget]
    least = sum(min(bits[j] for j in a) for a in allowed) / items
    if not feasible:
        with pytest.raises(ValueError, match=f"smallest achievable budget is {least:g} bits"):
            allocate_bits(s, bits, budget)
        return
    choice = allocate_bits(s, bits, budget).tolist()
    assert all(j in a for j, a in zip(choice, allowed))
    assert sum(bits[j] for j in choice) / items <= budget
    best = min(sum(float(s[i, j]) for i, j in enumerate(c)) for c in feasible)
    assert sum(float(s[i, j]) for i, j in enumerate(choice)) == pytest.approx(best, rel=1e-12)


def test_budget_too_small_is_a_value_error_carrying_the_least_budget():
    with pytest.raises(BudgetTooSmall) as info:
        allocate_bits(torch.tensor([[float("nan"), 1.0], [1.0, 1.0]], dtype=torch.float64), [2.0, 4.0], 2.5)
    assert isinstance(info.value, ValueError) and info.value.least == 3.0
