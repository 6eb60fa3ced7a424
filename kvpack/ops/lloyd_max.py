"""Lloyd-Max scalar quantizers of one coordinate of a uniform random unit vector (and of a Gaussian).

A coordinate ``t`` of a vector uniform on the unit sphere in R^d has the density
``f(t) = (1 - t^2)^((d-3)/2) / B(1/2, (d-1)/2)`` on ``[-1, 1]``, i.e. ``(t + 1) / 2 ~ Beta(a, a)``
with ``a = (d - 1) / 2``; for large d it tends to ``N(0, 1/d)``. TurboQuant (Zandieh et al., arXiv
2504.19874) quantizes each coordinate of a randomly rotated unit vector with the Lloyd-Max quantizer
of this density. Lloyd's algorithm alternates the two optimality conditions (cell edges at the
midpoints of neighbouring centroids; each centroid the conditional mean of its cell) until the
centroids move less than ``TOLERANCE``. Cell masses come from the Beta cdf (``scipy.special.betainc``)
and cell first moments from the exact antiderivative ``-(1 - t^2)^((d-1)/2) / ((d-1) B)``, so each
step is exact to float64 rounding (no grid). Results are cached in memory; nothing is written to disk.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from scipy import special

__all__ = [
    "gaussian_codebook",
    "gaussian_mse",
    "sphere_boundaries",
    "sphere_codebook",
    "sphere_density",
    "sphere_mse",
]

TOLERANCE = 1e-13  # stop when no centroid moves more than this (in units of the coordinate's std)
MAX_ITERATIONS = 200_000
MAX_BITS = 6  # Lloyd iterations slow down with 2^bits cells; codecs use 1..4


def _check(head_dim: int | None, bits: int) -> None:
    if head_dim is not None and (isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2):
        raise ValueError(
            f"head_dim must be an int >= 2 (a coordinate of a unit vector in R^1 is +-1), got {head_dim!r}"
        )
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in 1..{MAX_BITS}, got {bits!r}")


def sphere_density(t: np.ndarray, head_dim: int) -> np.ndarray:
    """Density of one coordinate of a uniform unit vector in R^head_dim, evaluated at ``t`` in (-1, 1)."""
    _check(head_dim, 1)
    t = np.asarray(t, dtype=np.float64)
    half = (head_dim - 1) / 2
    return np.exp((half - 1) * np.log1p(-(t**2)) - special.betaln(0.5, half))


def _lloyd(cdf, partial_moment, start: np.ndarray, lo: float, hi: float, scale: float) -> np.ndarray:
    """Lloyd iterations for a density on ``[lo, hi]`` given its cdf and ``F1(t) = int_lo^t s f(s) ds``."""
    centers = start
    for _ in range(MAX_ITERATIONS):
        edges = np.concatenate(([lo], (centers[1:] + centers[:-1]) / 2, [hi]))
        mass = np.diff(cdf(edges))
        moment = np.diff(partial_moment(edges))
        new = np.where(mass > 0, moment / np.maximum(mass, 1e-300), centers)
        new = (new - new[::-1]) / 2  # the density is symmetric: keep the codebook exactly symmetric
        if np.max(np.abs(new - centers)) <= TOLERANCE * scale:
            return new
        centers = new
    raise RuntimeError(f"Lloyd-Max did not converge in {MAX_ITERATIONS} iterations")


@functools.lru_cache(maxsize=128)
def _sphere_codebook_np(head_dim: int, bits: int) -> np.ndarray:
    a = (head_dim - 1) / 2
    norm = (head_dim - 1) * math.exp(special.betaln(0.5, a))

    def cdf(t: np.ndarray) -> np.ndarray:
        return special.betainc(a, a, (t + 1) / 2)

    def partial_moment(t: np.ndarray) -> np.ndarray:  # int_-1^t s f(s) ds, exact antiderivative
        with np.errstate(divide="ignore"):
            return -np.exp(a * np.log1p(-(t**2))) / norm

    n = 1 << bits
    start = 2 * special.betaincinv(a, a, (np.arange(n) + 0.5) / n) - 1  # quantiles: a valid start for any d
    return _lloyd(cdf, partial_moment, start, -1.0, 1.0, scale=head_dim**-0.5)


@functools.lru_cache(maxsize=16)
def _gaussian_codebook_np(bits: int) -> np.ndarray:
    n = 1 << bits

    def partial_moment(t: np.ndarray) -> np.ndarray:  # int_-inf^t s phi(s) ds = -phi(t)
        return -np.exp(-(t**2) / 2) / math.sqrt(2 * math.pi)

    start = special.ndtri((np.arange(n) + 0.5) / n)
    return _lloyd(special.ndtr, partial_moment, start, -np.inf, np.inf, scale=1.0)


def sphere_codebook(head_dim: int, bits: int) -> torch.Tensor:
    """Lloyd-Max centroids (2^bits,) float64, sorted and symmetric, of one coordinate of a uniform
    random unit vector in R^head_dim."""
    _check(head_dim, bits)
    return torch.from_numpy(_sphere_codebook_np(head_dim, bits).copy())


def sphere_boundaries(head_dim: int, bits: int) -> torch.Tensor:
    """Cell edges (2^bits - 1,) float64 of :func:`sphere_codebook`: midpoints of neighbouring centroids."""
    c = sphere_codebook(head_dim, bits)
    return (c[1:] + c[:-1]) / 2


def sphere_mse(head_dim: int, bits: int) -> float:
    """Expected squared error of one coordinate under :func:`sphere_codebook`.

    Times ``head_dim`` it is the expected MSE of TurboQuant-MSE on unit vectors; it tends to
    :func:`gaussian_mse` as ``head_dim`` grows. Uses ``E[t^2] = 1/d`` and, at a Lloyd-Max fixed point,
    ``E[(t - Q(t))^2] = E[t^2] - sum_i P_i c_i^2``.
    """
    _check(head_dim, bits)
    c = _sphere_codebook_np(head_dim, bits)
    a = (head_dim - 1) / 2
    edges = np.concatenate(([-1.0], (c[1:] + c[:-1]) / 2, [1.0]))
    mass = np.diff(special.betainc(a, a, (edges + 1) / 2))
    return float(1 / head_dim - np.sum(mass * c**2))


def gaussian_codebook(bits: int) -> torch.Tensor:
    """Lloyd-Max centroids (2^bits,) float64 of a standard normal source (Max 1960)."""
    _check(None, bits)
    return torch.from_numpy(_gaussian_codebook_np(bits).copy())


def gaussian_mse(bits: int) -> float:
    """Expected squared error of the Lloyd-Max quantizer of N(0, 1): 0.3634, 0.1175, 0.03454, 0.009497
    for 1..4 bits."""
    _check(None, bits)
    c = _gaussian_codebook_np(bits)
    edges = np.concatenate(([-np.inf], (c[1:] + c[:-1]) / 2, [np.inf]))
    return float(1 - np.sum(np.diff(special.ndtr(edges)) * c**2))
