"""``kvpack bench attention|encode``: speed of the Triton kernels against fp16 SDPA and a device copy (CUDA only).

``attention``: decode attention (one query token per sequence) over a packed paged cache at each
context and batch, against ``torch.nn.functional.scaled_dot_product_attention(..., enable_gqa=True)``
on the same shapes in fp16, both timed in the same run with ``triton.testing.do_bench`` (L2 flushed
before each repetition, median). Reported: time, speed-up, bytes each must read (the packed rows
plus the 16-bit window for the kernel; K and V for SDPA) and that over time as % of a large
device-to-device copy measured in the same run (bytes read + written). A CUDA-graph replay time of
the kernel is given too (no launch gaps). ``encode``: the fused encode kernel on ``tokens x kv_heads``
vectors, bytes read + written over time as % of the copy bandwidth. ``generate``: end-to-end
``model.generate`` decode tokens/s and peak memory per cache (`kvpack.bench.generate`).

Caches are filled with random codes (and valid random float16 norms/scales), never zeros; block
tables are random permutations, so the pages of a sequence are scattered as in a serving engine.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import platform

import torch

from kvpack.bench.generate import add_arguments as add_generate_arguments
from kvpack.bench.generate import int_list
from kvpack.kernels.paged import PagedCodec, paged_codec

__all__ = ["add_arguments", "decode_kernel", "graph_ms", "run"]

DEFAULT_CODECS = ("turbo_mse:4", "turbo_mse:3", "turbo_mse:2", "int:4", "int:4:rotation=hadamard")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kvpack.cli import output_file

    parser.add_argument("what", choices=("attention", "encode", "generate"), help="which kernel to time, or generate")
    parser.add_argument("--contexts", default="4096,16384,32768,131072", help="comma-separated context lengths")
    parser.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    parser.add_argument("--codecs", default=",".join(DEFAULT_CODECS), help="codec specs (same codec for K and V)")
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16, help="tokens per page")
    parser.add_argument("--window", type=int, default=132, help="16-bit tokens (sinks + residual) per sequence")
    parser.add_argument("--tokens", type=int, default=65536, help="encode: tokens per call")
    parser.add_argument("--max-gib", type=float, default=60.0, help="skip cases whose buffers exceed this")
    parser.add_argument("--json", default=None, type=output_file, help="write all numbers to this JSON file")
    add_generate_arguments(parser)


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), median of do_bench."""
    import triton.testing

    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda").random_(0, 256)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(functools.partial(dst.copy_, src), warmup=50, rep=300, return_mode="median")
    return nbytes / (ms * 1e-3)


def random_paged_cache(num_blocks: int, block_size: int, kv_heads: int, fmt: PagedCodec) -> torch.Tensor:
    """Random codes and valid random side data (float16 norm in [0.5, 2]; int: scale in [0, 0.1], zero ~ N(0, 1))."""
    cache = torch.empty(num_blocks, block_size, kv_heads, fmt.row_bytes, dtype=torch.uint8, device="cuda")
    cache.random_(0, 256)
    lead = (num_blocks, block_size, kv_heads, 1)
    if fmt.kind == "turbo_mse":
        side = torch.cat([torch.rand(lead, device="cuda") * 1.5 + 0.5, torch.zeros(lead, device="cuda")], dim=-1)
    else:
        side = torch.cat([torch.rand(lead, device="cuda") * 0.1, torch.randn(lead, device="cuda")], dim=-1)
    cache[..., fmt.code_bytes :] = side.half().view(torch.uint8)  # the 4 side bytes (turbo_mse: norm, padding)
    return cache


def paged_decode_inputs(
    batch: int,
    packed_tokens: int,
    window: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block tables (``packed_tokens`` per sequence in randomly permuted blocks), ``seq_lens``, and a random float16
    window of ``window`` tokens per sequence with its ``window_lens``: a decode step's inputs besides query and pages."""
    blocks = math.ceil(packed_tokens / block_size)
    tables = torch.randperm(batch * blocks, device="cuda", generator=generator).to(torch.int32).reshape(batch, blocks)
    seq_lens = torch.full((batch,), packed_tokens, dtype=torch.int32, device="cuda")
    wk = torch.randn(batch, window, kv_heads, head_dim, device="cuda", dtype=torch.float16, generator=generator)
    wv = torch.randn_like(wk)
    window_lens = torch.full((batch,), window, dtype=torch.int32, device="cuda")
    return tables, seq_lens, wk, wv, window_lens


def _fmt(spec: str, head_dim: int) -> PagedCodec:
    from kvpack import get_codec

    return paged_codec(get_codec(spec, head_dim=head_dim), "cuda")


def bench_attention(args) -> dict:
    import triton.testing

    hq, hkv, d, bs, window = args.q_heads, args.kv_heads, args.head_dim, args.block_size, args.window
    specs = [s for s in args.codecs.split(",") if s]
    fmts = {s: _fmt(s, d) for s in specs}
    copy_bps = copy_bandwidth()
    rows = []
    for ctx in int_list(args.contexts, "contexts"):
        for batch in int_list(args.batches, "batches"):
            fp16_bytes = batch * hkv * ctx * d * 2 * 2
            if fp16_bytes / 2**30 > args.max_gib:
                rows.append({"context": ctx, "batch": batch, "skipped": f"fp16 K/V {fp16_bytes / 2**30:.1f} GiB"})
                continue
            g = torch.Generator(device="cuda").manual_seed(ctx + batch)
            q = torch.randn(batch, hq, 1, d, device="cuda", dtype=torch.float16, generator=g)
            k = torch.randn(batch, hkv, ctx, d, device="cuda", dtype=torch.float16, generator=g)
            v = torch.randn_like(k)
            sdpa_ms = triton.testing.do_bench(
                lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                warmup=25, rep=200, return_mode="median",
            )  # fmt: skip
            del k, v
            row = {"context": ctx, "batch": batch, "sdpa_us": sdpa_ms * 1e3, "sdpa_bytes": fp16_bytes}
            row["sdpa_pct_copy"] = 100 * fp16_bytes / (sdpa_ms * 1e-3) / copy_bps
            packed_tokens = ctx - window
            block_tables, seq_lens, wk, wv, wl = paged_decode_inputs(batch, packed_tokens, window, hkv, d, bs, g)
            num_blocks = block_tables.numel()
            query = q.reshape(batch, hq, d)
            for spec, fmt in fmts.items():
                kc = random_paged_cache(num_blocks, bs, hkv, fmt)
                vc = random_paged_cache(num_blocks, bs, hkv, fmt)
                step = functools.partial(
                    decode_kernel(query, kc, fmt, fmt), query, kc, vc, block_tables, seq_lens, wk, wv, wl, fmt, fmt, d**-0.5,
                    out=torch.empty_like(query), **_tuning(args, spec),
                )  # fmt: skip

                ms = triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median")
                replay_ms = graph_ms(step)
                nbytes = batch * hkv * (packed_tokens * 2 * fmt.row_bytes + window * d * 2 * 2)
                row[spec] = {
                    "us": ms * 1e3,
                    "graph_us": replay_ms * 1e3,
                    "speedup": sdpa_ms / ms,
                    "bytes": nbytes,
                    "pct_copy": 100 * nbytes / (ms * 1e-3) / copy_bps,
                    "bits_per_value": 8 * fmt.row_bytes / d,
                }
                del kc, vc
            rows.append(row)
            print(_attention_line(row, specs), flush=True)
            torch.cuda.empty_cache()
    return {"copy_tbps": copy_bps / 1e12, "rows": rows, "codecs": specs}


def decode_kernel(query: torch.Tensor, key_cache: torch.Tensor, key_fmt: PagedCodec, value_fmt: PagedCodec):
    """The launcher that `kvpack.kernels.attention.decode` dispatches these inputs to on CUDA (same arguments)."""
    from kvpack.kernels.decode_attention import paged_decode_attention
    from kvpack.kernels.cuda_decode import paged_cuda_decode, uses_cuda_kernel

    streams = (key_fmt.kind, key_fmt.bits, value_fmt.kind, value_fmt.bits)
    return paged_cuda_decode if uses_cuda_kernel(query, key_cache, *streams) else paged_decode_attention


def _tuning(args, spec: str) -> dict:
    return dict(getattr(args, "tuning", {}).get(spec, {}))


def graph_ms(step) -> float:
    """Median milliseconds of a CUDA-graph replay of ``step`` (captured after a warm-up on a side stream)."""
    import triton.testing

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median")


def _attention_line(row: dict, specs: list[str]) -> str:
    parts = [f"ctx {row['context']:>6} batch {row['batch']:>2}: sdpa {row['sdpa_us']:8.1f} us"]
    for spec in specs:
        r = row[spec]
        parts.append(f"{spec} {r['us']:7.1f} us x{r['speedup']:.2f} {r['pct_copy']:.0f}%")
    return " | ".join(parts)


def bench_encode(args) -> dict:
    import triton.testing

    from kvpack.kernels.encode import paged_encode

    hkv, d, bs, tokens = args.kv_heads, args.head_dim, args.block_size, args.tokens
    copy_bps = copy_bandwidth()
    x = torch.randn(tokens, hkv, d, device="cuda", dtype=torch.float16)
    num_blocks = math.ceil(tokens / bs)
    slots = torch.randperm(num_blocks * bs, device="cuda")[:tokens]
    rows = []
    for spec in (s for s in args.codecs.split(",") if s):
        fmt = _fmt(spec, d)
        cache = random_paged_cache(num_blocks, bs, hkv, fmt)
        kw = _tuning(args, spec)
        ms = triton.testing.do_bench(
            lambda cache=cache, fmt=fmt, kw=kw: paged_encode(x, slots, cache, fmt, **kw), return_mode="median"
        )
        nbytes = tokens * hkv * (d * 2 + fmt.row_bytes) + tokens * 8
        rows.append({"codec": spec, "tokens": tokens, "us": ms * 1e3, "bytes": nbytes,
                     "pct_copy": 100 * nbytes / (ms * 1e-3) / copy_bps,
                     "gvectors_per_s": tokens * hkv / (ms * 1e-3) / 1e9})  # fmt: skip
        print(f"encode {spec}: {ms * 1e3:.1f} us, {rows[-1]['pct_copy']:.0f}% of copy", flush=True)
    return {"copy_tbps": copy_bps / 1e12, "rows": rows}


def run(args) -> int:
    generate = None
    if args.what == "generate":  # checks its options first, then refuses without CUDA
        from kvpack.bench.generate import run_generate

        generate = run_generate(args)
    if not torch.cuda.is_available():
        raise ValueError("kvpack bench needs a CUDA GPU (the kernels are timed on the device)")
    result = {
        "what": args.what,
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if generate is not None:
        result.update(generate)
    else:
        result.update(bench_attention(args) if args.what == "attention" else bench_encode(args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0
