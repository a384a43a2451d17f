"""Generating videos with a CogVideoX model and, optionally, a LoRA: the logic behind cli_demo.py.

Everything goes through a stock diffusers pipeline, so a LoRA that works here works in any code that
calls `load_lora_weights`, and the other way round.
"""

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import CogVideoXDPMScheduler, CogVideoXImageToVideoPipeline, CogVideoXPipeline
from diffusers.utils import export_to_video

from . import attention, comfyui, frame_counts, models
from .checkpoints import complete_checkpoints, step_of
from .images import open_image
from .lora import LORA_WEIGHTS_NAME, TrainedOn
from .models import ModelError, drop_learned_positional_embeddings
from .settings import ModelSource

ADAPTER = "lora"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PIPELINES = {"t2v": CogVideoXPipeline, "i2v": CogVideoXImageToVideoPipeline}
OFFLOAD = ("none", "model", "sequential")

class InputError(ValueError):
    """An input of cli_demo.py that cannot work, found before any model loads; the message says how to fix it."""


class LoraMismatchError(InputError):
    """The LoRA was trained for another model than the one it is applied to."""


def load_pipeline(model_path: str, generate_type: str = "t2v", dtype: torch.dtype = torch.bfloat16,
                  ignore_learned_positional_embeddings: bool = False, attention_backend: str = "auto",
                  cache_dir: str | None = None):
    """ignore_learned_positional_embeddings: run CogVideoX-5B-I2V without its learned positional table, as the
    trainer does with the flag of that name (for a LoRA trained so, or for sizes other than 49x480x720).
    attention_backend: the trainer's --attention_backend; generate() runs under its SDPA preference.
    cache_dir: the trainer's --cache_dir: a hub model is looked for there, then in huggingface_hub's cache, as
    the trainer does (models.locate). Raises models.ModelError where it is not found."""
    source = models.locate(ModelSource(model_path, cache_dir=cache_dir), loading=True, flag="--model_path")
    pipe = PIPELINES[generate_type].from_pretrained(source.location, dtype=dtype, cache_dir=source.cache_dir)
    if ignore_learned_positional_embeddings and pipe.transformer.config.use_learned_positional_embeddings:
        drop_learned_positional_embeddings(pipe.transformer)
    attention.use(pipe.transformer, attention.choose(attention_backend, pipe.transformer.config.attention_head_dim,
                                                     dtype))
    # The sampler of CogVideo's own cli_demo, so that a seed gives the kind of video its authors show.
    pipe.scheduler = CogVideoXDPMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    return pipe


@dataclass
class Plan:
    """What to generate, settled from the model's configs, the LoRA's record and the command line before loading.
    notes: what was chosen for the user, to be said."""

    generate_type: str
    num_frames: int
    height: int
    width: int
    ignore_learned_positional_embeddings: bool
    lora_file: Path | None
    notes: list[str] = field(default_factory=list)


def plan(model_path: str, generate_type: str | None = None, lora_path: str | None = None,
         num_frames: int | None = None, height: int | None = None, width: int | None = None,
         ignore_learned_positional_embeddings: bool = False, allow_lora_mismatch: bool = False,
         cache_dir: str | None = None) -> Plan:
    """Checks that the model, the LoRA and the settings go together, reading configs and file headers only;
    raises InputError naming every problem. Unset settings come from the LoRA's training, else the model.
    cache_dir: the trainer's --cache_dir, where a hub model is looked for first (see load_pipeline)."""
    problems = []
    lora_file = family = None
    try:
        lora_file = resolve_lora(lora_path) if lora_path else None
    except InputError as e:
        problems.append(str(e))
    try:
        family, temporal_compression = model_family(model_path, cache_dir)
    except InputError as e:
        problems.append(str(e))
    if problems:
        raise InputError("\n  ".join(problems))
    trained_on = TrainedOn.read(lora_file) if lora_file else None
    chosen = Plan(_generate_type(family, model_path, generate_type), 0, 0, 0,
                  ignore_learned_positional_embeddings, lora_file)
    if generate_type is None and family.image_to_video:
        chosen.notes.append(f"{model_path} is an image-to-video model ({family.name}): generating i2v.")
    if trained_on is not None:
        _check_lora_fits(trained_on, family, model_path, lora_file, chosen, allow_lora_mismatch)
    _choose_size(chosen, family, trained_on, num_frames, height, width, temporal_compression)
    return chosen


def model_family(model_path: str, cache_dir: str | None = None):
    """(models.Family, the VAE's temporal compression) from the model's configs alone, found as the trainer
    finds them (models.check_model: one line naming what was looked for and how to get it)."""
    try:
        model = models.check_model(ModelSource(model_path, cache_dir=cache_dir), loading=True, flag="--model_path")
    except ModelError as e:
        raise InputError(str(e)) from None
    return model.family, model.vae["temporal_compression_ratio"]


def _generate_type(family, model_path: str, asked: str | None) -> str:
    if asked is not None and asked != family.generate_type:
        raise InputError(f"--generate_type {asked} does not fit {model_path}: it is a {family.name} model "
                         f"({'image' if family.image_to_video else 'text'}-to-video). Use --generate_type "
                         f"{family.generate_type}" + (" with --image_or_video_path" if family.image_to_video else "")
                         + ", or leave the flag out to have it chosen.")
    return family.generate_type


def _check_lora_fits(trained_on: TrainedOn, family, model_path: str, lora_file: Path, chosen: Plan,
                     allow: bool) -> None:
    """Refuses a LoRA trained on another kind of model (or says so, with allow); applies its training's
    --ignore_learned_positional_embeddings."""
    mismatches = []
    if (trained_on.generate_type, trained_on.version) != (family.generate_type, family.version):
        mismatches.append(f"the LoRA {lora_file} was trained on a {trained_on.family} model "
                          f"({trained_on.base_model}), but {model_path} is a {family.name} model")
    if family.learned_positions:
        if trained_on.ignore_learned_positional_embeddings and not chosen.ignore_learned_positional_embeddings:
            chosen.ignore_learned_positional_embeddings = True
            chosen.notes.append("The LoRA was trained with --ignore_learned_positional_embeddings: generating "
                                "without the learned positional embeddings too.")
        elif chosen.ignore_learned_positional_embeddings and not trained_on.ignore_learned_positional_embeddings:
            mismatches.append(f"the LoRA {lora_file} was trained with the model's learned positional embeddings, "
                              f"but --ignore_learned_positional_embeddings drops them")
    if not mismatches:
        return
    if not allow:
        raise LoraMismatchError("; ".join(mismatches) + ". Use the LoRA with the model it was trained on, or pass "
                                "--allow_lora_mismatch to apply it anyway.")
    chosen.notes += [f"warning: {m} (--allow_lora_mismatch: applied anyway)." for m in mismatches]


def _choose_size(chosen: Plan, family, trained_on: TrainedOn | None, num_frames, height, width,
                 temporal_compression: int) -> None:
    """Frames and size: as given, else the LoRA's training's (frames where the model can generate them), else the
    model's native ones; refuses a frame count the model cannot make and a size its learned positions refuse."""
    if trained_on is not None and None in (height, width):
        height, width = height or trained_on.height, width or trained_on.width
        chosen.notes.append(f"Generating at {width}x{height}, the size the LoRA was trained at.")
    if num_frames is None and trained_on is not None and \
            not frame_counts.generation_problem("", trained_on.frames, temporal_compression):
        num_frames = trained_on.frames
    chosen.num_frames = num_frames or family.native_frames
    chosen.height, chosen.width = height or family.native_height, width or family.native_width
    problem = frame_counts.generation_problem("--num_frames", chosen.num_frames, temporal_compression)
    if problem:
        raise InputError(problem)
    native = (family.native_height, family.native_width)
    if family.learned_positions and not chosen.ignore_learned_positional_embeddings and \
            (chosen.height, chosen.width) != native:
        raise InputError(f"{family.name} has learned positional embeddings made for {native[1]}x{native[0]} only: "
                         f"generate at that size (--height {native[0]} --width {native[1]}), or with "
                         f"--ignore_learned_positional_embeddings (for a LoRA trained so).")


# What may name a LoRA repo on the Hugging Face Hub rather than a local path: owner/name, neither "." nor "~" first.
_HUB_ID = re.compile(r"[\w-][\w.-]*/[\w.-]+")


def resolve_lora(lora_path: str) -> Path:
    """The LoRA file that lora_path names: the file itself, the LoRA file in a folder, or the one of a Hub repo
    (fetched into the Hub cache); raises InputError saying what is there instead."""
    path = Path(lora_path).expanduser()
    if path.is_dir():
        return _lora_file_in(path)
    if path.is_file():
        return _checked_lora_file(path)
    # A path whose first part is here ("out/lora" beside "out") is a local path that does not exist.
    if not _HUB_ID.fullmatch(lora_path) or lora_path.endswith(".safetensors") or Path(path.parts[0]).exists():
        raise InputError(f"LoRA not found: {lora_path} is neither a file nor a folder"
                         + ("" if path.is_absolute() else f" (relative to {Path.cwd()})") + ".")
    from huggingface_hub import hf_hub_download

    try:
        return _checked_lora_file(Path(hf_hub_download(lora_path, LORA_WEIGHTS_NAME)))
    except InputError:
        raise
    except Exception as e:  # huggingface_hub's errors: offline, no such repo or file, no network
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"LoRA not found: {lora_path} is not a file or folder here, and its {LORA_WEIGHTS_NAME} "
                         f"could not be fetched from the Hugging Face Hub ({type(e).__name__}: {reason}). Offline, "
                         f"a Hub LoRA must be in the cache already (hf download {lora_path}).") from None


def _lora_file_in(folder: Path) -> Path:
    if (folder / LORA_WEIGHTS_NAME).is_file():
        return _checked_lora_file(folder / LORA_WEIGHTS_NAME)
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return _checked_lora_file(files[0])
    checkpoints = [c for c in complete_checkpoints(folder) if (c / LORA_WEIGHTS_NAME).is_file()]
    if checkpoints:
        raise InputError(f"{folder} holds no final LoRA ({LORA_WEIGHTS_NAME}): the run stopped before its end. Its "
                         f"latest checkpoint holds the LoRA of step {step_of(checkpoints[-1])}: --lora_path "
                         f"{checkpoints[-1]}")
    raise InputError(f"{folder} holds no LoRA: no {LORA_WEIGHTS_NAME}" + (f", and {len(files)} .safetensors files "
                     f"to choose from: give the file" if files else "") + ".")


def _checked_lora_file(path: Path) -> Path:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # safetensors raises its own error types for files that are not its format
        raise InputError(f"{path} is not a LoRA file: it cannot be read as safetensors ({e}).") from None
    if not any("lora" in key for key in keys):
        raise InputError(f"{path} is not a LoRA: its tensors ({', '.join(keys[:2])}...) hold no lora_A/lora_B "
                         f"matrices. Give the LoRA the trainer wrote ({LORA_WEIGHTS_NAME}).")
    if comfyui.is_comfyui_lora(path):  # diffusers would load nothing of it
        raise InputError(
            f"{path} is a LoRA in core ComfyUI's layout, which diffusers does not load. Convert it: python -m "
            f"cogvideox_lora.comfyui to-diffusers {path} {path.with_name(path.stem + '_diffusers.safetensors')}, "
            f"and pass that file.")
    return path


def conditioning_image(path, height: int, width: int) -> tuple[torch.Tensor, str | None]:
    """The image an i2v video starts from, resized and centre-cropped as training and validation treat it (the
    pipeline would stretch it), and a note where its aspect ratio differs from the video's."""
    from .validation import load_validation_image

    image_height, image_width = open_image(path).shape[-2:]
    note = None
    if abs(image_width / image_height - width / height) > 0.01:
        note = (f"{path} is {image_width}x{image_height}, the video {width}x{height}: the image is resized and "
                f"centre-cropped to the video's aspect, as training does.")
    return load_validation_image(path, height, width), note


def load_lora(pipe, lora_file, scale: float = 1.0) -> float:
    """Loads a LoRA file (resolve_lora finds it) and returns the strength its update is applied with.

    diffusers reads rank and lora_alpha from the file's metadata and scales the update by alpha/rank, the
    strength it was trained at; set_adapters multiplies that by `scale` (peft's set_scale sets
    scale * alpha / rank). A file without metadata is applied at alpha/rank = 1, times `scale`.
    """
    try:
        pipe.load_lora_weights(str(lora_file), adapter_name=ADAPTER)
    except RuntimeError as e:
        mismatch = _shape_mismatch(pipe.transformer, pipe.lora_state_dict(str(lora_file)))
        if mismatch is None:
            raise
        key, lora_shape, model_shape = mismatch
        raise LoraMismatchError(
            f"The LoRA {lora_file} does not fit the model {pipe.name_or_path}: {key} has shape {lora_shape} in the "
            f"LoRA but this model needs {model_shape}. The LoRA was trained on a model of another size (e.g. "
            f"CogVideoX-5b against 2b); use it with the model it was trained on.") from e
    pipe.set_adapters([ADAPTER], [scale])
    config = pipe.transformer.peft_config[ADAPTER]
    return scale * config.lora_alpha / config.r


def _shape_mismatch(transformer, state_dict):
    """(LoRA key, its shape, the shape this transformer needs) of the first LoRA matrix that does not fit."""
    for key, tensor in state_dict.items():
        module_name, _, matrix = key.removeprefix("transformer.").partition(".lora_")
        if matrix not in ("A.weight", "B.weight"):
            continue
        try:
            layer = transformer.get_submodule(module_name)
        except AttributeError:  # a layer this model lacks: not a shape that differs
            continue
        out_features, in_features = getattr(layer, "base_layer", layer).weight.shape
        rank = tensor.shape[0] if matrix == "A.weight" else tensor.shape[1]
        needed = (rank, in_features) if matrix == "A.weight" else (out_features, rank)
        if tuple(tensor.shape) != needed:
            return key, tuple(tensor.shape), needed
    return None


def place(pipe, cpu_offload: str = "model", vae_tiling: bool = True, vae_slicing: bool = True) -> str:
    """Puts the pipeline on the GPU, whole or offloaded, or on the CPU where there is none; returns the device.

    Model offload keeps only the component that is running on the GPU (the transformer, T5 or the VAE in
    turn), for little loss of speed; sequential offload moves each layer in when it runs: the least
    memory, but many times slower. VAE tiling and slicing decode in pieces, which lowers the peak memory
    of the decode, CogVideoX's largest.
    """
    if vae_tiling:
        pipe.vae.enable_tiling()
    if vae_slicing:
        pipe.vae.enable_slicing()
    if not torch.cuda.is_available():
        return "cpu"
    if cpu_offload == "model":
        pipe.enable_model_cpu_offload()
    elif cpu_offload == "sequential":
        pipe.enable_sequential_cpu_offload()
    else:
        pipe.to("cuda")
    return "cuda"


def generate(pipe, prompt: str, image=None, num_frames: int = 49, height: int | None = None,
             width: int | None = None, num_inference_steps: int = 50, guidance_scale: float = 6.0,
             use_dynamic_cfg: bool = False, seed: int = 42) -> np.ndarray:
    """[F, H, W, 3] floats in [0, 1]. height and width default to the model's native size (480x720 for
    CogVideoX-2b and 5b). The noise comes from a CPU generator, so a seed gives the same video on any device.
    """
    extra = {} if image is None else {"image": image}
    return pipe(
        prompt=prompt,
        num_frames=num_frames,
        height=height,
        width=width,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        use_dynamic_cfg=use_dynamic_cfg,
        # The prompt is encoded to the length the transformer was trained with (226 tokens for the real models).
        max_sequence_length=pipe.transformer.config.max_text_seq_length,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **extra,
    ).frames[0]


def generate_comparison(pipe, prompt: str, **kwargs) -> np.ndarray:
    """The video without the LoRA on the left and with it on the right, from the same seed."""
    pipe.disable_lora()
    try:
        without = generate(pipe, prompt, **kwargs)
    finally:
        pipe.enable_lora()
    return np.concatenate([without, generate(pipe, prompt, **kwargs)], axis=2)


def save_video(frames: np.ndarray, output_path, fps: int = 8) -> Path:
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    export_to_video(list(frames), str(output_path), fps=fps)
    return output_path
