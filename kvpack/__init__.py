"""kvpack: compress the key/value cache of transformer language models."""

from kvpack.codec import Codec, Packed, get_codec, list_codecs
from kvpack.engine import PackedKV, bpe_accounting, dequantize_kv, quantize_kv
from kvpack.packing import pack_bits, unpack_bits

__all__ = ["Codec", "Packed", "get_codec", "list_codecs", "pack_bits", "unpack_bits"]
__all__ += ["PackedKV", "bpe_accounting", "dequantize_kv", "quantize_kv"]
__version__ = "0.1.0"
