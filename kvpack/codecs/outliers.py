"""Outlier wrappers: a second, more precise stream for the few coordinates that dominate the error.

Both wrap an inner codec (composition: ``inner`` is a registered codec name, built with the
wrapper's ``bits`` and ``seed``) and store the inner codec's tensors under ``inner.<name>``; every
extra byte is in the layout, so ``bits_per_value()`` counts it exactly.

``outlier_channels`` (channel outliers of keys, KIVI / KVQuant, Hooper et al. arXiv 2401.18079):
per group of ``block`` tokens (dim -2) and per leading index (head), the ``channels`` channels
of largest magnitude in that block are chosen, kept as int8 codes with one fp16 scale per chosen
channel, and zeroed before the inner codec. Bits per value:
``inner + 8 c / d + c (index + 16) / (block d)``.

``outlier_sparse`` (dense-and-sparse, KVQuant sec. 3.5): up to ``count`` coordinates per vector
are stored exactly as (index, fp16 value) pairs, a fixed number of slots so that storage does not
depend on the data (an unused slot points at a discarded column). ``mode="value"``: the
coordinates with ``|x_i| / rms(x) > threshold`` (largest first) are removed before the inner codec;
``mode="residual"``: after inner coding, those whose scaled error ``|x_i - x_hat_i| / rms(x)``
exceeds ``threshold`` are overwritten. With fixed slots a threshold only leaves slots unused, so
the default ``threshold=0`` fills every slot. Bits per value: ``inner + count (index + 16) / d``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from kvpack.codec import Codec, Layout, Packed, get_codec, register_codec
from kvpack.codecs.compose import nest, unnest

__all__ = ["OutlierChannels", "OutlierSparse"]

INNER = "inner."
INT8_MAX = 127.0
MODES = ("value", "residual")


def _index_dtype(head_dim: int) -> torch.dtype:
    # one spare value: index head_dim marks an unused slot
    return torch.uint8 if head_dim < 256 else torch.int16


@dataclass(frozen=True)
class _Wrapper(Codec):
    """Shared plumbing: build the inner codec, prefix its layout, split a Packed back to it."""

    inner: str = "int"

    allowed_bits = (2, 3, 4, 8)  # those of the default inner codec; another inner checks its own
    default_bits = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.inner, str) or ":" in self.inner or self.inner == self.name:
            raise ValueError(
                f"inner must be a codec name without options (e.g. 'int', 'turbo_mse'), got {self.inner!r}"
            )
        if self.inner_codec.bits is None:
            raise ValueError(f"inner codec {self.inner!r} takes no bits; the wrapper needs a quantizing codec")

    @functools.cached_property
    def inner_codec(self) -> Codec:
        return get_codec(self.inner, head_dim=self.head_dim, bits=self.bits, seed=self.seed)

    def index_limits(self) -> dict[str, int]:
        return {INNER + k: v for k, v in self.inner_codec.index_limits().items()}

    def inner_layout(self, shape: tuple[int, ...]) -> Layout:
        return nest(INNER, self.inner_codec.layout(shape))

    def encode_inner(self, x: torch.Tensor, like: torch.Tensor) -> dict[str, torch.Tensor]:
        return nest(INNER, self.inner_codec.encode(x.to(like.dtype)).data)  # the inner codec sees the input's dtype

    def decode_inner(self, packed: Packed) -> torch.Tensor:
        """The inner codec's reconstruction, float32."""
        return self.inner_codec.decode(unnest(packed, INNER, self.inner_codec, dtype=torch.float32))


@register_codec
@dataclass(frozen=True)
class OutlierChannels(_Wrapper):
    """Top-``channels`` channels per ``block`` tokens at 8 bits; the rest through ``inner``."""

    channels: int = 4
    block: int = 128

    name = "outlier_channels"

    def __post_init__(self) -> None:
        super().__post_init__()
        for f, hi in (("channels", self.head_dim), ("block", None)):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1 or (hi is not None and v > hi):
                raise ValueError(f"{f} must be an int in 1..{hi or 'inf'}, got {v!r}")

    @property
    def block_tokens(self) -> int:  # side data (indices, scales) spans `block` tokens
        return math.lcm(self.block, self.inner_codec.block_tokens)

    def layout(self, shape: tuple[int, ...]) -> Layout:
        groups = shape[:-2] + (math.ceil(shape[-2] / self.block), self.channels)
        return {
            **self.inner_layout(shape),
            "codes": (shape[:-1] + (self.channels,), torch.int8),
            "index": (groups, _index_dtype(self.head_dim)),
            "scale": (groups, torch.float16),
        }

    def index_limits(self) -> dict[str, int]:
        return {**super().index_limits(), "index": self.head_dim}

    def _group_index(self, tokens: int, device: torch.device) -> torch.Tensor:
        return torch.arange(tokens, device=device) // self.block  # token -> its group

    def encode(self, x: torch.Tensor) -> Packed:
        self.check_input(x, min_dim=2)
        xf = x.float()
        tokens, n_groups = x.shape[-2], math.ceil(x.shape[-2] / self.block)
        group = self._group_index(tokens, x.device)
        # channel magnitude per group: amax over the group's tokens, (..., groups, d)
        padded = torch.nn.functional.pad(xf.abs(), (0, 0, 0, n_groups * self.block - tokens))  # zeros: amax unchanged
        mag = padded.unflatten(-2, (n_groups, self.block)).amax(dim=-2)
        index = mag.topk(self.channels, dim=-1).indices.sort(dim=-1).values  # (..., groups, c)
        per_token = index.index_select(-2, group)  # (..., tokens, c)
        values = xf.gather(-1, per_token)
        amax = mag.gather(-1, index)
        scale = (amax / INT8_MAX).clamp_min(2**-24).to(torch.float16)
        if not torch.isfinite(scale).all():
            raise ValueError("x exceeds the float16 range that outlier_channels' scales need")
        codes = (values / scale.float().index_select(-2, group)).round().clamp(-INT8_MAX, INT8_MAX)
        rest = xf.scatter(-1, per_token, 0.0)
        return self.make_packed(
            x,
            **self.encode_inner(rest, x),
            codes=codes.to(torch.int8),
            index=index.to(_index_dtype(self.head_dim)),
            scale=scale,
        )

    def _decode(self, packed: Packed) -> torch.Tensor:
        y = self.decode_inner(packed)
        group = self._group_index(packed.shape[-2], y.device)
        per_token = packed.data["index"].long().index_select(-2, group)
        values = packed.data["codes"].float() * packed.data["scale"].float().index_select(-2, group)
        return y.scatter(-1, per_token, values)


@register_codec
@dataclass(frozen=True)
class OutlierSparse(_Wrapper):
    """Up to ``count`` exact (index, fp16) coordinates per vector; the rest through ``inner``."""

    count: int = 1
    threshold: float = 0.0
    mode: str = "value"

    name = "outlier_sparse"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.count, bool) or not isinstance(self.count, int) or not 1 <= self.count <= self.head_dim:
            raise ValueError(f"count must be an int in 1..head_dim={self.head_dim}, got {self.count!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not self.threshold >= 0:
            raise ValueError(f"threshold must be a number >= 0, got {self.threshold!r}")
        object.__setattr__(self, "threshold", float(self.threshold))  # one spelling in the spec
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")

    @property
    def block_tokens(self) -> int:
        return self.inner_codec.block_tokens

    def layout(self, shape: tuple[int, ...]) -> Layout:
        slots = shape[:-1] + (self.count,)
        return {
            **self.inner_layout(shape),
            "index": (slots, _index_dtype(self.head_dim)),
            "values": (slots, torch.float16),
        }

    def index_limits(self) -> dict[str, int]:
        return {**super().index_limits(), "index": self.head_dim + 1}  # head_dim: an unused slot

    def _select(self, score: torch.Tensor) -> torch.Tensor:
        """Indices (..., count) of the largest scores above the threshold; unused slots -> head_dim."""
        top = score.topk(self.count, dim=-1)
        return torch.where(top.values > self.threshold, top.indices, self.head_dim)

    def encode(self, x: torch.Tensor) -> Packed:
        self.check_input(x)
        xf = x.float()
        rms = (xf.square().mean(-1, keepdim=True).sqrt()).clamp_min(1e-30)
        if self.mode == "value":
            index = self._select(xf.abs() / rms)
            padded = torch.nn.functional.pad(xf, (0, 1))
            inner = self.encode_inner(padded.scatter(-1, index, 0.0)[..., : self.head_dim], x)
        else:
            inner = self.encode_inner(xf, x)
            x_hat = self.decode_inner(Packed(self.spec, tuple(x.shape), x.dtype, inner))
            index = self._select((xf - x_hat).abs() / rms)
        values = torch.nn.functional.pad(xf, (0, 1)).gather(-1, index).to(torch.float16)
        if not torch.isfinite(values).all():
            raise ValueError("x exceeds the float16 range that outlier_sparse's values need")
        return self.make_packed(x, **inner, index=index.to(_index_dtype(self.head_dim)), values=values)

    def _decode(self, packed: Packed) -> torch.Tensor:
        y = torch.nn.functional.pad(self.decode_inner(packed), (0, 1))  # column head_dim: unused slots
        y = y.scatter(-1, packed.data["index"].long(), packed.data["values"].float())
        return y[..., : self.head_dim]
