"""kvpack: compress the key/value cache of transformer language models."""

from kvpack.codec import Codec, Packed, get_codec, list_codecs
from kvpack.engine import PackedKV, bpe_accounting, dequantize_kv, quantize_kv
from kvpack.ops.packing import pack_bits, unpack_bits
from kvpack.policy import CachePolicy, load_policy, save_policy

__all__ = ["Codec", "Packed", "get_codec", "list_codecs", "pack_bits", "unpack_bits"]
__all__ += ["PackedKV", "bpe_accounting", "dequantize_kv", "quantize_kv"]
__all__ += ["CachePolicy", "EvalResult", "KVPackCache", "evaluate"]
__all__ += ["load_cache", "save_cache"]
__all__ += ["PagedKVPackCache", "StaticKVPackCache", "use_paged_attention"]
__all__ += ["GraphDecoder", "fuse_projections", "graph_generate"]
__all__ += ["load_policy", "save_policy"]
__version__ = "0.1.0"

# imported on first use: these pull in transformers (~3 s), which `import kvpack` should not pay for
_LAZY = {
    "KVPackCache": "kvpack.hf.cache",
    "PagedKVPackCache": "kvpack.hf.paged_cache",
    "StaticKVPackCache": "kvpack.hf.static_cache",
    "use_paged_attention": "kvpack.hf.attention",
    "GraphDecoder": "kvpack.hf.graph_generate",
    "graph_generate": "kvpack.hf.graph_generate",
    "fuse_projections": "kvpack.hf.fuse",
    "load_cache": "kvpack.hf.persist",
    "save_cache": "kvpack.hf.persist",
    "EvalResult": "kvpack.evaluation.evaluate",
    "evaluate": "kvpack.evaluation.evaluate",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "attention":  # kvpack.kernels.attention.decode: the packed-cache decode kernel (Triton on CUDA)
        import importlib

        return importlib.import_module("kvpack.kernels.attention")
    raise AttributeError(f"module 'kvpack' has no attribute {name!r}")
