"""Experiment (issue 12): the preset recipe solved for write-time quantization, to compare with llama.cpp in-forward.

The shipped recipes assume generation's 16-bit window of the newest tokens (``RESIDUAL`` 16); llama.cpp's cache types
and the ``inforward`` protocol have none. This solves the same budget with the same candidates over a sensitivity
table measured with no window (``residual=0``, ``block=1``: each continuation token attends to a past packed token by
token), and writes one policy file per budget for ``kvpack eval --policy FILE --protocol inforward``.
Usage: ``python benchmarks/write_time_recipe.py OUT_DIR [4bit 3bit]`` (SmolLM2 on the CPU: ~5 minutes).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from kvpack.evaluation.models import load
from kvpack.policy import save_policy
from kvpack.tuning import recipe, sensitivity


def main() -> None:
    out = Path(sys.argv[1])
    names = sys.argv[2:] or ["4bit", "3bit"]
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load("smollm2")
    windows = recipe._calibration_windows(model, None, tokenizer)
    start = time.perf_counter()
    d = sensitivity.measure_sensitivity(model, windows, recipe.CALIB_CTX, recipe.CANDIDATES, 0, recipe.SINKS, True,
                                        recipe.KEY_CANDIDATES, recipe.VALUE_CANDIDATES, 1)  # fmt: skip
    print(f"sensitivity without a window: {time.perf_counter() - start:.0f} s", flush=True)
    recipe.RESIDUAL, recipe.BLOCK = 0, 1  # the recipe's cache shape, for solve_budget and held_bits
    for name in names:
        policy = recipe.solve_budget(d, model.config, recipe.BUDGETS[name])
        bits = recipe.held_bits(policy, model.config)
        save_policy(policy, out / f"write-time-{name}.json", preset=name, held_bits=bits, residual_window=0)
        print(name, f"{bits:.3f} bits", "K:", policy.layer_keys, "V:", policy.layer_values, flush=True)


if __name__ == "__main__":
    main()
