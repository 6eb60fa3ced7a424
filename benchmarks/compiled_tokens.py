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
from kvpack.hf.attention import use_paged_attention
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
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.context), device="cuda", generator=g)
    report = {"args": vars(args)}
    for cache_name in ("kvpack", "transformers-static"):  # transformers' own pair: the noise floor of compiling
        runs = {mode: _generate(model, ids, args, cache_name, mode) for mode in ("eager", "compiled")}
        eager, compiled = (torch.tensor(runs[m]["tokens"]) for m in ("eager", "compiled"))
        same = eager == compiled
        diff = (~same).any(0).nonzero()
        first = int(diff[0]) if len(diff) else None
        # the eager run's top-1 minus top-2 logit at the first step where the two differ: a near tie or a real gap
        margin = None if first is None else runs["eager"]["margins"][first]
        report[cache_name] = {"equal_fraction": same.float().mean().item(), "first_difference": first,
                              "eager_margin_there": margin, "eager_s": runs["eager"]["seconds"],
                              "compiled_s": runs["compiled"]["seconds"]}  # fmt: skip
        print(cache_name, report[cache_name], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


def _generate(model, ids, args, cache_name: str, mode: str) -> dict:
    from transformers import StaticCache

    length = args.context + args.new_tokens
    if cache_name == "kvpack":
        use_paged_attention(model)
        cache = StaticKVPackCache(model.config, length, key=args.codec, value=args.codec)
    else:
        model.set_attn_implementation("sdpa")
        cache = StaticCache(config=model.config, max_cache_len=length)
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, do_sample=False,
                             max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, output_scores=True,
                             return_dict_in_generate=True, disable_compile=mode == "eager")  # fmt: skip
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    top2 = torch.stack(out.scores).float().topk(2, dim=-1).values  # (steps, batch, 2)
    margins = (top2[..., 0] - top2[..., 1]).min(dim=1).values.tolist()
    return {"seconds": seconds, "tokens": out.sequences[:, args.context :].tolist(), "margins": margins}


if __name__ == "__main__":
    main()
