"""The calibrated codec: loads a calibration by name, equals turbo_mse without one, fitted codebooks fit better."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kvpack
from kvpack.tuning.calibrate import calibrated_policy, calibration_qkv, fit_calibration, save_calibration

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    """A calibration of a tiny random GQA Llama (2 layers, 2 KV heads, head_dim 16) and its captured Q/K/V."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # anisotropic queries (real models' are): rotary pairs (i, i + 8) of 2 dims scaled up
        for layer in model.model.layers:
            rows = layer.self_attn.q_proj.weight.view(4, 16, 64)
            rows[:, [0, 1, 8, 9]] *= 6.0
    g = torch.Generator().manual_seed(1)
    qkv = calibration_qkv(model, [torch.randint(3, 96, (120,), generator=g) for _ in range(2)])
    folder = tmp_path_factory.mktemp("calibrations")
    meta = {"head_dim": 16, "num_kv_heads": 2, "num_layers": 2, "bases": ["rotation", "whiten", "pca"], "bits": [2, 3]}
    save_calibration("tiny", fit_calibration(qkv, bits=(2, 3), progress=False), meta, folder)
    return folder, model, qkv


@pytest.fixture()
def named(calibration, monkeypatch):
    monkeypatch.setenv("KVPACK_CALIBRATIONS", str(calibration[0]))
    return calibration


def test_without_calibration_it_is_turbo_mse():
    x = torch.randn(2, 3, 40, 64, generator=torch.Generator().manual_seed(0))
    for bits in (2, 3):
        mine, turbo = (
            kvpack.get_codec(f"calibrated:{bits}", head_dim=64),
            kvpack.get_codec(f"turbo_mse:{bits}", head_dim=64),
        )
        a, b = mine.encode(x), turbo.encode(x)
        assert torch.equal(a.data["norm"], b.data["norm"])
        assert (a.data["codes"] == b.data["codes"]).float().mean() > 0.999  # ties at boundaries may round apart
        assert mine.bits_per_value() == turbo.bits_per_value() == bits + 16 / 64


@pytest.mark.parametrize("basis", ["rotation", "whiten", "pca"])
def test_loaded_by_name_round_trip_and_bits(named, basis):
    _, _, qkv = named
    x = qkv[1][1][None]  # (1, kv_heads, tokens, 16): real keys of layer 1
    codec = kvpack.get_codec(f"calibrated:3:calib=tiny,layer=1,basis={basis}", head_dim=16)
    packed = codec.encode(x)
    assert 8 * packed.nbytes / x.numel() == codec.bits_per_value() == 3 + 16 / 16
    y = codec.decode(packed)
    assert y.shape == x.shape
    if basis != "whiten":  # whitening moves error to directions the queries ignore: larger in plain MSE
        assert ((y - x).norm() / x.norm()) < 0.3
    assert torch.equal(codec.encode(x).data["codes"], packed.data["codes"])  # deterministic


def test_fitted_codebooks_beat_the_sphere_codebook_on_their_data(named):
    _, _, qkv = named
    for stream in (1, 2):
        x = qkv[0][stream][None]
        spec = "k" if stream == 1 else "v"
        fitted = kvpack.get_codec(f"calibrated:2:calib=tiny,stream={spec}", head_dim=16)
        sphere = kvpack.get_codec("calibrated:2", head_dim=16)  # the same rotation, turbo's codebook
        err = {c: ((c.decode(c.encode(x)) - x) ** 2).sum().item() for c in (fitted, sphere)}
        assert err[fitted] < err[sphere]


def test_whitened_keys_give_smaller_attention_score_error(named):
    _, _, qkv = named
    q, k, _ = qkv[0]
    errors = {}
    for basis in ("rotation", "whiten"):
        codec = kvpack.get_codec(f"calibrated:2:calib=tiny,basis={basis}", head_dim=16)
        err = codec.decode(codec.encode(k[None]))[0] - k
        errors[basis] = sum(((q[2 * h : 2 * h + 2] @ err[h].T) ** 2).mean().item() for h in range(2))
    assert errors["whiten"] < errors["rotation"]


def test_calibrated_policy_in_the_cache(named):
    _, model, _ = named
    policy = calibrated_policy("tiny", 2, 3, 2, residual=8, sinks=2)
    assert policy.layer_keys[1] == "calibrated:3:calib=tiny,layer=1,stream=k,basis=whiten"
    cache = kvpack.KVPackCache(model.config, policy=policy)
    with torch.inference_mode():
        model(torch.randint(3, 96, (1, 60)), past_key_values=cache)
    assert cache.layers[1].chunks and cache.bits_per_value("v") < cache.bits_per_value("k") < 16


def test_errors(named, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="basis"):
        kvpack.get_codec("calibrated:3:calib=tiny,basis=nope", head_dim=16)
    with pytest.raises(ValueError, match="needs a calibration"):
        kvpack.get_codec("calibrated:3:basis=pca", head_dim=16)
    with pytest.raises(ValueError, match="whiten is for keys only"):
        kvpack.get_codec("calibrated:3:calib=tiny,stream=v,basis=whiten", head_dim=16)
    with pytest.raises(ValueError, match="layer"):
        kvpack.get_codec("calibrated:3:calib=tiny,layer=7", head_dim=16)
    with pytest.raises(ValueError, match="stream"):
        kvpack.get_codec("calibrated:3:calib=tiny,stream=q", head_dim=16)
    codec = kvpack.get_codec("calibrated:3:calib=tiny", head_dim=16)
    with pytest.raises(ValueError, match="KV heads"):
        codec.encode(torch.randn(1, 3, 8, 16))
    with pytest.raises(ValueError, match="at least 3 dims"):
        codec.encode(torch.randn(8, 16))
    monkeypatch.setenv("KVPACK_CALIBRATIONS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="kvpack calibrate --name missing"):
        kvpack.get_codec("calibrated:3:calib=missing", head_dim=16)
