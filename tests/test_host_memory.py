"""The host's memory (host_memory.py): what a plan holds in the host's RAM, the refusal of one the host cannot hold
with what would fit, and MemAvailable read from /proc/meminfo."""

import pytest

from cogvideox_lora import host_memory, memory


def test_host_memory_of_a_plan(val_2b):
    swap = memory.Plan("full", True, 10)
    needed = memory.estimate(val_2b, swap)
    host = host_memory.estimate(val_2b, swap, needed, text_encoder_gib=8.9)
    activations, swapped = (b / memory.GIB for b in memory.pinned_bytes(val_2b, swap))
    assert host.pinned_gib == pytest.approx(activations + swapped) and activations > 0 and swapped > 0
    assert host.encoding_gib == 8.9 and host.peak_gib == max(host.encoding_gib, host.loading_gib, host.training_gib)
    assert host.training_gib > host.pinned_gib  # the VAE and the optimizer's state wait there while validating
    assert host_memory.estimate(val_2b, swap, needed, 8.9, processes=2).peak_gib == pytest.approx(2 * host.peak_gib)
    assert host_memory.refusal(val_2b, swap, needed, 8.9, available=None) is None
    assert host_memory.refusal(val_2b, swap, needed, 8.9, available=host.peak_gib) is None


def test_a_plan_the_host_cannot_hold_is_refused_with_what_would_fit(val_2b):
    layers = val_2b.config["num_layers"]
    heavy = memory.Plan("full", True, layers)
    hosts = {p: host_memory.estimate(val_2b, p, memory.estimate(val_2b, p), 0.0)
             for p in memory.ladder(memory.Plan("full"), layers)}
    available = (hosts[heavy].peak_gib + hosts[memory.Plan("full", True, layers // 2)].peak_gib) / 2
    message = host_memory.refusal(val_2b, heavy, memory.estimate(val_2b, heavy), 0.0, available)
    assert "MemAvailable" in message and "would fit it" in message and "\n" not in message
    flags = message.split(": ")[-1].split(" would fit")[0]
    named = next(p for p in hosts if p.flags() == flags)
    assert hosts[named].peak_gib <= available < hosts[heavy].peak_gib
    assert all(hosts[p].peak_gib > available for p in hosts if p.blocks_to_swap > named.blocks_to_swap)
    # T5 on the CPU alone is more than the host has: the prompts must be encoded elsewhere.
    t5 = host_memory.refusal(val_2b, memory.Plan("full"), memory.estimate(val_2b, memory.Plan("full")), 50.0, 20.0)
    assert "T5 encodes the prompts on the CPU" in t5


def test_available_host_memory_reads_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16384000 kB\nMemAvailable:    2097152 kB\n")
    assert host_memory.available_gib(meminfo) == 2.0
    assert host_memory.available_gib(tmp_path / "none") is None
