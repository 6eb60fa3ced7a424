"""``qjl``: QJL, 1-bit quantized Johnson-Lindenstrauss (Zandieh, Daliri, Han, arXiv 2406.03482).

Store the signs of a seeded Gaussian sketch ``S x`` (``S``: sketch_dim x head_dim, i.i.d. N(0, 1)) and
``||x||``; decode ``||x|| sqrt(pi/2) / m * S^T sign(S x)`` is an unbiased estimate of ``x`` over the draw
of ``S`` (``E[sign(<s, x>) s] = sqrt(2/pi) x / ||x||``), so ``<q, decode(x)>`` is unbiased for ``<q, x>``.

Shapes: ``x`` (..., head_dim) float -> ``signs`` uint8 (..., ceil(m / 8)) = ``pack_bits(S x >= 0, 1)``
and ``norm`` float16 (..., 1), ``m = sketch_dim`` (default head_dim). Bits per value ``(m + 16) / d`` for
m a multiple of 8. ``S = sketch_matrix(m, head_dim, sketch_seed(seed))``: drawn on the CPU in float64
from ``torch.Generator`` (the same bits on every device), cached per device and dtype. ``sketch_seed``
moves the codec seed off the seed the rotations use, so that ``S`` is independent of them. Encode
computes ``S x`` in float32; a zero vector stores all-ones signs and norm 0 and decodes to 0.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from kvpack.codec import Codec, Layout, Packed, register_codec
from kvpack.ops.packing import pack_bits, packed_nbytes, unpack_bits

__all__ = ["QJL", "qjl_estimate", "qjl_signs", "sketch_matrix", "sketch_seed"]

FLOAT16_MAX = 65504.0
_SEED_MULTIPLIER = 0x9E3779B97F4A7C15  # odd 64-bit constant (golden ratio): a bijection on seeds mod 2^63
_SEED_OFFSET = 0x51E7C4


def sketch_seed(seed: int) -> int:
    """Generator seed of the QJL sketch for a codec ``seed`` (distinct from the rotation's ``seed``)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return (seed * _SEED_MULTIPLIER + _SEED_OFFSET) % (1 << 63)


@functools.lru_cache(maxsize=64)
def _sketch_cpu(sketch_dim: int, head_dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sketch_dim, head_dim, generator=g, dtype=torch.float64)


@functools.lru_cache(maxsize=64)
def _sketch_on_device(
    sketch_dim: int, head_dim: int, seed: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    return _sketch_cpu(sketch_dim, head_dim, seed).to(device=device, dtype=dtype)


def sketch_matrix(
    sketch_dim: int, head_dim: int, seed: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The seeded standard Gaussian sketch ``S`` (sketch_dim, head_dim), the same for a seed on every device."""
    for name, value in (("sketch_dim", sketch_dim), ("head_dim", head_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return _sketch_on_device(sketch_dim, head_dim, seed, torch.device(device), dtype)


def qjl_signs(x: torch.Tensor, sketch: torch.Tensor) -> torch.Tensor:
    """Packed sign bits uint8 (..., ceil(m / 8)) of ``S x`` (bit 1 where ``<s_i, x> >= 0``), float32 math."""
    return pack_bits((x.float() @ sketch.T >= 0).to(torch.uint8), 1)


def qjl_estimate(signs: torch.Tensor, norm: torch.Tensor, sketch: torch.Tensor) -> torch.Tensor:
    """``norm sqrt(pi/2) / m * S^T (2 signs - 1)`` float32 (..., head_dim) from packed ``signs``."""
    m = sketch.shape[0]
    pm1 = unpack_bits(signs, 1, m).float() * 2 - 1
    return (pm1 @ sketch) * (norm.float() * (math.sqrt(math.pi / 2) / m))


def float16_norm(norm: torch.Tensor, what: str) -> torch.Tensor:
    """A float32 norm (..., 1) as stored, float16; raise if it overflows float16."""
    if norm.numel() and float(norm.max()) > FLOAT16_MAX:
        raise ValueError(f"x is too large: the {what} is stored as float16 and must stay below {FLOAT16_MAX}")
    return norm.to(torch.float16)


@register_codec
@dataclass(frozen=True)
class QJL(Codec):
    """QJL: signs of a seeded Gaussian sketch plus the float16 norm; unbiased inner products."""

    sketch_dim: int | None = None

    name = "qjl"
    allowed_bits = (1,)
    default_bits = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        m = self.sketch_dim
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"sketch_dim must be a positive int (rows of the Gaussian sketch), got {m!r}")

    @property
    def sketch_rows(self) -> int:
        """``m``: sketch_dim, or head_dim when not given."""
        return self.sketch_dim or self.head_dim

    def sketch(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return sketch_matrix(self.sketch_rows, self.head_dim, sketch_seed(self.seed), device=device)

    def layout(self, shape: tuple[int, ...]) -> Layout:
        lead = shape[:-1]
        return {
            "signs": (lead + (packed_nbytes(self.sketch_rows, 1),), torch.uint8),
            "norm": (lead + (1,), torch.float16),
        }

    def encode(self, x: torch.Tensor) -> Packed:
        self.check_input(x)
        xf = x.float()
        norm = float16_norm(xf.norm(dim=-1, keepdim=True), "norm")
        return self.make_packed(x, signs=qjl_signs(xf, self.sketch(x.device)), norm=norm)

    def _decode(self, packed: Packed) -> torch.Tensor:
        y = qjl_estimate(packed.data["signs"], packed.data["norm"], self.sketch(packed.device))
        return y.reshape(packed.shape)
