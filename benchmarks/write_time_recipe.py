"""Experiment (issue 12): the preset recipe solved for write-time quantization, to compare with llama.cpp in-forward.

The shipped recipes assume generation's 16-bit window of the newest tokens (``RESIDUAL`` 16); llama.cpp's cache types
and the ``inforward`` protocol have none. This solves the same budget with the same candidates over a sensitivity
table measured with no window (``residual=0``, ``block=1``: each continuation token attends to a past packed token by
token), and writes one policy file per budget for ``kvpack eval --policy FILE --protocol inforward``.
``OBJECTIVE``: ``decode`` (the recipes' own measurement with no window) or ``inforward`` (the KL of one in-forward pass
with one layer's stream round-tripped, the measure of the ``inforward`` protocol itself).
Usage: ``python benchmarks/write_time_recipe.py OUT_DIR OBJECTIVE [4bit 3bit 4.5 ...]`` (SmolLM2, CPU: 1 / ~6 minutes).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from tqdm import tqdm

from kvpack.evaluation.models import load
from kvpack.evaluation.protocol import inforward_logits
from kvpack.policy import CachePolicy, save_policy
from kvpack.tuning import recipe, sensitivity


def main() -> None:
    out, objective = Path(sys.argv[1]), sys.argv[2]
    names = sys.argv[3:] or ["4bit", "3bit"]
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load("smollm2")
    windows = recipe._calibration_windows(model, None, tokenizer)
    start = time.perf_counter()
    if objective == "decode":
        d = sensitivity.measure_sensitivity(model, windows, recipe.CALIB_CTX, recipe.CANDIDATES, 0, recipe.SINKS,
                                            True, recipe.KEY_CANDIDATES, recipe.VALUE_CANDIDATES, 1)  # fmt: skip
    else:
        d = inforward_sensitivity(model, windows)
    print(f"sensitivity ({objective}) without a window: {time.perf_counter() - start:.0f} s", flush=True)
    safetensors.torch.save_file({"sensitivity": d.contiguous()}, out / f"sensitivity-{objective}.safetensors")
    recipe.RESIDUAL, recipe.BLOCK = 0, 1  # the recipe's cache shape, for solve_budget and held_bits
    for name in names:  # a preset's name or a budget in bits per value
        policy = recipe.solve_budget(d, model.config, recipe.BUDGETS.get(name) or float(name))
        bits = recipe.held_bits(policy, model.config)
        save_policy(policy, out / f"write-time-{objective}-{name}.json", budget=name, held_bits=bits,
                    residual_window=0, objective=objective)  # fmt: skip
        print(name, f"{bits:.3f} bits", "K:", policy.layer_keys, "V:", policy.layer_values, flush=True)


def inforward_sensitivity(model, windows, scored: int = 256) -> torch.Tensor:
    """``D[layer, stream, candidate]``: mean KL(exact || round-tripped) over the last ``scored`` positions of each
    window in ONE in-forward pass (`kvpack.evaluation.protocol.inforward_logits`) with only that layer's stream
    through the candidate (every position, the prefill included, sees it; the first ``SINKS`` stay 16-bit)."""
    layers = model.config.num_hidden_layers
    d = torch.full((layers, 2, len(recipe.CANDIDATES)), float("nan"), dtype=torch.float64)
    slots = [(layer, stream, j) for layer in range(layers) for stream, allowed in
             enumerate((recipe.KEY_CANDIDATES, recipe.VALUE_CANDIDATES))
             for j, spec in enumerate(recipe.CANDIDATES) if spec in allowed]  # fmt: skip
    with torch.inference_mode():
        refs = [F.log_softmax(inforward_logits(model, w[None], scored, None)[0].float(), -1) for w in windows]
        for layer, stream, j in tqdm(slots, desc="in-forward sensitivity"):
            specs = tuple(recipe.CANDIDATES[j] if i == layer else None for i in range(layers))
            fields = {"layer_keys": specs} if stream == 0 else {"layer_values": specs}
            policy = CachePolicy(None, None, residual=0, sinks=recipe.SINKS, block=1, **fields)
            kl = 0.0
            for w, ref in zip(windows, refs, strict=True):
                out = F.log_softmax(inforward_logits(model, w[None], scored, policy)[0].float(), -1)
                kl += float((ref.exp() * (ref - out)).sum(-1).mean())
            d[layer, stream, j] = kl / len(windows)
    return d


if __name__ == "__main__":
    main()
