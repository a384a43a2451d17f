"""Commands written for diffusers' examples/cogvideo/train_cogvideox_lora.py and its image-to-video sibling run
here: every flag of both, the example README's command, and the LoRA it gives in stock pipelines both ways."""

import numpy as np
import pytest
import torch
from diffusers import CogVideoXPipeline
from huggingface_hub import ModelCard

from helpers import check, hub_dataset, lora, max_abs_diff, run_main, run_script, summary, train_argv
from cogvideox_lora.args import build_parser

# Every flag of the two example scripts (diffusers main, examples/cogvideo/): the flag, a value of the type the
# example gives it (None: a store_true flag) and what it parses to here, which is the example's meaning.
# train_cogvideox_lora.py has 64 flags; the I2V script drops --video_reshape_mode and adds the last three.
EXAMPLE_FLAGS = [
    ("--pretrained_model_name_or_path", "THUDM/CogVideoX-2b", "THUDM/CogVideoX-2b"),
    ("--revision", "main", "main"), ("--variant", "fp16", "fp16"), ("--cache_dir", "/hub", "/hub"),
    ("--dataset_name", "me/clips", "me/clips"), ("--dataset_config_name", "default", "default"),
    ("--instance_data_root", "/data", "/data"), ("--video_column", "videos.txt", "videos.txt"),
    ("--caption_column", "prompts.txt", "prompts.txt"), ("--id_token", "DISNEY", "DISNEY"),
    ("--dataloader_num_workers", "2", 2), ("--validation_prompt", "a:::b", "a:::b"),
    ("--validation_prompt_separator", "|", "|"), ("--num_validation_videos", "2", 2), ("--validation_epochs", "10", 10),
    ("--guidance_scale", "7", 7.0), ("--use_dynamic_cfg", None, True), ("--seed", "42", 42), ("--rank", "64", 64),
    ("--lora_alpha", "32", 32.0), ("--mixed_precision", "bf16", "bf16"), ("--output_dir", "out", "out"),
    ("--height", "320", 320), ("--width", "512", 512), ("--video_reshape_mode", "random", "random"),
    ("--fps", "12", 12), ("--max_num_frames", "25", 25), ("--skip_frames_start", "1", 1),
    ("--skip_frames_end", "2", 2), ("--random_flip", None, 0.5), ("--train_batch_size", "2", 2),
    ("--num_train_epochs", "30", 30), ("--max_train_steps", "100", 100), ("--checkpointing_steps", "1000", 1000),
    ("--checkpoints_total_limit", "3", 3), ("--resume_from_checkpoint", "latest", "latest"),
    ("--gradient_accumulation_steps", "2", 2), ("--gradient_checkpointing", None, True),
    ("--learning_rate", "1e-3", 1e-3), ("--scale_lr", None, True), ("--lr_scheduler", "cosine_with_restarts",
                                                                     "cosine_with_restarts"),
    ("--lr_warmup_steps", "200", 200), ("--lr_num_cycles", "2", 2), ("--lr_power", "2.0", 2.0),
    ("--enable_slicing", None, True), ("--enable_tiling", None, True), ("--optimizer", "Adam", "adam"),
    ("--use_8bit_adam", None, True), ("--adam_beta1", "0.8", 0.8), ("--adam_beta2", "0.99", 0.99),
    ("--prodigy_beta3", "0.98", 0.98), ("--prodigy_decouple", None, True), ("--adam_weight_decay", "1e-3", 1e-3),
    ("--adam_epsilon", "1e-7", 1e-7), ("--max_grad_norm", "0.5", 0.5), ("--prodigy_use_bias_correction", None, True),
    ("--prodigy_safeguard_warmup", None, True), ("--tracker_name", "my-project", "my-project"),
    ("--push_to_hub", None, True), ("--hub_token", "hf_x", "hf_x"), ("--hub_model_id", "me/lora", "me/lora"),
    ("--logging_dir", "logs2", "logs2"), ("--allow_tf32", None, True), ("--report_to", "wandb", "wandb"),
    ("--validation_images", "a.png:::b.png", "a.png:::b.png"), ("--noised_image_dropout", "0.1", 0.1),
    ("--nccl_timeout", "600", 600),
]


def _argv(flag, value):
    return [flag] + ([] if value is None else [value])


def test_the_table_holds_every_flag_of_both_scripts_once():
    assert len({flag for flag, _, _ in EXAMPLE_FLAGS}) == len(EXAMPLE_FLAGS) == 64 + 3


@pytest.mark.parametrize("flag, value, expected", EXAMPLE_FLAGS, ids=[f for f, _, _ in EXAMPLE_FLAGS])
def test_every_flag_of_the_example_scripts_is_accepted_with_its_meaning(flag, value, expected):
    base = [] if flag == "--pretrained_model_name_or_path" else ["--pretrained_model_name_or_path", "m"]
    args = build_parser().parse_args(base + _argv(flag, value))
    assert getattr(args, flag[2:]) == expected


def test_all_the_example_flags_together_parse():
    args = build_parser().parse_args([a for flag, value, _ in EXAMPLE_FLAGS for a in _argv(flag, value)])
    assert args.optimizer == "adam" and args.random_flip == 0.5 and args.nccl_timeout == 600


@pytest.mark.parametrize("report_to, packages", [("wandb", ["wandb"]), ("comet_ml", ["comet_ml"]),
                                                 ("all", ["wandb", "comet_ml"])])
def test_a_tracker_without_its_package_is_refused_at_the_start(tmp_path, tiny_model_dir, tiny_dataset_dir, capsys,
                                                               report_to, packages):
    with pytest.raises(SystemExit):
        run_main(train_argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "out", tmp_path / "cache",
                            report_to=report_to))
    err = capsys.readouterr().err
    for package in packages:
        assert f"needs the {package} package, which is not installed: pip install {package}" in err
    assert "tensorboard package" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", ["flag", "accelerate config"])
def test_fp16_without_a_gpu_is_refused_with_what_to_use(tmp_path, tiny_model_dir, tiny_dataset_dir, capsys,
                                                        monkeypatch, how):
    extra = ["--mixed_precision", "fp16"] if how == "flag" else []
    if how != "flag":
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # what `accelerate launch --mixed_precision` sets
    with pytest.raises(SystemExit):
        run_main(train_argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "out", tmp_path / "cache", *extra))
    err = capsys.readouterr().err
    assert "--mixed_precision fp16 needs a GPU" in err and "use --mixed_precision bf16 or no" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# The example README's command (examples/cogvideo/README.md, "Training"), with tiny sizes: a hub dataset's table
# (--dataset_name, its columns) with the clips under --instance_data_root.

VALIDATION_PROMPTS = ["DISNEY Spiderman swinging over buildings", "A panda, dressed in a small, red jacket"]


def readme_command(model_dir, clips_root, hub_cache, output_dir, precision="bf16", report_to="tensorboard"):
    return ["--pretrained_model_name_or_path", str(model_dir), "--cache_dir", str(hub_cache),
            "--instance_data_root", str(clips_root), "--dataset_name", "my-awesome-name/my-awesome-dataset",
            "--caption_column", "caption_text", "--video_column", "file_name", "--id_token", "DISNEY",
            "--validation_prompt", ":::".join(VALIDATION_PROMPTS), "--validation_prompt_separator", ":::",
            "--num_validation_videos", "1", "--validation_epochs", "10", "--seed", "42", "--rank", "4",
            "--lora_alpha", "4", "--mixed_precision", precision, "--output_dir", str(output_dir),
            "--height", "48", "--width", "64", "--fps", "8", "--max_num_frames", "9", "--skip_frames_start", "0",
            "--skip_frames_end", "0", "--train_batch_size", "1", "--num_train_epochs", "1",
            "--checkpointing_steps", "2", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-2",
            "--lr_scheduler", "cosine_with_restarts", "--lr_warmup_steps", "1", "--lr_num_cycles", "1",
            "--enable_slicing", "--enable_tiling", "--optimizer", "Adam", "--adam_beta1", "0.9", "--adam_beta2",
            "0.95", "--max_grad_norm", "1.0", "--report_to", report_to]


@pytest.fixture(scope="module")
def hub_table(tmp_path_factory, tiny_dataset_dir):
    """The README's second data format: a metadata.csv on the hub naming clips kept under --instance_data_root."""
    cache = tmp_path_factory.mktemp("hub")
    prompts = (tiny_dataset_dir / "prompts.txt").read_text().splitlines()
    videos = (tiny_dataset_dir / "videos.txt").read_text().splitlines()
    rows = "".join(f'"{p}",{v}\n' for p, v in zip(prompts, videos))
    hub_dataset(cache, "my-awesome-name/my-awesome-dataset", {"metadata.csv": "caption_text,file_name\n" + rows})
    return cache


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory, tiny_model_dir, tiny_dataset_dir, hub_table):
    root = tmp_path_factory.mktemp("readme_run")
    output_dir = root / "cogvideox-lora"
    # The latent cache goes where XDG_CACHE_HOME says, as the command has no --latent_cache_dir.
    check(run_script(readme_command(tiny_model_dir, tiny_dataset_dir, hub_table, output_dir), launcher=True,
                     XDG_CACHE_HOME=str(root / "xdg")))
    return output_dir


def test_the_unchanged_readme_command_on_a_cpu_says_what_to_change(tmp_path, tiny_model_dir, tiny_dataset_dir,
                                                                   hub_table, capsys):
    with pytest.raises(SystemExit):
        run_main(readme_command(tiny_model_dir, tiny_dataset_dir, hub_table, tmp_path / "out", precision="fp16",
                                report_to="wandb"))
    err = capsys.readouterr().err
    assert "--mixed_precision fp16 needs a GPU" in err and "use --mixed_precision bf16 or no" in err
    assert "--report_to wandb needs the wandb package" in err
    assert not (tmp_path / "out").exists()


def test_the_readme_command_trains_from_the_hub_table(readme_run):
    info = summary(readme_run)
    assert info["steps"] == 4 and info["clips"] == 4  # one epoch of the 4 clips the hub table lists
    assert sorted(p.name for p in readme_run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert len(info["validation_videos"]) == 2
    assert list((readme_run / "logs" / "cogvideox-lora").glob("events.out.tfevents.*"))  # the default tracker_name


def test_the_model_card(readme_run, tiny_model_dir):
    card = ModelCard.load(readme_run / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == str(tiny_model_dir) and data["library_name"] == "diffusers"
    assert {"lora", "text-to-video"} <= set(data["tags"]) and "image-to-video" not in data["tags"]
    assert data["instance_prompt"] == "DISNEY"
    assert [w["text"] for w in data["widget"]] == VALIDATION_PROMPTS
    videos = [readme_run / w["output"]["url"] for w in data["widget"]]
    assert [str(v) for v in videos] == summary(readme_run)["validation_videos"]
    assert all(v.is_file() for v in videos)
    for line in ("| optimizer steps | 4 |", "| rank, lora_alpha | 4, 4 ", "| resolution | 64x48 |",
                 "| frames | 9 at 8 fps |", f"CogVideoXPipeline.from_pretrained({str(tiny_model_dir)!r}",
                 f"pipe.load_lora_weights({str(readme_run)!r}"):
        assert line in card.text


@pytest.mark.parametrize("name, refused", [("checkpoint-4", None), ("checkpoint-2", "newer than checkpoint-2"),
                                           ("checkpoint-9", "does not exist")])
def test_resume_from_a_checkpoint_named_inside_the_output_dir(readme_run, tiny_model_dir, tiny_dataset_dir, tmp_path,
                                                              capsys, name, refused):
    argv = train_argv(tiny_model_dir, tiny_dataset_dir, readme_run, tmp_path / "cache", "--resume_from_checkpoint",
                      name, "--dry_run")
    if refused is None:
        run_main(argv)  # the example's form, `checkpoint-4`, is found in --output_dir
        return
    with pytest.raises(SystemExit) as exit_:
        run_main(argv)
    assert refused in f"{exit_.value.code} {capsys.readouterr().err}"


# ---------------------------------------------------------------------------------------------------------------
# The LoRA in a stock pipeline, the other way round: fused, mixed with another, unloaded; checkpoints too.


def _video(pipe):
    return pipe(prompt="a red square drifting across a grey background", negative_prompt="", num_frames=9, height=48,
                width=64, num_inference_steps=2, guidance_scale=6.0, max_sequence_length=16, output_type="np",
                generator=torch.Generator().manual_seed(0)).frames[0]


@pytest.fixture(scope="module")
def stock(tiny_model_dir):
    def pipeline():
        pipe = CogVideoXPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return pipeline, _video(pipeline())


def test_fused_equals_unfused_and_unload_gives_the_base_video(readme_run, stock):
    pipeline, base = stock
    pipe = pipeline()
    pipe.load_lora_weights(readme_run, adapter_name="mine")
    unfused = _video(pipe)
    assert np.abs(unfused - base).max() > 0.02  # the LoRA changes the video...
    pipe.fuse_lora()
    # ... and merged into the weights it gives the same video, within bf16's resolution.
    np.testing.assert_allclose(_video(pipe), unfused, rtol=0, atol=4e-3)
    pipe.unfuse_lora()
    np.testing.assert_allclose(_video(pipe), unfused, rtol=0, atol=4e-3)

    pipe = pipeline()
    pipe.load_lora_weights(readme_run, adapter_name="mine")
    pipe.unload_lora_weights()
    assert np.array_equal(_video(pipe), base)


def test_checkpoints_load_and_mix_with_set_adapters(readme_run, stock):
    pipeline, base = stock
    assert max_abs_diff(lora(readme_run / "checkpoint-4"), lora(readme_run)) == 0
    pipe = pipeline()
    pipe.load_lora_weights(readme_run / "checkpoint-4", adapter_name="last")
    pipe.load_lora_weights(readme_run / "checkpoint-2", adapter_name="halfway")
    pipe.set_adapters(["last"])
    last = _video(pipe)
    pipe.set_adapters(["halfway"])
    halfway = _video(pipe)
    assert np.abs(halfway - last).max() > 1e-3 and np.abs(halfway - base).max() > 1e-3

    final = pipeline()
    final.load_lora_weights(readme_run)
    np.testing.assert_array_equal(_video(final), last)  # checkpoint-4 is the final LoRA

    pipe.set_adapters(["last", "halfway"], [1.0, 0.0])
    np.testing.assert_allclose(_video(pipe), last, rtol=0, atol=1e-6)
    pipe.set_adapters(["last", "halfway"], [0.0, 1.0])
    np.testing.assert_allclose(_video(pipe), halfway, rtol=0, atol=1e-6)
    pipe.set_adapters(["last", "halfway"], [0.5, 0.5])
    mixed = _video(pipe)
    assert np.abs(mixed - last).max() > 1e-4 and np.abs(mixed - halfway).max() > 1e-4
