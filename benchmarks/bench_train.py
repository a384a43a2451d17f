"""Speed and memory of train_cogvideox_lora.py on random-init, real-size CogVideoX models.

    python benchmarks/bench_train.py --workdir /tmp/bench              # GPU: the rows of BENCHMARKS.md
    python benchmarks/bench_train.py --workdir /tmp/bench --rows 5b-i2v-ckpt,1.5-5b-ckpt,1.5-5b-i2v-ckpt
    python benchmarks/bench_train.py --tiny --workdir /tmp/bench       # CPU: the same flow, tiny models
    python benchmarks/bench_train.py --workdir /tmp/bench --rows 1.5-5b-ckpt -- --use_8bit_adam

Builds the model folders (real configs, T5-XXL-size text encoder, random weights; nothing is
downloaded) and generated clips, runs the real trainer through `accelerate launch` for each row at its
model's native size (CogVideoX 1.0: 49x480x720, 1.5: 81x768x1360), and prints the figures the trainer
itself wrote to train_summary.json. A model's first row runs on an empty latent cache (cold), its later
rows reuse it (warm). Flags after `--` go to every row's trainer.
"""

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from diffusers import CogVideoXTransformer3DModel

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cogvideox_lora import synthetic  # noqa: E402

ROWS = {  # name: (model size, extra trainer flags)
    "2b": ("2b", []),
    "2b-ckpt": ("2b", ["--gradient_checkpointing"]),
    "5b-ckpt": ("5b", ["--gradient_checkpointing"]),
    "5b-ckpt-fp8": ("5b", ["--gradient_checkpointing", "--base_weights_dtype", "fp8"]),
    "5b-i2v-ckpt": ("5b-i2v", ["--gradient_checkpointing"]),
    "1.5-5b-ckpt": ("1.5-5b", ["--gradient_checkpointing"]),
    "1.5-5b-i2v-ckpt": ("1.5-5b-i2v", ["--gradient_checkpointing"]),
}
TINY_SIZES = {"2b": "tiny", "5b": "tiny-5b", "5b-i2v": "tiny-i2v", "1.5-5b": "tiny-1.5", "1.5-5b-i2v": "tiny-1.5-i2v"}
TINY_SHAPE = (9, 48, 64)


def native_shape(size: str) -> tuple[int, int, int]:
    """Frames, height and width a model of this size was trained at (5B-I2V's learned embeddings need it)."""
    return (81, 768, 1360) if size.startswith("1.5") else (49, 480, 720)


def step_flops(config: dict, latent_frames: int, latent_height: int, latent_width: int, recompute: bool) -> float:
    """Matrix FLOPs of one step of batch 1 with a frozen base (LoRA's own FLOPs are negligible).

    Per layer, the projections and feed-forward take 24*S*D^2 forward and the attention 4*S^2*D; the
    backward needs activation gradients only: once the projections' cost and twice the attention's.
    Gradient checkpointing adds a second forward.
    """
    p, p_t = config["patch_size"], config.get("patch_size_t") or 1
    tokens = config["max_text_seq_length"] + math.ceil(latent_frames / p_t) * (latent_height // p) * (latent_width // p)
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    linear, attention = 24 * tokens * dim**2, 4 * tokens**2 * dim
    per_layer = 2 * linear + 3 * attention + (linear + attention if recompute else 0)
    return config["num_layers"] * per_layer


def write_data(data_dir: Path, frames: int, height: int, width: int) -> int:
    """Clips for frames x height x width; returns the --fps that takes `frames` from them.

    Generated clips hold at most synthetic.MAX_FRAMES frames: longer ones are sampled at a multiple of the
    clips' 8 fps, which repeats frames (all the same to the speed and memory measured).
    """
    repeat = math.ceil(frames / synthetic.MAX_FRAMES)
    if not (data_dir / "videos.txt").exists():
        synthetic.write_clips(data_dir, num_clips=4, height=height, width=width, num_frames=math.ceil(frames / repeat),
                              fps=8)
    return 8 * repeat


def run_row(name, model_dir, data_dir, workdir, shape, fps, steps, extra):
    size, flags = ROWS[name]
    frames, height, width = shape
    out = workdir / f"out-{name}"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(REPO / "accelerate_config_machine_single.yaml"), str(REPO / "train_cogvideox_lora.py"),
        "--pretrained_model_name_or_path", str(model_dir), "--instance_data_root", str(data_dir),
        "--output_dir", str(out), "--latent_cache_dir", str(workdir / "cache"),
        "--height", str(height), "--width", str(width), "--max_num_frames", str(frames), "--fps", str(fps),
        "--rank", "128", "--lora_alpha", "128", "--train_batch_size", "1", "--max_train_steps", str(steps),
        "--checkpointing_steps", "100000", "--mixed_precision", "bf16", "--optimizer", "adamw",
        "--enable_tiling", "--enable_slicing", "--report_to", "none", *flags, *extra,
    ]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO)
    summary = json.loads((out / "train_summary.json").read_text())
    config = CogVideoXTransformer3DModel.load_config(model_dir, subfolder="transformer")
    latent = ((frames - 1) // 4 + 1, height // 8, width // 8)
    flops = step_flops(config, *latent, recompute="--gradient_checkpointing" in flags)
    step = summary["median_step_time_s"]
    return {"row": name, "model": size, **summary, "step_tflop": flops / 1e12,
            "achieved_tflops": flops / step / 1e12 if step else None}


def describe_environment() -> dict:
    import accelerate
    import diffusers
    import peft
    import torch
    import transformers

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__, "peft": peft.__version__,
            "date": time.strftime("%Y-%m-%d")}


def fmt(value, spec=".3f") -> str:
    return "—" if value is None else format(value, spec)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="where models, clips, cache and runs go")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per row")
    parser.add_argument("--clips", default=None, help="an existing dataset folder instead of generated clips")
    parser.add_argument("--tiny", action="store_true", help="tiny models and clips, for a CPU")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("extra", nargs="*", help="further trainer flags, after --")
    args = parser.parse_args()

    workdir = Path(args.workdir)
    results = []
    for name in args.rows.split(","):
        size = ROWS[name][0]
        shape = TINY_SHAPE if args.tiny else native_shape(size)
        if args.clips:
            data_dir, fps = Path(args.clips), 8
        else:
            data_dir = workdir / f"data-{'x'.join(map(str, shape))}"
            fps = write_data(data_dir, *shape)
        model_dir = workdir / f"model-{size}"
        if not (model_dir / "model_index.json").exists():
            import torch

            synthetic.build_model_folder(model_dir, size=TINY_SIZES[size] if args.tiny else size,
                                         dtype=torch.float32 if args.tiny else torch.bfloat16,
                                         device="cuda" if torch.cuda.is_available() else "cpu")
        results.append(run_row(name, model_dir, data_dir, workdir, shape, fps, args.steps, args.extra))

    environment = describe_environment()
    if args.out:
        Path(args.out).write_text(json.dumps({"environment": environment, "rows": results}, indent=2))
    print("\n" + ", ".join(f"{k} {v}" for k, v in environment.items()))
    print("\n| row | median step (s) | peak alloc (GiB) | peak reserved (GiB) | to first step (s) | cache "
          "| model load (s) | TFLOP/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        cache = "warm" if r["encoded_clips"] == 0 else "cold"
        print(f"| {r['row']} | {fmt(r['median_step_time_s'])} | {fmt(r['peak_memory_allocated_gib'], '.1f')} "
              f"| {fmt(r['peak_memory_reserved_gib'], '.1f')} | {fmt(r['seconds_to_first_step'], '.1f')} | {cache} "
              f"| {fmt(r['model_load_seconds'], '.1f')} | {fmt(r['achieved_tflops'], '.0f')} |")


if __name__ == "__main__":
    main()
