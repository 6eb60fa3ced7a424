"""`kvpack validate`: the rate-distortion table a user needs to pick a codec.

For each codec and bit width at each head_dim: exact bits per value (from the codec's layout, and
measured from the bytes held), MSE on random unit vectors, its ratio to the Shannon bound
``4^-R`` at the same total rate ``R = bits_per_value`` (the distortion-rate function of a unit
vector, Zandieh et al. 2025, Thm. 3), inner-product error of ``<q, k_hat>`` against ``<q, k>``
(mean, its z-score over the pairs, slope and correlation) and CPU encode/decode throughput.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from kvpack.codec import CODECS, get_codec, list_codecs

# variants beyond "every registered codec at every allowed bit width"
EXTRA_SPECS = ("int:4:axis=channel,group=32", "int:2:axis=channel,group=32", "turbo_mse:3:rotation=hadamard")


@dataclass(frozen=True)
class CodecReport:
    spec: str
    head_dim: int
    bits_per_value: float
    measured_bits: float
    mse: float
    shannon_ratio: float
    ip_mean_error: float
    ip_z: float
    ip_slope: float
    ip_corr: float
    encode_mvals_s: float
    decode_mvals_s: float


def default_specs() -> list[str]:
    list_codecs()
    specs = []
    for name, cls in sorted(CODECS.items()):
        specs += [f"{name}:{b}" for b in cls.allowed_bits] or [name]
    return specs + [s for s in EXTRA_SPECS if s.split(":")[0] in CODECS]


def random_unit_vectors(n: int, dim: int, seed: int) -> torch.Tensor:
    """``n`` unit vectors uniform on the sphere in R^dim, float32 (n, dim)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    return x / x.norm(dim=-1, keepdim=True)


def inner_product_error_z(spec: str, head_dim: int = 128, seeds: int = 250, per_seed: int = 400) -> float:
    """Mean of ``<q, decode(k)> - <q, k>`` over ``seeds * per_seed`` pairs, in standard errors.

    Unbiasedness holds over the codec's random draw (rotation, sketch), not for one fixed seed (a fixed
    Gaussian sketch has a small bias of its own), so every block of pairs gets its own seed and the
    standard error is that of the per-seed means. ``q = k + noise`` correlates with ``k``: against an
    independent zero-mean ``q`` every estimator, biased or not, would have zero mean error.
    """
    k = random_unit_vectors(seeds * per_seed, head_dim, seed=5).reshape(seeds, per_seed, head_dim)
    noise = torch.randn(seeds, per_seed, head_dim, generator=torch.Generator().manual_seed(6))
    q = k + noise / math.sqrt(head_dim)
    means = []
    for i in range(seeds):
        codec = get_codec(spec, head_dim=head_dim, seed=1000 + i)
        k_hat = codec.decode(codec.encode(k[i]))
        means.append((q[i] * (k_hat - k[i])).sum(-1).double().mean())
    means = torch.stack(means)
    return (means.mean() / (means.std() / math.sqrt(seeds))).item()


def inner_product_stats(k: torch.Tensor, k_hat: torch.Tensor, q: torch.Tensor) -> dict[str, float]:
    """Error of ``<q_i, k_hat_i>`` as an estimate of ``<q_i, k_i>`` over the pairs ``i``.

    ``z`` is the mean error over its standard error (|z| < 3: no detectable bias); ``slope`` is the
    least-squares slope of estimate on truth (1 for an unbiased estimator; < 1 means shrinkage).
    """
    true = (q * k).sum(-1).double()
    est = (q * k_hat).sum(-1).double()
    err = est - true
    n = err.numel()
    stderr = err.std() / math.sqrt(n)
    tc = true - true.mean()
    slope = (tc * (est - est.mean())).sum() / (tc * tc).sum()
    corr = torch.corrcoef(torch.stack((true, est)))[0, 1]
    return {
        "ip_mean_error": float(err.mean()),
        "ip_z": float(err.mean() / stderr) if stderr > 0 else 0.0,
        "ip_slope": float(slope),
        "ip_corr": float(corr),
    }


def _throughput(fn, values: int, min_seconds: float = 0.2) -> float:
    """Million values per second of ``fn`` (median of repeats, at least ``min_seconds`` of work)."""
    fn()  # warm-up: codebooks, rotation matrices, allocator
    times = []
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return values / times[len(times) // 2] / 1e6


def measure(spec: str, head_dim: int, n: int = 20000, seed: int = 0, speed: bool = True) -> CodecReport:
    """Measure one codec at one head_dim on ``n`` random unit vectors and queries ``q = k + N(0, I)``."""
    codec = get_codec(spec, head_dim=head_dim, seed=seed)
    k = random_unit_vectors(n, head_dim, seed + 1)
    # queries correlated with the keys: against zero-mean queries independent of k every estimator,
    # shrinking or not, has zero mean error, and the z column could not show a bias
    q = k + torch.randn(n, head_dim, generator=torch.Generator().manual_seed(seed + 2))
    packed = codec.encode(k)
    k_hat = codec.decode(packed)
    mse = float(((k_hat - k) ** 2).sum(-1).mean())
    bpv = codec.bits_per_value()
    # speed on a cache-shaped block: 32 heads x 256 tokens
    block = torch.randn(32, 256, head_dim, generator=torch.Generator().manual_seed(seed + 3)).to(torch.float16)
    block_packed = codec.encode(block)
    enc = _throughput(lambda: codec.encode(block), block.numel()) if speed else float("nan")
    dec = _throughput(lambda: codec.decode(block_packed), block.numel()) if speed else float("nan")
    return CodecReport(
        spec=codec.spec,
        head_dim=head_dim,
        bits_per_value=bpv,
        measured_bits=8 * packed.nbytes / k.numel(),
        mse=mse,
        shannon_ratio=mse / 4.0**-bpv,
        encode_mvals_s=enc,
        decode_mvals_s=dec,
        **inner_product_stats(k, k_hat, q),
    )


def format_table(reports: list[CodecReport]) -> str:
    head = (
        f"{'codec':34} {'d':>4} {'bits/val':>8} {'MSE(unit)':>10} {'/4^-R':>7} "
        f"{'IP z':>7} {'IP slope':>8} {'IP corr':>8} {'enc Mv/s':>9} {'dec Mv/s':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in reports:
        lines.append(
            f"{r.spec:34} {r.head_dim:>4} {r.bits_per_value:>8.4f} {r.mse:>10.3e} {r.shannon_ratio:>7.2f} "
            f"{r.ip_z:>7.2f} {r.ip_slope:>8.4f} {r.ip_corr:>8.4f} {r.encode_mvals_s:>9.1f} {r.decode_mvals_s:>9.1f}"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kvpack.cli import output_file

    parser.add_argument("--codecs", nargs="*", help="codec specs (default: every codec at every bit width)")
    parser.add_argument("--head-dims", nargs="*", type=int, default=[64, 128], help="head dims")
    parser.add_argument("-n", "--num-vectors", type=int, default=20000, help="unit vectors per codec")
    parser.add_argument("--seed", type=int, default=0, help="seed of the vectors and the codecs")
    parser.add_argument("--no-speed", action="store_true", help="skip the throughput measurement")
    parser.add_argument("--json", metavar="OUT", type=output_file, help="also write the table as JSON to OUT")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.num_vectors < 2:
        raise ValueError(f"--num-vectors must be >= 2, got {args.num_vectors}")
    specs = args.codecs or default_specs()
    jobs = [(s, d) for d in args.head_dims for s in specs]
    reports = []
    bar = tqdm(jobs, desc="validate", unit="codec", disable=getattr(args, "no_progress", False))
    for spec, d in bar:
        bar.set_postfix_str(f"{spec} d={d}")
        reports.append(measure(spec, d, n=args.num_vectors, seed=args.seed, speed=not args.no_speed))
    print(format_table(reports))
    print(
        f"\nMSE on {args.num_vectors} random unit vectors; /4^-R = MSE over the Shannon bound at R = bits/val; "
        "IP z = mean error of <q,k_hat> over its standard error (|z| < 3: unbiased); speed: CPU, "
        f"{torch.get_num_threads()} threads, fp16 blocks of 32x256 vectors."
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in reports], f, indent=1)
    return 0
