"""``int``: uniform affine (min/max) integer quantization, as in KIVI (Liu et al., arXiv 2402.02750).

Each group of values is mapped to ``codes = round((x - zero) / scale)`` in ``[0, 2^b - 1]`` with
``zero = min`` and ``scale = (max - min) / (2^b - 1)`` and decoded as ``codes * scale + zero``;
round to nearest (half to even), never truncation. Which values share a group (``axis``):

- ``token`` (default): ``group`` consecutive channels of one vector (``group=0``: the whole
  vector, ``head_dim``). ``group`` must divide ``head_dim``. Bits per value ``b + 32 / group``.
- ``channel`` (KIVI's keys): one channel over ``group`` consecutive tokens (dim -2; ``group=0``:
  32 tokens); a last, partial group of tokens is allowed. Bits per value ``b + 32 / group`` for
  token counts that are multiples of ``group`` (``block_tokens``), a little more otherwise.
- ``head``: one scale/zero for a whole head, all tokens and channels of dims -2 and -1 (``group``
  must be 0). ``bits_per_value()`` reports the asymptotic ``b``: the true cost
  ``b + 32 / (tokens * head_dim)`` depends on the token count.

``rotation`` (axis token only; ``none`` by default): ``haar`` or ``hadamard`` rotates each vector by
the seeded rotation of `kvpack.ops.rotation` before quantizing and back after decoding (QuaRot, Ashkboos
et al., arXiv 2404.00456): the coordinates become near-Gaussian without outlier channels, so one
scale per vector suits them, and the paged kernels score such keys in the rotated domain as they
do ``turbo_mse``'s with plain integer arithmetic instead of a codebook lookup.

Stored tensors: ``codes`` = ``pack_bits`` of the per-token codes along the last dim, uint8
``(..., ceil(head_dim * b / 8))`` for every axis; ``scale`` and ``zero`` float16 of shape
``(..., head_dim / group)`` (token), ``(..., ceil(tokens / group), head_dim)`` (channel) or
``(..., 1, 1)`` (head).

Arithmetic (the Triton kernels reproduce it exactly): ``scale`` and ``zero`` are rounded to float16
first; codes are computed in float32 against the float16 values, so decode multiplies by exactly
what encode divided by. A zero float16 scale (constant group) is replaced by 1, so constant groups
decode to their float16 value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvpack.codec import Codec, Layout, Packed, register_codec
from kvpack.ops.packing import pack_bits, packed_nbytes, unpack_bits
from kvpack.ops.rotation import check_rotation, rotate, rotation_as_matrix, unrotate

__all__ = ["UniformInt", "affine_dequantize_ref", "affine_quantize_ref"]

AXES = ("token", "channel", "head")
DEFAULT_CHANNEL_GROUP = 32  # tokens per group for axis=channel, KIVI's group size


def affine_quantize_ref(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize each row of ``x`` (..., n) float to ``bits`` bits over its last dim.

    Returns ``codes`` uint8 (..., n) in ``[0, 2^bits)``, ``scale`` and ``zero`` float16 (..., 1).
    Groups whose min or scale overflows float16 (values beyond +-65504) raise ValueError.
    """
    xf = x.float()
    levels = (1 << bits) - 1
    mn = xf.amin(dim=-1, keepdim=True)
    mx = xf.amax(dim=-1, keepdim=True)
    zero16 = mn.to(torch.float16)
    scale16 = ((mx - mn) / levels).to(torch.float16)
    if not (torch.isfinite(zero16).all() and torch.isfinite(scale16).all()):
        raise ValueError("x exceeds the float16 range (|x| < 65504) that the int codec's scale/zero need")
    scale16 = torch.where(scale16 == 0, torch.ones_like(scale16), scale16)
    codes = torch.round((xf - zero16.float()) / scale16.float()).clamp_(0, levels)
    return codes.to(torch.uint8), scale16, zero16


def affine_dequantize_ref(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``codes * scale + zero`` in float32 (broadcasting ``scale``/``zero`` float16 over ``codes``)."""
    return codes.float() * scale.float() + zero.float()


@register_codec
@dataclass(frozen=True)
class UniformInt(Codec):
    """Uniform affine quantization; ``axis`` in {token, channel, head}, ``group`` as above."""

    axis: str = "token"
    group: int = 0
    rotation: str = "none"

    name = "int"
    allowed_bits = (2, 3, 4, 8)
    default_bits = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.axis, str) or self.axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {self.axis!r}")
        if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 0:
            raise ValueError(f"group must be a non-negative int (0 = default), got {self.group!r}")
        if self.axis == "token" and self.head_dim % self.group_size != 0:
            raise ValueError(f"group={self.group} must divide head_dim={self.head_dim} for axis='token'")
        if self.axis == "head" and self.group != 0:
            raise ValueError(f"axis='head' shares one scale over the whole head; group must be 0, got {self.group}")
        if self.rotation != "none":
            check_rotation(self.rotation, self.head_dim)
            if self.axis != "token":
                raise ValueError(f"rotation={self.rotation!r} mixes channels: it needs axis='token', got {self.axis!r}")

    @property
    def group_size(self) -> int:
        """Values per group along ``axis`` (channels for token, tokens for channel; 0 for head)."""
        if self.group:
            return self.group
        return {"token": self.head_dim, "channel": DEFAULT_CHANNEL_GROUP, "head": 0}[self.axis]

    @property
    def block_tokens(self) -> int:  # overrides the base ClassVar: side data spans `group` tokens
        return self.group_size if self.axis == "channel" else 1

    def bits_per_value(self) -> float:
        if self.axis == "head":  # asymptotic: the 32 bits of scale/zero vanish over many tokens
            return 8 * packed_nbytes(self.head_dim, self.bits) / self.head_dim
        return super().bits_per_value()

    def layout(self, shape: tuple[int, ...]) -> Layout:
        codes = (shape[:-1] + (packed_nbytes(self.head_dim, self.bits),), torch.uint8)
        if self.axis == "token":
            side = shape[:-1] + (self.head_dim // self.group_size,)
        elif self.axis == "channel":
            side = shape[:-2] + (math.ceil(shape[-2] / self.group_size), self.head_dim)
        else:
            side = shape[:-2] + (1, 1)
        return {"codes": codes, "scale": (side, torch.float16), "zero": (side, torch.float16)}

    def encode(self, x: torch.Tensor) -> Packed:
        self.check_input(x, min_dim=1 if self.axis == "token" else 2)
        if not x.numel():  # no values: no min/max to take (axis=head would reduce over nothing)
            layout = self.layout(tuple(x.shape))
            return self.make_packed(
                x, **{k: torch.zeros(s, dtype=dt, device=x.device) for k, (s, dt) in layout.items()}
            )
        d, g, source = self.head_dim, self.group_size, x
        if self.rotation != "none":
            x = rotate(x.float(), self.rotation, self.seed)
        if self.axis == "token":
            codes, scale, zero = affine_quantize_ref(x.reshape(*x.shape[:-1], d // g, g), self.bits)
            codes, scale, zero = codes.reshape(x.shape), scale.squeeze(-1), zero.squeeze(-1)
        elif self.axis == "channel":
            codes, scale, zero = self._encode_channel(x)
        else:
            codes, scale, zero = affine_quantize_ref(x.reshape(*x.shape[:-2], 1, -1), self.bits)
            codes = codes.reshape(x.shape)  # scale/zero: (..., 1, 1)
        return self.make_packed(
            source, codes=pack_bits(codes, self.bits), scale=scale.contiguous(), zero=zero.contiguous()
        )

    def _encode_channel(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Groups of ``g`` tokens per channel -> codes (..., tokens, d), scale/zero (..., groups, d)."""
        tokens, g = x.shape[-2], self.group_size
        n_groups = math.ceil(tokens / g)
        # pad a partial last group with copies of its own last token: its min/max stay the same
        last = x[..., -1:, :].expand(*x.shape[:-2], n_groups * g - tokens, self.head_dim)
        grouped = torch.cat((x, last), dim=-2).unflatten(-2, (n_groups, g)).transpose(-1, -2)
        codes, scale, zero = affine_quantize_ref(grouped, self.bits)  # rows: (group, channel)
        codes = codes.transpose(-1, -2).flatten(-3, -2)[..., :tokens, :]
        return codes, scale.squeeze(-1), zero.squeeze(-1)

    def paged_tables(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor | None]:
        """The tables of `kvpack.kernels.paged.PagedCodec`: the float32 ``rotation`` ``M`` (``None`` without one).

        The paged rows hold one scale and zero per token: axis token with one group per vector only."""
        if self.axis != "token" or self.group_size != self.head_dim:
            raise ValueError(f"the paged kernels take int with axis=token and one group per vector, got {self.spec!r}")
        rotation = None if self.rotation == "none" else rotation_as_matrix(self.rotation, self.head_dim, self.seed)
        return {"rotation": None if rotation is None else rotation.to(device)}

    def _decode(self, packed: Packed) -> torch.Tensor:
        shape, d = packed.shape, self.head_dim
        codes = unpack_bits(packed.data["codes"], self.bits, d)
        scale, zero = packed.data["scale"], packed.data["zero"]
        if self.axis == "token":
            g = self.group_size
            out = affine_dequantize_ref(codes.unflatten(-1, (d // g, g)), scale.unsqueeze(-1), zero.unsqueeze(-1))
        elif self.axis == "channel":
            tokens, g = shape[-2], self.group_size
            scale, zero = (t.repeat_interleave(g, dim=-2)[..., :tokens, :] for t in (scale, zero))
            out = affine_dequantize_ref(codes, scale, zero)
        else:
            out = affine_dequantize_ref(codes, scale, zero)
        out = out.reshape(shape)
        if self.rotation != "none":
            out = unrotate(out, self.rotation, self.seed)
        return out
