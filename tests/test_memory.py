"""The memory estimate and plan (memory.py): what training and its validation videos take, from the configs alone,
the least offloading that fits a budget, and the plan the trainer makes before any model loads."""

import inspect
import shutil
from dataclasses import replace

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel

from cogvideox_lora import memory, synthetic
from helpers import run_main, run_script, train_argv


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


@pytest.mark.slow
def test_dry_run_prints_the_estimate_and_creates_nothing(tmp_path, tiny_model_dir, tiny_dataset_dir):
    out, cache = tmp_path / "out", tmp_path / "cache"
    result = run_script(train_argv(tiny_model_dir, tiny_dataset_dir, out, cache, "--dry_run"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Estimated peak GPU memory: about" in result.stderr
    assert not out.exists() and not cache.exists()


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


def test_text_encoder_size_from_its_config():
    # google/t5-v1_1-xxl, the text encoder of every CogVideoX: 4.76 B parameters.
    config = {**synthetic.SPECS["2b"]["text_encoder"]}
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


# The plan from the configs alone, before any model loads.

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


def test_more_blocks_to_swap_than_the_model_has_is_refused(tmp_path, weightless_model_dir, tiny_dataset_dir,
                                                           no_models):
    with pytest.raises(SystemExit) as raised:
        run_main(train_argv(weightless_model_dir, tiny_dataset_dir, tmp_path / "out", tmp_path / "cache",
                            "--dry_run", "--gradient_checkpointing", "--blocks_to_swap", 5))
    assert str(raised.value.code) == "error: --blocks_to_swap 5: the model has 2 blocks."
