"""The clip index (clip_index.py): what was checked and hashed of each clip, kept between runs; a damaged index
costs a cold check, never a wrong one."""

import os

from cogvideox_lora import clip_index, data
from cogvideox_lora.data import FrameSettings, check_clips
from helpers import load_clips


SETTINGS = FrameSettings(48, 64, 8, 9, 0, 0, "center")


def checked_cold(folder, dataset_dir):
    """The dataset's clips and a cold check of them, its clip index saved in folder."""
    clips = load_clips(dataset_dir, "prompts.txt", "videos.txt")
    index = clip_index.ClipIndex(folder)
    checked, _ = check_clips(clips, SETTINGS, index=index)
    index.save()
    return clips, checked


def test_a_damaged_clip_index_only_costs_a_cold_check(tmp_path, tiny_dataset_dir, caplog):
    clips, good = checked_cold(tmp_path, tiny_dataset_dir)
    (tmp_path / clip_index.FILE_NAME).write_text("{not json")
    again, _ = check_clips(clips, SETTINGS, index=clip_index.ClipIndex(tmp_path))
    assert [c.probe for c in again] == [c.probe for c in good]
    assert "is unreadable" in caplog.text


def test_a_warm_check_stats_each_clip_once_and_neither_decodes_nor_hashes(tmp_path, tiny_dataset_dir, monkeypatch):
    clips, cold = checked_cold(tmp_path, tiny_dataset_dir)
    stats, probes, hashes = [], [], []
    stat = os.stat
    monkeypatch.setattr(os, "stat", lambda path, *a, **k: stats.append(str(path)) or stat(path, *a, **k))
    monkeypatch.setattr(data, "probe_clip", lambda *a: probes.append(a))
    monkeypatch.setattr(clip_index, "file_digest", lambda path: hashes.append(path))
    warm, _ = check_clips(clips, SETTINGS, index=clip_index.ClipIndex(tmp_path))
    assert [c.probe for c in warm] == [c.probe for c in cold]
    assert sorted(stats) == sorted(str(c.video) for c in clips)  # one stat a clip: not is_dir, is_file and stat
    assert probes == [] and hashes == []
