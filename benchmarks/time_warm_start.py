"""Issue 25's figures: time to the first step cold and warm, host peak RSS against cache entries of the 2B size,
the per-step data order at 100,000 clips, and two runs sharing one cache.

    python benchmarks/time_warm_start.py WORKDIR [--clips 2000 20000] [--cold_limit 2000] [--warm_only]

Tiny model (cogvideox_lora.synthetic), the smallest clips decord reads (9 frames of 48x64 at 8 fps): 50
distinct clips, each copied with an MP4 'free' box of its own number appended, so that every copy has its
own content hash and cache entry. "to first step" is the trainer's seconds_to_first_step (from main(), after
imports). Clip counts above --cold_limit are not timed cold: their clip index and cache are filled by a run
with the decoding, the VAE and T5 stubbed (its time is not a figure), then the warm run is the real trainer.
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FLAGS = ["--height", "48", "--width", "64", "--max_num_frames", "9", "--rank", "4", "--lora_alpha", "4",
         "--seed", "7", "--report_to", "none", "--max_train_steps", "1", "--checkpointing_steps", "1000"]
# 2B at 49x480x720: latent_params [2 x 16 channels, 13 frames, 60, 90] in bf16.
ENTRY_2B = (32, 13, 60, 90)


def dataset(root: Path, n: int) -> Path:
    from cogvideox_lora.synthetic import write_clips

    if (root / "videos.txt").exists():
        return root
    sources = root / "sources"
    write_clips(sources, num_clips=50, num_frames=9, fps=8)
    videos = root / "videos"
    videos.mkdir(parents=True)
    names = []
    for i in range(n):
        data = (sources / "videos" / f"clip_{i % 50:03d}.mp4").read_bytes()
        (videos / f"c{i:06d}.mp4").write_bytes(data + struct.pack(">I", 12) + b"free" + struct.pack(">I", i))
        names.append(f"videos/c{i:06d}.mp4")
    (root / "videos.txt").write_text("".join(v + "\n" for v in names))
    (root / "prompts.txt").write_text("".join(f"clip {i} a square\n" for i in range(n)))
    return root


def train(model: Path, data: Path, out: Path, cache: Path, *extra, wait=True):
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, str(REPO / "train_cogvideox_lora.py"), "--pretrained_model_name_or_path", str(model),
               "--instance_data_root", str(data), "--output_dir", str(out), "--latent_cache_dir", str(cache),
               *FLAGS, *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return finish(process, out) if wait else (process, out)


def finish(process, out: Path) -> dict:
    _, err = process.communicate()
    if process.returncode:
        sys.exit(f"trainer failed:\n{err[-3000:]}")
    return json.loads((out / "train_summary.json").read_text())


STUBBED_FILL = r"""
import json, sys, types, torch
sys.path.insert(0, sys.argv[1])
from cogvideox_lora import data, latent_cache, models
import train_cogvideox_lora
model = sys.argv[2]
vae = json.load(open(f"{model}/vae/config.json"))
t5 = json.load(open(f"{model}/text_encoder/config.json"))
data.probe_clip = lambda path, settings, *kept: (9, 48, 64)
class Frames(torch.utils.data.Dataset):
    def __init__(self, clips, *args, **kwargs): self.n = len(clips)
    def __len__(self): return self.n
    def __getitem__(self, i): return i, torch.zeros(9, 3, 48, 64)
latent_cache.ClipFrames = Frames
params = torch.zeros(2 * vae["latent_channels"], 3, 6, 8)
encoder = types.SimpleNamespace(dtype=torch.float32, encode=lambda video: types.SimpleNamespace(
    latent_dist=types.SimpleNamespace(parameters=params[None])))
models.load_vae = lambda *a, **k: encoder
class T5:
    device = "cpu"
    def __call__(self, ids): return (torch.zeros(1, ids.shape[1], t5["d_model"]),)
models.load_text_encoder = lambda *a, **k: T5()
train_cogvideox_lora.main(sys.argv[3:])
"""


def stubbed_fill(model: Path, data: Path, cache: Path, out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([sys.executable, "-c", STUBBED_FILL, str(REPO), str(model), "--pretrained_model_name_or_path",
                    str(model), "--instance_data_root", str(data), "--output_dir", str(out), "--latent_cache_dir",
                    str(cache), *FLAGS], check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shutil.rmtree(out)


def first_steps(model: Path, work: Path, counts: list[int], cold_limit: int, warm_only: bool) -> None:
    for n in counts:
        data, cache = dataset(work / f"data{n}", n), work / f"cache{n}"
        if not warm_only:
            shutil.rmtree(cache, ignore_errors=True)
        if warm_only:
            print(f"{n} clips: the clip index and cache of an earlier run of this script")
        elif n <= cold_limit:
            started = time.perf_counter()
            cold = train(model, data, work / "out", cache)
            print(f"{n} clips cold: {cold['seconds_to_first_step']:.1f} s to the first step "
                  f"({time.perf_counter() - started:.1f} s wall, {cold['encoded_clips']} clips encoded)")
        else:
            stubbed_fill(model, data, cache, work / "out")
            print(f"{n} clips cold: not timed (index and cache filled with decoding and encoders stubbed)")
        warm = [train(model, data, work / "out", cache)["seconds_to_first_step"] for _ in range(3)]
        print(f"{n} clips warm: {statistics.median(warm):.2f} s to the first step (median of 3: "
              f"{', '.join(f'{w:.2f}' for w in warm)})")


RSS_CHILD = r"""
import resource, sys, torch
sys.path.insert(0, sys.argv[1])
from argparse import Namespace
from cogvideox_lora.data import EpochOrder
from cogvideox_lora.latent_cache import LatentCache, fill
from cogvideox_lora.loss import draw_batch
cache = LatentCache(sys.argv[2])
keys = [f"e{i:05d}" for i in range(int(sys.argv[3]))]
entries, _ = fill(cache, keys, Namespace(num_processes=1, process_index=0), None, "rss")
order = EpochOrder([entries.shape(i) for i in range(len(entries))], 1, 7)
prompt = {"prompt_embeds": torch.zeros(226, 4096, dtype=torch.bfloat16)}
for step in range(50):
    ids = order.batches(0)[step % len(order.batches(0))]
    draw_batch([entries[i] for i in ids], [prompt], [step], 0.7, 0.0, 1000, "cpu")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def peak_rss(work: Path, counts: list[int]) -> None:
    import torch
    from cogvideox_lora.latent_cache import LatentCache

    cache = LatentCache(work / "cache2b")
    tensors = {"latent_params": torch.randn(ENTRY_2B).to(torch.bfloat16)}
    for i in range(max(counts)):
        if not cache.path(f"e{i:05d}").exists():
            cache.save(f"e{i:05d}", tensors)
    cache.save_verified()
    size = cache.path("e00000").stat().st_size / 1e6
    for n in counts:
        for label, verified in (("first start (every entry's checksum read)", False), ("warm", True)):
            if not verified:
                (cache.root / "verified.json").unlink(missing_ok=True)
            out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(REPO), str(cache.root), str(n)], check=True,
                                 capture_output=True, text=True).stdout
            print(f"{n} cache entries of the 2B size ({size:.2f} MB each), {label}: host peak RSS "
                  f"{float(out.split()[-1]):.0f} MB (50 batches drawn)")


def data_order(n: int = 100_000) -> None:
    from cogvideox_lora.data import EpochOrder, epoch_batches

    shapes = [(13, 60, 90)] * n
    order = EpochOrder(shapes, 8, 7)
    started = time.perf_counter()
    order.batches(0)
    first = time.perf_counter() - started
    steps = len(order.batches(0))
    started = time.perf_counter()
    for step in range(steps):
        order.batches(0)[step]
    per_step = (time.perf_counter() - started) / steps
    started = time.perf_counter()
    for step in range(5):
        epoch_batches(shapes, 8, 7, 0)[step]
    before = (time.perf_counter() - started) / 5
    print(f"data order at {n} clips: {per_step * 1e3:.5f} ms a step over an epoch of {steps} steps (the epoch's "
          f"permutation once: {first * 1e3:.0f} ms); before, a shuffle a step: {before * 1e3:.0f} ms")


def shared_cache(model: Path, work: Path, n: int = 40) -> None:
    data, cache = dataset(work / f"data{n}", n), work / "cache-shared"
    shutil.rmtree(cache, ignore_errors=True)
    runs = [train(model, data, work / f"shared{i}", cache, "--learning_rate", lr, wait=False)
            for i, lr in enumerate(["1e-4", "3e-4"])]
    encoded = [finish(*run)["encoded_clips"] for run in runs]
    print(f"two runs started together on one cache, {n} clips: encoded {encoded[0]} + {encoded[1]} = "
          f"{sum(encoded)} clips")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--clips", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--cold_limit", type=int, default=2000)
    parser.add_argument("--rss_entries", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--skip", nargs="*", default=[], choices=["first_step", "rss", "order", "shared"])
    parser.add_argument("--warm_only", action="store_true", help="time warm starts on the caches left in workdir")
    args = parser.parse_args()
    from cogvideox_lora.synthetic import build_model_folder

    args.workdir.mkdir(parents=True, exist_ok=True)
    model = args.workdir / "tiny"
    if not model.exists():
        build_model_folder(model, size="tiny", seed=0)
    import torch, decord  # noqa: E401  (versions for the record)
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, decord {decord.__version__}, "
          f"{os.cpu_count()} cores")
    if "order" not in args.skip:
        data_order()
    if "shared" not in args.skip:
        shared_cache(model, args.workdir)
    if "rss" not in args.skip:
        peak_rss(args.workdir, args.rss_entries)
    if "first_step" not in args.skip:
        first_steps(model, args.workdir, args.clips, args.cold_limit, args.warm_only)
    print(f"benchmark process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
