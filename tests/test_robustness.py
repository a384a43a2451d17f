"""Issue 4, hard to break: bad datasets and settings stop before any model loads; signals, kills, NaN and
damaged caches or checkpoints never cost more than the work since the last checkpoint, nor leave anything bad."""

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import (REPO, SCRIPT, check, lora, max_abs_diff, run_main, run_script, subprocess_env, summary,
                     train_argv, tree_state)
from cogvideox_lora import args as args_module, models
from cogvideox_lora.args import parse_args, tracker_config
from cogvideox_lora.data import epoch_batches
from cogvideox_lora.latent_cache import LatentCache
from cogvideox_lora.synthetic import write_clips

STEPS, EVERY = 12, 4
TRAINING = ["--max_train_steps", STEPS, "--checkpointing_steps", EVERY, "--learning_rate", "1e-3",
            "--lr_scheduler", "cosine"]
SECRET = "hf_robustnessTestSecretTokenDoNotLog0123"


def exit_message(argv) -> str:
    """run_main(argv), which must refuse: the message it exits with."""
    with pytest.raises(SystemExit) as exit_:
        run_main(argv)
    assert exit_.value.code not in (0, None)
    return str(exit_.value.code)


# ---------------------------------------------------------------------------------------------------------------
# The dataset: every problem at once, before any model, nothing written


def test_every_dataset_problem_is_reported_at_once(tmp_path, tiny_model_dir, tiny_dataset_dir, no_models):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset_dir, data)
    write_clips(tmp_path / "short", num_clips=1, num_frames=5, fps=8)
    shutil.copy(tmp_path / "short" / "videos" / "clip_000.mp4", data / "videos" / "short.mp4")
    (data / "videos" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + b"not a video" * 200)
    (data / "videos.txt").write_text("videos/clip_000.mp4\nvideos/missing.mp4\nvideos/broken.mp4\n"
                                     "videos/short.mp4\nvideos/clip_001.mp4\n")
    # Line 3 is blank: the third prompt was emptied, so the files part there and videos.txt is a line longer.
    (data / "prompts.txt").write_text("a red square\na bear\n\na car\na mouse\n")
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("mine")
    before = tree_state(output_dir)

    started = time.perf_counter()
    message = exit_message(train_argv(tiny_model_dir, data, output_dir, tmp_path / "cache", *TRAINING))
    elapsed = time.perf_counter() - started

    prompts, videos = data / "prompts.txt", data / "videos.txt"
    assert f"{prompts} has 4 prompts but {videos} has 5 clips" in message
    assert "They part at prompts.txt line 4 against videos.txt line 3" in message
    assert "videos.txt line 5 is the first with no partner in prompts.txt" in message
    assert f"{videos}:2: {data / 'videos' / 'missing.mp4'} does not exist" in message
    assert f"{videos}:3: {data / 'videos' / 'broken.mp4'} cannot be decoded" in message
    assert f"{videos}:4: {data / 'videos' / 'short.mp4'} gives 5 frames" in message
    assert "lower --max_num_frames to 5" in message
    assert "4 problem(s) in the dataset" in message
    assert tree_state(output_dir) == before
    assert not (tmp_path / "cache").exists()
    assert elapsed < 10, elapsed


def test_table_dataset_problems_are_reported_together(tmp_path, tiny_model_dir, tiny_dataset_dir, no_models):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset_dir, data)
    (data / "meta.csv").write_text("video,caption\nvideos/clip_000.mp4,a red square\nvideos/clip_001.mp4,\n"
                                   "videos/gone.mp4,a bear\n")
    message = exit_message(train_argv(tiny_model_dir, data, tmp_path / "out", tmp_path / "cache",
                                      "--dataset_file", "meta.csv"))
    # An index problem and a clip problem in the same message.
    assert f"{data / 'meta.csv'}:3: empty prompt: write a caption for videos/clip_001.mp4" in message
    assert f"{data / 'meta.csv'}:4: {data / 'videos' / 'gone.mp4'} does not exist" in message
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_missing_root_and_index_files(tmp_path, tiny_model_dir, no_models):
    message = exit_message(train_argv(tiny_model_dir, tmp_path / "nowhere", tmp_path / "out", tmp_path / "cache"))
    assert f"{tmp_path / 'nowhere'}: --instance_data_root is not a folder" in message

    (tmp_path / "empty").mkdir()
    message = exit_message(train_argv(tiny_model_dir, tmp_path / "empty", tmp_path / "out", tmp_path / "cache"))
    assert f"{tmp_path / 'empty' / 'prompts.txt'}: not found" in message
    assert f"{tmp_path / 'empty' / 'videos.txt'}: not found" in message
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_skip_bad_videos_trains_on_the_rest_with_a_warning(tmp_path, tiny_model_dir, tiny_dataset_dir, caplog):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset_dir, data)
    (data / "videos" / "broken.mp4").write_bytes(b"garbage" * 100)
    with open(data / "videos.txt", "a") as f:
        f.write("videos/missing.mp4\nvideos/broken.mp4\n")
    with open(data / "prompts.txt", "a") as f:
        f.write("not there\nnot a video\n")
    out = tmp_path / "out"
    caplog.set_level(logging.WARNING)
    run_main(train_argv(tiny_model_dir, data, out, tmp_path / "cache", "--max_train_steps", 1, "--skip_bad_videos"))
    assert summary(out)["clips"] == 4
    warning = next(r.getMessage() for r in caplog.records if "--skip_bad_videos" in r.getMessage())
    assert "Leaving out 2 clip(s)" in warning
    assert f"{data / 'videos.txt'}:5: " in warning and f"{data / 'videos.txt'}:6: " in warning


# ---------------------------------------------------------------------------------------------------------------
# Settings: all problems at once, before any model


def test_bad_settings_are_all_reported_before_anything(tmp_path, tiny_model_dir, tiny_dataset_dir, capsys,
                                                       monkeypatch, no_models):
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("mine")
    # bitsandbytes is installed here: the flag alone is fine...
    parse_args(train_argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "out", tmp_path / "cache", "--use_8bit_adam"))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # ...and now it is not
    with pytest.raises(SystemExit) as exit_:
        run_main(train_argv(tiny_model_dir, tiny_dataset_dir, a_file, tmp_path / "cache", "--use_8bit_adam",
                            "--height", 50, "--width", 8, "--max_num_frames", 10, "--validation_prompt", " ::: ",
                            "--resume_from_checkpoint", tmp_path / "checkpoint-3", "--checkpoints_total_limit", 0))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    expected = ["--height 50 is not a multiple of 16 (VAE x8, patch x2): use 48 or 64.",
                "--width 8 is not a multiple of 16 (VAE x8, patch x2): use 16.",
                "--max_num_frames 10 is not 4k+1: use 9 or 13.",
                "--validation_prompt ' ::: ' holds no prompt once split by ':::'.",
                "--checkpoints_total_limit must be at least 1, not 0.",
                "--use_8bit_adam needs bitsandbytes: pip install bitsandbytes",
                f"--output_dir {a_file}: {a_file} is a file, not a folder",
                f"--resume_from_checkpoint {tmp_path / 'checkpoint-3'} does not exist"]
    assert [e for e in expected if e not in err] == []
    assert a_file.read_text() == "mine" and not (tmp_path / "cache").exists()


def test_output_dir_below_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(SystemExit):
        parse_args(["--pretrained_model_name_or_path", "m", "--instance_data_root", str(tmp_path),
                    "--output_dir", str(tmp_path / "file" / "run")])
    assert f"{tmp_path / 'file'} is a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("model, precision, warned", [("5b", "fp16", True), ("5b", "bf16", False),
                                                      ("2b", "fp16", False)])
def test_fp16_with_a_5b_model_warns(tmp_path, tiny_model_dir, tiny_5b_model_dir, tiny_dataset_dir, caplog, no_models,
                                    model, precision, warned, monkeypatch):
    monkeypatch.setattr(args_module, "gpu_available", lambda: True)  # fp16 is refused on a CPU before this
    caplog.set_level(logging.WARNING)
    run_main(train_argv(tiny_5b_model_dir if model == "5b" else tiny_model_dir, tiny_dataset_dir, tmp_path / "out",
                        tmp_path / "cache", "--mixed_precision", precision, "--dry_run"))
    warnings = [r.getMessage() for r in caplog.records if "NaN" in r.getMessage()]
    assert warnings == (["fp16 with this model (rotary position embeddings: the CogVideoX-5B family, trained in bf16) "
                         "is known to give NaN losses: use --mixed_precision bf16."] if warned else [])
    assert not (tmp_path / "out").exists()


def test_resuming_never_overwrites_another_run(tmp_path, tiny_model_dir, tiny_dataset_dir, no_models):
    def attempt(output_dir, resume):
        return exit_message(train_argv(tiny_model_dir, tiny_dataset_dir, output_dir, tmp_path / "cache",
                                       "--resume_from_checkpoint", resume, "--dry_run"))

    run = tmp_path / "run"
    for name in ("checkpoint-2", "checkpoint-4"):
        (run / name).mkdir(parents=True)
    (run / "pytorch_lora_weights.safetensors").write_bytes(b"mine")
    lone_lora = tmp_path / "lone"
    lone_lora.mkdir()
    (lone_lora / "pytorch_lora_weights.safetensors").write_bytes(b"mine")
    before = tree_state(tmp_path)

    message = attempt(run, str(run / "checkpoint-2"))
    assert "holds checkpoints newer than checkpoint-2 (checkpoint-4), which this run would overwrite" in message
    message = attempt(lone_lora, str(run / "checkpoint-4"))
    assert f"{lone_lora} holds another run (pytorch_lora_weights.safetensors)" in message
    message = attempt(lone_lora, "latest")
    assert "no checkpoint-N to continue from: choose another --output_dir" in message
    assert tree_state(tmp_path) == before

    # What a run killed while writing its first checkpoint left is no earlier run to protect.
    killed = tmp_path / "killed"
    (killed / ".checkpoint-2.partial").mkdir(parents=True)
    run_main(train_argv(tiny_model_dir, tiny_dataset_dir, killed, tmp_path / "cache", "--resume_from_checkpoint",
                        "latest", "--dry_run"))


# ---------------------------------------------------------------------------------------------------------------
# Issue 24: what the first hour meets, refused before any model loads


@pytest.fixture
def unwritable(tmp_path):
    """A folder the run cannot write in: read-only for a user; root writes anywhere but in sysfs."""
    if os.geteuid() == 0:
        yield Path("/sys")
        return
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)


@pytest.mark.parametrize("flag", ["--output_dir", "--latent_cache_dir", "--logging_dir"])
def test_every_folder_the_run_writes_is_tried_before_any_model(tmp_path, tiny_model_dir, tiny_dataset_dir, no_models,
                                                                unwritable, flag):
    folders = {"--output_dir": tmp_path / "out", "--latent_cache_dir": tmp_path / "cache", "--logging_dir": "logs"}
    folders[flag] = unwritable / "new" / "run"
    argv = train_argv(tiny_model_dir, tiny_dataset_dir, folders["--output_dir"], folders["--latent_cache_dir"],
                      "--logging_dir", folders["--logging_dir"], "--max_train_steps", 1, report_to="tensorboard")
    message = exit_message(argv)
    assert message.startswith(f"error: {flag} {unwritable / 'new' / 'run'}: the run cannot create new in it: "
                              f"{unwritable} is not writable")
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_trying_the_folders_leaves_nothing_behind(tmp_path, tiny_model_dir, tiny_dataset_dir, no_models):
    (tmp_path / "out").mkdir()
    before = tree_state(tmp_path)
    run_main(train_argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "out" / "run", tmp_path / "cache", "--dry_run",
                        report_to="tensorboard"))
    assert tree_state(tmp_path) == before and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("batch_size, world_size", [(5, "1"), (2, "3")])
def test_a_batch_that_cannot_fill_is_refused_before_any_model(tmp_path, tiny_model_dir, tiny_dataset_dir, no_models,
                                                              monkeypatch, batch_size, world_size):
    monkeypatch.setenv("WORLD_SIZE", world_size)  # as accelerate launch --num_processes 3 sets it in each process
    message = exit_message(train_argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "out", tmp_path / "cache",
                                      "--train_batch_size", batch_size, "--max_train_steps", 1))
    assert (f"4 clip(s) cannot fill one batch of {batch_size * int(world_size)} (--train_batch_size {batch_size} x "
            f"{world_size} process(es)), whose clips are all of one size (frames x height x width): 4 of 9x48x64. "
            f"Lower --train_batch_size or add clips.") in message
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("off, said", [(["--validation_prompt", ""], "--validation_prompt ''"),
                                       (["--num_validation_videos", 0], "--num_validation_videos 0"),
                                       ([], "no --validation_prompt")])
def test_validation_turned_off_is_said(tmp_path, tiny_model_dir, tiny_dataset_dir, no_models, caplog, off, said):
    caplog.set_level(logging.INFO)
    run_main(train_argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "out", tmp_path / "cache",
                        *(["--validation_prompt", "a bear"] + off if off else []), "--dry_run"))
    assert f"Validation is off ({said}): no validation videos are made." in caplog.messages


def test_tracker_config_leaves_out_credentials():
    args = Namespace(hub_token="hf_x", wandb_api_key="k", password="p", client_secret="s", HF_TOKEN="t",
                     id_token="DISNEY", rank=4, learning_rate=1e-4, output_dir="out", gradient_checkpointing=True,
                     validation_prompt=None)
    assert tracker_config(args) == {"id_token": "DISNEY", "rank": 4, "learning_rate": 1e-4, "output_dir": "out",
                                    "gradient_checkpointing": True}


# ---------------------------------------------------------------------------------------------------------------
# Signals and kills, through the real command line


class Trainer:
    """The trainer in a subprocess whose output (stdout and stderr together) is read as it comes."""

    def __init__(self, command, **env):
        self.process = subprocess.Popen(command, cwd=REPO, env={**subprocess_env(), **env}, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT)
        self.chunks = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for chunk in iter(lambda: os.read(self.process.stdout.fileno(), 65536), b""):
            self.chunks.append(chunk)

    @property
    def output(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    def steps_done(self) -> int:
        return max(map(int, re.findall(rf"\| *(\d+)/{STEPS} \[", self.output)), default=0)

    def wait_until(self, condition, timeout=120):
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.process.poll() is None, f"the trainer ended first:\n{self.output[-6000:]}"
            assert time.monotonic() < deadline, f"timed out:\n{self.output[-6000:]}"
            time.sleep(0.02)

    def finish(self, timeout=300) -> int:
        returncode = self.process.wait(timeout)
        self.reader.join(10)
        return returncode


def script(*argv) -> list[str]:
    return [sys.executable, str(SCRIPT), *map(str, argv)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_model_dir, tiny_dataset_dir):
    """An uninterrupted run with a Hugging Face token in its environment, and its argv maker."""
    root = tmp_path_factory.mktemp("robust")

    def argv(name, *extra, report_to="none"):
        return train_argv(tiny_model_dir, tiny_dataset_dir, root / name, root / "cache", *TRAINING, *extra,
                          report_to=report_to)

    trainer = Trainer(script(*argv("straight", report_to="tensorboard")), HF_TOKEN=SECRET)
    assert trainer.finish() == 0, trainer.output[-6000:]
    return root, argv, trainer.output


def test_no_token_is_logged(straight):
    root, _, output = straight
    logged = [output.encode()] + [p.read_bytes() for p in (root / "straight").rglob("*") if p.is_file()]
    assert any(b"learning_rate" in data for data in logged[1:])  # the settings were logged to TensorBoard...
    assert not any(SECRET.encode() in data for data in logged)  # ...and the token nowhere


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_ends_as_the_straight_one(straight):
    root, argv, _ = straight
    out = root / "sigterm"
    trainer = Trainer(script(*argv("sigterm")))
    trainer.wait_until(lambda: trainer.steps_done() >= 2)
    trainer.process.send_signal(signal.SIGTERM)
    assert trainer.finish() == 1
    stopped = re.search(r"Stopped by a signal after step (\d+); checkpoint-\1 is saved", trainer.output)
    assert stopped, trainer.output[-6000:]
    assert "SIGTERM: saving a checkpoint after this step" in trainer.output and "Traceback" not in trainer.output
    k = int(stopped.group(1))
    assert 2 <= k < STEPS
    assert f"checkpoint-{k}" in {p.name for p in out.iterdir()}
    assert not list(out.glob(".*partial")) and not (out / "pytorch_lora_weights.safetensors").exists()

    resumed = check(run_script(argv("sigterm", "--resume_from_checkpoint", "latest")))
    assert summary(out)["resumed_at_step"] == k
    assert max_abs_diff(lora(out), lora(root / "straight")) <= 1e-6
    assert max_abs_diff(lora(out), lora(out / f"checkpoint-{k}")) > 1e-4  # the resumed run did train
    assert f"Resuming from {out / f'checkpoint-{k}'}" in resumed.stderr


def test_signals_arriving_together_are_one_request_to_stop(straight):
    root, argv, _ = straight
    out = root / "together"
    trainer = Trainer(script(*argv("together")))
    trainer.wait_until(lambda: trainer.steps_done() >= 1)
    # As a launcher forwards them: the terminal's SIGINT, then SIGTERMs within milliseconds.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGTERM):
        trainer.process.send_signal(sig)
    assert trainer.finish() == 1
    stopped = re.search(r"Stopped by a signal after step (\d+); checkpoint-\1 is saved", trainer.output)
    assert stopped, trainer.output[-6000:]
    assert (out / f"checkpoint-{stopped.group(1)}").is_dir()


def test_a_second_request_stops_at_once(straight, tmp_path):
    root, argv, _ = straight
    wrapper, stalled = tmp_path / "stall_at_checkpoint.py", tmp_path / "stalled"
    wrapper.write_text(STALL_AT_CHECKPOINT)
    trainer = Trainer([sys.executable, str(wrapper), str(SCRIPT), *map(str, argv("twice"))],
                      STALL_IN=r"\.checkpoint-\d+\.partial", STALLED=str(stalled))
    trainer.wait_until(lambda: trainer.steps_done() >= 1)
    trainer.process.send_signal(signal.SIGINT)
    trainer.wait_until(stalled.exists)  # writing the checkpoint that the first request asked for (or step 4's)
    time.sleep(1.5)  # a second request, not part of the first
    trainer.process.send_signal(signal.SIGTERM)
    assert trainer.finish() == 128 + signal.SIGTERM
    assert "SIGINT: saving a checkpoint after this step" in trainer.output
    assert "Stopped by a signal" not in trainer.output
    assert not list((root / "twice").glob("checkpoint-*"))


STALL_AT_CHECKPOINT = """\
import os, re, runpy, sys, time
from pathlib import Path

import accelerate.accelerator

save_state = accelerate.accelerator.save_accelerator_state


def stall(output_dir, *args, **kwargs):
    # The LoRA is in the folder (accelerate's pre-hook wrote it), the optimizer and the rest are not yet.
    if re.fullmatch(os.environ["STALL_IN"], os.path.basename(output_dir)):
        Path(os.environ["STALLED"]).touch()
        time.sleep(600)
    return save_state(output_dir, *args, **kwargs)


accelerate.accelerator.save_accelerator_state = stall
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))  # as when the script itself is run
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_sigkill_while_writing_a_checkpoint_resumes_from_the_one_before(straight, tmp_path):
    root, argv, _ = straight
    out = root / "sigkill"
    wrapper = tmp_path / "stall_at_checkpoint.py"
    wrapper.write_text(STALL_AT_CHECKPOINT)
    stalled = tmp_path / "stalled"
    limit = ["--checkpoints_total_limit", 2]
    trainer = Trainer([sys.executable, str(wrapper), str(SCRIPT), *map(str, argv("sigkill", *limit))],
                      STALL_IN=rf"\.checkpoint-{2 * EVERY}\.partial", STALLED=str(stalled))
    trainer.wait_until(stalled.exists)
    partial = out / f".checkpoint-{2 * EVERY}.partial"
    assert (partial / "pytorch_lora_weights.safetensors").exists() and not (partial / "optimizer.bin").exists()
    trainer.process.kill()
    assert trainer.finish() == -signal.SIGKILL
    assert sorted(p.name for p in out.iterdir()) == [partial.name, f"checkpoint-{EVERY}"]

    # Not a checkpoint of this trainer's: pruning must leave it alone.
    (out / "checkpoint-best").mkdir()
    (out / "checkpoint-best" / "notes.txt").write_text("mine")
    check(run_script(argv("sigkill", *limit, "--resume_from_checkpoint", "latest")))
    assert summary(out)["resumed_at_step"] == EVERY
    assert max_abs_diff(lora(out), lora(root / "straight")) <= 1e-6
    assert {p.name for p in out.iterdir() if "checkpoint" in p.name} == {
        f"checkpoint-{STEPS - EVERY}", f"checkpoint-{STEPS}", "checkpoint-best"}
    assert (out / "checkpoint-best" / "notes.txt").read_text() == "mine"


class RunsCode:
    """Unpickling this runs code: it creates the file named by `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_checkpoint_pickles_are_never_trusted(straight, tmp_path, tiny_model_dir, tiny_dataset_dir):
    root, _, _ = straight
    checkpoint = root / "straight" / f"checkpoint-{EVERY}"
    # The LoRA is safetensors, the run's record (training_run.json) and the losses' record (losses.json) JSON:
    # neither is unpickled.
    pickled = sorted(p.name for p in checkpoint.iterdir() if p.suffix not in (".safetensors", ".json"))
    assert {"optimizer.bin", "scheduler.bin"} <= set(pickled)
    marker = tmp_path / "code-ran"
    for name in pickled:
        out = tmp_path / name
        shutil.copytree(checkpoint, out / checkpoint.name)
        torch.save(RunsCode(marker), out / checkpoint.name / name)
        argv = train_argv(tiny_model_dir, tiny_dataset_dir, out, root / "cache", "--max_train_steps", EVERY,
                          "--resume_from_checkpoint", "latest")
        if name.startswith("random_states"):
            run_main(argv)  # accelerate goes on without the RNG state, which no draw of ours depends on
        else:
            message = exit_message(argv)
            assert f"{out / checkpoint.name} cannot be resumed from (UnpicklingError: Weights only load failed" \
                   in message
        assert not marker.exists(), name


# ---------------------------------------------------------------------------------------------------------------
# Numerical faults


@pytest.mark.parametrize("fault", ["loss", "gradient"])
def test_a_non_finite_step_stops_the_run_and_saves_nothing_from_it(tmp_path, tiny_model_dir, tiny_dataset_dir,
                                                                   monkeypatch, fault):
    import train_cogvideox_lora

    calls = []
    compute_loss = train_cogvideox_lora.compute_loss

    def faulty(*args, **kwargs):
        loss = compute_loss(*args, **kwargs)
        calls.append(None)
        if len(calls) == 4:  # step 4, a checkpointing step
            if fault == "loss":
                return loss * float("nan")
            loss.register_hook(lambda grad: grad * float("inf"))  # a finite loss whose gradient overflows
        return loss

    monkeypatch.setattr(train_cogvideox_lora, "compute_loss", faulty)
    out = tmp_path / "out"
    argv = train_argv(tiny_model_dir, tiny_dataset_dir, out, tmp_path / "cache", "--max_train_steps", 6,
                      "--checkpointing_steps", 2)
    message = exit_message(argv)

    # Step 4 of batch size 1 trains the 4th clip of epoch 0's order.
    clip = (tiny_dataset_dir / "videos.txt").read_text().split()[epoch_batches([()] * 4, 1, 7, 0)[3][0]]
    expected = "the loss is nan" if fault == "loss" else "the gradient norm is"
    assert f"error: {expected}" in message and f"at step 4 (clips: {tiny_dataset_dir / clip})" in message
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]
    assert all(torch.isfinite(w).all() for w in lora(out / "checkpoint-2").values())

    if fault == "loss":
        monkeypatch.setattr(train_cogvideox_lora, "compute_loss", compute_loss)
        run_main(argv + ["--resume_from_checkpoint", "latest"])
        assert summary(out)["resumed_at_step"] == 2
        assert all(torch.isfinite(w).all() for w in lora(out).values())


# ---------------------------------------------------------------------------------------------------------------
# The latent cache


def test_damaged_cache_files_are_encoded_again(tmp_path, tiny_model_dir, tiny_dataset_dir, caplog):
    cache = tmp_path / "cache"
    run_main(train_argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "first", cache, "--max_train_steps", 2))
    files = {}
    for path in sorted(cache.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            files.setdefault("prompt_embeds" in f.keys(), []).append(path)
    videos, prompts = files[False], files[True]
    truncated, flipped, garbage = videos[0], videos[1], prompts[0]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    data = bytearray(flipped.read_bytes())
    data[-100] ^= 0xFF  # in the tensor bytes: the file still parses, only the checksum can tell
    flipped.write_bytes(bytes(data))
    garbage.write_bytes(b"\x00" * 64)

    caplog.set_level(logging.WARNING)
    run_main(train_argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "second", cache, "--max_train_steps", 2))
    info = summary(tmp_path / "second")
    assert (info["encoded_clips"], info["encoded_prompts"]) == (2, 1)
    assert max_abs_diff(lora(tmp_path / "first"), lora(tmp_path / "second")) == 0  # trained on the re-encoded
    messages = [r.getMessage() for r in caplog.records]
    assert any(str(truncated) in m and "unreadable" in m for m in messages)
    assert any(str(flipped) in m and "fails its checksum" in m for m in messages)
    assert any(str(garbage) in m for m in messages)
    assert all(LatentCache(cache).load(p.stem) is not None for p in cache.glob("*.safetensors"))


def _write_repeatedly(root, tensor):
    cache = LatentCache(root)
    for _ in range(30):
        cache.save("entry", {"latent_params": tensor})


def test_processes_writing_the_cache_at_once_never_corrupt_it(tmp_path, caplog):
    import multiprocessing

    context = multiprocessing.get_context("fork")
    # Each writer's tensor is made here, before the fork: a forked child had better not start torch's threads.
    writers = [context.Process(target=_write_repeatedly, args=(tmp_path, torch.full((256, 1024), float(w))))
               for w in range(3)]
    for w in writers:
        w.start()
    seen = set()
    caplog.set_level(logging.WARNING)
    cache = LatentCache(tmp_path)
    while any(w.is_alive() for w in writers):
        entry = cache.load("entry")
        if entry is None:
            assert not seen, "a reader found a damaged entry"
            continue
        values = entry["latent_params"].unique().tolist()
        assert len(values) == 1  # one writer's whole entry, never a mix
        seen.add(values[0])
    assert all(w.exitcode == 0 for w in writers)
    assert seen and not caplog.records
    assert [p.name for p in tmp_path.iterdir() if p.name != "verified.json"] == ["entry.safetensors"]  # no temporary


# ---------------------------------------------------------------------------------------------------------------
# The model: found where the user has it, or one line saying what was looked for, with the dataset's problems


def test_model_and_dataset_problems_are_reported_together(tmp_path, tiny_model_dir, no_models):
    (tmp_path / "data").mkdir()
    message = exit_message(train_argv(tiny_model_dir / "transformer", tmp_path / "data", tmp_path / "out",
                                      tmp_path / "cache"))
    assert f"{tmp_path / 'data' / 'prompts.txt'}: not found" in message
    assert message.endswith(f"and the model: --pretrained_model_name_or_path {tiny_model_dir / 'transformer'} is the "
                            f"transformer/ part of the model in {tiny_model_dir}: give the model's folder, "
                            f"--pretrained_model_name_or_path {tiny_model_dir}")
    assert not (tmp_path / "out").exists()


def test_an_uncached_hub_model_offline_is_one_line(tmp_path, tiny_dataset_dir, no_models):
    hub = tmp_path / "hub"
    hub.mkdir()
    result = run_script(train_argv("THUDM/CogVideoX-2b", tiny_dataset_dir, tmp_path / "out", tmp_path / "cache",
                                   "--cache_dir", tmp_path / "dot-cache"), HF_HUB_CACHE=str(hub))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --pretrained_model_name_or_path THUDM/CogVideoX-2b: no such folder here, and not in the hub cache "
        f"({tmp_path / 'dot-cache'} and {hub}) while HF_HUB_OFFLINE is set. Download it where there is a network: hf "
        f"download THUDM/CogVideoX-2b --cache-dir '{tmp_path / 'dot-cache'}'; or give the folder that holds it.")


def test_dry_run_reads_only_the_configs(tmp_path, tiny_model_dir, tiny_dataset_dir, caplog):
    configs = tmp_path / "configs"
    shutil.copytree(tiny_model_dir, configs, ignore=shutil.ignore_patterns("tokenizer", "*.safetensors"))
    caplog.set_level(logging.INFO)
    run_main(train_argv(configs, tiny_dataset_dir, tmp_path / "out", tmp_path / "cache", "--dry_run"))
    assert f"Prompt lengths not counted: {configs} has no tokenizer/ here, and --dry_run reads only the configs." \
           in caplog.messages
    assert any(m.startswith("Memory: ") for m in caplog.messages)
    message = exit_message(train_argv(configs, tiny_dataset_dir, tmp_path / "out", tmp_path / "cache"))
    assert f"{configs} lacks transformer/, vae/, text_encoder/, tokenizer/" in message


SCRIPT_FLAGS = ["--height", 48, "--width", 64, "--max_num_frames", 9, "--rank", 4, "--lora_alpha", 4,
                "--mixed_precision", "no", "--report_to", "none", "--dry_run", "--latent_cache_dir", "cache"]


@pytest.mark.parametrize("script", ["finetune_single_rank.sh", "finetune_multi_rank.sh"])
def test_wrapper_scripts_take_paths_from_where_they_are_run(tmp_path, tiny_model_dir, tiny_dataset_dir, script):
    """MODEL_PATH=model DATA_ROOT=data OUTPUT_DIR=out, relative to the caller's folder: the run reads those
    and protects the earlier run in ./out (a dry run: the refusal shows which folder it looked at)."""
    shutil.copytree(tiny_model_dir, tmp_path / "model")
    shutil.copytree(tiny_dataset_dir, tmp_path / "data")
    (tmp_path / "out" / "checkpoint-2").mkdir(parents=True)
    env = {**subprocess_env(), "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
           "MODEL_PATH": "model", "DATA_ROOT": "data", "OUTPUT_DIR": "out", "ACCELERATE_USE_CPU": "1",
           "GPUS_PER_MACHINE": "1", "LAUNCH_ARGS": "--num_processes 1 --mixed_precision no"}
    result = subprocess.run(["bash", str(REPO / script), *map(str, SCRIPT_FLAGS)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "error: out holds an earlier run (checkpoint-2), which this one would overwrite." in result.stderr



# ---------------------------------------------------------------------------------------------------------------
# Resuming: what the checkpoint was trained with is checked before any model loads


@pytest.fixture(scope="module")
def resumable(tmp_path_factory, tiny_5b_model_dir, tiny_dataset_dir):
    """A 5B-style T2V run of 2 steps with its checkpoints, its root, and an argv maker that resumes it (dry)."""
    root = tmp_path_factory.mktemp("resumable")
    run_main(train_argv(tiny_5b_model_dir, tiny_dataset_dir, root / "out", root / "cache", "--max_train_steps", 2,
                        "--checkpointing_steps", 1))

    def argv(model=tiny_5b_model_dir, data=tiny_dataset_dir, *extra):
        return train_argv(model, data, root / "out", root / "cache", "--max_train_steps", 2,
                          "--resume_from_checkpoint", "latest", "--dry_run", *extra)

    return root, argv


@pytest.mark.parametrize("size, name", [("tiny-i2v", "CogVideoX I2V"), ("tiny-1.5", "CogVideoX1.5 T2V")])
def test_resume_into_another_model_type_is_refused(resumable, tmp_path, size, name, no_models):
    root, argv = resumable
    from cogvideox_lora.synthetic import SPECS, build_model_folder

    # With the same attention shapes, so that the LoRA and the optimizer state would load without an error.
    model = build_model_folder(tmp_path / size, size=size)
    config = SPECS[size]["transformer"]
    shape = f"{config['num_layers']} blocks of {config['num_attention_heads'] * config['attention_head_dim']}"
    message = exit_message(argv(model))
    assert message == (f"error: checkpoint-2 was trained on model CogVideoX T2V, {shape}, and this run is "
                       f"{name}, {shape}: resume with the checkpoint's, or start a new run in another "
                       f"--output_dir.")


def test_resume_with_another_rank_size_or_batch_is_refused(resumable, tiny_5b_model_dir, tiny_dataset_dir,
                                                           no_models):
    root, argv = resumable
    checkpoint = root / "out" / "checkpoint-2"
    message = exit_message(argv(tiny_5b_model_dir, tiny_dataset_dir, "--rank", 8, "--max_num_frames", 5,
                                "--train_batch_size", 2))
    assert f"{checkpoint} holds a LoRA of --rank 4 --lora_alpha 4, and this run has --rank 8 --lora_alpha 4" in message
    assert "was trained on frame size (--max_num_frames x --height x --width) 9x48x64, and this run is 5x48x64" \
           in message
    assert "was trained with a global batch of 1 (1 process(es) x --train_batch_size 1 x " \
           "--gradient_accumulation_steps 1), and this run has 2 (1 process(es) x --train_batch_size 2 x" in message


def test_resume_after_clips_were_added_says_so(resumable, tmp_path, tiny_5b_model_dir, tiny_dataset_dir, caplog):
    root, argv = resumable
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset_dir, data)
    shutil.copy(data / "videos" / "clip_000.mp4", data / "videos" / "extra.mp4")
    with open(data / "videos.txt", "a") as f:
        f.write("videos/extra.mp4\n")
    with open(data / "prompts.txt", "a") as f:
        f.write("one more clip\n")
    caplog.set_level(logging.WARNING)
    # The record names clips relative to the dataset's folder: a copy of it elsewhere is the same dataset.
    run_main(argv(tiny_5b_model_dir, data))
    assert [m for m in caplog.messages if "dataset changed" in m] == [
        "The dataset changed since checkpoint-2 (4 clips then, 5 now): 1 added (videos/extra.mp4). The resumed run "
        "trains on the clips of now, so its epochs differ from those the stopped run would have had."]


def test_resume_from_a_file_of_a_checkpoint_names_its_folder(resumable, tiny_5b_model_dir, tiny_dataset_dir, capsys):
    root, _ = resumable
    checkpoint = root / "out" / "checkpoint-2"
    with pytest.raises(SystemExit):
        parse_args(train_argv(tiny_5b_model_dir, tiny_dataset_dir, root / "out", root / "cache",
                              "--resume_from_checkpoint", checkpoint / "pytorch_lora_weights.safetensors"))
    assert (f"--resume_from_checkpoint {checkpoint / 'pytorch_lora_weights.safetensors'} is a file of the checkpoint "
            f"{checkpoint}: a checkpoint is its whole folder, --resume_from_checkpoint {checkpoint}") \
        in capsys.readouterr().err
