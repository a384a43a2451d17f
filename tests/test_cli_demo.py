"""cli_demo.py and cogvideox_lora.inference on the CPU: generating with a LoRA from the real trainer, and with
LoRAs saved by diffusers itself."""


import decord
import numpy as np
import pytest
import torch
from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline, CogVideoXTransformer3DModel
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from PIL import Image

from helpers import load_lora_and_collect_warnings, run_main
import cli_demo
from cogvideox_lora import inference
from cogvideox_lora.lora import TARGET_MODULES, add_lora, save_lora

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


def random_lora_b(transformer, seed=0) -> None:
    """A fresh adapter's B is zero, a no-op: random B gives a LoRA that changes the video."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


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


def test_image_to_video_with_a_lora(tmp_path, tiny_i2v_model_dir, trained_lora):
    image = tmp_path / "first.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(image)
    path = cli_demo.main(cli(tiny_i2v_model_dir, tmp_path / "i2v.mp4", "--generate_type", "i2v",
                             "--image_or_video_path", image, "--lora_path", trained_lora))
    assert read_video(path).shape == (9, 48, 64, 3)


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
    (["--generate_type", "i2v", "--image_or_video_path", "no-such.png"], "no-such.png is not a file"),
    (["--compare"], "--compare needs --lora_path"),
])
def test_command_line_mistakes_are_reported_before_anything_loads(argv, problem, capsys):
    with pytest.raises(SystemExit):
        cli_demo.parse_args(["--prompt", PROMPT, *argv])
    assert problem in capsys.readouterr().err


def test_the_pipeline_attends_as_the_trainer_chose(tiny_model_dir, tmp_path):
    from cogvideox_lora.attention import CogVideoXAttnProcessor

    pipe = inference.load_pipeline(str(tiny_model_dir), dtype=torch.float32)
    assert {type(p) for p in pipe.transformer.attn_processors.values()} == {CogVideoXAttnProcessor}
    # FlashAttention-4 asked for where it cannot run (no CUDA here): a clear stop, no video.
    with pytest.raises(SystemExit, match="flash-attn-4"):
        cli_demo.main(cli(tiny_model_dir, tmp_path / "out.mp4", "--attention_backend", "flash4"))
    assert not (tmp_path / "out.mp4").exists()


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
