"""`CachePolicy`: which codec compresses K and V, and which tokens and layers stay in full precision.

The shape follows KIVI (Liu et al., arXiv 2402.02750): the newest ``residual`` tokens stay in
full precision and are packed in blocks of ``block`` tokens as they age; StreamingLLM (Xiao et al.,
arXiv 2309.17453) motivates keeping the first ``sinks`` tokens (attention sinks) in full precision;
layers in ``skip_layers`` are not compressed at all. "Full precision" means 16-bit floats, as
deployed: the model dtype when it is float16/bfloat16, float16 for a float32 model (``window_dtype``
overrides), so the bits a float32 CPU evaluation reports are those a 16-bit deployment holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kvpack.codec import Codec, Packed, get_codec

__all__ = ["DEFAULT_BLOCK", "CachePolicy", "IdentityCodec"]

DEFAULT_BLOCK = 32  # tokens packed at once as the residual window ages (KIVI's group size)


@dataclass(frozen=True)
class CachePolicy:
    """Codec specs for K and V (``None``: keep that stream in the model dtype) and the full-precision parts.

    ``block``: tokens packed at once; ``None`` picks 32 rounded up to a multiple of both codecs'
    ``block_tokens``. ``seed``: passed to every codec (same seed, same bits). ``window_dtype``: dtype
    of the sinks, the residual window and uncompressed streams/layers (``None``: see `held_dtype`).
    """

    key: str | None = "fp16"
    value: str | None = "fp16"
    residual: int = 128
    sinks: int = 4
    skip_layers: tuple[int, ...] = field(default=())
    block: int | None = None
    seed: int = 0
    window_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        for name in ("key", "value"):
            spec = getattr(self, name)
            if spec is not None and (not isinstance(spec, str) or not spec):
                raise TypeError(f"{name} must be a codec spec string (e.g. 'int:4') or None, got {spec!r}")
        for name in ("residual", "sinks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.block is not None and (
            isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1
        ):
            raise ValueError(f"block must be a positive int or None, got {self.block!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        try:
            skip = tuple(self.skip_layers)
        except TypeError:
            raise TypeError(f"skip_layers must be a sequence of layer indices, got {self.skip_layers!r}") from None
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in skip):
            raise ValueError(f"skip_layers must hold layer indices >= 0, got {self.skip_layers!r}")
        object.__setattr__(self, "skip_layers", tuple(sorted(set(skip))))
        if self.window_dtype is not None and (
            not isinstance(self.window_dtype, torch.dtype) or not self.window_dtype.is_floating_point
        ):
            raise TypeError(f"window_dtype must be a floating torch.dtype or None, got {self.window_dtype!r}")
        # build once with a nominal head_dim so that a bad spec fails here, not mid-forward
        self.codecs(head_dim=64)

    def codecs(
        self, head_dim: int, layer_idx: int | None = None
    ) -> tuple[Codec | IdentityCodec, Codec | IdentityCodec]:
        """The (key, value) codecs for one layer; identity for ``None`` specs and skipped layers."""
        if layer_idx is not None and layer_idx in self.skip_layers:
            return IdentityCodec(head_dim), IdentityCodec(head_dim)
        return tuple(  # type: ignore[return-value]
            IdentityCodec(head_dim) if spec is None else get_codec(spec, head_dim=head_dim, seed=self.seed)
            for spec in (self.key, self.value)
        )

    def held_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """Dtype of the full-precision tokens: ``window_dtype``, else the model's 16-bit dtype, else float16.

        A policy that compresses nothing (both specs ``None``) is the reference: it keeps the model dtype.
        """
        if self.window_dtype is not None:
            return self.window_dtype
        if self.key is None and self.value is None:
            return model_dtype
        return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.float16

    def block_for(self, key_codec: Codec | IdentityCodec, value_codec: Codec | IdentityCodec) -> int:
        """Tokens per packed block: ``block`` if given (must be a multiple of both codecs' block_tokens)."""
        unit = math.lcm(int(key_codec.block_tokens), int(value_codec.block_tokens))
        if self.block is None:
            return unit * math.ceil(DEFAULT_BLOCK / unit)
        if self.block % unit:
            raise ValueError(f"block={self.block} must be a multiple of the codecs' block_tokens ({unit})")
        return self.block


class IdentityCodec:
    """Keeps a stream as given (model dtype): the stand-in codec for uncompressed streams and layers.

    Duck-types the `kvpack.Codec` interface that the cache uses (``encode``/``decode``/
    ``bits_per_value``/``block_tokens``/``spec``); not registered, it is no compression method.
    """

    spec = "none"
    block_tokens = 1

    def __init__(self, head_dim: int) -> None:
        self.head_dim = head_dim

    def encode(self, x):
        return Packed(codec=self.spec, shape=tuple(x.shape), dtype=x.dtype, data={"values": x.clone()})

    def decode(self, packed):
        return packed.data["values"]

    def bits_per_value(self) -> float:
        return float("nan")  # the model dtype's width; known only from the stored tensor
