"""Paged layout, fused encode and decode attention kernels vs the PyTorch codecs and `kvpack.kernels.attention.decode_ref`.

On the CPU the kernels run through Triton's interpreter on small shapes; `gpu` tests use real shapes.
Every check draws fresh random inputs and poisons the output (NaN) before the kernel writes it.
"""

from __future__ import annotations

import math

import pytest
import torch
from cases import make_case, rel_err

from kvpack import get_codec, pack_bits
from kvpack.kernels.attention import decode, decode_ref
from kvpack.kernels.paged import PagedCodec, dequantize_rows, pack_rows, paged_codec, rows_from_packed, unpack_rows

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SPECS = [
    "turbo_mse:4",
    "turbo_mse:3",
    "turbo_mse:2",
    "int:4",
    "turbo_mse:4:rotation=hadamard",
    "int:3:rotation=hadamard",
    "int:4:rotation=haar",
    "turbo_prod:4",
    "turbo_prod:2:rotation=hadamard",
]


# ---- layout --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_pack_rows_roundtrip(bits):
    fmt = PagedCodec("int", 64, bits)
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (5, 3, 64), generator=g, dtype=torch.uint8)
    side = torch.randn(5, 3, 2, generator=g).half()
    rows = pack_rows(codes, side, fmt)
    assert rows.shape == (5, 3, fmt.row_bytes) and fmt.row_bytes == 64 * bits // 8 + 4
    back, side_back = unpack_rows(rows, fmt)
    assert torch.equal(back, codes) and torch.equal(side_back, side)
    if bits != 3:  # one plane: the bytes are pack_bits' (the codec's "codes")
        assert torch.equal(rows[..., : fmt.code_bytes], pack_bits(codes, bits))
    else:  # the 2 low bits, then the high bit
        assert torch.equal(rows[..., :16], pack_bits(codes & 3, 2)) and torch.equal(
            rows[..., 16:24], pack_bits(codes >> 2, 1)
        )


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_turbo_prod_rows_roundtrip(bits):
    codec = get_codec(f"turbo_prod:{bits}", head_dim=32)
    fmt = paged_codec(codec)
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (5, 3, 32), generator=g, dtype=torch.uint8)
    side = torch.rand(5, 3, 2, generator=g).half()
    rows = pack_rows(codes, side, fmt)
    assert fmt.row_bytes * 8 == codec.bits_per_value() * 32  # no padding: the codec's bytes exactly
    back, side_back = unpack_rows(rows, fmt)
    assert torch.equal(back, codes) and torch.equal(side_back, side)
    # the mse planes as turbo_mse's at bits - 1, then the sign plane, then (norm, residual_norm)
    mse_fmt = paged_codec(get_codec(f"turbo_mse:{bits - 1}", head_dim=32))
    low = codes & ((1 << (bits - 1)) - 1)
    mse_rows = pack_rows(low, side[..., :1], mse_fmt)
    assert torch.equal(rows[..., : mse_fmt.code_bytes], mse_rows[..., : mse_fmt.code_bytes])
    assert torch.equal(rows[..., mse_fmt.code_bytes : fmt.code_bytes], pack_bits(codes >> (bits - 1), 1))
    assert torch.equal(rows[..., fmt.code_bytes :].contiguous().view(torch.float16), side)


def test_turbo_rows_hold_the_norm_and_zero_padding():
    fmt = paged_codec(get_codec("turbo_mse:3", head_dim=32))
    codes = torch.randint(0, 8, (4, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    norm = torch.rand(4, 1).half()
    rows = pack_rows(codes, norm, fmt)
    assert rows.shape == (4, 16) and fmt.row_bytes % 4 == 0
    assert torch.equal(rows[:, 12:14].contiguous().view(torch.float16), norm) and not rows[:, 14:].any()
    with pytest.raises(ValueError, match="1 float16"):
        pack_rows(codes, torch.rand(4, 2).half(), fmt)


@pytest.mark.parametrize("spec", SPECS)
def test_rows_dequantize_as_the_codec_decodes(spec):
    codec = get_codec(spec, head_dim=64, seed=3)
    x = torch.randn(7, 2, 64, generator=torch.Generator().manual_seed(1))
    packed = codec.encode(x)
    fmt = paged_codec(codec)
    rows = rows_from_packed(packed, fmt)
    assert rows.shape == (7, 2, fmt.row_bytes)
    padding = 16 if codec.name == "turbo_mse" else 0  # turbo_mse rows pad the float16 norm to 4 bytes
    assert 8 * fmt.row_bytes / 64 == pytest.approx(codec.bits_per_value() + padding / 64)
    torch.testing.assert_close(dequantize_rows(rows, fmt), codec.decode(packed).float(), rtol=1e-5, atol=1e-5)


def test_paged_codec_rejects_what_the_kernels_cannot_read():
    with pytest.raises(ValueError, match="axis=token"):
        paged_codec(get_codec("int:4:axis=channel", head_dim=64))
    with pytest.raises(ValueError, match="support turbo_mse, turbo_prod and int"):
        paged_codec(get_codec("fp8", head_dim=64))
    with pytest.raises(ValueError, match="power of two"):
        PagedCodec("int", 48, 4)
    with pytest.raises(ValueError, match=">= 32"):
        PagedCodec("int", 16, 4)
    with pytest.raises(ValueError, match="codebook"):
        PagedCodec("turbo_mse", 64, 4)
    with pytest.raises(TypeError, match="Codec"):
        paged_codec("turbo_mse:4")
    with pytest.raises(ValueError, match="bits must be one of"):
        PagedCodec("int", 64, 6)
    with pytest.raises(ValueError, match="rotation must be None"):
        PagedCodec("int", 64, 4, rotation=torch.eye(32))
    prod = paged_codec(get_codec("turbo_prod:3", head_dim=32))
    with pytest.raises(ValueError, match="sketch of shape"):
        PagedCodec("turbo_prod", 32, 3, codebook=prod.codebook, rotation=prod.rotation)
    with pytest.raises(ValueError, match="bits must be one of"):
        PagedCodec("turbo_prod", 32, 1, codebook=prod.codebook, rotation=prod.rotation, sketch=prod.sketch)
    with pytest.raises(ValueError, match="codebook of shape"):
        PagedCodec("turbo_prod", 32, 4, codebook=prod.codebook, rotation=prod.rotation, sketch=prod.sketch)
    with pytest.raises(ValueError, match="only turbo_prod"):
        PagedCodec("int", 32, 4, sketch=prod.sketch)


# ---- decode attention ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key,value",
    [("turbo_mse:4", "turbo_mse:4"), ("turbo_mse:3", "turbo_mse:3"), ("turbo_mse:2", "turbo_mse:2"),
     ("int:4", "int:4"), ("turbo_mse:4:rotation=hadamard", "int:4"), ("int:4:rotation=hadamard", "int:2"),
     ("int:3", "int:3:rotation=haar"), ("turbo_prod:4", "turbo_mse:3"), ("turbo_prod:2", "int:4"),
     ("turbo_prod:3:rotation=hadamard", "int:2:rotation=hadamard"), ("int:4", "turbo_prod:3"),
     ("turbo_prod:5", "turbo_prod:2:rotation=hadamard"), ("int:8", "int:8"), ("int:8", "turbo_mse:2")],
)  # fmt: skip
def test_decode_kernel_matches_reference(key, value, device):
    from kvpack.kernels.decode_attention import paged_decode_attention

    case, kf, vf, _ = make_case(key, value, batch=3, kv_heads=2, gqa=3, head_dim=32, block_size=8,
                                seq_lens=[45, 3, 20], window_lens=[5, 0, 2], device=device, seed=11)  # fmt: skip
    ref = decode_ref(**case, key_codec=kf, value_codec=vf, scale=0.2)
    for unpack in (0, 1):  # broadcast + reshape / slot by slot + tl.join
        out = torch.full_like(case["query"], float("nan"))
        paged_decode_attention(*case.values(), kf, vf, 0.2, num_splits=3, block_n=16, unpack=unpack, out=out)
        assert bool(torch.isfinite(out).all()), "some outputs were not written"
        assert rel_err(out, ref) <= 1e-2


def test_decode_kernel_window_only_and_packed_only(device):
    from kvpack.kernels.decode_attention import paged_decode_attention

    case, kf, vf, _ = make_case("turbo_mse:4", "turbo_mse:3", batch=2, kv_heads=1, gqa=4, head_dim=32, block_size=4,
                                seq_lens=[0, 13], window_lens=[6, 0], device=device, seed=5)  # fmt: skip
    out = torch.full_like(case["query"], float("nan"))
    paged_decode_attention(*case.values(), kf, vf, 0.25, num_splits=2, block_n=16, out=out)
    ref = decode_ref(**case, key_codec=kf, value_codec=vf, scale=0.25)
    assert bool(torch.isfinite(out).all())
    assert rel_err(out, ref) <= 1e-2


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


# ---- fused encode --------------------------------------------------------------------------------


def encode_through_kernel(spec: str, device: str):
    """(codec, fmt, rows the kernel wrote, rows of the codec's encode) for 50 tokens x 2 heads at D=32."""
    from kvpack.kernels.encode import paged_encode

    d, hkv, tokens, block_size = 32, 2, 50, 8
    codec = get_codec(spec, head_dim=d, seed=7)
    fmt = paged_codec(codec, device)
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(tokens, hkv, d, generator=g) * 3).half()
    num_blocks = 10
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    slots[5] = -1  # a padding token: not written
    cache = torch.randint(0, 256, (num_blocks, block_size, hkv, fmt.row_bytes), generator=g, dtype=torch.uint8)
    before = cache.clone()
    cache, x_dev, slots_dev = cache.to(device), x.to(device), slots.to(device)
    paged_encode(x_dev, slots_dev, cache, fmt, block_t=16)
    cache = cache.cpu()
    flat, flat_before = cache.view(-1, hkv, fmt.row_bytes), before.view(-1, hkv, fmt.row_bytes)
    keep = slots >= 0
    untouched = torch.ones(flat.shape[0], dtype=torch.bool)
    untouched[slots[keep]] = False
    assert torch.equal(flat[untouched], flat_before[untouched])
    return codec, fmt, flat[slots[keep]], rows_from_packed(codec.encode(x[keep]), fmt)


@pytest.mark.parametrize(
    "spec",
    ["turbo_mse:4", "turbo_mse:3", "turbo_mse:2", "int:8", "int:4", "int:3", "int:2", "int:4:rotation=hadamard"],
)
def test_encode_kernel_codes_equal_the_codec(spec, device):
    codec, fmt, rows, expected = encode_through_kernel(spec, device)
    codes, side = unpack_rows(rows, fmt)
    exp_codes, exp_side = unpack_rows(expected, fmt)
    mismatch = codes != exp_codes
    if fmt.rotation is None:
        assert not mismatch.any()
        assert torch.equal(side, exp_side)
    else:  # only boundary ties, explained by float32 summation order in the rotation
        assert mismatch.float().mean() <= 1e-3
        assert ((codes.int() - exp_codes.int()).abs()[mismatch] == 1).all()
        if codec.name == "turbo_mse":
            assert torch.equal(side, exp_side)
        else:  # min/max of the rotated vector: at most a float16 rounding step apart
            torch.testing.assert_close(side, exp_side, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("spec", ["turbo_prod:4", "turbo_prod:3", "turbo_prod:2", "turbo_prod:5:rotation=hadamard"])
def test_encode_kernel_turbo_prod_equals_the_codec(spec, device):
    _, fmt, rows, expected = encode_through_kernel(spec, device)
    (codes, side), (exp_codes, exp_side) = unpack_rows(rows, fmt), unpack_rows(expected, fmt)
    b = fmt.mse_bits
    low, exp_low = (codes & ((1 << b) - 1)).int(), (exp_codes & ((1 << b) - 1)).int()
    mismatch = low != exp_low  # mse stage: boundary ties only, as turbo_mse
    assert mismatch.float().mean() <= 1e-3
    assert ((low - exp_low).abs()[mismatch] == 1).all()
    assert torch.equal(side[..., 0], exp_side[..., 0])  # the norm
    # where the mse codes agree the residual is the codec's up to float32 rounding: signs flip only at ~0
    same = ~mismatch.any(-1)
    assert same.float().mean() >= 0.9
    signs, exp_signs = codes >> b, exp_codes >> b
    assert (signs != exp_signs)[same].float().mean() <= 1e-3
    torch.testing.assert_close(side[..., 1][same], exp_side[..., 1][same], rtol=1e-3, atol=0)


def test_encode_rejects_bad_input():
    from kvpack.kernels.encode import paged_encode

    fmt = PagedCodec("int", 32, 4)
    cache = torch.zeros(2, 4, 1, fmt.row_bytes, dtype=torch.uint8)
    with pytest.raises(TypeError, match="slot_mapping"):
        paged_encode(torch.randn(3, 1, 32), torch.arange(3, dtype=torch.int32), cache, fmt)
    with pytest.raises(ValueError, match="cache"):
        paged_encode(torch.randn(3, 2, 32), torch.arange(3), cache, fmt)
    with pytest.raises(TypeError, match="codec"):
        paged_encode(torch.randn(3, 1, 32), torch.arange(3), cache, "int:4")


# ---- real shapes on the GPU ----------------------------------------------------------------------


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(
    "key,value",
    [
        ("turbo_mse:4", "turbo_mse:4"),
        ("turbo_mse:3", "turbo_mse:3"),
        ("int:4", "int:4"),
        ("turbo_prod:4", "turbo_mse:4"),
        ("turbo_mse:4", "turbo_prod:4"),
    ],
)
def test_decode_kernel_gpu_llama_heads(key, value):
    case, kf, vf, _ = make_case(key, value, batch=4, kv_heads=8, gqa=4, head_dim=128, block_size=16,
                                seq_lens=[3000, 17, 1200, 4096], window_lens=[132, 4, 0, 70], device="cuda",
                                seed=3)  # fmt: skip
    for _ in range(2):
        out = torch.full_like(case["query"], float("nan"))
        decode(**case, key_codec=kf, value_codec=vf, out=out)
        ref = decode_ref(**case, key_codec=kf, value_codec=vf)
        assert bool(torch.isfinite(out).all())
        assert rel_err(out, ref) <= 1e-2


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
