"""Speed and memory of train_cogvideox_lora.py on random-init, real-size CogVideoX models.

    python benchmarks/bench_train.py --workdir /tmp/bench              # GPU: the rows of BENCHMARKS.md
    python benchmarks/bench_train.py --workdir /tmp/bench --rows 5b-i2v-ckpt,1.5-5b-ckpt,1.5-5b-i2v-ckpt
    python benchmarks/bench_train.py --tiny --workdir /tmp/bench       # CPU: the same flow, tiny models
    python benchmarks/bench_train.py --workdir /tmp/bench --rows 1.5-5b-ckpt -- --use_8bit_adam
    python benchmarks/bench_train.py --workdir /tmp/bench --rows 2b,2b-x2   # 1 and 2 GPUs: scaling
    python benchmarks/bench_train.py --workdir /tmp/bench --rows 2b-auto-8gb --build_only  # folders, no run
    ACCELERATE_USE_CPU=1 python benchmarks/bench_train.py --tiny --workdir /tmp/bench --rows 2b,2b-x2

Builds the model folders (real configs, T5-XXL-size text encoder, random weights; nothing is
downloaded) and generated clips, runs the real trainer through `accelerate launch` for each row at its
model's native size (CogVideoX 1.0: 49x480x720, 1.5: 81x768x1360), and prints the figures the trainer
itself wrote to train_summary.json. A model's first row runs on an empty latent cache (cold), its later
rows reuse it (warm). Flags after `--` go to every row's trainer.

A row is a name from ROWS, then -xN for N processes (one per GPU, each with the same batch), then
-zero2 for DeepSpeed ZeRO-2: 2b-x2, 2b-ckpt-x4-zero2. A row of N processes is scaled against the row
of one process with the same name, if its run is in the workdir (from this call or an earlier one).
--resume_steps continues each row's run with --resume_from_checkpoint latest and checks that it resumed.
"""

import argparse
import importlib.metadata
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from diffusers import CogVideoXTransformer3DModel

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cogvideox_lora import synthetic  # noqa: E402

CKPT, KEEP, FP8 = ["--gradient_checkpointing"], ["--gradient_checkpointing", "--checkpointing_policy", "keep_attention"], \
    ["--base_weights_dtype", "fp8"]
FP8_LINEAR = ["--fp8_compute", "linear"]
# Offloaded rows make a validation video at the training size inside the run, under a cap of the card size they
# claim (--max_gpu_memory holds the process to it).
VALIDATE = ["--validation_prompt", "a red square moving on grey", "--validation_num_inference_steps", "2"]


def _offloaded(card_gib: int, *flags: str) -> list[str]:
    return [*CKPT, "--offload", "activations", *flags, "--max_gpu_memory", str(card_gib), *VALIDATE]


def _auto(card_gib: int, *flags: str) -> list[str]:
    """The plan --offload auto makes for a card of card_gib (issue 27's targets): run them under
    benchmarks/card_rows.sh, whose ballast leaves the trainer what such a card has free."""
    return ["--offload", "auto", *flags, "--max_gpu_memory", str(card_gib), *VALIDATE]


ROWS = {  # name: (model size, extra trainer flags)
    "2b": ("2b", []),
    "2b-keep": ("2b", KEEP),
    "2b-ckpt": ("2b", CKPT),
    "2b-fp8c": ("2b", FP8_LINEAR),
    "2b-ckpt-fp8c": ("2b", [*CKPT, *FP8_LINEAR]),
    "5b": ("5b", []),
    "5b-keep": ("5b", KEEP),
    "5b-ckpt": ("5b", CKPT),
    "5b-ckpt-fp8": ("5b", [*CKPT, *FP8]),
    "5b-ckpt-fp8c": ("5b", [*CKPT, *FP8_LINEAR]),
    "5b-i2v-ckpt": ("5b-i2v", CKPT),
    "1.5-5b-ckpt": ("1.5-5b", CKPT),
    "1.5-5b-i2v-ckpt": ("1.5-5b-i2v", CKPT),
    "1.5-5b-ckpt-fp8c": ("1.5-5b", [*CKPT, *FP8_LINEAR]),
    "2b-offload-8gb": ("2b", _offloaded(8, "--blocks_to_swap", "12")),
    "5b-offload-16gb": ("5b", _offloaded(16)),
    "5b-fp8-offload-12gb": ("5b", _offloaded(12, *FP8)),
    "1.5-5b-fp8-offload-16gb": ("1.5-5b", _offloaded(16, *FP8)),
    "1.5-5b-i2v-fp8-offload-16gb": ("1.5-5b-i2v", _offloaded(16, *FP8)),
    "2b-auto-8gb": ("2b", _auto(8)),
    "5b-fp8-auto-12gb": ("5b", _auto(12, *FP8)),
    "5b-i2v-fp8-auto-12gb": ("5b-i2v", _auto(12, *FP8)),
    "5b-auto-16gb": ("5b", _auto(16)),
    "1.5-5b-fp8-auto-16gb": ("1.5-5b", _auto(16, *FP8)),
    "1.5-5b-i2v-fp8-auto-16gb": ("1.5-5b-i2v", _auto(16, *FP8)),
    "5b-auto-24gb": ("5b", _auto(24)),
    "1.5-5b-auto-24gb": ("1.5-5b", _auto(24)),
    "5b-fp8-auto-8gb": ("5b", _auto(8, *FP8)),
    # The 2b row with the held-out loss of HELDOUT_CLIPS clips at 4 timesteps every 4 steps (its cost against "2b":
    # run both in one call, --rows 2b,2b-heldout); with float8 products, the curve to hold against bf16's (longer
    # runs: --steps 300 -- --validation_loss_steps 50).
    "2b-heldout": ("2b", ["--validation_loss_steps", "4", "--validation_loss_timesteps", "4"]),
    "2b-heldout-fp8c": ("2b", ["--validation_loss_steps", "4", "--validation_loss_timesteps", "4", *FP8_LINEAR]),
}
HELDOUT_CLIPS = 8
ATTENTION = ("cudnn", "flash4")
TINY_SIZES = {"2b": "tiny", "5b": "tiny-5b", "5b-i2v": "tiny-i2v", "1.5-5b": "tiny-1.5", "1.5-5b-i2v": "tiny-1.5-i2v"}
TINY_SHAPE = (9, 48, 64)
ROW = re.compile(r"^(?P<base>.+?)(?:-(?P<attention>cudnn|flash4))?(?:-x(?P<processes>\d+))?(?P<zero2>-zero2)?$")


def parse_row(name: str) -> tuple[str, str | None, int, bool]:
    """(the ROWS entry, attention backend or None for the default, processes, DeepSpeed ZeRO-2) of a row name."""
    match = ROW.match(name)
    if not match or match["base"] not in ROWS:
        raise SystemExit(f"unknown row {name!r}: a name of {', '.join(ROWS)}, then -cudnn or -flash4, then -xN, "
                         f"then -zero2")
    return match["base"], match["attention"], int(match["processes"] or 1), bool(match["zero2"])


def latent_size(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Latent frames, height and width of a clip (the VAE compresses time 4x and space 8x)."""
    return (frames - 1) // 4 + 1, height // 8, width // 8


def native_shape(size: str) -> tuple[int, int, int]:
    """Frames, height and width a model of this size was trained at (5B-I2V's learned embeddings need it)."""
    return (81, 768, 1360) if size.startswith("1.5") else (49, 480, 720)


def step_flops(config: dict, latent_frames: int, latent_height: int, latent_width: int, recompute: str | None) -> float:
    """Matrix FLOPs of one step of batch 1 with a frozen base (LoRA's own FLOPs are negligible).

    Per layer, the projections and feed-forward take 24*S*D^2 forward and the attention 4*S^2*D; the
    backward needs activation gradients only: once the projections' cost and twice the attention's.
    Gradient checkpointing adds a second forward ("full"), or its projections alone ("keep_attention").
    """
    p, p_t = config["patch_size"], config.get("patch_size_t") or 1
    tokens = config["max_text_seq_length"] + math.ceil(latent_frames / p_t) * (latent_height // p) * (latent_width // p)
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    linear, attention = 24 * tokens * dim**2, 4 * tokens**2 * dim
    per_layer = 2 * linear + 3 * attention + {None: 0, "full": linear + attention, "keep_attention": linear}[recompute]
    return config["num_layers"] * per_layer


def write_data(data_dir: Path, frames: int, height: int, width: int, num_clips: int = 4, id_offset: int = 0) -> int:
    """Clips for frames x height x width (numbered from id_offset); returns the --fps that takes `frames` from them.

    Generated clips hold at most synthetic.MAX_FRAMES frames: longer ones are sampled at a multiple of the
    clips' 8 fps, which repeats frames (all the same to the speed and memory measured).
    """
    repeat = math.ceil(frames / synthetic.MAX_FRAMES)
    if not (data_dir / "videos.txt").exists():
        synthetic.write_clips(data_dir, num_clips=num_clips, height=height, width=width,
                              num_frames=math.ceil(frames / repeat), fps=8, id_offset=id_offset)
    return 8 * repeat


def write_heldout(workdir: Path, shape: tuple[int, int, int]) -> Path:
    """Held-out clips of their own (HELDOUT_CLIPS, numbered after write_data's), of the training clips' size."""
    heldout = workdir / f"heldout-{'x'.join(map(str, shape))}"
    write_data(heldout, *shape, num_clips=HELDOUT_CLIPS, id_offset=4)
    return heldout


def launcher(processes: int, zero2: bool) -> list[str]:
    if zero2:
        config = ["--config_file", str(REPO / "accelerate_config_deepspeed_zero2.yaml")]
    elif processes > 1:
        config = ["--config_file", str(REPO / "accelerate_config_machine_multi.yaml")]
    else:
        return ["--config_file", str(REPO / "accelerate_config_machine_single.yaml")]
    return [*config, "--num_processes", str(processes), "--num_machines", "1", "--main_process_port", "0"]


def train(command: list[str], out: Path) -> dict:
    """The run's train_summary.json, with launch_to_first_step_s: from `accelerate launch` to the end of the first
    optimizer step (its compilation included), what a user waits before training is under way."""
    print("$", " ".join(command), flush=True)
    launched = time.time()
    # NVLink multicast (NVLS) stays off: on shared hosts it can take the GPUs out of service. Expandable segments
    # as the finetune scripts set them, so that a capped row is not refused for fragmentation.
    subprocess.run(command, check=True, cwd=REPO, env={**os.environ, "NCCL_NVLS_ENABLE": "0",
                                                       "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    summary = json.loads((out / "train_summary.json").read_text())
    done = summary.get("first_step_done_at")
    return {**summary, "launch_to_first_step_s": done - launched if done else None}


def run_row(name, model_dir, data_dir, workdir, shape, fps, steps, resume_steps, extra):
    base, backend, processes, zero2 = parse_row(name)
    size, flags = ROWS[base]
    flags = [*flags, *(["--attention_backend", backend] if backend else [])]
    frames, height, width = shape
    if "--validation_prompt" in flags and "i2v" in size:  # image-to-video validates from an image
        image = workdir / f"validation-{height}x{width}.png"
        if not image.exists():
            from PIL import Image

            Image.new("RGB", (width, height), (128, 128, 128)).save(image)
        flags += ["--validation_images", str(image)]
    if "--validation_loss_steps" in flags:
        flags += ["--validation_dataset", str(write_heldout(workdir, shape))]
    out = workdir / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)  # a row run again starts afresh: the trainer refuses to overwrite a run
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *launcher(processes, zero2),
        str(REPO / "train_cogvideox_lora.py"),
        "--pretrained_model_name_or_path", str(model_dir), "--instance_data_root", str(data_dir),
        "--output_dir", str(out), "--latent_cache_dir", str(workdir / "cache"),
        "--height", str(height), "--width", str(width), "--max_num_frames", str(frames), "--fps", str(fps),
        "--rank", "128", "--lora_alpha", "128", "--train_batch_size", "1",
        "--checkpointing_steps", "100000", "--mixed_precision", "bf16", "--optimizer", "adamw",
        "--enable_tiling", "--enable_slicing", "--report_to", "none", *flags, *extra,
    ]
    summary = train([*command, "--max_train_steps", str(steps)], out)
    config = CogVideoXTransformer3DModel.load_config(model_dir, subfolder="transformer")
    latent = latent_size(frames, height, width)
    policy = None if "--gradient_checkpointing" not in flags else \
        "keep_attention" if "keep_attention" in flags else "full"
    flops = step_flops(config, *latent, recompute=policy)
    step = summary["median_step_time_s"]
    result = {"row": name, "model": size, **summary, "step_tflop": flops / 1e12,
              "achieved_tflops": flops / step / 1e12 if step else None}
    if resume_steps:
        # The run ended with a checkpoint at `steps`; the same command continues it.
        resumed = train([*command, "--max_train_steps", str(resume_steps), "--resume_from_checkpoint", "latest"], out)
        if resumed["resumed_at_step"] != steps or resumed["steps"] != resume_steps:
            raise SystemExit(f"{name}: the continued run started at step {resumed['resumed_at_step']}, not {steps}")
        result["resumed"] = resumed
    return result


def scaling(result: dict, earlier: list[dict], workdir: Path) -> float | None:
    """Samples per second against the one-process row of the same name: its result in this call, else the
    summary of its run in the workdir (which, if it was continued with --resume_steps, is the continued run's)."""
    base, backend, processes, zero2 = parse_row(result["row"])
    if processes == 1 and not zero2:
        return None
    name = base + (f"-{backend}" if backend else "")
    single = next((r for r in earlier if r["row"] == name), None)
    if single is None and (workdir / f"out-{name}" / "train_summary.json").exists():
        single = json.loads((workdir / f"out-{name}" / "train_summary.json").read_text())
    if single is None or not single["samples_per_second"] or not result["samples_per_second"]:
        return None
    return result["samples_per_second"] / single["samples_per_second"]


def describe_environment() -> dict:
    import accelerate
    import diffusers
    import peft
    import torch
    import transformers

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    try:
        flash4 = importlib.metadata.version("flash-attn-4")
    except importlib.metadata.PackageNotFoundError:
        flash4 = None
    return {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "flash-attn-4": flash4, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__, "peft": peft.__version__,
            "date": time.strftime("%Y-%m-%d")}


def fmt(value, spec=".3f") -> str:
    return "—" if value is None else format(value, spec)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="where models, clips, cache and runs go")
    parser.add_argument("--rows", default=",".join(ROWS),
                        help=f"comma-separated: each one of {', '.join(ROWS)}, then -xN for N GPUs, then -zero2")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per row")
    parser.add_argument("--resume_steps", type=int, default=0,
                        help="then continue each row's run to this many steps from its last checkpoint")
    parser.add_argument("--clips", default=None, help="an existing dataset folder instead of generated clips")
    parser.add_argument("--tiny", action="store_true", help="tiny models and clips, for a CPU")
    parser.add_argument("--shape", default=None, help="FRAMESxHEIGHTxWIDTH for every row instead of the model's "
                                                      "native size (e.g. 49x240x368 for long, cheap curves)")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("--build_only", action="store_true",
                        help="make the rows' model folders and clips, and run nothing (card_rows.sh: before the "
                             "ballast, so that building them takes none of the card the rows are given)")
    parser.add_argument("extra", nargs="*", help="further trainer flags, after --")
    args = parser.parse_args()

    workdir = Path(args.workdir)
    results = []
    for name in args.rows.split(","):
        size = ROWS[parse_row(name)[0]][0]
        shape = tuple(map(int, args.shape.split("x"))) if args.shape else TINY_SHAPE if args.tiny else native_shape(size)
        if args.clips:
            data_dir, fps = Path(args.clips), 8
        else:
            data_dir = workdir / f"data-{'x'.join(map(str, shape))}"
            fps = write_data(data_dir, *shape)
        model_dir = workdir / f"model-{size}"
        if not (model_dir / "model_index.json").exists():
            import torch

            # The models share one T5 (9 GiB at real size): the first folder's.
            donor = next((d for d in sorted(workdir.glob("model-*")) if (d / "model_index.json").exists()), None)
            synthetic.build_model_folder(model_dir, size=TINY_SIZES[size] if args.tiny else size,
                                         dtype=torch.float32 if args.tiny else torch.bfloat16,
                                         device="cuda" if torch.cuda.is_available() else "cpu", text_encoder_from=donor)
        if args.build_only:
            continue
        result = run_row(name, model_dir, data_dir, workdir, shape, fps, args.steps, args.resume_steps, args.extra)
        results.append({**result, "scaling": scaling(result, results, workdir)})
        if args.out:  # after each row, so that a call cut short keeps the rows it ran
            Path(args.out).write_text(json.dumps({"environment": describe_environment(), "rows": results}, indent=2))

    if args.build_only:
        return
    environment = describe_environment()
    print("\n" + ", ".join(f"{k} {v}" for k, v in environment.items()))
    print("\n| row | GPUs | median step (s) | samples/s | scaling (x) | peak alloc per GPU (GiB) "
          "| peak reserved, max (GiB) | validation peak (GiB) | on the card: training / validation (GiB) "
          "| estimate, on the card (GiB) | host peak (GiB) | to first step (s) | launch to first step done (s) "
          "| cache | model load (s) | TFLOP/s per GPU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        cache = "warm" if r["encoded_clips"] == 0 else "cold"
        per_gpu = ", ".join(fmt(m, ".2f") for m in r["peak_memory_allocated_gib_per_process"] or [None])
        print(f"| {r['row']} | {r['processes']} | {fmt(r['median_step_time_s'])} "
              f"| {fmt(r['samples_per_second'], '.2f')} | {fmt(r['scaling'], '.2f')} | {per_gpu} "
              f"| {fmt(r['peak_memory_reserved_gib'], '.1f')} | {fmt(r.get('peak_memory_validation_gib'), '.2f')} "
              f"| {fmt(r.get('peak_device_memory_gib'), '.2f')} / {fmt(r.get('peak_device_memory_validation_gib'), '.2f')} "
              f"| {fmt(r.get('estimated_peak_gib'), '.2f')} | {fmt(r.get('peak_host_memory_gib'), '.1f')} "
              f"| {fmt(r['seconds_to_first_step'], '.1f')} | {fmt(r['launch_to_first_step_s'], '.1f')} | {cache} "
              f"| {fmt(r['model_load_seconds'], '.1f')} | {fmt(r['achieved_tflops'], '.0f')} |")
    for r in results:
        if r.get("heldout_seconds"):
            first, *rest = r["heldout_seconds"]
            each = sorted(rest)[len(rest) // 2] if rest else first
            print(f"{r['row']}: held-out loss of {len(r['heldout_clips'])} clips: {fmt(each)} s an evaluation (median "
                  f"of those after the first, which took {fmt(first)} s with any compilation), "
                  f"{fmt(100 * each / (100 * r['median_step_time_s']), '.1f')} % of 100 steps at the median step; "
                  f"base model {fmt(r['base_heldout_loss'], '.5f')}, last {fmt(r['heldout_loss'], '.5f')}")
    for r in results:
        if "resumed" in r:
            print(f"{r['row']}: resumed at step {r['resumed']['resumed_at_step']} and trained to "
                  f"{r['resumed']['steps']}, median step {fmt(r['resumed']['median_step_time_s'])} s")


if __name__ == "__main__":
    main()
