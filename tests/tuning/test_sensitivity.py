"""kvpack.tuning.sensitivity: measured per-layer / per-head KL on a tiny random model."""

import pytest
import torch

from kvpack import CachePolicy, get_codec
from kvpack.tuning.knapsack import allocate_bits, choose_outlier_heads
from kvpack.tuning.sensitivity import _kl_of_policies, head_sensitivity, measure_head_sensitivity, measure_sensitivity

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_measure_head_sensitivity_is_the_kl_of_the_one_head_policy(tiny_llama, windows):
    model, ws = tiny_llama(layers=2, kv_heads=2), windows(1, 60)
    kl = measure_head_sensitivity(model, ws, 56, ("int:2", "int:4"), ("int:2",), residual=0, sinks=1, block=1,
                                  progress=False)  # fmt: skip
    assert kl.shape == (2, 2, 2, 2) and kl.dtype == torch.float64
    assert torch.isnan(kl[:, :, 1, 1]).all() and not torch.isnan(kl[:, :, 0]).any()
    # each slot is the KL of that one head's policy (layer 1, head 0's V in int:2; layer 0, head 1's K in
    # int:4), measured on its own: the one shared prefill and reference change nothing
    one_head = [
        CachePolicy(None, None, 0, 1, block=1, window_dtype=torch.float32, head_values=(None, ("int:2", None))),
        CachePolicy(None, None, 0, 1, block=1, window_dtype=torch.float32, head_keys=((None, "int:4"),)),
    ]
    alone = _kl_of_policies(model, ws, 56, one_head, "", False)
    assert alone.tolist() == pytest.approx([float(kl[1, 0, 1, 0]), float(kl[0, 1, 0, 1])], rel=1e-9)
    assert (kl[:, :, 1, 0] > 0).all()
    with pytest.raises(ValueError, match="key_candidates or value_candidates"):
        measure_head_sensitivity(model, ws, 56, (), ())


def test_measure_sensitivity_orders_bits_and_drives_the_policy(tiny_llama, windows):
    model = tiny_llama()
    with torch.no_grad():  # sharper attention than random init gives, so that K errors matter too
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(3.0)
            layer.self_attn.k_proj.weight.mul_(3.0)
    cands = ("int:2", "int:4", "fp16")
    kl = measure_sensitivity(model, windows(1, 72), 56, cands, residual=8, sinks=2, progress=False)
    assert kl.shape == (3, 2, 3)
    assert (kl[..., 0] > kl[..., 1]).all()  # 2 bits hurt more than 4 bits in every layer and stream
    assert (kl[..., 2] < kl[..., 0] / 3).all()  # fp16 rounding costs much less
    # per-stream candidates: the same numbers where measured, NaN (not allowed) where not, and an unknown one refused
    part = measure_sensitivity(model, windows(1, 72), 56, cands, residual=8, sinks=2, progress=False,
                               key_candidates=("int:4",), value_candidates=("int:2", "fp16"))  # fmt: skip
    measured = torch.zeros_like(kl, dtype=torch.bool)
    measured[:, 0, 1] = measured[:, 1, 0] = measured[:, 1, 2] = True
    assert torch.isnan(part[~measured]).all()
    assert part[measured].tolist() == pytest.approx(kl[measured].tolist(), rel=1e-9)
    with pytest.raises(ValueError, match="key_candidates must be among"):
        measure_sensitivity(model, windows(1, 72), 56, cands, key_candidates=("int:3",), progress=False)
    # the allocated policy (predicted best) beats uniform int:4/int:2 at the same budget when re-measured
    bits = [get_codec(c, head_dim=16).bits_per_value() for c in cands[:2]]
    choice = allocate_bits(kl[..., :2].reshape(6, 2), bits, (bits[0] + bits[1]) / 2)
    assert float(kl[..., :2].reshape(6, 2).gather(1, choice[:, None]).sum()) <= float(
        kl[:, 0, 1].sum() + kl[:, 1, 0].sum()
    )


def test_choose_outlier_heads_from_measured_head_error(tiny_llama, windows):
    model = tiny_llama(layers=2)
    ws = windows(1, 72)
    scores = head_sensitivity(model, ws, 56, "int:2", "int:2", residual=8, sinks=2, progress=False)
    assert scores.shape == (2, 2) and (scores > 0).all()
    worst = choose_outlier_heads(scores, 1)
    best = choose_outlier_heads(-scores, 1)
    assert worst != best
    # keeping the head the measurement calls worst in 16-bit helps more than keeping the mildest one
    make = lambda heads: CachePolicy("int:2", "int:2", 8, 2, window_dtype=torch.float32, fp_heads=heads)
    kl = _kl_of_policies(model, ws, 56, [make(worst), make(best)], "", False)
    assert kl[0] < kl[1]
    assert choose_outlier_heads(torch.tensor([[0.1, 0.5], [0.3, 0.2]]), 2) == ((0, 1), (1, 0))
    with pytest.raises(ValueError, match="count"):
        choose_outlier_heads(scores, 5)
    with pytest.raises(ValueError, match="needs a key or a value"):
        head_sensitivity(model, ws, 56, None, None)


def test_a_time_estimate_is_printed_before_the_candidates_run(tiny_llama, windows, capsys):
    model, ws = tiny_llama(layers=1), windows(2, 60)
    policies = [CachePolicy("int:2", None, 0, 1, block=1), CachePolicy("int:4", None, 0, 1, block=1)]
    _kl_of_policies(model, ws, 56, policies, "sensitivity", True)
    err = capsys.readouterr().err
    assert "sensitivity: 2 candidates x 2 windows, about" in err and err.index("about") < err.index("sensitivity:", 1)
    _kl_of_policies(model, ws, 56, policies, "quiet", False)
    assert "about" not in capsys.readouterr().err
