"""The `e8` codec: nearest-point correctness, the Voronoi codebook, accuracy against scalar codecs."""

import itertools

import pytest
import torch

import kvpack
from kvpack.codecs.lattice import e8_basis, nearest_d8, nearest_e8, voronoi_decode, voronoi_encode

# Lloyd-Max MSE of a unit-variance Gaussian at 2, 3, 4 bits (Max 1960, Table I): the best scalar
# quantizer, so the best any per-coordinate codec can do on rotated (near-Gaussian) coordinates
LLOYD_MAX_GAUSSIAN = {2: 0.1175, 3: 0.03454, 4: 0.009497}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The encoder runs many small ops; on a busy shared CPU, intra-op threads cost more than they
    give (measured 50x on 30 vectors), so this module runs single-threaded and restores after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def e8_points_near_origin() -> torch.Tensor:
    """Every E8 point with all |coordinates| <= 1.5: D8 points in {-1,0,1}^8, D8+1/2 in {+-1/2, +-3/2}^8."""
    ints = torch.tensor(list(itertools.product((-1.0, 0.0, 1.0), repeat=8)))
    halves = torch.tensor(list(itertools.product((-1.5, -0.5, 0.5, 1.5), repeat=8)))
    d8 = ints[ints.sum(-1) % 2 == 0]
    d8_half = halves[(halves - 0.5).sum(-1) % 2 == 0]
    return torch.cat((d8, d8_half))


def test_nearest_e8_matches_brute_force():
    # a query in [-1/2, 1/2]^8 has its nearest E8 point within the covering radius 1, so every
    # coordinate of that point is within 1.5: the enumerated set holds it
    points = e8_points_near_origin()
    g = torch.Generator().manual_seed(0)
    y = torch.rand(300, 8, generator=g) - 0.5
    brute = points[torch.cdist(y, points).argmin(dim=1)]
    assert torch.equal(nearest_e8(y), brute)
    # D8 alone: its points are the integer ones of the set
    d8 = points[(points == points.round()).all(-1)]
    assert torch.equal(nearest_d8(y), d8[torch.cdist(y, d8).argmin(dim=1)])


def test_nearest_e8_is_lattice_equivariant():
    g = torch.Generator().manual_seed(1)
    basis, _ = e8_basis()
    shift = (torch.randint(-6, 7, (300, 8), generator=g).double() @ basis).float()
    y = torch.rand(300, 8, generator=g) - 0.5
    assert torch.equal(nearest_e8(y + shift), nearest_e8(y) + shift)


def test_basis_generates_e8():
    basis, basis_inv = e8_basis()
    assert torch.linalg.det(basis).item() == pytest.approx(1.0)
    assert torch.equal(nearest_e8(basis.float()), basis.float())
    z = e8_points_near_origin().double() @ basis_inv
    assert torch.allclose(z, z.round(), atol=1e-9)  # every E8 point has integer coordinates


@pytest.mark.parametrize("bits", [2, 4])
def test_voronoi_codebook_has_q8_distinct_points(bits):
    q = 1 << bits
    codes = torch.cartesian_prod(*[torch.arange(q)] * 8) if q == 2 else torch.randint(0, q, (20000, 8))
    points = voronoi_decode(codes, q)
    assert torch.equal(nearest_e8(points), points)  # lattice points
    assert torch.equal(voronoi_encode(points, q), codes)  # coordinates mod q round-trip
    assert torch.equal(nearest_e8(points / q) * q, torch.zeros_like(points))  # inside q V(E8)
    if q == 2:
        assert torch.unique(points, dim=0).shape[0] == 256


def test_bits_per_value_k3_v2_average():
    k3 = kvpack.get_codec("e8:3", head_dim=128)
    v2 = kvpack.get_codec("e8:2", head_dim=128)
    assert (k3.bits_per_value(), v2.bits_per_value()) == (3.125, 2.125)
    assert (k3.bits_per_value() + v2.bits_per_value()) / 2 == 2.625
    x = torch.randn(3, 10, 128)
    for codec in (k3, v2):
        assert 8 * codec.encode(x).nbytes / x.numel() == codec.bits_per_value()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_e8_beats_scalar_quantizers_on_gaussian_data(bits):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2000, 128, generator=g)
    e8 = kvpack.get_codec(f"e8:{bits}", head_dim=128)
    uniform = kvpack.get_codec(f"int:{bits}", head_dim=128)  # spends 16/d more bits than e8
    mse_e8 = ((e8.decode(e8.encode(x)) - x) ** 2).mean().item()
    mse_int = ((uniform.decode(uniform.encode(x)) - x) ** 2).mean().item()
    assert mse_e8 < 0.8 * mse_int  # measured ratios 0.42, 0.60, 0.74 at 2, 3, 4 bits
    # per unit variance, below the optimal scalar quantizer (measured: 0.103, 0.027, 0.0074)
    assert mse_e8 < LLOYD_MAX_GAUSSIAN[bits]


@pytest.mark.parametrize("bits,worst", [(2, 0.6), (3, 0.3), (4, 0.15)])
def test_no_overload_wraparound_on_heavy_tails(bits, worst):
    # a block wrapped around by the Voronoi code would be off by a whole q-cell: error > |x|
    x = torch.distributions.StudentT(2.0).sample((1000, 64))
    codec = kvpack.get_codec(f"e8:{bits}", head_dim=64)
    rel = (codec.decode(codec.encode(x)) - x).norm(dim=-1) / x.norm(dim=-1)
    assert rel.max() < worst


def test_decode_is_a_scalar_multiply_and_zero_stays_zero():
    codec = kvpack.get_codec("e8:3", head_dim=64)
    packed = codec.encode(torch.randn(5, 64))
    doubled = kvpack.Packed(
        packed.codec, packed.shape, packed.dtype, {**packed.data, "scale": packed.data["scale"] * 2}
    )
    torch.testing.assert_close(codec.decode(doubled), 2 * codec.decode(packed))
    zero = torch.zeros(2, 64)
    assert torch.equal(codec.decode(codec.encode(zero)), zero)


def test_error_paths():
    for d in (96, 4, 12):
        with pytest.raises(ValueError, match="power of two and a multiple of 8"):
            kvpack.get_codec("e8:3", head_dim=d)
    with pytest.raises(ValueError, match="rotation must be 'hadamard'"):
        kvpack.get_codec("e8:3:rotation=haar", head_dim=64)
    for bits in (1, 5):
        with pytest.raises(ValueError, match="out of range"):
            kvpack.get_codec("e8", head_dim=64, bits=bits)
    with pytest.raises(ValueError, match="too large"):
        kvpack.get_codec("e8:2", head_dim=64).encode(torch.full((1, 64), 1e6))
