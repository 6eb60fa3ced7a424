"""`kvpack.kernels.encode`: the fused paged encode kernel writes the rows of the codec's own encode."""

from __future__ import annotations

import pytest
import torch

from kvpack import get_codec
from kvpack.kernels.paged import PagedCodec, paged_codec, rows_from_packed, unpack_rows


def encode_through_kernel(spec: str, device: str, block_t: int = 16, tokens: int = 50, d: int = 32):
    """(codec, fmt, rows the kernel wrote, rows of the codec's encode) for ``tokens`` x 2 heads at head_dim ``d``,
    ``block_t`` tokens per tile (0: the default tiling; below 16 the products are not tensor-core dots)."""
    from kvpack.kernels.encode import paged_encode

    hkv, block_size = 2, 8
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
    paged_encode(x_dev, slots_dev, cache, fmt, block_t=block_t)
    cache = cache.cpu()
    flat, flat_before = cache.view(-1, hkv, fmt.row_bytes), before.view(-1, hkv, fmt.row_bytes)
    keep = slots >= 0
    untouched = torch.ones(flat.shape[0], dtype=torch.bool)
    untouched[slots[keep]] = False
    assert torch.equal(flat[untouched], flat_before[untouched])
    return codec, fmt, flat[slots[keep]], rows_from_packed(codec.encode(x[keep]), fmt)


@pytest.mark.parametrize("block_t,tokens", [(16, 50), (1, 50), (0, 6)])  # 0, 6: a decode step's default tiling
@pytest.mark.parametrize(
    "spec", ["turbo_mse:4", "turbo_mse:3", "turbo_mse:2", "int:8", "int:4", "int:3", "int:2", "int:4:rotation=hadamard"]
)
def test_encode_kernel_codes_equal_the_codec(spec, block_t, tokens, device):
    check_codes(*encode_through_kernel(spec, device, block_t, tokens))


@pytest.mark.parametrize("d,tokens", [(256, 40), (256, 6), (128, 40)])
@pytest.mark.parametrize("spec", ["turbo_mse:4", "int:4:rotation=hadamard"])
def test_encode_kernel_rotated_wide_heads(spec, d, tokens, device):
    """Rotations of head_dim 256 take one token per tile (a dot's layouts of M asked for more shared memory than an
    H200 has), and a prefill's tiles at 128 a dot: both give the codec's codes."""
    check_codes(*encode_through_kernel(spec, device, 0, tokens, d))


def check_codes(codec, fmt, rows, expected):
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


@pytest.mark.parametrize("block_t", [16, 1])
@pytest.mark.parametrize("spec", ["turbo_prod:4", "turbo_prod:3", "turbo_prod:2", "turbo_prod:5:rotation=hadamard"])
def test_encode_kernel_turbo_prod_equals_the_codec(spec, block_t, device):
    _, fmt, rows, expected = encode_through_kernel(spec, device, block_t)
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


@pytest.mark.parametrize("key,value", [("turbo_mse:4", "int:3:rotation=hadamard"), ("int:4", "turbo_prod:3")])
def test_encode_kv_writes_what_two_launches_write(key, value, device):
    """`paged_encode_kv` (K and V in one launch, different codecs) writes the bytes of one `paged_encode` per stream."""
    from kvpack.kernels.encode import paged_encode, paged_encode_kv

    d, hkv, tokens = 64, 2, 37
    kf, vf = (paged_codec(get_codec(s, head_dim=d, seed=3), device) for s in (key, value))
    g = torch.Generator().manual_seed(9)
    keys, values = (torch.randn(tokens, hkv, d, generator=g).half().to(device) for _ in range(2))
    slots = torch.randperm(6 * 8, generator=g)[:tokens]
    slots[3] = -1
    slots = slots.to(device)
    pools = [torch.randint(0, 256, (6, 8, hkv, f.row_bytes), generator=g, dtype=torch.uint8).to(device)
             for f in (kf, vf)]  # fmt: skip
    expected = [p.clone() for p in pools]
    paged_encode(keys, slots, expected[0], kf)
    paged_encode(values, slots, expected[1], vf)
    paged_encode_kv(keys, values, slots, pools[0], pools[1], kf, vf)
    assert torch.equal(pools[0], expected[0]) and torch.equal(pools[1], expected[1])


def test_encode_kv_rejects_bad_input():
    from kvpack.kernels.encode import paged_encode_kv

    fmt = PagedCodec("int", 32, 4)
    cache = torch.zeros(2, 4, 1, fmt.row_bytes, dtype=torch.uint8)
    with pytest.raises(ValueError, match="same tokens"):
        paged_encode_kv(torch.randn(3, 1, 32), torch.randn(2, 1, 32), torch.arange(3), cache, cache, fmt, fmt)
    with pytest.raises(TypeError, match="values must be a float tensor"):
        paged_encode_kv(torch.randn(3, 1, 32), torch.zeros(3, 1, 32, dtype=torch.int32), torch.arange(3), cache,
                        cache, fmt, fmt)  # fmt: skip
    with pytest.raises(ValueError, match="cache must be uint8"):
        paged_encode_kv(torch.randn(3, 1, 32), torch.randn(3, 1, 32), torch.arange(3), cache,
                        torch.zeros(2, 4, 1, 3, dtype=torch.uint8), fmt, fmt)  # fmt: skip
