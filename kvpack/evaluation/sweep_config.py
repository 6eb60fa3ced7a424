"""The configurations of ``kvpack sweep``: `SweepConfig`, read from config files and the command line.

A config file (JSON or TOML) holds a list of configs and peer specs::

    {"configs": [{"name": "k4v3", "key": "int:4:axis=channel", "value": "e8:3", "residual": 28,
                  "sinks": 4, "skip_layers": [0], "block": 32}, {"preset": "3bit"}],
     "peers": ["quanto:4", "fp8"]}

(TOML: ``peers = [...]`` and ``[[configs]]`` tables; a bare JSON list is a list of configs.) An entry takes
``name``, ``preset`` or the `kvpack.CachePolicy` fields but ``seed`` and ``window_dtype`` (`SWEPT_FIELDS`:
``key``, ``value``, ``residual``, ``sinks``, ``skip_layers``, ``block``, ``layer_keys``, ``layer_values``,
``fp_heads``, ``pre_rope_keys``, ``head_keys``, ``head_values``, ``center_keys``). The file's sugar: a spec
``"none"`` is ``None`` (that stream, layer or head uncompressed, also where ``key``/``value`` are left out) and
``skip_layers`` may be a comma-separated string. Every entry becomes a `CachePolicy` here, so a bad spec or
field fails before the model loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from kvpack.policy import CachePolicy

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: TOML sweep files need 3.11+
    tomllib = None

_PARSE_ERRORS = (json.JSONDecodeError,) if tomllib is None else (json.JSONDecodeError, tomllib.TOMLDecodeError)

__all__ = ["CONFIG_FIELDS", "SWEPT_FIELDS", "SweepConfig", "config_from_dict", "configs_from_args", "load_config_file"]

# the sweep's --seed seeds every codec; the full-precision dtype follows the model
SWEPT_FIELDS = tuple(f.name for f in dataclasses.fields(CachePolicy) if f.name not in ("seed", "window_dtype"))
CONFIG_FIELDS = ("name", *SWEPT_FIELDS, "preset")  # what a config-file entry may hold
NO_POLICY = CachePolicy(None, None)  # what a preset or a peer config reads as (its columns before it runs)
DEFAULT_RESIDUAL, DEFAULT_SINKS = NO_POLICY.residual, NO_POLICY.sinks


@dataclass(frozen=True, init=False)
class SweepConfig:
    """One configuration of a sweep: a kvpack ``policy``, a named ``preset`` or one ``peer``.

    ``SweepConfig(name, *args, **kwargs)`` with `CachePolicy` arguments builds the policy (``key`` and ``value``
    default to ``None``: a stream without a spec is not compressed); ``SweepConfig(name, preset=...)`` and
    ``SweepConfig(name, peer=...)`` take nothing else. The policy's fields read as the config's
    (``config.key``, ``config.residual``, ...; a preset or a peer reads as ``CachePolicy(None, None)``).
    """

    name: str
    policy: CachePolicy | None
    preset: str | None
    peer: str | None

    def __init__(self, name: str, *policy_args, preset: str | None = None, peer: str | None = None, **policy_kwargs):
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty string, got {name!r}")
        if preset is not None and peer is not None:
            raise ValueError(f"config {name!r}: give a preset or a peer, not both")
        if (preset is not None or peer is not None) and (policy_args or policy_kwargs):
            raise ValueError(f"config {name!r}: a preset or a peer takes no CachePolicy arguments")
        policy = None
        if preset is None and peer is None:
            unset = {k: None for k in ("key", "value")[len(policy_args) :] if k not in policy_kwargs}
            policy = CachePolicy(*policy_args, **unset, **policy_kwargs)
        for attr, value in (("name", name), ("policy", policy), ("preset", preset), ("peer", peer)):
            object.__setattr__(self, attr, value)

    def __getattr__(self, name: str):
        if name in SWEPT_FIELDS:  # only called for names that are no attribute of the config itself
            return getattr(self.policy or NO_POLICY, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def policy_kwargs(self) -> dict:
        """The `kvpack.CachePolicy` keyword arguments of a kvpack configuration (not a preset or a peer)."""
        if self.policy is None:
            raise ValueError(f"config {self.name!r} is a preset or a peer, not a CachePolicy")
        return {f.name: getattr(self.policy, f.name) for f in dataclasses.fields(CachePolicy)}

    @property
    def kind(self) -> str:
        return "peer" if self.peer else "kvpack"


def _spec(value, what: str) -> str | None:
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        return None
    if not isinstance(value, str) or not value:
        raise TypeError(f"{what} must be a codec spec string or 'none', got {value!r}")
    return value


def _int(value, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {value!r}")
    return value


def _layers(value, what: str) -> tuple[int, ...]:
    if isinstance(value, str):
        try:
            value = [int(i) for i in value.split(",") if i.strip()]
        except ValueError:
            raise ValueError(f"{what} must be comma-separated layer indices, got {value!r}") from None
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{what} must be a list of layer indices or a comma-separated string, got {value!r}")
    return tuple(_int(i, what) for i in value)


def _per_layer(value, what: str) -> tuple[str | None, ...]:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{what} must be a list of codec specs (or 'none'/null) per layer, got {value!r}")
    return tuple(_spec(v, f"{what}[{i}]") for i, v in enumerate(value))


def _per_head(value, what: str) -> tuple:
    """``head_keys``/``head_values`` of a config entry: per layer null or a list of specs ('none'/null: 16-bit)."""
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{what} must be a list over layers of null or per-KV-head spec lists, got {value!r}")
    return tuple(None if heads is None else _per_layer(heads, f"{what}[{i}]") for i, heads in enumerate(value))


def _specs(default, per_layer) -> str:
    """``e8:4`` or, with per-layer specs, their counts: ``e8:4x25+int:8x5`` (the default fills later layers)."""
    if not per_layer:
        return str(default)
    counts: dict[str, int] = {}
    for spec in per_layer:
        counts[str(spec)] = counts.get(str(spec), 0) + 1
    text = "+".join(f"{spec}x{n}" for spec, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f"{text}(+{default})" if default is not None else text


def _name(fields: dict, policy: CachePolicy) -> str:
    """``K=e8:3 V=int:4 r=8 s=4 ...``: the entry's fields as given (skip_layers and fp_heads in its order)."""
    keys = [s for h in policy.head_keys if h is not None for s in h] or fields["layer_keys"]
    values = [s for h in policy.head_values if h is not None for s in h] or fields["layer_values"]
    name = f"K={_specs(fields['key'], keys)} V={_specs(fields['value'], values)} "
    name += f"r={fields['residual']} s={fields['sinks']}"
    name += " per-head" if any(h is not None for h in (*policy.head_keys, *policy.head_values)) else ""
    name += f" skip={','.join(map(str, fields['skip_layers']))}" if fields["skip_layers"] else ""
    name += f" fp_heads={len(fields['fp_heads'])}" if fields["fp_heads"] else ""
    name += f" block={fields['block']}" if fields["block"] is not None else ""
    name += " pre-RoPE K" if fields["pre_rope_keys"] else ""
    return name + (" centered K" if fields["center_keys"] else "")


def _policy_fields(entry: dict, where: str) -> dict:
    """The `CachePolicy` keyword arguments of a config-file entry, its sugar resolved; TypeError/ValueError naming
    the field for what the file syntax refuses (the policy checks the rest)."""
    block = entry.get("block")
    fp_heads = entry.get("fp_heads", ())
    if not isinstance(fp_heads, (list, tuple)):
        raise TypeError(f"{where}.fp_heads must be a list of [layer, kv_head] pairs, got {fp_heads!r}")
    flags = {name: entry.get(name, False) for name in ("pre_rope_keys", "center_keys")}
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise TypeError(f"{where}.{name} must be true or false, got {flag!r}")
    return {
        "key": _spec(entry.get("key"), f"{where}.key"),
        "value": _spec(entry.get("value"), f"{where}.value"),
        "residual": _int(entry.get("residual", DEFAULT_RESIDUAL), f"{where}.residual"),
        "sinks": _int(entry.get("sinks", DEFAULT_SINKS), f"{where}.sinks"),
        "skip_layers": _layers(entry.get("skip_layers", ()), f"{where}.skip_layers"),
        "block": None if block is None else _int(block, f"{where}.block", 1),
        "layer_keys": _per_layer(entry.get("layer_keys", ()), f"{where}.layer_keys"),
        "layer_values": _per_layer(entry.get("layer_values", ()), f"{where}.layer_values"),
        "fp_heads": tuple(tuple(p) if isinstance(p, (list, tuple)) else p for p in fp_heads),
        "head_keys": _per_head(entry.get("head_keys", ()), f"{where}.head_keys"),
        "head_values": _per_head(entry.get("head_values", ()), f"{where}.head_values"),
        **flags,
    }


def config_from_dict(entry: dict, where: str = "config") -> SweepConfig:
    """A `SweepConfig` from a config-file entry; ValueError/TypeError naming the bad field."""
    if not isinstance(entry, dict):
        raise TypeError(f"{where} must be a table/object with fields {CONFIG_FIELDS}, got {entry!r}")
    unknown = sorted(set(entry) - set(CONFIG_FIELDS))
    if unknown:
        raise ValueError(f"{where} has unknown fields {unknown}; allowed: {CONFIG_FIELDS}")
    if "preset" in entry:
        clash = sorted(set(entry) - {"preset", "name"})
        if clash:
            raise ValueError(f"{where}: 'preset' replaces {clash}; give one or the other")
        return _preset_config(entry["preset"], entry.get("name"), f"{where}.preset")
    if not {"key", "value", "layer_keys", "layer_values", "head_keys", "head_values"} & set(entry):
        raise ValueError(
            f"{where} needs 'key'/'value' codec specs, 'layer_keys'/'layer_values', 'head_keys'/'head_values' "
            "or 'preset'"
        )
    fields = _policy_fields(entry, where)
    policy = CachePolicy(**fields)  # a bad spec or field fails here, before the model loads
    return SweepConfig(str(entry.get("name") or _name(fields, policy)), **fields)


def load_config_file(path: str | Path) -> tuple[list[SweepConfig], list[str]]:
    """Read a JSON or TOML sweep file -> (configs, peer specs). See the module docstring for the format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep config file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(path.read_text())
        elif suffix == ".toml":
            if tomllib is None:
                raise ValueError("TOML sweep files need Python 3.11+ (tomllib); use a .json file")
            data = tomllib.loads(path.read_text())
        else:
            raise ValueError(f"sweep config file must end in .json or .toml, got {path.name!r}")
    except _PARSE_ERRORS as exc:
        raise ValueError(f"cannot parse sweep config file {path}: {exc}") from None
    if isinstance(data, list):
        data = {"configs": data}
    if not isinstance(data, dict):
        raise TypeError(f"sweep config file {path} must hold an object/table or a list of configs")
    unknown = sorted(set(data) - {"configs", "peers"})
    if unknown:
        raise ValueError(f"sweep config file {path} has unknown top-level keys {unknown}; allowed: configs, peers")
    entries, peers = data.get("configs", []), data.get("peers", [])
    if not isinstance(entries, list) or not isinstance(peers, list):
        raise TypeError(f"sweep config file {path}: 'configs' and 'peers' must be lists")
    if not all(isinstance(p, str) for p in peers):
        raise TypeError(f"sweep config file {path}: 'peers' must be a list of peer spec strings, got {peers!r}")
    configs = [config_from_dict(e, f"{path.name} configs[{i}]") for i, e in enumerate(entries)]
    return configs, list(peers)


def configs_from_args(args: argparse.Namespace) -> list[SweepConfig]:
    """All configurations of a parsed command line: config file, presets, CLI product, peers (in that order)."""
    configs, peers = [], []
    if args.config:
        configs, peers = load_config_file(args.config)
    configs += [_preset_config(p, None, "--preset") for p in args.preset or []]
    if args.key or args.value:
        keys = args.key or ["fp16"]
        values = args.value or ["fp16"]
        residuals = args.residual or [DEFAULT_RESIDUAL]
        sinks = args.sinks or [DEFAULT_SINKS]
        skips = args.skip_layers or [""]
        blocks = getattr(args, "block", None) or [None]
        for key, value, residual, sink, skip, block in itertools.product(keys, values, residuals, sinks, skips, blocks):
            entry = {"key": key, "value": value, "residual": residual, "sinks": sink, "skip_layers": skip,
                     "center_keys": bool(getattr(args, "center_keys", False))}
            configs.append(config_from_dict(entry if block is None else {**entry, "block": block}, "command line"))
    elif any((args.residual, args.sinks, args.skip_layers, getattr(args, "block", None),
              getattr(args, "center_keys", False))):  # fmt: skip
        raise ValueError("--residual/--sinks/--skip-layers/--block/--center-keys need --key and/or --value")
    if args.peers is not None:
        from kvpack.evaluation.peers import PEERS

        peers += list(PEERS) if args.peers == [] else args.peers
    configs += [_peer_config(p) for p in peers]
    if not configs:
        raise ValueError("nothing to sweep: give --key/--value, --preset, --config FILE or --peers")
    names = [c.name for c in configs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"configuration names must be unique; repeated: {duplicates}")
    return configs


def _preset_config(preset, name, what: str) -> SweepConfig:
    from kvpack.evaluation.presets import check_preset

    if not isinstance(preset, str):
        raise TypeError(f"{what} must be a preset name, got {preset!r}")
    try:
        check_preset(preset)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    return SweepConfig(str(name or f"preset {preset}"), preset=preset)


def _peer_config(spec: str) -> SweepConfig:
    from kvpack.evaluation import llamacpp
    from kvpack.evaluation.peers import available, parse_peer

    if isinstance(spec, str) and spec.startswith(llamacpp.PREFIX):  # llama.cpp's own cache types, in-forward
        name = llamacpp.parse_llamacpp(spec).name
        if not llamacpp.available():
            raise ImportError(f"peer {name!r} needs llama-cpp-python: pip install llama-cpp-python")
        return SweepConfig(f"peer {name}", peer=name)
    peer = parse_peer(spec)  # fails on a bad spec, or a missing backend package, before the model loads
    missing = available(peer.backend)
    if missing:
        raise ImportError(f"peer {peer.name!r} needs its backend package: {missing}")
    return SweepConfig(f"peer {peer.name}", peer=peer.name)
