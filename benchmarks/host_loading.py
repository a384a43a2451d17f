"""Host memory of loading the transformer, at real size, on any machine (issue 27: the host estimate is under the
measured peaks; is the loading part of it one copy of the weights, or more?).

    python benchmarks/host_loading.py --workdir /tmp/host_loading [--size 2b]

Builds the size's transformer (random init, real config, bf16) into WORKDIR/model-SIZE/transformer once, then loads it
in a fresh process with the trainer's own call (models.load_transformer) while a thread samples MemAvailable every
20 ms, then reads every weight once (as the move to the GPU does). Reports, in GiB: the weights; the process before
loading (Python, PyTorch, diffusers imported); its resident peak (VmHWM, host_memory.ResidentPeak) and its
file-backed part (the safetensors file mapped) after loading and after the read, and its anonymous part after; and
how far MemAvailable fell by then (what the machine gave up: page cache, which the mapped file is, does not count).
"""

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GIB = 2**30


def build(folder: Path, size: str) -> None:
    import torch
    from diffusers import CogVideoXTransformer3DModel

    from cogvideox_lora import synthetic

    if (folder / "transformer" / "config.json").exists():
        return
    torch.manual_seed(0)
    with synthetic._default_dtype(torch.bfloat16):
        model = CogVideoXTransformer3DModel(**synthetic.SPECS[size]["transformer"])
    model.save_pretrained(folder / "transformer")


def status_gib(name: str) -> float:
    from cogvideox_lora.host_memory import _kib_field

    return _kib_field(Path("/proc/self/status"), name)


def measure(folder: Path) -> dict:
    import torch

    from cogvideox_lora import host_memory, models
    from cogvideox_lora.settings import ModelSource

    peak = host_memory.ResidentPeak()
    before_rss, available_before = status_gib("VmRSS"), host_memory.available_gib()
    lowest, sampling = [available_before], True

    def sample():
        while sampling:
            lowest[0] = min(lowest[0], host_memory.available_gib())
            time.sleep(0.02)

    thread = threading.Thread(target=sample)
    peak.take()
    thread.start()
    start = time.perf_counter()
    model = models.load_transformer(ModelSource(str(folder)), torch.bfloat16)
    seconds = time.perf_counter() - start
    loaded = {"resident_peak_loading_gib": peak.take(), "resident_file_loaded_gib": status_gib("RssFile"),
              "available_fall_loading_gib": available_before - lowest[0]}
    # The move to the GPU reads every weight once: read them here too.
    for p in model.parameters():
        p.sum()
    sampling = False
    thread.join()
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / GIB
    return {"weights_gib": weights, "process_before_gib": before_rss, **loaded,
            "resident_peak_read_gib": peak.take(), "resident_file_read_gib": status_gib("RssFile"),
            "resident_anon_read_gib": status_gib("RssAnon"),
            "available_fall_read_gib": available_before - lowest[0], "load_seconds": seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--size", default="2b")
    parser.add_argument("--measure", action="store_true", help="(the fresh process: load and measure)")
    args = parser.parse_args()
    folder = Path(args.workdir, f"model-{args.size}")
    if args.measure:
        print(json.dumps(measure(folder)))
        return
    build(folder, args.size)
    out = subprocess.run([sys.executable, __file__, "--workdir", args.workdir, "--size", args.size, "--measure"],
                         check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    print(json.dumps({"size": args.size, **result}))
    print(", ".join(f"{k} {v:.2f}" for k, v in result.items()))


if __name__ == "__main__":
    main()
