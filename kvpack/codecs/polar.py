"""``polar``: PolarQuant (Han, Kacham, Karbasi, Mirrokni, Zandieh, arXiv 2502.02617).

Shapes: ``x`` (..., head_dim) float, ``head_dim = 2^n`` -> ``angles1`` uint8 (..., ceil(d/2 (b+1) / 8)),
``angles`` uint8 (..., ceil((d/2 - m)(b-1) / 8)) and ``radius`` float16 (..., m), where
``m = d / 2^levels`` radii per vector (``levels=0``, the default, means ``n``: one radius, the norm).

A seeded random rotation (``kvpack.ops.rotation``, Haar by default) makes every vector uniform on its
sphere. The recursive polar transform then pairs coordinates: level 1 turns ``(x_2i, x_2i+1)`` into
a radius and an angle in ``[0, 2 pi)``; level ``l >= 2`` pairs the radii of level ``l - 1`` into a
radius and an angle in ``[0, pi/2]``. After ``levels`` levels, ``m`` radii are left (stored as
float16) and ``d - m`` angles. For a rotated vector the angles are independent with known
densities (paper, Lemma 2): uniform at level 1, ``prop. to sin^(2^(l-1) - 1)(2 psi)`` at level ``l``.
Each level has its own codebook: uniform on the circle at level 1 (the optimal quantizer of a
uniform circular angle), Lloyd-Max on that level's density otherwise (computed once per level and
bit width on a fine grid and cached).

Bits: ``bits = b`` gives ``b + 1`` bits to each level-1 angle and ``b - 1`` to every other angle
(``b = 3``: the paper's 4 and 2). Why: an angle error ``e`` at level ``l`` moves the vector by about
``r e`` with ``r`` that angle's radius, and the squared radii of one level sum to ``|x|^2``, so level
``l`` adds about ``|x|^2 E[e_l^2]`` however many angles it has. Spending bits where they lower that
sum most per stored bit (reverse water-filling over ``d / 2^l`` angles of variance ``~1/2^(l+1)``,
against ``(2 pi)^2 / 12`` at level 1) puts about 2 bits more on level 1 than on the rest.
Bits per value: ``(d/2 (b+1) + (d/2 - m)(b-1) + 16 m) / d`` with each of the two angle tensors
padded to whole bytes; at ``levels=0`` and d=128: 2.125, 3.125, 4.125 for b = 2, 3, 4 (unpadded
``b + (17 - b) / d``). The paper's setting (radius per 16 coordinates) is ``polar:3:levels=4``:
3.875.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from kvpack.codec import Codec, Layout, Packed, register_codec
from kvpack.ops.packing import pack_bits, packed_nbytes, unpack_bits
from kvpack.ops.rotation import ROTATIONS, rotate, unrotate

__all__ = ["PolarQuant", "angle_codebook", "polar_inverse", "polar_transform"]

GRID_POINTS = 1 << 18  # Lloyd-Max integration grid over [0, pi/2]
LLOYD_ITERATIONS = 500


def polar_transform(x: torch.Tensor, levels: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Recursive polar transform of ``x`` (..., d) float32, ``d`` divisible by ``2^levels``.

    Returns the angles of each level (level ``l``: (..., d / 2^l); level 1 in ``[0, 2 pi)``, the
    others in ``[0, pi/2]``) and the radii left (..., d / 2^levels).
    """
    angles, r = [], x
    for level in range(1, levels + 1):
        even, odd = r[..., 0::2], r[..., 1::2]
        psi = torch.atan2(odd, even)
        angles.append(torch.remainder(psi, 2 * math.pi) if level == 1 else psi)
        r = torch.hypot(even, odd)
    return angles, r


def polar_inverse(angles: list[torch.Tensor], radii: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`polar_transform`: (..., d) from the per-level angles and the radii."""
    r = radii
    for psi in reversed(angles):
        r = torch.stack((r * torch.cos(psi), r * torch.sin(psi)), dim=-1).flatten(-2)
    return r


@functools.lru_cache(maxsize=64)
def angle_codebook(level: int, bits: int) -> torch.Tensor:
    """Reconstruction angles (2^bits,) float64, sorted, for the angles of ``level``.

    Level 1: the uniform grid ``(j + 1/2) 2 pi / 2^bits``. Level ``l >= 2``: Lloyd-Max for the
    density ``prop. to sin^(2^(l-1) - 1)(2 psi)`` on ``[0, pi/2]``, on a grid of ``GRID_POINTS``.
    """
    n = 1 << bits
    if level == 1:
        return (torch.arange(n, dtype=torch.float64) + 0.5) * (2 * math.pi / n)
    grid = (torch.arange(GRID_POINTS, dtype=torch.float64) + 0.5) * (math.pi / 2 / GRID_POINTS)
    log_w = (2 ** (level - 1) - 1) * torch.log(torch.sin(2 * grid))
    weight = torch.exp(log_w - log_w.max())
    zero = torch.zeros(1, dtype=torch.float64)
    cum_mass = torch.cat((zero, torch.cumsum(weight, 0)))  # cell masses and moments in O(n) per step
    cum_moment = torch.cat((zero, torch.cumsum(weight * grid, 0)))
    # start from the quantiles, then alternate nearest-neighbour cells and centroids
    centers = grid[torch.searchsorted(cum_mass[1:] / cum_mass[-1], (torch.arange(n, dtype=torch.float64) + 0.5) / n)]
    for _ in range(LLOYD_ITERATIONS):
        edges = torch.searchsorted(grid, (centers[1:] + centers[:-1]) / 2)
        edges = torch.cat((edges.new_zeros(1), edges, edges.new_full((1,), GRID_POINTS)))
        mass = cum_mass[edges[1:]] - cum_mass[edges[:-1]]
        moment = cum_moment[edges[1:]] - cum_moment[edges[:-1]]
        centers = torch.where(mass > 0, moment / mass.clamp_min(1e-300), centers)
    return centers


def _quantize_angles(psi: torch.Tensor, level: int, bits: int) -> torch.Tensor:
    """Index of the nearest codeword of each angle: int64, same shape as ``psi``."""
    n = 1 << bits
    if level == 1:  # uniform circular cells [j, j + 1) * 2 pi / n
        return torch.floor(psi * (n / (2 * math.pi))).long().clamp_(0, n - 1)
    centers = angle_codebook(level, bits).to(device=psi.device, dtype=psi.dtype)
    return torch.bucketize(psi, (centers[1:] + centers[:-1]) / 2)


@register_codec
@dataclass(frozen=True)
class PolarQuant(Codec):
    """PolarQuant: random rotation, recursive polar transform, per-level angle codebooks."""

    rotation: str = "haar"
    levels: int = 0

    name = "polar"
    allowed_bits = (2, 3, 4)
    default_bits = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        d = self.head_dim
        if d < 2 or d & (d - 1) != 0:
            raise ValueError(f"codec 'polar' needs a power-of-two head_dim >= 2, got {d}")
        if self.rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}, got {self.rotation!r}")
        max_levels = d.bit_length() - 1
        if isinstance(self.levels, bool) or not isinstance(self.levels, int) or not 0 <= self.levels <= max_levels:
            raise ValueError(
                f"levels must be an int in 0..{max_levels} (0 = {max_levels}) for head_dim={d}, got {self.levels!r}"
            )

    @property
    def depth(self) -> int:
        """Number of polar levels actually used."""
        return self.levels or self.head_dim.bit_length() - 1

    @property
    def level_bits(self) -> tuple[int, int]:
        """(bits of each level-1 angle, bits of each higher-level angle)."""
        return self.bits + 1, self.bits - 1

    def _higher_angles(self) -> int:
        return self.head_dim // 2 - self.head_dim // 2**self.depth

    def layout(self, shape: tuple[int, ...]) -> Layout:
        lead, (b1, bh) = shape[:-1], self.level_bits
        return {
            "angles1": (lead + (packed_nbytes(self.head_dim // 2, b1),), torch.uint8),
            "angles": (lead + (packed_nbytes(self._higher_angles(), bh),), torch.uint8),
            "radius": (lead + (self.head_dim // 2**self.depth,), torch.float16),
        }

    def encode(self, x: torch.Tensor) -> Packed:
        self.check_input(x)
        angles, radius = polar_transform(rotate(x.float(), self.rotation, self.seed), self.depth)
        radius16 = radius.to(torch.float16)
        if not torch.isfinite(radius16).all():
            raise ValueError("x is too large for the polar codec's float16 radius (norms must stay below 65504)")
        (b1, bh), lead = self.level_bits, x.shape[:-1]
        codes1 = _quantize_angles(angles[0], 1, b1)
        higher = [_quantize_angles(psi, level, bh) for level, psi in enumerate(angles[1:], start=2)]
        higher = torch.cat(higher, dim=-1) if higher else torch.zeros(*lead, 0, dtype=torch.long, device=x.device)
        return self.make_packed(x, angles1=pack_bits(codes1, b1), angles=pack_bits(higher, bh), radius=radius16)

    def _decode(self, packed: Packed) -> torch.Tensor:
        (b1, bh), d, device = self.level_bits, self.head_dim, packed.device
        codes1 = unpack_bits(packed.data["angles1"], b1, d // 2).long()
        angles = [angle_codebook(1, b1).to(device=device, dtype=torch.float32)[codes1]]
        higher = unpack_bits(packed.data["angles"], bh, self._higher_angles()).long()
        sizes = [d // 2**level for level in range(2, self.depth + 1)]
        for level, codes in enumerate(higher.split(sizes, dim=-1), start=2):
            angles.append(angle_codebook(level, bh).to(device=device, dtype=torch.float32)[codes])
        y = polar_inverse(angles, packed.data["radius"].float())
        return unrotate(y, self.rotation, self.seed).reshape(packed.shape)
