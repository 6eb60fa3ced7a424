"""int:2 and int:4 decode attention: the NVRTC CUDA kernel (kvpack.kernels.int_decode) vs Triton, fp16 SDPA and a copy.

Llama-3-8B heads (32 q / 8 kv, head_dim 128), 132-token 16-bit window, 16-token pages in a random permutation.
Reported per case: median do_bench time (L2 flushed) and CUDA-graph replay time, x SDPA, and % of copy on the bytes
the kernel reads (``B * Hkv * (packed * 2 * row_bytes + window * D * 2 * 2)``; copy bandwidth counts read + write).
Also a sweep of splits / KV heads per CTA / pipeline stages at each shape (``--sweep``).

    PYTHONPATH=$PWD python benchmarks/int4_decode.py --json out.json [--sweep] [--shapes 8x32768,1x32768,32x131072]
"""

from __future__ import annotations

import argparse
import functools
import json

import torch
import triton.testing

from kvpack import get_codec
from kvpack.bench.kernels import _graph_ms, copy_bandwidth, paged_decode_inputs, random_paged_cache
from kvpack.kernels.decode_attention import paged_decode_attention
from kvpack.kernels.int_decode import default_splits, paged_int_decode, variant_for
from kvpack.kernels.paged import paged_codec


def bench(fn) -> tuple[float, float]:
    ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    return ms * 1e3, _graph_ms(fn) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8x32768,1x32768,32x131072")
    ap.add_argument("--json", default=None)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--specs", default="int:4,int:2", help="int:2/int:4 K and V: the CUDA kernel and Triton")
    args = ap.parse_args()
    hq, hkv, d, bs, window = 32, 8, 128, 16, 132
    copy_bps = copy_bandwidth()
    print(f"copy {copy_bps / 1e12:.2f} TB/s", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        batch, ctx = map(int, shape.split("x"))
        g = torch.Generator(device="cuda").manual_seed(batch + ctx)
        q = torch.randn(batch, hq, 1, d, device="cuda", dtype=torch.float16, generator=g)
        k = torch.randn(batch, hkv, ctx, d, device="cuda", dtype=torch.float16, generator=g)
        v = torch.randn_like(k)
        sdpa = functools.partial(torch.nn.functional.scaled_dot_product_attention, q, k, v, enable_gqa=True)
        sdpa_us, sdpa_graph_us = bench(sdpa)
        del k, v, sdpa
        torch.cuda.empty_cache()
        packed = ctx - window
        tables, seq_lens, wk, wv, wl = paged_decode_inputs(batch, packed, window, hkv, d, bs, g)
        query = q.reshape(batch, hq, d)
        row = {"batch": batch, "context": ctx, "sdpa_us": sdpa_us, "sdpa_graph_us": sdpa_graph_us, "cases": []}
        for spec in [s for s in args.specs.split(",") if s]:
            fmt = paged_codec(get_codec(spec, head_dim=d), "cuda")
            kc = random_paged_cache(tables.numel(), bs, hkv, fmt)
            vc = random_paged_cache(tables.numel(), bs, hkv, fmt)
            nbytes = batch * hkv * (packed * 2 * fmt.row_bytes + window * d * 2 * 2)
            common = (query, kc, vc, tables, seq_lens, wk, wv, wl, fmt, fmt, d**-0.5)
            variants = [("cuda", {}, paged_int_decode), ("triton", {}, paged_decode_attention)]
            if spec == "int:4":
                variants = [("cuda", {}, paged_int_decode)]
                if args.sweep:  # KV heads per CTA, stages, register cap; splits filling 1 or 2 waves, or given
                    for hpc, stages, minb in ((8, 2, 0), (4, 4, 0), (4, 2, 0), (2, 4, 0), (8, 2, 3), (4, 4, 5)):
                        variant = variant_for(query, kc, hpc, stages, minb)
                        for waves in (1, 2):
                            splits = default_splits(variant, batch, tables.shape[1] * bs, query.device, waves)
                            variants.append((f"cuda s{splits} h{hpc} st{stages} mb{minb}",
                                             {"num_splits": splits, "heads_per_cta": hpc, "stages": stages,
                                              "min_blocks": minb}, paged_int_decode))  # fmt: skip
                variants.append(("triton", {}, paged_decode_attention))
            for name, kw, fn in variants:
                step = functools.partial(fn, *common, out=torch.empty_like(query), **kw)
                try:
                    us, graph_us = bench(step)
                except Exception as e:  # noqa: BLE001 - a sweep point that cannot launch is reported, not fatal
                    print(f"  {spec} {name}: {type(e).__name__}: {e}", flush=True)
                    continue
                case = {"spec": spec, "kernel": name, **kw, "us": us, "graph_us": graph_us, "bytes": nbytes,
                        "x_sdpa": sdpa_us / us, "x_sdpa_graph": sdpa_graph_us / graph_us,
                        "pct_copy": 100 * nbytes / (us * 1e-6) / copy_bps,
                        "pct_copy_graph": 100 * nbytes / (graph_us * 1e-6) / copy_bps}  # fmt: skip
                row["cases"].append(case)
                print(f"  b{batch} ctx{ctx} {spec:6s} {name:24s} {us:8.1f} us (graph {graph_us:8.1f}) "
                      f"x{case['x_sdpa']:.2f} (graph x{case['x_sdpa_graph']:.2f}) {case['pct_copy']:.0f}% "
                      f"(graph {case['pct_copy_graph']:.0f}%) of copy", flush=True)  # fmt: skip
            del kc, vc
            torch.cuda.empty_cache()
        print(f"b{batch} ctx{ctx}: sdpa {sdpa_us:.1f} us (graph {sdpa_graph_us:.1f})", flush=True)
        rows.append(row)
    result = {"device": torch.cuda.get_device_name(), "copy_tbps": copy_bps / 1e12, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
