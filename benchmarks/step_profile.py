"""What one compiled decode step of ``model.generate`` runs on the GPU: kernels per step, device time, host gap.

Usage (CUDA machine, repository root): ``PYTHONPATH=$PWD python benchmarks/step_profile.py [--caches
static:int:4,hf-static] [--layers 32] [--context 32768] [--batch 1] [--tokens 8] [--fuse-projections] [--json OUT]``.
Random-weight Llama-3-8B-shaped model (`kvpack.bench.generate.build_model`); each cache is prefilled and warmed
up as `kvpack bench generate` does (the warm-up pays the compile), then one ``generate`` of ``--tokens`` tokens
runs unprofiled, then under ``torch.profiler``. Reported per cache: wall ms per token (unprofiled and profiled), the
profiled span from the first kernel's start to the last one's end, GPU kernel time per token (the sum of kernel
durations: below the wall time when the GPU idles between kernels), kernel launches per token, and the kernels
with the most time per token, grouped by name.
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from kvpack.bench.generate import _make_cache, build_model
from kvpack.bench.kernels import graph_ms
from kvpack.hf.config import cache_kwargs
from kvpack.hf.fuse import fuse_projections
from kvpack.hf.graph_generate import GraphDecoder


def profile_cache(model, name: str, batch: int, context: int, tokens: int) -> dict:
    ids = torch.randint(3, 1000, (batch, context), device="cuda")
    cache = _make_cache(name, model, 128, 4, context + 8 + 3 * tokens + 8)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        for at in range(0, context - 1, 4096):
            end = min(at + 4096, context - 1)
            model(ids[:, at:end], attention_mask=mask[:, :end], logits_to_keep=1, **cache_kwargs(model, cache))
        kw = {**cache_kwargs(model, cache), "do_sample": False}
        if name.startswith("graph:"):  # kvpack.graph_generate: the compiled step replayed from one CUDA graph
            decoder = GraphDecoder(model, cache)
            run = lambda ids_, n: decoder.generate(ids_, n)  # noqa: E731
        else:
            def run(ids_, n):
                return model.generate(ids_, attention_mask=torch.ones_like(ids_), max_new_tokens=n, min_new_tokens=n,
                                      **kw)  # fmt: skip
        out = run(ids, 8)
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = run(out, tokens)  # unprofiled: the wall time the kernel sum is compared with
        torch.cuda.synchronize()
        wall_plain = time.perf_counter() - start
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            run(out, tokens)
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for e in kernels:
        by_name[e.name].append(e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total)
    total_us = sum(sum(v) for v in by_name.values())
    span_us = max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:40]
    row = {
        "cache": name, "batch": batch, "context": context, "tokens": tokens,
        "wall_ms_per_token": 1e3 * wall_plain / tokens,
        "wall_ms_per_token_profiled": 1e3 * wall / tokens,
        "kernel_span_ms_per_token_profiled": span_us / 1e3 / tokens,
        "gpu_kernel_ms_per_token": total_us / 1e3 / tokens,
        "kernels_per_token": len(kernels) / tokens,
        "top": [{"kernel": k[:90], "calls_per_token": len(v) / tokens, "us_per_token": sum(v) / tokens}
                for k, v in top],
    }  # fmt: skip
    print(f"{name} b{batch} ctx{context}: wall {row['wall_ms_per_token']:.2f} ms/token ("
          f"{row['wall_ms_per_token_profiled']:.2f} profiled, first to last kernel "
          f"{row['kernel_span_ms_per_token_profiled']:.2f}), GPU kernels {row['gpu_kernel_ms_per_token']:.2f} "
          f"ms/token, {row['kernels_per_token']:.0f} kernels/token", flush=True)  # fmt: skip
    for t in row["top"]:
        print(f"  {t['us_per_token']:9.1f} us/token {t['calls_per_token']:6.1f} calls  {t['kernel']}", flush=True)
    del cache
    torch.cuda.empty_cache()
    return row


def launch_floor(kernels: int = 1000) -> float:
    """Microseconds per kernel of a replayed CUDA graph of ``kernels`` dependent one-element adds: what a launch
    costs inside a graph when the kernel does nothing."""
    x = torch.zeros(1, device="cuda")
    return 1e3 * graph_ms(lambda: [x.add_(1) for _ in range(kernels)]) / kernels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--caches", default="static:int:4,hf-static")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--fuse-projections", action="store_true", help="kvpack.fuse_projections on the model first")
    ap.add_argument("--json")
    args = ap.parse_args()
    floor = launch_floor()
    print(f"a kernel in a replayed CUDA graph: {floor:.2f} us (1000 dependent one-element adds)", flush=True)
    model = build_model(args.layers)
    if args.fuse_projections:
        print(f"fused projection groups: {fuse_projections(model)}", flush=True)
    rows = [profile_cache(model, c, args.batch, args.context, args.tokens) for c in args.caches.split(",")]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "graph_us_per_kernel": floor, "rows": rows}, f,
                      indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
