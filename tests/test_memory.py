"""The memory estimate and plan (memory.py): what training and its validation videos take, from the configs alone,
the least offloading that fits a budget, and the plan the trainer makes before any model loads."""

import inspect
import shutil
from dataclasses import replace

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel

from cogvideox_lora import host_memory, memory, synthetic
from helpers import run_main, run_script, train_argv


FULL = memory.Plan("full")


def test_the_estimate_is_the_cards_peak_with_the_overhead_beside_the_tensors(val_2b):
    tensors = memory.estimate(val_2b, FULL)
    on_card = memory.estimate(replace(val_2b, overhead_gib=1.25), FULL)
    assert on_card.allocator_gib == pytest.approx(tensors.allocator_gib)
    assert on_card.total_gib == pytest.approx(tensors.total_gib + 1.25)
    assert "CUDA context" in str(on_card) and "CUDA context" not in str(tensors)
    # The trainer's workload plans for the context, kernels and slack unless told what was measured.
    request = memory.Request(FULL)
    work, _, needed = memory.plan_for(request, val_2b.config, val_2b.latent, None, 1, 128, True, 2, None)
    assert work.overhead_gib == pytest.approx(memory.CONTEXT_AND_KERNELS_GIB + memory.ALLOCATOR_SLACK_GIB)
    assert needed.total_gib == pytest.approx(needed.allocator_gib + work.overhead_gib)
    # A card the context, kernels and slack alone fill is refused, whatever the plan, with what to do.
    with pytest.raises(memory.DoesNotFit, match="leaves nothing for PyTorch's tensors.*--max_gpu_memory"):
        memory.plan_for(request, val_2b.config, val_2b.latent, None, 1, 128, True, 2, work.overhead_gib)


def test_auto_fits_the_card_with_the_overhead_subtracted(val_2b):
    plans = memory.ladder(memory.Plan(), val_2b.config["num_layers"])
    bare = [memory.estimate(val_2b, p).total_gib for p in plans]
    # A card that holds the tensors of the second plan but not them and the overhead: a later plan is taken.
    budget = bare[1] + 0.5
    assert memory.fit(val_2b, memory.Plan(), budget, auto=True)[0] == plans[1]
    plan, needed = memory.fit(replace(val_2b, overhead_gib=1.0), memory.Plan(), budget, auto=True)
    assert plans.index(plan) > 1 and needed.total_gib <= budget


def test_the_overhead_planned_for_before_the_kernels_load():
    assert memory.assumed_overhead(None) == memory.CONTEXT_AND_KERNELS_GIB
    assert memory.assumed_overhead(0.1) == memory.CONTEXT_AND_KERNELS_GIB
    big = memory.CONTEXT_AND_KERNELS_GIB + 0.5  # a context larger than an H100's: room for the kernels on top
    assert memory.assumed_overhead(big) == pytest.approx(big + memory.KERNELS_TO_LOAD_GIB)
    budget = memory.Budget(8.0, 0.75, capped=True)
    assert budget.allocator_gib == pytest.approx(7.25)


def budget_around(work, plan, overhead, room):
    """A budget whose limit leaves `room` GiB beside the plan's device-level peak planned with `overhead`."""
    return memory.Budget(memory.estimate(work, plan).total_gib + room, overhead, capped=True)


def test_recheck_after_the_first_step(val_2b):
    planned = memory.CONTEXT_AND_KERNELS_GIB
    work = replace(val_2b, overhead_gib=planned + memory.ALLOCATOR_SLACK_GIB)
    plan = memory.Plan("full", offload_activations=True)
    budget = budget_around(work, plan, planned, room=0.2)
    # As planned or less: nothing to say.
    assert memory.recheck(work, memory.Plan(), plan, budget, planned - 0.1) == memory.Recheck()
    # More, within the room left: the run goes on, the allocator held to the card but what was measured.
    tighter = memory.recheck(work, memory.Plan(), plan, budget, planned + 0.1)
    assert not tighter.stop and tighter.budget.allocator_gib == pytest.approx(budget.limit_gib - planned - 0.1)
    assert "still fits" in tighter.message and "\n" not in tighter.message
    # More than the room: a stop in one line, naming flags that fit with the overhead measured.
    short = memory.recheck(work, memory.Plan(), plan, budget, planned + 0.6)
    assert short.stop and short.budget is None and "\n" not in short.message
    assert "would run out of memory" in short.message and "0.76 planned for" in short.message
    flags = short.message.split("; ")[-1].split(" would fit")[0]
    named = next(p for p in memory.ladder(memory.Plan(), work.config["num_layers"]) if p.flags() == flags)
    assert memory.estimate(replace(work, overhead_gib=work.overhead_gib + 0.6), named).total_gib <= budget.limit_gib
    assert memory.estimate(replace(work, overhead_gib=work.overhead_gib + 0.6), plan).total_gib > budget.limit_gib
    # Nothing fits any more: the stop says what would lower the need.
    least = memory.ladder(memory.Plan(), work.config["num_layers"])[-1]
    crowded = memory.recheck(work, memory.Plan(), least, budget_around(work, least, planned, 0.1), planned + 5)
    assert crowded.stop and "nothing fits" in crowded.message
    # A plan that never fitted was warned about at the start: the check leaves it be.
    over = budget_around(work, plan, planned, room=-1.0)
    assert memory.recheck(work, memory.Plan(), plan, over, planned + 0.6) == memory.Recheck()


def test_the_trainer_refuses_before_loading_what_the_host_cannot_hold(tmp_path, tiny_model_dir, tiny_dataset_dir,
                                                                     no_models, monkeypatch, caplog):
    meminfo = tmp_path / "meminfo"
    monkeypatch.setattr(host_memory, "MEMINFO", meminfo)
    out = tmp_path / "out"
    argv = train_argv(tiny_model_dir, tiny_dataset_dir, out, tmp_path / "cache", "--gradient_checkpointing",
                      "--offload", "activations", "--blocks_to_swap", 2, "--max_train_steps", 1)
    meminfo.write_text("MemAvailable:          1 kB\n")
    with pytest.raises(SystemExit) as raised:
        run_main(argv)
    message = str(raised.value.code)
    assert message.startswith("error: the run needs about") and "0.0 GiB available (MemAvailable" in message
    assert not out.exists()
    # With room, the same plan passes the check (and the dry run stops before loading), saying what it needs.
    meminfo.write_text("MemAvailable:    8388608 kB\n")
    with caplog.at_level("INFO", logger="train_cogvideox_lora"):
        run_main([*argv, "--dry_run"])
    assert any(r.getMessage().startswith("Host memory: the run needs about") and "of 8.0 GiB available" in r.getMessage()
               for r in caplog.records)


class FakeSampler:
    def __init__(self, readings):
        self.readings = list(readings)

    def take(self):
        return self.readings.pop(0)


def test_peaks_keep_the_cards_figure_of_each_part():
    peaks = memory.Peaks(FakeSampler([1.0, 3.0, 6.0, 2.0, 4.0]))
    with peaks.part("validation"):  # reads training's peak (1.0) going in
        with peaks.part("decoding"):  # validation's so far (3.0) going in, decoding's (6.0) coming out
            pass
    # validation's rest (2.0) coming out of it, then training's (4.0)
    peaks.training()
    assert peaks.device_gib["training"] == 4.0 and peaks.device_gib["validation"] == 3.0
    assert peaks.device_gib["decoding"] == 6.0 and peaks.device_validation() == 6.0
    assert peaks.device_gib["encoding"] is None
    # Without a sampler (or NVML), nothing is known of the card.
    bare = memory.Peaks()
    bare.training()
    assert bare.device_gib["training"] is None and bare.device_validation() is None


def test_resident_peak_of_each_part(tmp_path):
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "status").write_text("Name:\tpython\nVmHWM:\t 2097152 kB\nVmRSS:\t 1048576 kB\n")
    reader = host_memory.ResidentPeak(proc)
    assert reader.take() == pytest.approx(2.0)
    assert (proc / "clear_refs").read_text() == "5"  # the kernel's way to start the high-water mark again
    (proc / "status").write_text("Name:\tpython\n")  # a kernel that does not say
    assert reader.take() is None
    assert host_memory.ResidentPeak(tmp_path / "none").take() is None

    # This process's own: a peak that is gone is in the first take and not in the next.
    real = host_memory.ResidentPeak()
    real.take()
    ballast = bytearray(256 * 2**20)
    ballast[::4096] = b"x" * len(ballast[::4096])
    del ballast
    first, second = real.take(), real.take()
    assert first - second > 0.2


def test_peaks_keep_the_hosts_figure_of_each_part():
    peaks = memory.Peaks(None, FakeSampler([5.0, 1.0, 7.0, 2.0, 3.0]))
    assert peaks.host_gib["starting"] == 5.0  # from the process's start to the plan
    with peaks.part("loading"):  # training's so far (1.0) going in, loading's (7.0) coming out
        pass
    with peaks.part("validation"):  # training's (2.0) going in, validation's (3.0) coming out
        pass
    assert peaks.host_gib["loading"] == 7.0 and peaks.host_gib["training"] == 2.0
    assert peaks.host_gib["validation"] == 3.0 and peaks.host_gib["encoding"] is None
    assert memory.Peaks(None, FakeSampler([1.0, 2.0])).host_peak() == 2.0  # training's so far read too
    assert memory.Peaks().host_peak() is None


def test_a_run_the_first_step_finds_short_stops_in_one_line(tmp_path, tiny_model_dir, tiny_dataset_dir,
                                                            monkeypatch):
    # The check after the first step says the plan will not fit (what memory.recheck says on a GPU): every process
    # stops before the step is applied, with the one line, and no checkpoint or LoRA is written.
    from cogvideox_lora import placement

    said = memory.Recheck(message="After the first step the CUDA context and kernels take 2.00 GiB", stop=True)
    calls = []
    monkeypatch.setattr(placement.Placement, "recheck", lambda self: calls.append(1) or said)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as raised:
        run_main(train_argv(tiny_model_dir, tiny_dataset_dir, out, tmp_path / "cache", "--max_train_steps", 3,
                            "--checkpointing_steps", 1))
    assert raised.value.code == f"error: {said.message}" and calls == [1]
    assert not list(out.glob("checkpoint-*")) and not (out / "pytorch_lora_weights.safetensors").exists()


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
