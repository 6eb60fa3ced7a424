"""The `polar` codec (PolarQuant): the polar transform, per-level codebooks, accuracy, error paths."""

import math

import pytest
import torch

import kvpack
from kvpack.codecs.polar import angle_codebook, polar_inverse, polar_transform
from kvpack.evaluation.validate import random_unit_vectors


def unit_mse(spec: str, head_dim: int, n: int = 4000) -> float:
    codec = kvpack.get_codec(spec, head_dim=head_dim)
    x = random_unit_vectors(n, head_dim, seed=3)
    return ((codec.decode(codec.encode(x)) - x) ** 2).sum(-1).mean().item()


def test_polar_transform_round_trip_and_ranges():
    x = torch.randn(50, 64, dtype=torch.float64)
    angles, radii = polar_transform(x, levels=6)
    assert [a.shape[-1] for a in angles] == [32, 16, 8, 4, 2, 1] and radii.shape == (50, 1)
    torch.testing.assert_close(radii[:, 0], x.norm(dim=-1))
    assert ((angles[0] >= 0) & (angles[0] < 2 * math.pi)).all()
    assert all(((a >= 0) & (a <= math.pi / 2)).all() for a in angles[1:])
    torch.testing.assert_close(polar_inverse(angles, radii), x)
    partial, block_radii = polar_transform(x, levels=4)
    torch.testing.assert_close(block_radii, x.unflatten(-1, (4, 16)).norm(dim=-1))
    torch.testing.assert_close(polar_inverse(partial, block_radii), x)


@pytest.mark.parametrize("level", [2, 3, 4])
@pytest.mark.parametrize("bits", [1, 2, 3])
def test_lloyd_max_codebook_matches_angle_distribution(level, bits):
    # angles of Gaussian vectors at this level: each codeword must be the mean of its cell
    # (Lloyd's centroid condition), which holds only if the assumed density is the true one
    g = torch.Generator().manual_seed(level * 10 + bits)
    angles, _ = polar_transform(torch.randn(40000, 16, generator=g, dtype=torch.float64), levels=4)
    psi = angles[level - 1].flatten()
    centers = angle_codebook(level, bits)
    assert (centers.diff() > 0).all()
    torch.testing.assert_close(centers + centers.flip(0), torch.full_like(centers, math.pi / 2))  # symmetric
    cell = torch.bucketize(psi, (centers[1:] + centers[:-1]) / 2)
    means = torch.zeros_like(centers).index_add_(0, cell, psi) / torch.bincount(cell, minlength=len(centers))
    assert (means - centers).abs().max() < 0.01


def test_level_one_codebook_is_uniform_on_the_circle():
    assert torch.allclose(angle_codebook(1, 2), torch.tensor([1, 3, 5, 7], dtype=torch.float64) * math.pi / 4)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_error_decreases_with_bits(head_dim):
    mse = [unit_mse(f"polar:{b}", head_dim) for b in (2, 3, 4)]
    assert mse[0] > 3 * mse[1] > 9 * mse[2]
    # measured (d=64 and 128): 0.123/0.124, 0.0348/0.0351, 0.0093/0.0094
    assert mse[0] < 0.14 and mse[1] < 0.04 and mse[2] < 0.011


def test_paper_setting_and_hadamard_rotation():
    assert kvpack.get_codec("polar:3:levels=4", head_dim=128).bits_per_value() == 3.875
    assert unit_mse("polar:3:levels=4", 128, n=2000) < 0.036
    assert unit_mse("polar:3:rotation=hadamard", 64, n=2000) < 0.04


@pytest.mark.parametrize("bits,expected", [(2, 2.125), (3, 3.125), (4, 4.125)])
def test_bits_per_value_exact(bits, expected):
    codec = kvpack.get_codec(f"polar:{bits}", head_dim=128)
    assert codec.bits_per_value() == expected
    packed = codec.encode(torch.randn(7, 128))
    assert 8 * packed.nbytes / (7 * 128) == expected


def test_one_level_and_zero_vectors():
    codec = kvpack.get_codec("polar:4:levels=1", head_dim=8)
    x = torch.randn(3, 8)
    packed = codec.encode(x)
    assert packed.data["angles"].shape == (3, 0) and packed.data["radius"].shape == (3, 4)
    assert (codec.decode(packed) - x).norm() / x.norm() < 0.15  # 5-bit angles, fp16 radii
    zero = torch.zeros(2, 64)
    full = kvpack.get_codec("polar:3", head_dim=64)
    assert torch.equal(full.decode(full.encode(zero)), zero)


def test_error_paths():
    for d in (96, 48, 1):
        with pytest.raises(ValueError, match="power-of-two head_dim"):
            kvpack.get_codec("polar:3", head_dim=d)
    with pytest.raises(ValueError, match="rotation must be one of"):
        kvpack.get_codec("polar:3:rotation=dct", head_dim=64)
    for levels in (7, -1, 1.5):
        with pytest.raises(ValueError, match="levels must be an int in 0..6"):
            kvpack.get_codec("polar:3", head_dim=64, levels=levels)
    for bits in (1, 5):
        with pytest.raises(ValueError, match="out of range"):
            kvpack.get_codec("polar", head_dim=64, bits=bits)
    with pytest.raises(ValueError, match="too large"):
        kvpack.get_codec("polar:3", head_dim=64).encode(torch.full((1, 64), 1e4))
