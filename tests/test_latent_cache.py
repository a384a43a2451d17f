"""The latent cache (latent_cache.py): entries named by what decides them, read back exactly, and a damaged one
read as missing (encoded again) rather than trained on."""

import hashlib
import json
import multiprocessing
import os
import time
from argparse import Namespace
from dataclasses import replace

import pytest
import torch

from cogvideox_lora import latent_cache
from cogvideox_lora.data import FrameSettings
from cogvideox_lora.latent_cache import Entries, LatentCache, entry_keys, fill
from helpers import count_decodes


def test_entries_round_trip_and_a_damaged_one_reads_as_missing(tmp_path):
    [key] = entry_keys("video", [{"digest": "abc"}], height=48, width=64)
    assert [key] == entry_keys("video", [{"width": 64, "height": 48}], digest="abc")
    assert [key] != entry_keys("video", [{"digest": "abc"}], height=64, width=64)
    assert [key] != entry_keys("flipped", [{"digest": "abc"}], height=48, width=64)
    cache = LatentCache(tmp_path / "cache")
    assert cache.load(key) is None
    tensors = {"latent_params": torch.randn(8, 6, 3, 8).transpose(1, 2),  # not contiguous
               "prompt_embeds": torch.randn(16, 32).bfloat16()}
    cache.save(key, tensors)
    loaded = cache.load(key)
    assert loaded.keys() == tensors.keys()
    for name in tensors:
        assert torch.equal(loaded[name], tensors[name])
        assert loaded[name].dtype == tensors[name].dtype
    assert [p.name for p in cache.root.iterdir()] == [f"{key}.safetensors"]  # no temporary file left

    data = bytearray(cache.path(key).read_bytes())
    data[-3] ^= 0xFF  # one byte of a tensor
    cache.path(key).write_bytes(data)
    assert cache.load(key) is None
    cache.path(key).write_bytes(data[:20])  # truncated
    assert cache.load(key) is None


class Config:
    """A part of an encoder's identity that counts how often it is serialised (json.dumps(default=str) calls str)."""

    serialised = 0

    def __str__(self):
        Config.serialised += 1
        return "config"


def test_entry_keys_are_those_of_caches_written_before_and_serialise_what_is_shared_once():
    frames = FrameSettings(48, 64, 8, 9, 0, 0, "center")
    encoder = {"model": "m", "revision": None, "vae": {"block_out_channels": [8, 16], "scaling_factor": 1.15},
               "tiling": False, "name": "caf\u00e9 \"x\""}
    items = [{"clip": f"{i:064x}", "frames": replace(frames, height=48 + 16 * (i % 2))} for i in range(5)]
    written_before = [hashlib.sha256(json.dumps({"kind": "video", **item, "encoder": encoder, "flipped": True},
                                                sort_keys=True, default=str).encode()).hexdigest() for item in items]
    assert entry_keys("video", items, encoder=encoder, flipped=True) == written_before

    Config.serialised = 0
    entry_keys("video", items, encoder={"vae": Config()}, flipped=False)
    assert Config.serialised == 1  # not once a clip


def test_entry_shapes_are_read_once_a_frame_setting(tmp_path, monkeypatch):
    cache = LatentCache(tmp_path)
    sizes = [(48, 64), (64, 48), (48, 64), (48, 64), (64, 48)]
    for i, (h, w) in enumerate(sizes):
        cache.save(f"e{i}", {"latent_params": torch.zeros(4, 3, h // 8, w // 8)})
    read = []
    shapes = LatentCache.shapes
    monkeypatch.setattr(LatentCache, "shapes", lambda self, key: read.append(key) or shapes(self, key))
    settings = [FrameSettings(h, w, 8, 9, 0, 0, "center") for h, w in sizes]
    found = Entries(cache, [(f"e{i}",) for i in range(5)]).shapes_by(settings)
    assert found == [(4, 3, h // 8, w // 8) for h, w in sizes]
    assert read == ["e0", "e1"]


# ---------------------------------------------------------------------------------------------------------------
# Runs sharing a cache


def _fill_in_child(root, keys, log, start):
    def encode(indices):
        for i in indices:
            with open(log, "a") as f:
                f.write(keys[i] + "\n")
            time.sleep(0.01)
            yield i, {"latent_params": torch.full((2, 2), float(i))}

    start.wait()
    entries, _ = fill(LatentCache(root), keys, Namespace(num_processes=1, process_index=0), encode, "test")
    assert all(entries[i]["latent_params"][0, 0].item() == i for i in range(len(keys)))


def test_two_runs_sharing_a_cache_encode_each_entry_once(tmp_path, monkeypatch):
    monkeypatch.setattr(latent_cache, "CLAIM_BATCH", 8)  # several rounds of claims in each run
    keys = [f"entry{i:03d}" for i in range(60)]
    log = tmp_path / "encoded.txt"
    context = multiprocessing.get_context("fork")
    start = context.Event()
    runs = [context.Process(target=_fill_in_child, args=(tmp_path / "cache", keys, log, start)) for _ in range(2)]
    for run in runs:
        run.start()
    start.set()
    for run in runs:
        run.join(60)
    assert [run.exitcode for run in runs] == [0, 0]
    encoded = log.read_text().split()
    assert sorted(encoded) == keys  # each once, by one run or the other


def _hold_claim_then_die(root, key, held):
    LatentCache(root).claim(key, wait=False)
    held.set()
    time.sleep(1)
    os._exit(1)  # killed before writing the entry


def test_a_claim_left_by_a_dead_run_is_taken_over(tmp_path):
    context = multiprocessing.get_context("fork")
    held = context.Event()
    holder = context.Process(target=_hold_claim_then_die, args=(tmp_path, "a", held))
    holder.start()
    held.wait(10)
    encoded = []

    def encode(indices):
        encoded.extend(indices)
        return ((i, {"latent_params": torch.ones(2)}) for i in indices)

    entries, count = fill(LatentCache(tmp_path), ["a", "b"], Namespace(num_processes=1, process_index=0), encode,
                           "test")
    holder.join()
    assert encoded == [1, 0] and count == 2  # "b" at once, "a" once its holder was gone
    assert torch.equal(entries[0]["latent_params"], torch.ones(2))


def test_freshly_encoded_entries_are_read_back_as_a_warm_cache_reads_them(tmp_path):
    """A cold run trains on the host copies it wrote, not on the encoder's outputs (on a GPU, they would stay
    there through training), and neither run holds the tensors: each is read from disk when asked for."""
    import gc
    import weakref

    cache = LatentCache(tmp_path)
    accelerator = Namespace(num_processes=1, process_index=0)
    encoded = {i: {"latent_params": torch.randn(4, 3, 5).transpose(0, 2)} for i in range(2)}
    alive = [weakref.ref(encoded[i]["latent_params"]) for i in range(2)]
    cold, count = fill(cache, ["a", "b"], accelerator, lambda mine: ((i, encoded.pop(i)) for i in mine), "test")
    gc.collect()
    assert count == 2 and not any(ref() is not None for ref in alive)  # nothing of the encoder's output is kept
    warm, _ = fill(cache, ["a", "b"], accelerator, lambda mine: pytest.fail("nothing is left to encode"), "test")
    for i in range(2):
        fresh, loaded = cold[i]["latent_params"], warm[i]["latent_params"]
        assert fresh.is_contiguous() and fresh.device.type == "cpu"
        assert torch.equal(fresh, loaded) and fresh.stride() == loaded.stride()
        assert cold[i]["latent_params"] is not fresh  # read again, not held


# ---------------------------------------------------------------------------------------------------------------
# The check's decode reused for encoding (decoded.py)


def _checked_and_encoded(root, cache_dir, clips, check_settings, per_clip, budget_bytes, tiny_model_dir):
    """check_clips with a store of budget_bytes, then encode_videos with it; (latents by clip name, the store)."""
    from types import SimpleNamespace

    from diffusers import AutoencoderKLCogVideoX

    from cogvideox_lora.data import check_clips
    from cogvideox_lora.decoded import DecodedFrames

    store = DecodedFrames(budget_bytes)
    good, _ = check_clips(clips, check_settings, decoded=store)
    accelerator = SimpleNamespace(num_processes=1, process_index=0, is_local_main_process=False, device="cpu")
    entries, encoded, _ = latent_cache.encode_videos(
        accelerator, LatentCache(cache_dir), good, per_clip or [check_settings] * len(good), {"test": 1}, True, False,
        lambda: AutoencoderKLCogVideoX.from_pretrained(tiny_model_dir, subfolder="vae"), decoded=store)
    assert encoded == len(good) and len(store) == 0 and store.used == 0  # all taken, nothing left behind
    return {c.video.name: entries[i] for i, c in enumerate(good)}, store


@pytest.mark.parametrize("per_clip", [None, (5, 32, 48)], ids=["same-settings", "shorter-bucket-and-smaller"])
def test_a_cold_run_decodes_each_clip_once_and_encodes_the_same_latents(tmp_path, tiny_dataset_dir, tiny_model_dir,
                                                                        monkeypatch, per_clip):
    from helpers import load_clips

    clips = load_clips(tiny_dataset_dir, "prompts.txt", "videos.txt")
    check = FrameSettings(48, 64, 8, 9, 0, 0, "random")  # a random crop too: the crop seed is the clip's
    per_clip = None if per_clip is None else [replace(check, max_num_frames=per_clip[0], height=per_clip[1],
                                                      width=per_clip[2])] * len(clips)
    names = sorted(c.video.name for c in clips)
    passes = count_decodes(monkeypatch)
    reused, store = _checked_and_encoded(tiny_dataset_dir, tmp_path / "a", clips, check, per_clip, 1 << 30,
                                         tiny_model_dir)
    assert sorted(passes) == names and store.peak == len(clips) * 9 * 48 * 64 * 3  # once each: the check's
    passes.clear()
    again, _ = _checked_and_encoded(tiny_dataset_dir, tmp_path / "b", clips, check, per_clip, 0, tiny_model_dir)
    assert sorted(passes) == sorted(names * 2)  # budget 0: the check's and encoding's, as before
    for name in names:
        assert reused[name].keys() == again[name].keys()
        for tensor in reused[name]:
            assert torch.equal(reused[name][tensor], again[name][tensor]), (name, tensor)  # bit for bit


def test_the_budget_holds_and_clips_over_it_are_decoded_again(tmp_path, tiny_dataset_dir, tiny_model_dir,
                                                              monkeypatch):
    from helpers import load_clips

    from cogvideox_lora.decoded import DecodedFrames

    clips = load_clips(tiny_dataset_dir, "prompts.txt", "videos.txt")
    check = FrameSettings(48, 64, 8, 9, 0, 0, "center")
    clip_bytes = 9 * 48 * 64 * 3
    budget = 2 * clip_bytes + clip_bytes // 2  # two clips and a half
    used = []
    put = DecodedFrames.put
    monkeypatch.setattr(DecodedFrames, "put", lambda self, *a: put(self, *a) or used.append(self.used))
    passes = count_decodes(monkeypatch)
    _, store = _checked_and_encoded(tiny_dataset_dir, tmp_path / "cache", clips, check, None, budget, tiny_model_dir)
    assert used == [clip_bytes, 2 * clip_bytes] and store.peak <= budget
    # The first two were kept and decoded once; the two over the budget were decoded again.
    first, rest = sorted(c.video.name for c in clips[:2]), sorted(c.video.name for c in clips[2:])
    assert sorted(passes) == sorted(first + rest * 2)


def test_clips_already_cached_are_not_kept(tmp_path, tiny_dataset_dir, tiny_model_dir, monkeypatch):
    """A warm clip costs no memory: the clip index knows it, so the check does not decode it; and where the check
    decoded it anyway (the index lost), its frames are dropped before the VAE is loaded, which nothing needs."""
    from helpers import load_clips

    from cogvideox_lora import clip_index
    from cogvideox_lora.data import check_clips
    from cogvideox_lora.decoded import DecodedFrames

    clips = load_clips(tiny_dataset_dir, "prompts.txt", "videos.txt")
    check = FrameSettings(48, 64, 8, 9, 0, 0, "center")
    index = clip_index.ClipIndex(tmp_path / "cache")
    check_clips(clips, check, index=index)
    _checked_and_encoded(tiny_dataset_dir, tmp_path / "cache", clips, check, None, 1 << 30, tiny_model_dir)

    warm = DecodedFrames(1 << 30)
    good, _ = check_clips(clips, check, index=index, decoded=warm)
    assert warm.peak == 0 and len(warm) == 0

    lost_index = DecodedFrames(1 << 30)
    good, _ = check_clips(clips, check, decoded=lost_index)
    assert len(lost_index) == len(clips)
    accelerator = Namespace(num_processes=1, process_index=0, is_local_main_process=False, device="cpu")
    _, encoded, _ = latent_cache.encode_videos(
        accelerator, LatentCache(tmp_path / "cache"), good, [check] * len(good), {"test": 1}, True, False,
        lambda: pytest.fail("nothing is left to encode"), decoded=lost_index)
    assert encoded == 0 and len(lost_index) == 0 and lost_index.used == 0
