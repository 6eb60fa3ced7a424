"""kvpack: compress the key/value cache of transformer language models."""

from kvpack.codec import Codec, Packed, get_codec, list_codecs
from kvpack.packing import pack_bits, unpack_bits

__all__ = ["Codec", "Packed", "get_codec", "list_codecs", "pack_bits", "unpack_bits"]
__version__ = "0.1.0"
