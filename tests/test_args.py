"""The command line (args.py): flags and the checks that need no model."""

import re

import pytest

from cogvideox_lora.args import build_parser, parse_args
from helpers import run_main, train_argv


@pytest.mark.parametrize("flags", [["--offload", "activations"], ["--blocks_to_swap", "2"],
                                   ["--checkpointing_policy", "keep_attention"]])
def test_offloading_without_checkpointing_is_refused(tmp_path, capsys, flags):
    with pytest.raises(SystemExit) as raised:
        parse_args(["--pretrained_model_name_or_path", "m", "--instance_data_root", str(tmp_path),
                    "--output_dir", str(tmp_path / "out"), *flags])
    assert raised.value.code == 2
    assert f"{' '.join(flags)} work(s) with --gradient_checkpointing" in capsys.readouterr().err


HELP_FLAGS = """--pretrained_model_name_or_path --cache_dir --enable_tiling --enable_slicing --instance_data_root
--caption_column --video_column --validation_prompt --validation_prompt_separator --num_validation_videos
--validation_epochs --seed --rank --mixed_precision --output_dir --height --width --fps --max_num_frames
--skip_frames_start --skip_frames_end --train_batch_size --num_train_epochs --checkpointing_steps
--gradient_accumulation_steps --learning_rate --optimizer --adam_beta1 --adam_beta2 --use_8bit_adam --id_token
--lora_alpha --max_train_steps --resume_from_checkpoint --checkpoints_total_limit --gradient_checkpointing
--lr_scheduler --lr_warmup_steps --max_grad_norm --adam_weight_decay --adam_epsilon --report_to --allow_tf32
--dataloader_num_workers --video_reshape_mode --random_flip --revision --variant --guidance_scale
--use_dynamic_cfg --validation_steps --logging_dir""".split()


def test_help_mentions_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        run_main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    missing = [f for f in HELP_FLAGS if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text)]
    assert not missing
    # Each flag has its own help line, not only a place in the usage summary.
    options = {a for action in build_parser()._actions for a in action.option_strings}
    assert set(HELP_FLAGS) <= options


def test_bad_arguments_are_all_reported(tmp_path, tiny_model_dir, tiny_dataset_dir, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_main(train_argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "out", tmp_path / "cache",
                            "--height", 50, "--max_num_frames", 10))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--height 50 is not a multiple of 16" in err and "--max_num_frames 10 is not 4k+1" in err
    assert not (tmp_path / "out").exists()
