"""`graph_generate`: greedy decoding in which every token after the first few replays one captured CUDA graph.

``model.generate`` with a static cache compiles the decode step and replays it as a CUDA graph, but between two
replays the host runs generate's loop (logits processors, stopping criteria with a device sync, input preparation,
the graph tree's checks): on the H200 at batch 1 / 32K that left the GPU idle ~4 ms of an 11.7-ms token
(BENCHMARKS.md, "Where batch 1's time goes"). Here the whole step, the choice of the next token and the bookkeeping
included, is one graph: the next token is taken by ``argmax`` on the device and written into the step's own input
buffer, the positions advance in place, and the host only calls ``replay()``; it reads the device once every
``check_every`` tokens (has every row met ``eos_token_id``?) and once at the end.

The cache must be pre-allocated and graph-safe (`kvpack.StaticKVPackCache`, or transformers' ``StaticCache``):
every buffer a step touches keeps its address, so one capture serves every later step and call. The step itself is
``torch.compile``d (``fullgraph``, no CUDA graphs of its own: this module captures it) when ``compile`` is true, as
transformers' compile path does. Without CUDA (or ``graph=False``) the same loop runs the step eagerly: the tokens
are the ones the graph gives (tests/hf/test_graph_generate.py checks both against ``model.generate``).

Prompts: the ids not yet in the cache are prefilled in chunks of ``prefill_chunk`` tokens (a cache may already hold
a prefix of ``input_ids``). Left padding (``attention_mask`` zeros) is taken with `kvpack.StaticKVPackCache` only,
which never stores padding; transformers' StaticCache stores it and would need a mask per step.
"""

from __future__ import annotations

import inspect

import torch

from kvpack.hf.config import cache_kwargs

__all__ = ["GraphDecoder", "graph_generate"]

PICK_CHUNK = 1024  # logits per row of the first stage of `greedy_pick`


def greedy_pick(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)`` of ``(B, V)`` logits in two stages: the max of each chunk of `PICK_CHUNK` logits, then
    the first chunk holding the largest (ties: the first index, as ``argmax``). Compiled, one row of 128K logits was
    one reduction in one CTA (H200: 28.6 us per token); chunks spread the first stage over the SMs."""
    batch, vocab = logits.shape
    chunks = -(-vocab // PICK_CHUNK)
    if chunks * PICK_CHUNK != vocab:  # pad with -inf: a pad never wins, except over a row of -inf (then index 0)
        logits = torch.nn.functional.pad(logits, (0, chunks * PICK_CHUNK - vocab), value=float("-inf"))
    best, within = logits.view(batch, chunks, PICK_CHUNK).max(-1)
    chunk = best.argmax(-1, keepdim=True)
    return (chunk * PICK_CHUNK + within.gather(-1, chunk))[:, 0]


def graph_generate(model, input_ids: torch.Tensor, cache, max_new_tokens: int, *,
                   attention_mask: torch.Tensor | None = None, eos_token_id: int | None = None,
                   pad_token_id: int = 0, prefill_chunk: int = 4096, compile: bool | None = None,
                   graph: bool | None = None, check_every: int = 32) -> torch.Tensor:  # fmt: skip
    """Greedy continuation of ``input_ids`` (B, L) by ``max_new_tokens`` tokens through ``cache``: ``(B, L + n)``.

    ``compile`` / ``graph`` (``None``: iff on CUDA): ``torch.compile`` the step, replay it from a CUDA graph. After a
    row emits ``eos_token_id`` it gets ``pad_token_id``; the loop ends early once every row has (checked on the host
    every ``check_every`` tokens, so up to that many padded columns may follow; the result is cut to the last token
    any row needed). To decode several prompts through one capture, keep a `GraphDecoder`.
    """
    decoder = GraphDecoder(model, cache, compile=compile, graph=graph)
    return decoder.generate(input_ids, max_new_tokens, attention_mask=attention_mask, eos_token_id=eos_token_id,
                            pad_token_id=pad_token_id, prefill_chunk=prefill_chunk,
                            check_every=check_every)  # fmt: skip


def _check_cache(cache) -> None:
    from transformers.cache_utils import Cache

    if not isinstance(cache, Cache):
        raise TypeError(f"cache must be a transformers Cache (StaticKVPackCache, StaticCache), got {type(cache)}")
    if not getattr(cache, "is_compileable", False):
        raise ValueError(
            f"cache must be pre-allocated and graph-safe (StaticKVPackCache or transformers' StaticCache); "
            f"{type(cache).__name__} is not (its is_compileable is False)"
        )


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


MIN_OUT_WIDTH = 256  # output columns first allocated: calls of up to this many new tokens share one capture


class GraphDecoder:
    """The decode step of ``model`` over ``cache`` (greedy), captured once and replayed for each token.

    Holds the step's input buffers (the token fed, its per-row position, the cache slot) and the graph; `generate`
    may be called again on the same cache (a longer prompt that extends what it holds, or after ``cache.reset()``).
    """

    def __init__(self, model, cache, *, compile: bool | None = None, graph: bool | None = None) -> None:
        _check_cache(cache)
        if not callable(model) or not hasattr(model, "config"):
            raise TypeError(f"model must be a transformers model (callable, with a config), got {type(model)}")
        for name, value in (("compile", compile), ("graph", graph)):
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool or None, got {value!r}")
        self.model, self.cache = model, cache
        self.device = next(model.parameters()).device
        cuda = self.device.type == "cuda"
        if graph and not cuda:
            raise ValueError(f"graph=True needs the model on a CUDA device; it is on {self.device}")
        self.use_graph = cuda if graph is None else graph
        self.use_compile = cuda if compile is None else compile
        forward = getattr(type(model), "forward", model)
        self._takes_cache_position = "cache_position" in inspect.signature(forward).parameters  # transformers < 5.24
        # the greedy pick inside the compiled step, fused by Inductor (H200, batch 1, 128K logits: a one-stage argmax
        # took 28.6 us per token, the eager argmax kernel after the step 34.6)
        self._step_fn = torch.compile(self._next_token, fullgraph=True) if self.use_compile else self._next_token
        self._graph = None
        self._buffers = None

    # ---- the step -------------------------------------------------------------------------------
    def _next_token(self, token: torch.Tensor, position: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """The greedy next token ``(B,)`` after feeding ``token`` (B, 1) at ``position`` (B, 1)."""
        kwargs = {"cache_position": slot} if self._takes_cache_position else {}
        out = self.model(input_ids=token, position_ids=position, use_cache=True, logits_to_keep=1,
                         **cache_kwargs(self.model, self.cache), **kwargs)  # fmt: skip
        return greedy_pick(out.logits[:, -1])

    def _step(self) -> None:
        """One token: forward the fed token, pick the next (greedy), record it, advance the buffers in place."""
        b = self._buffers
        nxt = self._step_fn(b["token"], b["position"], b["slot"])
        nxt = torch.where(b["finished"], b["pad"], nxt)
        b["finished"].logical_or_(nxt == b["eos"])
        b["token"].copy_(nxt[:, None])
        b["position"].add_(1)
        b["slot"].add_(1)
        b["out"].index_copy_(1, b["index"], nxt[:, None])
        b["index"].add_(1)

    def _allocate(self, batch: int, width: int) -> None:
        """The step's buffers for ``batch`` rows and ``width`` new tokens; kept (and the graph with them) while the
        batch is the same and the output columns suffice: a call with another ``max_new_tokens`` does not
        re-capture (the columns grow to a power of two, at least `MIN_OUT_WIDTH`)."""
        if self._buffers is not None and self._buffers["out"].shape[0] == batch and (
            self._buffers["out"].shape[1] >= width
        ):
            return
        width = max(MIN_OUT_WIDTH, 1 << (width - 1).bit_length())
        device = self.device
        self._buffers = {
            "token": torch.zeros(batch, 1, dtype=torch.long, device=device),
            "position": torch.zeros(batch, 1, dtype=torch.long, device=device),
            "slot": torch.zeros(1, dtype=torch.long, device=device),
            "index": torch.zeros(1, dtype=torch.long, device=device),
            "out": torch.zeros(batch, width, dtype=torch.long, device=device),
            "finished": torch.zeros(batch, dtype=torch.bool, device=device),
            "eos": torch.full((), -1, dtype=torch.long, device=device),
            "pad": torch.zeros((), dtype=torch.long, device=device),
        }
        self._graph = None  # a capture reads the buffers' addresses

    def _warm_step(self) -> None:
        """`_step` on a side stream (as a capture wants its first runs: lazy handles and workspaces set up there)."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self._step()
        current.wait_stream(side)

    def _capture(self) -> None:
        """Record one `_step` (nothing runs: the cache does not move); warm-up steps ran on the side stream before."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._step()
        except Exception as exc:
            raise RuntimeError(
                f"capturing the decode step in a CUDA graph failed ({type(exc).__name__}: {exc}); something in the "
                "model's step synchronizes with the host: graph_generate(..., graph=False) runs it without a graph"
            ) from exc
        self._graph = graph

    # ---- generate -------------------------------------------------------------------------------
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, attention_mask: torch.Tensor | None = None,
                 eos_token_id: int | None = None, pad_token_id: int = 0, prefill_chunk: int = 4096,
                 check_every: int = 32, warmup: int = 2) -> torch.Tensor:  # fmt: skip
        """See `graph_generate`. ``warmup`` steps run un-captured before the first capture (compilation)."""
        from kvpack.hf.static_cache import StaticKVPackCache

        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise TypeError(f"input_ids must be a (batch, length) int64 tensor, got {_describe(input_ids)}")
        batch, length = input_ids.shape
        if batch < 1 or length < 1:
            raise ValueError(f"input_ids must hold at least one token per row, got shape {tuple(input_ids.shape)}")
        if input_ids.device != self.device:
            raise ValueError(f"input_ids are on {input_ids.device}; the model is on {self.device}")
        _positive_int("max_new_tokens", max_new_tokens)
        _positive_int("prefill_chunk", prefill_chunk)
        _positive_int("check_every", check_every)
        _positive_int("warmup", warmup, 0)
        for name, value in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a token id (int >= 0) or None, got {value!r}")
        if pad_token_id is None:
            pad_token_id = 0
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}, got "
                    f"{_describe(attention_mask)}"
                )
            attention_mask = attention_mask.to(self.device, torch.long)
            if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
                raise ValueError("attention_mask must hold only 0 (padding) and 1 (tokens)")
            if not bool((attention_mask[:, -1] == 1).all()):
                raise ValueError("attention_mask: padding must be on the left (each row's last token a real one)")
            if bool((attention_mask == 1).all()):
                attention_mask = None
            elif not isinstance(self.cache, StaticKVPackCache):
                raise ValueError(
                    f"padded prompts (attention_mask zeros) need StaticKVPackCache, which does not store padding; "
                    f"{type(self.cache).__name__} would attend to it"
                )
        held = int(self.cache.get_seq_length())
        capacity = _capacity(self.cache)
        if held >= length:
            raise ValueError(
                f"the cache already holds {held} tokens; input_ids ({length} tokens) must extend what it holds by at "
                "least one (reset the cache to start again)"
            )
        if length + max_new_tokens - 1 > capacity:
            raise ValueError(
                f"{length} prompt tokens + {max_new_tokens} new need {length + max_new_tokens - 1} cache slots; the "
                f"cache has {capacity} (max_cache_len)"
            )
        # as in generate, the ids the cache lacks go in one forward (chunked); when that is one token after a held
        # past, that forward is a decode step: the captured one (a second call continues without an eager forward)
        step_feeds_last = held > 0 and length - held == 1
        eager_end = length - 1 if step_feeds_last else length
        with torch.inference_mode():
            first = None
            if eager_end > held:
                mask = None if attention_mask is None else attention_mask[:, :eager_end]
                first = self._prefill(input_ids[:, :eager_end], mask, held, prefill_chunk)
            self._allocate(batch, max_new_tokens)
            b = self._buffers
            b["eos"].fill_(-1 if eos_token_id is None else eos_token_id)
            b["pad"].fill_(pad_token_id)
            b["out"].zero_()
            tokens = torch.full((batch,), length, device=self.device)  # each row's prompt tokens, padding not counted
            if attention_mask is not None:
                tokens = attention_mask.sum(1)
            if step_feeds_last:
                b["token"].copy_(input_ids[:, -1:])
                b["position"].copy_(tokens[:, None] - 1)  # the fed token's position: its row's tokens before it
                b["slot"].fill_(length - 1)
                b["index"].fill_(0)
                b["finished"].zero_()
                done = 0
            else:
                b["out"][:, 0] = first
                b["token"].copy_(first[:, None])
                b["position"].copy_(tokens[:, None])
                b["slot"].fill_(length)
                b["index"].fill_(1)
                b["finished"].copy_(first == b["eos"])
                done = 1
            while done < max_new_tokens:
                if self.use_graph and self._graph is None and warmup == 0:
                    self._capture()
                if self._graph is not None:
                    self._graph.replay()
                elif self.use_graph:
                    self._warm_step()
                    warmup = max(0, warmup - 1)
                else:
                    self._step()
                done += 1
                if eos_token_id is not None and done % check_every == 0 and bool(b["finished"].all()):
                    break
            out = b["out"][:, :done].clone()
        return torch.cat([input_ids, out], dim=1)

    def _prefill(self, input_ids, attention_mask, held: int, chunk: int) -> torch.Tensor:
        """Feed the ids the cache does not hold yet (chunks); the greedy next token after them, ``(B,)``."""
        length = input_ids.shape[1]
        for at in range(held, length, chunk):
            end = min(at + chunk, length)
            kwargs = {} if attention_mask is None else {"attention_mask": attention_mask[:, :end]}
            if attention_mask is not None:  # positions count each row's tokens (left padding takes none)
                kwargs["position_ids"] = (attention_mask[:, :end].cumsum(1) - 1).clamp(min=0)[:, at:end]
            logits = self.model(input_ids[:, at:end], use_cache=True, logits_to_keep=1,
                                **cache_kwargs(self.model, self.cache), **kwargs).logits  # fmt: skip
        return greedy_pick(logits[:, -1])


def _capacity(cache) -> int:
    """Tokens per row the cache was allocated for (transformers 5.17: ``get_max_cache_shape``; 5.24: the layers'
    largest ``get_max_length``)."""
    if hasattr(cache, "get_max_cache_shape"):
        return int(cache.get_max_cache_shape())
    return int(cache.get_max_length())


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return repr(type(x))
