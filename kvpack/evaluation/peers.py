"""The peers: transformers' own `QuantizedCache` backends, run through `kvpack.evaluate` with their TRUE bits.

transformers 5 ships ``QuantizedCache(backend, config, nbits, axis_key, axis_value, q_group_size,
residual_length)`` (KIVI-style, Liu et al. arXiv 2402.02750) with three backends:

- ``quanto`` (optimum-quanto): asymmetric int2/int4 in groups of ``q_group_size`` (default 64) values,
  a scale and a shift per group (MaxOptimizer);
- ``hqq`` (Badri & Shaji, "Half-Quadratic Quantization"): int1..int8 groups with a scale and zero
  point refined by a half-quadratic solver;
- ``fp8``: float8 e4m3 with ONE per-tensor scale frozen at the first update (no residual window).

Peer specs: ``quanto:4``, ``quanto:2``, ``hqq:4``, ``hqq:2``, ``fp8``, with options after a second
colon: ``quanto:4:group=32,residual=128,axis_key=0,axis_value=0`` (transformers' defaults: group 64,
residual 128, axis 0 for both).

Bits: what the cache's tensors really hold, walked recursively (quanto's tensor subclasses through
``__tensor_flatten__``, hqq's ``(codes, meta)`` pairs, fp8's ``(codes, scale)``), packed codes at
their storage width, every scale, shift and zero point, and the full-precision residual window.
Floating tensors wider than 16 bits are counted as 16-bit: these backends keep scales and the
residual in the model dtype, so a float32 CPU evaluation stands for a 16-bit deployment, as
kvpack's own caches are counted (`kvpack.CachePolicy.held_dtype`).

What the snapshot protocol measures for them: a cache that receives the whole ``ctx`` prefill in one
``update`` quantizes all of it at once (transformers' `QuantizedLayer` keeps no residual and no
sinks from a prefill), so the continuation attends to a fully quantized context; that is how the
peers behave after a prefill, and it is measured as such.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.cache_utils import QuantizedCache

__all__ = ["PEERS", "PeerSpec", "QuantizedPeerCache", "available", "held_bytes", "parse_peer", "peer_factory"]

# default peer set of `kvpack sweep --peers`: the list (quanto/hqq at 2 and 4 bits, fp8)
PEERS = ("quanto:4", "quanto:2", "hqq:4", "hqq:2", "fp8")

BACKENDS = {"quanto": (2, 4), "hqq": (1, 2, 3, 4, 8), "fp8": ()}
_PACKAGES = {"quanto": ("optimum.quanto", "optimum-quanto"), "hqq": ("hqq", "hqq"), "fp8": (None, None)}
_OPTIONS = {"group": "q_group_size", "residual": "residual_length", "axis_key": "axis_key", "axis_value": "axis_value"}


@dataclass(frozen=True)
class PeerSpec:
    """A parsed peer spec: backend, bits (``None`` for fp8) and the group-wise options given."""

    backend: str
    nbits: int | None
    options: tuple[tuple[str, int], ...] = ()

    @property
    def name(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        base = self.backend if self.nbits is None else f"{self.backend}:{self.nbits}"
        return f"{base}:{opts}" if opts else base

    def cache_kwargs(self) -> dict:
        kwargs = {_OPTIONS[k]: v for k, v in self.options}
        return kwargs if self.nbits is None else {"nbits": self.nbits, **kwargs}


def parse_peer(spec: str) -> PeerSpec:
    """Parse ``backend[:bits][:opt=value,...]`` (see the module docstring); ValueError naming what is wrong."""
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"peer spec must be a non-empty string like 'quanto:4', got {spec!r}")
    parts = spec.split(":")
    backend = parts[0].lower()
    if backend not in BACKENDS:
        raise ValueError(f"unknown peer backend {parts[0]!r} in {spec!r}; known: {sorted(BACKENDS)}")
    if len(parts) > 3:
        raise ValueError(f"peer spec {spec!r} has too many ':' parts; expected backend[:bits][:opt=value,...]")
    nbits, options = None, []
    if backend == "fp8":
        if len(parts) > 1:
            raise ValueError(f"the fp8 peer takes no bits or options (per-tensor e4m3), got {spec!r}")
    else:
        if len(parts) < 2:
            raise ValueError(f"peer {backend!r} needs bits, e.g. '{backend}:4' (allowed {BACKENDS[backend]})")
        try:
            nbits = int(parts[1])
        except ValueError:
            raise ValueError(f"peer bits must be an int, got {parts[1]!r} in {spec!r}") from None
        if nbits not in BACKENDS[backend]:
            raise ValueError(f"peer {backend!r} supports bits {BACKENDS[backend]}, got {nbits} in {spec!r}")
        for item in parts[2].split(",") if len(parts) == 3 and parts[2] else []:
            name, eq, value = item.partition("=")
            if not eq or name not in _OPTIONS:
                raise ValueError(f"peer option {item!r} in {spec!r}: expected one of {sorted(_OPTIONS)} as name=int")
            try:
                options.append((name, int(value)))
            except ValueError:
                raise ValueError(f"peer option {name} must be an int, got {value!r} in {spec!r}") from None
    return PeerSpec(backend, nbits, tuple(options))


def available(backend: str) -> str | None:
    """``None`` when the backend's package is importable, else the pip command that installs it."""
    module, package = _PACKAGES[backend]
    if module is None:
        return None
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package ("optimum")
        found = False
    return None if found else f"pip install {package}"


def held_bytes(obj) -> int:
    """Bytes of every tensor inside ``obj`` (tensor subclasses, tuples, lists, dicts), floats counted <= 16 bits."""
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor:
            names, _ = obj.__tensor_flatten__()
            return sum(held_bytes(getattr(obj, n)) for n in names)
        width = obj.element_size()
        if obj.dtype.is_floating_point:
            width = min(width, 2)  # a 16-bit deployment holds float32 scales / residual as 16-bit
        return obj.numel() * width
    if isinstance(obj, (tuple, list)):
        return sum(held_bytes(x) for x in obj)
    if isinstance(obj, dict):
        return sum(held_bytes(x) for x in obj.values())
    return 0


class QuantizedPeerCache(QuantizedCache):
    """transformers' `QuantizedCache` that also reports the bytes it holds (``nbytes``/``bits_per_value``).

    Nothing about the quantization is changed; the subclass only records the K/V shape at each
    update to count the values held.
    """

    def __init__(self, spec: PeerSpec, config) -> None:
        super().__init__(spec.backend, config, **spec.cache_kwargs())
        self.spec = spec
        self._shape: dict[int, tuple[int, int, int]] = {}  # layer -> (batch, heads, head_dim)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        b, h, _, d = key_states.shape
        self._shape[layer_idx] = (b, h, d)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def nbytes(self, stream: str | None = None) -> int:
        """Bytes held for ``stream`` ``"k"``, ``"v"`` or ``None`` (both): quantized states + residual window."""
        if stream not in ("k", "v", None):
            raise ValueError(f"stream must be 'k', 'v' or None, got {stream!r}")
        total = 0
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            if stream in ("k", None):
                total += held_bytes(layer._quantized_keys) + held_bytes(layer.keys)
            if stream in ("v", None):
                total += held_bytes(layer._quantized_values) + held_bytes(layer.values)
        return total

    def bits_per_value(self, stream: str | None = None) -> float:
        """``8 * nbytes / values held`` for one stream (or both); NaN while empty."""
        values = sum(
            layer.get_seq_length() * b * h * d
            for i, layer in enumerate(self.layers)
            if layer.is_initialized and i in self._shape
            for b, h, d in [self._shape[i]]
        ) * (1 if stream else 2)
        return 8 * self.nbytes(stream) / values if values else float("nan")


def peer_factory(spec: str | PeerSpec) -> Callable:
    """A ``cache_factory(config)`` for `kvpack.evaluate` building the peer cache; ImportError names the install."""
    peer = parse_peer(spec) if isinstance(spec, str) else spec
    if not isinstance(peer, PeerSpec):
        raise TypeError(f"spec must be a peer spec string or a PeerSpec, got {type(spec).__name__}")
    missing = available(peer.backend)
    if missing:
        raise ImportError(f"peer {peer.name!r} needs its backend package: {missing}")

    def factory(config) -> QuantizedPeerCache:
        return QuantizedPeerCache(peer, config)

    factory.__name__ = f"transformers.QuantizedCache[{peer.name}]"
    return factory
