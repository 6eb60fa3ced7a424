"""Greedy tokens of a compiled, CUDA-graph-replayed StaticKVPackCache decode against the same cache decoded eagerly.

Random-weight Llama with Llama-3-8B's head shapes (``--layers`` decoder layers), ``--batch`` prompts of
``--context`` random tokens, ``--new-tokens`` greedy tokens: ``model.generate`` with ``disable_compile=True``
(eager) and with transformers' default compile path (``torch.compile(mode="reduce-overhead")``, CUDA graphs).
Prints the fraction of equal tokens, the first step where they differ, and the time of each generate.
Usage: ``python benchmarks/compiled_tokens.py --layers 4 --context 2048 --new-tokens 256 --json out.json``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kvpack.bench.generate import build_model
from kvpack.hf.paged_cache import use_paged_attention
from kvpack.hf.static_cache import StaticKVPackCache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--codec", default="int:4")
    parser.add_argument("--json")
    args = parser.parse_args()
    model = build_model(args.layers, "cuda")
    use_paged_attention(model)
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.context), device="cuda", generator=g)
    out = {}
    for mode in ("eager", "compiled", "compiled-again"):
        cache = StaticKVPackCache(model.config, args.context + args.new_tokens, key=args.codec, value=args.codec)
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            tokens = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, do_sample=False,
                                    max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                    disable_compile=mode == "eager")  # fmt: skip
        torch.cuda.synchronize()
        out[mode] = {"seconds": time.perf_counter() - start, "tokens": tokens[:, args.context :].tolist()}
    eager = torch.tensor(out["eager"]["tokens"])
    report = {"args": vars(args)}
    for mode in ("compiled", "compiled-again"):
        other = torch.tensor(out[mode]["tokens"])
        same = eager == other
        diff = (~same).any(0).nonzero()
        report[mode] = {"equal_fraction": same.float().mean().item(),
                        "first_difference": int(diff[0]) if len(diff) else None, "seconds": out[mode]["seconds"]}  # fmt: skip
        print(mode, report[mode])
    report["eager"] = {"seconds": out["eager"]["seconds"]}
    print("eager", report["eager"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
