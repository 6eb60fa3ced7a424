"""Fixtures of the evaluation tests: a character tokenizer that the tiny random models (vocab 128) read."""

import pytest


class CharTokenizer:
    """One token per ASCII character (ids 1..127; others become '?'), id 0 the pad; no chat template."""

    chat_template = None
    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False, verbose: bool = False) -> dict:
        return {"input_ids": [ord(c) if 0 < ord(c) < 128 else ord("?") for c in text]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(int(i)) for i in ids if int(i) != 0)


@pytest.fixture
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer()
