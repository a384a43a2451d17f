#!/usr/bin/env python
"""Generate a video with CogVideoX, with or without a LoRA trained by train_cogvideox_lora.py.

    python cli_demo.py --prompt "a red car drives along a coastal road" --lora_path cogvideox-lora
    python cli_demo.py --prompt "..." --lora_path cogvideox-lora --compare   # without | with, side by side
    python cli_demo.py --prompt "..." --model_path THUDM/CogVideoX-5b-I2V --generate_type i2v \
        --image_or_video_path first.png --lora_path my-i2v-lora

The LoRA is applied at the strength it was trained at (lora_alpha / rank, read from the file), times
--lora_scale. Any LoRA that diffusers' load_lora_weights takes works: a folder, a .safetensors file or a
Hub repo.
"""

import argparse
import sys
from pathlib import Path

from diffusers.utils import load_image

from cogvideox_lora import attention, inference, models


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
    p.add_argument("--generate_type", choices=sorted(inference.PIPELINES), default="t2v",
                   help="t2v: from the prompt alone; i2v: from the prompt and --image_or_video_path.")
    p.add_argument("--image_or_video_path", default=None, help="The image an i2v video starts from.")
    p.add_argument("--ignore_learned_positional_embeddings", action="store_true",
                   help="CogVideoX-5B-I2V: run without its learned positional embeddings, as a LoRA trained with "
                        "the trainer's flag of that name must be (and as other sizes than 49x480x720 need).")
    p.add_argument("--num_inference_steps", type=int, default=50, help="Denoising steps.")
    p.add_argument("--guidance_scale", type=float, default=6.0, help="Classifier-free guidance.")
    p.add_argument("--use_dynamic_cfg", action="store_true",
                   help="Raise the guidance along the denoising (CogVideo's cli_demo uses it with this scheduler).")
    p.add_argument("--num_frames", type=int, default=49, help="Frames to generate (4k+1).")
    p.add_argument("--height", type=int, default=None,
                   help="Frame height; default the model's native one (480 for CogVideoX-2b and 5b).")
    p.add_argument("--width", type=int, default=None,
                   help="Frame width; default the model's native one (720 for CogVideoX-2b and 5b).")
    p.add_argument("--fps", type=int, default=8, help="Frame rate of the written video.")
    p.add_argument("--seed", type=int, default=42, help="Seed of the initial noise.")
    p.add_argument("--dtype", choices=sorted(inference.DTYPES), default="bfloat16",
                   help="Precision of the model (float16 suits CogVideoX-2b, bfloat16 the others).")
    p.add_argument("--output_path", default="./output.mp4", help="Where the mp4 is written.")
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
    if args.generate_type == "i2v" and not args.image_or_video_path:
        parser.error("--generate_type i2v needs --image_or_video_path, the image the video starts from.")
    if args.image_or_video_path and not Path(args.image_or_video_path).is_file():
        parser.error(f"--image_or_video_path {args.image_or_video_path} is not a file.")
    if args.compare and not args.lora_path:
        parser.error("--compare needs --lora_path: it sets the video without the LoRA beside the one with it.")
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    try:
        if args.lora_path:
            inference.check_lora_path(args.lora_path)
        pipe = inference.load_pipeline(args.model_path, args.generate_type, inference.DTYPES[args.dtype],
                                       args.ignore_learned_positional_embeddings, args.attention_backend,
                                       args.cache_dir)
        if args.lora_path:
            strength = inference.load_lora(pipe, args.lora_path, args.lora_scale)
            print(f"LoRA {args.lora_path}: applied at {strength:g} (its alpha/rank x --lora_scale {args.lora_scale:g})")
    except (FileNotFoundError, inference.LoraMismatchError, attention.AttentionError, models.ModelError) as e:
        sys.exit(f"error: {e}")
    device = inference.place(pipe, args.cpu_offload, args.vae_tiling, args.vae_slicing)
    print(f"Generating on {device}")

    settings = dict(num_frames=args.num_frames, height=args.height, width=args.width,
                    num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                    use_dynamic_cfg=args.use_dynamic_cfg, seed=args.seed)
    if args.generate_type == "i2v":
        settings["image"] = load_image(args.image_or_video_path)
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
