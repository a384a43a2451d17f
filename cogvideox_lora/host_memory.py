"""Host memory (RAM) of a run: what its plan needs beside the GPU, checked against what the machine has available
before any model loads, and the peak measured.

Offloading trades GPU memory for host memory: the checkpointed activations and swapped blocks wait in pinned
(page-locked) buffers that the kernel cannot swap out, T5-XXL (8.9 GiB) encodes on the CPU where it does not fit
the GPU, the transformer's weights pass through host memory as they load, and validation keeps the VAE, the
optimizer's state and (where the decode needs the room) the frozen weights on the host meanwhile.
"""

import resource
from dataclasses import dataclass
from pathlib import Path

from . import memory

GIB = memory.GIB
MEMINFO = Path("/proc/meminfo")


def _kib_field(path: Path, name: str) -> float | None:
    """A "Name:  N kB" line of a /proc file, in GiB; None where the file or the line is not there."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith(f"{name}:"):
                return int(line.split()[1]) * 1024 / GIB
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_gib(meminfo: Path | None = None) -> float | None:
    """MemAvailable of /proc/meminfo (what can be taken without swapping), None where there is none."""
    return _kib_field(meminfo or MEMINFO, "MemAvailable")


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (Linux counts ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


class ResidentPeak:
    """The peak resident memory of each part of a run (memory.Peaks): Linux keeps one high-water mark a process
    (VmHWM), which writing 5 to /proc/self/clear_refs starts again from the current resident size, so each take()
    says the peak since the last. Pinned buffers may not count in it (the driver maps them itself): the summary
    gives them apart."""

    def __init__(self, proc: Path = Path("/proc/self")):
        self.status, self.clear_refs = proc / "status", proc / "clear_refs"

    def take(self) -> float | None:
        """The peak since the last take (None where the kernel does not say), and a new one started."""
        peak = _kib_field(self.status, "VmHWM")
        try:
            self.clear_refs.write_text("5")
        except OSError:
            return None
        return peak


@dataclass(frozen=True)
class HostEstimate:
    """Host memory of each phase of a run, for all of this machine's processes: encoding (T5 on the CPU), loading
    (the transformer's weights and the swapped blocks' pinned copies), training with validation (the pinned
    buffers and what validation keeps on the host)."""

    encoding_gib: float
    loading_gib: float
    training_gib: float
    pinned_gib: float

    @property
    def peak_gib(self) -> float:
        return max(self.encoding_gib, self.loading_gib, self.training_gib)

    def __str__(self) -> str:
        return (f"about {self.peak_gib:.1f} GiB of host memory (T5 on the CPU {self.encoding_gib:.1f}, loading the "
                f"transformer {self.loading_gib:.1f}, training and validation {self.training_gib:.1f} of which "
                f"{self.pinned_gib:.1f} pinned)")


def estimate(work: memory.Workload, plan: memory.Plan, needed: memory.MemoryEstimate, text_encoder_gib: float,
             processes: int = 1) -> HostEstimate:
    """The host memory a plan needs; text_encoder_gib: T5's weights where it encodes on the CPU (else 0);
    processes: how many run on this machine, each with its own."""
    activations, swapped = (b / GIB for b in memory.pinned_bytes(work, plan))
    weights = memory.transformer_parameters(work.config) * work.weight_bytes / GIB
    validation = 0.0
    if work.validation_latent is not None:
        optimizer_states = needed.adapter_gib * work.optimizer_state_bytes / (4 + 4 + work.optimizer_state_bytes)
        validation = memory.VAE_WEIGHTS_GIB + optimizer_states + needed.weights_to_host_gib
    return HostEstimate(encoding_gib=processes * text_encoder_gib, loading_gib=processes * (weights + swapped),
                        training_gib=processes * (activations + swapped + validation),
                        pinned_gib=processes * (activations + swapped))


def refusal(work: memory.Workload, plan: memory.Plan, needed: memory.MemoryEstimate, text_encoder_gib: float,
            available: float | None, processes: int = 1) -> str | None:
    """Why the plan cannot run in `available` GiB of host memory, with what would fit; None if it fits (or nothing
    is known of the host)."""
    host = estimate(work, plan, needed, text_encoder_gib, processes)
    if available is None or host.peak_gib <= available:
        return None
    said = f"the run needs {host}, and this machine has {available:.1f} GiB available (MemAvailable, /proc/meminfo)"
    if host.encoding_gib > available:
        return (f"{said}: T5 encodes the prompts on the CPU where it does not fit the GPU; encode them once on a "
                f"machine with more memory (the cache, --latent_cache_dir, keeps them) or free host memory.")
    if host.loading_gib - processes * memory.pinned_bytes(work, plan)[1] / GIB > available:
        return f"{said}: free host memory, or run fewer processes on this machine."
    # The most offloading whose host memory fits: the least GPU memory this machine allows.
    for lighter in reversed(memory.ladder(memory.Plan(plan.checkpointing), work.config["num_layers"])):
        gpu = memory.estimate(work, lighter)
        fits = estimate(work, lighter, gpu, text_encoder_gib, processes)
        if fits.peak_gib <= available:
            return (f"{said}: {lighter.flags()} would fit it (about {fits.peak_gib:.1f} GiB of host memory and "
                    f"{gpu.total_gib:.1f} of GPU memory), or free host memory.")
    return f"{said}: free host memory."
