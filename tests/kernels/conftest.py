"""Kernel tests run through Triton's interpreter when there is no GPU (TRITON_INTERPRET=1, set in tests/conftest.py)."""

import pytest
import torch

pytest.importorskip("triton")


@pytest.fixture
def device() -> str:
    """Where the kernels run: CUDA when present, else the CPU through TRITON_INTERPRET=1."""
    return "cuda" if torch.cuda.is_available() else "cpu"
