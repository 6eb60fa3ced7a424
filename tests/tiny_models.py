"""Random-weight tiny decoder models of the families users run (for generality tests, no download).

``TINY_FAMILIES`` names a builder per family; each returns ``model.eval()`` with a few layers, hidden 64-128,
head_dim >= 32 (at 16, a 16-bit norm per vector alone costs 1 bit), GQA, and the family's own traits: Qwen2's QKV bias, Mistral's sliding window, Gemma3's alternating sliding and
full layers with qk-norm and head_dim 256, Phi3's fused QKV, Qwen3's qk-norm.
"""

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 128
COMMON = {"vocab_size": VOCAB, "max_position_embeddings": 2048, "num_hidden_layers": 3, "intermediate_size": 128}


def tiny_llama():
    return LlamaForCausalLM(
        LlamaConfig(**COMMON, hidden_size=64, num_attention_heads=2, num_key_value_heads=1)
    )  # head_dim 32


def tiny_qwen2():
    return Qwen2ForCausalLM(Qwen2Config(**COMMON, hidden_size=128, num_attention_heads=4, num_key_value_heads=2))


def tiny_qwen3():
    return Qwen3ForCausalLM(
        Qwen3Config(**COMMON, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    )


def tiny_mistral():
    return MistralForCausalLM(
        MistralConfig(**COMMON, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, sliding_window=512)
    )


def tiny_gemma3():
    """Gemma3: sliding (window 512, as Gemma3-270M's), sliding, full layers; qk-norm; one KV head of head_dim 256."""
    config = Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 3}, hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
        head_dim=256, sliding_window=512, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    )  # fmt: skip
    return Gemma3ForCausalLM(config)


def tiny_phi3():
    return Phi3ForCausalLM(
        Phi3Config(**COMMON, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    )  # head_dim 32


def tiny_phi3_head_dim(head_dim: int):
    """Phi3 at a head_dim that is no power of two (Phi-3-mini's 96, or 80): no Hadamard rotation, no paged kernel."""
    return Phi3ForCausalLM(
        Phi3Config(**COMMON, hidden_size=2 * head_dim, num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)
    )


TINY_FAMILIES = {
    "llama": tiny_llama,
    "qwen2": tiny_qwen2,
    "qwen3": tiny_qwen3,
    "mistral": tiny_mistral,
    "gemma3": tiny_gemma3,
    "phi3": tiny_phi3,
}


def tiny_model(family: str, seed: int = 0):
    """The family's tiny model with weights drawn from ``seed``, in eval mode."""
    torch.manual_seed(seed)
    return TINY_FAMILIES[family]().eval()


def routes_through_attention_interface(model) -> bool:
    """Whether ``model``'s attention calls the AttentionInterface function its config names (Falcon's did not before
    transformers 5.25), probed with a recording one: what decides whether the paged caches can take it."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    calls = []

    def recording(module, *args, **kwargs):
        calls.append(module)
        return sdpa_attention_forward(module, *args, **kwargs)

    AttentionInterface.register("kvpack_test_probe", recording)
    original = model.config._attn_implementation
    model.set_attn_implementation("kvpack_test_probe")
    try:
        with torch.inference_mode():
            model(torch.tensor([[1, 2, 3]]))
    finally:
        model.set_attn_implementation(original)
    return bool(calls)
