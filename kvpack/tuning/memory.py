"""`kvpack memory`: KV-cache bytes per token, in total, and the longest context that fits a GPU.

A cache policy (`kvpack.CachePolicy`) keeps the first ``sinks`` tokens and a window of
``residual`` recent tokens in fp16, and the ``skip_layers`` entirely in fp16; every other token is stored by the key / value
codec at exactly ``Codec.bits_per_value()`` bits per element (scales and norms included). The
residual window is counted as ``residual`` tokens (`KVPackCache` holds between ``residual`` and
``residual + block - 1``, packing whole blocks as they age). Weights are counted as stored (bf16 unless the config says otherwise);
activations and framework overhead are not counted.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

from kvpack.codec import get_codec, list_codecs
from kvpack.policy import CachePolicy, layer_bits

__all__ = ["ModelShape", "cache_bytes", "max_context", "memory_table", "model_shape", "parse_bytes"]

FP16_BYTES = 2
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1}

# HF config.json fields of the models known by name (the parameter count follows from them)
KNOWN_CONFIGS: dict[str, dict] = {
    "smollm2": {  # HuggingFaceTB/SmolLM2-135M-Instruct
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    },
    "llama-3-8b": {  # meta-llama/Meta-Llama-3-8B
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    "llama-3-70b": {  # meta-llama/Meta-Llama-3-70B
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    "mistral-7b": {  # mistralai/Mistral-7B-v0.1
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
}

DEFAULT_CODECS = (
    "fp16",
    "fp8",
    "int:4",
    "int:3",
    "int:2",
    "turbo_mse:4",
    "turbo_mse:3",
    "turbo_mse:2",
    "e8:4",
    "e8:3",
    "e8:2",
    "e8:3/e8:2",
    "polar:3",
    "qjl",
)


@dataclass(frozen=True)
class ModelShape:
    """What the cache size depends on: layers, KV heads, head_dim; and the bytes of the weights."""

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    weight_bytes: int

    def __post_init__(self) -> None:
        for f in ("num_layers", "num_kv_heads", "head_dim"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ModelShape.{f} must be a positive int, got {v!r}")
        if self.weight_bytes < 0:
            raise ValueError(f"ModelShape.weight_bytes must be >= 0, got {self.weight_bytes}")


def _llama_param_count(cfg: dict, head_dim: int) -> int:
    """Parameters of a Llama-style decoder (attention, gated MLP, RMSNorms, embeddings)."""
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * head_dim
    per_layer = h * q * 2 + h * kv * 2 + 3 * h * cfg["intermediate_size"] + 2 * h
    embed = cfg["vocab_size"] * h * (1 if cfg.get("tie_word_embeddings", False) else 2)
    return layers * per_layer + embed + h


def shape_from_config(cfg: dict, name: str) -> ModelShape:
    """A :class:`ModelShape` from HF config.json fields (Llama-style parameter count for the weights)."""
    missing = [k for k in ("num_hidden_layers", "num_attention_heads", "hidden_size") if k not in cfg]
    if missing:
        raise ValueError(f"model config {name!r} lacks {missing}; need a decoder config.json")
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"model config {name!r}: unknown weight dtype {dtype!r}; known {sorted(DTYPE_BYTES)}")
    weights = 0
    if "intermediate_size" in cfg and "vocab_size" in cfg:
        weights = _llama_param_count(cfg, head_dim) * DTYPE_BYTES[dtype]
    return ModelShape(
        name,
        cfg["num_hidden_layers"],
        cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        int(head_dim),
        int(weights),
    )


def model_shape(model: str) -> ModelShape:
    """A model by name (``smollm2``, ``llama-3-8b``, ...) or a path to an HF config.json (or its folder)."""
    if not isinstance(model, str) or not model:
        raise TypeError(f"model must be a non-empty str, got {model!r}")
    if model.lower() in KNOWN_CONFIGS:
        return shape_from_config(KNOWN_CONFIGS[model.lower()], model.lower())
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"model {model!r} is neither a known name {sorted(KNOWN_CONFIGS)} nor a config.json path")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"model config {str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise TypeError(f"model config {str(path)!r} holds a JSON {type(cfg).__name__}, not a model config object")
    cfg = cfg.get("text_config", cfg)  # multimodal configs nest the decoder
    if not isinstance(cfg, dict):
        raise TypeError(f"model config {str(path)!r}: text_config must be an object, got {type(cfg).__name__}")
    missing = [k for k in ("num_hidden_layers", "num_attention_heads", "hidden_size") if k not in cfg]
    if missing:
        raise ValueError(f"{str(path)!r} is not a decoder config.json: it lacks {missing}")
    return shape_from_config(cfg, path.parent.name or str(path))


def policy_label(policy: CachePolicy) -> str:
    key, value = policy.key or "fp16", policy.value or "fp16"
    label = key if key == value else f"{key}/{value}"
    if any(h is not None for h in (*policy.head_keys, *policy.head_values)):
        label = f"per-head (else {label})"
    elif policy.layer_keys or policy.layer_values:
        label = f"per-layer (else {label})"
    return label + (f" +{len(policy.fp_heads)} fp16 heads" if policy.fp_heads else "")


def _layer_bits(shape: ModelShape, policy: CachePolicy) -> list[tuple[float, float]]:
    """Per layer, (K, V) bits per value of a compressed token averaged over the KV heads.

    ``skip_layers`` hold fp16, other layers their own specs (``layer_keys``/``layer_values``), with the
    KV heads of ``fp_heads`` in fp16.
    """
    policy.check_model(shape.num_layers, shape.num_kv_heads, shape.head_dim)
    return [layer_bits(policy, i, shape.num_kv_heads, shape.head_dim) for i in range(shape.num_layers)]


def _per_token_bytes(shape: ModelShape, policy: CachePolicy) -> tuple[float, float]:
    """(bytes of one fp16 token, bytes of one compressed token) over all layers and KV heads."""
    elems = shape.num_kv_heads * shape.head_dim  # per layer, per token, per stream
    packed = sum(elems * (k + v) / 8 for k, v in _layer_bits(shape, policy))
    return shape.num_layers * 2 * elems * FP16_BYTES, packed


def cache_bytes(shape: ModelShape, policy: CachePolicy, context: int, batch: int = 1) -> float:
    """Bytes of the cache of ``batch`` sequences of ``context`` tokens under ``policy``."""
    if context < 0 or batch < 1:
        raise ValueError(f"context must be >= 0 and batch >= 1, got {context}, {batch}")
    fp_tok, packed_tok = _per_token_bytes(shape, policy)
    n_fp = min(context, policy.sinks + policy.residual)
    return batch * (n_fp * fp_tok + (context - n_fp) * packed_tok)


def max_context(shape: ModelShape, policy: CachePolicy, gpu_bytes: float, batch: int = 1) -> int:
    """Longest context whose cache (``batch`` sequences) fits ``gpu_bytes`` after the weights; 0 if none."""
    budget = (gpu_bytes - shape.weight_bytes) / batch
    if budget <= 0:
        return 0
    fp_tok, packed_tok = _per_token_bytes(shape, policy)
    n_fp = policy.sinks + policy.residual
    if budget < n_fp * fp_tok:
        return int(budget // fp_tok)
    return n_fp + int((budget - n_fp * fp_tok) // packed_tok)


_UNITS = {
    "": 1e9,
    "b": 1,
    "kb": 1e3,
    "mb": 1e6,
    "gb": 1e9,
    "tb": 1e12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text: str) -> float:
    """``"80GB"`` -> 8e10, ``"80GiB"`` -> 80 * 2**30; a bare number means GB."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"memory size {text!r} must look like 80GB, 80GiB or 512MB")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def parse_pair(spec: str) -> tuple[str, str]:
    """``"e8:3/e8:2"`` -> (key spec, value spec); a single spec is used for both."""
    key, _, value = spec.partition("/")
    return key, value or key


def _available(spec: str, head_dim: int) -> bool:
    """Whether every codec of a default ``KEY[/VALUE]`` entry is registered and takes these bits."""
    known = set(list_codecs())
    try:
        return all(part.split(":")[0] in known and get_codec(part, head_dim=head_dim) for part in parse_pair(spec))
    except ValueError:
        return False


def memory_table(
    shape: ModelShape, policies: list[CachePolicy], context: int, batch: int, gpu_bytes: float
) -> list[dict]:
    rows = []
    for p in policies:
        fp_tok, packed_tok = _per_token_bytes(shape, p)
        bits = _layer_bits(shape, p)
        rows.append(
            {
                "policy": policy_label(p),
                "k_bits": sum(k for k, _ in bits) / len(bits),
                "v_bits": sum(v for _, v in bits) / len(bits),
                "bytes_per_token": packed_tok,
                "fp16_bytes_per_token": fp_tok,
                "total_bytes": cache_bytes(shape, p, context, batch),
                "max_context": max_context(shape, p, gpu_bytes, batch),
            }
        )
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help=f"a name {sorted(KNOWN_CONFIGS)} or a config.json path")
    parser.add_argument("--context", type=int, default=32768, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=1, help="sequences")
    parser.add_argument("--gpu-memory", default="80GB", help="GPU memory (80GB = 8e10 bytes, 80GiB = 80 * 2^30)")
    parser.add_argument("--weights-gb", type=float, default=None, help="override the weights' size in GB")
    parser.add_argument(
        "--codecs",
        nargs="+",
        default=None,
        help="codec specs, or KEY/VALUE pairs like e8:3/e8:2 (default: a list of the registered codecs)",
    )
    parser.add_argument("--residual", type=int, default=128, help="fp16 recent-token window")
    parser.add_argument("--sinks", type=int, default=4, help="fp16 attention-sink tokens")
    parser.add_argument("--skip-layers", type=int, nargs="*", default=(), help="layers kept entirely in fp16")
    parser.add_argument(
        "--policy", default=None, help="a policy JSON (kvpack allocate) instead of --codecs/--residual/--sinks"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    shape = model_shape(args.model)
    if args.weights_gb is not None:
        shape = ModelShape(shape.name, shape.num_layers, shape.num_kv_heads, shape.head_dim, int(args.weights_gb * 1e9))
    gpu = parse_bytes(args.gpu_memory)
    if args.policy is not None:
        if args.codecs is not None:
            raise ValueError("--policy replaces --codecs: give one or the other")
        from kvpack.policy import load_policy

        policy = load_policy(args.policy)
        fp_parts = {"residual": policy.residual, "sinks": policy.sinks, "skip_layers": policy.skip_layers}
        policies = [policy]
    else:
        specs = args.codecs if args.codecs is not None else [s for s in DEFAULT_CODECS if _available(s, shape.head_dim)]
        fp_parts = {"residual": args.residual, "sinks": args.sinks, "skip_layers": tuple(args.skip_layers)}
        policies = [CachePolicy(*parse_pair(s), **fp_parts) for s in specs]
    rows = memory_table(shape, policies, args.context, args.batch, gpu)
    if args.json:
        print(
            json.dumps(
                {
                    "model": shape.__dict__,
                    "context": args.context,
                    "batch": args.batch,
                    "gpu_bytes": gpu,
                    "residual": fp_parts["residual"],
                    "sinks": fp_parts["sinks"],
                    "skip_layers": list(fp_parts["skip_layers"]),
                    "rows": rows,
                },
                indent=2,
            )
        )
        return 0
    print(
        f"{shape.name}: {shape.num_layers} layers x {shape.num_kv_heads} KV heads x head_dim {shape.head_dim}; "
        f"weights {shape.weight_bytes / 1e9:.2f} GB; residual {fp_parts['residual']} + sinks {fp_parts['sinks']} fp16"
        + (f"; fp16 layers {list(fp_parts['skip_layers'])}" if fp_parts["skip_layers"] else "")
    )
    print(f"context {args.context} x batch {args.batch}; GPU {gpu / 1e9:.1f} GB")
    head = f"{'policy':<22} {'K bits':>7} {'V bits':>7} {'KiB/token':>10} {'vs fp16':>8} {'total GB':>9} {'max context':>12}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['policy']:<22} {r['k_bits']:>7.3f} {r['v_bits']:>7.3f} {r['bytes_per_token'] / 1024:>10.2f} "
            f"{r['fp16_bytes_per_token'] / r['bytes_per_token']:>7.2f}x {r['total_bytes'] / 1e9:>9.3f} "
            f"{r['max_context']:>12,}"
        )
    return 0
