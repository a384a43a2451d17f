"""Metadata tables (tables.py): CSV with any of its separators, JSON arrays and JSON Lines, each record with its
line, and a row that cannot be read for sure refused with its line."""

from pathlib import Path

from cogvideox_lora import tables

COLUMNS = ("caption", "video")


def test_semicolons_and_json_lines_read_with_their_lines():
    records, problems = tables.read_records(Path("meta.csv"), "caption;video\n\na bear;videos/1.mp4\n", COLUMNS)
    assert problems == [] and records == [(3, {"caption": "a bear", "video": "videos/1.mp4"})]
    records, problems = tables.read_records(Path("meta.jsonl"), '{"caption": "a", "video": "v.mp4"}\n[1]\n',
                                            COLUMNS)
    assert records == [(1, {"caption": "a", "video": "v.mp4"})]
    assert len(problems) == 1 and problems[0].startswith("meta.jsonl:2: a JSON list, not an object")


def test_a_row_with_a_field_too_many_is_refused_with_its_line():
    records, problems = tables.read_records(Path("meta.csv"), "caption,video\na bear, walking,videos/1.mp4\n",
                                            COLUMNS)
    assert records == []
    assert len(problems) == 1 and problems[0].startswith("meta.csv:2: 3 fields where the header has 2")
