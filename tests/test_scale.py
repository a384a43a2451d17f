"""Issue 25, thousands of clips, stopped and started again, end to end: a warm start does work only for what
changed, a signal before training stops at once, a full disk says so in one line."""

import errno
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, SCRIPT, count_decodes, lora, max_abs_diff, run_main, subprocess_env, summary, train_argv
from test_robustness import exit_message
from cogvideox_lora import clip_index, data as data_module, decoded, disk
from cogvideox_lora.synthetic import write_clips


# ---------------------------------------------------------------------------------------------------------------
# A warm start


def test_a_warm_start_decodes_and_hashes_only_what_changed(tmp_path, tiny_model_dir, tiny_dataset_dir, monkeypatch):
    dataset = tmp_path / "data"
    shutil.copytree(tiny_dataset_dir, dataset)
    cache = tmp_path / "cache"
    probed, hashed = [], []
    probe, digest = data_module.probe_clip, clip_index.file_digest
    monkeypatch.setattr(data_module, "probe_clip",
                        lambda path, s, *kept: probed.append(path.name) or probe(path, s, *kept))
    monkeypatch.setattr(clip_index, "file_digest", lambda path: hashed.append(path.name) or digest(path))

    def run(name):
        probed.clear()
        hashed.clear()
        run_main(train_argv(tiny_model_dir, dataset, tmp_path / name, cache, "--max_train_steps", 2))
        return sorted(probed), sorted(hashed), summary(tmp_path / name)["encoded_clips"]

    clips = sorted(p.name for p in (dataset / "videos").iterdir())
    assert run("cold") == (clips, clips, 4)
    assert run("warm") == ([], [], 0)
    assert max_abs_diff(lora(tmp_path / "cold"), lora(tmp_path / "warm")) == 0  # bit for bit

    # A clip replaced by another (same name): it alone is checked, hashed and encoded again.
    write_clips(tmp_path / "other", num_clips=1, num_frames=25, fps=8, id_offset=5)
    shutil.copy(tmp_path / "other" / "videos" / "clip_005.mp4", dataset / "videos" / "clip_002.mp4")
    assert run("changed") == (["clip_002.mp4"], ["clip_002.mp4"], 1)


def test_a_cold_run_decodes_each_clip_once_and_trains_as_one_that_decodes_twice(tmp_path, tiny_model_dir,
                                                                                tiny_dataset_dir, monkeypatch):
    """The check's frames are reused for encoding (decoded.py); with no budget for them, each clip is decoded again,
    as before: the cache entries and the LoRA are the same bit for bit."""
    passes = count_decodes(monkeypatch)
    clips = sorted(p.name for p in (tiny_dataset_dir / "videos").iterdir())
    run_main(train_argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "reused", tmp_path / "cache_reused",
                        "--max_train_steps", 2))
    assert sorted(passes) == clips
    passes.clear()
    monkeypatch.setattr(decoded, "budget", lambda: 0)
    run_main(train_argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "twice", tmp_path / "cache_twice",
                        "--max_train_steps", 2))
    assert sorted(passes) == sorted(clips * 2)
    assert max_abs_diff(lora(tmp_path / "reused"), lora(tmp_path / "twice")) == 0
    entries = sorted(p.name for p in (tmp_path / "cache_reused").glob("*.safetensors"))
    assert entries == sorted(p.name for p in (tmp_path / "cache_twice").glob("*.safetensors")) and entries
    for name in entries:
        assert (tmp_path / "cache_reused" / name).read_bytes() == (tmp_path / "cache_twice" / name).read_bytes()


# ---------------------------------------------------------------------------------------------------------------
# A signal before training

SLOW_ENCODING = """\
import os, runpy, sys, time
from pathlib import Path

from cogvideox_lora import latent_cache, models

save, load = latent_cache.LatentCache.save, models.load_transformer


def slow_save(self, key, tensors):
    save(self, key, tensors)
    Path(os.environ["SAVED"]).touch()
    time.sleep(0.5)


def announce(*args, **kwargs):
    print("TRANSFORMER LOADED", flush=True)
    return load(*args, **kwargs)


latent_cache.LatentCache.save, models.load_transformer = slow_save, announce
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _interrupt(command, saved: Path, **env) -> tuple[int, str, int]:
    """Runs command in a process group of its own, sends the group SIGINT (as a terminal's Ctrl-C does) once an
    entry is encoded; returns its exit status, its output, and the group's id."""
    process = subprocess.Popen(command, cwd=REPO, env={**subprocess_env(), "PYTHONPATH": str(REPO), **env},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not saved.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-6000:]
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)
    output = process.communicate(timeout=120)[0]  # to its end: every process holding the pipe is gone
    return process.returncode, output, process.pid


def _group_is_gone(pgid: int, within: float = 0) -> bool:
    """Whether no process of the group is left (within some seconds: one whose parent died is reaped later)."""
    deadline = time.monotonic() + within
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


@pytest.mark.parametrize("launcher", [False, True], ids=["python", "accelerate-launch"])
def test_a_signal_before_training_stops_keeping_what_is_encoded(tmp_path, tiny_model_dir, tiny_dataset_dir, launcher):
    wrapper, saved, cache, out = tmp_path / "slow_encoding.py", tmp_path / "saved", tmp_path / "cache", tmp_path / "out"
    wrapper.write_text(SLOW_ENCODING)
    argv = train_argv(tiny_model_dir, tiny_dataset_dir, out, cache, "--max_train_steps", 2)
    prefix = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"] if launcher else [sys.executable]
    status, output, pgid = _interrupt([*prefix, str(wrapper), str(SCRIPT), *argv], saved, SAVED=str(saved))
    assert "Stopped by a signal before training" in output, output[-6000:]
    if not launcher:
        assert status == 1 and output.strip().splitlines()[-1].startswith("Stopped by a signal before training")
    assert "TRANSFORMER LOADED" not in output and "saving a checkpoint" not in output
    assert not list(out.glob("checkpoint-*"))
    kept = len(list(cache.glob("*.safetensors")))
    assert 1 <= kept < 4
    # accelerate's single-process launcher dies at once of the terminal's SIGINT (KeyboardInterrupt): its child
    # stops on its own, within seconds, and leaves nothing behind.
    assert _group_is_gone(pgid, within=10)

    run_main(argv)  # the same command continues: only what was not kept is encoded
    assert summary(out)["encoded_clips"] == 4 - kept


def test_ctrl_c_through_the_wrapper_script_returns_once_the_trainer_has_stopped(tmp_path, tiny_model_dir):
    dataset = tmp_path / "data"
    write_clips(dataset, num_clips=24, num_frames=9, fps=8)
    out = tmp_path / "out"
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "ACCELERATE_USE_CPU": "1",
           "MODEL_PATH": str(tiny_model_dir), "DATA_ROOT": str(dataset), "OUTPUT_DIR": str(out)}
    argv = train_argv(tiny_model_dir, dataset, out, tmp_path / "cache", "--max_train_steps", 2,
                      "--mixed_precision", "no")
    process = subprocess.Popen(["bash", "finetune_single_rank.sh", *argv], cwd=REPO, env={**subprocess_env(), **env},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    chunks = []
    while b"Encoding clips" not in b"".join(chunks):
        chunk = os.read(process.stdout.fileno(), 65536)
        assert chunk, b"".join(chunks).decode()[-6000:]
        chunks.append(chunk)
    os.killpg(process.pid, signal.SIGINT)
    process.wait(120)
    gone = _group_is_gone(process.pid)  # at the moment the script returned
    output = (b"".join(chunks) + process.stdout.read()).decode(errors="replace")
    assert gone, output[-6000:]
    assert process.returncode == 1
    assert output.strip().splitlines()[-1].startswith("Stopped by a signal before training"), output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output


ACCELERATE_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines",
                     "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def _on_a_terminal(command, env: dict, interrupt_once: Path | None = None) -> tuple[int, str, dict]:
    """Runs `accelerate launch` as an interactive shell runs a job: on a pseudo-terminal, the launcher in the
    terminal's foreground process group. With interrupt_once: when that file exists, Ctrl-C, i.e. SIGINT to the
    terminal's foreground group, as the terminal sends it. Returns the launcher's exit status, what the terminal
    showed (read to its end: until the last process holding it is gone) and what was seen: the trainer's pid,
    the group that got the SIGINT, and whether the trainer was still running when the launcher exited."""
    launcher, terminal = pty.fork()
    if launcher == 0:
        try:
            os.chdir(REPO)
            os.execve(command[0], command, {**subprocess_env(), "PYTHONPATH": str(REPO), **env})
        finally:
            os._exit(127)
    shown, seen, status, deadline = [], {}, None, time.monotonic() + 240
    while True:
        assert time.monotonic() < deadline, b"".join(shown).decode(errors="replace")[-6000:]
        if select.select([terminal], [], [], 0.05)[0]:
            try:
                chunk = os.read(terminal, 65536)
            except OSError:  # EIO: no process holds the terminal any more
                break
            shown.append(chunk)
        if seen.get("trainer") is None:
            seen["trainer"] = next(iter(_children(launcher)), None)
        if interrupt_once is not None and "interrupted" not in seen and interrupt_once.exists():
            seen["interrupted"] = os.tcgetpgrp(terminal)
            os.killpg(seen["interrupted"], signal.SIGINT)
        status = status if status is not None else _exited(launcher, seen)
    os.close(terminal)
    status = status if status is not None else _exited(launcher, seen, wait=True)
    return status, b"".join(shown).decode(errors="replace").replace("\r\n", "\n"), seen


def _exited(launcher: int, seen: dict, wait: bool = False) -> int | None:
    """The launcher's exit status once it has exited (noting whether the trainer was still running then)."""
    pid, code = os.waitpid(launcher, 0 if wait else os.WNOHANG)
    if not pid:
        return None
    seen["trainer_running_at_launcher_exit"] = _running(seen["trainer"])
    return os.waitstatus_to_exitcode(code)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            pass
    return found


def _running(pid: int | None) -> bool:
    """Whether process pid exists and has not exited (a zombie, not yet reaped, has)."""
    try:
        return pid is not None and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _processes_mentioning(text: str) -> list[str]:
    """The command lines of running processes that hold text (a run's unique folder) in their arguments."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_text() and _running(int(cmdline.parent.name)):
                found.append(cmdline.read_text().replace("\0", " "))
        except OSError:
            pass
    return found


def test_an_error_under_accelerate_launch_on_a_terminal_is_the_last_thing_on_screen(tmp_path, tiny_model_dir):
    """accelerate's CalledProcessError traceback follows the trainer's error: the message comes again after it."""
    argv = train_argv(tiny_model_dir, tmp_path / "missing", tmp_path / "out", tmp_path / "cache")
    status, shown, _ = _on_a_terminal([*ACCELERATE_LAUNCH, str(SCRIPT), *argv], {})
    assert status == 1, shown[-6000:]
    after_the_launcher = shown[shown.rindex("CalledProcessError"):].strip().splitlines()[1:]
    assert after_the_launcher and after_the_launcher[0].startswith("error: "), shown[-6000:]
    assert "missing: --instance_data_root is not a folder" in after_the_launcher[-1]


def test_ctrl_c_under_accelerate_launch_on_a_terminal_returns_once_the_trainer_has_stopped(tmp_path, tiny_model_dir,
                                                                                          tiny_dataset_dir):
    """The terminal's SIGINT reaches the trainer alone: the launcher waits for it to stop (no KeyboardInterrupt,
    the prompt does not come back early), the trainer's message is last, and no process of the run is left."""
    wrapper, saved, out = tmp_path / "slow_encoding.py", tmp_path / "saved", tmp_path / "out"
    wrapper.write_text(SLOW_ENCODING)
    argv = train_argv(tiny_model_dir, tiny_dataset_dir, out, tmp_path / "cache", "--max_train_steps", 2)
    status, shown, seen = _on_a_terminal([*ACCELERATE_LAUNCH, str(wrapper), str(SCRIPT), *argv],
                                         {"SAVED": str(saved)}, interrupt_once=saved)
    assert seen["interrupted"] == seen["trainer"], shown[-6000:]  # the trainer's own group is the foreground
    assert seen["trainer_running_at_launcher_exit"] is False, shown[-6000:]
    assert status == 1 and "KeyboardInterrupt" not in shown, shown[-6000:]
    assert shown.strip().splitlines()[-1].startswith("Stopped by a signal before training"), shown[-6000:]
    assert "TRANSFORMER LOADED" not in shown and not list(out.glob("checkpoint-*"))
    deadline = time.monotonic() + 10  # a process whose parent has exited is reaped a moment later
    while _processes_mentioning(str(out)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _processes_mentioning(str(out))


def test_a_wrapper_script_error_is_the_last_thing_on_screen(tmp_path, tiny_model_dir):
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "ACCELERATE_USE_CPU": "1",
           "MODEL_PATH": str(tiny_model_dir), "DATA_ROOT": str(tmp_path / "missing"), "OUTPUT_DIR": str(tmp_path)}
    result = subprocess.run(["bash", "finetune_single_rank.sh", "--mixed_precision", "no"], cwd=REPO,
                            env={**subprocess_env(), **env}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()
    assert "missing: --instance_data_root is not a folder" in last[-1], result.stderr[-3000:]
    assert "CalledProcessError" not in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# A full disk


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_encoding_is_one_line_and_leaves_nothing_half_written(tmp_path, tiny_model_dir,
                                                                                tiny_dataset_dir, monkeypatch):
    import cogvideox_lora.latent_cache as latent_cache

    monkeypatch.setattr(latent_cache, "save_file", _no_space)
    cache = tmp_path / "cache"
    message = exit_message(train_argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "out", cache))
    assert message.startswith(f"error: no space left in {cache} while writing a latent cache entry (it needs ")
    assert "free)" in message and "\n" not in message
    assert not list(cache.glob("*.tmp")) and not list(cache.glob("*.safetensors"))


def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_checkpoint(tmp_path, tiny_model_dir,
                                                                               tiny_dataset_dir, monkeypatch):
    import accelerate.accelerator

    def torn(*args, **kwargs):  # what torch's zip writer raises on a full disk
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 3988")

    monkeypatch.setattr(accelerate.accelerator, "save_accelerator_state", torn)
    monkeypatch.setattr(disk, "free_bytes", lambda folder: 4096)
    out = tmp_path / "out"
    message = exit_message(train_argv(tiny_model_dir, tiny_dataset_dir, out, tmp_path / "cache",
                                      "--max_train_steps", 4, "--checkpointing_steps", 2))
    assert message == (f"error: no space left in {out} while writing checkpoint-2 (4.1 KB free): Free some space or "
                       f"choose a folder on another disk, then run the same command again with "
                       f"--resume_from_checkpoint latest.")
    assert sorted(p.name for p in out.iterdir()) == []  # nothing under a checkpoint's name, nor a partial one


def test_a_run_that_cannot_write_its_next_checkpoint_stops_before_training_for_it(tmp_path, tiny_model_dir,
                                                                                   tiny_dataset_dir, monkeypatch):
    import cogvideox_lora.checkpoints as checkpoints

    out = tmp_path / "out"
    saved = []
    save = checkpoints.save_checkpoint

    def record(accelerator, output_dir, step, *args):
        saved.append(step)
        # Once checkpoint-2 is written, the disk has room for half of another.
        monkeypatch.setattr(disk, "free_bytes", lambda folder: 1)
        return save(accelerator, output_dir, step, *args)

    monkeypatch.setattr(checkpoints, "save_checkpoint", record)
    message = exit_message(train_argv(tiny_model_dir, tiny_dataset_dir, out, tmp_path / "cache",
                                      "--max_train_steps", 6, "--checkpointing_steps", 2))
    assert message.startswith(f"error: no space left in {out} for checkpoint-4 (it needs ")
    assert message.endswith("1 bytes free): stopping before training the steps it would save. Free some space or "
                            "choose a folder on another disk, then run the same command again with "
                            "--resume_from_checkpoint latest.")
    assert saved == [2] and sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]


def test_a_full_disk_at_the_summary_leaves_no_empty_file(tmp_path, tiny_model_dir, tiny_dataset_dir, monkeypatch):
    write_text = Path.write_text

    def full_for_the_summary(self, *args, **kwargs):
        if self.name.startswith(".train_summary.json"):
            write_text(self, "")  # what a full disk leaves: an empty file
            _no_space()
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_for_the_summary)
    out = tmp_path / "out"
    message = exit_message(train_argv(tiny_model_dir, tiny_dataset_dir, out, tmp_path / "cache",
                                      "--max_train_steps", 2))
    assert message.startswith(f"error: no space left in {out} while writing {out / 'train_summary.json'} (")
    assert not (out / "train_summary.json").exists() and not list(out.glob(".*tmp"))
    assert (out / "pytorch_lora_weights.safetensors").exists()


def test_ctrl_c_of_a_two_process_run_through_the_wrapper_saves_one_checkpoint(tmp_path, tiny_model_dir,
                                                                               tiny_dataset_dir):
    """The terminal's SIGINT and torch's agent's closing signal reach each worker within milliseconds: one request,
    a checkpoint after the step, the trainer's message last, and nothing left running."""
    from test_multi_process import free_port

    out = tmp_path / "out"
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "ACCELERATE_USE_CPU": "1",
           "GPUS_PER_MACHINE": "2", "MAIN_PROCESS_PORT": str(free_port()), "MODEL_PATH": str(tiny_model_dir),
           "DATA_ROOT": str(tiny_dataset_dir), "OUTPUT_DIR": str(out)}
    argv = train_argv(tiny_model_dir, tiny_dataset_dir, out, tmp_path / "cache", "--max_train_steps", 40,
                      "--checkpointing_steps", 100, "--mixed_precision", "no")
    process = subprocess.Popen(["bash", "finetune_multi_rank.sh", "0", "127.0.0.1", "1", *argv], cwd=REPO,
                               env={**subprocess_env(), **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    chunks = []
    while not re.search(rb"\| *[2-9]/40", b"".join(chunks)):
        chunk = os.read(process.stdout.fileno(), 65536)
        assert chunk, b"".join(chunks).decode()[-6000:]
        chunks.append(chunk)
    os.killpg(process.pid, signal.SIGINT)
    process.wait(300)
    gone = _group_is_gone(process.pid)
    output = (b"".join(chunks) + process.stdout.read()).decode(errors="replace")
    assert gone and process.returncode == 1, output[-6000:]
    stopped = re.findall(r"Stopped by a signal after step (\d+); checkpoint-\1 is saved", output)
    assert len(set(stopped)) == 1 and [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{stopped[0]}"]
    assert output.strip().splitlines()[-1].startswith(f"Stopped by a signal after step {stopped[0]}")
