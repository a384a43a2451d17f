"""The memory plan against the card (issue 27): the CUDA context, kernels and allocator slack beside the tensors,
the check after the first step, and the host memory a plan needs."""

import inspect
from dataclasses import replace

import pytest
from diffusers import CogVideoXTransformer3DModel

from cogvideox_lora import host_memory, memory
from helpers import run_main, train_argv

FULL = memory.Plan("full")


@pytest.fixture
def work_2b():
    """CogVideoX-2B (the class defaults) at 49x480x720, compiled blocks, bf16, rank 128, AdamW, a validation video
    at the training size."""
    config = {name: p.default for name, p in inspect.signature(CogVideoXTransformer3DModel.__init__).parameters.items()
              if p.default is not inspect.Parameter.empty}
    return memory.Workload(config, (13, 60, 90), batch_size=1, rank=128, compiled=True, weight_bytes=2,
                           optimizer_state_bytes=8, validation_latent=(13, 60, 90))


def test_the_estimate_is_the_cards_peak_with_the_overhead_beside_the_tensors(work_2b):
    tensors = memory.estimate(work_2b, FULL)
    on_card = memory.estimate(replace(work_2b, overhead_gib=1.25), FULL)
    assert on_card.allocator_gib == pytest.approx(tensors.allocator_gib)
    assert on_card.total_gib == pytest.approx(tensors.total_gib + 1.25)
    assert "CUDA context" in str(on_card) and "CUDA context" not in str(tensors)
    # The trainer's workload plans for the context, kernels and slack unless told what was measured.
    request = memory.Request(FULL)
    work, _, needed = memory.plan_for(request, work_2b.config, work_2b.latent, None, 1, 128, True, 2, None)
    assert work.overhead_gib == pytest.approx(memory.CONTEXT_AND_KERNELS_GIB + memory.ALLOCATOR_SLACK_GIB)
    assert needed.total_gib == pytest.approx(needed.allocator_gib + work.overhead_gib)
    # A card the context, kernels and slack alone fill is refused, whatever the plan, with what to do.
    with pytest.raises(memory.DoesNotFit, match="leaves nothing for PyTorch's tensors.*--max_gpu_memory"):
        memory.plan_for(request, work_2b.config, work_2b.latent, None, 1, 128, True, 2, work.overhead_gib)


def test_auto_fits_the_card_with_the_overhead_subtracted(work_2b):
    plans = memory.ladder(memory.Plan(), work_2b.config["num_layers"])
    bare = [memory.estimate(work_2b, p).total_gib for p in plans]
    # A card that holds the tensors of the second plan but not them and the overhead: a later plan is taken.
    budget = bare[1] + 0.5
    assert memory.fit(work_2b, memory.Plan(), budget, auto=True)[0] == plans[1]
    plan, needed = memory.fit(replace(work_2b, overhead_gib=1.0), memory.Plan(), budget, auto=True)
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


def test_recheck_after_the_first_step(work_2b):
    planned = memory.CONTEXT_AND_KERNELS_GIB
    work = replace(work_2b, overhead_gib=planned + memory.ALLOCATOR_SLACK_GIB)
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


def test_host_memory_of_a_plan(work_2b):
    swap = memory.Plan("full", True, 10)
    needed = memory.estimate(work_2b, swap)
    host = host_memory.estimate(work_2b, swap, needed, text_encoder_gib=8.9)
    activations, swapped = (b / memory.GIB for b in memory.pinned_bytes(work_2b, swap))
    assert host.pinned_gib == pytest.approx(activations + swapped) and activations > 0 and swapped > 0
    assert host.encoding_gib == 8.9 and host.peak_gib == max(host.encoding_gib, host.loading_gib, host.training_gib)
    assert host.training_gib > host.pinned_gib  # the VAE and the optimizer's state wait there while validating
    assert host_memory.estimate(work_2b, swap, needed, 8.9, processes=2).peak_gib == pytest.approx(2 * host.peak_gib)
    assert host_memory.refusal(work_2b, swap, needed, 8.9, available=None) is None
    assert host_memory.refusal(work_2b, swap, needed, 8.9, available=host.peak_gib) is None


def test_a_plan_the_host_cannot_hold_is_refused_with_what_would_fit(work_2b):
    layers = work_2b.config["num_layers"]
    heavy = memory.Plan("full", True, layers)
    hosts = {p: host_memory.estimate(work_2b, p, memory.estimate(work_2b, p), 0.0)
             for p in memory.ladder(memory.Plan("full"), layers)}
    available = (hosts[heavy].peak_gib + hosts[memory.Plan("full", True, layers // 2)].peak_gib) / 2
    message = host_memory.refusal(work_2b, heavy, memory.estimate(work_2b, heavy), 0.0, available)
    assert "MemAvailable" in message and "would fit it" in message and "\n" not in message
    flags = message.split(": ")[-1].split(" would fit")[0]
    named = next(p for p in hosts if p.flags() == flags)
    assert hosts[named].peak_gib <= available < hosts[heavy].peak_gib
    assert all(hosts[p].peak_gib > available for p in hosts if p.blocks_to_swap > named.blocks_to_swap)
    # T5 on the CPU alone is more than the host has: the prompts must be encoded elsewhere.
    t5 = host_memory.refusal(work_2b, memory.Plan("full"), memory.estimate(work_2b, memory.Plan("full")), 50.0, 20.0)
    assert "T5 encodes the prompts on the CPU" in t5


def test_available_host_memory_reads_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16384000 kB\nMemAvailable:    2097152 kB\n")
    assert host_memory.available_gib(meminfo) == 2.0
    assert host_memory.available_gib(tmp_path / "none") is None


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
