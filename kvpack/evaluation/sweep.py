"""``kvpack sweep``: many cache configurations and the peers on the same windows -> a table and a rate-distortion plot.

Every configuration runs through `kvpack.evaluate` on the same model, text and windows; one
``reference_memo`` is shared by all of them, so the uncompressed prefill and reference logits of
each window are computed once and every configuration only pays for its own compressed pass.

Configurations come from the command line (the cartesian product of ``--key``, ``--value``,
``--residual``, ``--sinks`` and ``--skip-layers``, each taking several values), from ``--preset NAME`` and from a
config file (``--config FILE``, JSON or TOML)::

    {"configs": [{"name": "k4v3", "key": "int:4:axis=channel", "value": "e8:3", "residual": 28,
                  "sinks": 4, "skip_layers": [0], "block": 32}, {"preset": "3bit"}],
     "peers": ["quanto:4", "fp8"]}

(TOML: ``peers = [...]`` and ``[[configs]]`` tables; a bare JSON list is a list of configs.)
Entries take any of ``key``, ``value``, ``residual``, ``sinks``, ``skip_layers``, ``block``,
``layer_keys``, ``layer_values``, ``head_keys``, ``head_values`` (per layer: null or a list of per-KV-head
specs), ``fp_heads``, ``pre_rope_keys`` (`kvpack.CachePolicy` fields; the last seven go through a
`KVPackCache` ``cache_factory``, as `kvpack.evaluate` takes the plain ones only) or ``preset``. ``--peers``
adds transformers' `QuantizedCache` backends (`kvpack.evaluation.peers`; ``--peers`` alone: all of
``PEERS``), measured with their true bits.

Output: a table on stdout, ``--json``/``--csv``/``--markdown`` rows, and ``--plot`` a PNG with delta-ppl (symlog)
and top-1 agreement against the average bits per value of K and V as held (matplotlib, Agg).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: TOML sweep files need 3.11+
    tomllib = None

_PARSE_ERRORS = (json.JSONDecodeError,) if tomllib is None else (json.JSONDecodeError, tomllib.TOMLDecodeError)

__all__ = ["SweepConfig", "add_arguments", "configs_from_args", "load_config_file", "plot", "run", "run_sweep"]

CONFIG_FIELDS = (
    "name", "key", "value", "residual", "sinks", "skip_layers", "block", "layer_keys", "layer_values", "head_keys",
    "head_values", "fp_heads", "pre_rope_keys", "preset",
)  # fmt: skip
DEFAULT_RESIDUAL, DEFAULT_SINKS = 128, 4
TABLE_FIELDS = (
    "name", "bits_k", "bits_v", "bits_per_value", "ppl_ref", "ppl", "delta_ppl_pct", "delta_ppl_pct_std",
    "top1", "kl", "verdict",
)  # fmt: skip


@dataclass(frozen=True)
class SweepConfig:
    """One kvpack configuration (``preset`` set: a named preset) or one peer (``peer`` set)."""

    name: str
    key: str | None = None
    value: str | None = None
    residual: int = DEFAULT_RESIDUAL
    sinks: int = DEFAULT_SINKS
    skip_layers: tuple[int, ...] = field(default=())
    block: int | None = None
    layer_keys: tuple[str | None, ...] = field(default=())
    layer_values: tuple[str | None, ...] = field(default=())
    fp_heads: tuple[tuple[int, int], ...] = field(default=())
    preset: str | None = None
    head_keys: tuple[tuple[str | None, ...] | None, ...] = field(default=())
    head_values: tuple[tuple[str | None, ...] | None, ...] = field(default=())
    pre_rope_keys: bool = False
    peer: str | None = None

    def policy_kwargs(self) -> dict:
        """The `kvpack.CachePolicy` keyword arguments of a kvpack configuration (not a preset or a peer)."""
        return {"key": self.key, "value": self.value, "residual": self.residual, "sinks": self.sinks,
                "skip_layers": self.skip_layers, "block": self.block, "layer_keys": self.layer_keys,
                "layer_values": self.layer_values, "fp_heads": self.fp_heads, "head_keys": self.head_keys,
                "head_values": self.head_values, "pre_rope_keys": self.pre_rope_keys}  # fmt: skip

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


def _specs(default, per_layer) -> str:
    """``e8:4`` or, with per-layer specs, their counts: ``e8:4x25+int:8x5`` (the default fills later layers)."""
    if not per_layer:
        return str(default)
    counts: dict[str, int] = {}
    for spec in per_layer:
        counts[str(spec)] = counts.get(str(spec), 0) + 1
    text = "+".join(f"{spec}x{n}" for spec, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f"{text}(+{default})" if default is not None else text


def _name(
    key, value, residual, sinks, skip, block, layer_keys=(), layer_values=(), fp_heads=(), head_keys=(), head_values=()
) -> str:
    keys = [s for h in head_keys if h is not None for s in h] or layer_keys
    values = [s for h in head_values if h is not None for s in h] or layer_values
    name = f"K={_specs(key, keys)} V={_specs(value, values)} r={residual} s={sinks}"
    name += " per-head" if any(h is not None for h in (*head_keys, *head_values)) else ""
    name += f" skip={','.join(map(str, skip))}" if skip else ""
    name += f" fp_heads={len(fp_heads)}" if fp_heads else ""
    return name + (f" block={block}" if block is not None else "")


def _per_layer(value, what: str) -> tuple[str | None, ...]:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{what} must be a list of codec specs (or 'none'/null) per layer, got {value!r}")
    return tuple(_spec(v, f"{what}[{i}]") for i, v in enumerate(value))


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
    key, value = _spec(entry.get("key"), f"{where}.key"), _spec(entry.get("value"), f"{where}.value")
    residual = _int(entry.get("residual", DEFAULT_RESIDUAL), f"{where}.residual")
    sinks = _int(entry.get("sinks", DEFAULT_SINKS), f"{where}.sinks")
    skip = _layers(entry.get("skip_layers", ()), f"{where}.skip_layers")
    block = entry.get("block")
    if block is not None:
        block = _int(block, f"{where}.block", 1)
    layer_keys = _per_layer(entry.get("layer_keys", ()), f"{where}.layer_keys")
    layer_values = _per_layer(entry.get("layer_values", ()), f"{where}.layer_values")
    fp_heads = entry.get("fp_heads", ())
    if not isinstance(fp_heads, (list, tuple)):
        raise TypeError(f"{where}.fp_heads must be a list of [layer, kv_head] pairs, got {fp_heads!r}")
    fp_heads = tuple(tuple(p) if isinstance(p, (list, tuple)) else p for p in fp_heads)
    pre_rope_keys = entry.get("pre_rope_keys", False)
    if not isinstance(pre_rope_keys, bool):
        raise TypeError(f"{where}.pre_rope_keys must be true or false, got {pre_rope_keys!r}")
    from kvpack.policy import CachePolicy

    # a bad spec or field fails here, before the model loads; the policy normalizes head_keys/head_values
    policy = CachePolicy(key, value, residual, sinks, skip, block, layer_keys=layer_keys, layer_values=layer_values,
                         fp_heads=fp_heads, head_keys=_per_head(entry.get("head_keys", ()), f"{where}.head_keys"),
                         head_values=_per_head(entry.get("head_values", ()), f"{where}.head_values"),
                         pre_rope_keys=pre_rope_keys)  # fmt: skip
    head_keys, head_values = policy.head_keys, policy.head_values
    name = entry.get("name") or _name(
        key, value, residual, sinks, skip, block, layer_keys, layer_values, fp_heads, head_keys, head_values
    ) + (" pre-RoPE K" if pre_rope_keys and not entry.get("name") else "")
    return SweepConfig(str(name), key, value, residual, sinks, skip, block, layer_keys, layer_values, fp_heads,
                       head_keys=head_keys, head_values=head_values, pre_rope_keys=pre_rope_keys)  # fmt: skip


def _per_head(value, what: str) -> tuple:
    """``head_keys``/``head_values`` of a config entry: per layer null or a list of specs ('none'/null: 16-bit)."""
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{what} must be a list over layers of null or per-KV-head spec lists, got {value!r}")
    return tuple(None if heads is None else _per_layer(heads, f"{what}[{i}]") for i, heads in enumerate(value))


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
            entry = {"key": key, "value": value, "residual": residual, "sinks": sink, "skip_layers": skip}
            configs.append(config_from_dict(entry if block is None else {**entry, "block": block}, "command line"))
    elif args.residual or args.sinks or args.skip_layers or getattr(args, "block", None):
        raise ValueError("--residual/--sinks/--skip-layers/--block need --key and/or --value")
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
    return SweepConfig(name=str(name or f"preset {preset}"), preset=preset)


def _peer_config(spec: str) -> SweepConfig:
    from kvpack.evaluation.peers import available, parse_peer

    peer = parse_peer(spec)  # fails on a bad spec, or a missing backend package, before the model loads
    missing = available(peer.backend)
    if missing:
        raise ImportError(f"peer {peer.name!r} needs its backend package: {missing}")
    return SweepConfig(name=f"peer {peer.name}", peer=peer.name)


def _evaluate_kwargs(config: SweepConfig) -> dict:
    if config.peer is not None:
        from kvpack.evaluation.peers import peer_factory

        return {"cache_factory": peer_factory(config.peer)}
    if config.preset is not None:
        return {"preset": config.preset}
    if (config.block is not None or config.layer_keys or config.layer_values or config.fp_heads
            or config.head_keys or config.head_values or config.pre_rope_keys):  # fmt: skip
        # evaluate() takes the plain fields only; the full policy goes through a KVPackCache factory
        from kvpack.hf.cache import KVPackCache
        from kvpack.policy import CachePolicy

        policy = CachePolicy(**config.policy_kwargs())

        def factory(model_config):
            return KVPackCache(model_config, policy=policy)

        factory.__name__ = "KVPackCache"
        return {"cache_factory": factory}
    return {"key": config.key, "value": config.value, "residual": config.residual, "sinks": config.sinks,
            "skip_layers": config.skip_layers}  # fmt: skip


def run_sweep(
    model,
    configs: list[SweepConfig],
    text=None,
    ctx: int = 1024,
    n_eval: int = 256,
    windows: int = 8,
    seed: int = 0,
    progress: bool = True,
    protocol: str = "decode",
    calibration: bool = True,
) -> list[dict]:
    """Evaluate every configuration on the same windows under ``protocol``; one row (dict) per configuration.

    Peers' own caches cannot run ``decode`` (it needs a `KVPackCache`): under ``decode`` they run ``snapshot``,
    and every row records the protocol it ran (``protocol``).

    ``model``: a ``(model, tokenizer)`` pair or a name for `kvpack.evaluation.models.load` (loaded once). A row
    holds the configuration, the `EvalResult` metrics and ``kind`` (``kvpack`` or ``peer``).
    """
    from tqdm.auto import tqdm

    from kvpack.evaluation.evaluate import evaluate

    if not configs:
        raise ValueError("configs must hold at least one SweepConfig")
    if not all(isinstance(c, SweepConfig) for c in configs):
        raise TypeError("configs must be a list of SweepConfig")
    if isinstance(model, (str, Path)):
        from kvpack.evaluation.models import load

        model = load(model)
    memo: dict = {}
    rows = []
    bar = tqdm(configs, desc="sweep", unit="config", disable=not progress)
    for config in bar:
        bar.set_postfix_str(config.name[:60])
        ran = "snapshot" if protocol == "decode" and config.peer is not None else protocol
        result = evaluate(
            model, text=text, ctx=ctx, n_eval=n_eval, windows=windows, protocol=ran, seed=seed,
            progress=progress, reference_memo=memo, **_evaluate_kwargs(config),
            **({"calibration": calibration} if config.preset is not None else {}),
        )  # fmt: skip
        row = {**asdict(config), "kind": config.kind}
        row.update({k: _jsonable(row[k]) for k in ("skip_layers", "layer_keys", "layer_values", "fp_heads", "head_keys",
                                                 "head_values")})  # fmt: skip
        metrics = result.to_dict()
        if config.preset is not None:  # what the preset stands for on this model
            row.update({k: _jsonable(v) for k, v in metrics["policy"].items() if k in row})  # the row's columns
        row.update({k: metrics[k] for k in (
            "ppl_ref", "ppl", "delta_ppl_pct", "delta_ppl_pct_std", "top1", "top1_std", "kl", "kl_std",
            "bits_k", "bits_v", "bits_per_value", "verdict", "seconds_per_window")})  # fmt: skip
        row["model"], row["text"], row["protocol"] = metrics["model"], metrics["text"], ran
        rows.append(row)
    return rows


def _jsonable(x):
    return [_jsonable(i) for i in x] if isinstance(x, (list, tuple)) else x


def format_table(rows: list[dict]) -> str:
    """The sweep as a plain-text table, sorted by bits per value."""
    width = max([len("config")] + [len(r["name"]) for r in rows])
    head = (
        f"{'config':{width}}  {'bits K':>7}{'bits V':>8}{'avg':>7}{'vs fp16':>9}{'ppl ref':>9}{'ppl':>9}"
        f"{'dppl %':>10}{'+-':>9}{'top-1':>8}{'KL':>9}  verdict"
    )
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r["bits_per_value"], r["name"])):
        lines.append(
            f"{r['name']:{width}}  {r['bits_k']:7.3f}{r['bits_v']:8.3f}{r['bits_per_value']:7.3f}"
            f"{_smaller(r['bits_per_value']):>9}{r['ppl_ref']:9.3f}"
            f"{r['ppl']:9.3f}{r['delta_ppl_pct']:+10.3f}{r['delta_ppl_pct_std']:9.3f}{100 * r['top1']:7.2f}%"
            f"{r['kl']:9.5f}  {r['verdict']}"
        )
    return "\n".join(lines)


def _smaller(bits_per_value: float) -> str:
    """``6.1x``: how many times smaller than fp16 the cache is held (16 / bits per value)."""
    return "n/a" if math.isnan(bits_per_value) or bits_per_value <= 0 else f"{16 / bits_per_value:.1f}x"


def format_markdown(rows: list[dict]) -> str:
    """The sweep as a markdown table (BENCHMARKS.md), sorted by bits per value."""
    lines = [
        "| config | bits K | bits V | bits avg | ppl ref | ppl | delta-ppl % (+- std) | top-1 | KL | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["bits_per_value"], r["name"])):
        lines.append(
            f"| `{r['name']}` | {r['bits_k']:.3f} | {r['bits_v']:.3f} | {r['bits_per_value']:.3f} | {r['ppl_ref']:.3f} "
            f"| {r['ppl']:.3f} | {r['delta_ppl_pct']:+.2f} (+-{r['delta_ppl_pct_std']:.2f}) | {100 * r['top1']:.2f}% "
            f"| {r['kl']:.5f} | {r['verdict']} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Rate-distortion PNG: delta-ppl % (symlog) and top-1 agreement against bits per value; peers as squares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, (ax_ppl, ax_top) = plt.subplots(1, 2, figsize=(13, 5.2))
    for kind, marker, color in (("kvpack", "o", "tab:blue"), ("peer", "s", "tab:red")):
        pts = [r for r in rows if r["kind"] == kind and not math.isnan(r["bits_per_value"])]
        if not pts:
            continue
        xs = [r["bits_per_value"] for r in pts]
        ax_ppl.scatter(xs, [r["delta_ppl_pct"] for r in pts], marker=marker, color=color, label=kind, zorder=3)
        ax_top.scatter(xs, [100 * r["top1"] for r in pts], marker=marker, color=color, label=kind, zorder=3)
        for r in pts:
            label = r["name"].removeprefix("peer ")
            ax_ppl.annotate(label, (r["bits_per_value"], r["delta_ppl_pct"]), fontsize=6, alpha=0.8,
                            xytext=(3, 3), textcoords="offset points")  # fmt: skip
            ax_top.annotate(label, (r["bits_per_value"], 100 * r["top1"]), fontsize=6, alpha=0.8,
                            xytext=(3, 3), textcoords="offset points")  # fmt: skip
    ax_ppl.set_yscale("symlog", linthresh=1.0)
    ax_ppl.set_xlabel("bits per value (K and V averaged, as held)")
    ax_ppl.set_ylabel("delta perplexity % (symlog)")
    ax_ppl.axhline(0, color="grey", lw=0.8)
    ax_top.set_xlabel("bits per value (K and V averaged, as held)")
    ax_top.set_ylabel("top-1 agreement with the uncompressed model %")
    for ax in (ax_ppl, ax_top):
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kvpack.cli import output_file
    from kvpack.evaluation.eval_cli import MODEL_HELP, TEXT_HELP, preset_names

    parser.add_argument("--model", default="smollm2", help=MODEL_HELP)
    parser.add_argument("--text", default=None, help=TEXT_HELP)
    parser.add_argument("--config", default=None, metavar="FILE", help="JSON/TOML file of configs (and peers)")
    parser.add_argument(
        "--key", action="extend", nargs="+", help="codec spec for K (several: the product of all lists is swept)"
    )
    parser.add_argument("--value", action="extend", nargs="+", help="codec spec for V (several)")
    parser.add_argument(
        "--residual",
        type=int,
        action="extend",
        nargs="+",
        help=f"full-precision recent tokens (several; default {DEFAULT_RESIDUAL})",
    )
    parser.add_argument("--sinks", type=int, action="extend", nargs="+",
                        help=f"full-precision first tokens (several; default {DEFAULT_SINKS})")  # fmt: skip
    parser.add_argument("--block", type=int, action="extend", nargs="+",
                        help="tokens packed at once as the residual window ages (several; default 32, 1 with "
                             "--residual 0 packs every token past the sinks)")  # fmt: skip
    parser.add_argument("--skip-layers", action="extend", nargs="+", help="comma-separated 16-bit layers (several)")
    parser.add_argument("--preset", action="extend", nargs="+", help=f"named presets (several): {preset_names()}")
    parser.add_argument("--no-calibration", action="store_true", help="presets from the model's config alone")
    parser.add_argument("--peers", nargs="*", default=None, metavar="SPEC",
                        help="transformers QuantizedCache peers, e.g. quanto:4 hqq:2 fp8 (alone: all)")  # fmt: skip
    parser.add_argument("--ctx", type=int, default=1024, help="context tokens per window")
    parser.add_argument("--n-eval", type=int, default=256, help="continuation tokens scored per window")
    parser.add_argument("--windows", type=int, default=8, help="non-overlapping windows evenly spread over the text")
    parser.add_argument("--seed", type=int, default=0, help="codec seed")
    parser.add_argument("--protocol", choices=("decode", "snapshot", "inforward"), default="decode",
                        help="decode: as generate sees the cache; snapshot: a stored context; inforward")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda)")
    parser.add_argument("--json", default=None, metavar="OUT", type=output_file, help="write setup + rows as JSON")
    parser.add_argument("--csv", default=None, metavar="OUT", type=output_file, help="write the rows as CSV")
    parser.add_argument("--markdown", default=None, metavar="OUT", type=output_file, help="write the table as markdown")
    parser.add_argument("--plot", default=None, metavar="PNG", type=output_file, help="write the rate-distortion plot")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from kvpack.evaluation.evaluate import VERDICT

    configs = configs_from_args(args)  # every config is checked before the model loads
    from kvpack.evaluation.text import load_text

    load_text(args.text)  # a bad path fails before the model loads
    from kvpack.evaluation.models import load

    model = load(args.model, device=args.device)
    started = datetime.datetime.now(datetime.UTC)
    rows = run_sweep(model, configs, text=args.text, ctx=args.ctx, n_eval=args.n_eval, windows=args.windows,
                     seed=args.seed, progress=not args.no_progress, protocol=args.protocol,
                     calibration=not args.no_calibration)  # fmt: skip
    from kvpack.evaluation.text import describe_text

    print(f"kvpack sweep  model={args.model}  ctx={args.ctx}  n_eval={args.n_eval}  windows={args.windows}  "
          f"text: {describe_text(rows[0]['text'])}")  # fmt: skip
    print(format_table(rows))
    print(f"vs fp16: times smaller than fp16 the K+V cache is held at ctx {args.ctx} (16 / avg bits, measured bytes); "
          f"verdict: {VERDICT.describe()}")  # fmt: skip
    setup = {
        "command": "kvpack " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("kvpack") else None,
        "date": started.strftime("%Y-%m-%d %H:%M UTC"), "model": args.model, "text": rows[0]["text"],
        "ctx": args.ctx, "n_eval": args.n_eval, "windows": args.windows, "protocol": args.protocol, "seed": args.seed,
        "device": args.device,
    }  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"setup": setup, "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            for r in rows:
                writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
        print(f"wrote {args.csv}")
    if args.markdown:
        Path(args.markdown).write_text(format_markdown(rows) + "\n")
        print(f"wrote {args.markdown}")
    if args.plot:
        title = f"{args.model}, {rows[0]['text']}, ctx {args.ctx}, n_eval {args.n_eval}, {args.windows} windows"
        print(f"wrote {plot(rows, args.plot, title)}")
    return 0
