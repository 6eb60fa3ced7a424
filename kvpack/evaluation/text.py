"""Texts to evaluate on: a file path, ``"wikitext2"``, or the embedded default (works offline on a fresh install).

The default is the English prose of Python's own reference documentation, shipped with every
CPython as ``pydoc_data.topics`` (PSF license, nothing to download or embed): about 460k
characters, 100k+ tokens, enough for 8 windows of 1024 + 256 tokens. ``"wikitext2"`` is the
WikiText-2 raw test split (Merity et al., arXiv 1609.07843): read from the file named by the
``KVPACK_WIKITEXT`` environment variable when set, else fetched with ``datasets`` (network).
``"wikitext2-excerpt"`` is the 65k-character excerpt of that split shipped inside kvpack
(``kvpack/evaluation/data``, CC BY-SA 3.0, see the README there): what the tests read offline.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["DEFAULT_TEXT", "EXCERPT", "TEXT_SOURCES", "WIKITEXT_EXCERPT", "describe_text", "load_text", "text_label",
           "tokenize"]  # fmt: skip

DEFAULT_TEXT = "pydoc"  # name of the embedded default
EXCERPT = "wikitext2-excerpt"  # name of the shipped WikiText-2 excerpt
WIKITEXT_EXCERPT = Path(__file__).resolve().parent / "data" / "wikitext2-test-excerpt.txt"

# the named texts, as a user reads them in --help and in reports
TEXT_SOURCES = {
    DEFAULT_TEXT: "Python's reference documentation, built into CPython as pydoc_data; offline",
    "wikitext2": "WikiText-2 raw test split, Merity et al. 2016; from $KVPACK_WIKITEXT or a download",
    EXCERPT: "65k-character excerpt of the WikiText-2 test split shipped with kvpack; offline",
}
CHOICES = "omit it for the built-in default, 'wikitext2', 'wikitext2-excerpt' or a UTF-8 text file"


def load_text(source: str | Path | None = None) -> str:
    """The text for ``source``: ``None``/``"pydoc"`` (default), ``"wikitext2"``, ``"wikitext2-excerpt"`` or a path
    to a UTF-8 file."""
    if source is None or source == DEFAULT_TEXT:
        return _pydoc_text()
    if not isinstance(source, (str, Path)):
        raise TypeError(f"the text must be a name or a file path ({CHOICES}), got {type(source).__name__}")
    if source == "wikitext2":
        return _wikitext2()
    if source == EXCERPT:
        return WIKITEXT_EXCERPT.read_text(encoding="utf-8")
    path = Path(source).expanduser()
    if path.is_dir():
        raise FileNotFoundError(f"text {str(source)!r} is a directory, not a text file ({CHOICES})")
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path} ({CHOICES})")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"text file {path} is empty")
    return text


def text_label(source: str | Path | None) -> str:
    """A short name for reports: ``pydoc``, ``wikitext2``, ``wikitext2-excerpt`` or the file name."""
    if source is None or source in TEXT_SOURCES:
        return source or DEFAULT_TEXT
    return Path(source).name


def describe_text(label: str) -> str:
    """``label`` with what it is, for printed reports: ``"pydoc (Python's reference documentation, ...)"``."""
    return f"{label} ({TEXT_SOURCES[label]})" if label in TEXT_SOURCES else label


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
            "or set KVPACK_WIKITEXT to a local copy of the raw test split, or pass --text PATH "
            f"(--text {EXCERPT} is the excerpt shipped with kvpack)"
        ) from None
    split = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    return "".join(split["text"])
