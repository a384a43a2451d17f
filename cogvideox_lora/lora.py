"""LoRA adapters on the transformer's attention projections, and saving them in diffusers format."""

import os
import tempfile
from pathlib import Path

import torch
from diffusers import CogVideoXPipeline
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from . import disk

TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def add_lora(transformer, rank: int, alpha: float) -> LoraConfig:
    """Adds a fresh adapter and keeps its weights in fp32, whatever dtype the frozen model has.

    The adapter's updates are small against the base weights: in bf16 many optimizer steps would
    round away, so the trainable weights and hence the optimizer states stay fp32 while the forward
    pass runs under autocast.
    """
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=TARGET_MODULES)
    transformer.add_adapter(config)
    for param in transformer.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.float32)
    # peft created the adapter in the base layer's dtype, which may be float8: draw it again in fp32.
    for module in transformer.modules():
        if isinstance(module, LoraLayer):
            module.reset_lora_parameters("default", init_lora_weights=True)
    return config


def uncast_adapter_inputs(transformer, weight_dtype: torch.dtype) -> None:
    """Stops peft from copying each adapter's input to the adapter's fp32, in a half-precision run (for good).

    Under autocast the adapter's matrix products run in the half dtype anyway, but peft's cast makes a
    full-size fp32 copy of the activations for every adapted projection, which autocast then copies
    back to half precision and keeps for the backward pass: several GiB at 49x480x720. Set once rather than
    through peft's context manager for it, which walks all modules on entering and leaving (14 ms on a 2-core
    CPU for 2B's 1,967 modules; the H200's trace showed a 4 ms GPU idle at each forward pass's start).
    """
    for module in transformer.modules():
        if isinstance(module, LoraLayer):
            module.cast_input_dtype_enabled = weight_dtype == torch.float32


def trainable_parameters(transformer) -> list[torch.nn.Parameter]:
    return [p for p in transformer.parameters() if p.requires_grad]


def lora_state_dict(transformer) -> dict[str, torch.Tensor]:
    return get_peft_model_state_dict(transformer)


def load_lora_state_dict(transformer, state_dict: dict[str, torch.Tensor]) -> None:
    result = set_peft_model_state_dict(transformer, state_dict)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"LoRA weights do not fit this transformer; unexpected keys such as {unexpected[:3]}")


def save_lora(transformer, directory, config: LoraConfig) -> Path:
    """Writes pytorch_lora_weights.safetensors that CogVideoXPipeline.load_lora_weights takes as is.

    The adapter's rank and alpha go into the file's metadata, so loaders apply alpha/rank, the strength
    it was trained at, without a hand-set scale.
    """
    path = Path(directory) / LORA_WEIGHTS_NAME

    def write(tmp):
        # diffusers names the file itself: it is written into a folder of its own beside the final one.
        with tempfile.TemporaryDirectory(dir=directory, prefix=".lora-") as folder:
            CogVideoXPipeline.save_lora_weights(folder, transformer_lora_layers=lora_state_dict(transformer),
                                                transformer_lora_adapter_metadata=config.to_dict())
            os.replace(Path(folder) / LORA_WEIGHTS_NAME, tmp)

    return disk.replace_atomically(path, write, f"the LoRA weights ({LORA_WEIGHTS_NAME})")
