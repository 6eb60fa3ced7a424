"""Kernel tests run through Triton's interpreter when there is no GPU (set before any kernel module is imported)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")


@pytest.fixture
def device() -> str:
    """Where the kernels run: CUDA when present, else the CPU through TRITON_INTERPRET=1."""
    return "cuda" if torch.cuda.is_available() else "cpu"
