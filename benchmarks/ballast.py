"""A smaller card on a big GPU: takes all of the GPU's memory but --leave_gib, and holds it until stopped.

    python benchmarks/ballast.py --leave_gib 7.5 --ready /tmp/ballast.ready &   # an 8 GB card's free memory
    ... run the trainer (it sees 7.5 GiB free, as nvidia-smi and torch.cuda.mem_get_info count it) ...
    kill %1

Unlike --max_gpu_memory (set_per_process_memory_fraction), which caps one process's allocator, the ballast leaves
the trainer only what such a card has free, so its CUDA context, kernels and allocator slack must fit too
(issue 27). benchmarks/card_rows.sh runs bench_train.py rows under it.
"""

import argparse
import signal
import sys
from pathlib import Path

import torch

GIB, MIB = 2**30, 2**20
CHUNK = 2 * MIB  # the allocator's granularity for large blocks


def fill(leave_gib: float, device) -> list[torch.Tensor]:
    """Tensors taking the GPU's free memory down to leave_gib (within a chunk)."""
    held = []
    while True:
        free, _ = torch.cuda.mem_get_info(device)
        extra = free - int(leave_gib * GIB)
        if extra < CHUNK:
            return held
        size = min(extra, GIB) // CHUNK * CHUNK
        held.append(torch.empty(size, dtype=torch.uint8, device=device))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--leave_gib", type=float, required=True, help="GiB of the GPU left free")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--ready", default=None, help="a file written once the GPU is filled: its free GiB")
    args = parser.parse_args()
    free, total = (b / GIB for b in torch.cuda.mem_get_info(args.device))
    if free < args.leave_gib:
        sys.exit(f"error: the GPU has {free:.2f} GiB free, less than the {args.leave_gib} to leave")
    held = fill(args.leave_gib, args.device)
    left = torch.cuda.mem_get_info(args.device)[0] / GIB
    line = f"{left:.3f}"
    print(f"ballast: {sum(t.numel() for t in held) / GIB:.2f} GiB held of {total:.2f}; {left:.3f} GiB left free",
          flush=True)
    if args.ready:
        Path(args.ready).write_text(line)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
