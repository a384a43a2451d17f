"""The transformer as training runs it: loaded frozen, with LoRA adapters, assembled in the one order that works.

The trainer, the benchmarks and the tests all build it here, so what they measure is the trainer's step.
"""

from dataclasses import dataclass

import torch
from accelerate.utils import set_seed
from peft import LoraConfig

from . import attention, fp8_compute, models
from .lora import add_lora, uncast_adapter_inputs
from .placement import Placement
from .settings import DEFAULT_LORA_TARGETS, ModelSource


@dataclass(frozen=True)
class TransformerSpec:
    """How the trained transformer is made: its frozen weights' precision and storage, the adapter, the attention
    kernel (an attention.Choice's kernel name, None for PyTorch's SDPA) and whether its blocks compile."""

    dtype: torch.dtype
    rank: int
    alpha: float
    seed: int = 0  # of the adapter's initial weights
    fp8_base_weights: bool = False
    fp8_linear: bool = False  # their products in float8 too (needs fp8_base_weights)
    drop_learned_positions: bool = False
    kernel: str | None = None
    compile: bool = False
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS  # module names or a preset (lora.resolve_targets)


def prepare(transformer, spec: TransformerSpec, placement: Placement) -> LoraConfig:
    """Turns a frozen transformer into the one training runs, on placement's device; returns the adapter's config.

    The order is the only one that works:
    1. the learned positional table goes first, while nothing refers to it;
    2. the frozen Linear weights become float8 (with float8 products where asked) before the adapter wraps them
       (peft's layers are no plain Linear, and the adapter's own weights must stay fp32);
    3. the adapter, seeded, so every process and every run with this seed starts from the same one;
    4. its inputs left uncast (peft's fp32 cast), which needs the adapter's layers;
    5. the attention processor, before checkpointing, whose keep_attention policy names its ops;
    6. the memory plan (block swap, then checkpointing, whose recompute loads the swapped blocks), before the
       move to the device, so that swapped blocks' weights stay on the host;
    7. the move to the device;
    8. compilation last, so that each block's graph holds all of the above.
    """
    if spec.drop_learned_positions:
        models.drop_learned_positional_embeddings(transformer)
    if spec.fp8_base_weights:
        models.store_base_weights_in_fp8(transformer, spec.dtype, placement.device)
    if spec.fp8_linear:
        fp8_compute.use_for_linears(transformer)
    set_seed(spec.seed)
    lora_config = add_lora(transformer, spec.rank, spec.alpha, spec.lora_targets)
    uncast_adapter_inputs(transformer, spec.dtype)
    attention.use(transformer, attention.Choice(spec.kernel, ""))
    placement.apply(transformer)
    transformer.to(placement.device)
    if spec.compile:
        models.compile_blocks(transformer)
    return lora_config


def build(source: ModelSource, spec: TransformerSpec, placement: Placement):
    """The model's transformer loaded frozen in spec.dtype and prepared for training: (transformer, LoRA config)."""
    transformer = models.load_transformer(source, spec.dtype).requires_grad_(False)
    return transformer, prepare(transformer, spec, placement)
