"""Time of the dataset check before training (index, every frame training reads decoded, buckets chosen).

    python -m cogvideox_lora.synthetic clips /tmp/probe_data --num_clips 24 --height 480 --width 720 \
        --num_frames 49 --fps 8
    python benchmarks/time_dataset_check.py REPO_CHECKOUT    # median of 5 runs of check_dataset + clip_settings
"""

import sys, time, statistics
sys.path.insert(0, sys.argv[1])
from cogvideox_lora import settings
from cogvideox_lora.args import parse_args
from cogvideox_lora.data import check_dataset, clip_settings
run = settings.from_args(parse_args(["--pretrained_model_name_or_path", "x", "--instance_data_root", "/tmp/probe_data", "--output_dir", "/tmp/o",
                   "--height_buckets", "480", "320", "--width_buckets", "720", "480", "--frame_buckets", "25", "49"]))
s, b, d = run.frames, run.buckets, run.data
times = []
for _ in range(5):
    t = time.perf_counter()
    clips, _ = check_dataset(d.root, d.caption_column, d.video_column, None, None, None, s, buckets=b)
    per = clip_settings(clips, s, b)
    times.append(time.perf_counter() - t)
print(sys.argv[1], len(clips), "clips; median %.3f s" % statistics.median(times), sorted({(p.max_num_frames, p.height, p.width) for p in per}))
