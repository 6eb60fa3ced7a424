"""``kvpack inspect``: where a codec's error lives, per layer and per KV head, on a model's real Q, K, V.

A forward pass over windows of a text records every attention layer's post-RoPE queries, keys
and values, exactly as the model's attention function receives them (a registered transformers
attention function that records its inputs and delegates to the model's own implementation). For
each codec (or K/V pair of codecs), per layer and per KV head:

- the normalized MSE of K and of V, ``||x_hat - x||^2 / ||x||^2``, after encode+decode of the whole
  window as the cache packs it (the first ``sinks`` tokens kept exact);
- attention fidelity: ``O = softmax(Q K^T * scaling + causal mask) V`` (sliding layers: their window)
  with the original K, V against the decoded ones, with K only, V only and both decoded; its
  normalized MSE ``||O_hat - O||^2 / ||O||^2`` and the mean cosine of ``O_hat`` and ``O`` per query
  position. GQA: query head ``h`` reads KV head ``h // (q_heads / kv_heads)``; a KV head's attention
  numbers pool its query heads (NMSE: sums of squares; cosine: the mean).

And the bytes per token each codec holds for the whole model (measured from the packed tensors).
This is the per-layer attention-output analysis of KVQuant (Hooper et al., arXiv 2401.18079) and
KIVI (Liu et al., arXiv 2402.02750, which found keys need per-channel and values per-token groups),
made a tool, so that policies (which layers to skip, which stream gets more bits) follow evidence.

Named ``inspect`` inside ``kvpack.evaluation``: absolute imports keep it from shadowing the standard
library's ``inspect`` (only running this file as a script from its own folder would).
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvpack.codec import get_codec
from kvpack.evaluation.protocol import capture_qkv, roundtrip, window_starts

__all__ = [
    "ATTENTION_VARIANTS",
    "InspectResult",
    "add_arguments",
    "attention_output",
    "format_report",
    "inspect_codecs",
    "parse_codecs",
    "plot_heatmaps",
    "run",
]

ATTENTION_VARIANTS = ("k", "v", "kv")  # which of K, V is decoded in the compared attention


# ---- attention ---------------------------------------------------------------------------------


def attention_output(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, window: int | None = None
) -> torch.Tensor:
    """``softmax(q k^T * scaling + causal mask) v`` per query head: q (Hq, T, D), k/v (Hkv, T, D) -> (Hq, T, D).

    Query head ``h`` uses KV head ``h // (Hq // Hkv)`` (GQA). ``window``: each query sees its last
    ``window`` positions (itself included), as a sliding-window layer does.
    """
    group = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
    if window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
    pos = torch.arange(q.shape[-2], device=q.device)
    diff = pos[:, None] - pos[None, :]
    mask = (diff >= 0) & (diff < window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)


def _per_head_sq(x: torch.Tensor) -> torch.Tensor:
    """Sum of squares per head: (H, T, D) -> (H,) in float64."""
    return x.double().pow(2).sum(dim=(-2, -1))


def _pool_groups(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(Hq,) -> (Hkv,): sum over the query heads of each KV head's group."""
    return x.reshape(kv_heads, -1).sum(-1)


# ---- the analysis -------------------------------------------------------------------------------


@dataclass(frozen=True)
class InspectResult:
    """Per codec label, per metric: a [layer][kv head] table; bytes per token and bits as held."""

    model: str
    text: str
    ctx: int
    windows: list[int]
    sinks: int
    layers: int
    kv_heads: int
    q_heads: int
    head_dim: int
    codecs: dict[str, dict]  # label -> {"key": spec, "value": spec}
    metrics: dict[str, dict[str, list[list[float]]]]  # label -> metric -> [layer][kv head]
    storage: dict[str, dict[str, float]]  # label -> bits_k, bits_v, bytes_per_token_k/_v/total
    fp16_bytes_per_token: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self, label: str, metric: str) -> torch.Tensor:
        """One metric of one codec as a (layers, kv_heads) float64 tensor."""
        return torch.tensor(self.metrics[label][metric], dtype=torch.float64)


METRICS = ("k_nmse", "v_nmse") + tuple(f"attn_nmse_{a}" for a in ATTENTION_VARIANTS)
METRICS += tuple(f"attn_cos_{a}" for a in ATTENTION_VARIANTS)


def inspect_codecs(
    model,
    tokenizer,
    text: str | torch.Tensor,
    codecs: list[tuple[str, str]],
    ctx: int = 1024,
    windows: int = 1,
    sinks: int = 0,
    seed: int = 0,
    progress: bool = True,
    model_name: str = "",
    text_name: str = "",
) -> InspectResult:
    """Per-layer, per-KV-head codec error and attention fidelity of each ``(key_spec, value_spec)`` pair.

    ``text``: a string (tokenized) or a 1-D LongTensor of ids; ``windows`` non-overlapping windows of
    ``ctx`` tokens spread evenly through it (as `kvpack.evaluate` places them).
    """
    from kvpack.evaluation.text import tokenize

    _check_arguments(codecs, ctx, windows, sinks)
    text_cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
    built = _build_codecs(codecs, head_dim, seed)  # bad specs fail before any model work
    ids = text.long().flatten() if isinstance(text, torch.Tensor) else tokenize(tokenizer, text)
    starts = window_starts(ids.numel(), ctx, windows)

    n_layers, kv_heads = text_cfg.num_hidden_layers, text_cfg.num_key_value_heads
    q_heads = text_cfg.num_attention_heads
    zeros = lambda: torch.zeros(n_layers, kv_heads, dtype=torch.float64)
    sums = {label: {m: zeros() for m in ("k_err", "k_ref", "v_err", "v_ref")} for label in built}
    for label in built:
        for a in ATTENTION_VARIANTS:
            sums[label].update({f"o_err_{a}": zeros(), f"cos_{a}": zeros()})
    o_ref_sq = zeros()
    nbytes = {label: [0, 0] for label in built}
    bar = tqdm(total=len(starts) * n_layers, desc="inspect", unit="layer", disable=not progress)
    with torch.inference_mode():
        for start in starts:
            layers = capture_qkv(model, ids[start : start + ctx])
            if len(layers) != n_layers:
                raise ValueError(f"captured {len(layers)} attention layers, the config says {n_layers}")
            for li, layer in enumerate(layers):
                _add_layer(li, layer, built, sums, o_ref_sq, nbytes, sinks)
                bar.update(1)
    bar.close()
    tokens = len(starts) * ctx
    metrics = {label: _metrics(s, o_ref_sq, tokens * (q_heads // kv_heads)) for label, s in sums.items()}
    values = len(starts) * n_layers * kv_heads * ctx * head_dim  # per stream
    storage = {label: _storage(*nbytes[label], values, tokens) for label in built}
    return InspectResult(
        model=model_name, text=text_name, ctx=ctx, windows=starts, sinks=sinks, layers=n_layers, kv_heads=kv_heads,
        q_heads=q_heads, head_dim=head_dim,
        codecs={label: {"key": kc.spec, "value": vc.spec} for label, (kc, vc) in built.items()},
        metrics=metrics, storage=storage, fp16_bytes_per_token=float(2 * 2 * n_layers * kv_heads * head_dim),
    )  # fmt: skip


def _check_arguments(codecs: list[tuple[str, str]], ctx: int, windows: int, sinks: int) -> None:
    for name, value, low in (("ctx", ctx, 2), ("windows", windows, 1), ("sinks", sinks, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if sinks >= ctx:
        raise ValueError(f"sinks={sinks} must be smaller than ctx={ctx}")
    if not codecs:
        raise ValueError("codecs must name at least one (key_spec, value_spec) pair")


def _build_codecs(codecs: list[tuple[str, str]], head_dim: int, seed: int) -> dict[str, tuple]:
    """label (``spec`` or ``key / value``) -> the (key, value) codecs."""
    built = {}
    for key_spec, value_spec in codecs:
        label = key_spec if key_spec == value_spec else f"{key_spec} / {value_spec}"
        built[label] = (
            get_codec(key_spec, head_dim=head_dim, seed=seed),
            get_codec(value_spec, head_dim=head_dim, seed=seed),
        )
    return built


def _add_layer(li: int, layer, built: dict, sums: dict, o_ref_sq: torch.Tensor, nbytes: dict, sinks: int) -> None:
    """Add one captured layer's squared errors, attention errors and cosines, and packed bytes, to the sums."""
    kv_heads = o_ref_sq.shape[1]
    q, k, v = layer.q.float(), layer.k.float(), layer.v.float()
    o_ref = attention_output(q, k, v, layer.scaling, layer.window)
    o_ref_sq[li] += _pool_groups(_per_head_sq(o_ref), kv_heads)
    for label, (key_codec, value_codec) in built.items():
        s = sums[label]
        k_hat, k_bytes = roundtrip(key_codec, k, sinks)
        v_hat, v_bytes = roundtrip(value_codec, v, sinks)
        nbytes[label][0] += k_bytes
        nbytes[label][1] += v_bytes
        s["k_err"][li] += _per_head_sq(k_hat - k)
        s["k_ref"][li] += _per_head_sq(k)
        s["v_err"][li] += _per_head_sq(v_hat - v)
        s["v_ref"][li] += _per_head_sq(v)
        for a, (kk, vv) in zip(ATTENTION_VARIANTS, ((k_hat, v), (k, v_hat), (k_hat, v_hat))):
            o = attention_output(q, kk, vv, layer.scaling, layer.window)
            s[f"o_err_{a}"][li] += _pool_groups(_per_head_sq(o - o_ref), kv_heads)
            cos = F.cosine_similarity(o.double(), o_ref.double(), dim=-1).sum(-1)  # (Hq,)
            s[f"cos_{a}"][li] += _pool_groups(cos, kv_heads)


def _metrics(s: dict, o_ref_sq: torch.Tensor, per_head_cos: int) -> dict[str, list[list[float]]]:
    """One codec's `METRICS` tables from its sums (``per_head_cos``: cosines summed per KV head)."""
    m = {"k_nmse": s["k_err"] / s["k_ref"], "v_nmse": s["v_err"] / s["v_ref"]}
    for a in ATTENTION_VARIANTS:
        m[f"attn_nmse_{a}"] = s[f"o_err_{a}"] / o_ref_sq
        m[f"attn_cos_{a}"] = s[f"cos_{a}"] / per_head_cos
    return {name: m[name].tolist() for name in METRICS}


def _storage(k_bytes: int, v_bytes: int, values: int, tokens: int) -> dict[str, float]:
    """Bits per value and bytes per token of one codec's packed K and V (``values`` per stream)."""
    return {
        "bits_k": 8 * k_bytes / values, "bits_v": 8 * v_bytes / values,
        "bytes_per_token_k": k_bytes / tokens, "bytes_per_token_v": v_bytes / tokens,
        "bytes_per_token": (k_bytes + v_bytes) / tokens,
    }  # fmt: skip


# ---- report -------------------------------------------------------------------------------------


def _worst(t: torch.Tensor, n: int = 3) -> str:
    flat = t.flatten()
    idx = flat.topk(min(n, flat.numel())).indices
    return " ".join(f"L{int(i) // t.shape[1]}h{int(i) % t.shape[1]}" for i in idx)


def format_report(result: InspectResult, per_layer: bool = True) -> str:
    """Bytes-per-token and error summary per codec; per-layer rows (mean over KV heads) with the worst head."""
    lines = [
        f"kvpack inspect  model={result.model}  text={result.text}  ctx={result.ctx}  windows={len(result.windows)}  "
        + f"sinks={result.sinks}  layers={result.layers}  heads q/kv={result.q_heads}/{result.kv_heads}  "
        + f"head_dim={result.head_dim}",
        "",
        "storage (measured from the packed tensors; fp16 K+V holds "
        + f"{result.fp16_bytes_per_token:.0f} bytes per token for this model)",
        f"{'codec (K / V)':40}{'bits K':>8}{'bits V':>8}{'B/tok K':>10}{'B/tok V':>10}{'B/tok':>10}{'x fp16':>8}",
    ]
    for label, st in result.storage.items():
        lines.append(
            f"{label[:39]:40}{st['bits_k']:8.3f}{st['bits_v']:8.3f}{st['bytes_per_token_k']:10.0f}"
            f"{st['bytes_per_token_v']:10.0f}{st['bytes_per_token']:10.0f}"
            f"{result.fp16_bytes_per_token / st['bytes_per_token']:8.2f}"
        )
    lines += [
        "",
        "error (mean over layers x KV heads); attention NMSE/cos with K only, V only, both decoded; worst: by attn NMSE K+V",
        f"{'codec (K / V)':40}{'K nmse':>9}{'V nmse':>9}{'att K':>9}{'att V':>9}{'att KV':>9}{'cos KV':>10}  worst",
    ]
    for label in result.metrics:
        t = {m: result.table(label, m) for m in METRICS}
        lines.append(
            f"{label[:39]:40}{t['k_nmse'].mean():9.2e}{t['v_nmse'].mean():9.2e}{t['attn_nmse_k'].mean():9.2e}"
            f"{t['attn_nmse_v'].mean():9.2e}{t['attn_nmse_kv'].mean():9.2e}{t['attn_cos_kv'].mean():10.6f}"
            f"  {_worst(t['attn_nmse_kv'])}"
        )
    if per_layer:
        for label in result.metrics:
            t = {m: result.table(label, m) for m in METRICS}
            lines += ["", f"per layer: {label}  (mean over KV heads; worst head by attn NMSE K+V)"]
            lines.append(
                f"{'layer':>5}{'K nmse':>10}{'V nmse':>10}{'att K':>10}{'att V':>10}{'att KV':>10}  worst head"
            )
            for li in range(result.layers):
                worst = int(t["attn_nmse_kv"][li].argmax())
                lines.append(
                    f"{li:5d}{t['k_nmse'][li].mean():10.2e}{t['v_nmse'][li].mean():10.2e}"
                    f"{t['attn_nmse_k'][li].mean():10.2e}{t['attn_nmse_v'][li].mean():10.2e}"
                    f"{t['attn_nmse_kv'][li].mean():10.2e}  h{worst} ({t['attn_nmse_kv'][li, worst]:.2e})"
                )
    return "\n".join(lines)


PANELS = (
    ("k_nmse", "K normalized MSE"),
    ("v_nmse", "V normalized MSE"),
    ("attn_nmse_k", "attention output NMSE, K decoded"),
    ("attn_nmse_v", "attention output NMSE, V decoded"),
    ("attn_nmse_kv", "attention output NMSE, K and V decoded"),
)


def plot_heatmaps(result: InspectResult, path: str | Path) -> Path:
    """One panel per metric: layers (x) by codec and KV head (rows); log colour, shared across codecs, 3 decades."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    labels = list(result.metrics)
    rows = len(labels) * result.kv_heads
    fig, axes = plt.subplots(
        len(PANELS), 1, figsize=(2.5 + 0.28 * result.layers, len(PANELS) * (0.9 + 0.17 * rows)), constrained_layout=True
    )
    for ax, (metric, title) in zip(axes, PANELS):
        grid = torch.cat([result.table(label, metric).T for label in labels])  # (codecs * kv_heads, layers)
        # three decades below the worst cell: lossless codecs (~1e-8) would otherwise flatten the lossy ones
        top = max(float(grid.max()), 1e-12)
        grid = grid.clamp_min(top * 1e-3)
        im = ax.imshow(grid.numpy(), aspect="auto", cmap="magma", norm=LogNorm(vmin=top * 1e-3, vmax=top))
        ax.set_yticks(range(rows), [f"{lab[:32]}  h{h}" for lab in labels for h in range(result.kv_heads)], fontsize=6)
        for i in range(1, len(labels)):
            ax.axhline(i * result.kv_heads - 0.5, color="white", lw=1)
        ax.set_xticks(range(result.layers), [str(i) for i in range(result.layers)], fontsize=6)
        ax.set_xlabel("layer", fontsize=7)
        ax.set_title(title, fontsize=8)
        fig.colorbar(im, ax=ax, pad=0.01)
    fig.suptitle(f"kvpack inspect: {result.model}, {result.text}, ctx {result.ctx} x {len(result.windows)}", fontsize=9)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- command line -------------------------------------------------------------------------------


def parse_codecs(text: str) -> list[tuple[str, str]]:
    """``"int:4,int:2:axis=channel/int:2,turbo_mse:3"`` -> ``[(key, value), ...]``.

    Entries are separated by ``,`` or ``;``; a piece ``name=value`` without ``:`` continues the
    options of the previous spec (``int:4:axis=channel,group=32``); ``K/V`` gives K and V their own codec.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"--codecs must be comma-separated codec specs, got {text!r}")
    entries: list[str] = []
    for piece in (p.strip() for p in re.split(r"[,;]", text)):
        if not piece:
            continue
        if "=" in piece and ":" not in piece and "/" not in piece:
            if not entries:
                raise ValueError(f"--codecs: option {piece!r} comes before any codec spec")
            entries[-1] += "," + piece
        else:
            entries.append(piece)
    pairs = []
    for entry in entries:
        key, sep, value = entry.partition("/")
        if sep and (not key or not value or "/" in value):
            raise ValueError(f"--codecs: {entry!r} must be 'SPEC' or 'KEY_SPEC/VALUE_SPEC'")
        pairs.append((key, value if sep else key))
    return pairs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kvpack.cli import output_file
    from kvpack.evaluation.eval_cli import MODEL_HELP, TEXT_HELP

    parser.add_argument("--model", default="smollm2", help=MODEL_HELP)
    parser.add_argument("--text", default=None, help=TEXT_HELP)
    parser.add_argument(
        "--codecs", default="int:4:axis=channel/int:4,int:2:axis=channel/int:2,turbo_mse:3,turbo_mse:4",
        help="comma-separated specs; KEY/VALUE gives each stream its own codec",
    )  # fmt: skip
    parser.add_argument("--ctx", type=int, default=1024, help="tokens per window")
    parser.add_argument("--windows", type=int, default=1, help="windows of ctx tokens, evenly spread over the text")
    parser.add_argument("--sinks", type=int, default=0, help="first tokens of each window kept exact (16-bit)")
    parser.add_argument("--seed", type=int, default=0, help="codec seed")
    parser.add_argument("--json", default=None, metavar="OUT", type=output_file, help="write the result as JSON to OUT")
    parser.add_argument(
        "--plot", default=None, metavar="PNG", type=output_file, help="write the layer x head heatmaps to PNG"
    )
    parser.add_argument("--no-per-layer", action="store_true", help="print only the summaries")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from kvpack.evaluation.models import load
    from kvpack.evaluation.text import load_text, text_label

    pairs = parse_codecs(args.codecs)
    for key_spec, value_spec in pairs:  # fail on a bad spec before loading the model
        get_codec(key_spec, head_dim=64), get_codec(value_spec, head_dim=64)
    raw = load_text(args.text)
    model, tokenizer = load(args.model)
    result = inspect_codecs(
        model, tokenizer, raw, pairs, ctx=args.ctx, windows=args.windows, sinks=args.sinks, seed=args.seed,
        progress=not args.no_progress, model_name=str(args.model), text_name=text_label(args.text),
    )  # fmt: skip
    print(format_report(result, per_layer=not args.no_per_layer))
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {plot_heatmaps(result, args.plot)}")
    return 0
