"""The run's settings (settings.py): plain frozen values built once from the parsed command line."""

import copy
import dataclasses

import pytest

from cogvideox_lora import settings
from cogvideox_lora.args import parse_args
from cogvideox_lora.memory import Plan
from cogvideox_lora.settings import LoraSettings, ModelSource


def test_from_args_builds_every_setting_and_leaves_the_command_line_as_it_was(tmp_path):
    (tmp_path / "out" / "checkpoint-2").mkdir(parents=True)
    args = parse_args(["--pretrained_model_name_or_path", "m", "--revision", "r1", "--instance_data_root",
                       str(tmp_path), "--dataset_file", "meta.csv", "--output_dir", str(tmp_path / "out"),
                       "--height", "64", "--width", "96", "--max_num_frames", "17", "--rank", "8", "--lora_alpha", "16",
                       "--learning_rate", "2e-4", "--lr_scheduler", "cosine", "--lr_warmup_steps", "3",
                       "--validation_prompt", "a red square:::a brown bear", "--gradient_checkpointing",
                       "--checkpointing_policy", "keep_attention", "--offload", "activations", "--blocks_to_swap", "2",
                       "--push_to_hub", "--hub_model_id", "me/my-lora", "--resume_from_checkpoint", "checkpoint-2",
                       "--report_to", "none"])
    before = copy.deepcopy(vars(args))
    run = settings.from_args(args)
    assert vars(args) == before
    assert run.model == ModelSource("m", "r1")
    assert (run.data.root, run.data.dataset_file) == (str(tmp_path), "meta.csv")
    assert (run.data.caption_column, run.data.video_column) == ("caption", "video")  # a table's default columns
    assert (run.frames.height, run.frames.width, run.frames.max_num_frames) == (64, 96, 17)
    assert run.buckets is None
    assert run.lora == LoraSettings(8, 16)
    assert (run.optimizer.learning_rate, run.optimizer.scheduler, run.optimizer.warmup_steps) == (2e-4, "cosine", 3)
    assert run.validation.prompts == ("a red square", "a brown bear")
    assert (run.validation.num_frames, run.validation.height, run.validation.width) == (17, 64, 96)
    assert run.memory.plan == Plan("keep_attention", offload_activations=True, blocks_to_swap=2)
    # The diffusers example's form of --resume_from_checkpoint: a name inside --output_dir.
    assert run.output.resume_from_checkpoint == str(tmp_path / "out" / "checkpoint-2")
    assert run.output.push.enabled and run.output.repo_id() == "me/my-lora"
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.lora.rank = 4


def test_a_folder_dataset_reads_prompts_and_videos_files_and_buckets_take_the_training_size(tmp_path):
    args = parse_args(["--pretrained_model_name_or_path", "m", "--instance_data_root", str(tmp_path),
                       "--frame_buckets", "17", "9"])
    run = settings.from_args(args)
    assert (run.data.caption_column, run.data.video_column) == ("prompts.txt", "videos.txt")
    assert run.buckets.frames == (9, 17)
    assert (run.buckets.heights, run.buckets.widths) == ((args.height,), (args.width,))
    assert run.memory.plan == Plan()


def test_scale_lr_multiplies_by_accumulation_batch_and_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["--pretrained_model_name_or_path", "m", "--instance_data_root", str(tmp_path), "--report_to", "none",
            "--learning_rate", "1e-4", "--train_batch_size", "2", "--gradient_accumulation_steps", "3"]
    assert settings.from_args(parse_args(argv)).optimizer.learning_rate == pytest.approx(1e-4)
    scaled = settings.from_args(parse_args(argv + ["--scale_lr"])).optimizer.learning_rate
    assert scaled == pytest.approx(1e-4 * 3 * 2 * 2)
