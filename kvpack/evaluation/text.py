"""Texts to evaluate on: a file path, ``"wikitext2"``, or the embedded default (works offline on a fresh install).

The default is the English prose of Python's own reference documentation, shipped with every
CPython as ``pydoc_data.topics`` (PSF license, nothing to download or embed): about 460k
characters, 100k+ tokens, enough for 8 windows of 1024 + 256 tokens. ``"wikitext2"`` is the
WikiText-2 raw test split (Merity et al., arXiv 1609.07843): read from the file named by the
``KVPACK_WIKITEXT`` environment variable when set, else fetched with ``datasets`` (network).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["DEFAULT_TEXT", "load_text", "text_label", "tokenize"]

DEFAULT_TEXT = "pydoc"  # name of the embedded default


def load_text(source: str | Path | None = None) -> str:
    """The text for ``source``: ``None``/``"pydoc"`` (default), ``"wikitext2"``, or a path to a UTF-8 file."""
    if source is None or source == DEFAULT_TEXT:
        return _pydoc_text()
    if not isinstance(source, (str, Path)):
        raise TypeError(f"text must be None, 'pydoc', 'wikitext2' or a file path, got {type(source).__name__}")
    if source == "wikitext2":
        return _wikitext2()
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path} (or use text=None for the default, 'wikitext2')")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"text file {path} is empty")
    return text


def text_label(source: str | Path | None) -> str:
    """A short name for reports: ``pydoc``, ``wikitext2`` or the file name."""
    if source is None or source in (DEFAULT_TEXT, "wikitext2"):
        return source or DEFAULT_TEXT
    return Path(source).name


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """1-D LongTensor of the token ids of ``text`` (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _pydoc_text() -> str:
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions split the stdlib docs out
        raise FileNotFoundError(
            "the default text needs Python's pydoc_data module (part of the standard library); "
            "pass a text file instead (--text PATH)"
        ) from exc
    # sorted: the same text, hence the same windows, on every run
    return "\n\n".join(topics[name].strip() for name in sorted(topics))


def _wikitext2() -> str:
    local = os.environ.get("KVPACK_WIKITEXT")
    if local and Path(local).is_file():
        return Path(local).read_text(encoding="utf-8")
    try:
        import datasets
    except ImportError:
        raise FileNotFoundError(
            "text 'wikitext2' needs the datasets package and network (pip install datasets), "
            "or set KVPACK_WIKITEXT to a local copy of the raw test split, or pass --text PATH"
        ) from None
    split = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    return "".join(split["text"])
