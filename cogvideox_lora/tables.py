"""Metadata tables (--dataset_file) in the shapes spreadsheets and tools write them: CSV with a comma, semicolon
(European exports), tab or bar between fields; a JSON array of objects; JSON Lines. Each record comes with the
line it is on; a row that cannot be read for sure is refused with its line and the fix, never cut."""

import csv
import io
import json
import re
from pathlib import Path

from .text import lines

SEPARATORS = ",;\t|"


def read_records(path: Path, text: str, columns: tuple[str, ...]) -> tuple[list[tuple[int, dict]], list[str]]:
    """([(line, record)], problems) of a table that must have `columns`: JSON if the file is named .json or
    .jsonl (an array if it starts with '[', else one object a line), CSV otherwise."""
    if path.suffix.lower() in (".json", ".jsonl"):
        return _json_array(path, text) if text.lstrip().startswith("[") else _json_lines(path, text)
    return _csv(path, text, columns)


def _not_an_object(path: Path, line: int, value) -> str:
    return (f"{path}:{line}: a JSON {type(value).__name__}, not an object: each record must be an object "
            f'such as {{"caption": "...", "video": "videos/1.mp4"}}.')


def _json_array(path: Path, text: str) -> tuple[list[tuple[int, dict]], list[str]]:
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        return [], [f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno}): fix it there, or write one "
                    f"object a line (JSON Lines)."]
    # The array is valid: walk its elements to learn the line each starts on.
    decoder, records, problems = json.JSONDecoder(), [], []
    gap = re.compile(r"[\s,]*")
    i = gap.match(text, text.index("[") + 1).end()
    while text[i] != "]":
        value, end = decoder.raw_decode(text, i)
        line = text.count("\n", 0, i) + 1
        if isinstance(value, dict):
            records.append((line, value))
        else:
            problems.append(_not_an_object(path, line, value))
        i = gap.match(text, end).end()
    return records, problems


def _json_lines(path: Path, text: str) -> tuple[list[tuple[int, dict]], list[str]]:
    records, problems = [], []
    for n, line in enumerate(lines(text), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{path}:{n}: not valid JSON ({e.msg}): each line must be one JSON object "
                            f"(JSON Lines), or the whole file one array of objects.")
            continue
        if isinstance(value, dict):
            records.append((n, value))
        else:
            problems.append(_not_an_object(path, n, value))
    return records, problems


def _separator(text: str, header: str, columns: tuple[str, ...]) -> str:
    """The field separator: csv.Sniffer's guess, unless only another one splits the header into the columns
    the run needs (a caption's commas can outnumber a semicolon file's semicolons)."""
    try:
        sniffed = csv.Sniffer().sniff(text[:65536], delimiters=SEPARATORS).delimiter
    except csv.Error:
        sniffed = ","

    def names(separator):
        return {name.strip() for name in next(csv.reader([header], delimiter=separator), [])}

    return next((s for s in (sniffed, *SEPARATORS) if set(columns) <= names(s)), sniffed)


def _csv(path: Path, text: str, columns: tuple[str, ...]) -> tuple[list[tuple[int, dict]], list[str]]:
    header = next((line for line in lines(text) if line.strip()), "")
    separator = _separator(text, header, columns)
    # newline="" keeps a quoted caption's line break in the caption, and a U+2028 within its line.
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=separator, skipinitialspace=True)
    fields = [name.strip() for name in reader.fieldnames or []]
    reader.fieldnames = fields
    missing = [c for c in columns if c not in fields]
    shown = {",": "commas", ";": "semicolons", "\t": "tabs", "|": "bars"}[separator]
    if missing:
        return [], [f"{path}:1: no column {', '.join(missing)} in the header ({', '.join(fields)}, read as separated "
                    f"by {shown}). Name the columns with --caption_column, --video_column and --image_column."]
    records, problems = [], []
    for row in reader:
        # line_num counts the lines read so far, blank ones included: the line of the row just read.
        count = len(fields) + len(row.get(None, ())) - sum(v is None for v in row.values())
        if count != len(fields):
            problems.append(
                f"{path}:{reader.line_num}: {count} fields where the header has {len(fields)} (separated by "
                f"{shown}): a caption holding {separator!r} or a line break must be in double quotes "
                f'("a bear, walking"), as spreadsheets save it; or save the table with another separator.')
            continue
        records.append((reader.line_num, row))
    return records, problems
