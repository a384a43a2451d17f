"""The clip index (clip_index.py): what was checked and hashed of each clip, kept between runs; a damaged index
costs a cold check, never a wrong one."""

from cogvideox_lora import clip_index
from cogvideox_lora.data import FrameSettings, check_clips
from helpers import load_clips


def test_a_damaged_clip_index_only_costs_a_cold_check(tmp_path, tiny_dataset_dir, caplog):
    clips = load_clips(tiny_dataset_dir, "prompts.txt", "videos.txt")
    settings = FrameSettings(48, 64, 8, 9, 0, 0, "center")
    index = clip_index.ClipIndex(tmp_path)
    good, _ = check_clips(clips, settings, index=index)
    index.save()
    (tmp_path / clip_index.FILE_NAME).write_text("{not json")
    again, _ = check_clips(clips, settings, index=clip_index.ClipIndex(tmp_path))
    assert [c.probe for c in again] == [c.probe for c in good]
    assert "is unreadable" in caplog.text
