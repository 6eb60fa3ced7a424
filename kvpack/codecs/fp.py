"""Floating-point baselines.

``fp16``: passthrough, the values stored as float16 (exact for float16 input).
``fp8``: float8 e4m3 (OCP FP8, Micikevicius et al., arXiv 2209.05433) after dividing each vector
by one float16 scale ``amax / 448``, so every vector uses the format's full range.

Range: like every other codec, both refuse input they cannot store (``ValueError``) instead of
turning it into inf: ``fp16`` values that round beyond float16's largest finite value (|x| > 65504,
up to rounding), ``fp8`` vectors whose scale ``amax / 448`` exceeds float16 (amax above ~2.9e7).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpack.codec import Codec, Layout, Packed, register_codec

E4M3_MAX = 448.0


@register_codec
@dataclass(frozen=True)
class FP16(Codec):
    name = "fp16"

    def layout(self, shape: tuple[int, ...]) -> Layout:
        return {"values": (shape, torch.float16)}

    def encode(self, x: torch.Tensor) -> Packed:
        self.check_input(x)
        # copy: the stored values must not alias the caller's tensor
        values = x.to(torch.float16, copy=True).contiguous()
        if not torch.isfinite(values).all():
            raise ValueError("x exceeds the float16 range (|x| <= 65504) that the fp16 codec stores it in")
        return self.make_packed(x, values=values)

    def _decode(self, packed: Packed) -> torch.Tensor:
        return packed.data["values"].float()


@register_codec
@dataclass(frozen=True)
class FP8(Codec):
    name = "fp8"

    def layout(self, shape: tuple[int, ...]) -> Layout:
        return {"codes": (shape, torch.uint8), "scale": (shape[:-1] + (1,), torch.float16)}

    def encode(self, x: torch.Tensor) -> Packed:
        self.check_input(x)
        xf = x.float()
        # fp16 scale, rounded first so that decode multiplies by exactly what encode divided by
        scale = (xf.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp_min(2**-24).to(torch.float16)
        if not torch.isfinite(scale).all():
            raise ValueError("x is too large for the fp8 codec's float16 scale (|x| must stay below 448 * 65504)")
        codes = (xf / scale.float()).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        return self.make_packed(x, codes=codes.view(torch.uint8), scale=scale)

    def _decode(self, packed: Packed) -> torch.Tensor:
        codes = packed.data["codes"].view(torch.float8_e4m3fn).float()
        return codes * packed.data["scale"].float()
