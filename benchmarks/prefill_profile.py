"""Where a chunked prefill's time goes: the kernels of the last chunk (the longest past) of a prefill into a cache.

Usage (CUDA machine, repository root): ``PYTHONPATH=$PWD python benchmarks/prefill_profile.py [--caches
static:4bit,static:int:4,hf-static] [--layers 4] [--context 32768] [--chunk 4096] [--json OUT]``.
Random-weight Llama-3-8B-shaped model (`kvpack.bench.generate.build_model`, ``--layers`` of them): the context is
prefilled in chunks as `kvpack bench generate` does, every chunk but the last unprofiled (the first pays the
compiles), then the last one under ``torch.profiler``. Reported per cache: that chunk's wall time, its GPU kernel
time, and the kernels with the most time, grouped by name (per layer: divide by ``--layers``). ``--sync-debug``: the
chunk before the last runs under ``torch.cuda.set_sync_debug_mode("warn")`` and its host syncs are counted by the
source line that made them (a sync stalls the host's launches ahead of the GPU); ``--host``: the ops with the most
host time, by the Python frames that called them.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
import traceback
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from kvpack.bench.generate import _make_cache, build_model
from kvpack.hf.config import cache_kwargs


def count_syncs(run) -> list[dict]:
    """Host syncs made by ``run()``, counted by the innermost kvpack (else transformers) source line on the stack of
    the op that made them, most first."""
    lines: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        frames = traceback.extract_stack()[:-1]
        ours = [f for f in frames if "/kvpack/" in f.filename] or [f for f in frames if "transformers" in f.filename]
        at = ours[-1] if ours else frames[-1]
        lines[f"{at.filename.split('/kvpack/')[-1]}:{at.lineno} {at.name}"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [{"line": k, "syncs": v} for k, v in lines.most_common(30)]


def profile_prefill(model, name: str, context: int, chunk: int, sync_debug: bool = False, host: bool = False) -> dict:
    ids = torch.randint(3, 1000, (1, context), device="cuda")
    cache = _make_cache(name, model, 128, 4, context + 8)
    mask = torch.ones_like(ids)
    starts = list(range(0, context, chunk))

    def forward(at: int) -> None:
        end = min(at + chunk, context)
        model(ids[:, at:end], attention_mask=mask[:, :end], logits_to_keep=1, **cache_kwargs(model, cache))

    with torch.inference_mode():
        syncs = []
        for at in starts[:-1]:
            if sync_debug and at == starts[-2] and at:  # the chunk before the last: a past as long, nearly
                syncs = count_syncs(lambda at=at: forward(at))
            else:
                forward(at)
        torch.cuda.synchronize()
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU], with_stack=host) as prof:
            forward(starts[-1])
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for e in kernels:
        by_name[e.name].append(e.device_time_total)
    total = sum(sum(v) for v in by_name.values())
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:25]
    row = {"cache": name, "context": context, "chunk": chunk, "past": starts[-1], "wall_ms": 1e3 * wall,
           "gpu_kernel_ms": total / 1e3, "kernels": len(kernels),
           "top": [{"kernel": k[:100], "calls": len(v), "ms": sum(v) / 1e3} for k, v in top], "syncs": syncs}  # fmt: skip
    print(f"{name}: last chunk ({chunk} tokens after {starts[-1]}): wall {row['wall_ms']:.1f} ms, GPU kernels "
          f"{row['gpu_kernel_ms']:.1f} ms, {len(kernels)} kernels", flush=True)  # fmt: skip
    for t in row["top"]:
        print(f"  {t['ms']:9.2f} ms {t['calls']:5d} calls  {t['kernel']}", flush=True)
    for t in syncs:
        print(f"  sync x{t['syncs']:4d}  {t['line']}", flush=True)
    if host:  # where the host's time goes: ops by their own CPU time, grouped by the Python frames that called them
        table = prof.key_averages(group_by_stack_n=4).table(sort_by="self_cpu_time_total", row_limit=25)
        row["host_table"] = table
        print(table, flush=True)
    del cache
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--caches", default="static:4bit,static:int:4,hf-static")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--sync-debug", action="store_true", help="count the host syncs of the last chunk by source line")
    ap.add_argument("--host", action="store_true", help="also list the ops by host time, with their Python stacks")
    ap.add_argument("--json")
    args = ap.parse_args()
    model = build_model(args.layers)
    rows = [profile_prefill(model, c, args.context, args.chunk, args.sync_debug, args.host) for c in args.caches.split(",")]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "layers": args.layers, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
