"""Cross-check of `kvpack bench generate`: decode speed of a plain greedy loop of ``model()`` calls (no ``generate``).

Usage (CUDA machine, repository root): ``python benchmarks/generate_loop.py OUT CONTEXT LAYERS CACHES``, e.g.
``python benchmarks/generate_loop.py out 32768 32 int:4,dynamic``. Same random-weight Llama-3-8B-shaped model
and cache construction as `kvpack.bench.generate`; the context is prefilled in 4096-token chunks, then 40
one-token steps are timed one by one (synchronized); the median of steps 8..39 is reported. Writes
``OUT/gen_loop.json``.
"""

import json
import sys
import time

import torch

from kvpack import bench_generate as bg


def main() -> int:
    out_dir, context, layers, caches = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(",")
    model = bg.build_model(layers, "cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, context), device="cuda", generator=g)
    rows = []
    for name in caches:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        cache = bg._make_cache(name, model, 128, 4)
        with torch.inference_mode():
            for at in range(0, context - 1, 4096):
                model(ids[:, at : min(at + 4096, context - 1)], past_key_values=cache, logits_to_keep=1)
            token, times = ids[:, -1:], []
            for _ in range(40):
                torch.cuda.synchronize()
                start = time.perf_counter()
                token = model(token, past_key_values=cache).logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        steady = sorted(times[8:])[len(times[8:]) // 2]
        row = {"cache": name, "context": context, "layers": layers, "loop_ms_per_token_median": 1e3 * steady,
               "loop_ms_first": 1e3 * times[0], "peak_gib": torch.cuda.max_memory_allocated() / 2**30}  # fmt: skip
        print(row, flush=True)
        rows.append(row)
        del cache
    with open(f"{out_dir}/gen_loop.json", "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
