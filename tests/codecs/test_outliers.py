"""Outlier wrappers: channel outliers at 8 bits, sparse (index, fp16) pairs; exact accounting."""

import pytest
import torch

import kvpack


def with_outlier_channels(seed=0, shape=(2, 3, 200, 64), channels=(5, 40)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x[..., list(channels)] *= 25  # the key outlier channels of real models, exaggerated
    return x


def rel_err(y, x):
    return ((y.float() - x.float()).norm() / x.float().norm()).item()


@pytest.mark.parametrize("bits", [2, 4])
def test_channels_found_and_error_drops(bits):
    x = with_outlier_channels()
    codec = kvpack.get_codec(f"outlier_channels:{bits}:channels=2,block=64", head_dim=64)
    packed = codec.encode(x)
    assert packed.data["index"].shape == (2, 3, 4, 2)  # ceil(200 / 64) groups
    assert (packed.data["index"] == torch.tensor([5, 40], dtype=torch.uint8)).all()
    inner = kvpack.get_codec(f"int:{bits}", head_dim=64)
    assert rel_err(codec.decode(packed), x) < 0.5 * rel_err(inner.decode(inner.encode(x)), x)


def test_channels_bits_formula():
    codec = kvpack.get_codec("outlier_channels:3:channels=4,block=128", head_dim=128)
    inner = kvpack.get_codec("int:3", head_dim=128).bits_per_value()
    assert codec.bits_per_value() == pytest.approx(inner + 8 * 4 / 128 + 4 * (8 + 16) / (128 * 128))
    x = torch.randn(3, 256, 128)
    assert 8 * codec.encode(x).nbytes / x.numel() == pytest.approx(codec.bits_per_value())


def test_sparse_value_mode_keeps_spikes_exact():
    x = torch.randn(4, 50, 64)
    x[:, :, 7] = 40.0
    x[:, ::3, 11] = -30.0
    codec = kvpack.get_codec("outlier_sparse:3:count=2", head_dim=64)
    y = codec.decode(codec.encode(x))
    assert torch.equal(y[..., 7], x[..., 7]) and torch.equal(y[:, ::3, 11], x[:, ::3, 11])
    inner = kvpack.get_codec("int:3", head_dim=64)
    assert rel_err(y, x) < 0.5 * rel_err(inner.decode(inner.encode(x)), x)
    assert codec.bits_per_value() == pytest.approx(inner.bits_per_value() + 2 * (8 + 16) / 64)


def test_sparse_residual_mode_never_worse_per_vector():
    x = torch.randn(6, 40, 64) * torch.rand(6, 40, 1) * 3
    codec = kvpack.get_codec("outlier_sparse:2:count=3,mode=residual", head_dim=64)
    inner = kvpack.get_codec("int:2", head_dim=64)
    err = (codec.decode(codec.encode(x)) - x).norm(dim=-1)
    err_inner = (inner.decode(inner.encode(x)) - x).norm(dim=-1)
    assert (err <= err_inner + 1e-5).all() and err.mean() < 0.95 * err_inner.mean()


def test_threshold_leaves_slots_unused():
    x = torch.randn(3, 20, 64)
    codec = kvpack.get_codec("outlier_sparse:4:count=2,threshold=1000", head_dim=64)
    packed = codec.encode(x)
    assert (packed.data["index"] == 64).all()  # the unused-slot marker
    inner = kvpack.get_codec("int:4", head_dim=64)
    assert torch.equal(codec.decode(packed), inner.decode(inner.encode(x)))
    assert codec.spec == "outlier_sparse:4:count=2,threshold=1000.0"
    assert kvpack.get_codec(codec.spec, head_dim=64) == codec


def test_wide_heads_use_int16_indices():
    codec = kvpack.get_codec("outlier_sparse:4", head_dim=256)
    packed = codec.encode(torch.randn(2, 256))
    assert packed.data["index"].dtype == torch.int16


def test_other_inner_codec():
    if "turbo_mse" not in kvpack.list_codecs():
        pytest.skip("turbo_mse not registered yet")
    x = with_outlier_channels(shape=(2, 128, 64))
    codec = kvpack.get_codec("outlier_channels:3:inner=turbo_mse", head_dim=64)
    inner = kvpack.get_codec("turbo_mse:3", head_dim=64)
    assert codec.bits_per_value() > inner.bits_per_value()
    assert rel_err(codec.decode(codec.encode(x)), x) < rel_err(inner.decode(inner.encode(x)), x)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("outlier_channels:4:inner=nope", "unknown codec"),
        ("outlier_channels:4:inner=fp16", "takes no bits"),
        ("outlier_channels:4:inner=outlier_channels", "inner must be a codec name"),
        ("outlier_channels:4:channels=0", "channels must be"),
        ("outlier_channels:4:channels=65", "channels must be"),
        ("outlier_channels:4:block=0", "block must be"),
        ("outlier_sparse:4:count=0", "count must be"),
        ("outlier_sparse:4:threshold=-1", "threshold must be"),
        ("outlier_sparse:4:mode=both", "mode must be"),
    ],
)
def test_bad_options(spec, match):
    with pytest.raises(ValueError, match=match):
        kvpack.get_codec(spec, head_dim=64)


def test_channels_needs_a_token_dim():
    with pytest.raises(ValueError, match="at least 2 dims"):
        kvpack.get_codec("outlier_channels:4", head_dim=64).encode(torch.randn(64))
