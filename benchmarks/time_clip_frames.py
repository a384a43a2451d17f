"""A cold run's CPU work per clip, apart from the VAE: the check (probe_clip: every frame training reads decoded,
the rotation and pixel aspect read with ffmpeg) and encoding's frames (read_frames: decoded again, resized and
cropped, scaled to [-1, 1]). Where the checkout has decoded.py (the check's frames kept for encoding), also the
two together as a cold run does them now: the check keeping the frames, encoding taking them (no second decode).

    python -m cogvideox_lora.synthetic clips /tmp/frames_data --num_clips 8 --height 480 --width 720 \\
        --num_frames 64 --fps 24
    python benchmarks/time_clip_frames.py REPO_CHECKOUT /tmp/frames_data [--height 480 --width 720 --frames 17]

At --fps 8 a 24 fps clip gives every third frame: 17 frames trained, 49 decoded. Median of 5 passes over the clips.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("repo")
parser.add_argument("data", type=Path)
parser.add_argument("--height", type=int, default=480)
parser.add_argument("--width", type=int, default=720)
parser.add_argument("--frames", type=int, default=17)
args = parser.parse_args()
sys.path.insert(0, args.repo)
import torch  # noqa: E402

from cogvideox_lora.data import FrameSettings, probe_clip, read_frames  # noqa: E402

torch.set_num_threads(2)
settings = FrameSettings(args.height, args.width, 8, args.frames, 0, 0, "center")
clips = sorted((args.data / "videos").glob("*.mp4"))


def per_clip(work) -> float:
    work(clips[0])  # warm-up
    passes = []
    for _ in range(5):
        started = time.perf_counter()
        for clip in clips:
            work(clip)
        passes.append((time.perf_counter() - started) / len(clips))
    return statistics.median(passes)


check = per_clip(lambda clip: probe_clip(clip, settings))
frames = per_clip(lambda clip: read_frames(clip, settings))
print(f"{args.repo}: {len(clips)} clips, {args.frames}x{args.height}x{args.width}: check {check * 1e3:.0f} ms a clip, "
      f"encoding's frames {frames * 1e3:.0f} ms a clip, both {(check + frames) * 1e3:.0f} ms (median of 5)")
try:
    from cogvideox_lora.decoded import DecodedFrames  # noqa: E402
except ImportError:
    sys.exit(0)


def reused(clip):
    store = DecodedFrames(2 << 30)
    probe_clip(clip, settings, store)
    read_frames(clip, settings, decoded=store.take(clip))


both = per_clip(reused)
print(f"{args.repo}: check keeping the frames + encoding's frames from them {both * 1e3:.0f} ms a clip "
      f"(median of 5)")
