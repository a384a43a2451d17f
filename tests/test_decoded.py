"""The check's decoded frames kept for encoding (decoded.py): within a budget, only this process's clips, and
never frames of a file that changed since."""

import os
from pathlib import Path

import numpy as np
import pytest

from cogvideox_lora import clip_index, decoded
from cogvideox_lora.data import DatasetError, FrameSettings, check_clips
from cogvideox_lora.decoded import Decoded, DecodedFrames
from helpers import load_clips


def _decoded(path: Path, indices=(0, 1, 2)) -> Decoded:
    frames = [np.full((2, 2, 3), i, np.uint8) for i in indices]
    return Decoded(np.arange(10) / 8, 10 / 8, 1.0, list(indices), frames, clip_index.identity(os.stat(path)))


def test_the_budget_is_the_smaller_of_a_constant_and_a_share_of_what_is_available():
    assert 0 <= decoded.budget() <= decoded.MAX_BYTES
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    # MemAvailable moves between the two reads; a tenth of it within a few MB.
    assert abs(decoded.budget() - min(decoded.MAX_BYTES, available * decoded.SHARE_OF_AVAILABLE)) < 64 << 20


def test_frames_are_taken_once_and_only_as_a_prefix_of_those_decoded(tmp_path):
    path = tmp_path / "a.mp4"
    path.write_bytes(b"x")
    store = DecodedFrames(100)
    assert store.has_room(100) and not store.has_room(101)
    store.put(path, _decoded(path), 36)
    assert store.used == 36 and not store.has_room(65)
    kept = store.take(path)
    assert store.used == 0 and store.take(path) is None
    assert [f[0, 0, 0] for f in kept.frames_at([0, 1])] == [0, 1]
    assert kept.frames_at([0, 2]) is None  # not the frames decoded: encoding decodes again


def test_a_file_changed_since_it_was_decoded_is_not_taken(tmp_path):
    path = tmp_path / "a.mp4"
    path.write_bytes(b"x")
    store = DecodedFrames(100)
    store.put(path, _decoded(path), 36)
    path.write_bytes(b"changed")
    assert store.take(path) is None and store.used == 0


def test_each_process_keeps_only_the_clips_it_encodes(tiny_dataset_dir, monkeypatch):
    clips = load_clips(tiny_dataset_dir, "prompts.txt", "videos.txt")
    monkeypatch.setitem(os.environ, "RANK", "1")
    monkeypatch.setitem(os.environ, "WORLD_SIZE", "2")
    monkeypatch.setitem(os.environ, "LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(decoded, "budget", lambda: 1000)
    store = DecodedFrames.for_this_process()
    assert (store.process_index, store.processes, store.budget) == (1, 2, 500)  # the host's budget, shared
    store.budget = 1 << 30
    check_clips(clips, FrameSettings(48, 64, 8, 9, 0, 0, "center"), decoded=store)
    # latent_cache.fill gives a cold run's clip i to process i % 2
    assert sorted(store._kept) == [str(clips[1].video), str(clips[3].video)]
    store.keep_only([clips[3].video])
    assert list(store._kept) == [str(clips[3].video)] and store.used == 9 * 48 * 64 * 3


def test_a_clip_the_check_refuses_is_not_kept(tiny_dataset_dir):
    clips = load_clips(tiny_dataset_dir, "prompts.txt", "videos.txt")
    store = DecodedFrames(1 << 30)
    # 25 frames at 8 fps give 25: too few for --max_num_frames 49, so each clip is left out once decoded.
    with pytest.raises(DatasetError, match="No usable clip is left"):
        check_clips(clips, FrameSettings(48, 64, 8, 49, 0, 0, "center"), skip_bad=True, decoded=store)
    assert len(store) == 0 and store.used == 0 and store.peak > 0
