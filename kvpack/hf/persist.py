"""Save and load a packed `KVPackCache`, so that a long prompt's cache is computed once and reused.

One safetensors file (never pickle): every tensor a layer holds (sinks, the packed chunks' tensors,
the residual window, beam-order indices) under ``layers.<i>.<part>``, and a JSON header in the
safetensors metadata with the format version, the model fingerprint (a name plus the layer count,
KV heads, head_dim and attention kinds), the policy, each layer's state and one SHA-256 over the rest
of the header and all tensor bytes (format version 2), so an edited header fails like a flipped data
bit. A save writes a temporary file beside the target, fsyncs it and replaces the target with it; a
leftover of a killed save is removed by the next save or load of that path. Loading checks all of it before building the cache, so a corrupt, truncated or mismatched
file (another model, policy, codec or format version) raises ``ValueError`` saying which; the bytes
loaded are the bytes saved, so attention over a loaded cache equals the original exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kvpack.codec import Packed
from kvpack.hf.cache import KVPackCache, KVPackLayer, _Chunk, layer_kinds
from kvpack.policy import CachePolicy

__all__ = ["FORMAT", "FORMAT_VERSION", "load_cache", "model_fingerprint", "save_cache"]

FORMAT = "kvpack-cache"
FORMAT_VERSION = 2  # 2: the checksum covers the header too
_HEADER_KEY = "kvpack"
_DTYPES = {str(dt): dt for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def model_fingerprint(config, model_id: str | None = None) -> dict:
    """What a saved cache must match: a name and the cache-shaping fields of the model's config."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    return {
        "model_id": model_id if model_id is not None else str(getattr(config, "name_or_path", "") or ""),
        "num_layers": int(text.num_hidden_layers),
        "num_kv_heads": int(getattr(text, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(text, "head_dim", None) or text.hidden_size // heads),
        "layer_kinds": layer_kinds(config),
    }


def _digest(tensors: dict[str, torch.Tensor], header: dict) -> str:
    """SHA-256 of the header (all but its ``sha256`` field) and of every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in header.items() if k != "sha256"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _packed_meta(p: Packed) -> dict:
    return {"codec": p.codec, "shape": list(p.shape), "dtype": str(p.dtype)}


def save_cache(cache: KVPackCache, path: str | Path, *, model_id: str | None = None, config=None) -> None:
    """Write ``cache`` to ``path`` (safetensors). ``config``: the model's config, for the fingerprint;
    ``model_id``: the model's name (default: ``config.name_or_path``)."""
    if not isinstance(cache, KVPackCache):
        raise TypeError(f"cache must be a kvpack.KVPackCache, got {type(cache).__name__}")
    if config is None:
        raise TypeError("save_cache needs config= (the model's config), to record which model made the cache")
    tensors: dict[str, torch.Tensor] = {}
    if any(type(layer) is not KVPackLayer for layer in cache.layers):
        raise NotImplementedError("save_cache takes KVPackCache layers; PagedKVPackCache's paged layers hold pages")
    layers = []
    for i, layer in enumerate(cache.layers):
        if not layer.is_initialized:
            layers.append({"initialized": False})
            continue
        prefix = f"layers.{i}."
        for part in ("sink_keys", "sink_values", "keys", "values"):
            tensors[prefix + part] = getattr(layer, part)
        chunks = []
        for j, chunk in enumerate(layer.chunks):
            for stream, packed in (("key", chunk.key), ("value", chunk.value)):
                for name, t in packed.data.items():
                    tensors[f"{prefix}chunks.{j}.{stream}.{name}"] = t
            if chunk.order is not None:
                tensors[f"{prefix}chunks.{j}.order"] = chunk.order
            chunks.append(
                {
                    "tokens": chunk.tokens,
                    "start": chunk.start,
                    "key": _packed_meta(chunk.key),
                    "value": _packed_meta(chunk.value),
                    "order": chunk.order is not None,
                }
            )
        layers.append(
            {
                "initialized": True,
                "cumulative_length": layer.cumulative_length,
                "dtype": str(layer.dtype),
                "held_dtype": str(layer.held_dtype),
                "chunks": chunks,
            }
        )
    # own, contiguous CPU copies: safetensors refuses shared storage, and the digest reads bytes
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": model_fingerprint(config, model_id),
        "policy": {**dataclasses.asdict(cache.policy), "skip_layers": list(cache.policy.skip_layers)},
        "layers": layers,
    }
    header["sha256"] = _digest(tensors, header)
    # write a temporary file beside the target, then replace it: a killed save leaves the old file whole
    path = Path(path)
    tmp = _temp_path(path)
    try:
        save_file(tensors, str(tmp), metadata={_HEADER_KEY: json.dumps(header)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _temp_path(path: Path) -> Path:
    """The one temporary name a save of ``path`` uses (a leftover of a killed save is removed by the next)."""
    return path.with_name(f".{path.name}.kvpack-tmp")


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    if not path.is_file():
        raise FileNotFoundError(f"no saved cache at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{str(path)!r} is not a readable safetensors file (corrupt or truncated?): {exc}") from None
    if _HEADER_KEY not in meta:
        raise ValueError(f"{str(path)!r} is a safetensors file but not a kvpack cache (no {_HEADER_KEY!r} header)")
    try:
        header = json.loads(meta[_HEADER_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(path)!r}: the kvpack header is not valid JSON (corrupt?): {exc}") from None
    if header.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} has format {header.get('format')!r}, expected {FORMAT!r}")
    if header.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} is kvpack cache format version {header.get('version')!r}; this kvpack reads version "
            f"{FORMAT_VERSION} only"
        )
    if _digest(tensors, header) != header.get("sha256"):
        raise ValueError(f"{str(path)!r}: header or tensor bytes do not match the saved checksum (corrupt file)")
    return header, tensors


def _check_packed(codec, packed: Packed, where: str) -> None:
    if packed.codec != codec.spec:
        raise ValueError(f"{where} was packed by codec {packed.codec!r}; this policy uses {codec.spec!r}")
    if hasattr(codec, "check_packed"):
        codec.check_packed(packed)
    elif set(packed.data) != {"values"} or tuple(packed.data["values"].shape) != packed.shape:
        raise ValueError(f"{where}: unpacked chunk tensors do not match shape {packed.shape}")


def load_cache(
    path: str | Path,
    *,
    config,
    policy: CachePolicy | None = None,
    model_id: str | None = None,
    device: str | torch.device = "cpu",
) -> KVPackCache:
    """A `KVPackCache` for ``config``'s model holding what :func:`save_cache` wrote to ``path``.

    ``policy`` (default: the saved one) and ``model_id`` (default: not checked), when given, must
    equal the saved ones; the model fingerprint must always match ``config``.
    """
    if config is None or not hasattr(config, "num_hidden_layers") and not hasattr(config, "get_text_config"):
        raise TypeError(f"load_cache needs config= (the model's transformers config), got {config!r}")
    path = Path(path)
    _temp_path(path).unlink(missing_ok=True)  # a killed save's leftover
    header, tensors = _read(path)
    saved_model, here = header["model"], model_fingerprint(config, model_id)
    for key in ("num_layers", "num_kv_heads", "head_dim", "layer_kinds"):
        if saved_model.get(key) != here[key]:
            raise ValueError(
                f"{str(path)!r} holds a cache of another model: {key} {saved_model.get(key)!r} there, {here[key]!r} here"
            )
    if model_id is not None and saved_model.get("model_id") != model_id:
        raise ValueError(f"{str(path)!r} holds a cache of model {saved_model.get('model_id')!r}, not {model_id!r}")
    saved_policy = CachePolicy(**{**header["policy"], "skip_layers": tuple(header["policy"]["skip_layers"])})
    if policy is not None and policy != saved_policy:
        raise ValueError(f"{str(path)!r} was saved under policy {saved_policy}, not {policy}")
    cache = KVPackCache(config=config, policy=saved_policy)
    if len(header["layers"]) != len(cache.layers):
        raise ValueError(f"{str(path)!r} has {len(header['layers'])} layers, the model {len(cache.layers)}")
    try:
        for i, (layer, state) in enumerate(zip(cache.layers, header["layers"])):
            if state["initialized"]:
                _restore_layer(layer, state, tensors, f"layers.{i}.", torch.device(device))
    except KeyError as exc:
        raise ValueError(f"{str(path)!r} lacks tensor or field {exc} (truncated or altered?)") from None
    return cache


def _restore_layer(layer, state: dict, tensors: dict[str, torch.Tensor], prefix: str, device: torch.device) -> None:
    dtype, held = _DTYPES[state["dtype"]], _DTYPES[state["held_dtype"]]
    parts = {p: tensors[prefix + p].to(device) for p in ("sink_keys", "sink_values", "keys", "values")}
    if any(t.dtype != held for t in parts.values()):
        raise ValueError(f"{prefix}: full-precision tensors are not {held} as recorded")
    # codecs, block, model dtype, held dtype, device
    layer.lazy_initialization(parts["keys"].to(dtype), parts["values"].to(dtype))
    if layer.held_dtype != held:
        raise ValueError(f"{prefix}: held dtype {held} recorded, the policy gives {layer.held_dtype}")
    for name, t in parts.items():
        setattr(layer, name, t)
    chunks = []
    for j, meta in enumerate(state["chunks"]):
        packed = {}
        for stream, codec in (("key", layer.key_codec), ("value", layer.value_codec)):
            m = meta[stream]
            start = f"{prefix}chunks.{j}.{stream}."
            data = {k[len(start) :]: t.to(device) for k, t in tensors.items() if k.startswith(start)}
            packed[stream] = Packed(m["codec"], tuple(m["shape"]), _DTYPES[m["dtype"]], data)
            _check_packed(codec, packed[stream], f"{start[:-1]}")
        order = tensors[f"{prefix}chunks.{j}.order"].to(device) if meta["order"] else None
        if packed["key"].shape[-2] != meta["tokens"]:
            raise ValueError(f"{prefix}chunks.{j}: {meta['tokens']} tokens recorded, shape {packed['key'].shape}")
        chunks.append(_Chunk(packed["key"], packed["value"], meta["tokens"], order, meta.get("start", 0)))
    layer.chunks = chunks
    layer.cumulative_length = int(state["cumulative_length"])
