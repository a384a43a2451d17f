"""Text files as an editor shows them (text.py): UTF-8 or the line that is not, lines ended as editors end them,
the characters that do not show, and a name stored in another Unicode form."""

import unicodedata

import pytest

from cogvideox_lora import text


def test_lines_and_what_does_not_show():
    assert text.lines("a\r\nb\rc\u2028d\n") == ["a", "b", "c\u2028d", ""]
    assert text.invisible("a\u200bb\tc\u200dd") == ["U+200B ZERO WIDTH SPACE at column 2"]


def test_a_bom_is_dropped_and_a_line_not_utf8_is_named(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffa bear\n".encode())
    assert text.read_text(path) == "a bear\n"
    path.write_bytes(b"a bear\nun ours \xe9\n")
    with pytest.raises(ValueError, match=r"prompts.txt:2: not UTF-8 text"):
        text.read_text(path)


def test_a_name_stored_decomposed_is_found(tmp_path):
    stored = tmp_path / unicodedata.normalize("NFD", "café.mp4")
    stored.touch()
    assert text.as_on_disk(tmp_path / unicodedata.normalize("NFC", "café.mp4")) == stored
    assert text.as_on_disk(tmp_path / "missing.mp4") == tmp_path / "missing.mp4"
