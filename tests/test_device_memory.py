"""The card's figures (NVML): nothing without a GPU or NVML; with a stand-in NVML, this process's share of the card
and its peak; and the trainer's summary carries them."""

import os
import threading
from types import SimpleNamespace

import pytest
import torch

from cogvideox_lora import device_memory, memory
from helpers import run_main, summary, train_argv

GIB = memory.GIB


@pytest.fixture
def fresh_nvml(monkeypatch):
    """device_memory as at the start of a process: NVML not tried yet, nothing noted of the other processes."""
    monkeypatch.setattr(device_memory, "_state", {"started": None, "others": {}})


def test_without_a_gpu_everything_is_unknown(fresh_nvml):
    assert device_memory.process_used_gib("cpu") is None
    assert device_memory.overhead_gib("cpu") is None
    assert device_memory.available_gib("cpu") is None
    device_memory.note_others()  # harmless
    sampler = device_memory.Sampler("cpu").start()
    assert sampler._thread is None and sampler.take() is None
    assert device_memory.budget(None, "cpu") is None
    assert device_memory.budget(8.0, "cpu") == memory.Budget(8.0, memory.CONTEXT_AND_KERNELS_GIB, capped=True)


def test_without_nvml_the_gpus_free_memory_is_the_limit(fresh_nvml, monkeypatch):
    monkeypatch.setattr(device_memory, "pynvml", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(7.5 * GIB), 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    assert device_memory.process_used_gib("cuda:0") is None and device_memory.overhead_gib("cuda:0") is None
    assert device_memory.available_gib("cuda:0") == 7.5
    assert device_memory.budget(None, "cuda:0") == memory.Budget(7.5, memory.CONTEXT_AND_KERNELS_GIB, capped=False)
    assert device_memory.budget(8.0, "cuda:0").limit_gib == 7.5  # the card asked for, but what is free
    assert device_memory.budget(4.0, "cuda:0").limit_gib == 4.0


class FakeNVML:
    """One GPU holding `others` bytes of other processes and, once this process has a context, `mine`."""

    def __init__(self, others: int, listed: bool):
        self.others, self.mine, self.listed = others, 0, listed

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, index):
        return "gpu0"

    def nvmlDeviceGetHandleByUUID(self, uuid):
        assert uuid == "GPU-1234"
        return "gpu0"

    def nvmlDeviceGetUUID(self, handle):
        return b"GPU-1234"

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=self.others + self.mine)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [SimpleNamespace(pid=os.getpid(), usedGpuMemory=self.mine)] if self.listed else []


@pytest.fixture
def fake_gpu(fresh_nvml, monkeypatch):
    def install(listed: bool):
        nvml = FakeNVML(others=int(20 * GIB), listed=listed)
        monkeypatch.setattr(device_memory, "pynvml", nvml)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(uuid="1234"))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2 * GIB)
        monkeypatch.setattr(torch.cuda, "mem_get_info",
                            lambda device=None: (int(80 * GIB) - nvml.others - nvml.mine, 80 * GIB))
        return nvml
    return install


@pytest.mark.parametrize("listed", [True, False], ids=["its-own-figure", "the-cards-less-the-others"])
def test_this_process_share_of_the_card(fake_gpu, listed):
    # Listed: NVML names this process. Not listed (a container's process ids): the card's figure less what the
    # others held before this process made its context.
    nvml = fake_gpu(listed)
    device_memory.note_others()
    nvml.mine = int(2.75 * GIB)  # the context and kernels (0.75) and the allocator's reservations (2)
    assert device_memory.process_used_gib("cuda:0") == pytest.approx(2.75)
    assert device_memory.overhead_gib("cuda:0") == pytest.approx(0.75)
    assert device_memory.available_gib("cuda:0") == pytest.approx(60.0)  # free, and what this process holds
    capped = device_memory.budget(8.0, "cuda:0")
    assert capped.limit_gib == 8.0 and capped.capped
    assert capped.overhead_gib == pytest.approx(memory.assumed_overhead(0.75))


def test_the_sampler_keeps_the_peak_between_reads(fake_gpu):
    nvml = fake_gpu(listed=True)
    nvml.mine = 1 * GIB
    sampler = device_memory.Sampler("cuda:0").start()
    try:
        assert sampler._thread is not None and sampler._thread.daemon
        assert sampler.take() == pytest.approx(1.0)
        nvml.mine = 6 * GIB  # a peak that is gone before the next read: the thread must catch it
        seen = threading.Event()
        while not seen.wait(device_memory.SAMPLE_SECONDS):
            if sampler.peak is not None and sampler.peak >= 6.0:
                seen.set()
        nvml.mine = 3 * GIB
        assert sampler.take() == pytest.approx(6.0)
        assert sampler.take() == pytest.approx(3.0)  # a new start after each read
    finally:
        sampler.stop()


def test_the_summary_carries_the_cards_and_the_hosts_figures(tmp_path, tiny_model_dir, tiny_dataset_dir):
    out = tmp_path / "out"
    run_main(train_argv(tiny_model_dir, tiny_dataset_dir, out, tmp_path / "cache", "--max_train_steps", 1,
                        "--gradient_checkpointing", "--offload", "activations", "--blocks_to_swap", 1))
    info = summary(out)
    for key in ("peak_device_memory_gib", "peak_device_memory_validation_gib", "device_overhead_gib",
                "gpu_memory_limit_gib"):
        assert key in info and info[key] is None, key  # no GPU here
    assert info["estimated_peak_gib"] == pytest.approx(
        info["estimated_allocator_gib"] + memory.CONTEXT_AND_KERNELS_GIB + memory.ALLOCATOR_SLACK_GIB)
    assert info["host_pinned_gib"] > 0  # the swapped block's weights and the activations' buffers
    assert info["peak_host_rss_gib"] > 0 and info["estimated_host_gib"] > 0
    assert info["peak_host_memory_gib"] == pytest.approx(info["peak_host_rss_gib"] + info["host_pinned_gib"])
    # Each part's resident peak (VmHWM, started again at each part): none above the whole run's, the run's among them.
    by_part = info["peak_host_rss_gib_by_part"]
    assert set(by_part) >= {"starting", "encoding", "loading", "training", "validation"}
    assert all(0 < by_part[p] for p in ("starting", "encoding", "loading", "training"))
    assert max(v for v in by_part.values() if v) == info["peak_host_rss_gib"]


def test_the_placement_holds_the_allocator_tighter_when_the_first_step_finds_more_overhead(fake_gpu, monkeypatch):
    from cogvideox_lora import placement

    nvml = fake_gpu(listed=True)
    work = memory.Workload({"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8, "time_embed_dim": 8,
                            "text_embed_dim": 8, "patch_size": 2, "patch_size_t": None, "in_channels": 4,
                            "out_channels": 4, "max_text_seq_length": 4}, (3, 6, 8), 1, 4, False, 2, 8,
                           overhead_gib=memory.CONTEXT_AND_KERNELS_GIB + memory.ALLOCATOR_SLACK_GIB)
    plan = memory.Plan("full")
    budget = memory.Budget(memory.estimate(work, plan).total_gib + 0.3, memory.CONTEXT_AND_KERNELS_GIB, capped=True)
    held = []
    monkeypatch.setattr(placement, "hold_to", lambda gib, device: held.append(gib))
    place = placement.Placement(plan, "cuda:0", budget=budget, work=work, asked=memory.Plan())
    nvml.mine = int((2 + memory.CONTEXT_AND_KERNELS_GIB + 0.1) * GIB)  # 2 GiB reserved, 0.1 GiB more overhead
    checked = place.recheck()
    assert not checked.stop and "still fits" in checked.message
    assert held == [pytest.approx(budget.limit_gib - memory.CONTEXT_AND_KERNELS_GIB - 0.1)]
    assert place.budget.overhead_gib == pytest.approx(memory.CONTEXT_AND_KERNELS_GIB + 0.1)
