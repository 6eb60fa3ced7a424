"""A small API for inference engines (vLLM style): quantize a block of K/V, dequantize it, count bits.

``quantize_kv(k, v, k_bits=3, v_bits=2, codec="e8")`` packs keys and values with codecs from the
registry (``kvpack.get_codec``) and returns a :class:`PackedKV`; ``dequantize_kv`` restores
``(k, v)``; ``bpe_accounting`` reports bits per value two ways:

* **logical**: what the codecs declare, ``Codec.bits_per_value()`` (codes plus every per-vector
  scale or norm), averaged over the K and V elements: K3/V2 E8 at head_dim 128 is
  ``(3 + 16/128 + 2 + 16/128) / 2 = 2.625``;
* **storage**: ``8 * nbytes / numel`` of the tensors actually held, byte rounding of the bit
  packing and any padding included. The two agree up to such rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpack.codec import Codec, Packed, get_codec

__all__ = ["PackedKV", "bpe_accounting", "dequantize_kv", "quantize_kv"]

FP16_BITS = 16


@dataclass(frozen=True)
class PackedKV:
    """Packed keys and values of one block: ``k`` and ``v`` as :class:`kvpack.Packed`.

    Each ``Packed`` names the spec of the codec that made it (seed included), so decoding needs
    nothing else: the codec is rebuilt from ``packed.codec`` and ``packed.shape[-1]``.
    """

    k: Packed
    v: Packed

    def __post_init__(self) -> None:
        for name in ("k", "v"):
            if not isinstance(getattr(self, name), Packed):
                raise TypeError(f"PackedKV.{name} must be a kvpack.Packed, got {type(getattr(self, name)).__name__}")
        if self.k.shape[:-1] != self.v.shape[:-1]:
            raise ValueError(f"PackedKV: k {self.k.shape} and v {self.v.shape} must share all dims but the last")

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def k_codec(self) -> Codec:
        return codec_of(self.k)

    @property
    def v_codec(self) -> Codec:
        return codec_of(self.v)

    def to(self, device: torch.device | str) -> PackedKV:
        return PackedKV(self.k.to(device), self.v.to(device))


def codec_of(packed: Packed) -> Codec:
    """The codec that made ``packed``, rebuilt from its spec (which carries every option and the seed)."""
    return get_codec(packed.codec, head_dim=packed.shape[-1])


def _codec_for(x: torch.Tensor, name: str, codec: str, bits: int | None) -> Codec:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have a last dim (head_dim), got shape {tuple(x.shape)}")
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int)):
        raise TypeError(f"{name}_bits must be an int or None, got {bits!r}")
    return get_codec(codec, head_dim=x.shape[-1], bits=bits)


def quantize_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_bits: int | None = 3,
    v_bits: int | None = 2,
    codec: str = "e8",
    v_codec: str | None = None,
) -> PackedKV:
    """Pack keys ``k`` and values ``v``, float tensors ``(..., head_dim)`` with the same leading dims.

    ``codec`` is a registry name or spec (``"e8"``, ``"turbo_mse"``, ``"int:axis=channel"``) used for
    keys and, unless ``v_codec`` is given, for values; ``k_bits`` / ``v_bits`` are their bit widths
    (``None`` for codecs that take no bits, such as ``fp16``). The input dtype is restored by
    :func:`dequantize_kv`.
    """
    if not isinstance(codec, str) or (v_codec is not None and not isinstance(v_codec, str)):
        raise TypeError(f"codec and v_codec must be spec strings, got {codec!r}, {v_codec!r}")
    k_c = _codec_for(k, "k", codec, k_bits)
    v_c = _codec_for(v, "v", codec if v_codec is None else v_codec, v_bits)
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must share all dims but the last")
    return PackedKV(k_c.encode(k), v_c.encode(v))


def dequantize_kv(packed: PackedKV) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k, v)`` decoded from :func:`quantize_kv`'s result, in the shape and dtype given to it."""
    if not isinstance(packed, PackedKV):
        raise TypeError(f"dequantize_kv needs a kvpack.PackedKV, got {type(packed).__name__}")
    return packed.k_codec.decode(packed.k), packed.v_codec.decode(packed.v)


def _numel(packed: Packed) -> int:
    n = 1
    for s in packed.shape:
        n *= s
    return n


def bpe_accounting(packed: PackedKV) -> dict[str, float | str]:
    """Bits per element of a :class:`PackedKV`: logical (declared by the codecs) and storage (held).

    Returns ``k_codec``, ``v_codec``, ``k_logical_bits``, ``v_logical_bits``, ``logical_bits``,
    ``k_storage_bits``, ``v_storage_bits``, ``storage_bits`` (bits per K/V element), ``nbytes``,
    ``fp16_nbytes`` and ``ratio_to_fp16`` (stored bytes over fp16 bytes; 16/storage_bits is the
    compression factor).
    """
    if not isinstance(packed, PackedKV):
        raise TypeError(f"bpe_accounting needs a kvpack.PackedKV, got {type(packed).__name__}")
    nk, nv = _numel(packed.k), _numel(packed.v)
    if nk + nv == 0:
        raise ValueError("bpe_accounting: the PackedKV holds no elements")
    k_logical, v_logical = packed.k_codec.bits_per_value(), packed.v_codec.bits_per_value()
    k_storage = 8 * packed.k.nbytes / nk if nk else 0.0
    v_storage = 8 * packed.v.nbytes / nv if nv else 0.0
    storage = 8 * packed.nbytes / (nk + nv)
    return {
        "k_codec": packed.k.codec,
        "v_codec": packed.v.codec,
        "k_logical_bits": k_logical,
        "v_logical_bits": v_logical,
        "logical_bits": (k_logical * nk + v_logical * nv) / (nk + nv),
        "k_storage_bits": k_storage,
        "v_storage_bits": v_storage,
        "storage_bits": storage,
        "nbytes": packed.nbytes,
        "fp16_nbytes": (nk + nv) * FP16_BITS // 8,
        "ratio_to_fp16": storage / FP16_BITS,
    }
