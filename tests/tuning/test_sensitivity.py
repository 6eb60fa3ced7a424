"""kvpack.tuning.sensitivity: measured per-layer / per-head KL on a tiny random model."""

import pytest
import torch
from tiny_models import tiny_model

from kvpack import CachePolicy, get_codec
from kvpack.tuning.knapsack import allocate_bits, choose_outlier_heads
from kvpack.evaluation.protocol import clean_prefill, continue_logits, store_prefill
from kvpack.hf.cache import KVPackCache
from kvpack.tuning.sensitivity import head_sensitivity, measure_head_sensitivity, measure_sensitivity

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def sharpened(model):
    """``model`` with its q/k/v projections x4: sharper attention than random init gives, so that codec KLs
    stand well above the float32 noise."""
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.weight.mul_(4.0)
    return model


def kl_through_kvpackcache(model, windows, ctx, policies):
    """The protocol spelled out, one `KVPackCache` per policy: mean KL(exact || policy) per continuation token."""
    kl = torch.zeros(len(policies), dtype=torch.float64)
    with torch.inference_mode():
        for w in windows:
            prefill = clean_prefill(model, w[None, :ctx])
            logp = []
            for policy in [CachePolicy(None, None, 0, 0, window_dtype=torch.float32), *policies]:
                cache = store_prefill(KVPackCache(model.config, policy=policy), prefill)
                logp.append(torch.log_softmax(continue_logits(model, cache, w[None, ctx:]).float(), -1))
            for j, out in enumerate(logp[1:]):
                kl[j] += (logp[0].exp() * (logp[0] - out)).sum(-1).clamp_min(0).mean().item() / len(windows)
    return kl


def test_measure_head_sensitivity_is_the_kl_of_the_one_head_policy(tiny_llama, windows):
    model, ws = sharpened(tiny_llama(layers=2, kv_heads=2)), windows(1, 60)
    kl = measure_head_sensitivity(model, ws, 56, ("int:2", "int:4"), ("int:2",), residual=0, sinks=1, block=1,
                                  progress=False)  # fmt: skip
    assert kl.shape == (2, 2, 2, 2) and kl.dtype == torch.float64
    assert torch.isnan(kl[:, :, 1, 1]).all() and not torch.isnan(kl[:, :, 0]).any()
    assert (kl[:, :, 1, 0] > 0).all() and (kl[:, :, 0, 0] > kl[:, :, 0, 1]).all()  # int:2 keys cost more than int:4
    # each slot is the KL of that one head's policy (layer 1, head 0's V in int:2; layer 0, head 1's K in int:2)
    # through a KVPackCache; there the layer's other head is held in float16 (`PerHeadCodec`), exact here: a
    # perturbation 0.2-1% of these KLs on this model
    one_head = [
        CachePolicy(None, None, 0, 1, block=1, window_dtype=torch.float32, head_values=(None, ("int:2", None))),
        CachePolicy(None, None, 0, 1, block=1, window_dtype=torch.float32, head_keys=((None, "int:2"),)),
    ]
    alone = kl_through_kvpackcache(model, ws, 56, one_head)
    assert alone.tolist() == pytest.approx([float(kl[1, 0, 1, 0]), float(kl[0, 1, 0, 0])], rel=2e-2)
    with pytest.raises(ValueError, match="key_candidates or value_candidates"):
        measure_head_sensitivity(model, ws, 56, (), ())


def test_with_one_kv_head_the_head_table_is_the_layer_table(tiny_llama, windows):
    # nothing float16 in between: the one head of a layer is the layer, to the last bit
    model, ws = sharpened(tiny_llama(layers=2, kv_heads=1)), windows(2, 64)
    heads = measure_head_sensitivity(model, ws, 56, ("int:2", "turbo_mse:3"), ("int:3",), residual=4, sinks=1,
                                     block=4, progress=False, batch=3)  # fmt: skip
    layers = measure_sensitivity(model, ws, 56, ("int:2", "turbo_mse:3", "int:3"), 4, 1, progress=False,
                                 key_candidates=("int:2", "turbo_mse:3"), value_candidates=("int:3",), block=4)
    assert heads[:, 0, 0, :2].flatten().tolist() == pytest.approx(layers[:, 0, :2].flatten().tolist(), rel=1e-6)
    assert heads[:, 0, 1, 0].tolist() == pytest.approx(layers[:, 1, 2].tolist(), rel=1e-6)
    assert (heads[:, 0, :, 0] > 1e-6).all()


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
    kl = kl_through_kvpackcache(model, ws, 56, [make(worst), make(best)])
    assert kl[0] < kl[1]
    assert choose_outlier_heads(torch.tensor([[0.1, 0.5], [0.3, 0.2]]), 2) == ((0, 1), (1, 0))
    with pytest.raises(ValueError, match="count"):
        choose_outlier_heads(scores, 5)
    with pytest.raises(ValueError, match="needs a key or a value"):
        head_sensitivity(model, ws, 56, None, None)


def test_a_time_estimate_is_printed_before_the_candidates_run(tiny_llama, windows, capsys):
    model, ws = tiny_llama(layers=1), windows(2, 60)
    measure_sensitivity(model, ws, 56, ("int:2", "int:4"), 0, 1, key_candidates=("int:2", "int:4"),
                        value_candidates=("int:2",), block=1)  # fmt: skip
    err = capsys.readouterr().err
    assert "sensitivity: 3 candidates x 2 windows, about" in err and err.index("about") < err.index("sensitivity:", 1)
    measure_sensitivity(model, ws, 56, ("int:2",), 0, 1, progress=False, block=1)
    assert "about" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "family, ctx, residual, sinks, block, spec",
    [("llama", 72, 8, 2, None, "int:2"), ("llama", 72, 0, 1, 1, "turbo_mse:2"),
     ("llama", 72, 4, 1, 32, "int:2:axis=channel"), ("qwen3", 72, 8, 4, 8, "int:4:axis=channel,group=8"),
     ("gemma3", 540, 16, 1, 16, "int:3:rotation=hadamard")],
)
def test_each_entry_is_the_kl_through_one_kvpackcache(family, ctx, residual, sinks, block, spec):
    # the batched rows of decoded blocks against the protocol itself: per-token and block (channel-axis) codecs,
    # the default block, qk-norm, sliding layers past their window (gemma3: 512)
    model = tiny_model(family)
    num_layers = model.config.num_hidden_layers
    w = torch.randint(1, model.config.vocab_size, (ctx + 18,), generator=torch.Generator().manual_seed(5))
    kl = measure_sensitivity(model, [w], ctx, (spec,), residual, sinks, progress=False, block=block, batch=3)
    policies = []
    for layer in range(num_layers):
        for stream in range(2):
            specs = tuple(spec if i == layer else None for i in range(num_layers))
            nones = (None,) * num_layers
            keys, values = (specs, nones) if stream == 0 else (nones, specs)
            policies.append(CachePolicy(None, None, residual, sinks, block=block, window_dtype=torch.float32,
                                        layer_keys=keys, layer_values=values))  # fmt: skip
    want = kl_through_kvpackcache(model, [w], ctx, policies)
    assert kl[..., 0].flatten().tolist() == pytest.approx(want.tolist(), rel=1e-4, abs=1e-9)
    assert (want > 0).any()


@pytest.mark.parametrize("family, spec", [("llama", "int:2"), ("qwen3", "turbo_mse:2")])
def test_centered_keys_are_the_kl_through_one_kvpackcache(family, spec):
    # keys relative to the prefill's mean key (`center_keys`): the rows hold what the cache decodes
    model = tiny_model(family)
    num_layers, ctx = model.config.num_hidden_layers, 72
    w = torch.randint(1, model.config.vocab_size, (ctx + 18,), generator=torch.Generator().manual_seed(5))
    kl = measure_sensitivity(model, [w], ctx, (spec,), 8, 2, progress=False, block=8, batch=3,
                             key_candidates=(spec,), value_candidates=(spec,), center_keys=True)  # fmt: skip
    keys = [tuple(spec if i == layer else None for i in range(num_layers)) for layer in range(num_layers)]
    make = lambda centered: [CachePolicy(None, None, 8, 2, block=8, window_dtype=torch.float32, layer_keys=k,
                                         center_keys=centered) for k in keys]  # fmt: skip
    want = kl_through_kvpackcache(model, [w], ctx, make(True))
    assert kl[:, 0, 0].tolist() == pytest.approx(want.tolist(), rel=1e-4, abs=1e-9)
    assert not torch.allclose(want, kl_through_kvpackcache(model, [w], ctx, make(False)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_measurement_on_the_gpu_equals_the_cpu_one(tiny_llama, windows):
    # the KL rows come back from the device (a CPU accumulator met CUDA rows once: calibrate_gpu.py found it)
    model, ws = sharpened(tiny_llama(layers=2)), windows(1, 72)
    cpu = measure_sensitivity(model, ws, 56, ("int:2", "int:4"), 8, 2, progress=False)
    gpu = measure_sensitivity(model.cuda(), [w.cuda() for w in ws], 56, ("int:2", "int:4"), 8, 2, progress=False)
    assert gpu.device.type == "cpu"
    # float32 on two devices: 1% where the KL is large (int:2), its ~1e-7 noise floor where it is not (int:4)
    torch.testing.assert_close(gpu, cpu, rtol=1e-2, atol=1e-7)
