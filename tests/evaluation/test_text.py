"""kvpack.evaluation.text: the embedded default text, files, 'wikitext2', errors."""

import sys

import pytest

from kvpack.evaluation import text


def test_default_text_is_offline_and_stable():
    first = text.load_text(None)
    assert first == text.load_text("pydoc")
    assert len(first) > 300_000 and 'The "if" statement' in first
    assert text.text_label(None) == "pydoc"


def test_file_and_label(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("hello world\r\nsecond line\n", encoding="utf-8")
    assert text.load_text(path) == "hello world\nsecond line\n"
    assert text.text_label(str(path)) == "t.txt"


def test_wikitext2_reads_the_local_copy(monkeypatch, wikitext_path):
    monkeypatch.setenv("KVPACK_WIKITEXT", str(wikitext_path))
    assert text.load_text("wikitext2").lstrip().startswith("= Robert Boulter =")


def test_wikitext2_without_datasets_or_local_copy_says_what_to_do(monkeypatch):
    monkeypatch.delenv("KVPACK_WIKITEXT", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(FileNotFoundError, match="pip install datasets"):
        text.load_text("wikitext2")


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="text file not found"):
        text.load_text(tmp_path / "absent.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        text.load_text(empty)
    with pytest.raises(TypeError, match="text must be None"):
        text.load_text(3)
