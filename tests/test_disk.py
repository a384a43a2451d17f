"""Writing whole or not at all (disk.py): a failed write leaves nothing under the file's name nor a temporary one,
and a full disk is one DiskFull naming the folder."""

import errno

import pytest

from cogvideox_lora import disk


def test_a_full_disk_leaves_nothing_and_names_the_folder(tmp_path):
    target = tmp_path / "summary.json"

    def half_written(tmp):
        with open(tmp, "w") as f:
            f.write("{")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(disk.DiskFull) as raised:
        disk.replace_atomically(target, half_written, "the summary")
    assert str(raised.value).startswith(f"no space left in {tmp_path} while writing the summary (")
    assert list(tmp_path.iterdir()) == []


def test_a_write_lands_whole_under_its_name(tmp_path):
    assert disk.write_text(tmp_path / "a.txt", "done").read_text() == "done"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    assert disk.size(4096) == "4.1 KB" and disk.size(1) == "1 bytes"
