"""The trainer end to end, through its command line, on the tiny random models and generated clips."""

import os
import shutil
import subprocess
import sys
import time

import decord
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline
from transformers import T5EncoderModel

from helpers import (REPO, check, load_lora_and_collect_warnings, lora, max_abs_diff, run_main, run_script, summary,
                     train_argv, tree_state)
from cogvideox_lora import models
from cogvideox_lora.comfyui import COMFYUI_LORA_NAME
from cogvideox_lora.synthetic import write_clips

LORA_FILE = "pytorch_lora_weights.safetensors"


def assert_trained(output_dir, steps):
    """The run finished: summary, LoRA file with finite weights that moved away from the zero-initialised B."""
    info = summary(output_dir)
    assert info["steps"] == steps
    weights = lora(output_dir)
    assert weights and all(k.startswith("transformer.") for k in weights)
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert max(w.abs().max().item() for k, w in weights.items() if "lora_B" in k) > 0
    return info, weights


# ---------------------------------------------------------------------------------------------------------------
# A full run through `accelerate launch`: checkpoints, LoRA, summary, validation videos, TensorBoard.


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model_dir, tiny_dataset_dir):
    root = tmp_path_factory.mktemp("full_run")
    output_dir = root / "out"
    argv = train_argv(tiny_model_dir, tiny_dataset_dir, output_dir, root / "cache",
                      "--max_train_steps", 4, "--checkpointing_steps", 2, "--learning_rate", "1e-2",
                      "--lora_alpha", 8, "--validation_prompt", "a red square:::a brown bear in the forest",
                      report_to="tensorboard")
    result = check(run_script(argv, launcher=True))
    return output_dir, result


def test_full_run_writes_everything(full_run):
    output_dir, result = full_run
    info, weights = assert_trained(output_dir, 4)

    assert sorted(p.name for p in output_dir.glob("*checkpoint*")) == ["checkpoint-2", "checkpoint-4"]
    for name in ("checkpoint-2", "checkpoint-4"):
        files = {p.name for p in (output_dir / name).iterdir()}
        assert {LORA_FILE, COMFYUI_LORA_NAME, "optimizer.bin"} <= files
        # Only the adapter is saved, never the frozen transformer.
        assert not any(f.startswith(("model", "diffusion_pytorch_model")) for f in files)
    assert max_abs_diff(lora(output_dir / "checkpoint-4"), weights) == 0
    assert max_abs_diff(lora(output_dir / "checkpoint-2"), weights) > 0

    assert info["resumed_at_step"] == 0 and info["clips"] == 4
    assert info["encoded_clips"] == 4
    assert info["encoded_prompts"] == 4 + 2 + 1  # clips' prompts, validation prompts, the empty negative prompt
    assert info["lora"] == str(output_dir / LORA_FILE)
    assert (output_dir / COMFYUI_LORA_NAME).is_file()  # core ComfyUI's copy, beside it by default
    videos = sorted((output_dir / "validation").glob("step-*.mp4"))
    assert [str(v) for v in videos] == sorted(info["validation_videos"])
    assert len(videos) == 2
    for video in videos:
        assert video.name.startswith("step-000004_")
        reader = decord.VideoReader(str(video))
        assert len(reader) == 9
        assert reader[0].shape == (48, 64, 3)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_files = list((output_dir / "logs").rglob("events.out.tfevents.*"))
    assert event_files
    scalars, images = {}, set()
    for event_file in event_files:
        events = EventAccumulator(str(event_file), size_guidance={"scalars": 0, "images": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars[tag] = [e.step for e in events.Scalars(tag)]
        images |= set(events.Tags()["images"])
    assert scalars["loss"] == [1, 2, 3, 4]
    assert scalars["lr"] == [1, 2, 3, 4] and "grad_norm" in scalars
    assert {"validation/p0_v0", "validation/p1_v0"} <= images


def _generate(pipe):
    return pipe(prompt="a red square drifting across a grey background", negative_prompt="", num_frames=9,
                height=48, width=64, num_inference_steps=2, guidance_scale=6.0, max_sequence_length=16,
                output_type="np", generator=torch.Generator().manual_seed(0)).frames


def test_lora_loads_in_a_stock_pipeline_and_changes_the_video(full_run, tiny_model_dir):
    output_dir, _ = full_run
    pipe = CogVideoXPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    base = _generate(pipe)

    assert load_lora_and_collect_warnings(pipe, output_dir) == []

    # Every tensor of the file landed in the transformer, at the strength it was trained at (alpha 8 / rank 4).
    assert pipe.get_list_adapters() == {"transformer": ["default_0"]}
    saved = lora(output_dir)
    for key, value in saved.items():
        module_path, kind, _ = key[len("transformer."):].rsplit(".", 2)
        module = pipe.transformer.get_submodule(module_path)
        assert torch.equal(getattr(module, kind)["default_0"].weight, value), key
        assert module.scaling["default_0"] == pytest.approx(2.0)

    with_lora = _generate(pipe)
    assert with_lora.shape == base.shape == (1, 9, 48, 64, 3)
    assert np.isfinite(with_lora).all()
    difference = np.abs(with_lora - base)
    assert difference.max() > 0.02 and difference.mean() > 1e-3, (difference.max(), difference.mean())
    pipe.disable_lora()
    np.testing.assert_allclose(_generate(pipe), base, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Resuming


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory, tiny_model_dir, tiny_dataset_dir):
    """A: 6 steps straight. B1: 3 steps, asked to resume from an empty folder. B2: B1 resumed to 6 steps.

    6 steps over 4 clips cross an epoch, and B2 starts from B1's last checkpoint (3), not checkpoint-2.
    """
    root = tmp_path_factory.mktemp("resume")
    common = ["--checkpointing_steps", 2, "--learning_rate", "1e-3", "--lr_scheduler", "constant"]

    def argv(name, steps, *extra):
        return train_argv(tiny_model_dir, tiny_dataset_dir, root / name, root / f"cache-{name}",
                          "--max_train_steps", steps, *common, *extra)

    check(run_script(argv("A", 6)))
    (root / "B").mkdir()  # an empty folder
    check(run_script(argv("B", 3, "--resume_from_checkpoint", "latest")))
    after_b1 = lora(root / "B")
    b1_summary = summary(root / "B")
    check(run_script(argv("B", 6, "--resume_from_checkpoint", "latest")))
    return root, after_b1, b1_summary


def test_resume_is_exact(resume_runs):
    root, after_b1, b1_summary = resume_runs
    _, straight = assert_trained(root / "A", 6)
    info, resumed = assert_trained(root / "B", 6)

    assert b1_summary["resumed_at_step"] == 0  # --resume_from_checkpoint latest on an empty folder: a new run
    assert info["resumed_at_step"] == 3
    assert sorted(p.name for p in (root / "B").glob("checkpoint-*")) == [
        "checkpoint-2", "checkpoint-3", "checkpoint-4", "checkpoint-6"]
    # The same adapter at step 2, and the same at the end: data order, noise, optimizer and schedule resumed.
    assert max_abs_diff(lora(root / "A" / "checkpoint-2"), lora(root / "B" / "checkpoint-2")) == 0
    assert max_abs_diff(straight, resumed) <= 1e-6
    assert max_abs_diff(lora(root / "A" / "checkpoint-4"), lora(root / "B" / "checkpoint-4")) <= 1e-6
    # ...which is not trivially so: the last 3 steps moved the weights.
    assert max_abs_diff(after_b1, resumed) > 1e-4


def test_a_new_run_into_a_folder_with_checkpoints_is_refused(resume_runs, tiny_model_dir, tiny_dataset_dir,
                                                            tmp_path):
    root, _, _ = resume_runs
    output_dir = tmp_path / "earlier"
    shutil.copytree(root / "B", output_dir)
    before = tree_state(output_dir)
    cache = tmp_path / "cache"
    with pytest.raises(SystemExit) as exit_:
        run_main(train_argv(tiny_model_dir, tiny_dataset_dir, output_dir, cache, "--max_train_steps", 2))
    assert exit_.value.code not in (0, None)
    assert "--resume_from_checkpoint latest" in str(exit_.value.code)
    assert "checkpoint-6" in str(exit_.value.code)
    assert tree_state(output_dir) == before
    assert not cache.exists()


def test_resume_latest_when_already_finished_trains_no_more(resume_runs, tiny_model_dir, tiny_dataset_dir, tmp_path):
    root, _, _ = resume_runs
    output_dir = tmp_path / "done"
    shutil.copytree(root / "B", output_dir)
    run_main(train_argv(tiny_model_dir, tiny_dataset_dir, output_dir, tmp_path / "cache", "--max_train_steps", 6,
                        "--checkpointing_steps", 2, "--resume_from_checkpoint", "latest"))
    assert summary(output_dir)["resumed_at_step"] == 6
    assert max_abs_diff(lora(output_dir), lora(root / "B")) == 0


# ---------------------------------------------------------------------------------------------------------------
# The latent cache


def test_latent_cache_is_reused_and_invalidated(tmp_path, tiny_model_dir, tiny_dataset_dir, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset_dir, data)
    cache = tmp_path / "cache"
    calls = {"vae": 0, "t5": 0}
    vae_encode, t5_forward = AutoencoderKLCogVideoX.encode, T5EncoderModel.forward

    def counting_encode(self, *args, **kwargs):
        calls["vae"] += 1
        return vae_encode(self, *args, **kwargs)

    def counting_forward(self, *args, **kwargs):
        calls["t5"] += 1
        return t5_forward(self, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKLCogVideoX, "encode", counting_encode)
    monkeypatch.setattr(T5EncoderModel, "forward", counting_forward)

    def run(name, *extra):
        calls.update(vae=0, t5=0)
        run_main(train_argv(tiny_model_dir, data, tmp_path / name, cache, "--max_train_steps", 2, *extra))
        info = summary(tmp_path / name)
        return info["encoded_clips"], info["encoded_prompts"], calls["vae"], calls["t5"]

    assert run("first") == (4, 5, 4, 5)  # 4 clips; 4 prompts and the empty negative prompt

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although everything was cached")

    with monkeypatch.context() as m:
        m.setattr(models, "load_text_encoder", refuse)
        m.setattr(models, "load_vae", refuse)
        assert run("second") == (0, 0, 0, 0)
    # Read back from the cache, the run trains exactly as the one that encoded.
    assert max_abs_diff(lora(tmp_path / "first"), lora(tmp_path / "second")) == 0

    # A changed clip (same name, other content) is encoded again, alone.
    write_clips(tmp_path / "other", num_clips=1, num_frames=25, fps=8, id_offset=5)
    shutil.copy(tmp_path / "other" / "videos" / "clip_005.mp4", data / "videos" / "clip_001.mp4")
    assert run("changed_clip") == (1, 0, 1, 0)
    # Settings that change what a clip's frames are: every clip again, the prompts not.
    assert run("changed_fps", "--fps", 4) == (4, 0, 4, 0)
    assert run("changed_height", "--height", 64) == (4, 0, 4, 0)
    # Random flips need the mirrored latents too.
    assert run("flip", "--random_flip", 0.5) == (4, 0, 8, 0)
    # A new prompt is encoded alone.
    assert run("validation", "--validation_prompt", "a new validation prompt") == (0, 1, 0, 1)
    assert run("again", "--fps", 4) == (0, 0, 0, 0)


# ---------------------------------------------------------------------------------------------------------------
# Options


def test_8bit_adam_on_cpu(tmp_path, tiny_model_dir, tiny_dataset_dir):
    out = tmp_path / "out"
    run_main(train_argv(tiny_model_dir, tiny_dataset_dir, out, tmp_path / "cache", "--max_train_steps", 2,
                        "--use_8bit_adam", "--learning_rate", "1e-3"))
    assert_trained(out, 2)
    state = torch.load(out / "checkpoint-2" / "optimizer.bin", weights_only=False)["state"]
    per_param = next(iter(state.values()))
    # bitsandbytes' state (state1/state2, at the top or inside its quantisation state), not torch's exp_avg.
    nested = per_param.get("__bnb_optimizer_quant_state__", per_param)
    assert "state1" in nested and "exp_avg" not in per_param


def test_gradient_accumulation_and_checkpointing(tmp_path, tiny_model_dir, tiny_dataset_dir):
    cache = tmp_path / "cache"
    common = ["--max_train_steps", 2, "--gradient_accumulation_steps", 2, "--learning_rate", "1e-3"]
    run_main(train_argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "gc", cache, *common,
                        "--gradient_checkpointing"))
    run_main(train_argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "plain", cache, *common))
    run_main(train_argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "no_ga", cache, "--max_train_steps", 2,
                        "--learning_rate", "1e-3"))
    _, checkpointed = assert_trained(tmp_path / "gc", 2)
    _, plain = assert_trained(tmp_path / "plain", 2)
    _, no_accumulation = assert_trained(tmp_path / "no_ga", 2)
    # Recomputing activations changes nothing but memory; accumulating 2 batches is another update.
    assert max_abs_diff(checkpointed, plain) <= 1e-6
    assert max_abs_diff(plain, no_accumulation) > 1e-5


def test_a_steps_time_leaves_out_the_checkpoint_before_it(tmp_path, tiny_model_dir, tiny_dataset_dir, monkeypatch):
    import train_cogvideox_lora

    # Each checkpoint "takes" 1,000 s of the clock the steps are timed with.
    offset, clock, save = [0.0], time.perf_counter, train_cogvideox_lora.save_checkpoint
    monkeypatch.setattr(time, "perf_counter", lambda: clock() + offset[0])

    def slow_save(*args, **kwargs):
        save(*args, **kwargs)
        offset[0] += 1000.0

    monkeypatch.setattr(train_cogvideox_lora, "save_checkpoint", slow_save)
    before = time.time()
    run_main(train_argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "out", tmp_path / "cache", "--max_train_steps", 4,
                        "--checkpointing_steps", 1))
    info = summary(tmp_path / "out")
    assert offset[0] == 4000.0  # checkpoints after steps 1 to 3, each before a timed step, and at the end
    assert 0 < info["median_step_time_s"] < 100
    assert before < info["first_step_done_at"] < time.time()


def test_bf16_mixed_precision_on_cpu_keeps_fp32_lora(tmp_path, tiny_model_dir, tiny_dataset_dir):
    out = tmp_path / "out"
    run_main(train_argv(tiny_model_dir, tiny_dataset_dir, out, tmp_path / "cache", "--max_train_steps", 2,
                        "--mixed_precision", "bf16", "--validation_prompt", "a red square"))
    info, weights = assert_trained(out, 2)
    assert {w.dtype for w in weights.values()} == {torch.float32}
    assert {w.dtype for w in lora(out / "checkpoint-2").values()} == {torch.float32}
    assert len(info["validation_videos"]) == 1
    run_main(train_argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "fp32", tmp_path / "cache",
                        "--max_train_steps", 2))
    # The frozen model did run in bf16: the result is close to, but not the same as, the fp32 run's.
    difference = max_abs_diff(weights, lora(tmp_path / "fp32"))
    assert 0 < difference < 1e-3


def test_tiny_5b_with_rotary_embeddings_trains(tmp_path, tiny_5b_model_dir, tiny_dataset_dir):
    out = tmp_path / "out"
    run_main(train_argv(tiny_5b_model_dir, tiny_dataset_dir, out, tmp_path / "cache", "--max_train_steps", 2,
                        "--validation_prompt", "a brown bear", "--validation_steps", 1))
    info, weights = assert_trained(out, 2)
    assert len(info["validation_videos"]) == 1
    # --validation_steps 1: a video after step 1 as well as the last one.
    assert sorted(p.name[:11] for p in (out / "validation").glob("step-*.mp4")) == ["step-000001", "step-000002"]
    pipe = CogVideoXPipeline.from_pretrained(tiny_5b_model_dir)
    pipe.load_lora_weights(out)
    assert pipe.get_list_adapters() == {"transformer": ["default_0"]}


@pytest.mark.parametrize("limit", [1, 2])
def test_checkpoints_total_limit_keeps_the_newest(tmp_path, tiny_model_dir, tiny_dataset_dir, limit):
    out = tmp_path / "out"
    run_main(train_argv(tiny_model_dir, tiny_dataset_dir, out, tmp_path / "cache", "--max_train_steps", 4,
                        "--checkpointing_steps", 1, "--checkpoints_total_limit", limit))
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == \
        [f"checkpoint-{s}" for s in range(5 - limit, 5)]


# ---------------------------------------------------------------------------------------------------------------
# The command line


def test_bad_dataset_stops_early_naming_file_and_line(tmp_path, tiny_model_dir, tiny_dataset_dir):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset_dir, data)
    with open(data / "videos.txt", "a") as f:
        f.write("videos/missing.mp4\n")
    with open(data / "prompts.txt", "a") as f:
        f.write("a clip that is not there\n")
    (data / "videos" / "clip_002.mp4").write_bytes(b"garbage" * 100)
    output_dir = tmp_path / "out"
    started = time.perf_counter()
    result = run_script(train_argv(tiny_model_dir, data, output_dir, tmp_path / "cache", "--max_train_steps", 2))
    elapsed = time.perf_counter() - started
    assert result.returncode != 0
    assert f"{data / 'videos.txt'}:5: {data / 'videos' / 'missing.mp4'} does not exist" in result.stderr
    assert f"{data / 'videos.txt'}:3: {data / 'videos' / 'clip_002.mp4'} cannot be decoded" in result.stderr
    assert "Traceback" not in result.stderr
    assert not output_dir.exists() and not (tmp_path / "cache").exists()
    assert elapsed < 30, elapsed  # most of it importing torch: no model is loaded


# ---------------------------------------------------------------------------------------------------------------
# The benchmark of the trainer, in tiny mode


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
    assert float(two["scaling (x)"]) > 0 and float(one["estimate, on the card (GiB)"]) > 0
    # From `accelerate launch` to the first step's end holds the trainer's start to the step's start, and more.
    assert float(one["launch to first step done (s)"]) > float(one["to first step (s)"]) > 0
    assert summary(tmp_path / "out-2b")["steps"] == 2 and summary(tmp_path / "out-2b-x2")["processes"] == 2


def test_a_run_keeps_what_was_there_before_out_of_full_collections_and_gives_it_back():
    import gc

    import train_cogvideox_lora

    with train_cogvideox_lora.objects_kept_out_of_full_collections():
        assert gc.get_freeze_count() > 100_000  # torch, diffusers...: not walked by the run's full collections
    assert gc.get_freeze_count() == 0
