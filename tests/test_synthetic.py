import decord
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
from safetensors import safe_open
from transformers import AutoTokenizer, T5Config, T5EncoderModel

from cogvideox_lora import synthetic
from conftest import DATASET_PROMPTS


def _generate(model_dir):
    pipe = CogVideoXPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt="a brown bear walks through the forest", negative_prompt="", num_frames=9, height=48,
                width=64, num_inference_steps=2, guidance_scale=6.0, max_sequence_length=16, output_type="np",
                generator=torch.Generator().manual_seed(0)).frames


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_5b_model_dir"])
def test_tiny_pipeline_loads_and_generates(fixture, request):
    video = _generate(request.getfixturevalue(fixture))
    assert video.shape == (1, 9, 48, 64, 3)
    assert np.isfinite(video).all()
    assert video.min() >= 0.0 and video.max() <= 1.0
    # A random model still has to produce varying pixels, not a constant frame.
    assert video.std() > 0.01


def test_components_load_with_their_own_classes(tiny_model_dir):
    transformer = CogVideoXTransformer3DModel.from_pretrained(tiny_model_dir, subfolder="transformer")
    vae = AutoencoderKLCogVideoX.from_pretrained(tiny_model_dir, subfolder="vae")
    text_encoder = T5EncoderModel.from_pretrained(tiny_model_dir, subfolder="text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, subfolder="tokenizer")
    scheduler = CogVideoXDPMScheduler.from_pretrained(tiny_model_dir, subfolder="scheduler")

    assert transformer.config.in_channels == vae.config.latent_channels
    assert transformer.config.text_embed_dim == text_encoder.config.d_model
    assert len(tokenizer) <= text_encoder.config.vocab_size
    assert tokenizer.model_max_length == transformer.config.max_text_seq_length == 16
    assert not transformer.config.use_rotary_positional_embeddings
    assert vae.config.scaling_factor == pytest.approx(1.15258426)
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.timestep_spacing == "trailing"
    assert scheduler.config.rescale_betas_zero_snr
    assert scheduler.config.snr_shift_scale == 3.0


def test_tiny_vae_compresses_8x_spatially_and_4x_in_time(tiny_model_dir):
    vae = AutoencoderKLCogVideoX.from_pretrained(tiny_model_dir, subfolder="vae")
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 9, 48, 64)).latent_dist.mode()
    assert latents.shape == (1, 4, 3, 6, 8)


def test_tiny_5b_is_5b_style(tiny_5b_model_dir):
    transformer = CogVideoXTransformer3DModel.from_pretrained(tiny_5b_model_dir, subfolder="transformer")
    vae = AutoencoderKLCogVideoX.from_pretrained(tiny_5b_model_dir, subfolder="vae")
    scheduler = CogVideoXDPMScheduler.from_pretrained(tiny_5b_model_dir, subfolder="scheduler")
    assert transformer.config.use_rotary_positional_embeddings
    assert vae.config.scaling_factor == pytest.approx(0.7)
    assert scheduler.config.snr_shift_scale == 1.0


def test_tokenizer_round_trips_and_pads(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, subfolder="tokenizer")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)

    sentence = "A bear walks, 2 cars drive."
    ids = tokenizer(sentence).input_ids
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == sentence

    padded = tokenizer(sentence, padding="max_length", max_length=16, truncation=True)
    n = len(ids)
    assert n < 16
    assert padded.input_ids == ids + [tokenizer.pad_token_id] * (16 - n)
    assert padded.attention_mask == [1] * n + [0] * (16 - n)


def test_same_seed_same_weights_other_seed_other_weights():
    first = synthetic.build_pipeline("tiny", seed=3).transformer.state_dict()
    again = synthetic.build_pipeline("tiny", seed=3).transformer.state_dict()
    other = synthetic.build_pipeline("tiny", seed=4).transformer.state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("size, transformer_params, rotary", [("2b", 1.69e9, False), ("5b", 5.57e9, True)])
def test_real_size_configs(size, transformer_params, rotary):
    # On the meta device nothing is allocated, so the real sizes can be checked on a laptop.
    spec = synthetic.SPECS[size]
    with torch.device("meta"):
        transformer = CogVideoXTransformer3DModel(**spec["transformer"])
        text_encoder = T5EncoderModel(T5Config(**spec["text_encoder"]))
    assert sum(p.numel() for p in transformer.parameters()) == pytest.approx(transformer_params, rel=0.01)
    assert sum(p.numel() for p in text_encoder.parameters()) == pytest.approx(4.76e9, rel=0.01)
    assert transformer.config.use_rotary_positional_embeddings == rotary


def test_clips_decode_with_known_frames(tiny_dataset_dir):
    videos = (tiny_dataset_dir / "videos.txt").read_text().splitlines()
    prompts = (tiny_dataset_dir / "prompts.txt").read_text().splitlines()
    assert videos == [f"videos/clip_{i:03d}.mp4" for i in range(4)]
    assert prompts == DATASET_PROMPTS

    first_frames = []
    for video in videos:
        reader = decord.VideoReader(str(tiny_dataset_dir / video))
        assert len(reader) == 25
        assert reader.get_avg_fps() == 8
        frames = reader.get_batch(list(range(25))).asnumpy()
        assert frames.shape == (25, 48, 64, 3)
        assert [synthetic.frame_index_from_pixels(f) for f in frames] == list(range(25))
        first_frames.append(frames[0].astype(int))
    # The clip-specific square makes every clip different from every other.
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(first_frames[i] - first_frames[j]).max() > 100


def test_frame_index_from_normalised_channels_first_frames(tiny_dataset_dir):
    reader = decord.VideoReader(str(tiny_dataset_dir / "videos/clip_002.mp4"))
    frames = torch.from_numpy(reader.get_batch([0, 7, 24]).asnumpy()).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert [synthetic.frame_index_from_pixels(f, value_range=(-1, 1)) for f in frames] == [0, 7, 24]


def test_write_clips_offset_default_prompts_and_limits(tmp_path):
    videos = synthetic.write_clips(tmp_path, num_clips=2, num_frames=5, id_offset=10)
    assert videos == ["videos/clip_010.mp4", "videos/clip_011.mp4"]
    prompts = (tmp_path / "prompts.txt").read_text().splitlines()
    assert len(set(prompts)) == 2
    with pytest.raises(ValueError):
        synthetic.write_clips(tmp_path, height=49)
    with pytest.raises(ValueError):
        synthetic.write_clips(tmp_path, num_frames=synthetic.MAX_FRAMES + 1)
    with pytest.raises(ValueError):
        synthetic.write_clips(tmp_path, num_clips=2, prompts=["only one"])


def test_cli(tmp_path, capsys):
    synthetic.main(["model", "--size", "tiny", str(tmp_path / "model"), "--dtype", "bf16", "--seed", "1"])
    weights = tmp_path / "model" / "transformer" / "diffusion_pytorch_model.safetensors"
    with safe_open(weights, framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}

    synthetic.main(["clips", str(tmp_path / "clips"), "--num_clips", "2", "--num_frames", "9", "--fps", "12"])
    assert str(tmp_path / "clips" / "videos.txt") in capsys.readouterr().out
    reader = decord.VideoReader(str(tmp_path / "clips" / "videos" / "clip_001.mp4"))
    assert (len(reader), reader.get_avg_fps()) == (9, 12)
