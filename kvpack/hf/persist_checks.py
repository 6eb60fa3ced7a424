"""The checks a saved `KVPackCache` passes before `kvpack.hf.persist.load_cache` builds it.

Two steps, both raising ``ValueError`` naming the header field or tensor: `check_structure` reads the JSON header
alone (every field present, of its type, nothing else, nesting bounded; before the checksum is computed over it),
then `check_parts`, `check_packed`, `check_order` and `check_positions` hold each layer's header fields against
its tensors and against what the saved policy makes of the layer (codec specs, shapes, dtypes, beam order, sinks,
block, window and token positions).
"""

from __future__ import annotations

import torch

from kvpack.codec import Packed

__all__ = ["DTYPES", "check_order", "check_packed", "check_parts", "check_positions", "check_structure"]

DTYPES = {str(dt): dt for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}

# ---- the header's structure: every field present, of its type, nothing else ---------------------------------

_TOP = {"format": str, "version": int, "model": dict, "policy": dict, "layers": list, "sha256": str}
_MODEL = {"model_id": str, "num_layers": int, "num_kv_heads": int, "head_dim": int, "layer_kinds": list}
_LAYER = {"initialized": bool, "cumulative_length": int, "dtype": str, "held_dtype": str, "chunks": list}
_LAYER_OPTIONAL = {"key_reference": bool}  # written since center_keys; files before it have none
_CHUNK = {"tokens": int, "start": int, "key": dict, "value": dict, "order": bool}
_PACKED = {"codec": str, "shape": list, "dtype": str}


def _fields(obj, kinds: dict, where: str, optional: dict | None = None) -> dict:
    """``obj`` as a dict of exactly the keys of ``kinds`` (and any of ``optional``), each of its type (``int``
    excludes bool); else ValueError."""
    if not isinstance(obj, dict):
        raise ValueError(f"header field {where} must be a JSON object, got {type(obj).__name__}")  # noqa: TRY004
    optional = optional or {}
    missing, extra = sorted(set(kinds) - set(obj)), sorted(set(obj) - set(kinds) - set(optional))
    if missing or extra:
        raise ValueError(f"header field {where}: missing fields {missing}, unknown fields {extra}")
    for key, kind in {**kinds, **optional}.items():
        if key in obj:
            _typed(obj[key], kind, f"{where}.{key}")
    return obj


def _typed(value, kind: type, where: str):
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"header field {where} must be {kind.__name__}, got {type(value).__name__}")
    if kind is int and value < 0:
        raise ValueError(f"header field {where} must be >= 0, got {value}")
    return value


def check_structure(header: dict) -> None:
    _fields(header, _TOP, "header")
    _fields(header["model"], _MODEL, "model")
    for j, kind in enumerate(header["model"]["layer_kinds"]):
        if kind is not None:
            _typed(kind, int, f"model.layer_kinds[{j}]")
    _check_depth(header["policy"], "policy", 3)  # field -> list -> list (head specs, fp_heads): never deeper
    for i, state in enumerate(header["layers"]):
        where = f"layers[{i}]"
        if not isinstance(state, dict) or not isinstance(state.get("initialized"), bool):
            raise ValueError(f"header field {where} must be an object with a bool 'initialized'")  # noqa: TRY004
        if not state["initialized"]:
            _fields(state, {"initialized": bool}, where)
            continue
        _fields(state, _LAYER, where, _LAYER_OPTIONAL)
        for name in ("dtype", "held_dtype"):
            if state[name] not in DTYPES:
                raise ValueError(f"header field {where}.{name} must be one of {sorted(DTYPES)}, got {state[name]!r}")
        for j, chunk in enumerate(state["chunks"]):
            _fields(chunk, _CHUNK, f"{where}.chunks[{j}]")
            for stream in ("key", "value"):
                m = _fields(chunk[stream], _PACKED, f"{where}.chunks[{j}].{stream}")
                for k, n in enumerate(m["shape"]):
                    _typed(n, int, f"{where}.chunks[{j}].{stream}.shape[{k}]")
                if m["dtype"] not in DTYPES:
                    raise ValueError(f"header field {where}.chunks[{j}].{stream}.dtype is {m['dtype']!r}")


def _check_depth(value, where: str, limit: int) -> None:
    """Refuse JSON nested more than ``limit`` containers below ``value`` (walked without recursion)."""
    stack = [(value, where, 0)]
    while stack:
        v, at, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > limit:
                raise ValueError(f"header field {at} nests deeper than a policy field can")
            items = v.items() if isinstance(v, dict) else enumerate(v)
            stack.extend((x, f"{at}[{k!r}]" if isinstance(v, dict) else f"{at}[{k}]", depth + 1) for k, x in items)


# ---- a layer's fields against its tensors and its policy ----------------------------------------------------


def check_parts(parts: dict, held: torch.dtype, heads_dim: tuple[int, int], prefix: str) -> int:
    """Sinks and window: ``(B, H, n, D)`` of the held dtype and the model's H and D, K and V alike; returns B."""
    batch = parts["keys"].shape[0] if parts["keys"].dim() == 4 else -1
    for name, t in parts.items():
        if t.dim() != 4 or t.dtype != held or t.shape[0] != batch or (t.shape[1], t.shape[3]) != heads_dim:
            raise ValueError(
                f"tensor {prefix}{name} is {t.dtype} {tuple(t.shape)}, expected {held} (B, H, n, D) with "
                f"(H, D) = {heads_dim} and the batch of {prefix}keys"
            )
    for a, b in (("sink_keys", "sink_values"), ("keys", "values")):
        if parts[a].shape != parts[b].shape:
            raise ValueError(f"tensors {prefix}{a} {tuple(parts[a].shape)} and {prefix}{b} differ in shape")
    return batch


def check_packed(codec, packed: Packed, where: str, heads_tokens_dim: tuple[int, int, int], dtype) -> None:
    """A chunk's `Packed`: the codec the policy gives this layer, ``(B, H, tokens, D)``, ``dtype``, its tensors."""
    if packed.codec != codec.spec:
        raise ValueError(f"{where}.codec is {packed.codec!r}; the saved policy gives this layer {codec.spec!r}")
    if len(packed.shape) != 4 or packed.shape[1:] != heads_tokens_dim or packed.dtype != dtype:
        raise ValueError(
            f"{where}: shape {packed.shape} {packed.dtype}, expected (B, H, tokens, D) with (H, tokens, D) = "
            f"{heads_tokens_dim} and dtype {dtype}"
        )
    try:
        codec.check_packed(packed)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: the chunk's tensors do not match it: {exc}") from None


def check_order(order, key_batch: int, value_batch: int, batch: int, where: str) -> None:
    """Beam order: int64 ``(batch,)`` rows of the packed batch; without one, the packed batch is the layer's."""
    if order is None:
        if key_batch != batch or value_batch != batch:
            raise ValueError(f"{where}: packed batch {key_batch}/{value_batch}, the layer's is {batch}")
        return
    if order.dtype != torch.int64 or tuple(order.shape) != (batch,) or key_batch != value_batch:
        raise ValueError(f"{where}.order: tensor {order.dtype} {tuple(order.shape)}, expected int64 ({batch},)")
    if batch and (int(order.min()) < 0 or int(order.max()) >= key_batch):
        raise ValueError(f"{where}.order holds rows outside 0..{key_batch - 1}")


def check_positions(layer, chunks: list, cumulative: int, where: str) -> None:
    """Token positions: sinks, then contiguous whole-block chunks, then the window, ending at ``cumulative_length``."""
    sinks, window = layer.sink_keys.shape[-2], layer.keys.shape[-2]
    if sinks > layer.sinks or ((chunks or window) and sinks != layer.sinks):
        raise ValueError(f"{where}: {sinks} sink tokens held, the policy keeps {layer.sinks} (then packs)")
    if window > layer.residual + layer.block - 1:
        raise ValueError(
            f"{where}: {window} window tokens held, the policy packs beyond {layer.residual + layer.block - 1}"
        )
    pos = chunks[0].start if chunks else cumulative - window
    if not layer.is_sliding and pos != sinks:
        raise ValueError(f"{where}: the packed tokens start at {pos}, right after {sinks} sink tokens expected")
    for j, chunk in enumerate(chunks):
        if chunk.tokens < 1 or chunk.tokens % layer.block:
            raise ValueError(f"{where}.chunks[{j}].tokens is {chunk.tokens}, not a positive multiple of {layer.block}")
        if chunk.start != pos:
            raise ValueError(f"{where}.chunks[{j}].start is {chunk.start}, the previous chunk ends at {pos}")
        pos += chunk.tokens
    if pos + window != cumulative or pos < 0:
        raise ValueError(f"{where}.cumulative_length is {cumulative}; the tokens held end at {pos + window}")
    if layer.is_sliding:
        excess = pos - (chunks[0].start if chunks else pos) + window - (layer.sliding_window - 1)
        if excess >= (chunks[0].tokens if chunks else 1):
            raise ValueError(
                f"{where}: holds {excess} tokens more than its sliding window {layer.sliding_window} keeps"
            )
