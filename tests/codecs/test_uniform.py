"""The `int` codec: round-to-nearest bounds, the three axes, the exact byte format, error paths."""

import pytest
import torch

import kvpack
from kvpack.ops.packing import pack_bits
from kvpack.ops.rotation import rotate


def rel_error(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((y.float() - x.float()).norm() / x.float().norm()).item()


def nearest_bound(mn: torch.Tensor, mx: torch.Tensor, bits: int) -> torch.Tensor:
    """Largest error round-to-nearest may make on a group with range [mn, mx] (float32 stats).

    Inside the float16 grid ``zero16 + k * scale16`` the error is at most ``scale16 / 2``; values
    outside it (float16 rounding of zero and scale moved the grid ends) add that rounding.
    """
    levels = (1 << bits) - 1
    scale = (mx - mn) / levels
    scale16, zero16 = scale.half().float(), mn.half().float()
    slop = (mn - zero16).abs() + levels * (scale - scale16).abs()
    eps = 4 * torch.finfo(torch.float32).eps * torch.maximum(mn.abs(), mx.abs())
    return scale16 / 2 + slop + eps


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [0, 16])
def test_token_axis_rounds_to_nearest(bits, group):
    codec = kvpack.get_codec("int", head_dim=64, bits=bits, group=group)
    x = torch.randn(3, 50, 64) * 2 + 0.5
    y = codec.decode(codec.encode(x))
    g = group or 64
    xg = x.unflatten(-1, (64 // g, g))
    bound = nearest_bound(xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True), bits)
    err = (y - x).abs().unflatten(-1, (64 // g, g))
    assert (err <= bound).all()
    # truncation would miss this: the mean error of round-to-nearest is about scale/4, not scale/2
    assert err.mean() < 0.3 * ((xg.amax(-1) - xg.amin(-1)) / ((1 << bits) - 1)).mean()


@pytest.mark.parametrize("rotation", ["hadamard", "haar"])
def test_rotation_quantizes_the_rotated_vector(rotation):
    from kvpack.ops.rotation import rotate, unrotate

    codec = kvpack.get_codec(f"int:4:rotation={rotation}", head_dim=64, seed=5)
    plain = kvpack.get_codec("int:4", head_dim=64)
    x = torch.randn(7, 64, dtype=torch.float16)
    x[:, 3] *= 30  # an outlier channel: the rotation spreads it over every coordinate
    packed = codec.encode(x)
    rotated = rotate(x.float(), rotation, 5)
    assert torch.equal(packed.data["codes"], plain.encode(rotated).data["codes"])
    y = codec.decode(packed)
    assert y.dtype == torch.float16 and y.shape == x.shape
    torch.testing.assert_close(y.float(), unrotate(plain.decode(plain.encode(rotated)).float(), rotation, 5),
                               rtol=1e-3, atol=1e-3)  # fmt: skip
    assert rel_error(x, y) < 0.9 * rel_error(x, plain.decode(plain.encode(x)))
    assert codec.bits_per_value() == plain.bits_per_value() == 4.5  # 4 + 32 / 64: scale and zero


def test_int8_relative_error_below_one_percent():
    x = torch.randn(4, 128, 128)
    for spec in ("int:8", "int:8:axis=channel", "int:8:group=32"):
        codec = kvpack.get_codec(spec, head_dim=128)
        assert rel_error(x, codec.decode(codec.encode(x))) < 0.01, spec


def test_exact_byte_format_token_axis():
    # one group of 8 channels, 2 bits: min 0, max 3 -> scale 1; 0.5 and 2.5 round half to even
    x = torch.tensor([[0.0, 1.0, 0.5, 3.0, 2.5, 1.4, 1.6, 2.0]])
    packed = kvpack.get_codec("int:2", head_dim=8).encode(x)
    codes = torch.tensor([[0, 1, 0, 3, 2, 1, 2, 2]])
    assert torch.equal(packed.data["codes"], pack_bits(codes, 2))
    assert packed.data["codes"].tolist() == [[0 | 1 << 2 | 0 << 4 | 3 << 6, 2 | 1 << 2 | 2 << 4 | 2 << 6]]
    assert packed.data["scale"].tolist() == [[1.0]] and packed.data["zero"].tolist() == [[0.0]]
    assert packed.data["scale"].dtype == packed.data["zero"].dtype == torch.float16


def test_constant_groups_decode_exactly():
    x = torch.full((2, 5, 64), 0.1).half()
    for spec in ("int:2", "int:4:axis=channel,group=4", "int:3:axis=head"):
        codec = kvpack.get_codec(spec, head_dim=64)
        assert torch.equal(codec.decode(codec.encode(x)), x), spec


@pytest.mark.parametrize("tokens", [32, 45, 7])
def test_channel_axis_groups_tokens(tokens):
    codec = kvpack.get_codec("int:4:axis=channel,group=16", head_dim=64)
    x = torch.randn(2, tokens, 64)
    packed = codec.encode(x)
    n_groups = -(-tokens // 16)
    assert packed.data["scale"].shape == (2, n_groups, 64)
    # scale of group j, channel c = (max - min) / 15 over that group's tokens, partial group included
    pad = torch.nn.functional.pad(x, (0, 0, 0, n_groups * 16 - tokens), value=float("nan")).unflatten(1, (n_groups, 16))
    mn = pad.nan_to_num(float("inf")).amin(2)
    mx = pad.nan_to_num(float("-inf")).amax(2)
    assert torch.equal(packed.data["scale"], ((mx - mn) / 15).half())
    assert torch.equal(packed.data["zero"], mn.half())
    y = codec.decode(packed)
    bound = nearest_bound(mn, mx, 4).repeat_interleave(16, dim=1)[:, :tokens]
    assert ((y - x).abs() <= bound).all()


def test_channel_axis_handles_outlier_channel_that_token_axis_cannot():
    # KIVI's observation on keys: some channels carry a large offset shared by all tokens
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 256, 64, generator=g) * 0.5
    x[..., 5] += 20.0
    per_channel = kvpack.get_codec("int:2:axis=channel,group=32", head_dim=64)
    per_token = kvpack.get_codec("int:2", head_dim=64)
    err_channel = rel_error(x, per_channel.decode(per_channel.encode(x)))
    err_token = rel_error(x, per_token.decode(per_token.encode(x)))
    assert err_channel < 0.15
    assert err_token > 3 * err_channel
    # the offset channel itself: its spread (0.5 std) is tiny next to the token range (about 20)
    err5 = (per_channel.decode(per_channel.encode(x)) - x)[..., 5].abs().max()
    assert err5 < 0.5


def test_head_axis_one_scale_per_head():
    codec = kvpack.get_codec("int:3:axis=head", head_dim=64)
    x = torch.randn(2, 3, 20, 64)
    packed = codec.encode(x)
    assert packed.data["scale"].shape == (2, 3, 1, 1)
    flat = x.flatten(-2)
    assert torch.equal(packed.data["scale"][..., 0, 0], ((flat.amax(-1) - flat.amin(-1)) / 7).half())
    y = codec.decode(packed)
    bound = nearest_bound(flat.amin(-1), flat.amax(-1), 3)[..., None, None]
    assert ((y - x).abs() <= bound).all()


def test_bits_per_value():
    assert kvpack.get_codec("int:4", head_dim=128).bits_per_value() == 4.25
    assert kvpack.get_codec("int:4:group=32", head_dim=128).bits_per_value() == 5.0
    assert kvpack.get_codec("int:2:axis=channel,group=32", head_dim=128).bits_per_value() == 3.0
    assert kvpack.get_codec("int:2:axis=channel", head_dim=128).block_tokens == 32  # default group
    assert kvpack.get_codec("int:3:axis=head", head_dim=128).bits_per_value() == 3.0
    codec = kvpack.get_codec("int:3:axis=channel,group=16", head_dim=64)
    packed = codec.encode(torch.randn(5, 64, 64))
    assert 8 * packed.nbytes / (5 * 64 * 64) == codec.bits_per_value() == 5.0


def test_error_paths():
    with pytest.raises(ValueError, match="out of range"):
        kvpack.get_codec("int:5", head_dim=64)
    with pytest.raises(ValueError, match="out of range"):
        kvpack.get_codec("int:1", head_dim=64)
    with pytest.raises(ValueError, match="axis must be one of"):
        kvpack.get_codec("int:4:axis=row", head_dim=64)
    with pytest.raises(ValueError, match="must divide head_dim"):
        kvpack.get_codec("int:4:group=24", head_dim=64)
    with pytest.raises(ValueError, match="non-negative int"):
        kvpack.get_codec("int:4:group=-1", head_dim=64)
    with pytest.raises(ValueError, match="non-negative int"):
        kvpack.get_codec("int:4:group=1.5", head_dim=64)
    with pytest.raises(ValueError, match="group must be 0"):
        kvpack.get_codec("int:4:axis=head,group=8", head_dim=64)
    with pytest.raises(ValueError, match="at least 2 dims"):
        kvpack.get_codec("int:4:axis=channel", head_dim=64).encode(torch.randn(64))
    with pytest.raises(ValueError, match="at least 2 dims"):
        kvpack.get_codec("int:4:axis=head", head_dim=64).encode(torch.randn(64))
    with pytest.raises(ValueError, match="float16 range"):
        kvpack.get_codec("int:4", head_dim=64).encode(torch.full((2, 64), 1e6))
    with pytest.raises(ValueError, match="needs axis='token'"):
        kvpack.get_codec("int:4:axis=channel,rotation=hadamard", head_dim=64)
    with pytest.raises(ValueError, match="rotation must be one of"):
        kvpack.get_codec("int:4:rotation=random", head_dim=64)
    with pytest.raises(ValueError, match="power-of-two"):
        kvpack.get_codec("int:4:rotation=hadamard", head_dim=48)


def test_paged_tables_only_for_one_group_per_token():
    """The paged rows hold one scale/zero per token: int hands the kernels its rotation matrix (or None), else refuses."""
    assert kvpack.get_codec("int:4", head_dim=32).paged_tables() == {"rotation": None}
    m = kvpack.get_codec("int:4:rotation=hadamard", head_dim=32, seed=2).paged_tables()["rotation"]
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x @ m, rotate(x, "hadamard", 2), rtol=0, atol=1e-5)
    for spec in ("int:4:axis=channel", "int:4:axis=head", "int:4:group=16"):
        with pytest.raises(ValueError, match="axis=token and one group"):
            kvpack.get_codec(spec, head_dim=32).paged_tables()


@pytest.mark.parametrize("spec", ["int:4:axis=head", "int:4:axis=channel", "int:4"])
def test_no_tokens_round_trip(spec):
    """axis=head raised IndexError (amin over an empty dim) on an input of 0 tokens."""
    codec = kvpack.get_codec(spec, head_dim=16)
    x = torch.randn(2, 0, 16)
    y = codec.decode(codec.encode(x))
    assert y.shape == x.shape and y.dtype == x.dtype
