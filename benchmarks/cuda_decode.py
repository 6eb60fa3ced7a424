"""Decode attention: the NVRTC CUDA kernel (kvpack.kernels.cuda_decode) vs Triton, fp16 SDPA and a copy, per codec.

Llama-3-8B heads (32 q / 8 kv, head_dim 128), 132-token 16-bit window, 16-token pages in a random permutation.
Reported per case: median do_bench time (L2 flushed) and CUDA-graph replay time, x SDPA, and % of copy on the bytes
the kernel reads (``B * Hkv * (packed * 2 * row_bytes + window * D * 2 * 2)``; copy bandwidth counts read + write).
Also a sweep of splits / KV heads per CTA / pipeline stages at each shape (``--sweep``).

    PYTHONPATH=$PWD python benchmarks/cuda_decode.py --json out.json [--sweep] [--shapes 8x32768,1x32768,32x131072]
        [--specs int:4,int:2,turbo_mse:4,turbo_mse:4/turbo_mse:3]   (K/V: a key and a value codec)
        [--profile]   (each kernel's GPU time, torch.profiler, the default CUDA and Triton cases)
        [--policy 4bit,3bit,2.5bit]   (a shipped preset's per-layer K/V codecs, each distinct pair timed once: the
                                       mean time per layer of the policy as a whole, vs the uniform int codecs)
"""

from __future__ import annotations

import argparse
import functools
import json

import torch
import triton.testing

from kvpack import get_codec
from kvpack.bench.kernels import copy_bandwidth, graph_ms, paged_decode_inputs, random_paged_cache
from kvpack.kernels.cuda_decode import default_splits, paged_cuda_decode, variant_for
from kvpack.kernels.decode_attention import paged_decode_attention
from kvpack.kernels.paged import paged_codec


def bench(fn) -> tuple[float, float]:
    ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    return ms * 1e3, graph_ms(fn) * 1e3


def preset_pairs(name: str) -> list[str]:
    """The ``K/V`` spec of each layer of a shipped preset (its cached SmolLM2 policy: the per-layer codecs)."""
    from importlib import resources

    from kvpack.policy import policy_from_dict

    files = [f for f in resources.files("kvpack.presets").iterdir() if f.name.endswith(f"-{name}.json")]
    if not files:
        raise SystemExit(f"--policy: no shipped preset named {name!r}")
    policy = policy_from_dict(json.loads(files[0].read_text())["policy"])
    return [f"{k}/{v}" for k, v in zip(policy.layer_keys, policy.layer_values, strict=True)]


def kernel_times(fn, label: str, steps: int = 20) -> None:
    """Print the GPU time per call of each kernel ``fn`` launches (torch.profiler over ``steps`` calls)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total):
        if e.self_device_time_total > 0:  # kernels (operators' device time is their kernels')
            print(f"  profile {label}: {e.key[:60]:60s} {e.self_device_time_total / steps:8.1f} us/call "
                  f"({e.count // steps} per call)", flush=True)


def policy_times(row: dict, weights: dict) -> dict:
    """Mean graph-replay time per layer of each preset: its pairs' fastest kernel (CUDA where it takes them)."""
    best = {}
    for case in row["cases"]:
        if case["kernel"] in ("cuda", "triton"):
            best[case["spec"]] = min(best.get(case["spec"], float("inf")), case["graph_us"])
    out = {}
    for pair, uses in weights.items():
        for name, n in uses.items():
            p = out.setdefault(name, {"layers": 0, "graph_us": 0.0, "bits": 0.0})
            p["layers"] += n
            p["graph_us"] += n * best[pair]
            k, v = pair.split("/")
            p["bits"] += n * (int(k.split(":")[1]) + int(v.split(":")[1])) / 2
    for p in out.values():
        p["graph_us"] /= p["layers"]
        p["bits"] /= p["layers"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8x32768,1x32768,32x131072")
    ap.add_argument("--json", default=None)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--profile", action="store_true", help="GPU time of each kernel of the CUDA and Triton cases")
    ap.add_argument("--specs", default="int:4,int:2", help="codecs of K and V (or K/V): the CUDA kernel and Triton")
    ap.add_argument("--policy", default="", help="presets whose (K, V) codec pairs are timed, weighted by layers")
    args = ap.parse_args()
    weights = {}  # spec -> {preset: layers using it}
    for name in [p for p in args.policy.split(",") if p]:
        pairs = preset_pairs(name)
        for pair in pairs:
            weights.setdefault(pair, {}).setdefault(name, 0)
            weights[pair][name] += 1
    specs = [s for s in args.specs.split(",") if s] + [p for p in weights if p not in args.specs.split(",")]
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
        for spec in specs:
            key_spec, _, value_spec = spec.partition("/")
            kf = paged_codec(get_codec(key_spec, head_dim=d), "cuda")
            vf = paged_codec(get_codec(value_spec or key_spec, head_dim=d), "cuda")
            kc = random_paged_cache(tables.numel(), bs, hkv, kf)
            vc = random_paged_cache(tables.numel(), bs, hkv, vf)
            nbytes = batch * hkv * (packed * (kf.row_bytes + vf.row_bytes) + window * d * 2 * 2)
            common = (query, kc, vc, tables, seq_lens, wk, wv, wl, kf, vf, d**-0.5)
            variants = [("cuda", {}, paged_cuda_decode), ("triton", {}, paged_decode_attention)]
            if spec == "int:4":
                variants = [("cuda", {}, paged_cuda_decode)]
                if args.sweep and batch >= 8:  # KV heads per CTA, stages, register cap; splits filling 1 or 2 waves
                    shapes = ((8, 2, 0), (8, 3, 0), (8, 4, 0), (4, 4, 0), (4, 2, 0), (2, 4, 0), (8, 2, 3))
                    for hpc, stages, minb in shapes:
                        variant = variant_for(query, kc, hpc, stages, minb)
                        for waves in (1, 2):
                            splits = default_splits(variant, batch, tables.shape[1] * bs, query.device, waves, window)
                            variants.append((f"cuda s{splits} h{hpc} st{stages} mb{minb}",
                                             {"num_splits": splits, "heads_per_cta": hpc, "stages": stages,
                                              "min_blocks": minb}, paged_cuda_decode))  # fmt: skip
                variants.append(("triton", {}, paged_decode_attention))
            if args.sweep and batch < 8:  # few sequences: the splits and KV heads per CTA given explicitly
                variants += [(f"cuda s{splits} h{hpc}", {"num_splits": splits, "heads_per_cta": hpc}, paged_cuda_decode)
                             for hpc in (8, 4, 2) for splits in (16, 32, 64, 128, 256)]  # fmt: skip
            if args.sweep and "turbo_mse:4" in spec:  # copies of the 4-bit table (bank conflicts vs shared memory)
                variants[1:1] = [(f"cuda copies{c}", {"table_copies": c}, paged_cuda_decode) for c in (1, 4, 8, 16)]
            if args.profile:
                for name, kw, fn in [v for v in variants if v[0] in ("cuda", "triton")]:
                    kernel_times(functools.partial(fn, *common, out=torch.empty_like(query), **kw),
                                 f"b{batch} ctx{ctx} {spec} {name}")
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
                print(f"  b{batch} ctx{ctx} {spec:12s} {name:24s} {us:8.1f} us (graph {graph_us:8.1f}) "
                      f"x{case['x_sdpa']:.2f} (graph x{case['x_sdpa_graph']:.2f}) {case['pct_copy']:.0f}% "
                      f"(graph {case['pct_copy_graph']:.0f}%) of copy", flush=True)  # fmt: skip
            del kc, vc
            torch.cuda.empty_cache()
        print(f"b{batch} ctx{ctx}: sdpa {sdpa_us:.1f} us (graph {sdpa_graph_us:.1f})", flush=True)
        row["policies"] = policy_times(row, weights)
        for name, p in row["policies"].items():
            print(f"b{batch} ctx{ctx} preset {name}: {p['graph_us']:.1f} us per layer (graph replay, mean over "
                  f"{p['layers']} layers) = x{sdpa_graph_us / p['graph_us']:.2f} SDPA, {p['bits']:.2f} code bits per "
                  "value (mean of K and V; side bytes and the 16-bit parts aside)", flush=True)
        rows.append(row)
    result = {"device": torch.cuda.get_device_name(), "copy_tbps": copy_bps / 1e12, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
