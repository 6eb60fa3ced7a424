"""The NVRTC decode kernel (int, turbo_mse) vs `decode_ref`: tolerance 2x the error of fp16 SDPA against the same
reference.

GPU tests skip without CUDA; the compile test needs only ``cuda.core`` and NVRTC (no GPU) and skips without them.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
import torch.nn.functional as F
from cases import make_case, rel_err

from kvpack.kernels.attention import decode, decode_ref, gather_tokens
from kvpack.kernels.cuda_decode import (
    BITS, HEAD_DIMS, SMALL_BATCH, Variant, compile_variant, cuda_supported, window_per_split, window_splits,
)  # fmt: skip
from kvpack.kernels.paged import dequantize_rows

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def sdpa16(case, kf, vf) -> torch.Tensor:
    """The same attention in PyTorch at the kernel's dtype (the query's): K/V dequantized in float32, then SDPA."""
    q, hq = case["query"], case["query"].shape[1]
    dt = q.dtype
    outs = []
    for b in range(q.shape[0]):
        n, w = int(case["seq_lens"][b]), int(case["window_lens"][b])
        k = dequantize_rows(gather_tokens(case["key_cache"], case["block_tables"][b], n), kf)
        v = dequantize_rows(gather_tokens(case["value_cache"], case["block_tables"][b], n), vf)
        k = torch.cat([k, case["window_keys"][b, :w].float()]).transpose(0, 1).to(dt)
        v = torch.cat([v, case["window_values"][b, :w].float()]).transpose(0, 1).to(dt)
        outs.append(F.scaled_dot_product_attention(q[b, :, None], k, v, enable_gqa=True)[:, 0])
    return torch.stack(outs).reshape(q.shape[0], hq, -1)


def check(case, kf, vf) -> None:
    ref = decode_ref(**case, key_codec=kf, value_codec=vf)
    bound = 2 * rel_err(sdpa16(case, kf, vf), ref)
    for _ in range(2):  # fresh poison each run: every element must be written
        out = torch.full_like(case["query"], float("nan"))
        decode(**case, key_codec=kf, value_codec=vf, out=out, kernel="cuda")
        assert bool(torch.isfinite(out).all())
        assert rel_err(out, ref) <= bound, (rel_err(out, ref), bound)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("kv_heads,gqa", [(8, 4), (4, 1), (2, 8), (2, 16), (1, 3), (6, 2)])
def test_int4_kernel_matches_reference(head_dim, kv_heads, gqa):
    case, kf, vf, _ = make_case("int:4", "int:4", batch=3, kv_heads=kv_heads, gqa=gqa, head_dim=head_dim,
                                block_size=16, seq_lens=[1000, 17, 333], window_lens=[40, 0, 16], device="cuda",
                                seed=head_dim + 7 * gqa + kv_heads)  # fmt: skip
    assert cuda_supported(kf.kind, kf.bits, vf.kind, vf.bits, head_dim, 16, gqa)
    check(case, kf, vf)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("key,value", [("int:2", "int:2"), ("int:4", "int:2"), ("int:2", "int:4")])
@pytest.mark.parametrize("kv_heads,gqa", [(8, 4), (2, 16), (1, 3)])
def test_int2_and_mixed_bits_match_reference(head_dim, key, value, kv_heads, gqa):
    case, kf, vf, _ = make_case(key, value, batch=3, kv_heads=kv_heads, gqa=gqa, head_dim=head_dim, block_size=16,
                                seq_lens=[1000, 17, 333], window_lens=[40, 0, 16], device="cuda",
                                seed=head_dim + 7 * gqa + kv_heads + len(key + value))  # fmt: skip
    assert cuda_supported(kf.kind, kf.bits, vf.kind, vf.bits, head_dim, 16, gqa)
    check(case, kf, vf)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(
    "key,value,block_size,dtype",
    [
        ("int:4:rotation=hadamard", "int:4:rotation=hadamard", 16, torch.float16),
        ("int:4", "int:4:rotation=hadamard", 32, torch.bfloat16),
        ("int:4:rotation=hadamard", "int:4", 64, torch.float16),
    ],
)
def test_int4_kernel_rotation_pages_and_bf16(key, value, block_size, dtype):
    case, kf, vf, _ = make_case(key, value, batch=4, kv_heads=8, gqa=4, head_dim=128, block_size=block_size,
                                seq_lens=[2500, 1, 700, 4096], window_lens=[132, 3, 0, 0], device="cuda", seed=5,
                                dtype=dtype)  # fmt: skip
    check(case, kf, vf)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 9])
@pytest.mark.parametrize("key,value", [("int:4", "int:4"), ("turbo_mse:4", "turbo_mse:3")])
def test_window_splits_and_batch_shapes(batch, key, value):
    """A window of several 32-token CTAs (full, partial, one token, empty), at batch 1 (4 KV heads per CTA, many
    splits) and 9 (8 per CTA)."""
    lens = [3000, 40, 1, 2600, 16, 0, 777, 5, 4096][:batch]
    windows = [132, 97, 1, 0, 33, 64, 32, 131, 120][:batch]
    case, kf, vf, _ = make_case(key, value, batch=batch, kv_heads=8, gqa=4, head_dim=128, block_size=16,
                                seq_lens=lens, window_lens=windows, device="cuda", seed=batch)  # fmt: skip
    check(case, kf, vf)


@gpu
@pytest.mark.gpu
def test_int4_kernel_empty_window_and_no_window():
    case, kf, vf, _ = make_case("int:4", "int:4", batch=2, kv_heads=8, gqa=4, head_dim=128, block_size=16,
                                seq_lens=[64, 5000], window_lens=[0, 0], device="cuda", seed=11)  # fmt: skip
    check(case, kf, vf)
    for name in ("window_keys", "window_values", "window_lens"):
        del case[name]
    ref = decode_ref(**case, key_codec=kf, value_codec=vf)
    assert rel_err(decode(**case, key_codec=kf, value_codec=vf, kernel="cuda"), ref) <= 1e-2


# every kind and bit width of the kernel, K and V: turbo_mse through its shared-memory tables, int:3/8 through the
# magic-number unpack (3 bits: two planes), mixed kinds in one launch
CODEC_PAIRS = [
    ("turbo_mse:4", "turbo_mse:4"), ("turbo_mse:3", "turbo_mse:3"), ("turbo_mse:2", "turbo_mse:2"),
    ("turbo_mse:4", "turbo_mse:1"), ("turbo_mse:1", "turbo_mse:3"), ("int:8", "turbo_mse:2"), ("int:3", "int:3"),
    ("int:8", "int:8"), ("turbo_mse:1", "turbo_mse:1"), ("turbo_mse:3", "int:4"),
    ("int:3:rotation=hadamard", "turbo_mse:4:rotation=hadamard"), ("turbo_mse:4", "int:4:rotation=hadamard"),
    ("turbo_mse:4", "int:3:rotation=hadamard"),
]  # fmt: skip


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("key,value", CODEC_PAIRS)
@pytest.mark.parametrize("kv_heads,gqa", [(8, 4), (2, 16), (1, 3)])
def test_every_codec_matches_reference(head_dim, key, value, kv_heads, gqa):
    case, kf, vf, _ = make_case(key, value, batch=3, kv_heads=kv_heads, gqa=gqa, head_dim=head_dim, block_size=16,
                                seq_lens=[1000, 17, 333], window_lens=[40, 0, 16], device="cuda",
                                seed=head_dim + 7 * gqa + kv_heads + len(key + value))  # fmt: skip
    if not cuda_supported(kf.kind, kf.bits, vf.kind, vf.bits, head_dim, 16, gqa):
        assert kf.bits == 1 and head_dim == 64  # the one gap: 1-bit keys at head_dim 64 (16 bits per thread)
        with pytest.raises(ValueError, match="kernel='cuda'"):
            decode(**case, key_codec=kf, value_codec=vf, kernel="cuda")
        return
    check(case, kf, vf)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("key,value", [("int:4", "int:4"), ("int:2", "int:2"), ("turbo_mse:4", "turbo_mse:4"),
                                       ("turbo_mse:3", "int:3"), ("int:8", "turbo_mse:1")])  # fmt: skip
@pytest.mark.parametrize("value_scale,key_ramp", [(1.0, 3.0), (3000.0, 0.0), (3000.0, 3.0)])
def test_large_values_and_moving_max_match_reference(key, value, value_scale, key_ramp):
    """Values of magnitude 3000 (the kernel packs p * v_scale to fp16 for the value mma) and keys that grow along the
    sequence (the running max moves again and again, the output rescaled each time) match the reference."""
    case, kf, vf, _ = make_case(key, value, batch=2, kv_heads=2, gqa=4, head_dim=128, block_size=16,
                                seq_lens=[3000, 77], window_lens=[24, 5], device="cuda", seed=11,
                                value_scale=value_scale, key_ramp=key_ramp)  # fmt: skip
    check(case, kf, vf)


def test_supported_streams():
    for kind, bits in BITS.items():
        for b in bits:
            for d in HEAD_DIMS:
                assert cuda_supported(kind, b, kind, b, d, 16, 4) == (not (b == 1 and d == 64))
                assert cuda_supported("int", 4, kind, b, d, 16, 4)
    assert not cuda_supported("turbo_prod", 3, "int", 4, 128, 16, 4)
    assert not cuda_supported("int", 4, "int", 5, 128, 16, 4)
    assert not cuda_supported("int", 4, "int", 4, 128, 8, 4)
    assert not cuda_supported("int", 4, "int", 4, 96, 16, 4)
    assert not cuda_supported("int", 4, "int", 4, 128, 16, 17)
    with pytest.raises(ValueError, match="key_kind/key_bits"):
        Variant(64, 4, 8, 8, 16, 2, False, key_bits=1, value_bits=4)
    with pytest.raises(ValueError, match="value_kind/value_bits"):
        Variant(128, 4, 8, 8, 16, 2, False, value_bits=5, value_kind="turbo_mse")


def test_bad_inputs_are_refused_before_launch(device):
    case, kf, vf, _ = make_case("int:4", "int:4", batch=2, kv_heads=2, gqa=2, head_dim=64, block_size=16,
                                seq_lens=[40, 17], window_lens=[3, 0], device=device, seed=1)  # fmt: skip
    capacity = case["block_tables"].shape[1] * 16
    for name, index, value in [("block_tables", (0, 1), -1), ("block_tables", (1, 0), case["key_cache"].shape[0]),
                               ("seq_lens", 0, capacity + 1), ("seq_lens", 1, -1),
                               ("window_lens", 0, case["window_keys"].shape[1] + 1)]:  # fmt: skip
        bad = {k: t.clone() for k, t in case.items()}
        bad[name][index] = value
        with pytest.raises(ValueError, match=name.split("_")[0]):
            decode(**bad, key_codec=kf, value_codec=vf)
    bad = {k: t.clone() for k, t in case.items()}
    bad["block_tables"][0, -1] = -5  # beyond what seq_lens uses: never read, so allowed
    decode(**bad, key_codec=kf, value_codec=vf)


def test_fake_implementation_traces_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    import kvpack.kernels.cuda_decode  # noqa: F401 - registers the op

    with FakeTensorMode():
        q = torch.empty(2, 8, 128, dtype=torch.float16)
        pages = torch.empty(5, 16, 2, 68, dtype=torch.uint8)
        bt, lens = torch.empty(2, 3, dtype=torch.int32), torch.empty(2, dtype=torch.int32)
        w = torch.empty(2, 4, 2, 128, dtype=torch.float16)
        cb = torch.empty(16, dtype=torch.float16)
        out = torch.ops.kvpack.cuda_paged_decode(q, pages, pages, bt, lens, w, w, lens, None, None, None, cb, 0.1, 4,
                                                 2, 2)  # fmt: skip
    assert out.shape == q.shape and out.dtype == q.dtype


def _nvrtc_available() -> bool:
    try:
        from cuda.core import Program, ProgramOptions

        Program('extern "C" __global__ void k() {}', "c++", options=ProgramOptions(arch="sm_90")).compile("cubin")
    except Exception:  # noqa: BLE001 - any failure (package or libnvrtc missing) means: skip
        return False
    return True


@pytest.mark.skipif(
    not _nvrtc_available(), reason="needs cuda.core and NVRTC (pip install cuda-core nvidia-cuda-nvrtc)"
)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("gqa,kv_heads,heads_per_cta", [(4, 8, 8), (4, 8, 4), (1, 4, 4), (16, 2, 2), (3, 1, 1)])
def test_every_variant_compiles_for_sm90(head_dim, gqa, kv_heads, heads_per_cta, tmp_path, monkeypatch):
    monkeypatch.setenv("KVPACK_CACHE", str(tmp_path))
    # every launch shape with int:4 in fp16, and in bf16 at the GQA ratios that span two n-tiles (16) or leave an odd
    # padding (3): the bf16 macro changes the query load and the output store only; every other kind and bit pair
    # (bf16 among them) at one shape per head_dim below
    dtypes = (False, True) if gqa in (3, 16) else (False,)
    for bf16, key_kind, key_bits, value_kind, value_bits in ((bf16, "int", 4, "int", 4) for bf16 in dtypes):
        v = Variant(head_dim, gqa, kv_heads, heads_per_cta, 16, 2, bf16, key_bits=key_bits, value_bits=value_bits,
                    key_kind=key_kind, value_kind=value_kind)  # fmt: skip
        cubin = compile_variant(v, "sm_90")
        assert cubin[:4] == b"\x7fELF"
        assert compile_variant(v, "sm_90") == cubin  # the disk cache returns the same bytes
    assert math.prod(p.stat().st_size > 0 for p in tmp_path.rglob("*.cubin"))


@pytest.mark.skipif(
    not _nvrtc_available(), reason="needs cuda.core and NVRTC (pip install cuda-core nvidia-cuda-nvrtc)"
)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_every_codec_pair_compiles_for_sm90(head_dim, tmp_path, monkeypatch):
    monkeypatch.setenv("KVPACK_CACHE", str(tmp_path))
    streams = [(False, "int", 2, "int", 2), (True, "int", 4, "int", 2), (False, "int", 8, "int", 3),
               (False, "turbo_mse", 4, "turbo_mse", 4), (True, "turbo_mse", 3, "turbo_mse", 2),
               (False, "turbo_mse", 2, "turbo_mse", 1), (False, "int", 8, "turbo_mse", 3)]  # fmt: skip
    for bf16, key_kind, key_bits, value_kind, value_bits in streams:
        v = Variant(head_dim, 4, 8, 8 if head_dim < 256 else 4, 16, 2, bf16, key_bits=key_bits,
                    value_bits=value_bits, key_kind=key_kind, value_kind=value_kind)  # fmt: skip
        assert compile_variant(v, "sm_90")[:4] == b"\x7fELF"


@given(batch=st.integers(1, 64), window=st.integers(0, 4096))
def test_window_splits_cover_the_window_once(batch, window):
    """The window CTAs tile ``[0, window)`` exactly: every token in one CTA, no CTA empty (but the one of an empty
    window), whole 16-token tiles per CTA, one CTA from `SMALL_BATCH` sequences."""
    per, n = window_per_split(batch, window), window_splits(batch, window)
    assert per % 16 == 0 and per > 0
    assert n * per >= window and (n - 1) * per < max(window, 1)
    if batch >= SMALL_BATCH:
        assert n == 1
