"""The decode protocol: one forward gives the logits of one-token-per-forward decoding through a KVPackCache."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from kvpack import CachePolicy, KVPackCache
from kvpack.evaluation.decode import decode_logits, decode_stepwise_logits
from kvpack.evaluation.protocol import clean_prefill, store_prefill

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

CTX, N = 24, 20


def tiny(kind="llama"):
    """Random-weight GQA model, float64 (so that float rounding cannot flip a quantization code), head_dim 16."""
    torch.manual_seed(0)
    common = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}  # fmt: skip
    if kind == "sliding":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=9))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    with torch.no_grad():  # sharper attention than random init gives, so that K errors matter
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(3.0)
    return model.double().eval()


POLICIES = {
    "residual 0 block 1": CachePolicy("int:4", "int:2", residual=0, sinks=1, block=1),
    "residual 0 block 1 no sinks": CachePolicy("int:3", "int:3", residual=0, sinks=0, block=1),
    "residual 4 block 2": CachePolicy("int:2", "int:4", residual=4, sinks=2, block=2),
    "residual 3 block 5, sinks past the context": CachePolicy("int:2", "int:2", residual=3, sinks=30, block=5),
    "per-layer blocks": CachePolicy(
        None, None, residual=2, sinks=1, layer_keys=("int:2", None, "e8:3"), layer_values=("int:4", "int:2", None)
    ),
    "pre-RoPE keys": CachePolicy("int:3", "int:3", residual=0, sinks=1, block=1, pre_rope_keys=True),
    "residual 16 block 4": CachePolicy("turbo_mse:3", "turbo_mse:2", residual=16, sinks=4, block=4),
    "centered keys": CachePolicy("int:2", "int:3", residual=4, sinks=1, block=2, center_keys=True),
}


def both(model, policy, ids):
    prefill = clean_prefill(model, ids[:, :CTX])
    caches = [store_prefill(KVPackCache(model.config, policy=policy), prefill) for _ in range(2)]
    cont = ids[:, CTX:]
    return decode_logits(model, caches[0], cont), decode_stepwise_logits(model, caches[1], cont), caches


@pytest.mark.parametrize("kind", ["llama", "sliding"])
@pytest.mark.parametrize("name", list(POLICIES))
def test_decode_logits_are_the_one_token_per_forward_logits(kind, name):
    model = tiny(kind)
    ids = torch.randint(3, 96, (1, CTX + N), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        fast, slow, (a, b) = both(model, POLICIES[name], ids)
        assert fast.shape == slow.shape == (N, 96)
        torch.testing.assert_close(fast, slow, rtol=0, atol=1e-9)
        # the cache ends as generation leaves it: the same blocks packed, the same bytes
        assert a.nbytes() == b.nbytes()
        for la, lb in zip(a.layers, b.layers):
            assert [c.tokens for c in la.chunks] == [c.tokens for c in lb.chunks]
            torch.testing.assert_close(la.past(), lb.past(), rtol=0, atol=1e-9)


def test_decode_differs_from_snapshot_where_generation_does():
    """With residual=0 every earlier continuation token is packed: the decode logits move away from the
    snapshot ones (whose continuation attends to itself exactly), and the first ones agree."""
    from kvpack.evaluation.protocol import continue_logits

    model = tiny()
    ids = torch.randint(3, 96, (1, CTX + N), generator=torch.Generator().manual_seed(2))
    policy = POLICIES["residual 0 block 1"]
    with torch.inference_mode():
        prefill = clean_prefill(model, ids[:, :CTX])
        snap = continue_logits(model, store_prefill(KVPackCache(model.config, policy=policy), prefill), ids[:, CTX:])
        dec = decode_logits(model, store_prefill(KVPackCache(model.config, policy=policy), prefill), ids[:, CTX:])
    torch.testing.assert_close(dec[0], snap[0], rtol=0, atol=1e-9)  # the first token sees only the prefill
    assert (dec[1:] - snap[1:]).abs().amax() > 1e-3


def test_decode_needs_a_kvpack_cache():
    from transformers import DynamicCache

    model = tiny()
    with pytest.raises(TypeError, match="needs a KVPackCache"):
        decode_logits(model, DynamicCache(config=model.config), torch.zeros(1, 2, dtype=torch.long))


def test_a_model_outside_the_attention_interface_decodes_one_token_per_forward():
    """Falcon keeps its own attention (no AttentionInterface, so no per-query masks): the protocol falls back to its
    definition instead of failing in the model's SDPA; ``evaluate`` runs every protocol on it."""
    from transformers import FalconConfig, FalconForCausalLM

    from kvpack import evaluate

    torch.manual_seed(0)
    model = FalconForCausalLM(FalconConfig(vocab_size=96, num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                           new_decoder_architecture=True, num_kv_heads=2)).double().eval()  # fmt: skip
    ids = torch.randint(3, 96, (1, CTX + N), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        fast, slow, _ = both(model, POLICIES["residual 4 block 2"], ids)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-9)
    text = torch.randint(3, 96, (400,), generator=torch.Generator().manual_seed(2))
    for protocol in ("decode", "inforward", "snapshot"):
        result = evaluate((model, None), text=text, key="int:3", value="int:3", residual=4, sinks=1, ctx=64, n_eval=16,
                          windows=1, protocol=protocol, progress=False)  # fmt: skip
        assert result.kl > 0
