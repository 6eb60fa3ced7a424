"""Calibration text kept apart from the evaluation text.

`kvpack.evaluate` scores ``windows`` spans of ``ctx + n_eval`` tokens evenly spread over the text
(`kvpack.evaluation.evaluate.window_starts`). Calibration (sensitivities for `kvpack allocate`,
fitted codebooks) must not see those tokens, or the evaluation would measure the fit to its own
data. :func:`calibration_ids` therefore draws its spans from the tokens that no evaluation with
the default span length (1024 + 256) and any of ``EVAL_WINDOW_COUNTS`` windows touches.
"""

from __future__ import annotations

import torch

from kvpack.evaluation.evaluate import window_starts

__all__ = ["EVAL_LENGTH", "EVAL_WINDOW_COUNTS", "calibration_ids", "calibration_starts", "evaluation_spans"]

EVAL_LENGTH = 1024 + 256  # default ctx + n_eval of `kvpack eval`
EVAL_WINDOW_COUNTS = (1, 2, 4, 8, 16)


def evaluation_spans(n_tokens: int, length: int = EVAL_LENGTH, counts=EVAL_WINDOW_COUNTS) -> list[tuple[int, int]]:
    """``[start, end)`` of every evaluation window for each window count in ``counts`` that fits."""
    spans = []
    for w in counts:
        if w * length <= n_tokens:
            spans += [(s, s + length) for s in window_starts(n_tokens, length, w)]
    return sorted(spans)


def calibration_starts(n_tokens: int, length: int, count: int, avoid: list[tuple[int, int]]) -> list[int]:
    """``count`` starts of spans of ``length`` tokens that overlap no span of ``avoid``, evenly spread."""
    if count < 1 or length < 1:
        raise ValueError(f"count and length must be >= 1, got {count}, {length}")
    free, pos = [], 0
    for s in range(0, n_tokens - length + 1, length):  # a grid of candidate spans
        if all(s + length <= a or s >= b for a, b in avoid):
            free.append(s)
        pos = s
    if len(free) < count:
        raise ValueError(
            f"only {len(free)} spans of {length} tokens avoid the evaluation windows in {n_tokens} tokens "
            f"(last candidate {pos}); {count} asked: use a longer text or fewer/shorter calibration windows"
        )
    step = len(free) / count
    return [free[int(i * step + step / 2)] for i in range(count)]


def calibration_ids(ids: torch.Tensor, length: int, count: int) -> list[torch.Tensor]:
    """``count`` windows (1-D token ids, ``length`` each) of ``ids`` disjoint from the evaluation windows."""
    n = ids.numel()
    starts = calibration_starts(n, length, count, evaluation_spans(n))
    return [ids[s : s + length] for s in starts]


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="smollm2")


def run(args) -> int:
    raise ValueError("kvpack calibrate: codebook fitting is not built yet; only calibration_ids() exists")
