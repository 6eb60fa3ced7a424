"""`kvpack.kernels.attention`: `decode_ref` is attention over the codecs' decode, `decode` dispatches and checks its
inputs (`check_decode_inputs` refuses block ids and lengths outside its tensors before any work)."""

from __future__ import annotations

import math

import pytest
import torch
from cases import make_case, rel_err
from hypothesis import event, given, settings
from hypothesis import strategies as st

from kvpack import get_codec
from kvpack.kernels.attention import check_decode_inputs, decode, decode_ref
from kvpack.kernels.paged import PagedCodec, paged_codec, rows_from_packed

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

BLOCK, NUM_BLOCKS, MAX_BLOCKS, HEADS, D, W = 4, 6, 3, 2, 32, 3


def case(block_tables, seq_lens, window_lens, seed=0):
    """A tiny paged cache (int:4 K and V, every pool row a real encoded vector) and a query per sequence."""
    g = torch.Generator().manual_seed(seed)
    codec = get_codec("int:4", head_dim=D)
    fmt = paged_codec(codec, "cpu")
    rows = NUM_BLOCKS * BLOCK
    key_cache = rows_from_packed(codec.encode(torch.randn(rows, HEADS, D, generator=g)), fmt)
    value_cache = rows_from_packed(codec.encode(torch.randn(rows, HEADS, D, generator=g)), fmt)
    batch = len(seq_lens)
    inputs = {
        "query": torch.randn(batch, HEADS * 2, D, generator=g).half(),
        "key_cache": key_cache.reshape(NUM_BLOCKS, BLOCK, HEADS, -1).contiguous(),
        "value_cache": value_cache.reshape(NUM_BLOCKS, BLOCK, HEADS, -1).contiguous(),
        "block_tables": torch.tensor(block_tables, dtype=torch.int32).reshape(batch, MAX_BLOCKS),
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32),
        "window_keys": torch.randn(batch, W, HEADS, D, generator=g).half(),
        "window_values": torch.randn(batch, W, HEADS, D, generator=g).half(),
        "window_lens": torch.tensor(window_lens, dtype=torch.int32),
    }
    return inputs, fmt


def valid(block_tables, seq_lens, window_lens) -> bool:
    """The contract, one sequence at a time: lengths within capacity, a token at least, reached ids in the pools."""
    for row, n, w in zip(block_tables, seq_lens, window_lens):
        if not (0 <= n <= MAX_BLOCKS * BLOCK and 0 <= w <= W and n + w > 0):
            return False
        if any(not 0 <= row[j] < NUM_BLOCKS for j in range(math.ceil(n / BLOCK))):
            return False
    return True


BAD_IDS = [-1, -16, NUM_BLOCKS, 10**6, 2**31 - 1]


@settings(max_examples=50, deadline=None)
@given(data=st.data(), batch=st.integers(1, 3), corrupt=st.sampled_from(["none", "id", "seq_len", "window_len"]))
def test_fuzz_refused_iff_out_of_range_and_valid_inputs_decode(data, batch, corrupt):
    """Valid inputs, then one field pushed out of range (or not): refused exactly when the contract says so."""
    ints = st.integers
    tables = data.draw(st.lists(st.lists(ints(0, NUM_BLOCKS - 1), min_size=MAX_BLOCKS, max_size=MAX_BLOCKS),
                                min_size=batch, max_size=batch))  # fmt: skip
    lens = data.draw(st.lists(ints(0, MAX_BLOCKS * BLOCK), min_size=batch, max_size=batch))
    wins = data.draw(st.lists(ints(0, W), min_size=batch, max_size=batch))
    b = data.draw(ints(0, batch - 1))
    if corrupt == "id":
        tables[b][data.draw(ints(0, MAX_BLOCKS - 1))] = data.draw(st.sampled_from(BAD_IDS))
    elif corrupt == "seq_len":
        lens[b] = data.draw(st.sampled_from([-1, -5, MAX_BLOCKS * BLOCK + 1, 2**31 - 1]))
    elif corrupt == "window_len":
        wins[b] = data.draw(st.sampled_from([-1, W + 1, 2**31 - 1]))
    inputs, fmt = case(tables, lens, wins)
    args = (inputs["key_cache"], inputs["block_tables"], inputs["seq_lens"], inputs["window_keys"])
    event("valid" if valid(tables, lens, wins) else "refused")
    if not valid(tables, lens, wins):
        with pytest.raises(ValueError, match="block_tables|seq_lens|window_lens|no token"):
            check_decode_inputs(*args, inputs["window_lens"])
        with pytest.raises(ValueError):
            decode(**inputs, key_codec=fmt, value_codec=fmt, use_kernel=False)
        with pytest.raises(ValueError, match="block_tables|seq_lens|window_lens|no token"):
            decode_ref(**inputs, key_codec=fmt, value_codec=fmt)  # public too: no IndexError, no wrapped -1
        return
    check_decode_inputs(*args, inputs["window_lens"])
    out = decode(**inputs, key_codec=fmt, value_codec=fmt, use_kernel=False)
    assert out.shape == (batch, HEADS * 2, D) and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("bad_id", [-1, -16, NUM_BLOCKS, 2**31 - 1, 10**6])
def test_kernel_path_refuses_before_launch(bad_id):
    """The ids that crashed the process or gave NaN through the kernel are refused before it runs."""
    inputs, fmt = case([[0, 1, 2], [3, bad_id, 4]], [6, 5], [1, 0])
    with pytest.raises(ValueError, match=rf"block_tables\[1, 1\] = {bad_id} is outside 0..{NUM_BLOCKS - 1}"):
        decode(**inputs, key_codec=fmt, value_codec=fmt, use_kernel=True)


def test_ids_past_a_rows_length_are_not_read_so_not_checked():
    inputs, fmt = case([[0, -1, 10**6], [5, 4, 3]], [3, 12], [2, 0])
    out = decode(**inputs, key_codec=fmt, value_codec=fmt, use_kernel=False)
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize(
    "lens, wins, match",
    [
        ([13, 1], [0, 0], r"seq_lens\[0\] = 13 is outside 0..12"),
        ([-1, 1], [1, 0], r"seq_lens\[0\] = -1"),
        ([1, 1], [0, 4], r"window_lens\[1\] = 4 is outside 0..3"),
        ([1, 0], [0, 0], "sequence 1 holds no token"),
    ],
)
def test_lengths_named(lens, wins, match):
    inputs, fmt = case([[0, 1, 2], [3, 4, 5]], lens, wins)
    with pytest.raises(ValueError, match=match):
        decode(**inputs, key_codec=fmt, value_codec=fmt)


@pytest.mark.parametrize("key,value", [("turbo_mse:3", "int:4"), ("turbo_prod:3", "turbo_prod:2")])
def test_reference_matches_dense_attention_over_codec_decode(key, value):
    """decode_ref == softmax attention over codec.decode(K), codec.decode(V) and the window, in float64."""
    case, kf, vf, (kc, vc) = make_case(key, value, batch=1, kv_heads=2, gqa=2, head_dim=32, block_size=4,
                                       seq_lens=[10], window_lens=[3], device="cpu", seed=2)  # fmt: skip
    g = torch.Generator().manual_seed(2)
    ref = decode_ref(**case, key_codec=kf, value_codec=vf)
    # rebuild what was encoded from the same generator stream and decode it with the codecs
    torch.randperm(case["key_cache"].shape[0], generator=g)
    torch.randint(0, 256, case["key_cache"].shape, generator=g, dtype=torch.uint8)
    torch.randint(0, 256, case["value_cache"].shape, generator=g, dtype=torch.uint8)
    k = torch.randn(10, 2, 32, generator=g) * 2 + 0.3
    v = torch.randn(10, 2, 32, generator=g)
    keys = torch.cat([kc.decode(kc.encode(k)).double(), case["window_keys"][0, :3].double()])
    values = torch.cat([vc.decode(vc.encode(v)).double(), case["window_values"][0, :3].double()])
    q = case["query"][0].double().reshape(2, 2, 32)  # (kv_head, group, d)
    p = torch.einsum("hgd,thd->hgt", q, keys).div(math.sqrt(32)).softmax(-1)
    dense = torch.einsum("hgt,thd->hgd", p, values).reshape(4, 32)
    assert rel_err(ref[0], dense) < 1e-5


def test_decode_dispatch_and_errors():
    case, kf, vf, _ = make_case("int:4", "int:4", batch=2, kv_heads=2, gqa=2, head_dim=32, block_size=4,
                                seq_lens=[5, 9], window_lens=[1, 2], device="cpu", seed=1)  # fmt: skip
    out = decode(**case, key_codec=kf, value_codec=vf)  # CPU: the reference
    assert out.dtype == torch.float16 and out.shape == (2, 4, 32)
    assert rel_err(out, decode_ref(**case, key_codec=kf, value_codec=vf)) < 1e-3
    bad = dict(case)
    bad["query"] = case["query"].float()
    with pytest.raises(TypeError, match="query"):
        decode(**bad, key_codec=kf, value_codec=vf)
    bad = dict(case)
    bad["seq_lens"] = case["seq_lens"].long()
    with pytest.raises(TypeError, match="seq_lens"):
        decode(**bad, key_codec=kf, value_codec=vf)
    bad = dict(case)
    bad["query"] = case["query"][:, :3]
    with pytest.raises(ValueError, match="multiple"):
        decode(**bad, key_codec=kf, value_codec=vf)
    with pytest.raises(ValueError, match="rows hold"):
        decode(**case, key_codec=PagedCodec("int", 32, 3), value_codec=vf)
    with pytest.raises(TypeError, match="key_codec"):
        decode(**case, key_codec="int:4", value_codec=vf)
    partial = {k: v for k, v in case.items() if k != "window_lens"}
    with pytest.raises(ValueError, match="together"):
        decode(**partial, key_codec=kf, value_codec=vf)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("key,value", [("turbo_mse:4", "turbo_mse:3"), ("int:4:rotation=hadamard", "int:4")])
def test_decode_step_replays_from_a_cuda_graph(key, value):
    """A captured decode step replays exactly what eager computes, also after new lengths are written in place."""
    case, kf, vf, _ = make_case(key, value, batch=3, kv_heads=8, gqa=4, head_dim=128, block_size=16,
                                seq_lens=[900, 17, 300], window_lens=[20, 4, 0], device="cuda", seed=9)  # fmt: skip
    out = torch.full_like(case["query"], float("nan"))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        decode(**case, key_codec=kf, value_codec=vf, out=out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode(**case, key_codec=kf, value_codec=vf, out=out)
    for step in range(2):
        if step == 1:  # the next step: a new query and new lengths (within the encoded tokens) in the buffers
            case["query"].copy_(torch.randn_like(case["query"]))
            case["seq_lens"].copy_(torch.tensor([899, 3, 299], dtype=torch.int32))
            case["window_lens"].copy_(torch.tensor([19, 1, 1], dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, decode(**case, key_codec=kf, value_codec=vf))
        assert rel_err(out, decode_ref(**case, key_codec=kf, value_codec=vf)) <= 1e-2


def test_decode_ref_checks_what_decode_checks():
    """decode_ref followed negative block ids (python wrap: another block, a wrong finite answer) and raised
    IndexError/RuntimeError/AttributeError on other bad inputs; it now refuses them as decode does."""
    inputs, fmt = case([[0, 1, 2], [3, 4, 5]], [6, 5], [1, 0])
    tables = inputs["block_tables"].clone()
    tables[1, 0] = -1
    with pytest.raises(ValueError, match=r"block_tables\[1, 0\] = -1"):
        decode_ref(**{**inputs, "block_tables": tables}, key_codec=fmt, value_codec=fmt)
    with pytest.raises(TypeError, match="seq_lens"):
        decode_ref(**{**inputs, "seq_lens": [6, 5]}, key_codec=fmt, value_codec=fmt)
    with pytest.raises(TypeError, match="key_codec"):
        decode_ref(**inputs, key_codec=None, value_codec=fmt)
    with pytest.raises(ValueError, match="multiple"):
        decode_ref(**{**inputs, "query": inputs["query"][:, :3]}, key_codec=fmt, value_codec=fmt)
    no_window = {k: v for k, v in inputs.items() if not k.startswith("window")}
    out = decode_ref(**no_window, key_codec=fmt, value_codec=fmt)
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("where", ["query", "window_keys", "window_values"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_query_or_window_refused(where, value):
    inputs, fmt = case([[0, 1, 2], [3, 4, 5]], [6, 5], [2, 1])
    bad = inputs[where].clone()
    bad[1, 0, 0] = value
    for fn in (decode, decode_ref):
        with pytest.raises(ValueError, match="NaN/inf"):
            fn(**{**inputs, where: bad}, key_codec=fmt, value_codec=fmt)


def test_non_finite_window_rows_beyond_window_lens_are_not_read():
    inputs, fmt = case([[0, 1, 2], [3, 4, 5]], [6, 5], [2, 1])
    keys = inputs["window_keys"].clone()
    keys[1, 2] = float("nan")  # row 2 of sequence 1: past its window_lens of 1
    out = decode(**{**inputs, "window_keys": keys}, key_codec=fmt, value_codec=fmt, use_kernel=False)
    assert bool(torch.isfinite(out).all())


def test_corrupted_side_bytes_give_an_error_not_nan(device):
    """On the reference paths and through the kernel (Triton's interpreter without a GPU) alike."""
    inputs, fmt = case([[0, 1, 2], [3, 4, 5]], [6, 5], [0, 0])
    pool = inputs["key_cache"].clone()
    pool[3, 0, 0, fmt.code_bytes : fmt.code_bytes + 2] = torch.tensor([0x00, 0x7E], dtype=torch.uint8)  # NaN scale
    with pytest.raises(ValueError, match="NaN/inf"):
        decode_ref(**{**inputs, "key_cache": pool}, key_codec=fmt, value_codec=fmt)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    fmt = paged_codec(get_codec("int:4", head_dim=D), device)
    for kw in ({"use_kernel": False}, {"use_kernel": True}):
        with pytest.raises(ValueError, match="NaN/inf"):
            decode(**{**inputs, "key_cache": pool.to(device)}, key_codec=fmt, value_codec=fmt, **kw)
        decode(**inputs, key_codec=fmt, value_codec=fmt, **kw)  # the clean pool passes


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "x", True])
def test_scale_must_be_finite(scale):
    inputs, fmt = case([[0, 1, 2], [3, 4, 5]], [6, 5], [1, 0])
    with pytest.raises(ValueError, match="scale"):
        decode(**inputs, key_codec=fmt, value_codec=fmt, scale=scale)


def test_out_and_cpu_kernel_checked(monkeypatch):
    inputs, fmt = case([[0, 1, 2], [3, 4, 5]], [6, 5], [1, 0])
    with pytest.raises(ValueError, match="out must be"):
        decode(**inputs, key_codec=fmt, value_codec=fmt, out=torch.empty(1))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        decode(**inputs, key_codec=fmt, value_codec=fmt, use_kernel=True)
