"""Command line of train_cogvideox_lora.py, and the checks that need no model."""

import argparse
import importlib.util
import os
import re
from pathlib import Path

import torch

from . import frame_counts, launcher, text, writable
from .attention import BACKENDS
from .images import image_problem
from .recompute import POLICIES
from .settings import resume_path, split


def default_latent_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "cogvideox-lora", "latents")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default beside its help, except where the default is None: the flag's help says what then
    happens (a file that is used if present, the accelerate config's precision...), which "None" would hide."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """A refused command line is a closing message as the trainer's other refusals are: under accelerate launch it
    is written again after the launcher's report."""

    def exit(self, status=0, message=None):
        if status and message:
            launcher.repeat_after_launcher(message.rstrip("\n"))
        super().exit(status, message)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        description="Train a LoRA on a CogVideoX transformer from a folder of short clips.",
        formatter_class=HelpFormatter,
    )
    _add_model_flags(p)
    _add_data_flags(p)
    _add_vae_flags(p)
    _add_validation_flags(p)
    _add_training_flags(p)
    _add_memory_and_speed_flags(p)
    _add_checkpoint_flags(p)
    _add_example_flags(p)
    return p


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    model = p.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", required=True,
                       help="Hub id (e.g. THUDM/CogVideoX-2b) or local folder of a diffusers CogVideoX model.")
    model.add_argument("--revision", default=None,
                       help="Hub revision (branch, tag or commit) of the model (default: main).")
    model.add_argument("--variant", default=None,
                       help="Weights variant to load, e.g. fp16 (default: the plain weights files).")
    model.add_argument("--cache_dir", default=None,
                       help="The hub cache for models and --dataset_name datasets (default: huggingface_hub's). "
                            "Unlike the diffusers example, whose model loading ignores it, it is honoured for all.")
    model.add_argument("--ignore_learned_positional_embeddings", action="store_true",
                       help="CogVideoX-5B-I2V only: drop its learned positional embeddings, which fit 49x480x720 "
                            "alone, to train at other sizes on its rotary embeddings. Generate with the LoRA the "
                            "same way (cli_demo.py --ignore_learned_positional_embeddings).")


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    data = p.add_argument_group("data")
    data.add_argument("--instance_data_root", default=None,
                      help="Dataset folder holding the prompts file, the videos file and the clips; with "
                           "--dataset_name, the folder its clip paths are relative to (default: the dataset's own).")
    data.add_argument("--dataset_file", default=None,
                      help="A table (relative to --instance_data_root) with one row per clip, instead of the prompts "
                           "and videos files (default: none): CSV separated by commas, semicolons, tabs or bars (a "
                           "caption holding the separator in double quotes, as spreadsheets save it), a JSON array of "
                           "objects (.json) or JSON Lines (.jsonl); --caption_column and --video_column name its "
                           "columns (default caption, video).")
    data.add_argument("--caption_column", default=None,
                      help="File of prompts, one a line, relative to the root (default prompts.txt); "
                           "with --dataset_file, the column holding the prompt.")
    data.add_argument("--video_column", default=None,
                      help="File of clip paths relative to the root, one a line (default videos.txt); "
                           "with --dataset_file, the column holding the path.")
    data.add_argument("--image_column", default=None,
                      help="Image-to-video models: file of conditioning image paths relative to the root, one a line "
                           "beside videos.txt (default images.txt, used if it exists); with --dataset_file, the "
                           "column holding the path (default image, used if present). Without one, each clip's "
                           "first frame is its image.")
    data.add_argument("--id_token", default=None,
                      help="Identifier token put in front of every prompt, followed by a space (the diffusers "
                           "example glues it to the prompt without one). Default: none.")
    data.add_argument("--height", type=int, default=480, help="Frame height clips are resized and cropped to.")
    data.add_argument("--width", type=int, default=720, help="Frame width clips are resized and cropped to.")
    data.add_argument("--fps", type=int, default=8,
                      help="Frames per second clips are sampled at (from each clip's own rate: a 24 fps clip at 8 "
                           "gives every third frame, where the diffusers example takes consecutive frames); also "
                           "the rate of the validation videos.")
    data.add_argument("--max_num_frames", type=int, default=49,
                      help="Frames taken from each clip at --fps (4k+1, as the VAE compresses time 4x); a clip "
                           "that gives fewer is reported (see --skip_bad_videos).")
    data.add_argument("--skip_frames_start", type=int, default=0, help="Frames dropped from the start of each clip.")
    data.add_argument("--skip_frames_end", type=int, default=0, help="Frames dropped from the end of each clip.")
    data.add_argument("--video_reshape_mode", choices=["center", "random", "none"], default="center",
                      help="How frames reach --height x --width: resize keeping the aspect ratio, then crop at the "
                           "centre or at a random place (fixed per clip, as clips are encoded once); or 'none', "
                           "a plain resize that may distort.")
    data.add_argument("--height_buckets", type=int, nargs="+", default=None,
                      help="Frame heights of the size buckets (with --width_buckets: every pair is a bucket; "
                           "either defaults to --height/--width). Each clip goes to the bucket nearest its aspect "
                           "ratio and is resized and cropped to it without distortion; a batch is of one bucket.")
    data.add_argument("--width_buckets", type=int, nargs="+", default=None,
                      help="Frame widths of the size buckets (default: --width).")
    data.add_argument("--frame_buckets", type=int, nargs="+", default=None,
                      help="Clip lengths (4k+1) of the buckets: each clip takes the longest it can fill at --fps. "
                           "Default: --max_num_frames alone.")
    data.add_argument("--auto_buckets", action="store_true",
                      help="Size buckets from the data: each clip keeps its own aspect ratio at about "
                           "--height x --width pixels (multiples of 16).")
    data.add_argument("--random_flip", type=float, nargs="?", const=0.5, default=0.0,
                      help="Probability of training on the horizontally mirrored clip (both are encoded once); "
                           "the flag alone, as the diffusers example takes it, means 0.5.")
    data.add_argument("--noised_image_dropout", type=float, default=0.05,
                      help="Image-to-video models: probability that a step trains a clip without its (slightly "
                           "noised) conditioning image, which keeps the model able to follow the prompt alone.")
    data.add_argument("--caption_dropout", type=float, default=0.0,
                      help="Share of samples trained with the empty prompt instead of their own (seeded per sample, "
                           "as the rest of the data order), so the LoRA also learns the unconditional prediction "
                           "that classifier-free guidance uses.")
    data.add_argument("--skip_bad_videos", action="store_true",
                      help="Leave out clips that are missing, undecodable or too short, with a warning listing them, "
                           "instead of stopping.")
    data.add_argument("--dataloader_num_workers", type=int, default=0,
                      help="Worker processes that read and resize clips while the VAE encodes.")
    data.add_argument("--latent_cache_dir", default=default_latent_cache_dir(),
                      help="Where encoded clips and prompts are kept, so later runs on the same data skip "
                           "the VAE and T5.")


def _add_vae_flags(p: argparse.ArgumentParser) -> None:
    vae = p.add_argument_group("VAE")
    vae.add_argument("--enable_tiling", action="store_true", help="Encode and decode with VAE tiling (less memory).")
    vae.add_argument("--enable_slicing", action="store_true", help="Encode and decode with VAE slicing (less memory).")


def _add_validation_flags(p: argparse.ArgumentParser) -> None:
    val = p.add_argument_group("validation")
    val.add_argument("--validation_prompt", default=None,
                     help="Prompts for validation videos, split by --validation_prompt_separator. Default: none, "
                          "no validation videos; \"\" turns validation off where a script gives prompts.")
    val.add_argument("--validation_images", default=None,
                     help="Image-to-video models: the image each validation video starts from, one per validation "
                          "prompt, split by --validation_prompt_separator (needed with --validation_prompt; "
                          "default: none).")
    val.add_argument("--validation_prompt_separator", default=":::",
                     help="Separator between validation prompts, and between validation images.")
    val.add_argument("--num_validation_videos", type=int, default=1,
                     help="Videos generated per validation prompt; 0 turns validation off.")
    val.add_argument("--validation_epochs", type=int, default=None,
                     help="Validate every this many epochs (and always at the end). Default: at the end only, "
                          "unless --validation_steps.")
    val.add_argument("--validation_steps", type=int, default=None,
                     help="Validate every this many optimizer steps (and always at the end). Default: at the end "
                          "only, unless --validation_epochs.")
    val.add_argument("--validation_num_inference_steps", type=int, default=50,
                     help="Denoising steps of each validation video.")
    val.add_argument("--guidance_scale", type=float, default=6.0, help="Classifier-free guidance of validation videos.")
    val.add_argument("--use_dynamic_cfg", action="store_true", help="Use dynamic guidance in validation (as cli_demo).")
    val.add_argument("--validation_loss_steps", type=int, default=None,
                     help="Held-out loss: the denoising loss on clips the LoRA does not train on, every this many "
                          "optimizer steps, at every checkpoint and at the end (and the base model's once at the "
                          "start), at fixed timesteps with fixed noise, so values compare across steps and runs. "
                          "Needs --validation_dataset or --validation_split. Default: with either, at every "
                          "checkpoint and at the end (each evaluation of 8 clips costs about 11 steps of 2B).")
    val.add_argument("--validation_dataset", default=None,
                     help="Folder of held-out clips in the training data's format (prompts.txt and videos.txt, or "
                          "--dataset_file with the same columns), checked and encoded as the training clips are "
                          "(default: none).")
    val.add_argument("--validation_split", type=float, default=None,
                     help="Hold out this share of the training clips (chosen by --seed, listed in the log, not "
                          "trained on) for the held-out loss (default: none).")
    val.add_argument("--validation_loss_timesteps", type=int, default=4,
                     help="Timesteps, spread evenly over the schedule, at which each held-out clip is evaluated.")


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    train = p.add_argument_group("training")
    train.add_argument("--output_dir", default="cogvideox-lora", help="Where checkpoints, LoRA, videos and logs go.")
    train.add_argument("--no_comfyui_lora", action="store_true",
                       help="Write the LoRA (and each checkpoint's) in diffusers format only, without the copy in "
                            "core ComfyUI's format, pytorch_lora_weights_comfyui.safetensors, beside it.")
    train.add_argument("--seed", type=int, default=0,
                       help="Seed of the adapter's initial weights, data order, noise and validation videos.")
    train.add_argument("--rank", type=int, default=128, help="Dimension of the LoRA update matrices.")
    train.add_argument("--lora_alpha", type=float, default=128,
                       help="LoRA scale numerator: updates are scaled by lora_alpha / rank. Use rank or rank // 2.")
    train.add_argument("--lora_target_modules", default="to_q,to_k,to_v,to_out.0",
                       help="Layers of each transformer block that get an adapter: comma-separated module names "
                            "(peft's: a name matches the layers whose path ends with it, e.g. to_q, ff.net.2), or "
                            "all-linear (every Linear layer of the blocks: attention, feed-forward and the "
                            "adaptive norms' projections).")
    train.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                       help="Precision of the frozen model and of autocast; default: the accelerate config's "
                            "(`accelerate config`, or --mixed_precision of `accelerate launch`), 'no' without one.")
    train.add_argument("--train_batch_size", type=int, default=1, help="Clips per device per step.")
    train.add_argument("--num_train_epochs", type=int, default=1, help="Passes over the dataset.")
    train.add_argument("--max_train_steps", type=int, default=None,
                       help="Total optimizer steps; overrides --num_train_epochs (default: as many as "
                            "--num_train_epochs makes).")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1,
                       help="Batches whose gradients are summed before each optimizer step.")
    train.add_argument("--gradient_checkpointing", action="store_true",
                       help="Recompute activations in the backward pass: much less memory, slower steps.")
    train.add_argument("--learning_rate", type=float, default=1e-4, help="Peak learning rate.")
    train.add_argument("--lr_scheduler", default="constant",
                       choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                "constant_with_warmup"],
                       help="Learning rate schedule (diffusers.optimization).")
    train.add_argument("--lr_warmup_steps", type=int, default=0, help="Steps of linear warm-up.")
    train.add_argument("--lr_num_cycles", type=int, default=1, help="Cycles of cosine_with_restarts.")
    train.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial schedule.")
    train.add_argument("--optimizer", type=str.lower, choices=["adamw", "adam", "prodigy"], default="adamw",
                       help="Optimizer (case does not matter).")
    train.add_argument("--use_8bit_adam", action="store_true",
                       help="Use the 8-bit AdamW/Adam of bitsandbytes (needed to fit 5B on smaller GPUs).")
    train.add_argument("--adam_beta1", type=float, default=0.9, help="Adam beta1.")
    train.add_argument("--adam_beta2", type=float, default=0.95, help="Adam beta2.")
    train.add_argument("--adam_weight_decay", type=float, default=1e-4, help="Weight decay.")
    train.add_argument("--adam_epsilon", type=float, default=1e-8, help="Adam epsilon.")
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradients are clipped to this norm.")
    train.add_argument("--dry_run", action="store_true",
                       help="Check the data and settings, print the memory estimate, and exit before loading models.")
    train.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matrix products on Ampere and newer.")
    train.add_argument("--nccl_timeout", type=int, default=None,
                       help="Seconds a collective (gradient all-reduce, barrier) may wait for the other processes "
                            "before the run is ended; default: PyTorch's. Encoding and validation wait for each "
                            "other without this limit.")


def _add_memory_and_speed_flags(p: argparse.ArgumentParser) -> None:
    speed = p.add_argument_group("memory and speed")
    speed.add_argument("--attention_backend", choices=BACKENDS, default="auto",
                       help="Attention kernel of the transformer (training, validation): auto is FlashAttention-4 "
                            "where it is installed (pip install flash-attn-4) and runs (Hopper and Blackwell GPUs, "
                            "bf16/fp16), else PyTorch's SDPA with cuDNN first; flash4 insists on FlashAttention-4; the "
                            "others are PyTorch SDPA backends tried first, with the rest as fallbacks.")
    speed.add_argument("--checkpointing_policy", choices=POLICIES, default="full",
                       help="With --gradient_checkpointing, what each block keeps for its backward pass: full keeps "
                            "its input alone and recomputes everything (least memory); keep_attention also keeps its "
                            "attention output, so the recompute skips attention (faster, one more [tokens, width] "
                            "tensor a block).")
    speed.add_argument("--offload", choices=["none", "activations", "auto"], default="none",
                       help="activations: with --gradient_checkpointing, each block's checkpointed input waits in "
                            "pinned CPU memory until its recompute, copied on a side stream behind the compute. "
                            "auto: the least of gradient checkpointing, activation offloading and --blocks_to_swap "
                            "that fits --max_gpu_memory (validation videos included), said in the log before "
                            "any model loads.")
    speed.add_argument("--blocks_to_swap", type=int, default=0,
                       help="With --gradient_checkpointing: this many transformer blocks (evenly spread) keep their "
                            "frozen weights in pinned CPU memory and copy them to the GPU before their forward pass "
                            "and their recompute, the next one while the current one runs.")
    speed.add_argument("--max_gpu_memory", type=float, default=None,
                       help="The card's memory in GiB, as nvidia-smi counts it (an 8 GB card: 8); default: what the "
                            "GPU has free when the run starts (less, if less is free). The plan, --offload auto's "
                            "choice and the estimate count the CUDA context and kernels beside PyTorch's tensors, and "
                            "PyTorch's allocator is held to the card but them "
                            "(torch.cuda.set_per_process_memory_fraction).")
    speed.add_argument("--compile_blocks", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile each transformer block: faster steps and less memory, after a "
                            "compilation of about half a minute in the first step. Default: on with a GPU.")
    speed.add_argument("--base_weights_dtype", choices=["auto", "fp8"], default="auto",
                       help="Storage of the frozen transformer weights: 'auto' is the --mixed_precision dtype; "
                            "'fp8' keeps the attention and feed-forward weights as float8 with a scale per row "
                            "(5B: 5.6 GiB instead of 10.4) and computes in --mixed_precision.")
    speed.add_argument("--fp8_compute", default=None, metavar="linear",
                       help="Run these matrix products in float8 (GPUs with float8 tensor cores: Ada, Hopper, "
                            "Blackwell). 'linear': the frozen attention and feed-forward weights' products, with a "
                            "scale per token for the activations and per row for the weights (which are stored as "
                            "with --base_weights_dtype fp8); the adapter, norms and attention stay in bf16 (it needs "
                            "--mixed_precision bf16). Default: none.")


def _add_checkpoint_flags(p: argparse.ArgumentParser) -> None:
    ckpt = p.add_argument_group("checkpoints and logs")
    ckpt.add_argument("--checkpointing_steps", type=int, default=500,
                      help="Save a resumable checkpoint every this many optimizer steps.")
    ckpt.add_argument("--checkpointing_minutes", type=float, default=None,
                      help="Also save a checkpoint when this many minutes have passed since the last one (for "
                           "preemptible machines). Default: by steps alone.")
    ckpt.add_argument("--checkpoints_total_limit", type=int, default=None,
                      help="Keep at most this many checkpoints; older ones of this run are removed (default: "
                           "keep all; the best by held-out loss, with --validation_loss_steps, is kept).")
    ckpt.add_argument("--resume_from_checkpoint", default=None,
                      help="'latest' (the newest complete checkpoint in --output_dir, if any), a checkpoint folder, "
                           "or the name of one in --output_dir (checkpoint-N). Default: a new run.")
    ckpt.add_argument("--report_to", default="tensorboard",
                      help="Tracker for metrics and validation videos: tensorboard, wandb, comet_ml (or another of "
                           "accelerate's), all (those three) or none. One whose package is missing is an error "
                           "at the start.")
    ckpt.add_argument("--logging_dir", default="logs", help="Tracker folder, relative to --output_dir.")


def _add_example_flags(p: argparse.ArgumentParser) -> None:
    """The diffusers example scripts' flags this trainer has no other group for, with their meaning there."""
    example = p.add_argument_group("diffusers example compatibility")
    example.add_argument("--dataset_name", default=None,
                         help="A dataset repository on the Hugging Face Hub (OWNER/NAME), fetched into the hub "
                              "cache and read like a local folder: prompts.txt/videos.txt/videos/, or a table. With "
                              "--instance_data_root, its table's clip paths are read there. Default: none (a local "
                              "--instance_data_root).")
    example.add_argument("--dataset_config_name", default=None,
                         help="The config (subset) of --dataset_name: one of the `configs` of its README.md, or a "
                              "folder of that name (default: the dataset's top folder).")
    example.add_argument("--dataset_revision", default=None,
                         help="Branch, tag or commit of --dataset_name to pin (default: main).")
    example.add_argument("--scale_lr", action="store_true",
                         help="Multiply --learning_rate by --gradient_accumulation_steps x --train_batch_size x "
                              "processes.")
    example.add_argument("--prodigy_beta3", type=float, default=None,
                         help="Prodigy's beta3 (step size running average); default: the square root of beta2.")
    example.add_argument("--prodigy_decouple", action="store_true", help="Prodigy: AdamW-style weight decay.")
    example.add_argument("--prodigy_use_bias_correction", action="store_true", help="Prodigy: Adam's bias correction.")
    example.add_argument("--prodigy_safeguard_warmup", action="store_true",
                         help="Prodigy: leave the lr out of the D estimate's denominator during warm-up.")
    example.add_argument("--tracker_name", default="cogvideox-lora",
                         help="Project name of the run in the trackers (the TensorBoard subfolder of --logging_dir).")

    hub = p.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true",
                     help="At the end, upload the LoRA, its model card (README.md) and the validation videos to "
                          "--hub_model_id. Whether it can (logged in, not offline) is checked before training.")
    hub.add_argument("--hub_model_id", default=None,
                     help="Model repository to push to (OWNER/NAME, or NAME under your account); default: the "
                          "--output_dir folder's name.")
    hub.add_argument("--hub_token", default=None,
                     help="Token for the push; default: the `hf auth login` one or HF_TOKEN, which are better: a "
                          "token on the command line shows in the process list. It is never logged.")
    hub.add_argument("--push_checkpoints", action="store_true", help="Upload the checkpoint-N folders too.")


def _flag_values(args, *names) -> list[tuple[str, int]]:
    """(flag, value) for each value of the named flags, list-valued (buckets) or not."""
    pairs = []
    for name in names:
        value = getattr(args, name)
        pairs += [(name, v) for v in (value if isinstance(value, list) else [] if value is None else [value])]
    return pairs


def size_problem(name: str, value: int) -> str | None:
    """Why --name value cannot be a frame height or width (the trainer's and cli_demo.py's), or None."""
    if value > 0 and value % 16 == 0:
        return None
    lower = value // 16 * 16
    nearest = " or ".join(str(v) for v in (lower, lower + 16) if v >= 16) or "16"
    return f"--{name} {value} is not a multiple of 16 (VAE x8, patch x2): use {nearest}."


def _validation_problems(args) -> list[str]:
    """Validation prompts and images that do not pair up or cannot be read, unless validation is off
    (--validation_prompt "" or none, or --num_validation_videos 0: the ways to turn off the wrapper scripts'
    validation); and a --max_num_frames that validation videos cannot have exactly."""
    if args.num_validation_videos == 0:
        return []
    problems = []
    prompts = split(args.validation_prompt, args.validation_prompt_separator)
    images = [Path(p).expanduser() for p in split(args.validation_images, args.validation_prompt_separator)]
    if prompts and not frame_counts.training_problem("", args.max_num_frames):
        problem = frame_counts.generation_problem("--max_num_frames", args.max_num_frames)
        if problem:
            problems.append(f"{problem} (Validation videos are generated at --max_num_frames.)")
    if args.validation_prompt and not prompts:
        problems.append(f"--validation_prompt {args.validation_prompt!r} holds no prompt once split by "
                        f"{args.validation_prompt_separator!r}.")
    problems += [f"--validation_prompt: prompt {i} holds {', '.join(found)}, which a terminal does not show: "
                 f"delete it." for i, found in enumerate(map(text.invisible, prompts), start=1) if found]
    if images and len(images) != len(prompts):
        problems.append(f"--validation_images gives {len(images)} image(s) for {len(prompts)} --validation_prompt "
                        f"prompt(s): give one image per prompt, split by {args.validation_prompt_separator!r}.")
    return problems + [f"--validation_images: {p}: {problem}: give an image file Pillow opens (PNG, JPEG, WebP)."
                       for p, problem in ((p, image_problem(p)) for p in images) if problem]


def check_args(args) -> list[str]:
    """Settings that would fail later, said now, before any model is loaded."""
    problems = []
    problems += filter(None, (size_problem(name, value) for name, value in
                              _flag_values(args, "height", "width", "height_buckets", "width_buckets")))
    problems += filter(None, (frame_counts.training_problem(f"--{name}", value)
                              for name, value in _flag_values(args, "max_num_frames", "frame_buckets")))
    problems += _validation_problems(args)
    for name in ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "checkpointing_steps",
                 "rank", "fps", "max_train_steps", "checkpoints_total_limit", "validation_steps", "validation_epochs",
                 "nccl_timeout", "validation_loss_steps", "validation_loss_timesteps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            problems.append(f"--{name} must be at least 1, not {value}.")
    if args.num_validation_videos < 0:
        problems.append(f"--num_validation_videos must be 0 (no validation) or more, not {args.num_validation_videos}.")
    if args.lora_alpha <= 0:
        problems.append(f"--lora_alpha must be more than 0, not {args.lora_alpha:g}: the adapter's update is scaled "
                        f"by lora_alpha / rank, so it would train nothing. Use --rank ({args.rank}) or half of it.")
    if args.learning_rate <= 0:
        problems.append(f"--learning_rate must be more than 0, not {args.learning_rate:g} (1e-4 is usual for "
                        f"AdamW, 1.0 for Prodigy).")
    for name in ("random_flip", "noised_image_dropout", "caption_dropout"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            problems.append(f"--{name} {getattr(args, name)} is a probability: give a value from 0 to 1.")
    problems += heldout_problems(args)
    if args.checkpointing_minutes is not None and args.checkpointing_minutes <= 0:
        problems.append(f"--checkpointing_minutes must be more than 0, not {args.checkpointing_minutes}.")
    if not split(args.lora_target_modules, ","):
        problems.append(f"--lora_target_modules {args.lora_target_modules!r} names no module: give module names "
                        f"split by commas (e.g. to_q,to_k,to_v,to_out.0) or all-linear.")
    if not args.gradient_checkpointing:
        manual = [flag for flag, given in (("--checkpointing_policy keep_attention", args.checkpointing_policy != "full"),
                                           ("--offload activations", args.offload == "activations"),
                                           (f"--blocks_to_swap {args.blocks_to_swap}", args.blocks_to_swap)) if given]
        if manual:
            problems.append(f"{' and '.join(manual)} work(s) with --gradient_checkpointing: add it, or use --offload "
                            f"auto to choose checkpointing and offloading together.")
    if args.blocks_to_swap < 0:
        problems.append(f"--blocks_to_swap must be 0 or more, not {args.blocks_to_swap}.")
    if args.max_gpu_memory is not None and args.max_gpu_memory <= 0:
        problems.append(f"--max_gpu_memory must be more than 0 GiB, not {args.max_gpu_memory}.")
    if args.base_weights_dtype == "fp8" and args.mixed_precision == "no":
        problems.append("--base_weights_dtype fp8 computes in half precision: add --mixed_precision bf16.")
    problems += fp8_compute_problems(args.fp8_compute)
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        problems.append("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes (or drop the flag).")
    if args.optimizer == "prodigy" and importlib.util.find_spec("prodigyopt") is None:
        problems.append("--optimizer prodigy needs prodigyopt: pip install prodigyopt.")
    in_file = writable.lies_in_file("--output_dir", Path(args.output_dir))
    if in_file:
        problems.append(in_file)
    resume = resume_path(args.resume_from_checkpoint, args.output_dir)
    if resume and resume != "latest":
        if Path(resume).is_file():
            problems.append(_resume_file_problem(Path(resume)))
        elif not Path(resume).is_dir():
            problems.append(f"--resume_from_checkpoint {resume} does not exist: give a checkpoint-N folder of an "
                            f"earlier run, or 'latest'.")
        elif not re.fullmatch(r"checkpoint-\d+", Path(resume).name):
            problems.append(f"--resume_from_checkpoint {resume} is not a checkpoint-N folder written by this trainer.")
    return problems + example_problems(args)


def _resume_file_problem(path: Path) -> str:
    folder = next((p for p in path.parents if re.fullmatch(r"checkpoint-\d+", p.name)), None)
    if folder is None:
        return f"--resume_from_checkpoint {path} is a file: give a checkpoint-N folder of an earlier run, or 'latest'."
    return (f"--resume_from_checkpoint {path} is a file of the checkpoint {folder}: a checkpoint is its whole folder, "
            f"--resume_from_checkpoint {folder}")


def heldout_problems(args) -> list[str]:
    """The held-out loss needs its clips, and they come from one place."""
    problems = []
    sources = [f"--{name}" for name in ("validation_dataset", "validation_split") if getattr(args, name) is not None]
    if args.validation_loss_steps is not None and not sources:
        problems.append("--validation_loss_steps needs held-out clips: give --validation_dataset DIR (a folder in "
                        "the training data's format) or --validation_split FRACTION (of the training clips).")
    if len(sources) > 1:
        problems.append("--validation_dataset and --validation_split both choose the held-out clips: give one.")
    if args.validation_split is not None and not 0.0 < args.validation_split < 1.0:
        problems.append(f"--validation_split {args.validation_split} is a share of the training clips: give a "
                        f"value between 0 and 1, e.g. 0.1.")
    if args.validation_dataset is not None and not Path(args.validation_dataset).expanduser().is_dir():
        problems.append(f"--validation_dataset {args.validation_dataset} is not a folder: give the folder of the "
                        f"held-out clips, laid out as the training data is.")
    return problems


# The package each tracker of accelerate needs; tensorboardX serves for TensorBoard too.
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "comet_ml": ("comet_ml",),
                    "aim": ("aim",), "mlflow": ("mlflow",), "clearml": ("clearml",), "dvclive": ("dvclive",),
                    "swanlab": ("swanlab",), "trackio": ("trackio",)}
# What `--report_to all` meant in the diffusers example: the three trackers its help names.
ALL_TRACKERS = ("tensorboard", "wandb", "comet_ml")


def gpu_available() -> bool:
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return False
    return torch.cuda.is_available() or torch.backends.mps.is_available() or \
        (hasattr(torch, "xpu") and torch.xpu.is_available())


def example_problems(args) -> list[str]:
    """The checks of the flags the diffusers example brought: data source, trackers, fp16, the hub."""
    problems = []
    if not args.instance_data_root and not args.dataset_name:
        problems.append("No dataset: give --instance_data_root (a local folder) or --dataset_name (a hub dataset).")
    if args.report_to != "none":
        names = ALL_TRACKERS if args.report_to == "all" else [args.report_to]
        for name in names:
            if name not in TRACKER_PACKAGES:
                problems.append(f"--report_to {name}: no such tracker; use one of {', '.join(TRACKER_PACKAGES)}, "
                                f"all or none.")
            elif not any(importlib.util.find_spec(m) for m in TRACKER_PACKAGES[name]):
                problems.append(f"--report_to {args.report_to} needs the {name} package, which is not installed: "
                                f"pip install {TRACKER_PACKAGES[name][0]}, or report to another tracker "
                                f"(e.g. --report_to tensorboard) or none.")
    precision = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION")
    if precision == "fp16" and not gpu_available():
        problems.append("--mixed_precision fp16 needs a GPU (on a CPU there is no fp16 autocast): use "
                        "--mixed_precision bf16 or no.")
    return problems


# Settings named like credentials never reach a tracker. --id_token is a word put in prompts, not one.
_SECRET = re.compile(r"(?<!id_)token|secret|password|credential|api_key", re.IGNORECASE)


def tracker_config(args) -> dict:
    """The settings recorded with the run's metrics: plain values, and none that could be a credential."""
    return {name: value for name, value in vars(args).items()
            if isinstance(value, (int, float, str, bool)) and not _SECRET.search(name)}


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked for what needs neither a model, the data nor the network."""
    parser = build_parser()
    args = parser.parse_args(argv)
    problems = check_args(args)
    if problems:
        parser.error("\n  " + "\n  ".join(problems))
    return args


FP8_COMPUTE_PARTS = ("linear",)


def fp8_compute_problems(value: str | None) -> list[str]:
    """Only the parts named; whether the GPU and the precision can run them is fp8_compute.problem's (they are known
    once accelerate has started)."""
    if value is None:
        return []
    parts = split(value, ",")
    if not parts or any(p not in FP8_COMPUTE_PARTS for p in parts):
        return [f"--fp8_compute {value!r}: name {' or '.join(FP8_COMPUTE_PARTS)} (comma-separated)."]
    return []
