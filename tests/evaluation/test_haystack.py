"""kvpack.evaluation.haystack: filler, sentence starts, and answers decoded as generation decodes them."""

import math

import pytest
import torch
from tiny_models import tiny_model

from kvpack.evaluation.haystack import (
    REFERENCE,
    Filler,
    answer_through,
    chat_frame,
    check_configs,
    check_lengths,
    haystack,
    load_filler,
    sentence_starts,
)
from kvpack.hf.cache import KVPackCache
from kvpack.policy import CachePolicy


def test_sentence_starts_follow_the_offset(char_tokenizer):
    filler = load_filler(char_tokenizer)
    assert filler.boundaries[0] == 0 and len(filler.boundaries) == 5
    for offset in (0, 3, 97, 250):
        hay = haystack(filler, 200, offset)
        assert hay == (filler.ids * 10)[offset : offset + 200]
        starts = sentence_starts(filler, 200, offset)
        assert starts[-1] == 200
        assert all(hay[s] == ord(" ") and hay[s + 1] in map(ord, "TH") for s in starts[:-1])
        expected = [
            i for i in range(200) if hay[i : i + 2] == [ord(" "), ord("T")] or hay[i : i + 4] == list(map(ord, " Her"))
        ]
        assert starts[:-1] == expected
    assert sentence_starts(Filler([1, 2, 3], []), 4) == [0, 1, 2, 3, 4]
    text = load_filler(char_tokenizer, "a  b\n c")
    assert text == Filler(char_tokenizer(" a b c")["input_ids"], [])


def test_chat_frame_without_a_template(char_tokenizer):
    head, tail = chat_frame(char_tokenizer, "Read this:\n", "\nWhat?", "It is")
    assert char_tokenizer.decode(head) == "Read this:\n" and char_tokenizer.decode(tail) == "\nWhat?\nIt is"


@pytest.mark.parametrize("policy", [None, CachePolicy("int:4", "int:4", residual=8, sinks=1, block=8)])
def test_answer_through_is_what_generate_after_a_prefill_through_the_cache_gives(char_tokenizer, policy):
    # the harness stores a clean prefill in the cache; a real user prefills through the cache and then generates
    model = tiny_model("llama")
    context = torch.randint(1, 128, (70,), generator=torch.Generator().manual_seed(0))
    question = torch.randint(1, 128, (9,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        (got,) = answer_through(model, char_tokenizer, {"c": policy}, context, question, 12).values()
        answer, bits = got.text, got.bits
        cache = KVPackCache(model.config, policy=policy) if policy else None
        if cache is not None:
            model(context[None], past_key_values=cache)
        full = torch.cat([context, question])[None]
        out = model.generate(full, attention_mask=torch.ones_like(full), past_key_values=cache, max_new_tokens=12,
                             do_sample=False, pad_token_id=0)  # fmt: skip
    assert answer == char_tokenizer.decode(out[0, full.shape[1] :])
    assert math.isnan(bits) if policy is None else 4 < bits < 16


def test_checks_name_what_is_wrong():
    with pytest.raises(TypeError, match="configs"):
        check_configs({"x": "int:4"})
    with pytest.raises(TypeError, match="configs"):
        check_configs({})
    check_configs({REFERENCE: None})
    with pytest.raises(ValueError, match="max_position_embeddings=2048"):
        check_lengths(tiny_model("llama"), [4096])


def test_answer_nll_is_the_teacher_forced_loss_of_the_expected_tokens(char_tokenizer):
    model = tiny_model("llama")
    context = torch.randint(1, 128, (40,), generator=torch.Generator().manual_seed(2))
    question = torch.randint(1, 128, (6,), generator=torch.Generator().manual_seed(3))
    expected = torch.randint(1, 128, (4,), generator=torch.Generator().manual_seed(4))
    lossy = CachePolicy("int:2", "int:2", residual=0, sinks=0, block=1)
    with torch.inference_mode():
        got = answer_through(model, char_tokenizer, {"ref": None, "int2": lossy}, context, question, 3, expected)
        full = torch.cat([context, question, expected])[None]
        logits = model(full).logits[0, -expected.numel() - 1 : -1].float()
    want = float(torch.nn.functional.cross_entropy(logits, expected))
    assert got["ref"].nll == pytest.approx(want, rel=1e-4)
    assert got["int2"].nll != pytest.approx(want, rel=1e-4)  # the lossy cache moves it
    assert math.isnan(answer_through(model, char_tokenizer, {"ref": None}, context, question, 3)["ref"].nll)
