"""The engine API: quantize_kv / dequantize_kv / bpe_accounting."""

import pytest
import torch

import kvpack
from kvpack.engine import PackedKV, bpe_accounting, dequantize_kv, quantize_kv


def needs(name: str) -> None:
    if name not in kvpack.list_codecs():
        pytest.skip(f"codec {name!r} not registered yet")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fp16_round_trip_exact_and_dtype(dtype):
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 3, 17, 64, generator=g).to(dtype)
    v = torch.randn(2, 3, 17, 32, generator=g).to(dtype)  # values may have another head_dim
    packed = quantize_kv(k, v, k_bits=None, v_bits=None, codec="fp16")
    k2, v2 = dequantize_kv(packed)
    assert k2.dtype == dtype and v2.dtype == dtype
    for x, x2 in ((k, k2), (v, v2)):
        # stored as float16 (the codec's contract): exact for float16; for bfloat16 exactly its float16 rounding,
        # which is the value itself wherever float16 is normal (bfloat16's 8 mantissa bits fit in float16's 10)
        assert torch.equal(x2, x.to(torch.float16).to(dtype))
        if dtype != torch.float32:
            normal = x.abs() >= torch.finfo(torch.float16).tiny
            assert torch.equal(x2[normal], x[normal])
    if dtype == torch.float16:
        assert torch.equal(k2, k) and torch.equal(v2, v)
    acc = bpe_accounting(packed)
    assert acc["logical_bits"] == 16 and acc["storage_bits"] == 16 and acc["ratio_to_fp16"] == 1


def test_fp8_accounting_counts_scales():
    k, v = torch.randn(4, 10, 64), torch.randn(4, 10, 64)
    packed = quantize_kv(k, v, k_bits=None, v_bits=None, codec="fp8")
    acc = bpe_accounting(packed)
    assert acc["logical_bits"] == pytest.approx(8 + 16 / 64)  # one fp16 scale per vector
    assert acc["storage_bits"] == pytest.approx(8 + 16 / 64)
    assert acc["nbytes"] == packed.k.nbytes + packed.v.nbytes == 2 * 40 * (64 + 2)
    assert acc["ratio_to_fp16"] == pytest.approx((8 + 16 / 64) / 16)
    k2, v2 = dequantize_kv(packed)
    assert (k2 - k).norm() / k.norm() < 0.05 and (v2 - v).norm() / v.norm() < 0.05


def test_mixed_codecs_and_seed_in_spec():
    needs("int")
    k, v = torch.randn(2, 64, 64), torch.randn(2, 64, 64)
    packed = quantize_kv(k, v, k_bits=4, v_bits=None, codec="int", v_codec="fp8")
    assert packed.k.codec.startswith("int:4") and packed.v.codec == "fp8"
    k2, _ = dequantize_kv(packed)
    assert (k2 - k).norm() / k.norm() < 0.2


def test_e8_k3_v2_is_2_625_logical_bits_at_d128():
    needs("e8")
    k, v = torch.randn(2, 8, 64, 128), torch.randn(2, 8, 64, 128)
    packed = quantize_kv(k, v, k_bits=3, v_bits=2, codec="e8")
    acc = bpe_accounting(packed)
    assert acc["logical_bits"] == pytest.approx(2.625)
    assert acc["storage_bits"] == pytest.approx(2.625, rel=0.01)
    k2, v2 = dequantize_kv(packed)
    assert k2.shape == k.shape and v2.shape == v.shape


def test_deterministic_bytes():
    k, v = torch.randn(3, 32, 64), torch.randn(3, 32, 64)
    a, b = quantize_kv(k, v, None, None, codec="fp8"), quantize_kv(k, v, None, None, codec="fp8")
    for x, y in ((a.k, b.k), (a.v, b.v)):
        for name in x.data:
            assert torch.equal(x.data[name], y.data[name])


def test_bad_input():
    k = torch.randn(2, 5, 64)
    with pytest.raises(ValueError, match="share all dims"):
        quantize_kv(k, torch.randn(2, 6, 64), None, None, codec="fp16")
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        quantize_kv([1.0], k, None, None, codec="fp16")
    with pytest.raises(ValueError, match="takes no bits"):
        quantize_kv(k, k, k_bits=3, v_bits=None, codec="fp16")
    with pytest.raises(TypeError, match="k_bits must be an int"):
        quantize_kv(k, k, k_bits=2.5, v_bits=None, codec="fp16")
    with pytest.raises(ValueError, match="unknown codec"):
        quantize_kv(k, k, None, None, codec="nope")
    with pytest.raises(TypeError, match="PackedKV"):
        dequantize_kv({"k": 1})
    with pytest.raises(TypeError, match="PackedKV"):
        bpe_accounting(None)
    with pytest.raises(TypeError, match="kvpack.Packed"):
        PackedKV(k, k)
