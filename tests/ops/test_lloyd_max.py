"""Lloyd-Max codebooks of the sphere-coordinate density (and of the Gaussian), checked against theory."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from kvpack.evaluation.validate import random_unit_vectors
from kvpack.ops.lloyd_max import (
    gaussian_codebook,
    gaussian_mse,
    sphere_boundaries,
    sphere_codebook,
    sphere_density,
    sphere_mse,
)

# Max (1960), Table I: Lloyd-Max MSE of N(0, 1) and the positive centroids of the 16-level quantizer
MAX_GAUSSIAN_MSE = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}
MAX_16_LEVELS = [0.1284, 0.3881, 0.6568, 0.9423, 1.256, 1.618, 2.069, 2.733]


@pytest.mark.parametrize("head_dim", [2, 3, 7, 64, 128])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_codebook_sorted_symmetric_inside(head_dim, bits):
    c = sphere_codebook(head_dim, bits)
    assert c.dtype == torch.float64 and c.shape == (2**bits,)
    assert (c.diff() > 0).all()
    assert torch.allclose(c, -c.flip(0), rtol=0, atol=1e-15)
    assert (c.abs() < 1).all()
    edges = sphere_boundaries(head_dim, bits)
    assert edges.shape == (2**bits - 1,)
    assert ((c[:-1] < edges) & (edges < c[1:])).all()


def test_density_integrates_to_one():
    for d in (2, 5, 128):
        total, _ = integrate.quad(sphere_density, -1, 1, args=(d,))
        assert total == pytest.approx(1, abs=1e-8)


@pytest.mark.parametrize("head_dim", [5, 64, 128])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_centroid_condition_by_quadrature(head_dim, bits):
    # each centroid is the mean of the density over its cell, integrated independently with quad
    c = sphere_codebook(head_dim, bits).numpy()
    edges = np.concatenate(([-1.0], sphere_boundaries(head_dim, bits).numpy(), [1.0]))
    for i in range(len(c)):
        lo, hi = edges[i], edges[i + 1]
        mass, _ = integrate.quad(sphere_density, lo, hi, args=(head_dim,), epsabs=1e-14, epsrel=1e-12)
        moment, _ = integrate.quad(lambda t: t * sphere_density(t, head_dim), lo, hi, epsabs=1e-14, epsrel=1e-12)
        assert moment / mass == pytest.approx(c[i], abs=1e-9 / math.sqrt(head_dim))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_three_dims_gives_the_uniform_quantizer(bits):
    # Archimedes: a coordinate of a uniform point on the 2-sphere is uniform on [-1, 1]
    n = 2**bits
    expected = -1 + (2 * torch.arange(n, dtype=torch.float64) + 1) / n
    assert torch.allclose(sphere_codebook(3, bits), expected, atol=1e-10)
    assert 3 * sphere_mse(3, bits) == pytest.approx(1 / n**2, rel=1e-9)


@pytest.mark.parametrize("bits", [1, 3])
def test_expected_mse_matches_monte_carlo(bits):
    d, n = 64, 20000
    x = random_unit_vectors(n, d, seed=11).double()
    c, edges = sphere_codebook(d, bits), sphere_boundaries(d, bits)
    err = ((x - c[torch.bucketize(x, edges)]) ** 2).sum(-1)  # per vector: d coordinates
    stderr = err.std().item() / math.sqrt(n)
    assert abs(err.mean().item() - d * sphere_mse(d, bits)) < 4 * stderr


def test_gaussian_lloyd_max_matches_max_1960():
    for bits, value in MAX_GAUSSIAN_MSE.items():
        assert gaussian_mse(bits) == pytest.approx(value, rel=1e-3)  # Max's table: 4 significant digits
    assert np.allclose(gaussian_codebook(4)[8:].numpy(), MAX_16_LEVELS, atol=1e-3)
    assert gaussian_codebook(1)[1].item() == pytest.approx(math.sqrt(2 / math.pi), rel=1e-12)
    assert gaussian_mse(1) == pytest.approx(1 - 2 / math.pi, rel=1e-12)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_sphere_mse_times_d_converges_to_gaussian(bits):
    gaps = [abs(d * sphere_mse(d, bits) / gaussian_mse(bits) - 1) for d in (128, 1024, 16384)]
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 3e-4
    assert 16384 * sphere_mse(16384, bits) == pytest.approx(MAX_GAUSSIAN_MSE[bits], rel=1e-3)
    # on the sphere the tails are lighter: the MSE stays below the Gaussian's at every d
    assert 128 * sphere_mse(128, bits) < gaussian_mse(bits)


def test_cached_results_cannot_be_corrupted():
    c = sphere_codebook(64, 2)
    c[0] = 99.0
    assert sphere_codebook(64, 2)[0] < 0


def test_errors():
    for d in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match="head_dim must be an int >= 2"):
            sphere_codebook(d, 2)
    for bits in (0, 7, "3", True):
        with pytest.raises(ValueError, match="bits must be an int in 1..6"):
            sphere_codebook(64, bits)
        with pytest.raises(ValueError, match="bits must be an int"):
            gaussian_codebook(bits)
