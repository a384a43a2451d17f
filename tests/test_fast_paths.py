"""The trainer's fast paths learn what the plain path learns, the memory estimate, --dry_run and the benchmark.

Each fast path (compiled blocks, adapter inputs left uncast, float8 base weights) computes one training
step of the tiny model on the CPU; its loss and LoRA gradients are compared with the plain path's.
"""

import copy
import inspect
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from torch._dynamo.utils import counters

from cogvideox_lora import attention, memory, models, profiling, recompute
from cogvideox_lora.memory import Plan
from cogvideox_lora.placement import Placement
from cogvideox_lora.settings import ModelSource
from cogvideox_lora.transformer import TransformerSpec, build
from cogvideox_lora.lora import add_lora, lora_state_dict, load_lora_state_dict, uncast_adapter_inputs
from cogvideox_lora.loss import compute_loss, transformer_inputs
from helpers import REPO, STAND_IN_CALLS, register_stand_in, run_script, summary, train_argv

BF16 = torch.bfloat16


def load_tiny(model_dir, fp8: bool = False):
    spec = TransformerSpec(BF16, rank=4, alpha=4, fp8_base_weights=fp8)
    return build(ModelSource(str(model_dir)), spec, Placement(Plan(), "cpu"))[0]


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    """The plain path's transformer, with a non-zero adapter so that every LoRA weight gets a gradient."""
    torch.manual_seed(0)
    transformer = load_tiny(tiny_model_dir)
    for name, param in transformer.named_parameters():
        if param.requires_grad:
            param.data = torch.randn_like(param) * 0.05
    return transformer


@pytest.fixture(scope="module")
def batch(plain):
    config = plain.config
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 3, config.in_channels, config.sample_height, config.sample_width, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    prompt_embeds = torch.randn(2, config.max_text_seq_length, config.text_embed_dim, generator=generator)
    alphas_cumprod = torch.linspace(0.999, 0.01, 1000)
    return (latents, noise, torch.tensor([100, 700]), prompt_embeds), alphas_cumprod


def step(transformer, batch, uncast: bool = False):
    """One bf16-autocast training step: the loss and the LoRA gradients by name."""
    (latents, noise, timesteps, prompt_embeds), alphas_cumprod = batch
    transformer.zero_grad(set_to_none=True)
    uncast_adapter_inputs(transformer, BF16 if uncast else torch.float32)
    with torch.autocast("cpu", dtype=BF16):
        inputs = transformer_inputs(transformer.config, *latents.shape[1:2], *latents.shape[3:], "cpu")
        loss = compute_loss(transformer, (latents, noise, timesteps, prompt_embeds), alphas_cumprod, BF16, inputs)
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in transformer.named_parameters() if p.requires_grad}


def relative_error(a: dict, b: dict) -> float:
    """The norm of the difference over the norm of the reference, over all LoRA gradients together."""
    assert a.keys() == b.keys()
    diff = sum(((a[k] - b[k]) ** 2).sum() for k in a).sqrt()
    return (diff / sum((a[k] ** 2).sum() for k in a).sqrt()).item()


def assert_same_step(reference, other, tolerance):
    (loss_a, grads_a), (loss_b, grads_b) = reference, other
    assert all(g.abs().max() > 0 for g in grads_a.values()), "every LoRA weight should have a gradient"
    assert loss_b == pytest.approx(loss_a, rel=tolerance)
    assert relative_error(grads_a, grads_b) < tolerance


def test_uncast_adapter_inputs_give_the_plain_step(plain, batch):
    assert_same_step(step(plain, batch), step(plain, batch, uncast=True), tolerance=1e-2)


def test_compiled_blocks_give_the_plain_step(plain, batch):
    compiled = copy.deepcopy(plain)
    models.compile_blocks(compiled)
    # Both as the trainer runs them: compiled blocks with uncast adapter inputs.
    assert_same_step(step(plain, batch), step(compiled, batch, uncast=True), tolerance=1e-2)


def test_checkpointed_compiled_blocks_give_the_plain_step(plain, batch):
    """recompute.enable puts each block's checkpoint inside its compiled graph: the same step as the plain path,
    keeping a small part of what the plain path keeps; keep_attention also keeps the attention output (the
    stand-in kernel's custom op, which the compiler leaves whole as it does FlashAttention-4's)."""
    base = copy.deepcopy(plain)
    attention.use(base, attention.Choice(register_stand_in(), ""))
    kept_plain, reference = profiling.saved_bytes(base, lambda: step(base, batch))
    kept = {}
    for policy in recompute.POLICIES:
        checkpointed = copy.deepcopy(base)
        recompute.enable(checkpointed, policy)
        # Inductor's partition of forward and backward without its code generation, which would take a minute here.
        for block in checkpointed.transformer_blocks:
            block.compile(backend="aot_eager_decomp_partition")
        graphs = counters["stats"]["unique_graphs"]
        STAND_IN_CALLS.update(forward=0, backward=0)
        kept[policy], result = profiling.saved_bytes(checkpointed, lambda: step(checkpointed, batch, uncast=True))
        assert counters["stats"]["unique_graphs"] > graphs, "the checkpointed blocks should have been compiled"
        layers = len(base.transformer_blocks)
        forwards = {"full": 2, "keep_attention": 1}[policy]
        assert STAND_IN_CALLS == {"forward": layers * forwards, "backward": layers}, policy
        assert_same_step(reference, result, tolerance=1e-2)
    assert kept["full"] < kept["keep_attention"] < kept_plain / 3, (kept, kept_plain)


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


def test_float8_compiled_run_trains_and_validates(tmp_path, tiny_model_dir, tiny_dataset_dir):
    out = tmp_path / "out"
    result = run_script(train_argv(tiny_model_dir, tiny_dataset_dir, out, tmp_path / "cache",
                                    "--max_train_steps", 2, "--mixed_precision", "bf16",
                                    "--base_weights_dtype", "fp8", "--compile_blocks",
                                    "--validation_prompt", "a red square"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert summary(out)["steps"] == 2 and len(summary(out)["validation_videos"]) == 1
    assert (out / "pytorch_lora_weights.safetensors").exists()


def test_memory_estimate_follows_the_settings():
    # The class defaults are CogVideoX-2B's config.
    config = {name: p.default for name, p in inspect.signature(CogVideoXTransformer3DModel.__init__).parameters.items()
              if p.default is not inspect.Parameter.empty}
    work = memory.Workload(config, latent=(13, 60, 90), batch_size=1, rank=128, compiled=True, weight_bytes=2,
                           optimizer_state_bytes=8)
    full = memory.Plan("full")
    plain = memory.estimate(work, memory.Plan())
    # The 2B peaks measured on an H100 (BENCHMARKS.md): 32.4 GiB compiled, 7.5 with checkpointing.
    assert plain.total_gib == pytest.approx(32.4, rel=0.1)
    checkpointed = memory.estimate(work, full)
    assert checkpointed.total_gib == pytest.approx(7.5, rel=0.1)
    assert memory.estimate(replace(work, batch_size=2), full).activations_gib == \
        pytest.approx(2 * checkpointed.activations_gib)
    fp8 = memory.estimate(replace(work, float8_blocks=True), full)
    width = config["num_attention_heads"] * config["attention_head_dim"]
    assert checkpointed.weights_gib - fp8.weights_gib == pytest.approx(
        config["num_layers"] * 12 * width**2 / memory.GIB)
    assert memory.estimate(replace(work, optimizer_state_bytes=2), full).adapter_gib < checkpointed.adapter_gib
    assert memory.estimate(replace(work, compiled=False), memory.Plan()).activations_gib > plain.activations_gib


def test_dry_run_prints_the_estimate_and_creates_nothing(tmp_path, tiny_model_dir, tiny_dataset_dir):
    out, cache = tmp_path / "out", tmp_path / "cache"
    result = run_script(train_argv(tiny_model_dir, tiny_dataset_dir, out, cache, "--dry_run"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Estimated peak GPU memory: about" in result.stderr
    assert not out.exists() and not cache.exists()


def test_benchmark_runs_in_tiny_mode(tmp_path):
    # On one process and on two, as on two GPUs (ACCELERATE_USE_CPU=1: gloo on the CPU).
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_train.py"), "--tiny", "--rows",
                             "2b,2b-x2", "--steps", "2", "--workdir", str(tmp_path)],
                            cwd=REPO, env={**os.environ, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.splitlines()
    header = [c.strip() for c in next(line for line in lines if line.startswith("| row")).strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines
            if line.startswith("| 2b")]
    assert [(r["row"], r["GPUs"]) for r in rows] == [("2b", "1"), ("2b-x2", "2")], result.stdout
    (one, two) = rows
    # Median step times measured, the first on a fresh cache, and samples/s on two against one.
    assert float(one["median step (s)"]) > 0 and one["cache"] == "cold" and two["cache"] == "warm"
    assert float(two["scaling (x)"]) > 0 and float(one["estimate (GiB)"]) > 0
    assert summary(tmp_path / "out-2b")["steps"] == 2 and summary(tmp_path / "out-2b-x2")["processes"] == 2


def test_profile_attributes_gpu_idle_to_the_phase_that_launched_the_next_work():
    def kernel(ts, dur, correlation, name="k"):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"correlation": correlation}}

    def launch(ts, correlation):
        return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 1,
                "args": {"correlation": correlation}}

    events = [
        {"ph": "X", "cat": "user_annotation", "name": "forward", "ts": 0, "dur": 100},
        {"ph": "X", "cat": "user_annotation", "name": "optimizer", "ts": 300, "dur": 50},
        launch(1, 1), kernel(10, 50, 1),
        launch(20, 2), kernel(55, 20, 2),           # overlaps the first: no gap, busy counted once
        launch(30, 3), kernel(175, 25, 3, "late"),  # 100 us idle, launched in forward
        launch(310, 4), kernel(400, 10, 4, "adam"),  # 200 us idle, launched by the optimizer
    ]
    idle = profiling.gpu_idle(events)
    assert idle["forward"]["idle_ms"] == 0.1 and idle["forward"]["gaps"] == 1
    assert idle["optimizer"] == {"idle_ms": 0.2, "gaps": 1, "largest_us": 200, "largest_before": "adam"}
    assert idle["busy_ms"] == (65 + 25 + 10) / 1000 and idle["span_ms"] == 0.4
    assert set(idle) == {"forward", "optimizer", "busy_ms", "span_ms"}


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
