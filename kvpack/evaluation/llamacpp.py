"""llama.cpp's quantized KV cache as a peer (`kvpack sweep --llamacpp q4_0 q8_0/q4_0`), through llama-cpp-python.

llama.cpp holds K and V in blocks of 32 values with one fp16 scale (and a minimum for the ``_1`` types): ``q8_0``
8.5 bits per value, ``q5_1`` 6, ``q5_0`` 5.5, ``q4_1`` 5, ``q4_0`` and ``iq4_nl`` 4.5 (``-ctk``/``-ctv`` of its
tools). A token's K/V are quantized when they enter the cache, and each micro-batch of the prefill attends to the
cache it has just written: its prefill already attends to quantized K/V, as kvpack's ``inforward`` protocol does
(`kvpack.evaluation.protocol.inforward_logits`). So a row here is an in-forward measurement.

The windows and token ids are `kvpack.evaluate`'s (the same text, tokenizer and `window_starts`), the model the
GGUF file (SmolLM2's own ``Q4_1`` weights for ``--model smollm2``), and the reference is llama.cpp's f16 cache
with the same flash-attention setting (a quantized V cache needs flash attention), so a row measures the cache
type alone. ``f16:fa=off`` (the f16 cache without flash attention, against the reference with it) is the noise
floor of such a comparison.

Optional: ``pip install llama-cpp-python`` (it compiles llama.cpp: ~10 minutes on 2 cores; not in CI's install).
"""

from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kvpack.evaluation.evaluate import EvalResult, _compare, _result, _window_row
from kvpack.evaluation.protocol import window_starts

__all__ = ["CACHE_TYPES", "LlamaCppSpec", "available", "evaluate_llamacpp", "parse_llamacpp"]

# name -> (ggml type id, bits per value as held: 32 values share a block's scale, and its minimum for _1 types)
CACHE_TYPES = {
    "f16": (1, 16.0), "q8_0": (8, 8.5), "q5_1": (7, 6.0), "q5_0": (6, 5.5), "q4_1": (3, 5.0), "q4_0": (2, 4.5),
    "iq4_nl": (20, 4.5),
}  # fmt: skip
PREFIX = "llamacpp:"


@dataclass(frozen=True)
class LlamaCppSpec:
    """llama.cpp's K and V cache types, and whether flash attention is on."""

    key: str
    value: str
    flash_attn: bool = True

    @property
    def name(self) -> str:
        types = self.key if self.key == self.value else f"{self.key}/{self.value}"
        return f"{PREFIX}{types}" + ("" if self.flash_attn else ":fa=off")

    @property
    def bits(self) -> tuple[float, float]:
        return CACHE_TYPES[self.key][1], CACHE_TYPES[self.value][1]


def parse_llamacpp(spec: str) -> LlamaCppSpec:
    """``[llamacpp:]K[/V][:fa=off]`` (e.g. ``q4_0``, ``q8_0/q4_0``, ``f16:fa=off``) -> `LlamaCppSpec`; a
    ValueError names what is wrong."""
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"llama.cpp cache spec must be a non-empty string like 'q4_0' or 'q8_0/q4_0', got {spec!r}")
    body = spec[len(PREFIX) :] if spec.startswith(PREFIX) else spec
    types, _, option = body.partition(":")
    if option not in ("", "fa=off", "fa=on"):
        raise ValueError(f"llama.cpp cache spec {spec!r}: the only option is fa=off (or fa=on), got {option!r}")
    key, _, value = types.partition("/")
    value = value or key
    for stream, name in (("K", key), ("V", value)):
        if name not in CACHE_TYPES:
            raise ValueError(f"llama.cpp cache spec {spec!r}: unknown {stream} type {name!r}; known: "
                             f"{', '.join(CACHE_TYPES)}")  # fmt: skip
    flash = option != "fa=off"
    if not flash and value != "f16":
        raise ValueError(f"llama.cpp cache spec {spec!r}: a quantized V cache needs flash attention (no fa=off)")
    return LlamaCppSpec(key, value, flash)


def available() -> bool:
    """Whether llama-cpp-python is installed."""
    return importlib.util.find_spec("llama_cpp") is not None


def _llama(gguf: Path, n_ctx: int, spec: LlamaCppSpec, threads: int | None):
    from llama_cpp import Llama

    return Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, flash_attn=spec.flash_attn,
                 type_k=CACHE_TYPES[spec.key][0], type_v=CACHE_TYPES[spec.value][0], n_threads=threads,
                 seed=0, verbose=False)  # fmt: skip


def _window_logits(llm, window: list[int], ctx: int, n_eval: int) -> torch.Tensor:
    """Logits ``(n_eval, vocab)`` predicting ``window[ctx:]`` after one evaluation of the whole window."""
    llm.reset()
    llm.eval(window)
    return torch.from_numpy(llm.scores[ctx - 1 : ctx - 1 + n_eval].copy())


def evaluate_llamacpp(
    gguf: str | Path,
    ids: torch.Tensor,
    spec: str | LlamaCppSpec,
    ctx: int = 1024,
    n_eval: int = 256,
    windows: int = 8,
    model_name: str = "gguf",
    text_label: str = "token ids",
    threads: int | None = None,
    reference_memo: dict | None = None,
) -> EvalResult:
    """delta-ppl / top-1 / KL of llama.cpp with cache ``spec`` against its f16 cache (same flash-attention setting
    as the spec, except for ``fa=off``, whose reference has it on), on `kvpack.evaluate`'s windows of ``ids`` (1-D
    token ids); bits are the cache types' as held. ``reference_memo``: shared by calls on the same windows."""
    if not available():
        raise ValueError("the llama.cpp peer needs llama-cpp-python: pip install llama-cpp-python")
    spec = parse_llamacpp(spec) if isinstance(spec, str) else spec
    gguf = Path(gguf)
    if not gguf.is_file():
        raise ValueError(f"gguf must be a GGUF file (llama.cpp reads only GGUF), got {str(gguf)!r}")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
        raise TypeError(f"ids must be 1-D token ids, got {type(ids).__name__}")
    starts = window_starts(ids.numel(), ctx + n_eval, windows)
    memo = {} if reference_memo is None else reference_memo
    reference = LlamaCppSpec("f16", "f16", True)
    t0 = time.perf_counter()
    llm = _llama(gguf, ctx + n_eval, spec, threads)
    ref_llm = None
    rows = []
    for start in starts:
        window = ids[start : start + ctx + n_eval].tolist()
        key = ("llamacpp", str(gguf), start, ctx, n_eval)
        if key not in memo:
            ref_llm = ref_llm or (llm if spec == reference else _llama(gguf, ctx + n_eval, reference, threads))
            memo[key] = _window_logits(ref_llm, window, ctx, n_eval)
        out = _window_logits(llm, window, ctx, n_eval)
        rows.append(_window_row(start, _compare(memo[key], out, torch.tensor(window[ctx:]))))
    seconds = (time.perf_counter() - t0) / len(rows)
    record = {"llamacpp": spec.name, "type_k": spec.key, "type_v": spec.value, "flash_attn": spec.flash_attn}
    result = _result(model_name, text_label, "inforward", ctx, n_eval, record, rows, spec.bits, seconds)
    if not math.isfinite(result.kl):
        raise ValueError(f"llama.cpp returned non-finite logits for {spec.name}")
    return result
