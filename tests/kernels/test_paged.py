"""`kvpack.kernels.paged`: the packed row layout, `PagedCodec` and the tables each codec hands the kernels."""

from __future__ import annotations

import pytest
import torch

from kvpack import get_codec, pack_bits
from kvpack.kernels.paged import PagedCodec, dequantize_rows, pack_rows, paged_codec, rows_from_packed, unpack_rows

SPECS = [
    "turbo_mse:4",
    "turbo_mse:3",
    "turbo_mse:2",
    "int:4",
    "int:8",
    "turbo_mse:4:rotation=hadamard",
    "int:3:rotation=hadamard",
    "int:4:rotation=haar",
    "turbo_prod:4",
    "turbo_prod:2:rotation=hadamard",
]


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
    with pytest.raises(ValueError, match="bits must be one of"):
        PagedCodec("turbo_mse", 64, 8)
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


@pytest.mark.parametrize("spec", [*SPECS, "turbo_prod:5:rotation=haar", "int:2"])
def test_paged_codec_holds_the_codecs_own_tables(spec):
    """The tables are the codec's: its sphere codebook and edges, ``M`` with ``x @ M == rotate(x)``, its sketch."""
    from kvpack.ops.lloyd_max import sphere_boundaries, sphere_codebook
    from kvpack.ops.rotation import rotate

    codec = get_codec(spec, head_dim=64, seed=5)
    fmt = paged_codec(codec)
    assert (fmt.kind, fmt.head_dim, fmt.bits) == (codec.name, 64, codec.bits)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if codec.name == "int":
        assert fmt.codebook is None and fmt.sketch is None
        assert (fmt.rotation is None) == (codec.rotation == "none")
    else:
        assert torch.equal(fmt.codebook, sphere_codebook(64, fmt.mse_bits).float())
        assert torch.equal(fmt.boundaries, sphere_boundaries(64, fmt.mse_bits).float())
        assert (fmt.sketch is not None) == (codec.name == "turbo_prod")
        if fmt.sketch is not None:
            assert torch.equal(fmt.sketch, codec.sketch())
    if fmt.rotation is not None:
        assert fmt.rotation.dtype == torch.float32
        torch.testing.assert_close(x @ fmt.rotation.double(), rotate(x, codec.rotation, codec.seed), rtol=0, atol=1e-6)


def test_paged_bits_are_the_only_bits_the_kernels_take():
    """`PAGED_BITS` decides for `paged_codec` and `PagedCodec` alike; codecs without tables are refused."""
    from kvpack.kernels.paged import KINDS, PAGED_BITS

    assert set(PAGED_BITS) == set(KINDS) and PAGED_BITS["turbo_prod"] == (2, 3, 4, 5)
    for name in KINDS:
        for bits in get_codec(name, head_dim=32).allowed_bits:
            codec = get_codec(f"{name}:{bits}", head_dim=32)
            if bits in PAGED_BITS[name]:
                assert paged_codec(codec).bits == bits
            else:
                with pytest.raises(ValueError, match=f"{name} with bits"):
                    paged_codec(codec)
    for spec in ("fp16", "fp8", "qjl", "polar:4", "e8:4"):
        with pytest.raises(ValueError, match="support turbo_mse"):
            paged_codec(get_codec(spec, head_dim=64))
