"""Several processes on the CPU (gloo), started by the same launchers and scripts as on GPUs.

One process with batch 2 is the reference that two processes with batch 1 each must match: they train on
the same global batches with the same per-sample seeds, so on the same LoRA up to the order in which
the gradients are summed.
"""

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO, SCRIPT, check, lora, max_abs_diff, run_main, subprocess_env, summary, train_argv
from cogvideox_lora.synthetic import write_clips

PATCHED = Path(__file__).with_name("patched_trainer.py")
COMMON = ["--learning_rate", "1e-3", "--mixed_precision", "no", "--checkpointing_steps", 2]
SAME = 1e-5  # two processes against one: the same LoRA up to the order of the gradient reduction


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv, script=SCRIPT, config=None, env=(), cpu=True) -> subprocess.CompletedProcess:
    """`accelerate launch` of two processes. ACCELERATE_USE_CPU=1 makes them a gloo group without GPUs."""
    how = ["--config_file", str(REPO / config)] if config else ["--multi_gpu", "--mixed_precision", "no",
                                                                "--dynamo_backend", "no"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *how, "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", str(free_port()), str(script), *map(str, argv)]
    environment = {**subprocess_env(), **dict(env)}
    environment.pop("ACCELERATE_USE_CPU", None)
    if cpu:
        environment["ACCELERATE_USE_CPU"] = "1"
    return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, tiny_dataset_dir):
    """one: one process of batch 2, 6 steps. two: two processes of batch 1, 4 steps, validating 3 prompts,
    the main process starting 8 s after the other, which must wait longer than the 5 s process-group timeout.
    Both evaluate the held-out loss of 2 other clips every 2 steps."""
    root = tmp_path_factory.mktemp("multi")
    write_clips(root / "heldout", num_clips=2, height=48, width=64, num_frames=25, fps=8, id_offset=4)
    heldout = ["--validation_loss_steps", 2, "--validation_dataset", root / "heldout"]
    run_main(train_argv(tiny_model_dir, tiny_dataset_dir, root / "one", root / "cache-one", "--max_train_steps", 6,
                        "--train_batch_size", 2, *COMMON, *heldout))
    two = check(launch(train_argv(tiny_model_dir, tiny_dataset_dir, root / "two", root / "cache-two",
                                  "--max_train_steps", 4, *COMMON, *heldout, "--nccl_timeout", 5,
                                  "--validation_prompt", "a red square:::a brown bear:::a red car",
                                  report_to="tensorboard"),
                       script=PATCHED, env={"COGVIDEOX_TEST_SLOW_VALIDATION": "8"}))
    return root, two


def test_two_processes_share_the_encoding_and_train_as_one(runs):
    root, _ = runs
    info = summary(root / "two")
    assert info["processes"] == 2 and info["samples_per_step"] == 2
    card = (root / "two" / "README.md").read_text()
    assert "| batch | 2 a step: 1 per process x 2 process(es) x 1 accumulated |" in card
    # Each process encoded half of the clips (the 2 held-out ones too), and both trained on all four.
    assert info["encoded_clips"] == 6 and info["encoded_clips_per_process"] == [3, 3]
    assert max_abs_diff(lora(root / "two"), lora(root / "one" / "checkpoint-4")) <= SAME
    assert max_abs_diff(lora(root / "two" / "checkpoint-2"), lora(root / "one" / "checkpoint-2")) <= SAME
    assert max_abs_diff(lora(root / "two" / "checkpoint-2"), lora(root / "two")) > 1e-4
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in (root / "two" / "checkpoint-2").iterdir()}
    # The held-out clips shared out (one each) and their losses summed: the one process's values.
    one = summary(root / "one")
    assert info["base_heldout_loss"] == pytest.approx(one["base_heldout_loss"], rel=1e-6)
    assert [s for s, _ in info["heldout_losses"]] == [2, 4]
    assert [v for _, v in info["heldout_losses"]] == pytest.approx([v for _, v in one["heldout_losses"][:2]], rel=1e-5)


def test_validation_is_spread_and_outlasts_the_collective_timeout(runs):
    root, two = runs
    videos = sorted((root / "two" / "validation").glob("step-*.mp4"))
    assert [v.name[:17] for v in videos] == ["step-000004_p0_v0", "step-000004_p1_v0", "step-000004_p2_v0"]
    assert sorted(summary(root / "two")["validation_videos"]) == [str(v) for v in videos]
    for process, video in [(0, videos[0]), (1, videos[1]), (0, videos[2])]:
        assert f"Process {process} wrote {video}" in two.stderr
    # The main process logged all three, the one that process 1 made too.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images = set()
    for event_file in (root / "two" / "logs").rglob("events.out.tfevents.*"):
        events = EventAccumulator(str(event_file), size_guidance={"images": 0})
        events.Reload()
        images |= set(events.Tags()["images"])
    # And the base model's, made once at the first validation.
    assert images == {f"{tag}/p{p}_v0" for tag in ("validation", "validation_base") for p in range(3)}


def test_two_nodes_resume_a_two_process_checkpoint(runs, tiny_model_dir, tiny_dataset_dir):
    """finetune_multi_rank.sh started on two "nodes" of one process each, as on two machines."""
    root, _ = runs
    output_dir = root / "nodes"
    shutil.copytree(root / "two", output_dir)
    shutil.rmtree(output_dir / "checkpoint-4")  # resume from checkpoint-2, written by two processes
    env = {**subprocess_env(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "ACCELERATE_USE_CPU": "1", "GPUS_PER_MACHINE": "1", "MAIN_PROCESS_PORT": str(free_port()),
           "MODEL_PATH": str(tiny_model_dir), "DATA_ROOT": str(tiny_dataset_dir), "OUTPUT_DIR": str(output_dir)}
    flags = train_argv(tiny_model_dir, tiny_dataset_dir, output_dir, root / "cache-nodes", "--max_train_steps", 6,
                       *COMMON, "--resume_from_checkpoint", "latest")
    nodes = [subprocess.Popen(["bash", "finetune_multi_rank.sh", str(rank), "127.0.0.1", "2", *flags], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    for node in nodes:
        out, err = node.communicate(timeout=300)
        check(subprocess.CompletedProcess(node.args, node.returncode, out, err))

    info = summary(output_dir)
    assert info["resumed_at_step"] == 2 and info["processes"] == 2
    assert info["encoded_clips_per_process"] == [2, 2]  # the script's VAE tiling makes other cache entries
    assert max_abs_diff(lora(output_dir / "checkpoint-4"), lora(root / "one" / "checkpoint-4")) <= SAME
    assert max_abs_diff(lora(output_dir), lora(root / "one")) <= SAME
    # The script's two validation prompts, one made on each node.
    assert len(info["validation_videos"]) == 2
    assert all(Path(v).exists() for v in info["validation_videos"])


def test_processes_that_each_believe_they_are_alone_refuse(tmp_path, tiny_model_dir, tiny_dataset_dir):
    """Without GPUs and without ACCELERATE_USE_CPU, accelerate makes each of the two processes a group of one."""
    output_dir = tmp_path / "out"
    result = launch(train_argv(tiny_model_dir, tiny_dataset_dir, output_dir, tmp_path / "cache",
                               "--max_train_steps", 2), cpu=False)
    assert result.returncode != 0
    # Each process's refusal, and once more after torch's failure report: the last thing on screen.
    assert result.stderr.count("error: WORLD_SIZE is 2 but this process runs alone") == 3
    assert result.stderr.strip().splitlines()[-1].startswith("error: WORLD_SIZE is 2 but this process runs alone")
    assert not output_dir.exists()


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_deepspeed_zero2_checkpoint_saves_and_resumes(runs, tiny_model_dir, tiny_dataset_dir):
    root, _ = runs
    output_dir = root / "zero2"

    def zero2(steps, *extra):
        return check(launch(train_argv(tiny_model_dir, tiny_dataset_dir, output_dir, root / "cache-zero2",
                                       "--max_train_steps", steps, *COMMON, *extra),
                            script=PATCHED, config="accelerate_config_deepspeed_zero2.yaml",
                            env={"COGVIDEOX_TEST_DEEPSPEED_ON_GLOO": "1"}, cpu=False))

    zero2(4)
    engine_state = output_dir / "checkpoint-4" / "pytorch_model"
    assert {p.name for p in engine_state.iterdir()} == {
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    module = torch.load(engine_state / "mp_rank_00_model_states.pt", weights_only=False)
    # The engine saved the adapter alone, not the frozen transformer.
    assert module["module"] and all(".lora_" in k for k in module["module"])
    assert module["frozen_param_fragments"] is None
    zero2(6, "--resume_from_checkpoint", "latest")

    assert summary(output_dir)["resumed_at_step"] == 4
    assert max_abs_diff(lora(output_dir / "checkpoint-4"), lora(root / "one" / "checkpoint-4")) <= SAME
    assert max_abs_diff(lora(output_dir), lora(root / "one")) <= SAME


def test_a_one_process_checkpoint_resumes_on_two_with_the_same_global_batch(runs, tiny_model_dir, tiny_dataset_dir):
    """One process of batch 2 stopped at step 2, continued by two of batch 1: a warning, and the LoRA that one
    process would have trained. Two processes of batch 2 would train on other batches: refused, both named."""
    root, _ = runs
    output_dir = root / "switch"
    output_dir.mkdir()
    shutil.copytree(root / "one" / "checkpoint-2", output_dir / "checkpoint-2")

    def resume(batch):
        return launch(train_argv(tiny_model_dir, tiny_dataset_dir, output_dir, root / "cache-two", "--max_train_steps",
                                 4, "--train_batch_size", batch, *COMMON, "--resume_from_checkpoint", "latest"))

    refused = resume(2)
    assert refused.returncode != 0 and not (output_dir / "checkpoint-4").exists()
    assert ("checkpoint-2 was trained with a global batch of 2 (1 process(es) x --train_batch_size 2 x "
            "--gradient_accumulation_steps 1), and this run has 4 (2 process(es) x --train_batch_size 2 x "
            "--gradient_accumulation_steps 1)") in refused.stderr
    resumed = check(resume(1))
    assert ("checkpoint-2 was trained on 1 process(es), this run has 2: the global batch is the same, 2 (2 "
            "process(es) x --train_batch_size 1 x --gradient_accumulation_steps 1), so the run continues as it "
            "would have.") in resumed.stderr
    assert summary(output_dir)["resumed_at_step"] == 2
    assert max_abs_diff(lora(output_dir), lora(root / "one" / "checkpoint-4")) <= SAME
