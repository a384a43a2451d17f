#!/usr/bin/env python
"""Generate a video with CogVideoX, with or without a LoRA trained by train_cogvideox_lora.py.

    python cli_demo.py --prompt "a red car drives along a coastal road" --lora_path cogvideox-lora
    python cli_demo.py --prompt "..." --lora_path cogvideox-lora --compare   # without | with, side by side
    python cli_demo.py --prompt "..." --model_path THUDM/CogVideoX-5b-I2V --generate_type i2v \
        --image_or_video_path first.png --lora_path my-i2v-lora

The LoRA is applied at the strength it was trained at (lora_alpha / rank, read from the file), times
--lora_scale. Any LoRA that diffusers' load_lora_weights takes works: a folder, a .safetensors file or a
Hub repo. Everything is checked before the model loads: the model's type (t2v or i2v) is read from its
configs, a LoRA of this trainer must have been trained on that kind of model, and sizes, frame counts,
the image and the output path must work.
"""

import argparse
import sys
from pathlib import Path

from cogvideox_lora import attention, inference
from cogvideox_lora.args import size_problem
from cogvideox_lora.images import image_problem

# What the written video may be: the containers export_to_video's ffmpeg writes H.264 into.
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompt", required=True, help="What the video shows.")
    p.add_argument("--model_path", default="THUDM/CogVideoX-2b",
                   help="Hub id or local folder of a diffusers CogVideoX model (an I2V one for --generate_type i2v).")
    p.add_argument("--cache_dir", default=None,
                   help="The trainer's --cache_dir: a hub model is looked for there first, then in the Hugging Face "
                        "cache (HF_HUB_CACHE), and downloaded into it if in neither.")
    p.add_argument("--lora_path", default=None,
                   help="The trainer's --output_dir, a LoRA .safetensors file or a Hub repo holding one.")
    p.add_argument("--lora_scale", type=float, default=1.0,
                   help="Multiplies the trained strength (alpha/rank, applied automatically): 0 is the model "
                        "without the LoRA, 1 as trained, more exaggerates it.")
    p.add_argument("--compare", action="store_true",
                   help="Also generate without the LoRA from the same seed, and write both side by side "
                        "(left without, right with), twice as wide.")
    p.add_argument("--generate_type", choices=sorted(inference.PIPELINES), default=None,
                   help="t2v: from the prompt alone; i2v: from the prompt and --image_or_video_path, which is "
                        "resized and centre-cropped to the video's size as training does. Default: the model's "
                        "type, read from its config.")
    p.add_argument("--image_or_video_path", default=None, help="The image an i2v video starts from.")
    p.add_argument("--ignore_learned_positional_embeddings", action="store_true",
                   help="CogVideoX-5B-I2V: run without its learned positional embeddings, as a LoRA trained with "
                        "the trainer's flag of that name must be (and as other sizes than 49x480x720 need).")
    p.add_argument("--num_inference_steps", type=int, default=50, help="Denoising steps.")
    p.add_argument("--guidance_scale", type=float, default=6.0, help="Classifier-free guidance.")
    p.add_argument("--use_dynamic_cfg", action="store_true",
                   help="Raise the guidance along the denoising (CogVideo's cli_demo uses it with this scheduler).")
    p.add_argument("--num_frames", type=int, default=None,
                   help="Frames to generate: 8k+1 (9, 17, ..., 49, 81), the counts CogVideoX makes exactly. Default: "
                        "the LoRA's training length where it is one of those, else the model's native one.")
    p.add_argument("--height", type=int, default=None,
                   help="Frame height, a multiple of 16; default the LoRA's training height, else the model's "
                        "native one (480 for CogVideoX-2b and 5b).")
    p.add_argument("--width", type=int, default=None,
                   help="Frame width, a multiple of 16; default the LoRA's training width, else the model's native "
                        "one (720 for CogVideoX-2b and 5b).")
    p.add_argument("--allow_lora_mismatch", action="store_true",
                   help="Apply a LoRA trained on another kind of model (T2V against I2V, 1.0 against 1.5) with a "
                        "warning instead of refusing it.")
    p.add_argument("--fps", type=int, default=8, help="Frame rate of the written video.")
    p.add_argument("--seed", type=int, default=42, help="Seed of the initial noise.")
    p.add_argument("--dtype", choices=sorted(inference.DTYPES), default="bfloat16",
                   help="Precision of the model (float16 suits CogVideoX-2b, bfloat16 the others).")
    p.add_argument("--output_path", default="./output.mp4",
                   help=f"The video file to write ({', '.join(VIDEO_SUFFIXES)}).")
    p.add_argument("--attention_backend", choices=attention.BACKENDS, default="auto",
                   help="Attention kernel, as the trainer's flag: auto is FlashAttention-4 where it is installed and "
                        "runs, else PyTorch's SDPA with cuDNN first.")
    p.add_argument("--cpu_offload", choices=inference.OFFLOAD, default="model",
                   help="With a GPU, how much of the model waits in CPU memory: none (fastest, most GPU memory), "
                        "model (only the running component on the GPU; small slowdown) or sequential (one layer "
                        "at a time: least memory, much slower). Without a GPU everything runs on the CPU.")
    p.add_argument("--vae_tiling", action=argparse.BooleanOptionalAction, default=True,
                   help="Decode the video in overlapping tiles: far less memory.")
    p.add_argument("--vae_slicing", action=argparse.BooleanOptionalAction, default=True,
                   help="Decode one video of a batch at a time: less memory.")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    problems = input_problems(args)
    if problems:
        parser.error("\n  ".join(problems))
    return args


def input_problems(args) -> list[str]:
    """What in the command line alone cannot work, each with its fix, before anything loads."""
    problems = []
    if args.generate_type == "i2v" and not args.image_or_video_path:
        problems.append("--generate_type i2v needs --image_or_video_path, the image the video starts from.")
    if args.image_or_video_path:
        problem = image_problem(Path(args.image_or_video_path))
        if problem:
            problems.append(f"--image_or_video_path {args.image_or_video_path}: {problem}: give a PNG, JPEG or "
                            f"WebP image.")
    if args.compare and not args.lora_path:
        problems.append("--compare needs --lora_path: it sets the video without the LoRA beside the one with it.")
    problems += filter(None, (size_problem(name, getattr(args, name)) for name in ("height", "width")
                              if getattr(args, name) is not None))
    output = Path(args.output_path)
    if output.is_dir() or args.output_path.endswith(("/", "\\")):
        problems.append(f"--output_path {args.output_path} is a folder: name the video file, e.g. "
                        f"{output / 'output.mp4'}.")
    elif output.suffix.lower() not in VIDEO_SUFFIXES:
        problems.append(f"--output_path {args.output_path}: name a video file ending in {', '.join(VIDEO_SUFFIXES)}, "
                        f"e.g. {output.with_suffix('.mp4')}.")
    return problems


def main(argv=None) -> Path:
    args = parse_args(argv)
    try:
        chosen = inference.plan(args.model_path, args.generate_type, args.lora_path, args.num_frames, args.height,
                                args.width, args.ignore_learned_positional_embeddings, args.allow_lora_mismatch,
                                args.cache_dir)
        if chosen.generate_type == "i2v" and not args.image_or_video_path:
            raise inference.InputError(f"{args.model_path} is an image-to-video model: give --image_or_video_path, "
                                       f"the image the video starts from.")
        image = None
        if chosen.generate_type == "i2v":
            image, note = inference.conditioning_image(args.image_or_video_path, chosen.height, chosen.width)
            chosen.notes += [note] if note else []
        for note in chosen.notes:
            print(note)
        pipe = inference.load_pipeline(args.model_path, chosen.generate_type, inference.DTYPES[args.dtype],
                                       chosen.ignore_learned_positional_embeddings, args.attention_backend,
                                       args.cache_dir)
        if chosen.lora_file:
            strength = inference.load_lora(pipe, chosen.lora_file, args.lora_scale)
            print(f"LoRA {chosen.lora_file}: applied at {strength:g} (its alpha/rank x --lora_scale "
                  f"{args.lora_scale:g})")
    except (inference.InputError, attention.AttentionError) as e:
        sys.exit(f"error: {e}")
    device = inference.place(pipe, args.cpu_offload, args.vae_tiling, args.vae_slicing)
    print(f"Generating {chosen.num_frames} frames of {chosen.width}x{chosen.height} on {device}")

    settings = dict(num_frames=chosen.num_frames, height=chosen.height, width=chosen.width, image=image,
                    num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                    use_dynamic_cfg=args.use_dynamic_cfg, seed=args.seed)
    with attention.preferred_sdpa(args.attention_backend):
        if args.compare:
            frames = inference.generate_comparison(pipe, args.prompt, **settings)
        else:
            frames = inference.generate(pipe, args.prompt, **settings)
    path = inference.save_video(frames, args.output_path, args.fps)
    print(f"Video saved to {path}" + (" (left: without the LoRA, right: with it)" if args.compare else ""))
    return path


if __name__ == "__main__":
    main()
