"""The trained transformer's assembly (transformer.py): the one order of fp8 weights, adapter, attention, memory
plan, device and compilation, which the trainer, the benchmarks and the tests share."""

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from peft.tuners.lora import LoraLayer

from cogvideox_lora import attention, models, synthetic
from cogvideox_lora.memory import Plan
from cogvideox_lora.placement import Placement
from cogvideox_lora.transformer import TransformerSpec, prepare
from helpers import max_abs_diff, run_script, summary, train_argv


@pytest.mark.slow
@pytest.mark.parametrize("float8", [["--base_weights_dtype", "fp8"], ["--fp8_compute", "linear"]])
def test_float8_compiled_run_trains_and_validates(tmp_path, tiny_model_dir, tiny_dataset_dir, float8):
    out = tmp_path / "out"
    result = run_script(train_argv(tiny_model_dir, tiny_dataset_dir, out, tmp_path / "cache",
                                    "--max_train_steps", 2, "--mixed_precision", "bf16", *float8, "--compile_blocks",
                                    "--validation_prompt", "a red square"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert ("Compute: float8 products" in result.stderr) == ("--fp8_compute" in float8)
    assert summary(out)["steps"] == 2 and len(summary(out)["validation_videos"]) == 1
    assert (out / "pytorch_lora_weights.safetensors").exists()


def tiny_bf16_transformer():
    config = synthetic.SPECS["tiny"]["transformer"]
    return CogVideoXTransformer3DModel(**config).to(torch.bfloat16).requires_grad_(False)


def test_prepare_stores_float8_under_an_fp32_adapter_and_compiles_last(monkeypatch):
    seen = {}

    def compile_blocks(transformer):
        # What the compiled graphs would hold: everything else is in place by now.
        block = transformer.transformer_blocks[0]
        seen["adapter"] = isinstance(block.attn1.to_q, LoraLayer)
        seen["processor"] = isinstance(block.attn1.processor, attention.CogVideoXAttnProcessor)
        seen["checkpointed"] = "forward" in vars(block)  # recompute.inside wraps each block's forward
        seen["device"] = {p.device.type for p in transformer.parameters()}

    monkeypatch.setattr(models, "compile_blocks", compile_blocks)
    transformer = tiny_bf16_transformer()
    spec = TransformerSpec(torch.bfloat16, rank=4, alpha=8, seed=3, fp8_base_weights=True, compile=True)
    lora_config = prepare(transformer, spec, Placement(Plan("full"), "cpu"))
    assert (lora_config.r, lora_config.lora_alpha) == (4, 8)
    assert seen == {"adapter": True, "processor": True, "checkpointed": True, "device": {"cpu"}}
    block = transformer.transformer_blocks[0]
    # The frozen projections were stored in float8 before the adapter wrapped them; the adapter is fp32.
    assert isinstance(block.attn1.to_q.base_layer, models.Float8Linear)
    assert block.attn1.to_q.base_layer.weight.dtype == torch.float8_e4m3fn
    assert block.norm1.linear.weight.dtype == torch.bfloat16
    trainable = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())


def test_the_adapter_starts_from_the_seed():
    def adapter(seed):
        transformer = tiny_bf16_transformer()
        prepare(transformer, TransformerSpec(torch.bfloat16, rank=4, alpha=4, seed=seed), Placement(Plan(), "cpu"))
        return {n: p.detach().clone() for n, p in transformer.named_parameters() if p.requires_grad}

    first, again, other = adapter(3), adapter(3), adapter(4)
    assert max_abs_diff(first, again) == 0
    assert max_abs_diff(first, other) > 0
