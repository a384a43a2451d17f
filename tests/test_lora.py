"""LoRA adapters (lora.py): their inputs left uncast in half precision, as the trainer's fast path runs them."""

import torch
from diffusers import CogVideoXTransformer3DModel

from cogvideox_lora.lora import add_lora, uncast_adapter_inputs
from helpers import BF16, assert_same_step, step


def test_uncast_adapter_inputs_give_the_plain_step(plain, batch):
    assert_same_step(step(plain, batch), step(plain, batch, uncast=True), tolerance=1e-2)


def test_adapter_inputs_are_uncast_only_in_half_precision():
    from peft.tuners.lora import LoraLayer

    from cogvideox_lora import synthetic

    transformer = CogVideoXTransformer3DModel(**{**synthetic.SPECS["tiny"]["transformer"], "num_layers": 1})
    add_lora(transformer, 4, 4)
    layers = [m for m in transformer.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 4 and all(m.cast_input_dtype_enabled for m in layers)
    uncast_adapter_inputs(transformer, BF16)
    assert not any(m.cast_input_dtype_enabled for m in layers)
    uncast_adapter_inputs(transformer, torch.float32)
    assert all(m.cast_input_dtype_enabled for m in layers)
