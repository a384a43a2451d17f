"""The command line (args.py): flags and the checks that need no model."""

import re

import pytest
import shlex

from cogvideox_lora import settings
from cogvideox_lora.args import build_parser, parse_args
from helpers import REPO, run_main, train_argv


COMMON = ["--pretrained_model_name_or_path", "m", "--instance_data_root", "data"]


def refusal(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        parse_args(COMMON + [str(a) for a in argv])
    assert exit_.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("flag, value, said", [
    ("--lora_alpha", 0, "--lora_alpha must be more than 0, not 0"),
    ("--lora_alpha", -8, "--lora_alpha must be more than 0, not -8"),
    ("--learning_rate", 0, "--learning_rate must be more than 0, not 0"),
    ("--learning_rate", "-0.0001", "--learning_rate must be more than 0, not -0.0001"),
    ("--num_validation_videos", -1, "--num_validation_videos must be 0 (no validation) or more, not -1"),
])
def test_values_that_would_train_nothing_are_refused(capsys, flag, value, said):
    assert said in refusal(capsys, flag, value)


def test_a_validation_prompt_with_a_character_that_does_not_show_is_refused(capsys):
    said = refusal(capsys, "--validation_prompt", "a bear:::a car\u200bon a road")
    assert "--validation_prompt: prompt 2 holds U+200B ZERO WIDTH SPACE at column 6" in said


def validation(*argv) -> settings.ValidationSettings:
    return settings.from_args(parse_args(COMMON + list(argv))).validation


def test_validation_is_turned_off_by_an_empty_prompt_or_no_videos(capsys):
    assert validation("--validation_prompt", "a bear:::a car").prompts == ("a bear", "a car")
    assert validation("--validation_prompt", "a bear", "--validation_prompt", "").prompts == ()
    assert validation("--validation_prompt", "a bear", "--num_validation_videos", "0").prompts == ()
    assert validation("--validation_prompt", "a bear", "--validation_images", "x.png",
                      "--num_validation_videos", "0").images == ()
    # A separator alone is still a mistake, not a way to turn validation off.
    assert "holds no prompt once split" in refusal(capsys, "--validation_prompt", " ::: ")


def test_the_wrapper_scripts_validation_is_turned_off_by_a_flag_after_it():
    """finetune_single_rank.sh passes its flags, then the user's ("$@"), which win."""
    script = (REPO / "finetune_single_rank.sh").read_text()
    start = script.index("train_cogvideox_lora.py") + len('train_cogvideox_lora.py"')
    command = script[start:script.index('"$@"')].replace("\\\n", " ")
    flags = shlex.split(command)
    assert validation(*flags).prompts  # the script validates...
    assert validation(*flags, "--validation_prompt", "").prompts == ()  # ...unless told not to
    assert validation(*flags, "--num_validation_videos", "0").prompts == ()


def test_help_shows_real_defaults_never_none():
    parser = build_parser()
    text = parser.format_help()
    assert "(default: None)" not in text
    assert "(default: 49)" in text and "(default: 1)" in text  # real defaults still shown
    # A flag without a default value says in its help what happens without it.
    silent = [a.option_strings[0] for a in parser._actions
              if a.option_strings and a.default is None and not a.required and "default" not in a.help.lower()]
    assert silent == []
    mixed_precision = next(a for a in parser._actions if "--mixed_precision" in a.option_strings)
    assert "accelerate config" in mixed_precision.help


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
