"""Every CogVideoX family on tiny random models: T2V and I2V, 1.0 and 1.5, trained through the command line and
loaded by the matching stock diffusers pipeline; buckets of mixed clips."""

import itertools

import numpy as np
import pytest
import torch
from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline, CogVideoXTransformer3DModel
from PIL import Image

from helpers import load_clips, load_lora_and_collect_warnings, lora, run_main, summary, train_argv
import cli_demo
from cogvideox_lora import latent_cache, loss
from cogvideox_lora.data import Buckets, DatasetError, FrameSettings, read_frames
from cogvideox_lora.synthetic import build_model_folder, write_clips

FAMILIES = {  # tiny size: (pipeline, image-to-video)
    "tiny-5b": (CogVideoXPipeline, False),
    "tiny-i2v": (CogVideoXImageToVideoPipeline, True),
    "tiny-1.5": (CogVideoXPipeline, False),
    "tiny-1.5-i2v": (CogVideoXImageToVideoPipeline, True),
}
PROMPT = "a red square drifting"


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("family_models")
    return {size: build_model_folder(root / size, size=size) for size in FAMILIES}


def first_frame_png(video, path) -> str:
    """The first frame the trainer takes from a clip (9 frames of 48x64 at 8 fps), as a PNG."""
    frame = read_frames(video, FrameSettings(48, 64, 8, 9, 0, 0, "center"), first_only=True)[0]
    Image.fromarray(((frame + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()).save(path)
    return str(path)


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory, family_models, tiny_dataset_dir):
    """Each family trained 2 steps with a validation video; I2V validates from a clip's first frame."""
    root = tmp_path_factory.mktemp("family_runs")
    image = first_frame_png(tiny_dataset_dir / "videos" / "clip_000.mp4", root / "first_frame.png")
    outputs = {}
    for size, (_, image_to_video) in FAMILIES.items():
        outputs[size] = root / size
        run_main(train_argv(family_models[size], tiny_dataset_dir, outputs[size], root / "cache",
                            "--max_train_steps", 2, "--learning_rate", "1e-2", "--validation_prompt", PROMPT,
                            *(["--validation_images", image] if image_to_video else [])))
    return outputs, image


@pytest.mark.parametrize("size", FAMILIES)
def test_each_family_trains_and_its_stock_pipeline_loads_the_lora(size, family_runs, family_models):
    outputs, image = family_runs
    pipeline_class, image_to_video = FAMILIES[size]
    info = summary(outputs[size])
    assert info["steps"] == 2
    assert info["encoded_images"] == (4 if image_to_video else 0)
    assert len(info["validation_videos"]) == 1
    weights = lora(outputs[size])
    assert max(w.abs().max().item() for k, w in weights.items() if "lora_B" in k) > 0

    pipe = pipeline_class.from_pretrained(family_models[size])
    pipe.set_progress_bar_config(disable=True)
    assert load_lora_and_collect_warnings(pipe, outputs[size]) == []
    assert pipe.get_list_adapters() == {"transformer": ["default_0"]}
    extra = {"image": Image.open(image)} if image_to_video else {}
    frames = pipe(prompt=PROMPT, num_frames=9, height=48, width=64, num_inference_steps=2, max_sequence_length=16,
                  output_type="np", generator=torch.Generator().manual_seed(0), **extra).frames
    assert frames.shape == (1, 9, 48, 64, 3) and np.isfinite(frames).all()


def test_cli_demo_generates_with_an_i2v_lora(family_runs, family_models, tmp_path):
    outputs, image = family_runs
    path = cli_demo.main(["--prompt", PROMPT, "--model_path", str(family_models["tiny-i2v"]), "--generate_type",
                          "i2v", "--image_or_video_path", image, "--lora_path", str(outputs["tiny-i2v"]),
                          "--num_frames", "9", "--height", "48", "--width", "64", "--num_inference_steps", "2",
                          "--dtype", "float32", "--output_path", str(tmp_path / "i2v.mp4")])
    assert path.stat().st_size > 0


# ---------------------------------------------------------------------------------------------------------------
# What the transformer is given: the trainer's inputs against the pipeline's.


def _record_transformer_inputs(monkeypatch) -> list[dict]:
    calls = []
    forward = CogVideoXTransformer3DModel.forward

    def recording(self, hidden_states, encoder_hidden_states, timestep, *args, **kwargs):
        calls.append({"hidden_states": hidden_states.detach().clone(), "ofs": kwargs.get("ofs"),
                      "rotary": kwargs.get("image_rotary_emb")})
        return forward(self, hidden_states, encoder_hidden_states, timestep, *args, **kwargs)

    monkeypatch.setattr(CogVideoXTransformer3DModel, "forward", recording)
    return calls


@pytest.mark.parametrize("size", ["tiny-i2v", "tiny-1.5-i2v"])
def test_i2v_training_input_carries_the_first_frame_latent_where_the_pipeline_puts_it(
        size, family_models, tmp_path, monkeypatch):
    data = tmp_path / "data"
    write_clips(data, num_clips=1, num_frames=25)
    image = first_frame_png(data / "videos" / "clip_000.mp4", tmp_path / "first.png")
    # Without the randomness that is there on purpose (pixel noise, latent sampling, dropout), the trainer's and
    # the pipeline's image latents are the same numbers.
    monkeypatch.setattr(latent_cache, "add_pixel_noise", lambda image, key: image)
    monkeypatch.setattr(loss, "sample_latent", lambda params, generator, device: params.chunk(2)[0].permute(1, 0, 2, 3))
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
    calls = _record_transformer_inputs(monkeypatch)
    run_main(train_argv(family_models[size], data, tmp_path / "out", tmp_path / "cache", "--max_train_steps", 1,
                        "--noised_image_dropout", 0))
    trained = calls[0]
    calls.clear()
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(family_models[size])
    pipe.set_progress_bar_config(disable=True)
    pipe(prompt=PROMPT, image=Image.open(image), num_frames=9, height=48, width=64, num_inference_steps=1,
         guidance_scale=1.0, max_sequence_length=16, output_type="latent", generator=torch.Generator().manual_seed(0))
    inferred = calls[0]

    x, y = trained["hidden_states"], inferred["hidden_states"]
    channels = x.shape[2] // 2
    # 1.0: 3 latent frames; 1.5: padded to 4 at the front, as the pipeline pads (and later drops).
    assert x.shape == y.shape == (1, 4 if "1.5" in size else 3, 2 * channels, 6, 8)
    image_x, image_y = x[:, :, channels:], y[:, :, channels:]
    assert image_y[:, 0].abs().max() > 0.1 and image_y[:, 1:].abs().max() == 0
    torch.testing.assert_close(image_x, image_y, atol=2e-2, rtol=0)  # the PNG's 8-bit rounding
    assert (trained["ofs"] is None) == (inferred["ofs"] is None) == ("1.5" not in size)
    if "1.5" in size:
        assert torch.equal(trained["ofs"], inferred["ofs"])
    for a, b in zip(trained["rotary"], inferred["rotary"]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Learned positional embeddings, conditioning images in the dataset


def test_learned_positional_embeddings_keep_training_at_the_native_size(family_models, tiny_dataset_dir, tmp_path,
                                                                         capsys):
    argv = train_argv(family_models["tiny-i2v"], tiny_dataset_dir, tmp_path / "out", tmp_path / "cache",
                      "--max_train_steps", 2, "--height", 64, "--width", 96)
    with pytest.raises(SystemExit) as exit_:
        run_main(argv)
    message = str(exit_.value.code)
    assert "9x48x64" in message and "9x64x96" in message and "--ignore_learned_positional_embeddings" in message
    assert not (tmp_path / "out").exists()

    image = first_frame_png(tiny_dataset_dir / "videos" / "clip_000.mp4", tmp_path / "first.png")
    run_main(argv + ["--ignore_learned_positional_embeddings", "--validation_prompt", PROMPT, "--validation_images",
                     image])
    assert len(summary(tmp_path / "out")["validation_videos"]) == 1
    # The LoRA generates the same way, at the size it was trained at.
    cli_demo.main(["--prompt", PROMPT, "--model_path", str(family_models["tiny-i2v"]), "--generate_type", "i2v",
                   "--image_or_video_path", image, "--lora_path", str(tmp_path / "out"),
                   "--ignore_learned_positional_embeddings", "--num_frames", "9", "--height", "64", "--width", "96",
                   "--num_inference_steps", "2", "--dtype", "float32", "--output_path", str(tmp_path / "v.mp4")])
    assert (tmp_path / "v.mp4").stat().st_size > 0


def test_images_file_pairs_with_the_clips(tmp_path):
    (tmp_path / "prompts.txt").write_text("one\ntwo\n")
    (tmp_path / "videos.txt").write_text("a.mp4\nb.mp4\n")
    assert [c.image for c in load_clips(tmp_path, "prompts.txt", "videos.txt")] == [None, None]
    (tmp_path / "images.txt").write_text("a.png\n\nb.png\n")
    assert [c.image for c in load_clips(tmp_path, "prompts.txt", "videos.txt")] == [tmp_path / "a.png",
                                                                                   tmp_path / "b.png"]
    (tmp_path / "images.txt").write_text("a.png\n")
    with pytest.raises(DatasetError, match="images.txt has 1 images but .*videos.txt has 2 clips"):
        load_clips(tmp_path, "prompts.txt", "videos.txt")
    with pytest.raises(DatasetError, match="other.txt: not found"):
        load_clips(tmp_path, "prompts.txt", "videos.txt", image_column="other.txt")


def test_i2v_trains_on_the_images_file(family_models, tiny_dataset_dir, tmp_path):
    data = tmp_path / "data"
    write_clips(data, num_clips=2, num_frames=25)
    for i in range(2):
        Image.fromarray(np.full((60, 80, 3), 40 * i, np.uint8)).save(data / f"image_{i}.png")
    (data / "images.txt").write_text("image_0.png\nimage_1.png\n")
    run_main(train_argv(family_models["tiny-i2v"], data, tmp_path / "out", tmp_path / "cache", "--max_train_steps", 1))
    assert summary(tmp_path / "out")["encoded_images"] == 2
    # Another image for a clip is another cache entry; the clip's own entry is reused.
    Image.fromarray(np.full((60, 80, 3), 200, np.uint8)).save(data / "image_1.png")
    run_main(train_argv(family_models["tiny-i2v"], data, tmp_path / "again", tmp_path / "cache",
                        "--max_train_steps", 1))
    assert (summary(tmp_path / "again")["encoded_clips"], summary(tmp_path / "again")["encoded_images"]) == (0, 1)


# ---------------------------------------------------------------------------------------------------------------
# Buckets


def test_bucket_of_a_clip_is_the_nearest_aspect_ratio_and_longest_length():
    buckets = Buckets((48, 64), (64, 96), (5, 9, 17))
    assert buckets.size(480, 640) == (48, 64)       # 4:3
    assert buckets.size(1080, 1080) == (64, 64)     # 1:1
    assert buckets.size(720, 1280) == (48, 96)      # 16:9 is nearer 2:1 than 3:2 (on a log scale)
    assert buckets.size(620, 960) == (64, 96)
    assert [buckets.length(n) for n in (4, 5, 8, 9, 16, 17, 100)] == [None, 5, 5, 9, 9, 17, 17]
    auto = Buckets((48,), (64,), (9,), auto_area=48 * 64)
    assert auto.size(1080, 1920) == (48, 80) and auto.size(1000, 1000) == (48, 48)


@pytest.fixture(scope="module")
def mixed_dataset(tmp_path_factory):
    """Three frame sizes x two lengths (25 and 7 frames at 8 fps), two clips each, and two single images."""
    root = tmp_path_factory.mktemp("mixed")
    videos, prompts = [], []
    for n, ((height, width), frames) in enumerate(itertools.product([(48, 64), (64, 64), (48, 96)], [25, 7])):
        folder = f"set{n}"
        for video in write_clips(root / folder, num_clips=2, height=height, width=width, num_frames=frames,
                                 id_offset=2 * n):
            videos.append(f"{folder}/{video}")
            prompts.append(f"a square, clip {len(videos)}")
    for i in range(2):
        Image.fromarray(np.full((60, 80, 3), 50 + 100 * i, np.uint8)).save(root / f"still_{i}.png")
        videos.append(f"still_{i}.png")
        prompts.append(f"a still image {i}")
    (root / "videos.txt").write_text("\n".join(videos) + "\n")
    (root / "prompts.txt").write_text("\n".join(prompts) + "\n")
    return root


def test_mixed_sizes_and_lengths_train_in_batches_of_one_bucket(family_models, mixed_dataset, tmp_path,
                                                                 monkeypatch):
    calls = _record_transformer_inputs(monkeypatch)
    buckets = ["--height_buckets", 48, 64, "--width_buckets", 64, 96, "--frame_buckets", 5, 9]
    run_main(train_argv(family_models["tiny-1.5-i2v"], mixed_dataset, tmp_path / "out", tmp_path / "cache",
                        "--train_batch_size", 2, "--max_train_steps", 7, *buckets))
    shapes = [tuple(c["hidden_states"].shape) for c in calls]
    # 7 buckets of 2 entries: (48x64, 64x64, 48x96) x (5, 9 frames) and the stills' one frame at 48x64; their
    # latent frames 2, 3 and 1 are padded to 2, 4 and 2 for 1.5's temporal patches.
    assert sorted(shapes) == sorted([(2, f, 8, h // 8, w // 8) for (h, w) in [(48, 64), (64, 64), (48, 96)]
                                     for f in (2, 4)] + [(2, 2, 8, 6, 8)])
    info = summary(tmp_path / "out")
    assert (info["clips"], info["encoded_clips"], info["encoded_images"]) == (14, 14, 14)

    # Same buckets, same cache entries; other buckets, other entries.
    run_main(train_argv(family_models["tiny-1.5-i2v"], mixed_dataset, tmp_path / "again", tmp_path / "cache",
                        "--train_batch_size", 2, "--max_train_steps", 1, *buckets))
    assert (summary(tmp_path / "again")["encoded_clips"], summary(tmp_path / "again")["encoded_images"]) == (0, 0)
    run_main(train_argv(family_models["tiny-1.5-i2v"], mixed_dataset, tmp_path / "auto", tmp_path / "cache",
                        "--train_batch_size", 2, "--max_train_steps", 1, "--auto_buckets", "--frame_buckets", 5, 9))
    info = summary(tmp_path / "auto")
    assert info["encoded_clips"] == 14 - 6  # only the 48x64 clips and stills keep their size (48x64)
