"""Seeded orthogonal rotations of the last dimension, shared by the rotation-based codecs.

``haar``: a Haar-random orthogonal matrix (QR of a seeded Gaussian matrix, signs fixed), any dim.
``hadamard``: randomized Hadamard transform ``H diag(s) / sqrt(d)`` with seeded random signs
``s``; needs a power-of-two dim and no d x d matrix (fast Walsh-Hadamard butterflies).
Both are generated on the CPU in float64 from ``torch.Generator(seed)``, so the same seed gives
the same transform on every device and run. ``rotate`` computes ``x @ R.T``; ``unrotate`` inverts.
"""

from __future__ import annotations

import functools

import torch

__all__ = [
    "ROTATIONS",
    "check_rotation",
    "hadamard_takes",
    "hadamard_transform",
    "random_signs",
    "rotate",
    "rotation_as_matrix",
    "rotation_matrix",
    "unrotate",
]

ROTATIONS = ("haar", "hadamard")


def hadamard_takes(dim: int) -> bool:
    """Whether the Hadamard rotation works at ``dim`` (a power of two); Haar takes any dim."""
    return dim > 0 and dim & (dim - 1) == 0


def check_rotation(kind: str, dim: int) -> None:
    if kind not in ROTATIONS:
        raise ValueError(f"rotation must be one of {ROTATIONS}, got {kind!r}")
    if kind == "hadamard" and not hadamard_takes(dim):
        raise ValueError(f"rotation='hadamard' needs a power-of-two head_dim, got {dim}")


@functools.lru_cache(maxsize=64)
def _haar_cpu(dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # sign fix makes Q Haar-distributed


@functools.lru_cache(maxsize=64)
def _signs_cpu(dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (dim,), generator=g, dtype=torch.int64).to(torch.float64) * 2 - 1


@functools.lru_cache(maxsize=64)
def _on_device(kind: str, dim: int, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    base = _haar_cpu(dim, seed) if kind == "haar" else _signs_cpu(dim, seed)
    return base.to(device=device, dtype=dtype)


def rotation_matrix(dim: int, seed: int, device: torch.device | str = "cpu", dtype=torch.float32) -> torch.Tensor:
    """The seeded Haar orthogonal matrix ``R`` (dim x dim)."""
    return _on_device("haar", dim, seed, torch.device(device), dtype)


def random_signs(dim: int, seed: int, device: torch.device | str = "cpu", dtype=torch.float32) -> torch.Tensor:
    """The seeded +-1 vector of the randomized Hadamard transform."""
    return _on_device("hadamard", dim, seed, torch.device(device), dtype)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform of the last dim (a power of two): ``x @ H / sqrt(d)``.

    log2(d) vectorized butterfly stages; ``H`` is symmetric, so the transform is its own inverse.
    """
    d = x.shape[-1]
    lead = x.shape[:-1]
    y = x.reshape(-1, d)
    h = 1
    while h < d:
        y = y.reshape(-1, d // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(*lead, d) * d**-0.5).to(x.dtype)


def rotate(x: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    """Apply the seeded rotation to the last dim of a float tensor (computed in x's dtype)."""
    d = x.shape[-1]
    check_rotation(kind, d)
    if kind == "haar":
        return x @ rotation_matrix(d, seed, x.device, x.dtype).T
    return hadamard_transform(x * random_signs(d, seed, x.device, x.dtype))


def unrotate(y: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    """Inverse of :func:`rotate`."""
    d = y.shape[-1]
    check_rotation(kind, d)
    if kind == "haar":
        return y @ rotation_matrix(d, seed, y.device, y.dtype)
    return hadamard_transform(y) * random_signs(d, seed, y.device, y.dtype)


def rotation_as_matrix(kind: str, dim: int, seed: int) -> torch.Tensor:
    """float32 ``M`` (dim x dim) with ``rotate(x, kind, seed) == x @ M`` (up to rounding): the rotation of
    the identity, computed in float64 on the CPU, as the paged kernels read it (``unrotate(y) = y @ M.T``)."""
    return rotate(torch.eye(dim, dtype=torch.float64), kind, seed).float()
