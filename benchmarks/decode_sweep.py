"""Decode-attention launch sweep at one shape, two rounds (run-to-run noise), fp16 SDPA and copy in the same run.

Usage (CUDA machine, repository root): ``python benchmarks/decode_sweep.py OUT.json [spec:cfg,cfg ...]``, e.g.
``int:4:u1,u1_64x2 turbo_mse:3:u0_64x2`` (the part after the last ``:`` names launch configurations of
``CONFIGS``). Batch 8, 32K context, Llama-3-8B heads, inputs as ``kvpack bench attention`` builds them.
The JSON has one row per (codec, configuration, round): us, speed-up over SDPA, % of copy bandwidth.
"""

from __future__ import annotations

import functools
import json
import sys

import torch
import triton.testing

from kvpack import bench
from kvpack.kernels.decode_attention import paged_decode_attention

CONFIGS = {  # unpack 0: broadcast shift + reshape, 1: slot by slot + tl.join (decode_attention._dequant)
    "u1": {"unpack": 1},
    "u1_64x2": {"unpack": 1, "block_n": 64, "num_warps": 2},
    "u0_64x2": {"unpack": 0, "block_n": 64, "num_warps": 2},
}
DEFAULT_PLAN = ["int:4:u1,u1_64x2", "int:4:rotation=hadamard:u1", "int:3:u1,u1_64x2,u0_64x2",
                "int:3:rotation=hadamard:u1,u1_64x2", "int:2:u1", "turbo_mse:4:u0_64x2", "turbo_mse:3:u0_64x2",
                "turbo_prod:4:u0_64x2,u1", "turbo_prod:3:u0_64x2"]  # fmt: skip


def main() -> int:
    out, plan = sys.argv[1], [p.rsplit(":", 1) for p in (sys.argv[2:] or DEFAULT_PLAN)]
    batch, ctx, hq, hkv, d, bs, window = 8, 32768, 32, 8, 128, 16, 132
    g = torch.Generator(device="cuda").manual_seed(0)
    copy = bench.copy_bandwidth()
    q4 = torch.randn(batch, hq, 1, d, device="cuda", dtype=torch.float16, generator=g)
    k = torch.randn(batch, hkv, ctx, d, device="cuda", dtype=torch.float16, generator=g)
    v = torch.randn_like(k)
    sdpa = triton.testing.do_bench(
        lambda k=k, v=v: torch.nn.functional.scaled_dot_product_attention(q4, k, v, enable_gqa=True),
        warmup=25, rep=200, return_mode="median",
    ) * 1e3  # fmt: skip
    del k, v
    print(f"copy {copy / 1e12:.2f} TB/s, sdpa {sdpa:.1f} us", flush=True)
    packed, query = ctx - window, q4.reshape(batch, hq, d)
    tables, lens, wk, wv, wl = bench.paged_decode_inputs(batch, packed, window, hkv, d, bs, g)
    result = {"sdpa_us": sdpa, "copy_tbps": copy / 1e12, "batch": batch, "context": ctx, "rows": []}
    for spec, cfgs in plan:
        fmt = bench._fmt(spec, d)
        kc = bench.random_paged_cache(tables.numel(), bs, hkv, fmt)
        vc = bench.random_paged_cache(tables.numel(), bs, hkv, fmt)
        nbytes = batch * hkv * (packed * 2 * fmt.row_bytes + window * d * 4)
        for rnd in range(2):
            for cfg in cfgs.split(","):
                step = functools.partial(paged_decode_attention, query, kc, vc, tables, lens, wk, wv, wl, fmt, fmt,
                                         d**-0.5, out=torch.empty_like(query), **CONFIGS[cfg])  # fmt: skip
                us = triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median") * 1e3
                pct = 100 * nbytes / (us * 1e-6) / copy
                result["rows"].append({"spec": spec, "cfg": cfg, "round": rnd, "us": us, "speedup": sdpa / us,
                                       "pct_copy": pct})  # fmt: skip
                print(f"{spec:26s} {cfg:8s} r{rnd} {us:7.1f} us {sdpa / us:5.2f}x {pct:5.1f}% copy", flush=True)
        del kc, vc
        torch.cuda.empty_cache()
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
