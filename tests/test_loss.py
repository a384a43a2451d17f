"""The loss and what feeds it (loss.py): v-prediction loss, batch draws, image latents, rotary embeddings."""

import pytest
import torch
from diffusers import CogVideoXDPMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

import helpers  # noqa: F401  (puts the repository on sys.path)
from cogvideox_lora import loss
from cogvideox_lora.loss import draw_batch, rotary_embeddings, sample_seed, v_prediction_loss


@pytest.fixture(scope="module")
def alphas_cumprod(tiny_model_dir):
    return CogVideoXDPMScheduler.from_pretrained(tiny_model_dir, subfolder="scheduler").alphas_cumprod


def _v_problem(alphas_cumprod, timesteps, error_scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (len(timesteps), 3, 4, 6, 8)  # [B, F, C, H, W]
    x0 = torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g)
    a = alphas_cumprod[torch.tensor(timesteps)].float()
    a5 = a.view(-1, 1, 1, 1, 1)
    noisy = a5.sqrt() * x0 + (1 - a5).sqrt() * noise
    v_target = a5.sqrt() * noise - (1 - a5).sqrt() * x0
    v_pred = v_target + error_scale * torch.randn(shape, generator=g)
    return x0, noise, a, noisy, v_target, v_pred


@pytest.mark.parametrize("timesteps", [[0, 1, 5], [250, 500, 999], [0, 999, 400, 3]])
@pytest.mark.parametrize("error_scale", [1.0, 0.1])
def test_fp32_loss_is_the_plain_v_mse(alphas_cumprod, timesteps, error_scale):
    x0, noise, a, noisy, v_target, v_pred = _v_problem(alphas_cumprod, timesteps, error_scale)
    loss = v_prediction_loss(v_pred, noisy, x0, a)
    # The identity, computed independently in float64: the weighted x0 error is the v error.
    reference = ((v_pred.double() - v_target.double()) ** 2).mean()
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


def test_loss_is_per_sample_weighted_not_a_plain_x0_mse(alphas_cumprod):
    # The weights matter: without 1/(1-alpha) the x0 error near t=0 is ~1000 times smaller.
    x0, noise, a, noisy, v_target, v_pred = _v_problem(alphas_cumprod, [0], 1.0)
    a5 = a.view(-1, 1, 1, 1, 1)
    x0_pred = a5.sqrt() * noisy - (1 - a5).sqrt() * v_pred
    unweighted = ((x0_pred - x0) ** 2).mean()
    assert v_prediction_loss(v_pred, noisy, x0, a) > 100 * unweighted
    # A perfect prediction has (almost) no loss.
    assert v_prediction_loss(v_target, noisy, x0, a) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_is_computed_in_fp32_for_half_precision_outputs(alphas_cumprod, dtype):
    x0, noise, a, noisy, v_target, v_pred = _v_problem(alphas_cumprod, [0, 10, 900], 0.1)
    half = v_pred.to(dtype)
    loss = v_prediction_loss(half, noisy, x0, a)
    assert loss.dtype == torch.float32
    # Only the model output is rounded: the rest of the computation is the fp32 one, exactly.
    assert torch.equal(loss, v_prediction_loss(half.float(), noisy, x0, a))
    reference = ((half.double() - v_target.double()) ** 2).mean()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-4)


def _videos_and_prompts(num, seed=0):
    g = torch.Generator().manual_seed(seed)
    videos = [{"latent_params": torch.randn(8, 3, 6, 8, generator=g),  # [2C, F, H, W]
               "latent_params_flipped": torch.randn(8, 3, 6, 8, generator=g)} for _ in range(num)]
    prompts = [{"prompt_embeds": torch.randn(16, 32, generator=g)} for _ in range(num)]
    return videos, prompts


def test_draw_batch_is_a_function_of_the_seeds():
    videos, prompts = _videos_and_prompts(2)
    first = draw_batch(videos, prompts, [11, 12], 1.15, 0.0, 1000, "cpu")
    again = draw_batch(videos, prompts, [11, 12], 1.15, 0.0, 1000, "cpu")
    torch.manual_seed(123)  # the global RNG plays no part
    other = draw_batch(videos, prompts, [11, 13], 1.15, 0.0, 1000, "cpu")

    latents, noise, timesteps, embeds = first
    assert latents.shape == noise.shape == (2, 3, 4, 6, 8)  # [B, F, C, H, W]
    assert embeds.shape == (2, 16, 32)
    assert timesteps.dtype == torch.long and ((0 <= timesteps) & (timesteps < 1000)).all()
    for x, y in zip(first, again):
        assert torch.equal(x, y)
    # A sample depends on its own seed only: the first is unchanged, the second is new.
    for x, y in zip(first[:2], other[:2]):
        assert torch.equal(x[0], y[0])
        assert not torch.allclose(x[1], y[1])
    many = [draw_batch(videos[:1], prompts[:1], [s], 1.15, 0.0, 1000, "cpu")[2].item() for s in range(20)]
    assert len(set(many)) > 10


def test_draw_batch_samples_the_latent_distribution_and_flips():
    videos, prompts = _videos_and_prompts(1)
    for v in videos:  # a tiny variance: the sample is the mean
        v["latent_params"][4:] = -30.0
        v["latent_params_flipped"][4:] = -30.0
    scale = 0.7
    plain = draw_batch(videos, prompts, [5], scale, 0.0, 1000, "cpu")[0]
    flipped = draw_batch(videos, prompts, [5], scale, 1.0, 1000, "cpu")[0]
    expected = videos[0]["latent_params"][:4].permute(1, 0, 2, 3) * scale
    torch.testing.assert_close(plain[0], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(flipped[0], videos[0]["latent_params_flipped"][:4].permute(1, 0, 2, 3) * scale,
                               atol=1e-5, rtol=0)
    # With a probability of 0.5 both appear over many seeds.
    used = set()
    for seed in range(30):
        latent = draw_batch(videos, prompts, [seed], scale, 0.5, 1000, "cpu")[0][0]
        used.add(torch.allclose(latent, expected, atol=1e-5))
    assert used == {True, False}


def test_sample_seeds_differ_by_step_and_position():
    seeds = {sample_seed(3, step, position) for step in range(50) for position in range(8)}
    assert len(seeds) == 400
    assert sample_seed(3, 0, 0) != sample_seed(4, 0, 0)


def test_no_rotary_embeddings_for_the_2b_style_model(tiny_model_dir):
    config = CogVideoXTransformer3DModel.load_config(tiny_model_dir, subfolder="transformer")
    transformer = CogVideoXTransformer3DModel.from_config(config)
    assert rotary_embeddings(transformer.config, 3, 6, 8, "cpu") is None


def test_rotary_embeddings_of_the_5b_style_model(tiny_5b_model_dir):
    pipe = CogVideoXPipeline.from_pretrained(tiny_5b_model_dir)
    transformer = pipe.transformer
    head_dim = transformer.config.attention_head_dim
    for frames, height, width in [(3, 6, 8), (2, 8, 6), (5, 10, 14)]:
        rotary = rotary_embeddings(transformer.config, frames, height, width, "cpu")
        assert isinstance(rotary, tuple) and len(rotary) == 2
        cos, sin = rotary
        tokens = frames * (height // 2) * (width // 2)
        assert cos.shape == sin.shape == (tokens, head_dim)
        # The very tables the pipeline builds for the same size, and so what the transformer was made for.
        expected = pipe._prepare_rotary_positional_embeddings(height * 8, width * 8, frames, torch.device("cpu"))
        torch.testing.assert_close(cos, expected[0], atol=0, rtol=0)
        torch.testing.assert_close(sin, expected[1], atol=0, rtol=0)

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 3, 4, 6, 8, generator=g)
    text = torch.randn(1, 16, 32, generator=g)
    with torch.no_grad():
        out = transformer(hidden_states=hidden, encoder_hidden_states=text, timestep=torch.tensor([500]),
                          image_rotary_emb=rotary_embeddings(transformer.config, 3, 6, 8, "cpu"),
                          return_dict=False)[0]
        without = transformer(hidden_states=hidden, encoder_hidden_states=text, timestep=torch.tensor([500]),
                              image_rotary_emb=None, return_dict=False)[0]
    assert out.shape == hidden.shape
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, without)  # the embeddings are used


def test_image_dropout_zeroes_the_image_latent_and_shares_the_flip():
    g = torch.Generator().manual_seed(0)
    entry = {"image_latent_params": torch.randn(8, 1, 6, 8, generator=g),
             "image_latent_params_flipped": torch.randn(8, 1, 6, 8, generator=g)}
    entry["image_latent_params"][4:] = entry["image_latent_params_flipped"][4:] = -30.0  # sample = mean
    videos = {"latent_params": torch.randn(8, 3, 6, 8, generator=g)}
    videos["latent_params"][4:] = -30.0
    videos["latent_params_flipped"] = videos["latent_params"].flip(-1)
    kept = dropped = 0
    for seed in range(40):
        images = loss.draw_image_latents([entry], [seed], 0.7, 0.5, 1000, 0.5, 4, "cpu")[0]
        assert images.shape == (4, 4, 6, 8) and images[1:].abs().max() == 0
        latent = loss.draw_batch([videos], [{"prompt_embeds": torch.zeros(2, 2)}], [seed], 1.0, 0.5, 1000, "cpu")[0]
        flipped = torch.allclose(latent[0], videos["latent_params_flipped"][:4].permute(1, 0, 2, 3), atol=1e-5)
        if images.abs().max() == 0:
            dropped += 1
            continue
        kept += 1
        key = "image_latent_params_flipped" if flipped else "image_latent_params"
        torch.testing.assert_close(images[0], entry[key][:4, 0] * 0.7, atol=1e-5, rtol=0)
    assert kept and dropped
