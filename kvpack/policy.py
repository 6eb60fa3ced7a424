"""`CachePolicy`: which codec compresses K and V, and which tokens and layers stay in full precision.

The shape follows KIVI (Liu et al., arXiv 2402.02750): the newest ``residual`` tokens stay in
full precision and are packed in blocks of ``block`` tokens as they age; StreamingLLM (Xiao et al.,
arXiv 2309.17453) motivates keeping the first ``sinks`` tokens (attention sinks) in full precision;
layers in ``skip_layers`` are not compressed at all; ``layer_keys``/``layer_values`` give a codec per
layer (`kvpack allocate` writes them); ``fp_heads`` keeps chosen (layer, KV head) pairs of both K and V
in 16-bit (outlier heads, chosen by `kvpack.allocate.choose_outlier_heads`). "Full precision" means 16-bit floats, as
deployed: the model dtype when it is float16/bfloat16, float16 for a float32 model (``window_dtype``
overrides), so the bits a float32 CPU evaluation reports are those a 16-bit deployment holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kvpack.codec import Codec, Packed, get_codec

__all__ = ["DEFAULT_BLOCK", "CachePolicy", "HeadSplitCodec", "IdentityCodec"]

DEFAULT_BLOCK = 32  # tokens packed at once as the residual window ages (KIVI's group size)


@dataclass(frozen=True)
class CachePolicy:
    """Codec specs for K and V (``None``: keep that stream in the model dtype) and the full-precision parts.

    ``block``: tokens packed at once; ``None`` picks 32 rounded up to a multiple of both codecs'
    ``block_tokens``. ``seed``: passed to every codec (same seed, same bits). ``window_dtype``: dtype
    of the sinks, the residual window and uncompressed streams/layers (``None``: see `held_dtype`).
    ``layer_keys``/``layer_values``: per-layer specs (``None``: that layer's stream uncompressed) for
    layers ``< len``; later layers use ``key``/``value``. ``fp_heads``: ``(layer, kv_head)`` pairs (or a
    dict ``{layer: heads}``) whose K and V stay 16-bit in packed blocks too (`HeadSplitCodec`).
    ``pre_rope_keys``: pack keys with RoPE undone (KVQuant; `kvpack.rope`), re-applied after decoding.
    """

    key: str | None = "fp16"
    value: str | None = "fp16"
    residual: int = 128
    sinks: int = 4
    skip_layers: tuple[int, ...] = field(default=())
    block: int | None = None
    seed: int = 0
    window_dtype: torch.dtype | None = None
    layer_keys: tuple[str | None, ...] = field(default=())
    layer_values: tuple[str | None, ...] = field(default=())
    fp_heads: tuple[tuple[int, int], ...] = field(default=())
    pre_rope_keys: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.pre_rope_keys, bool):
            raise TypeError(f"pre_rope_keys must be a bool, got {self.pre_rope_keys!r}")
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
        for name in ("layer_keys", "layer_values"):
            try:
                specs = tuple(getattr(self, name))
            except TypeError:
                raise TypeError(
                    f"{name} must be a sequence of codec specs or None, got {getattr(self, name)!r}"
                ) from None
            if any(s is not None and (not isinstance(s, str) or not s) for s in specs):
                raise TypeError(f"{name} must hold codec spec strings or None, got {specs!r}")
            object.__setattr__(self, name, specs)
        object.__setattr__(self, "fp_heads", _normalize_fp_heads(self.fp_heads))
        # build once with a nominal head_dim so that a bad spec fails here, not mid-forward
        self.codecs(head_dim=64)
        for i in range(max(len(self.layer_keys), len(self.layer_values))):
            self.codecs(head_dim=64, layer_idx=i)

    def specs(self, layer_idx: int) -> tuple[str | None, str | None]:
        """The (key, value) specs of one layer before skip_layers/fp_heads apply."""
        key = self.layer_keys[layer_idx] if layer_idx < len(self.layer_keys) else self.key
        value = self.layer_values[layer_idx] if layer_idx < len(self.layer_values) else self.value
        return key, value

    def heads_in_fp(self, layer_idx: int) -> tuple[int, ...]:
        """KV heads of ``layer_idx`` kept in 16-bit."""
        return tuple(h for layer, h in self.fp_heads if layer == layer_idx)

    def codecs(
        self, head_dim: int, layer_idx: int | None = None
    ) -> tuple[Codec | IdentityCodec, Codec | IdentityCodec]:
        """The (key, value) codecs for one layer; identity for ``None`` specs and skipped layers."""
        if layer_idx is not None and layer_idx in self.skip_layers:
            return IdentityCodec(head_dim), IdentityCodec(head_dim)
        specs = (self.key, self.value) if layer_idx is None else self.specs(layer_idx)
        codecs = [
            IdentityCodec(head_dim) if s is None else get_codec(s, head_dim=head_dim, seed=self.seed) for s in specs
        ]
        heads = () if layer_idx is None else self.heads_in_fp(layer_idx)
        if heads:
            codecs = [c if isinstance(c, IdentityCodec) else HeadSplitCodec(c, heads) for c in codecs]
        return tuple(codecs)  # type: ignore[return-value]

    def compresses_anything(self) -> bool:
        """Whether any layer's K or V goes through a codec."""
        return any(s is not None for s in (self.key, self.value, *self.layer_keys, *self.layer_values))

    def held_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """Dtype of the full-precision tokens: ``window_dtype``, else the model's 16-bit dtype, else float16.

        A policy that compresses nothing (both specs ``None``) is the reference: it keeps the model dtype.
        """
        if self.window_dtype is not None:
            return self.window_dtype
        if not self.compresses_anything():
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


def _normalize_fp_heads(fp_heads) -> tuple[tuple[int, int], ...]:
    """``{layer: heads}`` or ``[(layer, head), ...]`` (JSON lists too) -> sorted unique ``((layer, head), ...)``."""
    try:
        pairs = [(layer, h) for layer, heads in fp_heads.items() for h in heads] if isinstance(fp_heads, dict) else [
            tuple(p) for p in fp_heads
        ]  # fmt: skip
    except TypeError:
        raise TypeError(f"fp_heads must be {{layer: (heads...)}} or (layer, head) pairs, got {fp_heads!r}") from None
    for p in pairs:
        if len(p) != 2 or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in p):
            raise ValueError(f"fp_heads must hold (layer, kv_head) pairs of ints >= 0, got {p!r}")
    return tuple(sorted(set(pairs)))


class HeadSplitCodec:
    """Keeps KV heads ``heads`` (dim -3) in 16-bit and compresses the others with ``inner``.

    Input ``(..., kv_heads, tokens, head_dim)``; ``Packed.data`` holds the inner codec's tensors under
    ``inner.<name>`` and the kept heads under ``fp_heads`` (float16 unless the input is bfloat16/float16),
    so ``Packed.nbytes`` counts them exactly. Duck-types the `kvpack.Codec` interface the cache uses.
    """

    def __init__(self, inner: Codec, heads: tuple[int, ...]) -> None:
        self.inner, self.heads = inner, tuple(sorted(set(heads)))
        self.head_dim, self.block_tokens = inner.head_dim, inner.block_tokens
        self.spec = f"{inner.spec}+fp_heads={'/'.join(map(str, self.heads))}"

    def _split(self, num_heads: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if max(self.heads) >= num_heads:
            raise ValueError(f"fp_heads {self.heads} out of range for {num_heads} KV heads")
        kept = torch.tensor(self.heads, device=device)
        mask = torch.ones(num_heads, dtype=torch.bool, device=device)
        mask[kept] = False
        return kept, mask.nonzero().flatten()

    def encode(self, x: torch.Tensor) -> Packed:
        if x.dim() < 3:
            raise ValueError(f"HeadSplitCodec needs (..., kv_heads, tokens, head_dim), got shape {tuple(x.shape)}")
        kept, rest = self._split(x.shape[-3], x.device)
        fp_dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float16
        data = {"fp_heads": x.index_select(-3, kept).to(fp_dtype).contiguous()}
        if rest.numel():
            inner = self.inner.encode(x.index_select(-3, rest).contiguous())
            data.update({"inner." + k: v for k, v in inner.data.items()})
        return Packed(codec=self.spec, shape=tuple(x.shape), dtype=x.dtype, data=data)

    def decode(self, packed: Packed) -> torch.Tensor:
        if packed.codec != self.spec:
            raise ValueError(f"Packed was made by codec {packed.codec!r}, not by {self.spec!r}")
        kept, rest = self._split(packed.shape[-3], packed.device)
        fp = packed.data["fp_heads"]
        out = torch.empty(packed.shape, dtype=packed.dtype, device=fp.device)
        out.index_copy_(-3, kept, fp.to(packed.dtype))
        if rest.numel():
            shape = (*packed.shape[:-3], rest.numel(), *packed.shape[-2:])
            data = {k[len("inner.") :]: v for k, v in packed.data.items() if k.startswith("inner.")}
            inner = Packed(codec=self.inner.spec, shape=shape, dtype=packed.dtype, data=data)
            out.index_copy_(-3, rest, self.inner.decode(inner).to(packed.dtype))
        return out

    def check_packed(self, packed: Packed) -> None:
        if packed.codec != self.spec:
            raise ValueError(f"Packed was made by codec {packed.codec!r}, not by {self.spec!r}")

    def bits_per_value(self) -> float:
        return float("nan")  # depends on the number of KV heads; the cache measures it
