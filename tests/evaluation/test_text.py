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
    with pytest.raises(TypeError, match="the text must be a name or a file path"):
        text.load_text(3)
    with pytest.raises(FileNotFoundError, match="is a directory"):
        text.load_text(tmp_path)


def test_errors_name_the_choices_not_python(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        text.load_text(tmp_path / "absent.txt")
    assert "wikitext2-excerpt" in str(info.value) and "text=None" not in str(info.value)


def test_shipped_excerpt_is_the_head_and_tail_of_the_split_with_its_licence():
    excerpt = text.load_text(text.EXCERPT)
    assert excerpt.lstrip().startswith("= Robert Boulter =") and len(excerpt) == 64_657
    assert "\r" not in excerpt
    assert (text.WIKITEXT_EXCERPT.parent / "LICENSE").read_text().count("CC BY-SA 3.0") >= 1
    assert text.text_label(text.EXCERPT) == text.EXCERPT
    assert "shipped with kvpack" in text.describe_text(text.EXCERPT)
    assert "Python's reference documentation" in text.describe_text("pydoc")


def test_shipped_excerpt_matches_the_full_split_where_the_tests_read_it(wikitext_path):
    """When the full split is at hand (KVPACK_WIKITEXT or ../shared), the excerpt is exactly its first 60,754 and
    last 3,903 characters."""
    full = wikitext_path.read_text(encoding="utf-8")
    if len(full) == 64_657:
        pytest.skip("only the excerpt is available")
    excerpt = text.load_text(text.EXCERPT)
    assert excerpt == full[:60_754] + full[-3_903:]
