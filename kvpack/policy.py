"""`CachePolicy`: which codec compresses K and V, and which tokens and layers stay in full precision.

The shape follows KIVI (Liu et al., arXiv 2402.02750): the newest ``residual`` tokens stay in
full precision and are packed in blocks of ``block`` tokens as they age; StreamingLLM (Xiao et al.,
arXiv 2309.17453) motivates keeping the first ``sinks`` tokens (attention sinks) in full precision;
layers in ``skip_layers`` are not compressed at all; ``layer_keys``/``layer_values`` give a codec per
layer (`kvpack allocate` writes them), ``head_keys``/``head_values`` a codec per KV head of a layer
(`PerHeadCodec`; `kvpack allocate --per-head` writes them); ``fp_heads`` keeps chosen (layer, KV head)
pairs of both K and V in 16-bit (outlier heads, chosen by `kvpack.tuning.allocate.choose_outlier_heads`).
"Full precision" means 16-bit floats, as
deployed: the model dtype when it is float16/bfloat16, float16 for a float32 model (``window_dtype``
overrides), so the bits a float32 CPU evaluation reports are those a 16-bit deployment holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kvpack.codec import Codec, Packed, get_codec

__all__ = ["DEFAULT_BLOCK", "CachePolicy", "HeadSplitCodec", "IdentityCodec", "PerHeadCodec"]

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
    ``head_keys``/``head_values``: per layer (layer 0 first), ``None`` (the layer's spec applies) or a
    tuple of one spec per KV head (``None``: that head 16-bit); such a layer goes through `PerHeadCodec`,
    overriding ``layer_keys``/``key`` there. ``fp_heads`` and ``skip_layers`` still apply on top.
    ``pre_rope_keys``: pack keys with RoPE undone (KVQuant; `kvpack.hf.rope`), re-applied after decoding.
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
    head_keys: tuple[tuple[str | None, ...] | None, ...] = field(default=())
    head_values: tuple[tuple[str | None, ...] | None, ...] = field(default=())

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
        for name in ("head_keys", "head_values"):
            object.__setattr__(self, name, _normalize_head_specs(getattr(self, name), name))
        object.__setattr__(self, "fp_heads", _normalize_fp_heads(self.fp_heads))
        # build once with a nominal head_dim so that a bad spec fails here, not mid-forward
        self.codecs(head_dim=64)
        for i in range(self.num_layers_named()):
            self.codecs(head_dim=64, layer_idx=i)

    def num_layers_named(self) -> int:
        """Layers that ``layer_keys``/``layer_values``/``head_keys``/``head_values`` give specs for."""
        return max(len(self.layer_keys), len(self.layer_values), len(self.head_keys), len(self.head_values))

    def head_specs(self, layer_idx: int) -> tuple[tuple[str | None, ...] | None, tuple[str | None, ...] | None]:
        """Per-KV-head (key, value) specs of one layer (``None``: the layer's single spec applies)."""
        keys = self.head_keys[layer_idx] if layer_idx < len(self.head_keys) else None
        values = self.head_values[layer_idx] if layer_idx < len(self.head_values) else None
        return keys, values

    def specs(self, layer_idx: int) -> tuple[str | None, str | None]:
        """The (key, value) specs of one layer before skip_layers/fp_heads apply."""
        key = self.layer_keys[layer_idx] if layer_idx < len(self.layer_keys) else self.key
        value = self.layer_values[layer_idx] if layer_idx < len(self.layer_values) else self.value
        return key, value

    def held_specs(self, layer_idx: int, num_kv_heads: int) -> tuple[tuple[str | None, ...], tuple[str | None, ...]]:
        """Per stream (K, V), the spec each KV head of ``layer_idx`` is held with (``None``: 16-bit), after
        ``skip_layers``, ``head_keys``/``head_values`` and ``fp_heads``: what bit counts add up."""
        if layer_idx in self.skip_layers:
            return ((None,) * num_kv_heads,) * 2  # type: ignore[return-value]
        fp = self.heads_in_fp(layer_idx)
        if fp and max(fp) >= num_kv_heads:
            raise ValueError(f"fp_heads {fp} of layer {layer_idx} out of range for {num_kv_heads} KV heads")
        out = []
        for spec, heads in zip(self.specs(layer_idx), self.head_specs(layer_idx)):
            if heads is not None and len(heads) != num_kv_heads:
                raise ValueError(f"layer {layer_idx} has {len(heads)} per-head specs for {num_kv_heads} KV heads")
            heads = (spec,) * num_kv_heads if heads is None else heads
            out.append(tuple(None if h in fp else s for h, s in enumerate(heads)))
        return tuple(out)  # type: ignore[return-value]

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
        per_head = (None, None) if layer_idx is None else self.head_specs(layer_idx)
        heads = () if layer_idx is None else self.heads_in_fp(layer_idx)
        codecs = []
        for spec, head_specs in zip(specs, per_head):
            if head_specs is not None:
                if heads and max(heads) >= len(head_specs):
                    raise ValueError(
                        f"fp_heads {heads} of layer {layer_idx} out of range for its {len(head_specs)} per-head specs"
                    )
                head_specs = tuple(None if h in heads else s for h, s in enumerate(head_specs))
                codecs.append(PerHeadCodec(tuple(self._codec(s, head_dim) for s in head_specs), head_dim))
            elif spec is None:
                codecs.append(IdentityCodec(head_dim))
            else:
                codec = self._codec(spec, head_dim)
                codecs.append(HeadSplitCodec(codec, heads) if heads else codec)
        return tuple(codecs)  # type: ignore[return-value]

    def _codec(self, spec: str | None, head_dim: int) -> Codec | None:
        return None if spec is None else get_codec(spec, head_dim=head_dim, seed=self.seed)

    def compresses_anything(self) -> bool:
        """Whether any layer's K or V goes through a codec."""
        per_head = [s for heads in (*self.head_keys, *self.head_values) if heads is not None for s in heads]
        return any(s is not None for s in (self.key, self.value, *self.layer_keys, *self.layer_values, *per_head))

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


def _normalize_head_specs(value, name: str) -> tuple[tuple[str | None, ...] | None, ...]:
    """``head_keys``/``head_values`` (JSON lists too) -> a tuple over layers of ``None`` or per-head spec tuples."""
    if isinstance(value, (str, dict)):
        raise TypeError(f"{name} must be a sequence over layers of None or per-KV-head spec sequences, got {value!r}")
    try:
        layers = tuple(value)
    except TypeError:
        raise TypeError(
            f"{name} must be a sequence over layers of None or per-KV-head spec sequences, got {value!r}"
        ) from None
    out = []
    for i, heads in enumerate(layers):
        if heads is None:
            out.append(None)
            continue
        if isinstance(heads, (str, dict)) or not hasattr(heads, "__iter__"):
            raise TypeError(f"{name}[{i}] must be None or a sequence of per-KV-head codec specs, got {heads!r}")
        heads = tuple(heads)
        if not heads:
            raise ValueError(f"{name}[{i}] must name at least one KV head (None: the layer's spec applies)")
        if any(s is not None and (not isinstance(s, str) or not s) for s in heads):
            raise TypeError(f"{name}[{i}] must hold codec spec strings or None (16-bit), got {heads!r}")
        out.append(heads)
    return tuple(out)


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


class PerHeadCodec:
    """A codec per KV head (dim -3): head ``h`` goes through ``codecs[h]``, or stays 16-bit where it is ``None``.

    Input ``(..., kv_heads, tokens, head_dim)`` with ``kv_heads == len(codecs)``. Heads that share a
    spec are encoded together (one call per distinct spec); ``Packed.data`` holds group ``g``'s tensors
    under ``g<g>.<name>`` and the 16-bit heads under ``fp_heads`` (float16 unless the input is
    bfloat16/float16), so ``Packed.nbytes`` counts everything. Duck-types the `kvpack.Codec` interface.
    """

    def __init__(self, codecs: tuple[Codec | None, ...], head_dim: int) -> None:
        codecs = tuple(codecs)
        if not codecs:
            raise ValueError("PerHeadCodec needs at least one KV head")
        if any(c is not None and c.head_dim != head_dim for c in codecs):
            raise ValueError(f"PerHeadCodec: every codec must take head_dim={head_dim}")
        self.codecs, self.head_dim = codecs, head_dim
        self.block_tokens = math.lcm(*(int(c.block_tokens) for c in codecs if c is not None), 1)
        self.spec = "heads[" + "|".join("fp16" if c is None else c.spec for c in codecs) + "]"
        specs = [None if c is None else c.spec for c in codecs]
        self.fp = tuple(h for h, s in enumerate(specs) if s is None)
        distinct = list(dict.fromkeys(s for s in specs if s is not None))
        # (codec, heads) per distinct spec, in the order of each spec's first head
        self.groups = tuple((codecs[specs.index(s)], tuple(h for h, t in enumerate(specs) if t == s)) for s in distinct)

    def _check_heads(self, num_heads: int) -> None:
        if num_heads != len(self.codecs):
            raise ValueError(f"PerHeadCodec has specs for {len(self.codecs)} KV heads, the input has {num_heads}")

    def encode(self, x: torch.Tensor) -> Packed:
        if x.dim() < 3:
            raise ValueError(f"PerHeadCodec needs (..., kv_heads, tokens, head_dim), got shape {tuple(x.shape)}")
        self._check_heads(x.shape[-3])
        data = {}
        if self.fp:
            fp_dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float16
            data["fp_heads"] = x.index_select(-3, torch.tensor(self.fp, device=x.device)).to(fp_dtype).contiguous()
        for g, (codec, heads) in enumerate(self.groups):
            part = codec.encode(x.index_select(-3, torch.tensor(heads, device=x.device)).contiguous())
            data.update({f"g{g}.{k}": v for k, v in part.data.items()})
        return Packed(codec=self.spec, shape=tuple(x.shape), dtype=x.dtype, data=data)

    def decode(self, packed: Packed) -> torch.Tensor:
        self.check_packed(packed)
        out = torch.empty(packed.shape, dtype=packed.dtype, device=packed.device)
        if self.fp:
            out.index_copy_(-3, torch.tensor(self.fp, device=out.device), packed.data["fp_heads"].to(packed.dtype))
        for g, (codec, heads) in enumerate(self.groups):
            prefix = f"g{g}."
            data = {k[len(prefix) :]: v for k, v in packed.data.items() if k.startswith(prefix)}
            shape = (*packed.shape[:-3], len(heads), *packed.shape[-2:])
            part = codec.decode(Packed(codec=codec.spec, shape=shape, dtype=packed.dtype, data=data))
            out.index_copy_(-3, torch.tensor(heads, device=out.device), part.to(packed.dtype))
        return out

    def check_packed(self, packed: Packed) -> None:
        if not isinstance(packed, Packed):
            raise TypeError(f"decode needs a kvpack.Packed, got {type(packed).__name__}")
        if packed.codec != self.spec:
            raise ValueError(f"Packed was made by codec {packed.codec!r}, not by {self.spec!r}")
        self._check_heads(packed.shape[-3])

    def bits_per_value(self) -> float:
        """Mean over the KV heads (each holds as many values): a codec's own bits, 16 for 16-bit heads."""
        return sum(16.0 if c is None else c.bits_per_value() for c in self.codecs) / len(self.codecs)
