"""`CachePolicy`: which codec compresses K and V, and which tokens and layers stay in full precision.

The shape follows KIVI (Liu et al., arXiv 2402.02750): the newest ``residual`` tokens stay in
full precision and are packed in blocks of ``block`` tokens as they age; StreamingLLM (Xiao et al.,
arXiv 2309.17453) motivates keeping the first ``sinks`` tokens (attention sinks) in full precision;
layers in ``skip_layers`` are not compressed at all; ``layer_keys``/``layer_values`` give a codec per
layer (`kvpack allocate` writes them), ``head_keys``/``head_values`` a codec per KV head of a layer
(`PerHeadCodec`; `kvpack allocate --per-head` writes them); ``fp_heads`` keeps chosen (layer, KV head)
pairs of both K and V in 16-bit (outlier heads, chosen by `kvpack.tuning.allocate.choose_outlier_heads`).
"Full precision" means 16-bit floats, as
deployed: the model dtype when it is float16/bfloat16, float16 for a float32 model (``window_dtype``
overrides), so the bits a float32 CPU evaluation reports are those a 16-bit deployment holds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvpack.codec import Codec, get_codec
from kvpack.codecs.compose import IdentityCodec, PerHeadCodec

__all__ = ["DEFAULT_BLOCK", "POLICY_FORMAT", "CachePolicy", "load_policy", "policy_bits", "save_policy"]

DEFAULT_BLOCK = 32  # tokens packed at once as the residual window ages (KIVI's group size)
POLICY_FORMAT = "kvpack-policy"  # the "format" field of a policy file (version 1)
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed
FP16_BITS = 16.0  # what a stream or head kept in 16-bit counts
WINDOW_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # float8 cannot hold a model's K/V as they are


@dataclass(frozen=True)
class CachePolicy:
    """Codec specs for K and V (``None``: keep that stream in the model dtype) and the full-precision parts.

    ``block``: tokens packed at once; ``None`` picks 32 rounded up to a multiple of both codecs'
    ``block_tokens``. ``seed``: passed to every codec (same seed, same bits). ``window_dtype``: dtype
    of the sinks, the residual window and uncompressed streams/layers (``None``: see `held_dtype`).
    ``layer_keys``/``layer_values``: per-layer specs (``None``: that layer's stream uncompressed) for
    layers ``< len``; later layers use ``key``/``value``. ``fp_heads``: ``(layer, kv_head)`` pairs (or a
    dict ``{layer: heads}``) whose K and V stay 16-bit in packed blocks too (`PerHeadCodec`).
    ``head_keys``/``head_values``: per layer (layer 0 first), ``None`` (the layer's spec applies) or a
    tuple of one spec per KV head (``None``: that head 16-bit); such a layer goes through `PerHeadCodec`,
    overriding ``layer_keys``/``key`` there. ``fp_heads`` and ``skip_layers`` still apply on top.
    ``pre_rope_keys``: pack keys with RoPE undone (KVQuant; `kvpack.hf.rope`), re-applied after decoding.
    ``center_keys``: pack a compressed key stream as ``k - mu``, ``mu`` the mean key of each (sequence, KV head)
    over the first non-sink tokens a layer stores (its prefill), held once in 16-bit and added back after
    decoding; the codec then spends its bits on what differs between keys (`kvpack.hf.cache.key_reference`).
    """

    key: str | None = "fp16"
    value: str | None = "fp16"
    residual: int = 128
    sinks: int = 4
    skip_layers: tuple[int, ...] = field(default=())
    block: int | None = None
    seed: int = 0
    window_dtype: torch.dtype | None = None
    layer_keys: tuple[str | None, ...] = field(default=())
    layer_values: tuple[str | None, ...] = field(default=())
    fp_heads: tuple[tuple[int, int], ...] = field(default=())
    pre_rope_keys: bool = False
    head_keys: tuple[tuple[str | None, ...] | None, ...] = field(default=())
    head_values: tuple[tuple[str | None, ...] | None, ...] = field(default=())
    center_keys: bool = False

    def __post_init__(self) -> None:
        for name in ("pre_rope_keys", "center_keys"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("key", "value"):
            spec = getattr(self, name)
            if spec is not None and (not isinstance(spec, str) or not spec):
                raise TypeError(f"{name} must be a codec spec string (e.g. 'int:4') or None, got {spec!r}")
        for name in ("residual", "sinks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.block is not None and (
            isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1
        ):
            raise ValueError(f"block must be a positive int or None, got {self.block!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in 0..2**63-1, got {self.seed!r}")
        try:
            skip = tuple(self.skip_layers)
        except TypeError:
            raise TypeError(f"skip_layers must be a sequence of layer indices, got {self.skip_layers!r}") from None
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in skip):
            raise ValueError(f"skip_layers must hold layer indices >= 0, got {self.skip_layers!r}")
        object.__setattr__(self, "skip_layers", tuple(sorted(set(skip))))
        if self.window_dtype is not None and (
            not isinstance(self.window_dtype, torch.dtype) or not self.window_dtype.is_floating_point
        ):
            raise TypeError(f"window_dtype must be a floating torch.dtype or None, got {self.window_dtype!r}")
        if self.window_dtype is not None and self.window_dtype not in WINDOW_DTYPES:
            raise ValueError(f"window_dtype must be one of {WINDOW_DTYPES} or None, got {self.window_dtype!r}")
        for name in ("layer_keys", "layer_values"):
            try:
                specs = tuple(getattr(self, name))
            except TypeError:
                raise TypeError(
                    f"{name} must be a sequence of codec specs or None, got {getattr(self, name)!r}"
                ) from None
            if any(s is not None and (not isinstance(s, str) or not s) for s in specs):
                raise TypeError(f"{name} must hold codec spec strings or None, got {specs!r}")
            object.__setattr__(self, name, specs)
        for name in ("head_keys", "head_values"):
            object.__setattr__(self, name, _normalize_head_specs(getattr(self, name), name))
        object.__setattr__(self, "fp_heads", _normalize_fp_heads(self.fp_heads))
        for i in range(self.num_layers_named()):  # per-head specs fix a layer's KV head count
            counts = {len(h) for h in self.head_specs(i) if h is not None}
            if len(counts) > 1:
                raise ValueError(f"head_keys[{i}] and head_values[{i}] name different numbers of KV heads")
            fp = self.heads_in_fp(i)
            if counts and fp and max(fp) >= min(counts):
                raise ValueError(f"fp_heads {fp} of layer {i} out of range for its {min(counts)} per-head specs")
        # build every spec once with a nominal head_dim so that a bad spec fails here, not mid-forward;
        # check_model() builds them again at the model's own head_dim
        for spec in self.all_specs():
            self._codec(spec, 64)

    @classmethod
    def preset(cls, name: str, model, *, calibration: bool = True, **kwargs) -> CachePolicy:
        """Preset ``name`` (``"4bit"``, ``"3bit"``, ``"2.5bit"``) derived for ``model`` (a transformers model or a
        ``(model, tokenizer)`` pair): calibrated and cached, or from its config alone (``calibration=False``).
        ``kwargs`` go to `kvpack.tuning.recipe.recipe_policy` (``text``, ``seed``, ``progress``)."""
        from kvpack.tuning.recipe import recipe_policy

        return recipe_policy(name, model, calibration=calibration, **kwargs)

    def all_specs(self) -> tuple[str, ...]:
        """Every distinct codec spec the policy names (``key``/``value``, per layer, per head), in order."""
        per_head = [s for heads in (*self.head_keys, *self.head_values) if heads is not None for s in heads]
        named = (self.key, self.value, *self.layer_keys, *self.layer_values, *per_head)
        return tuple(dict.fromkeys(s for s in named if s is not None))

    def check_model(self, num_layers: int, num_kv_heads: int, head_dim: int) -> None:
        """Raise ``ValueError`` unless the policy fits a model of this shape: every layer, KV head and
        per-head spec list it names exists, and every codec takes ``head_dim`` and the packing block."""
        bad = [i for i in self.skip_layers if i >= num_layers] + [i for i, _ in self.fp_heads if i >= num_layers]
        bad += list(range(num_layers, self.num_layers_named()))
        if bad:
            raise ValueError(
                f"skip_layers/fp_heads/layer_keys/layer_values/head_keys/head_values name layers "
                f"{sorted(set(bad))}: the model has {num_layers} layers"
            )
        bad_heads = [p for p in self.fp_heads if p[1] >= num_kv_heads]
        if bad_heads:
            raise ValueError(f"fp_heads {bad_heads} name KV heads beyond the model's {num_kv_heads}")
        bad = [i for i in range(num_layers) for h in self.head_specs(i) if h is not None and len(h) != num_kv_heads]
        if bad:
            raise ValueError(
                f"head_keys/head_values of layers {sorted(set(bad))} need {num_kv_heads} specs (the model's KV heads)"
            )
        for spec in self.all_specs():
            try:
                self._codec(spec, head_dim)
            except ValueError as exc:
                raise ValueError(f"codec {spec!r} does not fit the model's head_dim {head_dim}: {exc}") from None
        for i in range(num_layers):
            self.block_for(*self.codecs(head_dim, i, num_kv_heads))

    def num_layers_named(self) -> int:
        """Layers that ``layer_keys``/``layer_values``/``head_keys``/``head_values`` give specs for."""
        return max(len(self.layer_keys), len(self.layer_values), len(self.head_keys), len(self.head_values))

    def head_specs(self, layer_idx: int) -> tuple[tuple[str | None, ...] | None, tuple[str | None, ...] | None]:
        """Per-KV-head (key, value) specs of one layer (``None``: the layer's single spec applies)."""
        keys = self.head_keys[layer_idx] if layer_idx < len(self.head_keys) else None
        values = self.head_values[layer_idx] if layer_idx < len(self.head_values) else None
        return keys, values

    def specs(self, layer_idx: int) -> tuple[str | None, str | None]:
        """The (key, value) specs of one layer before skip_layers/fp_heads apply."""
        key = self.layer_keys[layer_idx] if layer_idx < len(self.layer_keys) else self.key
        value = self.layer_values[layer_idx] if layer_idx < len(self.layer_values) else self.value
        return key, value

    def held_specs(self, layer_idx: int, num_kv_heads: int) -> tuple[tuple[str | None, ...], tuple[str | None, ...]]:
        """Per stream (K, V), the spec each KV head of ``layer_idx`` is held with (``None``: 16-bit), after
        ``skip_layers``, ``head_keys``/``head_values`` and ``fp_heads``: what bit counts add up."""
        if layer_idx in self.skip_layers:
            return ((None,) * num_kv_heads,) * 2  # type: ignore[return-value]
        fp = self.heads_in_fp(layer_idx)
        if fp and max(fp) >= num_kv_heads:
            raise ValueError(f"fp_heads {fp} of layer {layer_idx} out of range for {num_kv_heads} KV heads")
        out = []
        for spec, heads in zip(self.specs(layer_idx), self.head_specs(layer_idx)):
            if heads is not None and len(heads) != num_kv_heads:
                raise ValueError(f"layer {layer_idx} has {len(heads)} per-head specs for {num_kv_heads} KV heads")
            heads = (spec,) * num_kv_heads if heads is None else heads
            out.append(tuple(None if h in fp else s for h, s in enumerate(heads)))
        return tuple(out)  # type: ignore[return-value]

    def heads_in_fp(self, layer_idx: int) -> tuple[int, ...]:
        """KV heads of ``layer_idx`` kept in 16-bit."""
        return tuple(h for layer, h in self.fp_heads if layer == layer_idx)

    def codecs(
        self, head_dim: int, layer_idx: int | None = None, num_kv_heads: int | None = None
    ) -> tuple[Codec | IdentityCodec | PerHeadCodec, Codec | IdentityCodec | PerHeadCodec]:
        """The (key, value) codecs of one layer of ``num_kv_heads`` KV heads (``layer_idx=None``: the policy's
        ``key``/``value``), built from `held_specs`: identity where every head stays 16-bit, the codec where all
        heads share one spec, else a `PerHeadCodec` (``None`` at the 16-bit heads)."""
        if layer_idx is None:
            return tuple(
                IdentityCodec(head_dim) if s is None else self._codec(s, head_dim) for s in (self.key, self.value)
            )
        if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1:
            raise ValueError(f"num_kv_heads must be a positive int for a layer's codecs, got {num_kv_heads!r}")
        out = []
        for heads in self.held_specs(layer_idx, num_kv_heads):
            if all(s is None for s in heads):
                out.append(IdentityCodec(head_dim))
            elif len(set(heads)) == 1:
                out.append(self._codec(heads[0], head_dim))
            else:
                out.append(
                    PerHeadCodec(tuple(None if s is None else self._codec(s, head_dim) for s in heads), head_dim)
                )
        return tuple(out)  # type: ignore[return-value]

    def _codec(self, spec: str, head_dim: int) -> Codec:
        return get_codec(spec, head_dim=head_dim, seed=self.seed)

    def compresses_anything(self) -> bool:
        """Whether any layer's K or V goes through a codec."""
        return bool(self.all_specs())

    def held_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """Dtype of the full-precision tokens: ``window_dtype``, else the model's 16-bit dtype, else float16.

        A policy that compresses nothing (both specs ``None``) is the reference: it keeps the model dtype.
        """
        if self.window_dtype is not None:
            return self.window_dtype
        if not self.compresses_anything():
            return model_dtype
        return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.float16

    def block_for(self, key_codec: Codec | IdentityCodec, value_codec: Codec | IdentityCodec) -> int:
        """Tokens per packed block: ``block`` if given (must be a multiple of both codecs' block_tokens)."""
        unit = math.lcm(int(key_codec.block_tokens), int(value_codec.block_tokens))
        if self.block is None:
            return unit * math.ceil(DEFAULT_BLOCK / unit)
        if self.block % unit:
            raise ValueError(f"block={self.block} must be a multiple of the codecs' block_tokens ({unit})")
        return self.block


def _normalize_head_specs(value, name: str) -> tuple[tuple[str | None, ...] | None, ...]:
    """``head_keys``/``head_values`` (JSON lists too) -> a tuple over layers of ``None`` or per-head spec tuples."""
    if isinstance(value, (str, dict)):
        raise TypeError(f"{name} must be a sequence over layers of None or per-KV-head spec sequences, got {value!r}")
    try:
        layers = tuple(value)
    except TypeError:
        raise TypeError(
            f"{name} must be a sequence over layers of None or per-KV-head spec sequences, got {value!r}"
        ) from None
    out = []
    for i, heads in enumerate(layers):
        if heads is None:
            out.append(None)
            continue
        if isinstance(heads, (str, dict)) or not hasattr(heads, "__iter__"):
            raise TypeError(f"{name}[{i}] must be None or a sequence of per-KV-head codec specs, got {heads!r}")
        heads = tuple(heads)
        if not heads:
            raise ValueError(f"{name}[{i}] must name at least one KV head (None: the layer's spec applies)")
        if any(s is not None and (not isinstance(s, str) or not s) for s in heads):
            raise TypeError(f"{name}[{i}] must hold codec spec strings or None (16-bit), got {heads!r}")
        out.append(heads)
    return tuple(out)


def _normalize_fp_heads(fp_heads) -> tuple[tuple[int, int], ...]:
    """``{layer: heads}`` or ``[(layer, head), ...]`` (JSON lists too) -> sorted unique ``((layer, head), ...)``."""
    try:
        pairs = [(layer, h) for layer, heads in fp_heads.items() for h in heads] if isinstance(fp_heads, dict) else [
            tuple(p) for p in fp_heads
        ]  # fmt: skip
    except TypeError:
        raise TypeError(f"fp_heads must be {{layer: (heads...)}} or (layer, head) pairs, got {fp_heads!r}") from None
    for p in pairs:
        if len(p) != 2 or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in p):
            raise ValueError(f"fp_heads must hold (layer, kv_head) pairs of ints >= 0, got {p!r}")
    return tuple(sorted(set(pairs)))


# ---- one serializer: CachePolicy <-> JSON-able dict, and the policy file -----------------------------------


def policy_to_dict(policy: CachePolicy) -> dict:
    """Every field of ``policy`` as JSON-able values (tuples as lists, ``window_dtype`` by name)."""
    if not isinstance(policy, CachePolicy):
        raise TypeError(f"policy must be a kvpack.CachePolicy, got {type(policy).__name__}")
    out = {}
    for f in dataclasses.fields(policy):
        value = getattr(policy, f.name)
        if f.name == "window_dtype":
            value = None if value is None else str(value).removeprefix("torch.")
        out[f.name] = json.loads(json.dumps(value))  # tuples -> lists, all the way down
    return out


def policy_from_dict(fields: dict, where: str = "policy") -> CachePolicy:
    """The `CachePolicy` that :func:`policy_to_dict` wrote; ``ValueError`` naming ``where`` for unknown or bad fields."""
    if not isinstance(fields, dict):
        raise ValueError(f"{where} must be a JSON object of CachePolicy fields, got {type(fields).__name__}")  # noqa: TRY004 (bad file content)
    known = {f.name for f in dataclasses.fields(CachePolicy)}
    if set(fields) - known:
        raise ValueError(f"{where} has unknown fields {sorted(set(fields) - known)}")
    fields = dict(fields)
    if fields.get("window_dtype") is not None:
        dtype = getattr(torch, str(fields["window_dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{where}: window_dtype {fields['window_dtype']!r} is no torch dtype")
        fields["window_dtype"] = dtype
    for name in ("skip_layers", "layer_keys", "layer_values"):
        if isinstance(fields.get(name), list):
            fields[name] = tuple(fields[name])
    try:
        return CachePolicy(**fields)
    except TypeError as exc:
        raise ValueError(f"{where} has bad fields: {exc}") from None


def _check_path(path) -> Path:
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise TypeError(f"path must be a file path (str or os.PathLike), got {path!r}")
    return Path(path)


def save_policy(policy: CachePolicy, path: str | Path, **info) -> None:
    """Write ``policy`` as a policy file (JSON), plus ``info`` (budget, measured numbers...)."""
    reserved = {"format", "version", "policy"} & set(info)
    if reserved:
        raise ValueError(f"info may not be named {sorted(reserved)}: the policy file's own fields")
    doc = {"format": POLICY_FORMAT, "version": 1, "policy": policy_to_dict(policy), **info}
    try:
        text = json.dumps(doc, indent=1) + "\n"
    except (TypeError, ValueError) as exc:
        raise TypeError(f"info must hold JSON values (numbers, strings, lists, dicts): {exc}") from None
    Path(_check_path(path)).write_text(text)


def load_policy(path: str | Path) -> CachePolicy:
    """The policy :func:`save_policy` wrote: ``KVPackCache(config, policy=load_policy(path))``."""
    path = _check_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no policy file at {str(path)!r}")
    try:
        doc = json.loads(path.read_text())
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, an int of > 4300 digits
        raise ValueError(f"policy file {str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != POLICY_FORMAT or doc.get("version") != 1:
        raise ValueError(f"{str(path)!r} is not a kvpack policy file (format {POLICY_FORMAT!r}, version 1)")
    return policy_from_dict(doc.get("policy") or {}, f"policy file {str(path)!r}")


# ---- one bit count ------------------------------------------------------------------------------------------


def layer_bits(policy: CachePolicy, layer_idx: int, num_kv_heads: int, head_dim: int) -> tuple[float, float]:
    """(K, V) bits per value of one packed token of ``layer_idx``, averaged over its KV heads (16 for 16-bit)."""
    return tuple(  # type: ignore[return-value]
        sum(FP16_BITS if s is None else policy._codec(s, head_dim).bits_per_value() for s in heads) / num_kv_heads
        for heads in policy.held_specs(layer_idx, num_kv_heads)
    )


def policy_bits(policy: CachePolicy, head_dim: int, num_layers: int, num_kv_heads: int) -> float:
    """Codec bits per value of a packed token averaged over layers, KV heads and both streams (16 for 16-bit);
    the sinks and the residual window are not in it (the cache's ``nbytes()`` counts what is held)."""
    return sum(sum(layer_bits(policy, i, num_kv_heads, head_dim)) for i in range(num_layers)) / (2 * num_layers)
