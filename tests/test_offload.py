"""Offloading and the memory plan, on the CPU: an offloaded step computes what a step without offloading does.

On a machine without CUDA, ActivationOffload and BlockSwap run the same code with plain copies (no side
stream), so the tiny transformer's loss and LoRA gradients can be compared exactly with the plain path's.
"""

import inspect
import shutil
from dataclasses import replace

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel

from cogvideox_lora import memory, offload, recompute
from cogvideox_lora.args import parse_args
from helpers import (STAND_IN_CALLS, lora, lora_step, max_abs_diff, register_stand_in, run_main, summary,
                     tiny_inputs, tiny_transformer, train_argv)

LAYERS = 4


# 5. Loss and LoRA gradients with and without offloading.

def train_two_steps(transformer):
    """Two steps on different inputs, with an SGD update of the adapter between them (so that the second step
    sees new adapter weights and the offloaders' reused buffers new activations)."""
    steps = []
    for seed in (0, 1):
        STAND_IN_CALLS.update(forward=0, backward=0)
        steps.append((*lora_step(transformer, tiny_inputs(transformer, seed)), dict(STAND_IN_CALLS)))
        with torch.no_grad():
            for param in transformer.parameters():
                if param.requires_grad:
                    param -= 0.5 * param.grad
    return steps


@pytest.fixture(scope="module")
def reference():
    """The plain path: no checkpointing, no offloading."""
    return train_two_steps(tiny_transformer(LAYERS, kernel=register_stand_in()))


@pytest.mark.parametrize("policy", ["full", "keep_attention"])
@pytest.mark.parametrize("activations, swapped", [(False, 0), (True, 0), (False, 2), (False, LAYERS),
                                                  (True, 3), (True, LAYERS)])
def test_offloaded_steps_equal_the_plain_steps(reference, policy, activations, swapped):
    transformer = tiny_transformer(LAYERS, kernel=register_stand_in())
    blocks = transformer.transformer_blocks
    swap = offload.BlockSwap(blocks, swapped, "cpu") if swapped else None
    offloader = offload.ActivationOffload("cpu") if activations else None
    recompute.enable(transformer, policy, offloader, swap)
    if swap is not None:
        assert len(swap.order) == swapped == len(set(swap.order))
        # The swapped blocks' frozen weights are views of the (at most two) shared slots.
        slot_pointers = {t.data_ptr() for slot in swap.slots for t in slot}
        for i in swap.order:
            assert blocks[i].attn1.to_q.base_layer.weight.data_ptr() in slot_pointers
            assert blocks[i].attn1.to_q.lora_A["default"].weight.data_ptr() not in slot_pointers  # trainable: stays
        if swapped > 2:
            first, third = swap.order[0], swap.order[2]
            assert blocks[first].ff.net[2].weight.data_ptr() == blocks[third].ff.net[2].weight.data_ptr()

    steps = train_two_steps(transformer)
    for (loss_a, grads_a, _), (loss_b, grads_b, calls) in zip(reference, steps):
        assert len(grads_a) == LAYERS * 4 * 2 and all(g.abs().max() > 0 for g in grads_a.values())
        assert grads_b.keys() == grads_a.keys()
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=0)
        for name in grads_a:
            torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-6, atol=1e-7, msg=name)
        # keep_attention skips attention in the recompute, however the inputs and weights travel.
        assert calls == {"forward": LAYERS * (1 if policy == "keep_attention" else 2), "backward": LAYERS}
    if offloader is not None:
        # Each block's two inputs (video and text tokens) went to host buffers, reused by the second step;
        # the backward pass fetched them all back and left no group behind.
        assert len(offloader.buffers) == 2 * LAYERS
        assert {key[0] for key in offloader.buffers} == set(range(LAYERS))
        assert offloader.groups == []


def test_offloaded_activations_are_the_blocks_inputs():
    offloader = offload.ActivationOffload("cpu")
    transformer = tiny_transformer(2, kernel=None)
    recompute.enable(transformer, "full", offloader)
    inputs = tiny_inputs(transformer)
    out = transformer(**inputs, return_dict=False)[0]
    # After the forward pass: one group per block, each holding the block's hidden and encoder states.
    assert [g.position for g in offloader.groups] == [0, 1]
    assert all(len(g.host) == 2 and g.fetched is None for g in offloader.groups)
    text = transformer.config.max_text_seq_length
    assert offloader.groups[0].host[1].shape == (1, text, transformer.transformer_blocks[0].attn1.to_q.in_features)
    assert all(t.device.type == "cpu" and not t.requires_grad for g in offloader.groups for t in g.host)
    out.square().mean().backward()
    assert offloader.groups == []


def test_block_swap_in_inference_gives_the_plain_output():
    plain = tiny_transformer(LAYERS, kernel=None)
    swapped = tiny_transformer(LAYERS, kernel=None)
    swap = offload.BlockSwap(swapped.transformer_blocks, 3, "cpu")
    outputs = []
    with torch.no_grad():
        expected = [plain(**tiny_inputs(plain, seed), return_dict=False)[0] for seed in (0, 1)]
        with swap.inference(swapped.transformer_blocks):
            # Twice: the second pass starts again at the first swapped block (the slots wrap around).
            outputs = [swapped(**tiny_inputs(swapped, seed), return_dict=False)[0] for seed in (0, 1)]
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not any(block._forward_pre_hooks for block in swapped.transformer_blocks)  # the hooks are removed


def test_block_swap_refuses_blocks_that_differ():
    transformer = tiny_transformer(2, kernel=None)
    transformer.transformer_blocks[1].ff.net[2].weight.data = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="differs from block 0"):
        offload.BlockSwap(transformer.transformer_blocks, 2, "cpu")


@pytest.mark.parametrize("total", [1, 2, 5, 30, 42])
def test_spread_spaces_the_swapped_blocks_evenly(total):
    assert offload.spread(total, total) == list(range(total))
    assert offload.spread(1, total) == [total // 2]
    for count in range(1, total + 1):
        chosen = offload.spread(count, total)
        assert len(chosen) == count and chosen == sorted(set(chosen))
        assert 0 <= chosen[0] and chosen[-1] < total
        gaps = [b - a for a, b in zip(chosen, chosen[1:])]
        assert not gaps or max(gaps) - min(gaps) <= 1, (count, chosen)


# 6. Through the command line.

def test_an_offloaded_run_learns_the_same_lora(tmp_path, tiny_model_dir, tiny_dataset_dir):
    cache = tmp_path / "cache"
    common = ["--max_train_steps", 2, "--gradient_checkpointing", "--validation_prompt", "a red square",
              "--validation_steps", 1]
    run_main(train_argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "plain", cache, *common))
    run_main(train_argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "offloaded", cache, *common,
                        "--offload", "activations", "--blocks_to_swap", 1))
    plain, offloaded = summary(tmp_path / "plain"), summary(tmp_path / "offloaded")
    assert plain["memory_plan"] == "--gradient_checkpointing"
    assert offloaded["memory_plan"] == "--gradient_checkpointing --offload activations --blocks_to_swap 1"
    # Validated after step 1 (then trained on) and at the end, with the swapped block loaded for inference.
    assert len(offloaded["validation_videos"]) == len(plain["validation_videos"]) == 1
    a, b = lora(tmp_path / "plain"), lora(tmp_path / "offloaded")
    assert len(a) > 0 and max(t.abs().max().item() for t in a.values()) > 0
    assert max_abs_diff(a, b) <= 1e-6


# 7. The memory estimate and plan.

@pytest.fixture(scope="module")
def work_2b():
    """CogVideoX-2B (the class defaults) at 49x480x720, compiled blocks, bf16, rank 128, AdamW."""
    config = {name: p.default for name, p in inspect.signature(CogVideoXTransformer3DModel.__init__).parameters.items()
              if p.default is not inspect.Parameter.empty}
    return memory.Workload(config, (13, 60, 90), batch_size=1, rank=128, compiled=True, weight_bytes=2,
                           optimizer_state_bytes=8)


def test_the_estimate_follows_the_plan(work_2b):
    config, layers = work_2b.config, work_2b.config["num_layers"]
    width = config["num_attention_heads"] * config["attention_head_dim"]
    tokens = config["max_text_seq_length"] + 13 * 30 * 45
    one_tensor = tokens * width * 2 / memory.GIB  # one [tokens, width] bf16 tensor
    full = memory.estimate(work_2b, memory.Plan("full"))
    keep = memory.estimate(work_2b, memory.Plan("keep_attention"))
    # keep_attention keeps each block's attention output and lse; full recomputes inside the compiled blocks.
    assert keep.activations_gib - full.activations_gib == pytest.approx(
        layers * (one_tensor + config["num_attention_heads"] * tokens * 4 / memory.GIB)
        - memory.RECOMPUTED_INSIDE * one_tensor)
    assert keep.weights_gib == full.weights_gib and keep.adapter_gib == full.adapter_gib
    # Offloaded, the checkpointed inputs of a few blocks in flight stay on the GPU instead of every block's.
    offloaded = memory.estimate(work_2b, memory.Plan("full", offload_activations=True))
    # With offloading, the checkpoint goes around the blocks (recompute.around), without the inside recompute's extra.
    assert full.activations_gib - offloaded.activations_gib == pytest.approx(
        (layers - memory.INPUTS_IN_FLIGHT + memory.RECOMPUTED_INSIDE) * one_tensor)
    assert offloaded.weights_gib == full.weights_gib
    # Swapping N blocks leaves two slots of block weights on the GPU: N - 2 blocks fewer.
    block = memory.block_bytes(config, 2, False) / memory.GIB
    for n in (1, 2, 3, 10, layers):
        swapped = memory.estimate(work_2b, memory.Plan("full", blocks_to_swap=n))
        assert full.weights_gib - swapped.weights_gib == pytest.approx(max(0, n - 2) * block)
        assert full.activations_gib - swapped.activations_gib == pytest.approx(memory.RECOMPUTED_INSIDE * one_tensor)
    assert memory.estimate(work_2b, memory.Plan("full", blocks_to_swap=layers + 5)).weights_gib == pytest.approx(
        full.weights_gib - (layers - 2) * block)
    # Validation videos are estimated only when there are some.
    assert full.validation_gib is None and full.total_gib == full.training_gib
    validated = memory.estimate(replace(work_2b, validation_latent=(13, 60, 90)), memory.Plan("full"))
    assert validated.validation_gib > 0 and validated.training_gib == pytest.approx(full.training_gib)
    assert validated.total_gib == max(validated.training_gib, validated.validation_gib)
    assert "validation videos" in str(validated) and "validation videos" not in str(full)


def test_the_offloading_cost(work_2b):
    layers = work_2b.config["num_layers"]
    assert memory.cost(work_2b, memory.Plan("full")) == "no offloading"
    activations = memory.cost(work_2b, memory.Plan("full", offload_activations=True))
    both = memory.cost(work_2b, memory.Plan("full", offload_activations=True, blocks_to_swap=layers))
    assert "GiB of pinned CPU memory" in activations and "copied a step" in activations
    host = [float(text.split(" GiB of pinned")[0]) for text in (activations, both)]
    assert host[1] > host[0] > 0


def test_the_ladder_adds_ever_more_offloading(work_2b):
    layers = work_2b.config["num_layers"]
    plans = memory.ladder(memory.Plan(), layers)
    assert plans[:3] == [memory.Plan(), memory.Plan("full"), memory.Plan("full", offload_activations=True)]
    assert plans[3:] == [memory.Plan("full", True, n) for n in range(1, layers + 1)]
    needs = [memory.estimate(work_2b, p).total_gib for p in plans]
    assert all(a >= b for a, b in zip(needs, needs[1:])) and needs[0] > needs[-1]
    # A plan asked for keeps its policy and what it already offloads.
    kept = memory.ladder(memory.Plan("keep_attention", blocks_to_swap=5), layers)
    assert kept[0] == memory.Plan("keep_attention", blocks_to_swap=5)
    assert kept[1] == memory.Plan("keep_attention", True, 5)
    assert [p.blocks_to_swap for p in kept[2:]] == list(range(6, layers + 1))
    assert all(p.checkpointing == "keep_attention" for p in kept)
    assert memory.Plan("keep_attention", True, 3).flags() == \
        "--gradient_checkpointing --checkpointing_policy keep_attention --offload activations --blocks_to_swap 3"
    assert memory.Plan().flags() == "(none)"


def test_fit_takes_the_first_plan_that_fits(work_2b):
    layers = work_2b.config["num_layers"]
    plans = memory.ladder(memory.Plan(), layers)
    needs = [memory.estimate(work_2b, p).total_gib for p in plans]
    for budget in (needs[0] + 1, (needs[0] + needs[1]) / 2, needs[2], needs[-1] + 0.01, needs[-1]):
        plan, needed = memory.fit(work_2b, memory.Plan(), budget, auto=True)
        assert needed.total_gib <= budget and needed == memory.estimate(work_2b, plan)
        earlier = plans[:plans.index(plan)]
        assert all(memory.estimate(work_2b, p).total_gib > budget for p in earlier), (budget, plan)
    # Without auto, or without a budget, the plan asked for stays, whatever it needs.
    assert memory.fit(work_2b, memory.Plan(), 1.0, auto=False)[0] == memory.Plan()
    assert memory.fit(work_2b, memory.Plan(), None, auto=True)[0] == memory.Plan()


def test_fit_says_what_would_lower_the_need_when_nothing_fits(work_2b):
    with pytest.raises(memory.DoesNotFit) as raised:
        memory.fit(work_2b, memory.Plan(), 1.0, auto=True)
    message = str(raised.value)
    assert message.startswith("--offload auto: nothing fits in 1.0 GiB; the least, gradient checkpointing (full), "
                              "activations offloaded, 30 blocks swapped, needs about")
    for flag in ("--base_weights_dtype fp8", "--use_8bit_adam", "--rank", "--height/--width/", "--max_gpu_memory"):
        assert flag in message


# 8. The plan from the configs alone, before any model loads.

@pytest.fixture
def weightless_model_dir(tmp_path, tiny_model_dir):
    """The tiny model's folder with its configs and tokenizer but no weight files."""
    folder = tmp_path / "weightless"
    shutil.copytree(tiny_model_dir, folder)
    weights = [p for pattern in ("*.safetensors", "*.bin") for p in folder.rglob(pattern)]
    assert weights
    for path in weights:
        path.unlink()
    return folder


def memory_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("Memory: ")]


def test_dry_run_plans_from_the_configs_alone(tmp_path, weightless_model_dir, tiny_dataset_dir, no_models, caplog,
                                              monkeypatch):
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = train_argv(weightless_model_dir, tiny_dataset_dir, out, cache, "--dry_run", "--offload", "auto")
    # The workload the trainer estimates, to set a budget between no checkpointing and checkpointing.
    seen = []
    real_fit = memory.fit
    monkeypatch.setattr(memory, "fit", lambda work, *a, **k: seen.append(work) or real_fit(work, *a, **k))
    with caplog.at_level("INFO", logger="train_cogvideox_lora"):
        run_main(argv)  # no budget on the CPU without --max_gpu_memory: the plan asked for
    lines = memory_lines(caplog)
    assert len(lines) == 1 and lines[0].startswith(
        "Memory: no gradient checkpointing ((none)); offloading: no offloading. Estimated peak GPU memory: about")
    work = seen[0]
    assert work.validation_latent is None and work.config["num_layers"] == 2
    plain, checkpointed = (memory.estimate(work, memory.Plan(c)).total_gib for c in (None, "full"))
    assert plain > checkpointed

    caplog.clear()
    with caplog.at_level("INFO", logger="train_cogvideox_lora"):
        run_main([*argv, "--max_gpu_memory", repr((plain + checkpointed) / 2)])
    assert memory_lines(caplog)[0].startswith("Memory: gradient checkpointing (full) (--gradient_checkpointing); "
                                              "offloading: no offloading. Estimated peak GPU memory: about")
    assert not out.exists() and not cache.exists()


def test_dry_run_stops_when_nothing_fits(tmp_path, weightless_model_dir, tiny_dataset_dir, no_models):
    out, cache = tmp_path / "out", tmp_path / "cache"
    with pytest.raises(SystemExit) as raised:
        run_main(train_argv(weightless_model_dir, tiny_dataset_dir, out, cache, "--dry_run", "--offload", "auto",
                            "--max_gpu_memory", 0.0001, "--validation_prompt", "a red square"))
    message = str(raised.value.code)
    assert message.startswith("error: --offload auto: nothing fits in 0.0 GiB; the least, gradient checkpointing "
                              "(full), activations offloaded, 2 blocks swapped, needs about")
    assert "validation videos" in message and "--max_gpu_memory" in message
    assert not out.exists() and not cache.exists()


@pytest.mark.parametrize("flags", [["--offload", "activations"], ["--blocks_to_swap", "2"],
                                   ["--checkpointing_policy", "keep_attention"]])
def test_offloading_without_checkpointing_is_refused(tmp_path, capsys, flags):
    with pytest.raises(SystemExit) as raised:
        parse_args(["--pretrained_model_name_or_path", "m", "--instance_data_root", str(tmp_path),
                    "--output_dir", str(tmp_path / "out"), *flags])
    assert raised.value.code == 2
    assert f"{' '.join(flags)} work(s) with --gradient_checkpointing" in capsys.readouterr().err


def test_more_blocks_to_swap_than_the_model_has_is_refused(tmp_path, weightless_model_dir, tiny_dataset_dir,
                                                           no_models):
    with pytest.raises(SystemExit) as raised:
        run_main(train_argv(weightless_model_dir, tiny_dataset_dir, tmp_path / "out", tmp_path / "cache",
                            "--dry_run", "--gradient_checkpointing", "--blocks_to_swap", 5))
    assert str(raised.value.code) == "error: --blocks_to_swap 5: the model has 2 blocks."


def test_validation_runs_guidance_one_sample_at_a_time():
    # The same video as the pipeline's batch of two, and the transformer as it was afterwards.
    import torch
    from cogvideox_lora import synthetic
    from cogvideox_lora.placement import one_sample_at_a_time

    pipe = synthetic.build_pipeline("tiny-5b")
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.transformer.transformer_blocks[0].register_forward_pre_hook(lambda module, args, kwargs: calls.append(
        kwargs["hidden_states"].shape[0]), with_kwargs=True)

    def video():
        return pipe(prompt="a red square", num_frames=9, height=48, width=64, num_inference_steps=2,
                    guidance_scale=6.0, generator=torch.Generator().manual_seed(1), output_type="pt",
                    max_sequence_length=16).frames

    batched = video()
    assert calls == [2, 2]
    with one_sample_at_a_time(pipe.transformer):
        split = video()
    assert calls[2:] == [1, 1, 1, 1]
    assert (split - batched).abs().max() < 1e-4
    assert "forward" not in pipe.transformer.__dict__


def test_the_decode_plan_keeps_validation_under_the_training_peak():
    latent = (13, 60, 90)
    decode = memory.vae_decode_gib(latent)
    assert memory.vae_decode_gib(latent, 0.5) < decode < memory.vae_decode_gib((21, 96, 170))
    # Room enough: decoded as it is, the weights where they are.
    assert memory.decode_plan(3.0, 1.0, latent, 3.0 + decode) == memory.DecodePlan(False, 1.0, 3.0 + decode)
    # Not with the weights: they wait on the host, the tiles as they are.
    assert memory.decode_plan(10.0, 1.0, latent, 1.0 + decode) == memory.DecodePlan(True, 1.0, 1.0 + decode)
    # Not even without them: the first smaller tiles that fit; if none, the smallest.
    half = memory.vae_decode_gib(latent, 0.5)
    assert memory.decode_plan(10.0, 1.0, latent, 1.0 + half) == memory.DecodePlan(True, 0.5, 1.0 + half)
    smallest = memory.decode_plan(10.0, 9.0, latent, 1.0)
    assert smallest == memory.DecodePlan(True, 0.25, 9.0 + memory.vae_decode_gib(latent, 0.25))
    # A VAE without tiling decodes a 480x720 frame in one tile of twice the default's sides, or else tiled.
    assert memory.untiled_scale(latent) == 2.0
    assert memory.decode_plan(3.0, 1.0, latent, 100.0, 2.0).tile_scale == 2.0
    assert memory.decode_plan(10.0, 1.0, latent, 1.0 + decode, 2.0) == memory.DecodePlan(True, 1.0, 1.0 + decode)


def test_the_estimate_decodes_validation_as_the_validator_will(work_2b):
    plan = memory.Plan("full", offload_activations=True, blocks_to_swap=12)
    latent = (13, 60, 90)
    validated = memory.estimate(replace(work_2b, validation_latent=latent), plan)
    adapter_weights = validated.adapter_gib / 4  # of fp32 weights, gradients and two Adam states
    with_weights = validated.weights_gib + adapter_weights + memory.OVERHEAD_GIB
    # The decode with the weights on the GPU would not fit under training's peak: they wait on the host.
    assert with_weights + memory.vae_decode_gib(latent) > validated.training_gib
    assert validated.validation_gib <= validated.training_gib
    untiled = memory.estimate(replace(work_2b, validation_latent=latent, tiled_vae=False), plan)
    assert untiled.validation_gib == pytest.approx(validated.validation_gib)  # both fall back to tiles that fit
    # Without checkpointing, training's peak leaves room for the decode in one tile beside the weights.
    roomy = memory.estimate(replace(work_2b, validation_latent=latent, tiled_vae=False), memory.Plan())
    assert roomy.validation_gib == pytest.approx(
        roomy.weights_gib + adapter_weights + memory.OVERHEAD_GIB + memory.vae_decode_gib(latent, 2.0))


def test_frozen_weights_wait_on_the_host_and_come_back():
    transformer = tiny_transformer(num_layers=3)
    keep = [transformer.transformer_blocks[1]]
    params = dict(transformer.named_parameters())
    values = {name: p.detach().clone() for name, p in params.items()}
    storage = {name: p.data_ptr() for name, p in params.items()}
    inputs = tiny_inputs(transformer, 0)
    with torch.no_grad():
        before = transformer(**inputs, return_dict=False)[0]
    moved = offload.frozen_tensors(transformer, keep)
    moved_ids = {id(t) for _, _, t in moved}
    kept_ids = {id(p) for p in keep[0].parameters()}
    assert moved and not moved_ids & kept_ids and all(not t.requires_grad for _, _, t in moved)
    assert len(moved_ids) == len(moved)
    with offload.on_host(moved):
        for name, p in params.items():
            # The same parameters, their data moved (a copy, even on the CPU), but for the kept and trainable ones.
            assert p is dict(transformer.named_parameters())[name]
            assert (p.data_ptr() != storage[name]) == (id(p) in moved_ids), name
    for name, p in params.items():
        assert torch.equal(p, values[name]), name
    with torch.no_grad():
        assert torch.equal(transformer(**inputs, return_dict=False)[0], before)


def test_validation_tiles_come_back_as_they_were():
    from cogvideox_lora import synthetic
    from cogvideox_lora.placement import tiles

    vae = synthetic.build_pipeline("tiny", text_encoder=False).vae
    assert not vae.use_tiling
    sides = vae.tile_sample_min_height, vae.tile_sample_min_width
    with tiles(vae, 0.5):
        assert vae.use_tiling and (vae.tile_sample_min_height, vae.tile_sample_min_width) == (120, 180)
        assert (vae.tile_latent_min_height, vae.tile_latent_min_width) == (15, 22)
    assert not vae.use_tiling and (vae.tile_sample_min_height, vae.tile_sample_min_width) == sides
    with tiles(vae, None):
        assert not vae.use_tiling


def test_text_encoder_size_from_its_config():
    # google/t5-v1_1-xxl, the text encoder of every CogVideoX: 4.76 B parameters.
    from cogvideox_lora.synthetic import _XXL_T5

    config = {**_XXL_T5}
    assert memory.text_encoder_bytes(config, 1) == pytest.approx(4.76e9, rel=0.01)
    assert memory.text_encoder_bytes(config, 2) == 2 * memory.text_encoder_bytes(config, 1)


def test_peaks_of_encoding_training_validation_and_its_decode_apart(monkeypatch):
    # A stand-in for CUDA's one peak counter, which the parts read and reset.
    counter = {"peak": 0.0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: counter["peak"] * memory.GIB)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: counter["peak"] * memory.GIB)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: counter.update(peak=0.0))
    peaks = memory.Peaks()
    with peaks.part("encoding"):  # the VAE's encode of what the cache lacks, before training
        counter["peak"] = 9.0
    counter["peak"] = 5.0
    with peaks.part("validation"):
        counter["peak"] = 3.0
        with peaks.part("decoding"):
            counter["peak"] = 4.0
        counter["peak"] = 2.0
    counter["peak"] = 4.5
    assert peaks.training() == (5.0, 5.0)
    assert peaks.gib["validation"] == (3.0, 3.0) and peaks.gib["decoding"] == (4.0, 4.0)
    assert peaks.validation() == (4.0, 4.0)
    assert peaks.gib["encoding"] == (9.0, 9.0)


def test_a_crowded_decode_mid_run_leaves_training_as_it_was(tmp_path, tiny_model_dir, tiny_dataset_dir, monkeypatch,
                                                           caplog):
    # Validation after step 2 of 4, with and without the GPU taken to be full (100 GiB held against a training peak
    # of 0): the crowded decode moves the transformer's frozen weights to the host and back, and shrinks the tiles.
    from cogvideox_lora import placement

    argv = ["--max_train_steps", 4, "--validation_prompt", "a brown bear", "--validation_steps", 2]
    run_main(train_argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "roomy", tmp_path / "cache", *argv))
    monkeypatch.setattr(placement, "_gpu_held_gib", lambda: 100.0)
    with caplog.at_level("INFO"):
        run_main(train_argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "crowded", tmp_path / "cache", *argv))
    assert "decode with the transformer's frozen weights on the host and tiles of 0.25 times" in caplog.text
    assert max_abs_diff(lora(tmp_path / "roomy"), lora(tmp_path / "crowded")) == 0
    assert len(summary(tmp_path / "crowded")["validation_videos"]) == 1
    assert sorted(p.name[:11] for p in (tmp_path / "crowded" / "validation").glob("step-*.mp4")) == \
        ["step-000002", "step-000004"]
