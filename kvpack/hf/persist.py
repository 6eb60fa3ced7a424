"""Save and load a packed `KVPackCache`, so that a long prompt's cache is computed once and reused.

One safetensors file (never pickle): every tensor a layer holds (sinks, the packed chunks' tensors,
the residual window, beam-order indices) under ``layers.<i>.<part>``, and a JSON header in the
safetensors metadata with the format version, the model fingerprint (a name plus the layer count,
KV heads, head_dim and attention kinds), the policy, each layer's state and one SHA-256 over the rest
of the header and all tensor bytes (format version 2), so an edited header fails like a flipped data
bit. A save writes a temporary file beside the target, fsyncs it and replaces the target with it; a
leftover of a killed save is removed by the next save or load of that path.

Loading checks everything before building the cache (the checks: `kvpack.hf.persist_checks`), and raises
``ValueError`` naming the field for a corrupt, truncated or mismatched file (another model, policy, codec or
format version): first the header's structure (every field present, of its type, nothing else, nesting
bounded), then the checksum, then every field against the tensors it describes and against what the saved policy makes
of each layer (codec specs, shapes against the model's KV heads and head_dim, dtypes, beam order,
sinks, block and window sizes, contiguous chunk starts ending at ``cumulative_length``, the same
``cumulative_length`` in every layer, no tensor the header does not describe), so a header edited and
re-checksummed is refused too unless it describes another valid cache of the same tensors (known
case: ``pre_rope_keys`` flipped under ``window_dtype=torch.float32``, where the key dtype is float32
either way). The bytes loaded are the bytes saved, so attention over a loaded cache equals the original.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kvpack.codec import Packed
from kvpack.hf.cache import KVPackCache, KVPackLayer, _Chunk, layer_kinds
from kvpack.hf.persist_checks import DTYPES, check_order, check_packed, check_parts, check_positions, check_structure
from kvpack.policy import CachePolicy, policy_from_dict, policy_to_dict

__all__ = ["FORMAT", "FORMAT_VERSION", "load_cache", "model_fingerprint", "save_cache"]

FORMAT = "kvpack-cache"
FORMAT_VERSION = 2  # 2: the checksum covers the header too
_HEADER_KEY = "kvpack"


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
    if config is None or not hasattr(config, "num_hidden_layers") and not hasattr(config, "get_text_config"):
        raise TypeError(f"save_cache needs config= (the model's transformers config, model.config), got {config!r}")
    path = _check_path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"cannot save a cache to {str(path)!r}: the directory {str(path.parent)!r} does not exist (or is a file)"
        )
    try:
        fingerprint = model_fingerprint(config, model_id)
    except AttributeError as exc:
        raise TypeError(f"save_cache needs config= (the model's transformers config, model.config): {exc}") from None
    tensors: dict[str, torch.Tensor] = {}
    if any(type(layer) is not KVPackLayer for layer in cache.layers):
        raise NotImplementedError("save_cache takes KVPackCache layers; PagedKVPackCache's paged layers hold pages")
    layers = [_layer_state(layer, f"layers.{i}.", tensors) for i, layer in enumerate(cache.layers)]
    # own, contiguous CPU copies: safetensors refuses shared storage, and the digest reads bytes
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": fingerprint,
        "policy": policy_to_dict(cache.policy),
        "layers": layers,
    }
    header["sha256"] = _digest(tensors, header)
    # write a temporary file beside the target, then replace it: a killed save leaves the old file whole
    tmp = _temp_path(path)
    try:
        save_file(tensors, str(tmp), metadata={_HEADER_KEY: json.dumps(header)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _layer_state(layer: KVPackLayer, prefix: str, tensors: dict[str, torch.Tensor]) -> dict:
    """One layer's header state; its tensors go into ``tensors`` under ``prefix``."""
    if not layer.is_initialized:
        return {"initialized": False}
    for part in ("sink_keys", "sink_values", "keys", "values"):
        tensors[prefix + part] = getattr(layer, part)
    if layer.key_reference is not None:
        tensors[prefix + "key_reference"] = layer.key_reference
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
    return {
        "initialized": True,
        "cumulative_length": layer.cumulative_length,
        "dtype": str(layer.dtype),
        "held_dtype": str(layer.held_dtype),
        "chunks": chunks,
        "key_reference": layer.key_reference is not None,
    }


def _check_path(path) -> Path:
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise TypeError(f"path must be a file path (str or os.PathLike), got {path!r}")
    return Path(path)


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
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{str(path)!r}: the kvpack header is not valid JSON (corrupt?): {exc}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{str(path)!r}: the kvpack header must be a JSON object, got {type(header).__name__}")  # noqa: TRY004
    if header.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} has format {header.get('format')!r}, expected {FORMAT!r}")
    if header.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} is kvpack cache format version {header.get('version')!r}; this kvpack reads version "
            f"{FORMAT_VERSION} only"
        )
    check_structure(header)  # bounded, typed: the digest and every later step can read it safely
    if _digest(tensors, header) != header.get("sha256"):
        raise ValueError(f"{str(path)!r}: header or tensor bytes do not match the saved checksum (corrupt file)")
    return header, tensors


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
    equal the saved ones; the model fingerprint must always match ``config``. Every header field is
    checked against the tensors it describes and against what the saved policy makes of each layer
    (codec specs, block, sinks, window, token positions); any mismatch raises ``ValueError`` naming it.
    """
    if config is None or not hasattr(config, "num_hidden_layers") and not hasattr(config, "get_text_config"):
        raise TypeError(f"load_cache needs config= (the model's transformers config), got {config!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must name a torch device ('cpu', 'cuda:0'...), got {device!r}") from None
    if device.type == "meta":
        raise ValueError("device must hold the loaded tensors; 'meta' holds none")
    path = _check_path(path)
    _temp_path(path).unlink(missing_ok=True)  # a killed save's leftover
    header, tensors = _read(path)
    try:
        return _build(header, tensors, config, policy, model_id, device)
    except ValueError as exc:
        raise ValueError(f"{str(path)!r}: {exc}") from None
    except _UNEXPECTED as exc:  # last line of defence: the fields were checked above
        raise ValueError(
            f"{str(path)!r}: malformed header field model or policy ({type(exc).__name__}: {exc})"
        ) from None


_UNEXPECTED = (KeyError, IndexError, AttributeError, TypeError, RecursionError)


def _build(header: dict, tensors: dict, config, policy, model_id, device: torch.device) -> KVPackCache:
    saved_model, here = header["model"], model_fingerprint(config, model_id)
    for key in ("num_layers", "num_kv_heads", "head_dim", "layer_kinds"):
        if saved_model[key] != here[key]:
            raise ValueError(f"holds a cache of another model: {key} {saved_model[key]!r} there, {here[key]!r} here")
    if model_id is not None and saved_model["model_id"] != model_id:
        raise ValueError(f"holds a cache of model {saved_model['model_id']!r}, not {model_id!r}")
    saved_policy = policy_from_dict(header["policy"], "header field policy")
    if policy is not None and policy != saved_policy:
        raise ValueError(f"was saved under policy {saved_policy}, not {policy}")
    cache = KVPackCache(config=config, policy=saved_policy)
    if len(header["layers"]) != len(cache.layers):
        raise ValueError(f"header field layers has {len(header['layers'])} layers, the model {len(cache.layers)}")
    used: set[str] = set()
    for i, (layer, state) in enumerate(zip(cache.layers, header["layers"])):
        if state["initialized"]:
            try:
                used |= _restore_layer(layer, state, tensors, i, saved_model, device)
            except _UNEXPECTED as exc:  # last line of defence, as in load_cache
                raise ValueError(f"malformed header field layers[{i}] ({type(exc).__name__}: {exc})") from None
    if set(tensors) - used:
        raise ValueError(f"holds tensors the header does not describe: {sorted(set(tensors) - used)[:5]}")
    held = [layer for layer in cache.layers if layer.is_initialized]
    for name, get in (("cumulative_length", lambda la: la.cumulative_length), ("batch", lambda la: la.keys.shape[0])):
        if len({get(la) for la in held}) > 1:
            raise ValueError(f"layers disagree on {name}: {[get(la) for la in held]} (every layer sees every token)")
    return cache


def _tensor(tensors: dict, name: str, used: set, device: torch.device) -> torch.Tensor:
    if name not in tensors:
        raise ValueError(f"lacks tensor {name!r} (truncated or altered?)")
    used.add(name)
    return tensors[name].to(device)


def _restore_layer(layer, state: dict, tensors: dict, i: int, model: dict, device: torch.device) -> set[str]:
    """Fill ``layer`` from its header ``state`` and tensors after checking one against the other; names used."""
    prefix, where, used = f"layers.{i}.", f"header field layers[{i}]", set()
    dtype, held = DTYPES[state["dtype"]], DTYPES[state["held_dtype"]]
    parts = {p: _tensor(tensors, prefix + p, used, device) for p in ("sink_keys", "sink_values", "keys", "values")}
    batch = check_parts(parts, held, (model["num_kv_heads"], model["head_dim"]), prefix)
    layer.lazy_initialization(parts["keys"].to(dtype), parts["values"].to(dtype))  # codecs, block from the policy
    if layer.held_dtype != held:
        raise ValueError(f"{where}.held_dtype is {held}, the policy gives {layer.held_dtype} for dtype {dtype}")
    for name, t in parts.items():
        setattr(layer, name, t)
    if state.get("key_reference", False):
        if not layer.centers_keys:
            raise ValueError(f"{where}.key_reference is true, but the policy packs this layer's keys as they are")
        ref = _tensor(tensors, prefix + "key_reference", used, device)
        want = (batch, model["num_kv_heads"], 1, model["head_dim"])
        if tuple(ref.shape) != want or ref.dtype != held or not bool(torch.isfinite(ref).all()):
            raise ValueError(f"{prefix}key_reference must be finite {held} of shape {want}, got {ref.dtype} "
                             f"{tuple(ref.shape)}")  # fmt: skip
        layer.key_reference = ref
    chunks = []
    for j, meta in enumerate(state["chunks"]):
        at = f"{where}.chunks[{j}]"
        packed = {}
        for stream, codec in (("key", layer.key_codec), ("value", layer.value_codec)):
            m, start = meta[stream], f"{prefix}chunks.{j}.{stream}."
            data = {k[len(start) :]: _tensor(tensors, k, used, device) for k in tensors if k.startswith(start)}
            try:
                packed[stream] = Packed(m["codec"], tuple(m["shape"]), DTYPES[m["dtype"]], data)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{at}.{stream}: {exc}") from None
            want = (model["num_kv_heads"], meta["tokens"], model["head_dim"])
            pre_rope = stream == "key" and layer.key_rope is not None  # `unrope` gives float32
            check_packed(codec, packed[stream], f"{at}.{stream}", want, torch.float32 if pre_rope else held)
        order = _tensor(tensors, f"{prefix}chunks.{j}.order", used, device) if meta["order"] else None
        check_order(order, packed["key"].shape[0], packed["value"].shape[0], batch, at)
        chunks.append(_Chunk(packed["key"], packed["value"], meta["tokens"], order, meta["start"]))
    check_positions(layer, chunks, state["cumulative_length"], where)
    if layer.centers_keys and (chunks or parts["keys"].shape[-2]) and layer.key_reference is None:
        raise ValueError(f"{where} holds keys packed relative to a mean key but no key_reference (truncated?)")
    layer.chunks = chunks
    layer.cumulative_length = state["cumulative_length"]
    return used
