"""``kvpack bench generate``: end-to-end decode speed (``model.generate``, `kvpack.graph_generate`) and peak memory.

The model is a random-weight Llama with Llama-3-8B's shapes (hidden 4096, 32 q / 8 kv heads, head_dim
128, intermediate 14336, vocab 128256, float16; ``--layers`` shrinks it): speed does not depend on the
weights' values. For each cache in ``--caches``: prefill ``context - 1`` random tokens once, in chunks of
``--prefill-chunk`` (each chunk's SDPA mask is ``chunk x context`` booleans, never ``context^2``, and only
the last position's logits are computed), then ``model.generate`` from the full ``context`` ids: the cache
already holds all but the last token, so every forward of generate is a one-token decode step. A short
untimed generate (``--warmup-tokens``: Triton compilation, allocator warm-up) precedes the timed one of
``--new-tokens`` tokens (``torch.cuda.synchronize`` around it). Prefill is not timed into tokens/s.

Caches: a kvpack codec spec (``turbo_mse:4``, ``int:4``: `PagedKVPackCache`, same codec for K and V,
decode through the paged kernel), ``dynamic`` (transformers' DynamicCache, float16), ``quanto:N`` / ``hqq:N``
(transformers' QuantizedCache with the optimum-quanto / HQQ backend at N = 2 or 4 bits, skipped with a note
when the package is absent; quanto builds its CUDA extension at first use, which can take minutes),
``static:SPEC`` / ``hf-static`` (kvpack's `StaticKVPackCache` / transformers' StaticCache: generate compiles the
step), and ``graph:SPEC`` / ``graph:hf-static``: the same static caches decoded by `kvpack.graph_generate` instead
of ``model.generate`` (the compiled step replayed from one CUDA graph per token, no host loop between tokens).

``--batch`` and ``--context`` take comma-separated lists: every batch at every context, one model for all of them
(``--batch 1,8,32 --context 8192,32768,131072``: the grid issue 13 asks for); a cache that runs out of memory in a
cell becomes a row that says so, and ``--max-tokens N`` skips, with such a row, the cells of more than N tokens
(batch x context) before their prefill (which takes minutes at millions of tokens). ``--fit`` finds the largest
batch at each context.

``--fuse-projections``: `kvpack.fuse_projections` on the model before any cache runs (each layer's q/k/v and
gate/up as one matrix product), so every cache of the run, transformers' included, decodes with the same weights.

``prefill_chunk_s``: the seconds of each prefill chunk (the first pays the kernels' first-use compiles).
Memory (``torch.cuda.max_memory_allocated``, reset before each cache's prefill): ``peak_gib`` over prefill
and decode, ``prefill_peak_gib`` over prefill and warm-up, ``decode_peak_gib`` over the timed decode only, ``held_gib`` allocated after the decode minus
before the prefill (the cache and anything it keeps alive), ``weights_gib`` the model.
"""

from __future__ import annotations

import argparse
import gc
import logging
import time

import torch

from kvpack.hf.cache import KVPackCache
from kvpack.hf.config import cache_kwargs
from kvpack.hf.fuse import fuse_projections
from kvpack.hf.graph_generate import GraphDecoder
from kvpack.hf.paged_cache import PagedLayer
from kvpack.hf.static_cache import StaticKVPackCache
from kvpack.tuning.recipe import BUDGETS

__all__ = ["DEFAULT_CACHES", "add_arguments", "build_model", "measure", "parse_caches", "run_caches", "run_generate"]

logger = logging.getLogger(__name__)

# kvpack through its replayed loop and through transformers' compiled generate (the 4bit rule), the paged cache
# eager, and transformers' fp16 static (compiled) and dynamic caches: the comparison issue 13 asks for in one run
DEFAULT_CACHES = ("graph:4bit", "static:4bit", "int:4", "hf-static", "dynamic")
LLAMA3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "rope_theta": 500000.0,
    "max_position_embeddings": 131072,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``kvpack bench generate`` (the other ``bench`` options are ignored by it)."""
    group = parser.add_argument_group("generate")
    group.add_argument("--context", default="32768",
                       help="generate: tokens in the cache before decoding; a comma-separated list measures each")
    group.add_argument("--max-tokens", type=int, default=0,
                       help="generate: skip (with a row saying so) the cells whose batch x context exceeds this; 0: none")
    group.add_argument("--new-tokens", type=int, default=128, help="generate: timed decode tokens")
    group.add_argument("--warmup-tokens", type=int, default=8, help="generate: untimed decode tokens first")
    group.add_argument("--layers", type=int, default=32, help="generate: decoder layers (Llama-3-8B: 32)")
    group.add_argument("--batch", default="1",
                       help="generate: sequences decoded together; a comma-separated list measures each (with "
                       "--context's list: every batch at every context)")
    group.add_argument("--prefill-chunk", type=int, default=4096, help="generate: tokens per prefill forward")
    group.add_argument(
        "--caches",
        default=",".join(DEFAULT_CACHES),
        help="generate: kvpack codec specs (PagedKVPackCache), 'static:SPEC' (StaticKVPackCache, generate compiles "
        "it), 'static-eager:SPEC', 'dynamic', 'hf-static' (transformers' StaticCache, compiled), 'quanto:N', 'hqq:N'; "
        "'graph:SPEC' / 'graph:hf-static': that static cache decoded by kvpack.graph_generate (one CUDA graph a "
        "step)",
    )
    group.add_argument("--fit", action="store_true",
                       help="generate: instead of timing, find by allocation the largest batch at --context and the "
                       "longest context at batch 1 that fit in GPU memory (pre-allocating caches only: static:SPEC, "
                       "hf-static)")  # fmt: skip
    group.add_argument("--fuse-projections", action="store_true",
                       help="generate: fuse each layer's q/k/v and gate/up projections into one matrix product "
                       "(kvpack.fuse_projections), for every cache of the run")  # fmt: skip
    group.add_argument("--residual", type=int, default=128, help="generate: kvpack 16-bit residual window")
    group.add_argument("--sinks", type=int, default=4, help="generate: kvpack 16-bit attention sinks")


def parse_caches(text: str, head_dim: int = 128) -> list[str]:
    """Validated cache names from ``--caches``: codec specs the paged kernels take, ``dynamic``, ``quanto:2|4``."""
    from kvpack import get_codec
    from kvpack.kernels.paged import paged_codec

    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise ValueError(f"--caches must name at least one cache, got {text!r}")
    for name in names:
        if name.startswith("graph:"):  # graph_generate over a static cache: checked as that cache
            name = _graph_target(name)
        if name in ("dynamic", "hf-static"):
            continue
        static = name.startswith(("static:", "static-eager:"))
        for prefix in ("static:", "static-eager:"):
            name = name.removeprefix(prefix)
        if static and name in BUDGETS:  # a preset, derived from the config alone (random weights: no calibration)
            continue
        if name.startswith(("quanto:", "hqq:")):
            backend = name.split(":")[0]
            if name not in (f"{backend}:2", f"{backend}:4"):
                raise ValueError(f"--caches: {backend} takes 2 or 4 bits, got {name!r}")
            continue
        try:
            paged_codec(get_codec(name, head_dim=head_dim))
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(
                f"--caches: {name!r} is not 'dynamic', 'quanto:N', 'hqq:N' or a paged-kernel codec: {exc}"
            ) from None
    return names


def int_list(value, name: str) -> list[int]:
    """``value`` (an int, or comma-separated integers) as a list of positive integers; ``name`` is its option."""
    from kvpack.evaluation.haystack import comma_ints

    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return [value]
    return comma_ints(str(value), f"--{name} must be comma-separated integers >= 1, got {value!r}")


def grid(args) -> list[tuple[int, int]]:
    """The ``(batch, context)`` cells of a run: every ``--batch`` at every ``--context``, contexts outer."""
    return [(b, c) for c in int_list(args.context, "context") for b in int_list(args.batch, "batch")]


def _check_args(args) -> list[str]:
    cells = grid(args)
    for name in ("new_tokens", "layers", "prefill_chunk"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("warmup_tokens", "residual", "sinks", "max_tokens"):
        if getattr(args, name, 0) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if min(c for _, c in cells) < 2:
        raise ValueError(f"--context must be >= 2 (a prefill and a first decode token), got {args.context}")
    return parse_caches(args.caches)


def build_model(layers: int, device: str | torch.device = "cuda", dtype: torch.dtype = torch.float16, **shape):
    """Random-weight LlamaForCausalLM with Llama-3-8B's shapes (``shape`` overrides them), eval mode, on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**LLAMA3_8B, **shape, "num_hidden_layers": layers})
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialize in the target dtype: no float32 copy of 8B weights on the device
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    return model.eval()


def _make_cache(name: str, model, residual: int, sinks: int, max_cache_len: int):
    """The cache called ``name``, with the model's attention set to what it needs.

    Peers are built by `kvpack.evaluation.peers.peer_factory` (transformers' `QuantizedCache`, which also
    counts its bytes); it raises ImportError naming the install when the backend package is missing.
    """
    if name.startswith("graph:"):  # the static cache that graph_generate replays
        return _make_cache(_graph_target(name), model, residual, sinks, max_cache_len)
    if name == "hf-static":  # transformers' StaticCache: generate compiles the decode step by itself on CUDA
        from transformers import StaticCache

        model.set_attn_implementation("sdpa")
        return StaticCache(config=model.config, max_cache_len=max_cache_len)
    if name.startswith(("static:", "static-eager:")):
        from kvpack.hf.attention import use_paged_attention
        from kvpack.hf.static_cache import StaticKVPackCache

        use_paged_attention(model)
        return StaticKVPackCache(
            model.config, max_cache_len, policy=_static_policy(name, model.config, residual, sinks)
        )
    if name == "dynamic" or name.startswith(("quanto:", "hqq:")):
        from transformers import DynamicCache

        from kvpack.evaluation.peers import peer_factory

        make = (lambda config: DynamicCache(config=config)) if name == "dynamic" else peer_factory(name)
        model.set_attn_implementation("sdpa")
        return make(model.config)
    from kvpack.hf.attention import use_paged_attention
    from kvpack.hf.paged_cache import PagedKVPackCache

    use_paged_attention(model)
    return PagedKVPackCache(model.config, key=name, value=name, residual=residual, sinks=sinks)


def _graph_target(name: str) -> str:
    """The static cache that ``graph:NAME`` decodes: ``graph:hf-static`` -> ``hf-static``, ``graph:SPEC`` ->
    ``static:SPEC``."""
    spec = name.removeprefix("graph:")
    return spec if spec == "hf-static" else f"static:{spec}"


def _static_policy(name: str, config, residual: int, sinks: int):
    """The policy of a ``static:SPEC`` / ``static-eager:SPEC`` cache: a preset's config rule, or SPEC for K and V."""
    from kvpack.policy import CachePolicy
    from kvpack.tuning.recipe import rule_policy

    spec = name.split(":", 1)[1]
    if spec in BUDGETS:
        return rule_policy(spec, config)
    return CachePolicy(spec, spec, residual=residual, sinks=sinks)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model, name: str, ids: torch.Tensor, *, new_tokens: int, warmup_tokens: int = 8,
            prefill_chunk: int = 4096, residual: int = 128, sinks: int = 4) -> dict:  # fmt: skip
    """Prefill ``ids[:, :-1]`` into cache ``name`` (chunked), then time ``generate`` of ``new_tokens`` from ``ids``."""
    device = ids.device
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if cuda else 0
    try:
        cache = _make_cache(name, model, residual, sinks, ids.shape[1] + warmup_tokens + new_tokens)
    except ImportError as exc:  # a peer whose package is not installed
        return {"cache": name, "skipped": str(exc)}
    batch, context = ids.shape
    mask = torch.ones_like(ids)
    row = {"cache": name, "batch": batch, "context": context}
    with torch.inference_mode():
        _sync(device)
        start = time.perf_counter()
        chunks = []  # seconds per chunk: the first one pays the kernels' first-use compiles
        for at in range(0, context - 1, prefill_chunk):
            end = min(at + prefill_chunk, context - 1)
            model(ids[:, at:end], attention_mask=mask[:, :end], logits_to_keep=1, **cache_kwargs(model, cache))
            _sync(device)
            chunks.append(time.perf_counter() - start - sum(chunks))
        row["prefill_s"] = time.perf_counter() - start
        row["prefill_chunk_s"] = chunks
        generate = {"attention_mask": mask, **cache_kwargs(model, cache), "do_sample": False}
        if name.startswith("static-eager:"):
            generate["disable_compile"] = True
        if name.startswith("graph:"):  # one captured step, replayed per token (kvpack.graph_generate)
            decoder = GraphDecoder(model, cache)
            run = lambda ids_, n: decoder.generate(ids_, n)
        else:
            run = lambda ids_, n: model.generate(ids_, max_new_tokens=n, min_new_tokens=n, **generate)
        out = ids
        if warmup_tokens:
            out = run(out, warmup_tokens)
            generate["attention_mask"] = torch.ones_like(out)
        if cuda:  # the prefill's (and warm-up's) peak, then the timed decode's alone
            row["prefill_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        start = time.perf_counter()
        final = run(out, new_tokens)
        _sync(device)
        seconds = time.perf_counter() - start
    made = final.shape[1] - out.shape[1]
    if made != new_tokens:
        raise RuntimeError(f"generate made {made} tokens, not {new_tokens}")
    row.update(
        {
            "new_tokens": new_tokens,
            "decode_s": seconds,
            "tokens_per_s": batch * new_tokens / seconds,
            "ms_per_token": 1e3 * seconds / new_tokens,
            "cache_seq_length": int(cache.get_seq_length()),
        }
    )
    if isinstance(cache, StaticKVPackCache):  # bytes allocated for max_cache_len tokens
        row["bits_per_value"] = cache.bits_per_value()
        row["nbytes"] = cache.nbytes()
        row["paged_layers"] = sum(not layer.dense for layer in cache.layers)
    elif isinstance(cache, KVPackCache):  # kvpack: measured bytes; layers whose decode ran on the pages
        row["bits_per_value"] = cache.bits_per_value()
        row["nbytes"] = cache.nbytes()
        row["paged_layers"] = sum(isinstance(layer, PagedLayer) for layer in cache.layers)
    elif name in ("dynamic", "hf-static", "graph:hf-static"):
        row["nbytes"] = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    if cuda:
        row["decode_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["peak_gib"] = max(row["decode_peak_gib"], row["prefill_peak_gib"])
        row["held_gib"] = (torch.cuda.memory_allocated(device) - before) / 2**30
    del cache, out, final
    return row


def run_generate(args) -> dict:
    """Validate the options (before any device check), refuse without CUDA, then measure every cache."""
    caches = _check_args(args)
    if not torch.cuda.is_available():
        raise ValueError("kvpack bench generate needs a CUDA GPU (it times the Triton decode kernel); none found")
    if getattr(args, "fit", False):
        return run_fit(args, caches, "cuda")
    return run_caches(args, caches, "cuda")


def fits(model, name: str, batch: int, max_cache_len: int, residual: int = 128, sinks: int = 4) -> bool:
    """Whether cache ``name`` for ``batch`` sequences of ``max_cache_len`` tokens, a 16-token prefill and one decode
    step fit in the device's memory: the pre-allocating caches take their whole size at the first update."""
    device = next(model.parameters()).device
    gc.collect()
    torch.cuda.empty_cache()
    cache = None
    try:
        cache = _make_cache(name, model, residual, sinks, max_cache_len)
        ids = torch.randint(3, 1000, (batch, 16), device=device)
        with torch.inference_mode():
            model(ids, logits_to_keep=1, **cache_kwargs(model, cache))
            model(ids[:, :1], logits_to_keep=1, **cache_kwargs(model, cache))
        torch.cuda.synchronize(device)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        del cache
        gc.collect()
        torch.cuda.empty_cache()


def _largest(ok, low: int, high: int) -> int:
    """Largest ``n`` in ``[low, high]`` with ``ok(n)`` (``ok`` monotone, ``ok(low)`` assumed; doubling, then bisection)."""
    while high > low:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if ok(mid) else (low, mid - 1)
    return low


def run_fit(args, caches: list[str], device: str | torch.device) -> dict:
    """For each pre-allocating cache: the largest batch at each ``--context`` and the longest context at batch 1."""
    model = build_model(args.layers, torch.device(device))
    contexts = int_list(args.context, "context")
    ok = lambda name, batch, tokens: fits(model, name, batch, tokens, args.residual, args.sinks)
    rows = []
    for name in caches:
        if not (name == "hf-static" or name.startswith("static:")):
            rows.append({"cache": name, "skipped": "--fit measures pre-allocating caches (static:SPEC, hf-static)"})
            continue
        top = max(1, contexts[0] // 1024)  # in units of 1024 tokens
        while ok(name, 1, top * 2048):
            top *= 2
        longest = 1024 * _largest(lambda k, name=name: ok(name, 1, 1024 * k), top, 2 * top - 1)
        for context in contexts:
            row = {"cache": name, "context": context, "max_context_batch1": longest}
            if not ok(name, 1, context):
                row["max_batch"] = 0
            else:
                top = 1
                while ok(name, top * 2, context):
                    top *= 2
                row["max_batch"] = _largest(lambda b, name=name, c=context: ok(name, b, c), top, 2 * top - 1)
            rows.append(row)
            print(f"{name:>14}: max batch at {context} tokens {row['max_batch']}, "
                  f"max context at batch 1 {longest}", flush=True)  # fmt: skip
    return {"rows": rows}


def run_caches(args, caches: list[str], device: str | torch.device, **shape) -> dict:
    """Build the model (``shape`` overrides Llama-3-8B's), then `measure` each cache at each ``(batch, context)``
    cell of `grid`; a failing cache, one that runs out of memory and a cell over ``--max-tokens`` become rows."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    model = build_model(args.layers, device, **shape)
    fused = fuse_projections(model) if getattr(args, "fuse_projections", False) else 0
    weights = torch.cuda.memory_allocated(device) / 2**30 if cuda else None
    copy_gbps = _copy_bandwidth(device) if cuda else None
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    limit = getattr(args, "max_tokens", 0)
    rows = []
    for batch, context in grid(args):
        g = torch.Generator(device=device).manual_seed(0)
        ids = torch.randint(3, model.config.vocab_size, (batch, context), device=device, generator=g)
        for name in caches:
            cell = {"cache": name, "batch": batch, "context": context}
            if limit and batch * context > limit:
                row = {**cell, "skipped": f"batch x context = {batch * context} tokens > --max-tokens {limit}"}
            else:
                row = _measure_row(model, name, ids, args, cell)
            if copy_gbps and "ms_per_token" in row:  # weights + the K/V a step reads, at the copy bandwidth
                read = weight_bytes + _kv_bytes_read(name, model.config, batch, context)
                row["floor_ms_per_token"] = read / copy_gbps / 1e6
                row["x_floor"] = row["ms_per_token"] / row["floor_ms_per_token"]
            rows.append(row)
            print(_line(row), flush=True)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        del ids
    model.set_attn_implementation("sdpa")
    config = {"layers": args.layers, **LLAMA3_8B, **shape, "dtype": "float16", "fused_projection_groups": fused}
    return {"model": config, "weights_gib": weights, "copy_gbps": copy_gbps, "rows": rows}


def _measure_row(model, name: str, ids: torch.Tensor, args, cell: dict) -> dict:
    """`measure`, with out-of-memory and any other failure of this one cache turned into a row."""
    try:
        return measure(model, name, ids, new_tokens=args.new_tokens, warmup_tokens=args.warmup_tokens,
                       prefill_chunk=args.prefill_chunk, residual=args.residual, sinks=args.sinks)  # fmt: skip
    except torch.cuda.OutOfMemoryError as exc:
        return {**cell, "skipped": f"out of memory: {str(exc).splitlines()[0]}"}
    except Exception as exc:  # one failing cache (e.g. a quanto build problem) must not lose the other rows
        logger.exception("kvpack bench generate: %s failed", name)
        return {**cell, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}


def _copy_bandwidth(device: torch.device, nbytes: int = 2**31) -> float:
    """GB/s of a device-to-device copy of ``nbytes`` (read + write counted), best of 5."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(6):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    del src, dst
    return 2 * nbytes / best / 1e9


def _kv_bytes_read(name: str, config, batch: int, context: int) -> int:
    """Bytes of K and V that one decode step reads at ``context`` tokens: packed rows for kvpack specs, else 16 bits."""
    from kvpack.kernels.paged import paged_codec

    name = _graph_target(name) if name.startswith("graph:") else name
    tokens = batch * context * config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if name in ("dynamic", "hf-static") or name.startswith(("quanto:", "hqq:")):  # 16-bit K/V
        return tokens * config.num_hidden_layers * 2 * 2 * head_dim
    policy = _static_policy(name if name.startswith("static") else f"static:{name}", config, 0, 0)
    rows = 0
    for layer in range(config.num_hidden_layers):
        rows += sum(paged_codec(c).row_bytes for c in policy.codecs(head_dim, layer, config.num_key_value_heads))
    return tokens * rows


def _line(row: dict) -> str:
    if "skipped" in row or "error" in row:
        where = f"ctx {row['context']} batch {row['batch']}: " if "context" in row and "batch" in row else ""
        return f"{row['cache']:>12}: {where}" + (
            f"skipped ({row['skipped']})" if "skipped" in row else f"ERROR {row['error']}"
        )
    text = (
        f"{row['cache']:>12}: ctx {row['context']} batch {row['batch']}: {row['tokens_per_s']:8.1f} tok/s "
        f"{row['ms_per_token']:7.2f} ms/token, prefill {row['prefill_s']:.1f} s"
    )
    if len(row.get("prefill_chunk_s", ())) > 1:
        text += f" (first chunk {row['prefill_chunk_s'][0]:.1f} s)"
    if "x_floor" in row:
        text += f" ({row['x_floor']:.2f}x the byte floor)"
    if "peak_gib" in row:
        text += f", peak {row['peak_gib']:.2f} GiB (decode {row['decode_peak_gib']:.2f}, held {row['held_gib']:.2f})"
    return text
