"""The latent cache (latent_cache.py): entries named by what decides them, read back exactly, and a damaged one
read as missing (encoded again) rather than trained on."""

import torch

from cogvideox_lora.latent_cache import LatentCache, entry_key


def test_entries_round_trip_and_a_damaged_one_reads_as_missing(tmp_path):
    key = entry_key("video", digest="abc", height=48, width=64)
    assert key == entry_key("video", width=64, height=48, digest="abc")
    assert key != entry_key("video", digest="abc", height=64, width=64)
    assert key != entry_key("flipped", digest="abc", height=48, width=64)
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
