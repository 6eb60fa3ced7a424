"""The README's Quick start: its code path compresses (a tiny random Llama), and the README's block itself runs
(the real model) and prints fewer than 16 bits per value."""

import re
from pathlib import Path

import pytest
import torch

import kvpack

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start_block() -> str:
    """The first ```python block of the README's Quick start section."""
    section = README.read_text().split("## Quick start", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_quick_start_code_path_packs_the_cache_on_a_tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    cache = kvpack.KVPackCache(config=model.config, key="int:4:axis=channel", value="int:4", residual=32, sinks=4)
    ids = torch.randint(0, 128, (1, 58))  # the Quick start's prompt is 58 SmolLM2 tokens; 100 new tokens, not 200
    out = model.generate(ids, cache=cache, max_new_tokens=100, min_new_tokens=100, do_sample=False)
    assert out.shape[1] == 158 and cache.get_seq_length() == 157  # the last token is not fed back
    # 4 sinks + the newest tokens (32 to 63: blocks of 32 leave the window whole) in 16 bits, the rest packed
    packed = (157 - 4 - 32) // 32 * 32
    k_bits, v_bits = (kvpack.get_codec(s, head_dim=16).bits_per_value() for s in ("int:4:axis=channel", "int:4"))
    expected = ((157 - packed) * 16 * 2 + packed * (k_bits + v_bits)) / (2 * 157)
    assert cache.bits_per_value() == pytest.approx(expected)
    fp16_bytes = 157 * 2 * 2 * 16 * 2 * 2  # tokens x layers x KV heads x head_dim x (K, V) x 2 bytes
    assert cache.bits_per_value() < 16 and cache.nbytes() < fp16_bytes / 1.5


@pytest.mark.model
def test_the_readme_quick_start_runs_and_compresses(smollm2, monkeypatch, capsys):
    from kvpack.evaluation import models

    monkeypatch.setattr(models, "load", lambda name: smollm2)  # the session's model: no second 25 s load
    exec(compile(quick_start_block(), str(README), "exec"), {})  # noqa: S102 (the README code, as a user runs it)
    printed = capsys.readouterr().out
    match = re.search(r"(\d+) tokens: (\d+) KiB held, ([\d.]+) bits per value, ([\d.]+)x smaller than fp16", printed)
    assert match, printed
    tokens, bits, smaller = int(match[1]), float(match[3]), float(match[4])
    assert tokens > 200 and bits < 8 and smaller > 2
