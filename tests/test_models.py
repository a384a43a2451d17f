"""Model parts (models.py): the family read from the configs, and compiled blocks and float8 base weights, which
compute the plain path's step."""

import copy

import pytest
import torch
from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline, CogVideoXTransformer3DModel

from cogvideox_lora import models, synthetic
from cogvideox_lora.models import Family, ModelError
from cogvideox_lora.settings import ModelSource
from cogvideox_lora.lora import lora_state_dict, load_lora_state_dict
from helpers import BF16, assert_same_step, load_tiny, step


@pytest.mark.slow
def test_compiled_blocks_give_the_plain_step(plain, batch):
    compiled = copy.deepcopy(plain)
    models.compile_blocks(compiled)
    # Both as the trainer runs them: compiled blocks with uncast adapter inputs.
    assert_same_step(step(plain, batch), step(compiled, batch, uncast=True), tolerance=1e-2)


@pytest.mark.slow
def test_float8_base_weights_stay_close_to_bf16(tiny_model_dir, plain, batch):
    fp8 = load_tiny(tiny_model_dir, fp8=True)
    load_lora_state_dict(fp8, lora_state_dict(plain))
    block = fp8.transformer_blocks[0]
    assert block.attn1.to_q.base_layer.weight.dtype == torch.float8_e4m3fn
    assert block.ff.net[2].weight.dtype == torch.float8_e4m3fn
    assert block.norm1.linear.weight.dtype == BF16  # the modulation stays in the compute dtype
    assert all(p.dtype == torch.float32 for p in fp8.parameters() if p.requires_grad)
    # A weight survives the round trip to scaled float8 within its 3-bit mantissa (relative 2^-4).
    reference = plain.transformer_blocks[0].ff.net[2]
    restored = block.ff.net[2].weight.to(BF16) * block.ff.net[2].weight_scale
    big = reference.weight.abs() > reference.weight.abs().amax(dim=1, keepdim=True) / 8
    assert ((restored - reference.weight).abs()[big] / reference.weight.abs()[big]).max() <= 2**-4 + 2**-8
    # Rounding every base weight by up to 6 % moves the step by a few percent at most.
    assert_same_step(step(plain, batch, uncast=True), step(fp8, batch, uncast=True), tolerance=0.05)

    compiled = copy.deepcopy(fp8)
    models.compile_blocks(compiled)
    assert_same_step(step(fp8, batch, uncast=True), step(compiled, batch, uncast=True), tolerance=1e-2)


def test_the_family_is_read_from_the_configs(tiny_model_dir, tiny_5b_model_dir):
    transformer, vae, text_encoder, family = models.read_configs(ModelSource(str(tiny_model_dir)))
    assert family.pipeline_class is CogVideoXPipeline and family.name == "CogVideoX T2V"
    assert not family.image_to_video and not family.trained_in_bf16 and family.patch_size_t is None
    assert (family.native_frames, family.native_height, family.native_width) == (49, 48, 64)
    assert text_encoder["d_model"] == 32
    # Rotary position embeddings mark the 5B family, trained in bf16.
    assert models.read_configs(ModelSource(str(tiny_5b_model_dir)))[3].trained_in_bf16
    # Twice the input channels is image-to-video, whatever model_index.json says.
    with pytest.raises(models.ModelError, match="which is a CogVideoXImageToVideoPipeline model"):
        models.Family.from_configs({**transformer, "in_channels": 8}, vae, "CogVideoXPipeline", "here")
    i2v = models.Family.from_configs({**transformer, "in_channels": 8}, vae, "CogVideoXImageToVideoPipeline", "here")
    assert i2v.image_to_video and i2v.pipeline_class is CogVideoXImageToVideoPipeline


@pytest.mark.parametrize("size, image_to_video, patch_size_t, ofs, learned", [
    ("5b", False, None, False, False), ("5b-i2v", True, None, False, True), ("1.5-5b", False, 2, False, False),
    ("1.5-5b-i2v", True, 2, True, False)])
def test_real_size_families(size, image_to_video, patch_size_t, ofs, learned):
    # On the meta device nothing is allocated: the real sizes are checked without their memory.
    spec = synthetic.SPECS[size]
    with torch.device("meta"):
        transformer = CogVideoXTransformer3DModel(**spec["transformer"])
    assert sum(p.numel() for p in transformer.parameters()) == pytest.approx(5.57e9, rel=0.01)
    vae = {"block_out_channels": (128, 256, 256, 512), "scaling_factor": 0.7, **spec["vae"]}
    pipeline = "CogVideoXImageToVideoPipeline" if image_to_video else "CogVideoXPipeline"
    family = Family.from_configs(dict(transformer.config), vae, pipeline, size)
    assert (family.image_to_video, family.patch_size_t, family.ofs, family.learned_positions) == (
        image_to_video, patch_size_t, ofs, learned)
    assert family.image_latent_scale == pytest.approx(1 / 0.7 if patch_size_t else 0.7)
    if learned:
        assert (family.native_frames, family.native_height, family.native_width) == (49, 480, 720)
    with pytest.raises(ModelError, match="model_index.json names"):
        Family.from_configs(dict(transformer.config), vae, "CogVideoXPipeline" if image_to_video else
                            "CogVideoXImageToVideoPipeline", size)
