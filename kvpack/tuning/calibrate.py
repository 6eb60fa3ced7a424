"""`kvpack calibrate`: fit codebooks and bases of the `calibrated` codec to a model's real K/V/Q.

1. Calibration text kept apart from the evaluation text (:func:`calibration_ids`, below).
2. :func:`calibration_qkv`: the post-RoPE queries, keys (as the cache stores them) and values of every
   layer on those windows, through a recording attention function (the first ``skip`` tokens of
   each window, attention sinks that stay 16-bit in the cache, are left out).
3. :func:`fit_calibration`: per layer, stream and KV head, three bases (`kvpack.codecs.calibrated`):
   the Haar rotation of `turbo_mse`; for keys the query-aware whitening ``L R^T`` (``L L^T`` the
   second moment of the GQA group's queries, so that the MSE of ``k L`` is the attention-score
   error); and the PCA basis. For each basis and bit width, a Lloyd-Max codebook per coordinate of
   the normalized transformed vectors (Lloyd's algorithm, Lloyd 1982 / Max 1960, from quantiles).
4. :func:`save_calibration`: safetensors + a JSON sidecar in `calibration_dir()` under a name;
   ``calibrated:3:calib=NAME,layer=i,stream=k,basis=whiten`` loads it (:func:`calibrated_policy`
   builds the per-layer policy).

Calibration windows: `kvpack.evaluate` scores ``windows`` spans of ``ctx + n_eval`` tokens evenly spread over the text
(`kvpack.evaluation.protocol.window_starts`). Calibration (sensitivities for `kvpack allocate`,
fitted codebooks) must not see those tokens, or the evaluation would measure the fit to its own
data. :func:`calibration_ids` therefore draws its spans from the tokens that no evaluation with
the default span length (1024 + 256) and any of ``EVAL_WINDOW_COUNTS`` windows touches.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from kvpack.codecs.calibrated import BASES, FORMAT, calibration_dir
from kvpack.evaluation.protocol import capture_qkv, window_starts
from kvpack.ops.rotation import rotation_matrix
from kvpack.policy import CachePolicy

__all__ = [
    "EVAL_LENGTH",
    "EVAL_WINDOW_COUNTS",
    "calibrated_policy",
    "calibration_ids",
    "calibration_qkv",
    "calibration_starts",
    "evaluation_spans",
    "fit_calibration",
    "lloyd_max_fit",
    "save_calibration",
]

EVAL_LENGTH = 1024 + 256  # default ctx + n_eval of `kvpack eval`
EVAL_WINDOW_COUNTS = (1, 2, 4, 8, 16)


def evaluation_spans(n_tokens: int, length: int = EVAL_LENGTH, counts=EVAL_WINDOW_COUNTS) -> list[tuple[int, int]]:
    """``[start, end)`` of every evaluation window for each window count in ``counts`` that fits."""
    spans = []
    for w in counts:
        if w * length <= n_tokens:
            spans += [(s, s + length) for s in window_starts(n_tokens, length, w)]
    return sorted(spans)


def calibration_starts(n_tokens: int, length: int, count: int, avoid: list[tuple[int, int]]) -> list[int]:
    """``count`` starts of spans of ``length`` tokens that overlap no span of ``avoid``, evenly spread."""
    if count < 1 or length < 1:
        raise ValueError(f"count and length must be >= 1, got {count}, {length}")
    free, pos = [], 0
    for s in range(0, n_tokens - length + 1, length):  # a grid of candidate spans
        if all(s + length <= a or s >= b for a, b in avoid):
            free.append(s)
        pos = s
    if len(free) < count:
        raise ValueError(
            f"only {len(free)} spans of {length} tokens avoid the evaluation windows in {n_tokens} tokens "
            f"(last candidate {pos}); {count} asked: use a longer text or fewer/shorter calibration windows"
        )
    step = len(free) / count
    return [free[int(i * step + step / 2)] for i in range(count)]


def calibration_ids(ids: torch.Tensor, length: int, count: int) -> list[torch.Tensor]:
    """``count`` windows (1-D token ids, ``length`` each) of ``ids`` disjoint from the evaluation windows."""
    n = ids.numel()
    starts = calibration_starts(n, length, count, evaluation_spans(n))
    return [ids[s : s + length] for s in starts]


def calibration_qkv(
    model, windows: list[torch.Tensor], skip: int = 4
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer ``(q (q_heads, N, d), k (kv_heads, N, d), v (kv_heads, N, d))`` float32 on the CPU: the post-RoPE
    queries and keys and the values (`kvpack.evaluation.protocol.capture_qkv`) of every window's tokens after its
    first ``skip`` (N = all of them)."""
    if not windows or any(not isinstance(w, torch.Tensor) or w.dim() != 1 or w.numel() <= skip for w in windows):
        raise ValueError(f"windows must be 1-D token id tensors longer than skip={skip}")
    store: dict[int, list] = {}
    for w in windows:
        for i, layer in enumerate(capture_qkv(model, w)):
            store.setdefault(i, []).append(tuple(t[:, skip:].float().cpu() for t in (layer.q, layer.k, layer.v)))
    return [tuple(torch.cat(parts, dim=1) for parts in zip(*store[i])) for i in sorted(store)]


def lloyd_max_fit(samples: torch.Tensor, levels: int, iters: int = 100) -> torch.Tensor:
    """Sorted Lloyd-Max levels ``(C, levels)`` float64 for each row of ``samples`` ``(C, N)`` (squared error),
    from the ``(i + 1/2) / levels`` quantiles; a level left without samples keeps its place."""
    if not isinstance(samples, torch.Tensor) or samples.dim() != 2 or samples.shape[1] < levels:
        raise ValueError(
            f"samples must be (rows, N) with N >= levels={levels}, got {getattr(samples, 'shape', samples)}"
        )
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels must be an int >= 2, got {levels!r}")
    s = samples.double().contiguous()
    probs = (torch.arange(levels, dtype=torch.float64) + 0.5) / levels
    centers = torch.quantile(s, probs, dim=1).T.contiguous()
    ones = torch.ones_like(s)
    for _ in range(iters):
        edges = ((centers[:, 1:] + centers[:, :-1]) / 2).contiguous()
        idx = torch.searchsorted(edges, s)
        sums = torch.zeros_like(centers).scatter_add_(1, idx, s)
        counts = torch.zeros_like(centers).scatter_add_(1, idx, ones)
        centers = torch.where(counts > 0, sums / counts.clamp_min(1), centers).sort(dim=1).values
    return centers


def _bases(q: torch.Tensor, x: torch.Tensor, stream: str, seed: int) -> dict[str, torch.Tensor]:
    """float64 ``(kv_heads, d, d)`` bases ``M`` (vectors are coded as ``x M``) of one layer and stream."""
    heads, _, d = x.shape
    rot_t = rotation_matrix(d, seed, dtype=torch.float64).T  # rotate() computes x @ R.T
    out = {"rotation": rot_t.expand(heads, d, d).clone()}
    xd = x.double()
    second = xd.transpose(1, 2) @ xd / xd.shape[1]
    eigvecs = torch.linalg.eigh(second).eigenvectors
    out["pca"] = eigvecs.flip(-1)  # largest variance first
    if stream == "k":
        group = q.shape[0] // heads  # GQA: query heads h*group ... (h+1)*group - 1 read KV head h
        qd = q.double().reshape(heads, group * q.shape[1], d)
        sigma = qd.transpose(1, 2) @ qd / qd.shape[1]
        ridge = 1e-6 * sigma.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * torch.eye(d, dtype=torch.float64)
        chol = torch.linalg.cholesky(sigma + ridge)
        out["whiten"] = chol @ rot_t  # ||(k - k^) L||^2 = (k - k^) Sigma (k - k^)^T, the score error over queries
    return out


def fit_calibration(
    qkv: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], bits: tuple[int, ...] = (1, 2, 3, 4), seed: int = 0,
    progress: bool = True,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """The tensors of a calibration: ``layer{i}.{k|v}.{basis}.basis`` ``(kv_heads, d, d)`` and
    ``layer{i}.{k|v}.{basis}.codebook{b}`` ``(kv_heads, d, 2^b)`` float32 (no ``whiten`` for values)."""
    if any(isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 4 for b in bits):
        raise ValueError(f"bits must be ints in 1..4, got {bits!r}")
    tensors = {}
    for layer, (q, k, v) in enumerate(tqdm(qkv, desc="fit", disable=not progress)):
        for stream, x in (("k", k), ("v", v)):
            heads, n, d = x.shape
            for basis, m in _bases(q, x, stream, seed).items():
                z = x.double() @ m
                unit = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-30)
                rows = unit.transpose(1, 2).reshape(heads * d, n)
                tensors[f"layer{layer}.{stream}.{basis}.basis"] = m.float().contiguous()
                for b in bits:
                    levels = lloyd_max_fit(rows, 1 << b).reshape(heads, d, 1 << b)
                    tensors[f"layer{layer}.{stream}.{basis}.codebook{b}"] = levels.float().contiguous()
    return tensors


def save_calibration(
    name: str, tensors: dict[str, torch.Tensor], meta: dict, directory: str | Path | None = None
) -> Path:
    """Write ``NAME.safetensors`` and ``NAME.json`` in ``directory`` (default `calibration_dir()`); returns the former."""
    if not isinstance(name, str) or not name or any(c in name for c in ":,=/\\"):
        raise ValueError(f"calibration name must be a non-empty str without ':,=/\\', got {name!r}")
    folder = Path(directory) if directory is not None else calibration_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.safetensors"
    save_file(tensors, str(path))
    (folder / f"{name}.json").write_text(
        json.dumps({"format": FORMAT, "version": 1, "name": name, **meta}, indent=1) + "\n"
    )
    return path


def calibrated_policy(
    calib: str, num_layers: int, key_bits: int | None = 3, value_bits: int | None = 3, key_basis: str = "whiten",
    value_basis: str = "rotation", **policy_fields,
) -> CachePolicy:  # fmt: skip
    """A `CachePolicy` whose layer ``i`` codes K and V with ``calibrated:b:calib=...,layer=i,...`` (``None`` bits:
    that stream uncompressed)."""

    def specs(bits, stream, basis):
        if bits is None:
            return (None,) * num_layers
        return tuple(
            f"calibrated:{bits}:calib={calib},layer={i},stream={stream},basis={basis}" for i in range(num_layers)
        )

    return CachePolicy(None, None, layer_keys=specs(key_bits, "k", key_basis),
                       layer_values=specs(value_bits, "v", value_basis), **policy_fields)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kvpack.cli import output_dir, output_file
    from kvpack.evaluation.eval_cli import MODEL_HELP, TEXT_HELP

    parser.add_argument("--name", required=True, help="calibration name (files NAME.safetensors + NAME.json)")
    parser.add_argument("--model", default="smollm2", help=MODEL_HELP)
    parser.add_argument("--text", default=None, help=TEXT_HELP + "; its calibration spans avoid the eval windows")
    parser.add_argument("--windows", type=int, default=2, help="calibration windows")
    parser.add_argument("--ctx", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--bits", type=int, nargs="+", default=[1, 2, 3, 4], help="bit widths to fit codebooks for")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Haar rotation (turbo_mse's default: 0)")
    parser.add_argument(
        "--dir", default=None, type=output_dir, help="where to write (default $KVPACK_CALIBRATIONS or ~/.cache/...)"
    )
    parser.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda)")
    parser.add_argument("--evaluate-windows", type=int, default=0,
                        help="then compare each basis with turbo_mse at equal bits (kvpack.evaluate, ctx 1024, "
                        "n_eval 256) on N windows, K-only and V-only")  # fmt: skip
    parser.add_argument("--eval-bits", type=int, nargs="+", default=[3], help="bit widths to compare at")
    parser.add_argument(
        "--policies", default=None, type=output_dir, help="folder to write the compared calibrated policies to"
    )
    parser.add_argument("--results", default=None, type=output_file, help="JSON file for the comparison")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from kvpack.evaluation.models import load
    from kvpack.evaluation.text import load_text, tokenize

    text = load_text(args.text)  # a bad text fails before the model loads
    model, tokenizer = load(args.model, device=args.device)
    config = model.config
    ids = tokenize(tokenizer, text)
    windows = calibration_ids(ids, args.ctx, args.windows)
    qkv = calibration_qkv(model, windows)
    tensors = fit_calibration(qkv, tuple(args.bits), args.seed, progress=not args.no_progress)
    head_dim = qkv[0][1].shape[-1]
    meta = {"model": args.model, "text": str(args.text), "windows": args.windows, "ctx": args.ctx, "skip": 4,
            "seed": args.seed, "bits": list(args.bits), "bases": list(BASES), "head_dim": head_dim,
            "num_kv_heads": qkv[0][1].shape[0], "num_q_heads": qkv[0][0].shape[0], "num_layers": len(qkv),
            "tokens": qkv[0][1].shape[1]}  # fmt: skip
    path = save_calibration(args.name, tensors, meta, args.dir)
    print(f"calibration {args.name!r}: {len(qkv)} layers, {meta['tokens']} tokens per head -> {path}")
    if args.evaluate_windows:
        calib = str(path.with_suffix("")) if args.dir is not None else args.name
        rows = compare_calibrated(model, tokenizer, ids, calib, config.num_hidden_layers, args)
        if args.results:
            Path(args.results).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def compare_calibrated(model, tokenizer, ids, calib: str, num_layers: int, args) -> list[dict]:
    """K-only and V-only snapshot evaluations of turbo_mse:b and of each calibrated basis at b bits."""
    from kvpack.evaluation.evaluate import evaluate
    from kvpack.hf.cache import KVPackCache
    from kvpack.policy import save_policy

    memo: dict = {}
    rows = []
    for bits in args.eval_bits:
        configs = {
            ("k", "turbo_mse"): CachePolicy(f"turbo_mse:{bits}", None),
            ("v", "turbo_mse"): CachePolicy(None, f"turbo_mse:{bits}"),
        }
        for basis in BASES:
            configs[("k", basis)] = calibrated_policy(calib, num_layers, bits, None, key_basis=basis)
            if basis != "whiten":
                configs[("v", basis)] = calibrated_policy(calib, num_layers, None, bits, value_basis=basis)
        for (stream, label), policy in configs.items():
            result = evaluate(model=(model, tokenizer), text=ids, ctx=1024, n_eval=256, windows=args.evaluate_windows,
                              protocol="snapshot",
                              cache_factory=lambda config, p=policy: KVPackCache(config, policy=p),
                              reference_memo=memo, progress=not args.no_progress)  # fmt: skip
            row = {"bits": bits, "stream": stream, "codec": label, "delta_ppl_pct": result.delta_ppl_pct,
                   "delta_ppl_pct_std": result.delta_ppl_pct_std, "top1": result.top1, "kl": result.kl,
                   "kl_std": result.kl_std, "bits_k": result.bits_k, "bits_v": result.bits_v}  # fmt: skip
            rows.append(row)
            print(f"{bits} bits  {stream.upper()} only  {label:<10} delta-ppl {row['delta_ppl_pct']:+.3f}% "
                  f"(+-{row['delta_ppl_pct_std']:.3f})  top1 {row['top1']:.4f}  KL {row['kl']:.5f}  "
                  f"bits K/V {row['bits_k']:.3f}/{row['bits_v']:.3f}")  # fmt: skip
            if args.policies and label != "turbo_mse":
                Path(args.policies).mkdir(parents=True, exist_ok=True)
                save_policy(policy, Path(args.policies) / f"calibrated-{stream}-{label}-{bits}bit.json")
    return rows
