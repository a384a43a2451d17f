"""The frames the dataset check decoded, kept in memory for encoding, so that a cold run decodes a clip once.

The check runs before any model loads (bad input is refused first), and encoding comes after the VAE loads: holding
every clip's frames in between would cost ~50 MB a clip at 49x480x720, so only what fits a budget is kept, and only
of the clips this process will encode. A clip not kept (over the budget, already in the latent cache, another
process's) is decoded again by encoding, as it was before this store existed.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import host_memory
from .clip_index import identity

# At most 2 GiB, and at most a tenth of the memory available when the run starts: enough for some 40 clips of
# 49x480x720 (or 200 of 17 frames), which is what the VAE takes first, while leaving the rest of the host's memory
# to the models that load next and to other runs on the machine. A constant, not a flag: the saving is a decode a
# clip (~70 ms at 17x480x720), not worth a setting of its own.
MAX_BYTES = 2 << 30
SHARE_OF_AVAILABLE = 0.10


def budget() -> int:
    """Bytes the store may hold: min(MAX_BYTES, SHARE_OF_AVAILABLE of MemAvailable); 0 (no reuse) where
    /proc/meminfo cannot say (not Linux)."""
    available = host_memory.available_gib()
    return 0 if available is None else min(MAX_BYTES, int(available * host_memory.GIB * SHARE_OF_AVAILABLE))


@dataclass
class Decoded:
    """What the check decoded of a clip: each frame's start (s) and the clip's end, from which encoding's settings
    give its frame indices; the frames decoded at `indices` ([H, W, 3] uint8, as Video.frames gives them); the
    pixel aspect that resizing applies; the file's identity when it was decoded."""

    starts: np.ndarray
    end: float
    pixel_aspect: float
    indices: list[int]
    frames: list[np.ndarray]
    identity: list[int]  # clip_index.identity's

    def frames_at(self, indices: list[int]) -> list[np.ndarray] | None:
        """The frames at indices, if they are the first of those decoded (a bucket's length takes a prefix of the
        longest one's frames, which the check decodes); None otherwise."""
        return self.frames[:len(indices)] if indices == self.indices[:len(indices)] else None


class DecodedFrames:
    """Decoded clips by path, holding at most budget_bytes (counted as frames x H x W x 3 of each clip, what its
    decode can hold at most); a clip is put whole or not at all. process_index/processes: a cold run's clip i goes
    to process i % processes for encoding (latent_cache.fill), so the check keeps only those of its own."""

    def __init__(self, budget_bytes: int, process_index: int = 0, processes: int = 1):
        self.budget, self.process_index, self.processes = budget_bytes, process_index, processes
        self.used = self.peak = 0
        self._kept: dict[str, tuple[Decoded, int]] = {}

    @classmethod
    def for_this_process(cls) -> "DecodedFrames":
        """The store of this process, its rank as `accelerate launch` (or torchrun) tells it before accelerate
        starts. The budget is the machine's, shared by the processes on it: eight ranks on one host hold what one
        would, not eight times that."""
        on_this_host = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        return cls(budget() // on_this_host, int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))

    def __len__(self):
        return len(self._kept)

    def wants(self, position: int) -> bool:
        """Whether the clip at this position of the checked clips is this process's to encode on a cold run."""
        return position % self.processes == self.process_index

    def has_room(self, nbytes: int) -> bool:
        return self.used + nbytes <= self.budget

    def put(self, path: Path, decoded: Decoded, nbytes: int) -> None:
        self.drop(path)
        self._kept[str(path)] = decoded, nbytes
        self.used += nbytes
        self.peak = max(self.peak, self.used)

    def drop(self, path: Path) -> None:
        _, nbytes = self._kept.pop(str(path), (None, 0))
        self.used -= nbytes

    def take(self, path: Path) -> Decoded | None:
        """The clip's frames, removed from the store; None if not kept, or if the file changed since it was decoded
        (encoding must encode what it hashes now)."""
        decoded, _ = self._kept.get(str(path), (None, 0))
        self.drop(path)
        if decoded is None:
            return None
        try:
            return decoded if identity(os.stat(path)) == decoded.identity else None
        except OSError:
            return None

    def keep_only(self, paths) -> None:
        """Drops every clip but those at paths: once the cache keys say what this process encodes, what others
        encode and what the cache already holds costs no memory."""
        wanted = {str(p) for p in paths}
        for name in [name for name in self._kept if name not in wanted]:
            self.drop(Path(name))

    def clear(self) -> None:
        self._kept.clear()
        self.used = 0
