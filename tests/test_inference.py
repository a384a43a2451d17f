"""Generating with a LoRA (inference.py, behind cli_demo.py): a missing LoRA is named before the model loads, and a
LoRA loads at the strength it was trained at."""

import pytest
import torch
from diffusers import CogVideoXDPMScheduler, CogVideoXTransformer3DModel

from cogvideox_lora import attention, inference
from cogvideox_lora.lora import add_lora, save_lora


def test_a_missing_local_lora_fails_at_once_and_a_hub_id_is_left_to_the_hub(tmp_path, monkeypatch):
    for missing in (str(tmp_path / "nothing"), "me/lora.safetensors", "weights.safetensors"):
        with pytest.raises(inference.InputError, match=f"LoRA not found: {missing} is neither"):
            inference.resolve_lora(missing)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(inference.InputError, match="could not be fetched from the Hugging Face Hub"):
        inference.resolve_lora("me/my-lora")
    with pytest.raises(inference.InputError, match="holds no LoRA"):
        inference.resolve_lora(str(tmp_path))


def test_the_lora_loads_at_its_trained_strength_times_the_scale(tmp_path, tiny_model_dir):
    transformer = CogVideoXTransformer3DModel.from_pretrained(tiny_model_dir, subfolder="transformer")
    lora_config = add_lora(transformer, rank=4, alpha=8)
    for name, param in transformer.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn_like(param)
    save_lora(transformer, tmp_path, lora_config)

    pipe = inference.load_pipeline(str(tiny_model_dir), dtype=torch.float32, attention_backend="math")
    assert isinstance(pipe.scheduler, CogVideoXDPMScheduler) and pipe.scheduler.config.timestep_spacing == "trailing"
    assert isinstance(pipe.transformer.transformer_blocks[0].attn1.processor, attention.CogVideoXAttnProcessor)
    assert inference.load_lora(pipe, str(tmp_path), scale=0.5) == pytest.approx(0.5 * 8 / 4)
    layer = pipe.transformer.transformer_blocks[0].attn1.to_q
    assert layer.scaling[inference.ADAPTER] == pytest.approx(1.0)
    assert torch.equal(layer.lora_B[inference.ADAPTER].weight, transformer.transformer_blocks[0].attn1.to_q.lora_B[
        "default"].weight)
