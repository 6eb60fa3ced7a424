"""graph_generate: the replayed-step greedy loop gives model.generate's tokens; its bad inputs are refused up front."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_paged_cache import generate, prompt, tiny_llama
from test_static_cache import SMALL, static_cache
from tiny_models import TINY_FAMILIES

from kvpack import GraphDecoder, graph_generate
from kvpack.hf.cache import layer_kinds

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
CUDA = torch.cuda.is_available()


def kvpack_cache(model, max_cache_len=128, **kwargs):
    return static_cache(model, max_cache_len, key="int:4", value="turbo_mse:3", **{**SMALL, **kwargs})


def hf_static(model, max_cache_len=128):
    from transformers import StaticCache

    model.set_attn_implementation("sdpa")
    return StaticCache(config=model.config, max_cache_len=max_cache_len)


@pytest.mark.parametrize("pad", [(0, 0), (0, 5)])
def test_tokens_equal_model_generate_kvpack(pad):
    """Same cache type, same prompt: the loop's greedy tokens are generate's (CPU: the eager step, no graph)."""
    model = tiny_llama(torch.float32)
    ids, mask = prompt(batch=2, tokens=30, pad=pad)
    ref = generate(model, ids, mask, static_cache(model, 128, key="int:4", value="turbo_mse:3", use_kernel=False,
                                                   **SMALL), n=40, disable_compile=True)  # fmt: skip
    cache = static_cache(model, 128, key="int:4", value="turbo_mse:3", use_kernel=False, **SMALL)
    out = graph_generate(model, ids, cache, 40, attention_mask=mask)
    assert torch.equal(out, ref)
    assert int(cache.get_seq_length()) == 30 + 40 - 1  # the last token is returned, not yet fed


def test_tokens_equal_model_generate_hf_static():
    model = tiny_llama(torch.float32)
    ids, mask = prompt(batch=2, tokens=30)
    ref = generate(model, ids, mask, hf_static(model), n=25, disable_compile=True)
    out = graph_generate(model, ids, hf_static(model), 25)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_every_family(family):
    """GQA ratios, head_dim 32-256, sliding windows, qk-norm: the loop gives generate's tokens on StaticKVPackCache."""
    torch.manual_seed(0)
    model = TINY_FAMILIES[family]().eval()
    ids = torch.randint(3, 100, (2, 20), generator=torch.Generator().manual_seed(2))
    kw = {"key": "turbo_mse:4", "value": "int:4", "residual": 4, "sinks": 2, "block": 4, "use_kernel": False}
    ref = generate(model, ids, torch.ones_like(ids), static_cache(model, 64, **kw), n=20, disable_compile=True)
    out = graph_generate(model, ids, static_cache(model, 64, **kw), 20)
    assert torch.equal(out, ref), layer_kinds(model.config)


def test_eos_pads_finished_rows_and_stops_early():
    model = tiny_llama(torch.float32)
    ids, _ = prompt(batch=2, tokens=20)
    full = graph_generate(model, ids, static_cache(model, 128, key="int:4", value="int:4", use_kernel=False,
                                                   **SMALL), 40)  # fmt: skip
    eos = int(full[0, 25])  # a token row 0 makes at its 6th step
    out = graph_generate(model, ids, static_cache(model, 128, key="int:4", value="int:4", use_kernel=False, **SMALL),
                         40, eos_token_id=eos, pad_token_id=1, check_every=4)  # fmt: skip
    for row in range(2):
        new, ref = out[row, 20:], full[row, 20 : 20 + out.shape[1] - 20]
        hits = (ref == eos).nonzero()
        if len(hits):  # up to and including the first eos: generate's tokens; after it: padding
            stop = int(hits[0]) + 1
            assert torch.equal(new[:stop], ref[:stop]) and bool((new[stop:] == 1).all())
        else:
            assert torch.equal(new, ref)
    if bool((full[:, 20:] == eos).any(1).all()):  # both rows finish: the loop ended before 40 tokens
        assert out.shape[1] < 60


def test_second_call_extends_the_cache():
    """A GraphDecoder keeps its cache: a later prompt that extends what it holds continues from there."""
    model = tiny_llama(torch.float32)
    ids, _ = prompt(batch=1, tokens=20)
    cache = static_cache(model, 128, key="int:4", value="int:4", use_kernel=False, **SMALL)
    decoder = GraphDecoder(model, cache)
    first = decoder.generate(ids, 10)
    more = torch.cat([first, torch.tensor([[5, 6, 7]])], 1)
    second = decoder.generate(more, 10)
    ref = graph_generate(model, more, static_cache(model, 128, key="int:4", value="int:4", use_kernel=False,
                                                   **SMALL), 10)  # fmt: skip
    assert torch.equal(second, ref)


def test_continuing_equals_one_call():
    """generate(ids, 10), then generate(its output, 7) and 3 more on the same cache (the one token it lacks goes
    through the step, as generate's next forward would) gives the tokens of one generate(ids, 20)."""
    model = tiny_llama(torch.float32)
    ids, _ = prompt(batch=2, tokens=20)
    make = lambda: static_cache(model, 128, key="int:4", value="turbo_mse:2", use_kernel=False, **SMALL)  # noqa: E731
    decoder = GraphDecoder(model, make())
    first = decoder.generate(ids, 10)
    buffers = decoder._buffers
    halves = decoder.generate(first, 7)  # another max_new_tokens: the same buffers (on CUDA: the same capture)
    assert decoder._buffers is buffers
    halves = decoder.generate(halves, 3)
    assert torch.equal(halves, graph_generate(model, ids, make(), 20))


def bad_calls(model, ids):
    cache = lambda: static_cache(model, 40, key="int:4", value="int:4", use_kernel=False, **SMALL)  # noqa: E731
    return [
        (lambda: graph_generate(model, ids, "cache", 4), TypeError, "transformers Cache"),
        (lambda: graph_generate(model, ids, _dynamic(model), 4), ValueError, "graph-safe"),
        (lambda: graph_generate(model, ids.float(), cache(), 4), TypeError, "input_ids"),
        (lambda: graph_generate(model, ids[0], cache(), 4), TypeError, "input_ids"),
        (lambda: graph_generate(model, ids, cache(), 0), ValueError, "max_new_tokens"),
        (lambda: graph_generate(model, ids, cache(), True), ValueError, "max_new_tokens"),
        (lambda: graph_generate(model, ids, cache(), 40), ValueError, "max_cache_len"),
        (lambda: graph_generate(model, ids, cache(), 4, prefill_chunk=0), ValueError, "prefill_chunk"),
        (lambda: graph_generate(model, ids, cache(), 4, eos_token_id=-1), ValueError, "eos_token_id"),
        (lambda: graph_generate(model, ids, cache(), 4, attention_mask=ids[:, :3]), ValueError, "attention_mask"),
        (lambda: graph_generate(model, ids, cache(), 4, attention_mask=ids), ValueError, "only 0"),
        (lambda: graph_generate(model, ids, hf_static(model), 4, attention_mask=_padded(ids)), ValueError, "padded"),
        (lambda: graph_generate(model, ids, cache(), 4, attention_mask=_padded(ids).flip(1)), ValueError, "left"),
        (lambda: graph_generate(model, ids, cache(), 4, compile="yes"), TypeError, "compile"),
        (lambda: graph_generate(model, ids, cache(), 4, graph=True), ValueError, "CUDA"),
    ]


def _dynamic(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _padded(ids):
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return mask


@pytest.mark.skipif(CUDA, reason="graph=True is refused only without CUDA")
def test_bad_inputs_refused():
    model = tiny_llama(torch.float32)
    ids, _ = prompt(batch=2, tokens=12)
    for call, error, words in bad_calls(model, ids):
        with pytest.raises(error, match=words):
            call()


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.integers(0, 2), min_size=6, max_size=6), min_size=2, max_size=2))
def test_any_mask_is_taken_or_refused_by_name(rows):
    """Structured masks (values 0-2, zeros anywhere): taken when every value is 0 or 1 and each row's last token is
    real (zeros are padding, never stored), and then a left-padded row decodes as that row alone; otherwise a
    ValueError naming attention_mask; never another error."""
    model = _TINY
    ids = torch.arange(3, 15).view(2, 6)
    mask = torch.tensor(rows)
    make = lambda: static_cache(model, 32, key="int:4", value="int:4", use_kernel=False, **SMALL)  # noqa: E731
    ok = bool(((mask == 0) | (mask == 1)).all()) and bool((mask[:, -1] == 1).all())
    if not ok:
        with pytest.raises(ValueError, match="attention_mask"):
            graph_generate(model, ids, make(), 3, attention_mask=mask)
        return
    out = graph_generate(model, ids, make(), 3, attention_mask=mask)
    for b in range(2):
        if mask[b].tolist() == sorted(mask[b].tolist()):  # left padding: the row alone gives the same tokens
            kept = ids[b : b + 1, mask[b] == 1]
            assert torch.equal(out[b, 6:], graph_generate(model, kept, make(), 3)[0, kept.shape[1] :])


_TINY = tiny_llama(torch.float32, layers=2)


def test_held_prompt_refused():
    model = tiny_llama(torch.float32)
    ids, _ = prompt(batch=1, tokens=12)
    cache = static_cache(model, 64, key="int:4", value="int:4", use_kernel=False, **SMALL)
    graph_generate(model, ids, cache, 3)
    with pytest.raises(ValueError, match="already holds"):
        graph_generate(model, ids, cache, 3)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("cache_kind", ["kvpack", "hf-static"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_graph_replay_equals_the_same_step_unreplayed(cache_kind, dtype):
    """On the GPU: the compiled step replayed from the graph gives the tokens of the same compiled step run one call
    at a time (the same kernels: bitwise equal logits, so equal tokens), for kvpack's cache and transformers'; a
    float32 model (16-bit window: its range check is a host sync, skipped inside the capture) too."""
    model = tiny_llama(dtype, layers=2).cuda()
    ids, mask = (t.cuda() for t in prompt(batch=2, tokens=40))
    make = (lambda: kvpack_cache(model)) if cache_kind == "kvpack" else (lambda: hf_static(model))
    replayed = graph_generate(model, ids, make(), 48)
    stepped = graph_generate(model, ids, make(), 48, graph=False)
    assert torch.equal(replayed, stepped)
    eager = graph_generate(model, ids, make(), 48, graph=False, compile=False)
    assert (replayed == eager).float().mean() >= 0.9  # compiled vs eager: float16 rounding may part a near tie
    captured_eager = graph_generate(model, ids, make(), 48, compile=False)  # the eager step in the graph
    assert torch.equal(captured_eager, eager)


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 3), vocab=st.integers(1, 3000), levels=st.integers(1, 5), seed=st.integers(0, 2**16),
       specials=st.sampled_from(["none", "-inf", "nan", "all -inf"]))  # fmt: skip
def test_greedy_pick_is_argmax(batch, vocab, levels, seed, specials):
    """The two-stage pick is ``argmax``: few distinct values (ties: the first index), vocabularies that are not a
    multiple of the chunk (the pad never wins), -inf, NaN (argmax takes the first NaN), a row of -inf."""
    from kvpack.hf.graph_generate import greedy_pick

    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, levels, (batch, vocab), generator=g).float()
    if specials == "-inf":
        logits[logits == 0] = float("-inf")
    elif specials == "nan":
        logits[0, int(torch.randint(0, vocab, (1,), generator=g))] = float("nan")
    elif specials == "all -inf":
        logits[-1] = float("-inf")
    assert torch.equal(greedy_pick(logits), logits.argmax(-1))
    assert torch.equal(greedy_pick(logits.half()), logits.half().argmax(-1))
