"""LoRA adapters (lora.py): their inputs left uncast in half precision, as the trainer's fast path runs them."""

import inspect

import pytest
import torch
from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

from cogvideox_lora import inference, memory, models
from cogvideox_lora.lora import (ALL_LINEAR, adapter_features, add_lora, block_linear_layers, config_linear_layers,
                                 uncast_adapter_inputs)
from cogvideox_lora.memory import Plan
from cogvideox_lora.placement import Placement
from cogvideox_lora.settings import DEFAULT_LORA_TARGETS, ModelSource
from cogvideox_lora.transformer import TransformerSpec, build
from helpers import BF16, assert_same_step, load_lora_and_collect_warnings, lora, run_main, step, train_argv


def test_all_linear_trains_and_loads_in_a_stock_pipeline(tmp_path, tiny_model_dir, tiny_dataset_dir):
    out = tmp_path / "out"
    run_main(train_argv(tiny_model_dir, tiny_dataset_dir, out, tmp_path / "cache", "--max_train_steps", 2,
                        "--learning_rate", "1e-2", "--lora_target_modules", ALL_LINEAR))
    saved = lora(out)
    pipe = CogVideoXPipeline.from_pretrained(tiny_model_dir)
    layers = block_linear_layers(pipe.transformer.transformer_blocks[0])
    # Attention, feed-forward and the norms' projections: every Linear layer of both blocks, A and B of each.
    assert {"attn1.to_q", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2", "norm1.linear"} <= set(layers)
    assert len(saved) == 2 * len(layers) * pipe.transformer.config.num_layers
    assert max(w.abs().max().item() for k, w in saved.items() if ".ff.net.2.lora_B" in k) > 0

    assert load_lora_and_collect_warnings(pipe, out) == []
    for key, value in saved.items():
        module_path, kind, _ = key[len("transformer."):].rsplit(".", 2)
        assert torch.equal(getattr(pipe.transformer.get_submodule(module_path), kind)["default_0"].weight, value), key

    fresh = CogVideoXPipeline.from_pretrained(tiny_model_dir)
    assert inference.load_lora(fresh, str(out)) == pytest.approx(1.0)  # cli_demo's loader: alpha 4 / rank 4


def test_target_names_are_checked_before_any_model_loads(tmp_path, tiny_model_dir, tiny_dataset_dir, no_models):
    with pytest.raises(SystemExit) as exit_:
        run_main(train_argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "out", tmp_path / "cache",
                            "--lora_target_modules", "to_q,ff.net.9"))
    assert "ff.net.9 match(es) no Linear layer of the transformer blocks" in str(exit_.value.code)
    assert str(exit_.value.code).startswith("error: ")
    assert not (tmp_path / "out").exists()


def test_the_estimate_counts_the_adapter_of_the_targets():
    # The class defaults are CogVideoX-2B's config.
    config = {name: p.default for name, p in inspect.signature(CogVideoXTransformer3DModel.__init__).parameters.items()
              if p.default is not inspect.Parameter.empty}
    width, time_dim = config["num_attention_heads"] * config["attention_head_dim"], config["time_embed_dim"]
    assert adapter_features(DEFAULT_LORA_TARGETS, config) == 4 * 2 * width
    # q, k, v, out; the 4x feed-forward's two; the two norms' projections from the time embedding to 6 widths.
    every = adapter_features([ALL_LINEAR], config)
    assert every == 8 * width + 2 * 5 * width + 2 * (time_dim + 6 * width)
    assert adapter_features(["to_q", "ff.net.2"], config) == 2 * width + 5 * width

    work = memory.Workload(config, latent=(13, 60, 90), batch_size=1, rank=128, compiled=True, weight_bytes=2,
                           optimizer_state_bytes=8)
    default = memory.estimate(work, Plan("full"))
    assert memory.estimate(memory.Workload(**{**work.__dict__, "adapter_features": 8 * width}), Plan("full")) == \
        default
    wide = memory.estimate(memory.Workload(**{**work.__dict__, "adapter_features": every}), Plan("full"))
    assert wide.adapter_gib == pytest.approx(default.adapter_gib * every / (8 * width))


def test_float8_storage_keeps_an_all_linear_adapter_fp32(tiny_model_dir):
    spec = TransformerSpec(torch.bfloat16, rank=4, alpha=4, fp8_base_weights=True, lora_targets=(ALL_LINEAR,))
    transformer, lora_config = build(ModelSource(str(tiny_model_dir)), spec, Placement(Plan(), "cpu"))
    block = transformer.transformer_blocks[0]
    assert set(lora_config.target_modules) == set(config_linear_layers(transformer.config))
    adapters = {n: p for n, p in transformer.named_parameters() if "lora_" in n}
    assert adapters and all(p.dtype == torch.float32 and p.requires_grad for p in adapters.values())
    # The feed-forward's frozen weights are float8 under their adapter, the norms' projections stay bf16.
    assert isinstance(block.ff.net[2].base_layer, models.Float8Linear)
    assert block.ff.net[2].base_layer.weight.dtype == torch.float8_e4m3fn
    assert block.norm1.linear.base_layer.weight.dtype == torch.bfloat16


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
