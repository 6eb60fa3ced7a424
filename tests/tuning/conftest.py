"""Shared builders of tests/tuning: a tiny random-weight Llama and random token windows."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def _tiny_llama(layers=3, kv_heads=2):
    """Random-weight GQA Llama: 4 query heads, head_dim 16."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=512,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def _windows(n=1, length=60, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (length,), generator=g) for _ in range(n)]


@pytest.fixture
def tiny_llama():
    """``tiny_llama(layers=3, kv_heads=2)`` builds the model."""
    return _tiny_llama


@pytest.fixture
def windows():
    """``windows(n=1, length=60, seed=1)``: ``n`` random 1-D token id windows."""
    return _windows
