"""Shared fixtures: the real model (loaded once per session) and the WikiText-2 text the tests read."""

import os
from pathlib import Path

import pytest
import torch

# Triton kernels run through the interpreter without a GPU. The variable must be set before anything imports
# triton (its own library functions are decorated at import), so here, not in tests/kernels/conftest.py.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_WIKITEXT = REPO.parent / "shared" / "data" / "wikitext2-test.txt"


def _wikitext() -> Path:
    """$KVPACK_WIKITEXT, else ../shared/data/wikitext2-test.txt beside the repository, else the excerpt shipped in
    kvpack/evaluation/data (its first 60k and last 4k characters: the tests read only those, so they give the same
    numbers on either file)."""
    if os.environ.get("KVPACK_WIKITEXT"):
        return Path(os.environ["KVPACK_WIKITEXT"])
    if SHARED_WIKITEXT.is_file():
        return SHARED_WIKITEXT
    return REPO / "kvpack" / "evaluation" / "data" / "wikitext2-test-excerpt.txt"


WIKITEXT = _wikitext()


@pytest.fixture(scope="session")
def wikitext_path() -> Path:
    if not WIKITEXT.is_file():
        raise FileNotFoundError(f"WikiText-2 test text not found at {WIKITEXT} (KVPACK_WIKITEXT names a missing file?)")
    return WIKITEXT


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct in float32, eval mode; loaded once (~25 s)."""
    from kvpack.evaluation.models import load

    torch.manual_seed(0)
    return load("smollm2")


def _check_codec_contract(codec, x: torch.Tensor) -> None:
    """Packed shape/dtype and layout as declared, decode back to ``x``'s shape and dtype, finite, and each
    vector coded on its own (the flattened batch gives the same bytes)."""
    packed = codec.encode(x)
    assert packed.shape == x.shape and packed.dtype == x.dtype
    for key, (shape, kind) in codec.layout(tuple(x.shape)).items():
        assert packed.data[key].shape == shape and packed.data[key].dtype == kind
    y = codec.decode(packed)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    flat = codec.encode(x.reshape(-1, x.shape[-1]))
    assert all(torch.equal(flat.data[k].reshape(packed.data[k].shape), packed.data[k]) for k in packed.data)


@pytest.fixture(scope="session")
def check_codec_contract():
    """The per-vector codec contract as a function (session-scoped, so hypothesis tests can use it)."""
    return _check_codec_contract
