"""The codec API: `Codec` (a frozen config dataclass with encode/decode), `Packed`, the registry.

Every codec compresses float vectors whose last dim is ``head_dim`` (any leading shape) into a
`Packed`: named tensors whose bytes are exactly what is stored. A codec declares that storage in
``layout(shape)``; the base class derives ``bits_per_value()`` from it and checks every `Packed`
given to ``decode`` against it, so accounting and validation cannot drift from the encoder.

What ``decode`` guarantees (`Codec.decode`, shared by every codec; a codec implements ``_decode``):
a `Packed` whose structure is wrong (another codec's spec, a shape that is not the one its tensors
were made for, a non-float ``dtype``, a missing, extra or non-tensor field, a field of the wrong shape
or dtype, an index field outside ``index_limits()``) raises ``ValueError``/``TypeError`` naming what is
wrong, before any work. Float side data (scales, norms, fp16 values) must be finite, and so must the
decoded result: a flipped bit that makes a scale NaN/inf raises ``ValueError``. A float16/bfloat16
result saturates at the dtype's largest finite value (quantization error of an input at the limit,
such as 65504 in float16, would otherwise round to inf). A flipped bit in code bytes, or one that leaves a scale finite but wrong, is
not detectable from the data alone: decode then returns a wrong but finite tensor (stored caches
carry a checksum, `kvpack.hf.persist`, which catches it).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

__all__ = ["CODECS", "Codec", "Packed", "get_codec", "list_codecs", "parse_spec", "register_codec"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Packed:
    """The stored form of an encoded tensor.

    ``codec`` is the spec of the codec that made it (decode refuses another); ``shape`` and
    ``dtype`` are those of the input, restored by decode; ``data`` holds the stored tensors.
    """

    codec: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    data: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.codec, str):
            raise TypeError(f"Packed.codec must be a codec spec (str), got {self.codec!r}")
        try:
            shape = tuple(self.shape)
        except TypeError:
            raise TypeError(f"Packed.shape must be a tuple of ints, got {self.shape!r}") from None
        if not shape or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in shape):
            raise ValueError(f"Packed.shape must be a non-empty tuple of ints >= 0, got {self.shape!r}")
        object.__setattr__(self, "shape", shape)
        if not isinstance(self.dtype, torch.dtype) or self.dtype not in FLOAT_DTYPES:
            raise TypeError(f"Packed.dtype must be a float torch.dtype (the input's), got {self.dtype!r}")
        if not isinstance(self.data, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in self.data.items()
        ):
            raise TypeError("Packed.data must be a dict of str -> torch.Tensor")

    @property
    def nbytes(self) -> int:
        """Bytes the stored tensors really hold."""
        return sum(t.numel() * t.element_size() for t in self.data.values())

    @property
    def device(self) -> torch.device:
        return next(iter(self.data.values())).device if self.data else torch.device("cpu")

    def to(self, device: torch.device | str) -> Packed:
        return dataclasses.replace(self, data={k: v.to(device) for k, v in self.data.items()})


# name -> (shape, dtype) of each stored tensor
Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass(frozen=True)
class Codec:
    """Base of every codec: ``head_dim``, ``bits`` and ``seed`` plus the subclass's own options.

    Subclasses are frozen dataclasses registered with :func:`register_codec`; they implement
    ``layout``, ``encode`` and ``decode`` and validate their options in ``__post_init__``.
    """

    head_dim: int
    bits: int | None = None
    seed: int = 0

    name: ClassVar[str] = ""
    allowed_bits: ClassVar[tuple[int, ...]] = ()
    default_bits: ClassVar[int | None] = None
    # tokens over which one set of side data (scales, ...) is shared; bits_per_value is exact
    # for inputs whose token count is a multiple of this.
    block_tokens: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim < 1:
            raise ValueError(f"head_dim must be a positive int, got {self.head_dim!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")
        if self.bits is None:
            object.__setattr__(self, "bits", self.default_bits)
        if not self.allowed_bits and self.bits is not None:
            raise ValueError(f"codec {self.name!r} takes no bits, got bits={self.bits!r}")
        if self.allowed_bits:
            if isinstance(self.bits, bool) or not isinstance(self.bits, int):
                raise TypeError(f"bits must be an int for codec {self.name!r}, got {self.bits!r}")
            if self.bits not in self.allowed_bits:
                raise ValueError(
                    f"bits={self.bits} is out of range for codec {self.name!r}; allowed: {list(self.allowed_bits)}"
                )

    # ---- what a codec implements -------------------------------------------------------------
    def layout(self, shape: tuple[int, ...]) -> Layout:
        """Shape and dtype of every stored tensor for an input of ``shape``."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> Packed:
        raise NotImplementedError

    def _decode(self, packed: Packed) -> torch.Tensor:
        """The reconstruction (float32, shape ``packed.shape``) of a `Packed` that `check_packed` accepted."""
        raise NotImplementedError

    def index_limits(self) -> dict[str, int]:
        """Stored integer fields whose values index something: name -> exclusive upper bound (lower: 0).

        Fields not named here hold codes of which every value decodes (packed bits, int8 codes).
        """
        return {}

    # ---- shared by all codecs ----------------------------------------------------------------
    @property
    def spec(self) -> str:
        """Canonical spec string, e.g. ``"int:4:axis=channel,group=32"``; ``get_codec`` parses it."""
        opts = []
        for f in dataclasses.fields(self):
            if f.name in ("head_dim", "bits"):
                continue
            value = getattr(self, f.name)
            if value != f.default:
                opts.append(f"{f.name}={value}")
        out = self.name if self.bits is None or not self.allowed_bits else f"{self.name}:{self.bits}"
        return out + (":" + ",".join(opts) if opts else "")

    def bits_per_value(self) -> float:
        """Exact average storage bits per element, every norm, scale and sign counted."""
        shape = (self.block_tokens, self.head_dim)
        total = sum(math.prod(s) * _dtype_bits(dt) for s, dt in self.layout(shape).values())
        return total / math.prod(shape)

    def check_input(self, x: torch.Tensor, min_dim: int = 1) -> None:
        """Raise TypeError/ValueError naming the problem with an input to ``encode``."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"x must be float16, bfloat16 or float32 (float64 accepted), got {x.dtype}")
        if x.dim() < min_dim:
            raise ValueError(f"x must have at least {min_dim} dims for codec {self.spec!r}, got shape {tuple(x.shape)}")
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"x's last dim must be head_dim={self.head_dim}, got shape {tuple(x.shape)}")
        if x.numel() and not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or Inf; the codec needs finite values")

    def make_packed(self, x: torch.Tensor, **data: torch.Tensor) -> Packed:
        return Packed(codec=self.spec, shape=tuple(x.shape), dtype=x.dtype, data=data)

    def decode(self, packed: Packed) -> torch.Tensor:
        """The reconstruction, shape ``packed.shape`` and dtype ``packed.dtype``; refuses a malformed `Packed`."""
        self.check_packed(packed)
        y = self._decode(packed)
        if y.numel() and not bool(torch.isfinite(y).all()):
            raise ValueError(f"codec {self.spec!r} decoded NaN/Inf (corrupted side data?)")
        if packed.dtype in (torch.float16, torch.bfloat16):
            # quantization error can carry a value at the dtype's limit past it: saturate, never inf
            limit = torch.finfo(packed.dtype).max
            y = y.clamp(-limit, limit)
        return y.to(packed.dtype)

    def check_packed(self, packed: Packed) -> None:
        """Raise TypeError/ValueError if ``packed`` was not made by this codec or is truncated or altered."""
        if not isinstance(packed, Packed):
            raise TypeError(f"decode needs a kvpack.Packed, got {type(packed).__name__}")
        if packed.codec != self.spec:
            raise ValueError(f"Packed was made by codec {packed.codec!r}, not by {self.spec!r}")
        shape = packed.shape
        if shape[-1] != self.head_dim:
            raise ValueError(f"Packed.shape {shape} must end in head_dim={self.head_dim} for codec {self.spec!r}")
        try:
            expected = self.layout(shape)
        except IndexError:
            raise ValueError(f"Packed.shape {shape} has too few dims for codec {self.spec!r}") from None
        if set(packed.data) != set(expected):
            raise ValueError(
                f"Packed holds tensors {sorted(packed.data)}, codec {self.spec!r} expects {sorted(expected)}"
            )
        device = packed.device
        if device.type == "meta":
            raise ValueError("Packed tensors are on the meta device: they hold no values to decode")
        for key, (want, dtype) in expected.items():
            t = packed.data[key]
            if tuple(t.shape) != tuple(want) or t.dtype != dtype:
                raise ValueError(
                    f"Packed tensor {key!r} is {tuple(t.shape)} {t.dtype}, expected {tuple(want)} {dtype} "
                    f"for shape {shape} (truncated or mismatched?)"
                )
            if t.device != device:
                raise ValueError(f"Packed tensors are on several devices ({key!r} on {t.device}, others on {device})")
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"Packed tensor {key!r} holds NaN/Inf (corrupted side data)")
        for key, limit in self.index_limits().items():
            t = packed.data[key]
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= limit):
                raise ValueError(f"Packed tensor {key!r} holds indices outside 0..{limit - 1} (corrupted)")


def _dtype_bits(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size() * 8


CODECS: dict[str, type[Codec]] = {}


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Class decorator: add a codec to the registry under ``cls.name``."""
    if not cls.name or cls.name in CODECS:
        raise ValueError(f"codec name {cls.name!r} is empty or already registered")
    CODECS[cls.name] = cls
    return cls


def list_codecs() -> list[str]:
    """Names of the registered codecs."""
    _load_builtin_codecs()
    return sorted(CODECS)


@functools.cache
def _load_builtin_codecs() -> None:
    """Import every module of `kvpack.codecs` (each registers its codec); on first use, not at ``import kvpack``."""
    import importlib
    import pkgutil

    import kvpack.codecs

    for module in pkgutil.iter_modules(kvpack.codecs.__path__):
        importlib.import_module(f"kvpack.codecs.{module.name}")


def _parse_value(text: str) -> Any:
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def parse_spec(spec: str) -> tuple[str, int | None, dict[str, Any]]:
    """``"int:4:axis=channel,group=32"`` -> ``("int", 4, {"axis": "channel", "group": 32})``."""
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"codec spec must be a non-empty str, got {spec!r}")
    parts = spec.split(":")
    name, bits, options = parts[0], None, {}
    rest = parts[1:]
    if rest and "=" not in rest[0]:
        try:
            bits = int(rest[0])
        except ValueError:
            raise ValueError(f"codec spec {spec!r}: bits {rest[0]!r} is not an int") from None
        rest = rest[1:]
    if len(rest) > 1:
        raise ValueError(f"codec spec {spec!r} must look like name[:bits][:key=value,...]")
    if rest and rest[0]:
        for item in rest[0].split(","):
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ValueError(f"codec spec {spec!r}: option {item!r} must be key=value")
            options[key.strip()] = _parse_value(value.strip())
    return name, bits, options


def get_codec(name: str, *, head_dim: int, bits: int | None = None, seed: int = 0, **options: Any) -> Codec:
    """Build a codec from its name or spec string (``"turbo_mse:3"``, ``"int:4:axis=channel"``)."""
    _load_builtin_codecs()
    base, spec_bits, spec_options = parse_spec(name)
    if base not in CODECS:
        raise ValueError(f"unknown codec {base!r}; known codecs: {sorted(CODECS)}")
    if bits is not None and spec_bits is not None and bits != spec_bits:
        raise ValueError(f"bits given twice and different: spec {name!r} says {spec_bits}, bits={bits}")
    for key in set(spec_options) & set(options):
        if spec_options[key] != options[key]:
            raise ValueError(f"option {key!r} given twice and different: {spec_options[key]!r} vs {options[key]!r}")
    cls = CODECS[base]
    options = {**spec_options, **options}
    if "seed" in options:
        seed = options.pop("seed")
    known = {f.name for f in dataclasses.fields(cls)} - {"head_dim", "bits", "seed"}
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for codec {base!r}; known: {sorted(known)}")
    return cls(head_dim=head_dim, bits=spec_bits if bits is None else bits, seed=seed, **options)
