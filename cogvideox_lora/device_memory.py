"""GPU memory as the card counts it (NVML, what nvidia-smi shows), beside what PyTorch's allocator counts.

A process holds more of the card than its allocator reserves: the CUDA context and the kernels that cuDNN, cuBLAS,
Triton and FlashAttention load (757–762 MiB on an H100, issue 27). NVML reads the card; this module is the one
place that does, and every function of it gives None (or does nothing) without a GPU or without NVML
(`pip install nvidia-ml-py`).

NVML keeps no peak, so Sampler reads the process's figure every 50 ms in a daemon thread while a run goes on.
"""

import os
import threading

import torch

from .memory import CONTEXT_AND_KERNELS_GIB, GIB, Budget, assumed_overhead

SAMPLE_SECONDS = 0.05

try:
    import pynvml
except ImportError:  # no NVML bindings: the card's figures are unknown, PyTorch's stay
    pynvml = None

_state = {"started": None, "others": {}}  # None: not tried yet; the device used by others before our context


def _nvml() -> bool:
    if _state["started"] is None:
        try:
            pynvml.nvmlInit()
            _state["started"] = True
        except Exception:  # no bindings (AttributeError on None), no driver, no GPU
            _state["started"] = False
    return _state["started"]


def note_others() -> None:
    """Reads what every GPU holds before this process makes its CUDA context: the others' share, for
    process_used_gib where NVML cannot tell this process's own (a container's process ids)."""
    if not _nvml():
        return
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        _state["others"][_uuid(handle)] = pynvml.nvmlDeviceGetMemoryInfo(handle).used


def _uuid(handle) -> str:
    uuid = pynvml.nvmlDeviceGetUUID(handle)
    return uuid.decode() if isinstance(uuid, bytes) else uuid


def _handle(device):
    """The NVML handle of a CUDA device (found by its UUID, whatever CUDA_VISIBLE_DEVICES says), or None."""
    if not torch.cuda.is_available() or not _nvml():
        return None
    device = torch.device(device)
    if device.type != "cuda":
        return None
    index = torch.cuda.current_device() if device.index is None else device.index
    try:
        return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{torch.cuda.get_device_properties(index).uuid}")
    except Exception:
        return None


def process_used_gib(device) -> float | None:
    """What this process holds of the card, as nvidia-smi counts it; None without a GPU or NVML."""
    handle = _handle(device)
    if handle is None:
        return None
    try:
        for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if process.pid == os.getpid() and process.usedGpuMemory is not None:
                return process.usedGpuMemory / GIB
        # Not listed (a container's process ids): the card's figure less what the others held before this process.
        others = _state["others"].get(_uuid(handle))
        return None if others is None else (pynvml.nvmlDeviceGetMemoryInfo(handle).used - others) / GIB
    except Exception:  # pynvml.NVMLError: a query this driver or GPU does not support
        return None


def overhead_gib(device) -> float | None:
    """What this process holds of the card beyond its allocator's reservations: the CUDA context and the kernels
    loaded so far. None without a GPU or NVML."""
    used = process_used_gib(device)
    return None if used is None else used - torch.cuda.memory_reserved(device) / GIB


def available_gib(device) -> float | None:
    """What this process may take of the card: what is free now and what it already holds (its context). None
    without a GPU; with a GPU but no NVML, what is free."""
    if not torch.cuda.is_available() or torch.device(device).type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free / GIB + (process_used_gib(device) or 0.0)


class Sampler:
    """The peak of process_used_gib between reads, sampled every 50 ms in a daemon thread; a no-op (take() gives
    None) without a GPU or NVML."""

    def __init__(self, device):
        self.device = device
        self.peak: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    def start(self) -> "Sampler":
        if self._thread is None and process_used_gib(self.device) is not None:
            self._thread = threading.Thread(target=self._sample, name="device-memory", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self._note(process_used_gib(self.device))

    def _note(self, used: float | None) -> None:
        if used is not None:
            with self._lock:
                self.peak = used if self.peak is None else max(self.peak, used)

    def take(self) -> float | None:
        """The peak since the last take (a reading now included), and a new start; None without NVML."""
        if self._thread is None:
            return None
        self._note(process_used_gib(self.device))
        with self._lock:
            peak, self.peak = self.peak, None
        return peak


def budget(max_gpu_memory: float | None, device):
    """The memory.Budget of a run on `device`: --max_gpu_memory (the card's size, as nvidia-smi counts it) or what
    the GPU has free now, whichever is less, and the context and kernels to plan for beside the allocator
    (memory.assumed_overhead of what is measured now). Without a GPU: the card asked for, or None."""
    available = available_gib(device)  # first: it makes the CUDA context, which the overhead then counts
    if available is None:
        return None if max_gpu_memory is None else Budget(max_gpu_memory, CONTEXT_AND_KERNELS_GIB, capped=True)
    limit = available if max_gpu_memory is None else min(max_gpu_memory, available)
    return Budget(limit, assumed_overhead(overhead_gib(device)), capped=max_gpu_memory is not None)
