"""One training batch through the transformer: noise, timesteps, rotary embeddings and the loss.

Every random draw of a sample comes from a seed made of (run seed, micro-step, the sample's place in
the global batch). So a run resumed at step k draws what the uninterrupted run drew, and N processes
with batch B draw what one process with batch N*B draws.
"""

import random

import torch
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid


def sample_seed(seed: int, micro_step: int, position: int) -> int:
    return (seed * 1_000_003 + micro_step) * 10_007 + position


def rotary_embeddings(config, latent_frames: int, latent_height: int, latent_width: int, device):
    """The (cos, sin) rotary tables the pipeline builds for this latent size, or None if the model has none."""
    if not config.use_rotary_positional_embeddings:
        return None
    p = config.patch_size
    grid = (latent_height // p, latent_width // p)
    crops = get_resize_crop_region_for_grid(grid, config.sample_width // p, config.sample_height // p)
    return get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim, crops_coords=crops, grid_size=grid,
                                   temporal_size=latent_frames, device=device)


def v_prediction_loss(model_output, noisy_latents, latents, alphas_cumprod_t):
    """CogVideoX's loss: the x0 predicted from v, weighted by 1/(1-alpha_bar_t), all in fp32.

    The weights reach ~400 (2B) and ~1,200 (5B) near t=0, so bf16 rounding of the prediction would be
    amplified by as much; in fp32 the weighted x0 error is, as it should be, the plain v error.
    """
    a = alphas_cumprod_t.float().view(-1, *([1] * (latents.dim() - 1)))
    x0_pred = a.sqrt() * noisy_latents.float() - (1 - a).sqrt() * model_output.float()
    weights = 1 / (1 - a)
    per_sample = (weights * (x0_pred - latents.float()) ** 2).flatten(1).mean(1)
    return per_sample.mean()


def draw_batch(videos, prompts, seeds, scaling_factor: float, random_flip: float, num_timesteps: int, device):
    """Latents [B, F, C, H, W] sampled from the cached distributions, their noise and timesteps."""
    latents, noise, timesteps = [], [], []
    for video, seed in zip(videos, seeds):
        rng = random.Random(seed)  # host-side draws: no device sync in the step
        use_flipped = random_flip > 0 and rng.random() < random_flip
        params = video["latent_params_flipped" if use_flipped else "latent_params"]
        params = params.to(device, non_blocking=True).float()
        mean, logvar = params.chunk(2, dim=0)
        generator = torch.Generator(device).manual_seed(seed)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        latent = (mean + std * torch.randn(mean.shape, generator=generator, device=device)) * scaling_factor
        latents.append(latent.permute(1, 0, 2, 3))  # the VAE gives [C, F, H, W]; the transformer takes [F, C, H, W]
        noise.append(torch.randn(latents[-1].shape, generator=generator, device=device))
        timesteps.append(rng.randrange(num_timesteps))
    prompt_embeds = torch.stack([p["prompt_embeds"] for p in prompts]).to(device, non_blocking=True)
    timesteps = torch.tensor(timesteps, dtype=torch.long).to(device, non_blocking=True)
    return torch.stack(latents), torch.stack(noise), timesteps, prompt_embeds


def compute_loss(transformer, batch, alphas_cumprod, weight_dtype, rotary):
    latents, noise, timesteps, prompt_embeds = batch
    a = alphas_cumprod[timesteps].view(-1, 1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    model_output = transformer(
        hidden_states=noisy.to(weight_dtype),
        encoder_hidden_states=prompt_embeds.to(weight_dtype),
        timestep=timesteps,
        image_rotary_emb=rotary,
        return_dict=False,
    )[0]
    return v_prediction_loss(model_output, noisy, latents, alphas_cumprod[timesteps])
