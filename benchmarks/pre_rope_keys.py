"""Pre-RoPE vs post-RoPE per-channel int keys on SmolLM2 + WikiText-2 (8 windows, ctx 1024): the BENCHMARKS table.

``python benchmarks/pre_rope_keys.py [TEXT]`` (TEXT: a text file; default: the evaluation's default text).
"""

import sys

import torch

from kvpack import evaluate
from kvpack.evaluation.models import load


def main(text: str | None) -> None:
    torch.manual_seed(0)
    m = load("smollm2")
    memo = {}
    for key, value, res, only in [
        ("int:2:axis=channel", "int:2", 128, None),
        ("int:2:axis=channel", "int:2", 128, "k"),
        ("int:3:axis=channel", "int:3", 128, "k"),
        ("int:4:axis=channel", "int:4", 128, "k"),
    ]:
        for pre in (False, True):
            r = evaluate(
                m,
                text=text,
                key=key,
                value=value,
                residual=res,
                sinks=4,
                only=only,
                windows=8,
                progress=False,
                reference_memo=memo,
                pre_rope_keys=pre,
            )
            print(
                f"| `{key}` | `{value if only is None else 'fp16'}` | {pre} | {r.bits_k:.3f} | {r.bits_v:.3f} | {r.delta_ppl_pct:+.2f} (+-{r.delta_ppl_pct_std:.2f}) | {100 * r.top1:.2f}% | {r.kl:.4f} |",
                flush=True,
            )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
