"""Text files as their user sees them in an editor: lines, the characters that do not show, and file names
that look the same however the file system stores them."""

import unicodedata
from pathlib import Path

# Format characters that scripts and emoji need (joiners, direction marks): text holds them on purpose.
_WANTED_FORMAT = {"\u200c", "\u200d", "\u200e", "\u200f"}


def read_text(path: Path) -> str:
    """The UTF-8 text of a file (a BOM is dropped); raises ValueError naming the line that is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text ({e.reason}): save the file as UTF-8.") from None


def lines(text: str) -> list[str]:
    """The lines of text as an editor numbers them: ended by LF, CRLF or CR alone. str.splitlines also breaks at
    U+2028, U+0085, form feeds..., which editors show inside a line, so the line numbers would part."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def invisible(text: str) -> list[str]:
    """Each character of text that does not show where it is, as 'U+2028 LINE SEPARATOR at column 7': controls
    (a tab apart), line and paragraph separators, and format characters such as a BOM or a zero-width space."""
    if text.isprintable():  # none of those categories (nor a tab) is printable: most texts need no walk
        return []
    found = []
    for column, char in enumerate(text, start=1):
        category = unicodedata.category(char)
        if (category in ("Cc", "Zl", "Zp") and char != "\t") or (category == "Cf" and char not in _WANTED_FORMAT):
            name = unicodedata.name(char, "a control character")
            found.append(f"U+{ord(char):04X} {name} at column {column}")
    return found


def as_on_disk(path: Path) -> Path:
    """path, or the file that an `ls` shows under the same name where the file system stores the name in another
    Unicode normalization form (macOS writes names decomposed, NFD; editors type them composed, NFC)."""
    if path.exists():
        return path
    found = Path(path.anchor)
    for part in path.parts[len(found.parts):]:
        candidate = found / part
        if not candidate.exists():
            key = unicodedata.normalize("NFC", part)
            try:
                candidate = next((entry for entry in found.iterdir()
                                  if unicodedata.normalize("NFC", entry.name) == key), candidate)
            except OSError:  # not a folder, or one that cannot be listed: the path is reported as missing
                return path
        found = candidate
    return found if found.exists() else path
