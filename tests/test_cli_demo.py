"""cli_demo.py and cogvideox_lora.inference on the CPU: generating with a LoRA from the real trainer, and with
LoRAs saved by diffusers itself."""


import shutil

import decord
import numpy as np
import pytest
import torch
from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline, CogVideoXTransformer3DModel
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from PIL import Image

from helpers import load_lora_and_collect_warnings, random_lora_b, run_main, train_argv
import cli_demo
from cogvideox_lora import frame_counts, inference, settings
from cogvideox_lora.args import parse_args
from cogvideox_lora.lora import TARGET_MODULES, TrainedOn, add_lora, save_lora
from cogvideox_lora.model_card import card_text
from cogvideox_lora.models import read_configs
from cogvideox_lora.synthetic import build_model_folder

PROMPT = "a red square drifting across a grey background"
SIZE = dict(num_frames=9, height=48, width=64, num_inference_steps=2, seed=0)
CLI_SIZE = ["--num_frames", "9", "--height", "48", "--width", "64", "--num_inference_steps", "2", "--seed", "0",
            "--dtype", "float32"]


def cli(model_dir, output_path, *extra) -> list[str]:
    return ["--prompt", PROMPT, "--model_path", str(model_dir), "--output_path", str(output_path), *CLI_SIZE,
            *map(str, extra)]


def tiny_pipeline(model_dir, generate_type="t2v"):
    pipe = inference.load_pipeline(str(model_dir), generate_type, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lora_scalings(pipe, adapter=inference.ADAPTER) -> set[float]:
    return {m.scaling[adapter] for m in pipe.transformer.modules() if isinstance(m, BaseTunerLayer)}


def read_video(path) -> np.ndarray:
    reader = decord.VideoReader(str(path))
    return reader.get_batch(list(range(len(reader)))).asnumpy()


def refuse_to_load(*args, **kwargs):
    raise AssertionError("a model was loaded")


# ---------------------------------------------------------------------------------------------------------------
# One real training run, and the videos every test compares against.


@pytest.fixture(scope="module")
def trained_lora(tmp_path_factory, tiny_model_dir, tiny_dataset_dir):
    """The trainer's output folder, rank 4 and lora_alpha 2: its update is meant to be applied at alpha/rank = 0.5."""
    root = tmp_path_factory.mktemp("cli_demo_training")
    run_main(["--pretrained_model_name_or_path", tiny_model_dir, "--instance_data_root", tiny_dataset_dir,
              "--output_dir", root / "out", "--latent_cache_dir", root / "cache", "--height", 48, "--width", 64,
              "--max_num_frames", 9, "--rank", 4, "--lora_alpha", 2, "--max_train_steps", 6, "--learning_rate", "1e-2",
              "--report_to", "none", "--mixed_precision", "no"])
    return root / "out"


@pytest.fixture(scope="module")
def base_frames(tiny_model_dir):
    return inference.generate(tiny_pipeline(tiny_model_dir), PROMPT, **SIZE)


@pytest.fixture(scope="module")
def lora_frames(tiny_model_dir, trained_lora):
    pipe = tiny_pipeline(tiny_model_dir)
    assert inference.load_lora(pipe, str(trained_lora)) == 0.5
    return inference.generate(pipe, PROMPT, **SIZE)


def test_the_lora_changes_the_video(base_frames, lora_frames):
    assert base_frames.shape == lora_frames.shape == (9, 48, 64, 3)
    assert np.isfinite(lora_frames).all()
    difference = np.abs(lora_frames - base_frames)
    assert difference.max() > 0.02 and difference.mean() > 1e-3, (difference.max(), difference.mean())


def test_lora_scale_zero_gives_the_base_video_bit_for_bit(tiny_model_dir, trained_lora, base_frames):
    pipe = tiny_pipeline(tiny_model_dir)
    assert inference.load_lora(pipe, str(trained_lora), scale=0.0) == 0.0
    assert np.array_equal(inference.generate(pipe, PROMPT, **SIZE), base_frames)


def test_the_trained_alpha_over_rank_comes_from_the_metadata(tiny_model_dir, trained_lora, lora_frames):
    state_dict, metadata = CogVideoXPipeline.lora_state_dict(trained_lora, return_lora_metadata=True)
    assert metadata["transformer.r"] == 4 and metadata["transformer.lora_alpha"] == 2
    # lora_frames were made with the file, scale 1: every layer applied alpha/rank.
    pipe = tiny_pipeline(tiny_model_dir)
    inference.load_lora(pipe, str(trained_lora))
    assert lora_scalings(pipe) == {0.5}

    # The same tensors without the metadata load at scale 1; by hand at 0.5 they give the same video.
    pipe = tiny_pipeline(tiny_model_dir)
    pipe.load_lora_weights(state_dict, adapter_name="x")
    assert lora_scalings(pipe, "x") == {1.0}
    pipe.set_adapters(["x"], [0.5])
    np.testing.assert_allclose(inference.generate(pipe, PROMPT, **SIZE), lora_frames, rtol=0, atol=1e-6)
    # ... and at 1, as a loader ignoring the metadata would apply them, they do not.
    pipe.set_adapters(["x"], [1.0])
    assert np.abs(inference.generate(pipe, PROMPT, **SIZE) - lora_frames).max() > 1e-3


def test_lora_scale_multiplies_the_trained_strength(tiny_model_dir, trained_lora):
    pipe = tiny_pipeline(tiny_model_dir)
    assert inference.load_lora(pipe, str(trained_lora), scale=3.0) == 1.5
    assert lora_scalings(pipe) == {1.5}


# ---------------------------------------------------------------------------------------------------------------
# --compare


def test_compare_puts_the_video_without_the_lora_beside_the_one_with_it(tiny_model_dir, trained_lora, base_frames,
                                                                         lora_frames):
    pipe = tiny_pipeline(tiny_model_dir)
    inference.load_lora(pipe, str(trained_lora))
    frames = inference.generate_comparison(pipe, PROMPT, **SIZE)
    assert np.array_equal(frames[:, :, :64], base_frames)
    assert np.array_equal(frames[:, :, 64:], lora_frames)


def test_cli_compare_writes_a_video_twice_as_wide(tmp_path, tiny_model_dir, trained_lora, capsys):
    path = cli_demo.main(cli(tiny_model_dir, tmp_path / "videos" / "compare.mp4", "--lora_path", trained_lora,
                             "--compare"))
    assert path == tmp_path / "videos" / "compare.mp4"
    assert read_video(path).shape == (9, 48, 128, 3)
    out = capsys.readouterr().out
    assert "applied at 0.5" in out and str(path) in out


# ---------------------------------------------------------------------------------------------------------------
# LoRAs from elsewhere, and the trainer's LoRA elsewhere


@pytest.fixture(scope="module")
def diffusers_saved_lora(tmp_path_factory, tiny_model_dir):
    """A LoRA as other diffusers trainers write it: a peft adapter saved by save_lora_weights, without metadata."""
    transformer = CogVideoXTransformer3DModel.from_pretrained(tiny_model_dir, subfolder="transformer")
    transformer.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=TARGET_MODULES))
    random_lora_b(transformer)
    folder = tmp_path_factory.mktemp("diffusers_lora")
    CogVideoXPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer))
    return folder / "pytorch_lora_weights.safetensors"


def test_a_lora_saved_by_diffusers_runs_in_cli_demo(tmp_path, tiny_model_dir, diffusers_saved_lora, base_frames,
                                                    capsys):
    pipe = tiny_pipeline(tiny_model_dir)
    assert inference.load_lora(pipe, str(diffusers_saved_lora)) == 1.0
    assert np.abs(inference.generate(pipe, PROMPT, **SIZE) - base_frames).max() > 0.02

    path = cli_demo.main(cli(tiny_model_dir, tmp_path / "out.mp4", "--lora_path", diffusers_saved_lora))
    assert read_video(path).shape == (9, 48, 64, 3)
    assert "applied at 1 " in capsys.readouterr().out


def test_the_trainers_lora_loads_in_a_stock_pipeline_without_warnings(tiny_model_dir, trained_lora):
    pipe = CogVideoXPipeline.from_pretrained(tiny_model_dir)
    assert load_lora_and_collect_warnings(pipe, trained_lora) == []
    assert pipe.get_list_adapters() == {"transformer": ["default_0"]}
    assert lora_scalings(pipe, "default_0") == {0.5}


@pytest.fixture(scope="module")
def tiny_i2v_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model as an image-to-video one: the transformer takes the image latents as extra channels."""
    t2v = CogVideoXPipeline.from_pretrained(tiny_model_dir)
    config = {**t2v.transformer.config, "in_channels": 2 * t2v.transformer.config.in_channels}
    torch.manual_seed(0)
    i2v = CogVideoXImageToVideoPipeline(tokenizer=t2v.tokenizer, text_encoder=t2v.text_encoder, vae=t2v.vae,
                                        transformer=CogVideoXTransformer3DModel.from_config(config),
                                        scheduler=t2v.scheduler)
    path = tmp_path_factory.mktemp("models") / "tiny-i2v"
    i2v.save_pretrained(path)
    return path


def test_a_t2v_lora_on_an_i2v_model_is_refused_naming_both_unless_allowed(tmp_path, tiny_i2v_model_dir, trained_lora,
                                                                         monkeypatch, capsys):
    image = tmp_path / "first.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 96, 3), dtype=np.uint8)).save(image)
    argv = cli(tiny_i2v_model_dir, tmp_path / "i2v.mp4", "--image_or_video_path", image, "--lora_path", trained_lora)
    with monkeypatch.context() as m:
        m.setattr(inference, "load_pipeline", refuse_to_load)
        with pytest.raises(SystemExit) as exit_info:
            cli_demo.main(argv)
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "trained on a CogVideoX T2V model" in message
    assert f"{tiny_i2v_model_dir} is a CogVideoX I2V model" in message and "--allow_lora_mismatch" in message

    # Asked for, it is applied with a warning; the model's type chose i2v, and the 96x48 image was cropped to
    # 64x48 as training crops it.
    path = cli_demo.main(argv + ["--allow_lora_mismatch"])
    assert read_video(path).shape == (9, 48, 64, 3)
    out = capsys.readouterr().out
    assert "warning: the LoRA" in out and "generating i2v" in out
    assert "is 96x48, the video 64x48: the image is resized and centre-cropped" in out


# ---------------------------------------------------------------------------------------------------------------
# Errors the user can act on


def test_a_missing_lora_is_named_before_the_model_loads(tmp_path, capsys):
    missing = tmp_path / "no-such-lora"
    with pytest.raises(SystemExit) as exit_info:
        cli_demo.main(cli(tmp_path / "no-model-either", tmp_path / "out.mp4", "--lora_path", missing))
    assert str(missing) in str(exit_info.value.code)
    assert not (tmp_path / "out.mp4").exists()


@pytest.fixture(scope="module")
def wider_model_lora(tmp_path_factory, tiny_model_dir):
    """A LoRA for a model like the tiny one but with 3 attention heads: hidden size 48 instead of 32."""
    config = CogVideoXTransformer3DModel.load_config(tiny_model_dir, subfolder="transformer")
    transformer = CogVideoXTransformer3DModel.from_config({**config, "num_attention_heads": 3})
    lora_config = add_lora(transformer, rank=4, alpha=2)
    random_lora_b(transformer)
    return save_lora(transformer, tmp_path_factory.mktemp("wider_lora"), lora_config)


def test_a_lora_for_another_model_size_says_so_with_both_shapes(tmp_path, tiny_model_dir, wider_model_lora,
                                                                base_frames):
    with pytest.raises(SystemExit) as exit_info:
        cli_demo.main(cli(tiny_model_dir, tmp_path / "out.mp4", "--lora_path", wider_model_lora))
    message = str(exit_info.value.code)
    assert str(wider_model_lora) in message and str(tiny_model_dir) in message
    assert "another size" in message
    assert "(4, 48)" in message and "(4, 32)" in message, message

    # Code that catches the error keeps a pipeline that works as the base model.
    pipe = tiny_pipeline(tiny_model_dir)
    with pytest.raises(inference.LoraMismatchError):
        inference.load_lora(pipe, str(wider_model_lora))
    assert not any(pipe.get_list_adapters().values())
    assert np.array_equal(inference.generate(pipe, PROMPT, **SIZE), base_frames)


@pytest.mark.parametrize("argv, problem", [
    (["--generate_type", "i2v"], "needs --image_or_video_path"),
    (["--generate_type", "i2v", "--image_or_video_path", "no-such.png"], "no-such.png: it does not exist"),
    (["--compare"], "--compare needs --lora_path"),
    (["--height", "50"], "--height 50 is not a multiple of 16 (VAE x8, patch x2): use 48 or 64."),
    (["--output_path", "video"], "--output_path video: name a video file ending in .mp4, .mov, .mkv, e.g. video.mp4"),
    (["--output_path", "out.txt"], "--output_path out.txt: name a video file ending in"),
    (["--output_path", "videos/"], "--output_path videos/ is a folder: name the video file, e.g. videos/output.mp4"),
])
def test_command_line_mistakes_are_reported_before_anything_loads(argv, problem, capsys):
    with pytest.raises(SystemExit):
        cli_demo.parse_args(["--prompt", PROMPT, *argv])
    assert problem in capsys.readouterr().err


def test_an_output_path_that_is_a_folder_or_an_unreadable_image_is_refused(tmp_path, capsys):
    broken = tmp_path / "first.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(SystemExit):
        cli_demo.parse_args(["--prompt", PROMPT, "--output_path", str(tmp_path), "--image_or_video_path",
                             str(broken)])
    err = capsys.readouterr().err
    assert f"--output_path {tmp_path} is a folder" in err
    assert f"--image_or_video_path {broken}: it cannot be read as an image" in err


def test_the_pipeline_attends_as_the_trainer_chose(tiny_model_dir, tmp_path):
    from cogvideox_lora.attention import CogVideoXAttnProcessor

    pipe = inference.load_pipeline(str(tiny_model_dir), dtype=torch.float32)
    assert {type(p) for p in pipe.transformer.attn_processors.values()} == {CogVideoXAttnProcessor}
    # FlashAttention-4 asked for where it cannot run (no CUDA here): a clear stop, no video.
    with pytest.raises(SystemExit, match="flash-attn-4"):
        cli_demo.main(cli(tiny_model_dir, tmp_path / "out.mp4", "--attention_backend", "flash4"))
    assert not (tmp_path / "out.mp4").exists()


# ---------------------------------------------------------------------------------------------------------------
# Issues 24 and 26: what the LoRA was trained on, the frame counts the model makes, inputs checked before loading


@pytest.fixture
def no_pipeline(monkeypatch):
    monkeypatch.setattr(inference, "load_pipeline", refuse_to_load)


def refused(argv, capsys=None) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli_demo.main([str(a) for a in argv])
    message = str(exit_info.value.code)
    assert message.startswith("error: "), message
    return message


def test_the_lora_records_what_it_was_trained_on_and_its_checkpoints_too(trained_lora, tiny_model_dir):
    expected = TrainedOn("CogVideoX T2V", "t2v", "1.0", str(tiny_model_dir), 48, 64, 9, False)
    assert TrainedOn.read(trained_lora / "pytorch_lora_weights.safetensors") == expected
    assert TrainedOn.read(trained_lora / "checkpoint-6" / "pytorch_lora_weights.safetensors") == expected
    # diffusers' own metadata is still there beside it.
    _, metadata = CogVideoXPipeline.lora_state_dict(trained_lora, return_lora_metadata=True)
    assert metadata["transformer.r"] == 4


def test_a_lora_of_another_version_is_refused_naming_both(tmp_path, tiny_model_dir, no_pipeline):
    transformer = CogVideoXTransformer3DModel.from_pretrained(tiny_model_dir, subfolder="transformer")
    config = add_lora(transformer, rank=4, alpha=4)
    lora_file = save_lora(transformer, tmp_path, config,
                          TrainedOn("CogVideoX1.5 T2V", "t2v", "1.5", "THUDM/CogVideoX1.5-5B", 48, 64, 9))
    message = refused(cli(tiny_model_dir, tmp_path / "out.mp4", "--lora_path", lora_file))
    assert f"trained on a CogVideoX1.5 T2V model (THUDM/CogVideoX1.5-5B), but {tiny_model_dir} is a CogVideoX T2V " \
           f"model" in message
    assert not (tmp_path / "out.mp4").exists()


def test_a_run_stopped_before_its_end_names_the_checkpoint_that_holds_a_lora(tmp_path, tiny_model_dir, trained_lora,
                                                                            capsys):
    stopped = tmp_path / "stopped"
    shutil.copytree(trained_lora, stopped)
    # What a stopped run leaves: checkpoints, and neither the final LoRA nor its ComfyUI copy.
    (stopped / "pytorch_lora_weights.safetensors").unlink()
    (stopped / "pytorch_lora_weights_comfyui.safetensors").unlink()
    message = refused(cli(tiny_model_dir, tmp_path / "out.mp4", "--lora_path", stopped))
    assert "holds no final LoRA" in message and f"--lora_path {stopped / 'checkpoint-6'}" in message
    path = cli_demo.main(cli(tiny_model_dir, tmp_path / "out.mp4", "--lora_path", stopped / "checkpoint-6"))
    assert read_video(path).shape == (9, 48, 64, 3)


def test_files_that_are_not_loras_and_hub_loras_offline_are_error_lines(tmp_path, tiny_model_dir, no_pipeline,
                                                                        monkeypatch):
    model_weights = tiny_model_dir / "transformer" / "diffusion_pytorch_model.safetensors"
    message = refused(cli(tiny_model_dir, tmp_path / "out.mp4", "--lora_path", model_weights))
    assert f"{model_weights} is not a LoRA" in message
    text = tmp_path / "notes.safetensors"
    text.write_text("not tensors")
    assert f"{text} is not a LoRA file" in refused(cli(tiny_model_dir, tmp_path / "out.mp4", "--lora_path", text))

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = refused(cli(tiny_model_dir, tmp_path / "out.mp4", "--lora_path", "someone/their-lora"))
    assert "could not be fetched from the Hugging Face Hub" in message and "hf download someone/their-lora" in message
    # A relative path whose first folder is here is a local path that does not exist: never sent to the Hub.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for missing in ("runs/lora", "./lora"):
        message = refused(cli(tiny_model_dir, tmp_path / "out.mp4", "--lora_path", missing))
        assert f"LoRA not found: {missing} is neither a file nor a folder (relative to {tmp_path})" in message
    # A model that is not there, offline: one line, with the LoRA's problem beside it.
    message = refused(cli("THUDM/CogVideoX-2b", tmp_path / "out.mp4", "--lora_path", "runs/lora"))
    assert "--model_path THUDM/CogVideoX-2b: no such folder here, and not in the hub cache" in message
    assert "LoRA not found: runs/lora" in message and "Traceback" not in message


def test_the_generate_type_comes_from_the_model(tmp_path, tiny_model_dir, no_pipeline):
    image = tmp_path / "first.png"
    Image.new("RGB", (64, 48)).save(image)
    message = refused(cli(tiny_model_dir, tmp_path / "out.mp4", "--generate_type", "i2v", "--image_or_video_path",
                          image))
    assert f"--generate_type i2v does not fit {tiny_model_dir}: it is a CogVideoX T2V model" in message


@pytest.fixture(scope="module")
def tiny_1_5_model_dir(tmp_path_factory):
    return build_model_folder(tmp_path_factory.mktemp("models") / "tiny-1.5", size="tiny-1.5", seed=0)


@pytest.mark.parametrize("model", ["tiny", "tiny-1.5"])
def test_the_frame_count_rule_is_what_the_pipelines_make(model, tiny_model_dir, tiny_1_5_model_dir):
    pipe = tiny_pipeline(tiny_model_dir if model == "tiny" else tiny_1_5_model_dir)
    for asked in (5, 9, 10, 13, 17):
        # At 16x16, the smallest size, to be quick: the count depends on the frames alone.
        made = inference.generate(pipe, PROMPT, **{**SIZE, "num_frames": asked, "num_inference_steps": 1,
                                                   "height": 16, "width": 16}).shape[0]
        assert made == frame_counts.generated_frames(asked)
        assert (frame_counts.generation_problem("--num_frames", asked) is None) == (made == asked)


@pytest.mark.parametrize("frames, message", [
    (10, "--num_frames 10: CogVideoX generates 8k+1 frames (10 would come out 9), an odd number of latent frames: "
         "use 9 or 17."),
    (13, "--num_frames 13: CogVideoX generates 8k+1 frames (13 would come out 16)"),
])
def test_frame_counts_the_model_cannot_make_are_refused_before_loading(frames, message, tmp_path, tiny_model_dir,
                                                                       tiny_1_5_model_dir, no_pipeline):
    for model in (tiny_model_dir, tiny_1_5_model_dir):
        argv = cli(model, tmp_path / "out.mp4")
        argv[argv.index("--num_frames") + 1] = str(frames)
        assert message in refused(argv)


def test_validation_at_a_frame_count_the_model_cannot_make_is_refused(tmp_path, tiny_model_dir, tiny_dataset_dir,
                                                                      no_models, capsys):
    with pytest.raises(SystemExit):
        run_main(train_argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "out", tmp_path / "cache",
                            "--max_num_frames", 13, "--validation_prompt", "a red square"))
    assert "--max_num_frames 13: CogVideoX generates 8k+1 frames (13 would come out 16)" in capsys.readouterr().err
    # Without validation videos 13 frames train (4 latent frames).
    assert parse_args(train_argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "out", tmp_path / "cache",
                                 "--max_num_frames", 13)).max_num_frames == 13


def test_the_model_card_states_the_global_batch(tmp_path, tiny_model_dir, tiny_dataset_dir):
    run = settings.from_args(parse_args(train_argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "out",
                                                   tmp_path / "cache", "--train_batch_size", 2,
                                                   "--gradient_accumulation_steps", 3)))
    family = read_configs(run.model)[3]
    assert "| batch | 12 a step: 2 per process x 2 process(es) x 3 accumulated |" in \
        card_text(run, family, 10, [], processes=2)


@pytest.fixture(scope="module")
def lora_without_learned_positions(tmp_path_factory, tiny_dataset_dir):
    """An I2V LoRA trained at 32x64 with --ignore_learned_positional_embeddings: the tiny I2V model's table is
    made for 48x64."""
    root = tmp_path_factory.mktemp("ignore_positions")
    model = build_model_folder(root / "tiny-i2v", size="tiny-i2v", seed=0)
    run_main(train_argv(model, tiny_dataset_dir, root / "out", root / "cache", "--height", 32,
                        "--ignore_learned_positional_embeddings", "--max_train_steps", 2, "--mixed_precision", "no"))
    return model, root / "out"


def test_cli_demo_generates_as_a_lora_without_learned_positions_was_trained(tmp_path, lora_without_learned_positions,
                                                                           capsys):
    model, out = lora_without_learned_positions
    image = tmp_path / "first.png"
    Image.new("RGB", (64, 32), (200, 30, 30)).save(image)
    path = cli_demo.main(["--prompt", PROMPT, "--model_path", str(model), "--lora_path", str(out),
                          "--image_or_video_path", str(image), "--num_inference_steps", "1", "--dtype", "float32",
                          "--output_path", str(tmp_path / "out.mp4")])
    assert read_video(path).shape == (9, 32, 64, 3)  # the LoRA's size and length
    printed = capsys.readouterr().out
    assert "trained with --ignore_learned_positional_embeddings" in printed and "Generating at 64x32" in printed


def test_the_model_card_code_runs_for_a_lora_without_learned_positions(tmp_path, lora_without_learned_positions,
                                                                       monkeypatch):
    model, out = lora_without_learned_positions
    card = (out / "README.md").read_text()
    code = card.split("```python\n")[1].split("```")[0]
    assert "use_learned_positional_embeddings=False" in code
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (64, 32), (200, 30, 30)).save("first_frame.png")
    # On the CPU in fp32 and with 2 steps, to be quick; the rest as the card has it.
    code = code.replace('.to("cuda")', "").replace("torch.bfloat16", "torch.float32")
    code = code.replace(").frames[0]", ", num_inference_steps=2).frames[0]")
    scope = {}
    exec(code, scope)
    assert len(scope["video"]) == 9 and scope["video"][0].size == (64, 32)


def test_cli_demo_finds_the_model_where_the_trainer_does(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """A hub model in huggingface_hub's cache, or in the trainer's --cache_dir, loads offline from there; one in
    neither is one error line naming both caches and the download command."""
    from huggingface_hub import constants

    from helpers import hub_model

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    standard = hub_model(tmp_path / "hub", "owner/tiny", tiny_model_dir)
    mine = hub_model(tmp_path / "dot-cache", "owner/mine", tiny_model_dir)
    for repo_id, cache_dir, snapshot in (("owner/tiny", tmp_path / "dot-cache", standard),
                                         ("owner/mine", tmp_path / "dot-cache", mine)):
        pipe = inference.load_pipeline(repo_id, dtype=torch.float32, cache_dir=str(cache_dir))
        assert pipe.name_or_path == str(snapshot)
    with pytest.raises(SystemExit) as exit_:
        cli_demo.main(cli("owner/elsewhere", tmp_path / "out.mp4", "--cache_dir", tmp_path / "dot-cache"))
    assert str(exit_.value.code) == (
        f"error: --model_path owner/elsewhere: no such folder here, and not in the hub cache ({tmp_path / 'dot-cache'} "
        f"and {tmp_path / 'hub'}) while HF_HUB_OFFLINE is set. Download it where there is a network: hf download "
        f"owner/elsewhere --cache-dir '{tmp_path / 'dot-cache'}'; or give the folder that holds it.")
    assert not (tmp_path / "out.mp4").exists()
