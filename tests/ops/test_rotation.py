"""`kvpack.ops.rotation`: the seeded rotations as a matrix."""

import pytest
import torch

from kvpack.ops.rotation import rotate, rotation_as_matrix, unrotate


@pytest.mark.parametrize("kind,dim", [("haar", 48), ("haar", 64), ("hadamard", 32), ("hadamard", 128)])
def test_rotation_as_matrix_is_rotate_and_orthogonal(kind, dim):
    m = rotation_as_matrix(kind, dim, seed=3)
    assert m.dtype == torch.float32 and m.shape == (dim, dim)
    x = torch.randn(6, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(x @ m.double(), rotate(x, kind, 3), rtol=0, atol=1e-6)
    torch.testing.assert_close(x @ m.double() @ m.double().T, x, rtol=0, atol=1e-6)
    torch.testing.assert_close(unrotate(x @ m.double(), kind, 3), x, rtol=0, atol=1e-6)
    assert not torch.equal(m, rotation_as_matrix(kind, dim, seed=4))
