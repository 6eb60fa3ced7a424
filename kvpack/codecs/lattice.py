"""``e8``: vector quantization on the E8 lattice with a Voronoi (nested-lattice) codebook.

Shapes: ``x`` (..., head_dim) float -> ``codes`` uint8 (..., head_dim * bits / 8) and ``scale``
float16 (..., 1); ``head_dim`` must be a power of two and a multiple of 8. Bits per value
``bits + 16 / head_dim`` exactly (3.125 and 2.125 at head_dim 128 for bits 3 and 2).

Each vector is rotated by the seeded randomized Hadamard transform (``kvpack.ops.rotation``; it spreads
outliers so every 8-dim block looks alike), divided by one float16 scale ``s`` and cut into 8-dim
blocks. Each block ``y`` is quantized to a point of E8 = D8 u (D8 + 1/2), found with Conway &
Sloane's nearest-point algorithm ("Fast quantizing and decoding algorithms for lattice quantizers
and codes", IEEE Trans. IT 28(2), 1982; SPLAG ch. 20). The codebook is the Voronoi code E8 / qE8
with ``q = 2^bits`` (Conway & Sloane, "A fast encoding method for lattice codes and quantizers",
IEEE Trans. IT 29(6), 1983; used for LLM weights/KV by QuIP# arXiv 2402.04396 and NestQuant
arXiv 2502.09720): the ``q^8`` lattice points of the scaled Voronoi cell ``q V(E8)``, each stored as
its 8 coordinates in a basis of E8 taken modulo ``q`` (``bits`` bits each). Decoding maps the
coordinates back to ``p = z G`` and subtracts ``q * nearest_e8(p / q)``: a lookup-free lattice
operation followed by one scalar multiply by ``s`` and the inverse rotation.

Points outside ``q V(E8)`` would wrap around (overload), so the encoder (slower than the decoder,
all vectorized) tries ``len(SCALE_FRACTIONS)`` scales per vector at once, relative to its largest block norm,
and for each block a few shrunk copies ``t * y`` (``SHRINKS``) of which it keeps the codeword the
decoder really returns with the least error; the best scale per vector wins.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from kvpack.codec import Codec, Layout, Packed, register_codec
from kvpack.ops.packing import pack_bits, unpack_bits
from kvpack.ops.rotation import rotate, unrotate

__all__ = ["E8Lattice", "e8_basis", "nearest_d8", "nearest_e8", "voronoi_decode", "voronoi_encode"]

# candidate scales: s = (largest 8-dim block norm) / (q * fraction); measured best fractions on
# unit vectors lie in 0.7..1.1 (larger fractions trade rare overload for finer granular error)
SCALE_FRACTIONS = (0.65, 0.72, 0.8, 0.88, 0.96, 1.05, 1.15)
# shrunk copies t * y an overloaded block tries (its own nearest point is no codeword)
SHRINKS = (0.9, 0.8, 0.7, 0.6)


def nearest_d8(y: torch.Tensor) -> torch.Tensor:
    """Nearest point of D8 (integer vectors with even sum) to each row of ``y`` (..., 8) float.

    Conway-Sloane: round every coordinate; if the sum is odd, round the coordinate that was
    farthest from an integer the other way.
    """
    f = torch.round(y)
    r = y - f
    worst = r.abs().argmax(dim=-1, keepdim=True)
    step = torch.where(r.gather(-1, worst) >= 0, 1.0, -1.0).to(y.dtype)
    odd = torch.remainder(f.sum(dim=-1, keepdim=True), 2) != 0
    return f + torch.zeros_like(f).scatter_(-1, worst, step) * odd


def nearest_e8(y: torch.Tensor) -> torch.Tensor:
    """Nearest point of E8 = D8 u (D8 + 1/2) to each row of ``y`` (..., 8) float (ties: D8)."""
    a = nearest_d8(y)
    b = nearest_d8(y - 0.5) + 0.5
    closer_b = ((y - b) ** 2).sum(-1, keepdim=True) < ((y - a) ** 2).sum(-1, keepdim=True)
    return torch.where(closer_b, b, a)


@functools.lru_cache(maxsize=8)
def e8_basis(device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Generator matrix ``G`` of E8 (rows are basis vectors, det 1; Conway & Sloane, SPLAG ch. 4)
    and its inverse, float64 (8, 8): a lattice point is ``z @ G`` for integer ``z``."""
    g = torch.zeros(8, 8, dtype=torch.float64)
    g[0, 0] = 2.0
    idx = torch.arange(1, 7)
    g[idx, idx - 1] = -1.0
    g[idx, idx] = 1.0
    g[7] = 0.5
    return g.to(device), torch.linalg.inv(g).to(device)


def voronoi_encode(points: torch.Tensor, q: int) -> torch.Tensor:
    """Coordinates modulo ``q`` of E8 points (..., 8) float: int64 (..., 8) in ``[0, q)``."""
    _, g_inv = e8_basis(points.device)
    z = torch.round(points.double() @ g_inv).long()
    return torch.remainder(z, q)


def voronoi_decode(codes: torch.Tensor, q: int) -> torch.Tensor:
    """The codeword of E8 / qE8 for coordinates (..., 8) in ``[0, q)``: float32 (..., 8)."""
    g, _ = e8_basis(codes.device)
    p = (codes.double() @ g).float()  # exact: half-integers below 2^24
    return p - q * nearest_e8(p / q)


def quantize_blocks(y: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best Voronoi codeword for each block of ``y`` (..., 8): (codes int64, squared error (..., 1)).

    The nearest E8 point is the answer unless it lies outside ``q V(E8)`` (the decoder would wrap
    it around); only those overloaded blocks try the shrunk copies ``t * y``.
    """
    nearest = nearest_e8(y)
    codes = voronoi_encode(nearest, q)
    decoded = voronoi_decode(codes, q)
    err = ((decoded - y) ** 2).sum(-1, keepdim=True)
    overloaded = (decoded != nearest).any(dim=-1)
    if overloaded.any():
        y_over = y[overloaded]  # (k, 8)
        shrinks = torch.tensor(SHRINKS, dtype=y.dtype, device=y.device).view(-1, 1, 1)
        c = voronoi_encode(nearest_e8(y_over * shrinks), q)  # (shrinks, k, 8)
        e = ((voronoi_decode(c, q) - y_over) ** 2).sum(-1, keepdim=True)
        c, e = torch.cat((codes[overloaded][None], c)), torch.cat((err[overloaded][None], e))
        pick = e.argmin(dim=0, keepdim=True)  # first minimum: the unshrunk point wins ties
        codes, err = codes.clone(), err.clone()
        codes[overloaded] = c.gather(0, pick.expand(1, -1, 8))[0]
        err[overloaded] = e.gather(0, pick)[0]
    return codes, err


@register_codec
@dataclass(frozen=True)
class E8Lattice(Codec):
    """E8 Voronoi-code vector quantizer after a Hadamard rotation; one float16 scale per vector."""

    rotation: str = "hadamard"

    name = "e8"
    allowed_bits = (2, 3, 4)
    default_bits = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rotation != "hadamard":
            raise ValueError(f"rotation must be 'hadamard' for codec 'e8', got {self.rotation!r}")
        d = self.head_dim
        if d % 8 != 0 or d & (d - 1) != 0:
            raise ValueError(f"codec 'e8' needs a head_dim that is a power of two and a multiple of 8, got {d}")

    def layout(self, shape: tuple[int, ...]) -> Layout:
        lead = shape[:-1]
        return {"codes": (lead + (self.head_dim * self.bits // 8,), torch.uint8), "scale": (lead + (1,), torch.float16)}

    def encode(self, x: torch.Tensor) -> Packed:
        self.check_input(x)
        q = 1 << self.bits
        blocks = rotate(x.float(), self.rotation, self.seed).unflatten(-1, (-1, 8))  # (..., d/8, 8)
        largest = blocks.norm(dim=-1).amax(dim=-1, keepdim=True)  # (..., 1)
        fractions = torch.tensor(SCALE_FRACTIONS, device=x.device)
        scales = (largest / (q * fractions)).to(torch.float16)  # (..., F): every candidate at once
        if not torch.isfinite(scales).all():
            raise ValueError("x is too large for the e8 codec's float16 scale (|x| must stay below ~1e5)")
        scales = torch.where(scales == 0, torch.ones_like(scales), scales)  # zero vectors: any scale
        s = scales.float()[..., None, None]  # (..., F, 1, 1)
        codes, err = quantize_blocks(blocks.unsqueeze(-3) / s, q)  # (..., F, d/8, 8), (..., F, d/8, 1)
        err = err.sum(dim=(-2, -1)) * s[..., 0, 0] ** 2  # (..., F)
        best = err.argmin(dim=-1, keepdim=True)  # (..., 1)
        codes = codes.gather(-3, best[..., None, None].expand(*codes.shape[:-3], 1, *codes.shape[-2:]))
        scale = scales.gather(-1, best)
        return self.make_packed(x, codes=pack_bits(codes.squeeze(-3).flatten(-2), self.bits), scale=scale)

    def _decode(self, packed: Packed) -> torch.Tensor:
        q = 1 << self.bits
        codes = unpack_bits(packed.data["codes"], self.bits, self.head_dim).unflatten(-1, (-1, 8))
        y = voronoi_decode(codes, q).flatten(-2) * packed.data["scale"].float()
        return unrotate(y, self.rotation, self.seed).reshape(packed.shape)
