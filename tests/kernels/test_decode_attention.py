"""`kvpack.kernels.decode_attention`: the Triton decode kernel vs `kvpack.kernels.attention.decode_ref`.

On the CPU the kernel runs through Triton's interpreter on small shapes; `gpu` tests use real shapes.
Every check poisons the output (NaN) before the kernel writes it.
"""

from __future__ import annotations

import pytest
import torch
from cases import make_case, rel_err

from kvpack.kernels.attention import decode, decode_ref

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


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
