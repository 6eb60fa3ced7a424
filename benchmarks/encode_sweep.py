"""Sweep of the Triton fused encode's launch knobs (tokens per program, warps, programs per SM): time and % of copy on
the bytes it moves (fp16 in, packed rows out, slots). (Run 2026-12-02 also with the rotation loaded per tile instead
of held across the persistent loop: no better, 64-token tiles then out of shared memory; that knob was removed.)

    PYTHONPATH=$PWD python benchmarks/encode_sweep.py --json out.json [--codecs turbo_mse:4,int:4] [--tokens 65536]
    [--contiguous]   (slots in order, as a prefill writes its pages; default: a random permutation)
    [--decode]       instead: K and V of a decode step's few tokens in one launch (the 4bit preset's pair, turbo_mse:4
                     keys and Hadamard-rotated int:4 values, and int:4), tiles of 1-32 tokens, replayed from a CUDA graph
"""

from __future__ import annotations

import argparse
import itertools
import json
import math

import torch
import triton.testing

from kvpack import get_codec
from kvpack.bench.kernels import copy_bandwidth, random_paged_cache
from kvpack.kernels.encode import paged_encode
from kvpack.kernels.paged import paged_codec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--codecs", default="turbo_mse:4,int:4")
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--contiguous", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--decode", action="store_true")
    args = ap.parse_args()
    if args.decode:
        return decode_sweep(args.json)
    hkv, d, bs, tokens = 8, 128, 16, args.tokens
    copy_bps = copy_bandwidth()
    x = torch.randn(tokens, hkv, d, device="cuda", dtype=torch.float16)
    num_blocks = math.ceil(tokens / bs)
    slots = torch.arange(tokens, device="cuda")
    if not args.contiguous:
        slots = torch.randperm(num_blocks * bs, device="cuda")[:tokens]
    rows = []
    for spec in args.codecs.split(","):
        fmt = paged_codec(get_codec(spec, head_dim=d), "cuda")
        cache = random_paged_cache(num_blocks, bs, hkv, fmt)
        nbytes = tokens * hkv * (d * 2 + fmt.row_bytes) + tokens * 8
        for block_t, warps, pps in itertools.product((16, 32, 64), (4, 8), (4, 16)):
            kw = {"block_t": block_t, "num_warps": warps, "programs_per_sm": pps}
            try:
                ms = triton.testing.do_bench(lambda: paged_encode(x, slots, cache, fmt, **kw), return_mode="median")
            except Exception as e:  # noqa: BLE001 - a point that does not compile or launch is reported
                print(f"{spec} {kw}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            pct = 100 * nbytes / (ms * 1e-3) / copy_bps
            rows.append({"codec": spec, **kw, "us": ms * 1e3, "pct_copy": pct})
            print(f"{spec} {kw}: {ms * 1e3:.1f} us, {pct:.1f}% of copy", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            result = {"device": torch.cuda.get_device_name(), "contiguous": args.contiguous, "rows": rows}
            json.dump(result, f, indent=1)


def decode_sweep(json_path: str | None) -> None:
    """A decode step's encode (`kvpack.kernels.encode._launch`, K and V in one launch) at 1, 8 and 16 tokens."""
    from kvpack.kernels.encode import _launch, default_tiling

    hkv, d, bs = 8, 128, 16
    rows = []
    for key, value in (("turbo_mse:4", "int:4:rotation=hadamard"), ("int:4", "int:4")):
        kf, vf = (paged_codec(get_codec(s, head_dim=d), "cuda") for s in (key, value))
        for tokens in (1, 8, 16):
            keys, values = (torch.randn(tokens, hkv, d, device="cuda", dtype=torch.float16) for _ in range(2))
            slots = torch.arange(tokens, device="cuda") * 7
            pools = [random_paged_cache(64, bs, hkv, f) for f in (kf, vf)]
            streams = [(x, pool, f.kind, f.mse_bits, f.rotation, f.boundaries, f.codebook, f.sketch)
                       for x, pool, f in zip((keys, values), pools, (kf, vf))]  # fmt: skip
            for block_t, warps in itertools.product((1, 2, 32), (4, 8)):
                try:
                    us = 1e3 * triton.testing.do_bench_cudagraph(lambda: _launch(streams, slots, block_t, warps, 4))
                except Exception as e:  # noqa: BLE001 - a point that does not compile or launch is reported
                    print(f"{key}/{value} T={tokens} bt={block_t} w={warps}: {type(e).__name__}: {str(e)[:100]}")
                    continue
                default = (block_t, warps) == default_tiling(tokens, d, kf.rotation is not None)
                rows.append({"key": key, "value": value, "tokens": tokens, "block_t": block_t, "num_warps": warps,
                             "us": us, "default": default})  # fmt: skip
                print(f"{key}/{value} T={tokens} bt={block_t} w={warps}: {us:.2f} us{' (default)' * default}",
                      flush=True)  # fmt: skip
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "decode": True, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
