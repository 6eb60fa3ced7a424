"""Codecs made of other codecs: `IdentityCodec` (a stream kept as given) and `PerHeadCodec` (one codec per KV head).

Neither is registered (neither is a compression method of its own); both duck-type the `kvpack.Codec`
interface the cache uses (``encode``/``decode``/``bits_per_value``/``block_tokens``/``spec``/``head_dim``).
A composite stores each inner codec's tensors under a prefix (`nest`), and hands each inner codec back its
own `Packed` (`unnest`); the outlier wrappers (`kvpack.codecs.outliers`) use the same two helpers.
"""

from __future__ import annotations

import math

import torch

from kvpack.codec import Codec, Packed

__all__ = ["IdentityCodec", "PerHeadCodec", "nest", "unnest"]


def nest(prefix: str, data: dict) -> dict:
    """An inner codec's tensors (or layout entries) under ``prefix`` (``"inner."``, ``"g0."``...) in the outer one."""
    return {prefix + k: v for k, v in data.items()}


def unnest(packed: Packed, prefix: str, codec, shape: tuple[int, ...] | None = None, dtype=None) -> Packed:
    """The `Packed` of the inner ``codec`` whose tensors ``packed`` holds under ``prefix``."""
    data = {k[len(prefix) :]: v for k, v in packed.data.items() if k.startswith(prefix)}
    return Packed(codec.spec, packed.shape if shape is None else shape, packed.dtype if dtype is None else dtype, data)


class IdentityCodec:
    """Keeps a stream as given (model dtype): the stand-in codec for uncompressed streams and layers."""

    spec = "none"
    block_tokens = 1

    def __init__(self, head_dim: int) -> None:
        self.head_dim = head_dim

    def encode(self, x):
        return Packed(codec=self.spec, shape=tuple(x.shape), dtype=x.dtype, data={"values": x.clone()})

    def decode(self, packed):
        self.check_packed(packed)
        return packed.data["values"]

    def check_packed(self, packed: Packed) -> None:
        """Raise TypeError/ValueError unless ``packed`` holds one ``values`` tensor of its shape and dtype."""
        _check_outer(packed, self.spec, self.head_dim, 1)
        if set(packed.data) != {"values"}:
            raise ValueError(f"Packed of codec 'none' holds tensors {sorted(packed.data)}, expected ['values']")
        t = packed.data["values"]
        if tuple(t.shape) != packed.shape or t.dtype != packed.dtype:
            raise ValueError(
                f"Packed tensor 'values' is {tuple(t.shape)} {t.dtype}, expected {packed.shape} {packed.dtype}"
            )

    def bits_per_value(self) -> float:
        return float("nan")  # the model dtype's width; known only from the stored tensor


def _check_outer(packed, spec: str, head_dim: int, min_dims: int) -> None:
    """What every composite checks first: a `Packed` of this spec whose shape ends in ``head_dim``."""
    if not isinstance(packed, Packed):
        raise TypeError(f"decode needs a kvpack.Packed, got {type(packed).__name__}")
    if packed.codec != spec:
        raise ValueError(f"Packed was made by codec {packed.codec!r}, not by {spec!r}")
    if len(packed.shape) < min_dims or packed.shape[-1] != head_dim:
        raise ValueError(f"Packed.shape {packed.shape} must have >= {min_dims} dims ending in head_dim={head_dim}")


def _fp_dtype(dtype: torch.dtype) -> torch.dtype:
    """The 16-bit dtype a kept head is stored in: the input's when 16-bit, else float16."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


class PerHeadCodec:
    """A codec per KV head (dim -3): head ``h`` goes through ``codecs[h]``, or stays 16-bit where it is ``None``.

    Input ``(..., kv_heads, tokens, head_dim)`` with ``kv_heads == len(codecs)``. Heads that share a
    spec are encoded together (one call per distinct spec); ``Packed.data`` holds group ``g``'s tensors
    under ``g<g>.<name>`` and the 16-bit heads under ``fp_heads`` (float16 unless the input is
    bfloat16/float16), so ``Packed.nbytes`` counts everything.
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
            kept = x.index_select(-3, torch.tensor(self.fp, device=x.device))
            limit = torch.finfo(_fp_dtype(x.dtype)).max
            if kept.numel() and not bool((kept.abs() <= limit).all()):
                raise ValueError(
                    f"x's 16-bit heads {self.fp} hold values beyond {_fp_dtype(x.dtype)} (|x| <= {limit:g})"
                )
            data["fp_heads"] = kept.to(_fp_dtype(x.dtype))
        for g, (codec, heads) in enumerate(self.groups):
            part = codec.encode(x.index_select(-3, torch.tensor(heads, device=x.device)).contiguous())
            data.update(nest(f"g{g}.", part.data))
        return Packed(codec=self.spec, shape=tuple(x.shape), dtype=x.dtype, data=data)

    def decode(self, packed: Packed) -> torch.Tensor:
        self._check_own(packed)  # each group's part is checked by its codec's decode
        out = torch.empty(packed.shape, dtype=packed.dtype, device=packed.device)
        if self.fp:
            out.index_copy_(-3, torch.tensor(self.fp, device=out.device), packed.data["fp_heads"].to(packed.dtype))
        for g, (_, heads) in enumerate(self.groups):
            part = self._in_group(g, packed, lambda codec, inner: codec.decode(inner))
            out.index_copy_(-3, torch.tensor(heads, device=out.device), part.to(packed.dtype))
        return out

    def check_packed(self, packed: Packed) -> None:
        """Raise TypeError/ValueError unless ``packed`` holds this codec's groups, each as its inner codec checks it,
        and the 16-bit heads ``fp_heads`` of the right shape and dtype, and nothing else."""
        self._check_own(packed)
        for g in range(len(self.groups)):
            self._in_group(g, packed, lambda codec, inner: codec.check_packed(inner))

    def _in_group(self, g: int, packed: Packed, fn):
        """``fn(codec, inner Packed)`` for group ``g``; its TypeError/ValueError say which group."""
        codec, heads = self.groups[g]
        shape = (*packed.shape[:-3], len(heads), *packed.shape[-2:])
        try:
            return fn(codec, unnest(packed, f"g{g}.", codec, shape))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"group {g} (heads {heads}, {codec.spec!r}) of {self.spec!r}: {exc}") from None

    def _check_own(self, packed: Packed) -> None:
        """The outer structure: spec, shape, no stray or missing tensors, ``fp_heads``, one device."""
        _check_outer(packed, self.spec, self.head_dim, 3)
        self._check_heads(packed.shape[-3])
        prefixes = [f"g{g}." for g in range(len(self.groups))]
        expected_fp = {"fp_heads"} if self.fp else set()
        stray = [k for k in packed.data if k not in expected_fp and not k.startswith(tuple(prefixes))]
        if stray or expected_fp - set(packed.data):
            raise ValueError(f"Packed of {self.spec!r} holds stray tensors {stray} or lacks {sorted(expected_fp)}")
        if self.fp:
            t, want = packed.data["fp_heads"], (*packed.shape[:-3], len(self.fp), *packed.shape[-2:])
            if tuple(t.shape) != want or t.dtype != _fp_dtype(packed.dtype):
                raise ValueError(
                    f"Packed tensor 'fp_heads' is {tuple(t.shape)} {t.dtype}, expected {want} {_fp_dtype(packed.dtype)}"
                )
            if t.numel() and not bool(torch.isfinite(t).all()):
                raise ValueError("Packed tensor 'fp_heads' holds NaN/Inf (corrupted)")
        devices = {t.device for t in packed.data.values()}
        if len(devices) > 1:
            raise ValueError(f"Packed tensors are on several devices: {sorted(map(str, devices))}")

    def bits_per_value(self) -> float:
        """Mean over the KV heads (each holds as many values): a codec's own bits, 16 for 16-bit heads."""
        return sum(16.0 if c is None else c.bits_per_value() for c in self.codecs) / len(self.codecs)
