"""How long preset calibration and `kvpack allocate` take on a 7-8B model on one GPU (issue 12: <= 10 minutes).

A random-weight Llama-3-8B-shaped model (32 layers, 32 query / 8 KV heads, head_dim 128, bf16) stands in for a real
one: the time depends on the shapes, not the weights. Random token ids stand in for the calibration text (the same
lengths as the defaults). Timed, each from the model in memory (loading a checkpoint is not counted):

- ``preset``: `kvpack.tuning.recipe.measure_sensitivity` (what ``--preset 4bit`` runs the first time on a model)
  and the three budgets solved from its table;
- ``allocate``: `kvpack.tuning.sensitivity.measure_sensitivity` with `kvpack allocate`'s defaults (the presets'
  K and V candidates, 2 windows of 512 + 64 tokens, residual 128, sinks 4, centered keys) and the knapsack at 4 bits.

    python benchmarks/calibrate_gpu.py [--layers 32] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kvpack.bench.generate import build_model
from kvpack.codec import get_codec
from kvpack.tuning import recipe
from kvpack.tuning.allocate import stream_candidates
from kvpack.tuning.knapsack import allocate_bits
from kvpack.tuning.sensitivity import measure_sensitivity


def _windows(vocab: int, count: int, length: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g) for _ in range(count)]


def _timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model = build_model(args.layers, "cuda", torch.bfloat16)
    config = model.config
    vocab = config.vocab_size
    rows = {"layers": args.layers, "device": torch.cuda.get_device_name(), "dtype": "bfloat16"}

    windows = _windows(vocab, recipe.CALIB_WINDOWS, recipe.CALIB_CTX + recipe.CALIB_TOKENS)
    table, seconds = _timed(lambda: recipe.measure_sensitivity(model, windows, recipe.CALIB_CTX, progress=False))
    solved = {}
    start = time.perf_counter()
    for name, budget in recipe.BUDGETS.items():
        policy = recipe.solve_budget(table, config, budget)
        solved[name] = recipe.held_bits(policy, config)
    rows["preset"] = {"measure_s": seconds, "solve_s": time.perf_counter() - start, "held_bits": solved,
                      "items": int((~table.isnan()).sum()), "windows": len(windows)}  # fmt: skip
    print(f"preset calibration: {seconds:.1f} s measuring, {rows['preset']['solve_s']:.1f} s solving 3 budgets")

    keys, values = stream_candidates(None, None, config.head_dim)
    candidates = tuple(dict.fromkeys(keys + values))
    windows = _windows(vocab, 2, 512 + 64, seed=1)
    kl, seconds = _timed(lambda: measure_sensitivity(model, windows, 512, candidates, 128, 4, progress=False,
                                                     key_candidates=keys, value_candidates=values,
                                                     center_keys=recipe.CENTER_KEYS))  # fmt: skip
    bits = [get_codec(c, head_dim=config.head_dim).bits_per_value() for c in candidates]
    start = time.perf_counter()
    allocate_bits(kl.reshape(args.layers * 2, -1), bits, 4.0)
    rows["allocate"] = {"measure_s": seconds, "solve_s": time.perf_counter() - start,
                        "items": int((~kl.isnan()).sum()), "windows": len(windows)}  # fmt: skip
    print(f"allocate: {seconds:.1f} s measuring, {rows['allocate']['solve_s']:.2f} s solving")
    rows["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
