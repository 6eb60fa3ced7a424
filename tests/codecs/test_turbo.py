"""`turbo_mse` and `turbo_prod` (TurboQuant): the stored format, MSE against Lloyd-Max theory, unbiased inner
products, determinism, error paths, shapes and dtypes."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvpack
from kvpack.codecs.qjl import sketch_matrix, sketch_seed
from kvpack.codecs.turbo import TurboMSE
from kvpack.evaluation.validate import inner_product_error_z, random_unit_vectors
from kvpack.ops.lloyd_max import sphere_boundaries, sphere_codebook, sphere_mse
from kvpack.ops.packing import pack_bits
from kvpack.ops.rotation import rotate, unrotate

# Lloyd-Max MSE of a N(0, 1) source (Max 1960); the reference for TurboQuant-MSE at d=128
GAUSSIAN_LLOYD_MAX = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}


@pytest.fixture(scope="module")
def unit_128() -> torch.Tensor:
    return random_unit_vectors(100_000, 128, seed=21)


def unit_mse(spec: str, x: torch.Tensor) -> float:
    codec = kvpack.get_codec(spec, head_dim=x.shape[-1])
    return ((codec.decode(codec.encode(x)) - x) ** 2).sum(-1).mean().item()


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_turbo_mse_meets_lloyd_max_on_unit_vectors(bits, unit_128):
    mse = unit_mse(f"turbo_mse:{bits}", unit_128)
    assert 4.0**-bits < mse <= 1.02 * GAUSSIAN_LLOYD_MAX[bits]
    # and it is the sphere quantizer's own expected error (d * per-coordinate MSE), float16 norm included
    assert mse == pytest.approx(128 * sphere_mse(128, bits), rel=0.01)


@pytest.mark.parametrize("head_dim", [64, 96])
def test_turbo_mse_other_dims_and_hadamard(head_dim):
    x = random_unit_vectors(20_000, head_dim, seed=4)
    assert unit_mse("turbo_mse:3", x) == pytest.approx(head_dim * sphere_mse(head_dim, 3), rel=0.02)
    if head_dim == 64:
        assert unit_mse("turbo_mse:3:rotation=hadamard", x) == pytest.approx(64 * sphere_mse(64, 3), rel=0.02)


def test_turbo_mse_stored_format():
    codec = kvpack.get_codec("turbo_mse:3", head_dim=64, seed=5)
    x = torch.randn(3, 10, 64) * 4
    packed = codec.encode(x)
    assert packed.data.keys() == {"norm", "codes"}
    norm = x.norm(dim=-1, keepdim=True)
    assert torch.equal(packed.data["norm"], norm.half())
    idx = torch.bucketize(rotate(x / norm, "haar", 5), sphere_boundaries(64, 3).float())
    assert torch.equal(packed.data["codes"], pack_bits(idx, 3))
    expected = unrotate(sphere_codebook(64, 3).float()[idx], "haar", 5) * norm.half().float()
    torch.testing.assert_close(codec.decode(packed), expected)
    assert codec.bits_per_value() == 3 + 16 / 64


def test_turbo_prod_stored_format():
    codec = kvpack.get_codec("turbo_prod:3", head_dim=64, seed=5, rotation="hadamard")
    assert codec.mse == TurboMSE(head_dim=64, bits=2, seed=5, rotation="hadamard")
    x = torch.randn(7, 64)
    packed, first = codec.encode(x), codec.mse.encode(x)
    assert packed.data.keys() == {"norm", "codes", "qjl_signs", "residual_norm"}
    assert torch.equal(packed.data["norm"], first.data["norm"])
    assert torch.equal(packed.data["codes"], first.data["codes"])
    residual = x - codec.mse.decode(first)
    s = sketch_matrix(64, 64, sketch_seed(5))
    assert torch.equal(packed.data["qjl_signs"], pack_bits((residual @ s.T >= 0).to(torch.uint8), 1))
    assert torch.equal(packed.data["residual_norm"], residual.norm(dim=-1, keepdim=True).half())
    signs = (residual @ s.T >= 0).float() * 2 - 1
    scale = packed.data["residual_norm"].float() * math.sqrt(math.pi / 2) / 64
    torch.testing.assert_close(codec.decode(packed), codec.mse.decode(first) + scale * (signs @ s))
    assert codec.bits_per_value() == 3 + 32 / 64


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_turbo_prod_inner_products_unbiased(bits):
    assert abs(inner_product_error_z(f"turbo_prod:{bits}")) < 3


@pytest.mark.parametrize("bits", [1, 2])
def test_bias_test_detects_a_biased_estimator(bits):
    # turbo_mse shrinks: E<k, k_hat> = 1 - MSE for unit k; the same test must flag it
    assert inner_product_error_z(f"turbo_mse:{bits}") < -3


def prod_correlation(spec: str, k: torch.Tensor) -> float:
    """Correlation of ``<q, decode(k)>`` with ``<q, k>`` for standard Gaussian queries ``q``."""
    codec = kvpack.get_codec(spec, head_dim=k.shape[-1])
    q = torch.randn(k.shape, generator=torch.Generator().manual_seed(8))
    true, est = (q * k).sum(-1), (q * codec.decode(codec.encode(k))).sum(-1)
    return torch.corrcoef(torch.stack((true, est)))[0, 1].item()


@pytest.fixture(scope="module")
def prod3_correlation(unit_128) -> float:
    return prod_correlation("turbo_prod:3", unit_128)


def test_turbo_prod_correlation_matches_theory(prod3_correlation):
    # unbiased estimator, isotropic q, unit k: corr = 1 / sqrt(1 + MSE), and the MSE of 1-bit QJL on the residual
    # r of turbo_mse:2 is E||r||^2 (pi/2 - 1/d) (QJL paper, m = d rows)
    mse = 128 * sphere_mse(128, 2) * (math.pi / 2 - 1 / 128)
    assert prod3_correlation == pytest.approx(1 / math.sqrt(1 + mse), abs=0.005)


@pytest.mark.xfail(strict=True, reason="measured 0.918 at d=128 (theory 0.920): 1-bit QJL with m = d caps it")
def test_turbo_prod_3_bits_correlation_target(prod3_correlation):
    assert prod3_correlation >= 0.95


@pytest.mark.parametrize("spec", ["turbo_mse:2", "turbo_mse:4:rotation=hadamard", "turbo_prod:3", "turbo_prod:5"])
def test_determinism(spec):
    x = torch.randn(5, 33, 64)
    a = kvpack.get_codec(spec, head_dim=64, seed=3).encode(x)
    b = kvpack.get_codec(spec, head_dim=64, seed=3).encode(x.clone())
    c = kvpack.get_codec(spec, head_dim=64, seed=4).encode(x)
    assert all(torch.equal(a.data[key], b.data[key]) for key in a.data)
    assert not torch.equal(a.data["codes"], c.data["codes"])
    if "qjl_signs" in a.data:
        assert not torch.equal(a.data["qjl_signs"], c.data["qjl_signs"])


@pytest.mark.parametrize("spec", ["turbo_mse:1", "turbo_mse:3:rotation=hadamard", "turbo_prod:2", "turbo_prod:4"])
def test_zero_vectors_decode_to_zero(spec):
    codec = kvpack.get_codec(spec, head_dim=64)
    x = torch.randn(4, 64)
    x[1] = 0
    y = codec.decode(codec.encode(x.half()))
    assert torch.isfinite(y).all() and torch.equal(y[1], torch.zeros(64, dtype=torch.float16))


def test_errors():
    for name, bad_bits in (("turbo_mse", (0, 5)), ("turbo_prod", (1, 6))):
        for bits in bad_bits:
            with pytest.raises(ValueError, match="out of range"):
                kvpack.get_codec(name, head_dim=64, bits=bits)
        with pytest.raises(ValueError, match="rotation must be one of"):
            kvpack.get_codec(f"{name}:rotation=dct", head_dim=64)
        with pytest.raises(ValueError, match="rotation must be one of"):
            kvpack.get_codec(name, head_dim=64, rotation=3)
        with pytest.raises(ValueError, match="power-of-two head_dim"):
            kvpack.get_codec(f"{name}:rotation=hadamard", head_dim=96)
        with pytest.raises(ValueError, match="head_dim >= 2"):
            kvpack.get_codec(name, head_dim=1)
        with pytest.raises(ValueError, match="float16"):
            kvpack.get_codec(name, head_dim=64).encode(torch.full((2, 64), 1e4))
        with pytest.raises(ValueError, match="unknown option"):
            kvpack.get_codec(f"{name}:sketch_dim=64", head_dim=64)


SPECS = ["turbo_mse:1", "turbo_mse:4", "turbo_prod:2", "turbo_prod:5"]


@given(
    spec=st.sampled_from(SPECS),
    head_dim=st.sampled_from([2, 8, 48, 64]),
    lead=st.lists(st.integers(0, 4), max_size=3),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
    hadamard=st.booleans(),
)
@settings(max_examples=40, deadline=None)
def test_property_shapes_dtypes(spec, head_dim, lead, dtype, hadamard, check_codec_contract):
    rotation = "hadamard" if hadamard and head_dim != 48 else "haar"
    codec = kvpack.get_codec(spec, head_dim=head_dim, rotation=rotation)
    check_codec_contract(codec, (torch.randn(*lead, head_dim) * 2).to(dtype))


@pytest.mark.parametrize("rotation", ["haar", "hadamard"])
def test_paged_tables(rotation):
    """turbo_mse hands the kernels its codebook, edges and rotation matrix; turbo_prod its mse stage's and its sketch."""
    mse = kvpack.get_codec(f"turbo_mse:3:rotation={rotation}", head_dim=32, seed=4)
    tables = mse.paged_tables()
    assert set(tables) == {"codebook", "boundaries", "rotation"}
    assert torch.equal(tables["codebook"], sphere_codebook(32, 3).float())
    assert torch.equal(tables["boundaries"], sphere_boundaries(32, 3).float())
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(x @ tables["rotation"], rotate(x, rotation, 4), rtol=0, atol=1e-5)
    prod = kvpack.get_codec(f"turbo_prod:4:rotation={rotation}", head_dim=32, seed=4)
    prod_tables = prod.paged_tables()
    assert torch.equal(prod_tables.pop("sketch"), sketch_matrix(32, 32, sketch_seed(4)))
    assert prod_tables.keys() == tables.keys() and all(torch.equal(prod_tables[k], tables[k]) for k in tables)
