"""Generating videos with a CogVideoX model and, optionally, a LoRA: the logic behind cli_demo.py.

Everything goes through a stock diffusers pipeline, so a LoRA that works here works in any code that
calls `load_lora_weights`, and the other way round.
"""

import re
from pathlib import Path

import numpy as np
import torch
from diffusers import CogVideoXDPMScheduler, CogVideoXImageToVideoPipeline, CogVideoXPipeline
from diffusers.utils import export_to_video

from . import attention, models
from .models import drop_learned_positional_embeddings
from .settings import ModelSource

ADAPTER = "lora"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PIPELINES = {"t2v": CogVideoXPipeline, "i2v": CogVideoXImageToVideoPipeline}
OFFLOAD = ("none", "model", "sequential")

# What may name a LoRA repo on the Hugging Face Hub rather than a local path.
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


class LoraMismatchError(ValueError):
    """The LoRA was trained for a model of another size."""


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


def check_lora_path(lora_path: str) -> None:
    """Fails at once on a local path that does not exist, before minutes go into loading the model.

    Anything shaped like `owner/name` may be a Hub repo and is left for load_lora to try.
    """
    if not Path(lora_path).exists() and (not _HUB_ID.fullmatch(lora_path) or lora_path.endswith(".safetensors")):
        raise FileNotFoundError(f"LoRA not found: {lora_path} is neither a file nor a folder.")


def load_lora(pipe, lora_path: str, scale: float = 1.0) -> float:
    """Loads a LoRA (a folder holding pytorch_lora_weights.safetensors, the file itself, or a Hub repo) and
    returns the strength its update is applied with.

    diffusers reads rank and lora_alpha from the file's metadata and scales the update by alpha/rank, the
    strength it was trained at; set_adapters multiplies that by `scale` (peft's set_scale sets
    scale * alpha / rank). A file without metadata is applied at alpha/rank = 1, times `scale`.
    """
    check_lora_path(lora_path)
    try:
        pipe.load_lora_weights(lora_path, adapter_name=ADAPTER)
    except RuntimeError as e:
        mismatch = _shape_mismatch(pipe.transformer, pipe.lora_state_dict(lora_path))
        if mismatch is None:
            raise
        key, lora_shape, model_shape = mismatch
        raise LoraMismatchError(
            f"The LoRA {lora_path} does not fit the model {pipe.name_or_path}: {key} has shape {lora_shape} in the "
            f"LoRA but this model needs {model_shape}. The LoRA was trained on a model of another size (e.g. "
            f"CogVideoX-5b against 2b); use it with the model it was trained on.") from e
    except (OSError, ValueError) as e:
        if Path(lora_path).exists():
            raise
        raise FileNotFoundError(f"LoRA not found: {lora_path} is neither a file nor a folder here, and loading it "
                                f"from the Hugging Face Hub failed: {e}") from e
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
