"""Where a decode step's host time goes: cProfile of 16 greedy ``model()`` steps after a chunked prefill.

Usage (CUDA machine, repository root): ``python benchmarks/host_profile.py [layers=8] [context=4096]``.
Random-weight Llama-3-8B-shaped model (`kvpack.bench.generate.build_model`), batch 1, caches ``int:4``
(`PagedKVPackCache`, the kernels) and ``dynamic``; prints ms per step and the top functions by own time.
At batch 1 a step is bound by the host when the time per step equals the profiled Python time.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time

import torch

from kvpack.bench.generate import _make_cache, build_model


def main() -> int:
    opts = dict(a.split("=") for a in sys.argv[1:])
    layers, context = int(opts.get("layers", 8)), int(opts.get("context", 4096))
    model = build_model(layers)
    ids = torch.randint(0, 1000, (1, context), device="cuda")
    for name in ["int:4", "dynamic"]:
        cache = _make_cache(name, model, 128, 4)
        with torch.inference_mode():
            for c in range(0, context, 1024):
                out = model(ids[:, c : c + 1024], past_key_values=cache)
            tok = out.logits[:, -1:].argmax(-1)
            for _ in range(4):
                tok = model(tok, past_key_values=cache).logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            start = time.perf_counter()
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(16):
                tok = model(tok, past_key_values=cache).logits[:, -1:].argmax(-1)
            prof.disable()
            torch.cuda.synchronize()
        print(f"== {name}: {(time.perf_counter() - start) / 16 * 1e3:.2f} ms/step for {layers} layers", flush=True)
        pstats.Stats(prof).sort_stats("tottime").print_stats(22)
        del cache
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
