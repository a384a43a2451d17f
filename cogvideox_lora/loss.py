"""One training batch through the transformer: noise, timesteps, the model's extra inputs and the loss.

The inputs are built as diffusers' pipelines build them at inference, so that a LoRA learns what the
stock pipelines will ask of it: 1.5 models get their latent frames padded at the front to a multiple of
patch_size_t (where the pipelines put, and later drop, their padding frame) and the ofs embedding of 2.0;
I2V models get the first frame's latent in front of zeros, beside the video latents on the channels.

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


_IMAGE_STREAM = 1 << 62
_CAPTION_STREAM = 1 << 61


def caption_dropped(seed: int, dropout: float) -> bool:
    """Whether the sample of this seed trains on the empty prompt (--caption_dropout). A stream of its own, so the
    sample's other draws are those of a run without caption dropout."""
    return dropout > 0 and random.Random(seed + _CAPTION_STREAM).random() < dropout


def rotary_embeddings(config, latent_frames: int, latent_height: int, latent_width: int, device):
    """The (cos, sin) rotary tables the pipeline builds for this latent size (latent_frames after any
    padding), or None if the model has none."""
    if not config.use_rotary_positional_embeddings:
        return None
    p, p_t = config.patch_size, config.patch_size_t
    grid = (latent_height // p, latent_width // p)
    if p_t is None:
        # 1.0 stretches the positions of any size over those of its sample size.
        crops = get_resize_crop_region_for_grid(grid, config.sample_width // p, config.sample_height // p)
        return get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim, crops_coords=crops, grid_size=grid,
                                       temporal_size=latent_frames, device=device)
    # 1.5 counts positions from the corner, one per patch, whatever the size.
    return get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim, crops_coords=None, grid_size=grid,
                                   temporal_size=-(-latent_frames // p_t), grid_type="slice",
                                   max_size=(config.sample_height // p, config.sample_width // p), device=device)


def transformer_inputs(config, latent_frames: int, latent_height: int, latent_width: int, device) -> dict:
    """The transformer's keyword inputs that depend only on the latent size: rotary tables and 1.5 I2V's ofs."""
    ofs = None if config.ofs_embed_dim is None else torch.full((1,), 2.0, device=device)
    return {"image_rotary_emb": rotary_embeddings(config, latent_frames, latent_height, latent_width, device),
            "ofs": ofs}


def pad_frames(latent: torch.Tensor, patch_size_t: int | None) -> torch.Tensor:
    """[F, C, H, W] with copies of the first frame in front, up to a multiple of patch_size_t."""
    missing = (-latent.shape[0]) % (patch_size_t or 1)
    return torch.cat([latent[:1].expand(missing, *latent.shape[1:]), latent]) if missing else latent


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


def _choices(seed: int, random_flip: float, num_timesteps: int, image_dropout: float) -> tuple[bool, int, bool]:
    """A sample's host-side draws (no device sync in the step): mirrored or not, timestep, image dropped or not.

    The video and its conditioning image are drawn apart but from the same seed, so both see one choice.
    """
    rng = random.Random(seed)
    flipped = random_flip > 0 and rng.random() < random_flip
    timestep = rng.randrange(num_timesteps)
    return flipped, timestep, image_dropout > 0 and rng.random() < image_dropout


def sample_latent(params: torch.Tensor, generator, device) -> torch.Tensor:
    """A draw from the VAE's diagonal Gaussian, given its cached [2C, F, H, W] parameters, as [F, C, H, W]."""
    mean, logvar = params.to(device, non_blocking=True).float().chunk(2, dim=0)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    # The VAE gives [C, F, H, W]; the transformer takes [F, C, H, W].
    return (mean + std * torch.randn(mean.shape, generator=generator, device=device)).permute(1, 0, 2, 3)


def draw_batch(videos, prompts, seeds, scaling_factor: float, random_flip: float, num_timesteps: int, device,
               patch_size_t: int | None = None):
    """Latents [B, F, C, H, W] sampled from the cached distributions (padded for patch_size_t), their noise
    and timesteps."""
    latents, noise, timesteps = [], [], []
    for video, seed in zip(videos, seeds):
        flipped, timestep, _ = _choices(seed, random_flip, num_timesteps, 0.0)
        generator = torch.Generator(device).manual_seed(seed)
        latent = sample_latent(video["latent_params_flipped" if flipped else "latent_params"], generator, device)
        latents.append(pad_frames(latent * scaling_factor, patch_size_t))
        noise.append(torch.randn(latents[-1].shape, generator=generator, device=device))
        timesteps.append(timestep)
    prompt_embeds = torch.stack([p["prompt_embeds"] for p in prompts]).to(device, non_blocking=True)
    timesteps = torch.tensor(timesteps, dtype=torch.long).to(device, non_blocking=True)
    return torch.stack(latents), torch.stack(noise), timesteps, prompt_embeds


def draw_image_latents(images, seeds, image_scale: float, random_flip: float, num_timesteps: int,
                       image_dropout: float, latent_frames: int, device) -> torch.Tensor:
    """I2V conditioning [B, latent_frames, C, H, W]: each first frame's latent, then zeros, as the pipeline
    lays it out; all zeros for a sample whose image is dropped (--noised_image_dropout).

    image_scale is the VAE's scaling_factor, or its inverse for VAEs with invert_scale_latents (1.5), as the
    I2V pipeline scales the image latent.
    """
    conditioning = []
    for image, seed in zip(images, seeds):
        flipped, _, dropped = _choices(seed, random_flip, num_timesteps, image_dropout)
        # A stream of its own: the video's generator draws its latent and noise from `seed`.
        generator = torch.Generator(device).manual_seed(seed + _IMAGE_STREAM)
        latent = sample_latent(image["image_latent_params_flipped" if flipped else "image_latent_params"], generator,
                         device) * image_scale
        padded = latent.new_zeros(latent_frames, *latent.shape[1:])
        if not dropped:
            padded[:1] = latent
        conditioning.append(padded)
    return torch.stack(conditioning)


def compute_loss(transformer, batch, alphas_cumprod, weight_dtype, inputs: dict, image_latents=None):
    """inputs: transformer_inputs() for the batch's latent size; image_latents: draw_image_latents() for I2V."""
    latents, noise, timesteps, prompt_embeds = batch
    a = alphas_cumprod[timesteps].view(-1, 1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    hidden_states = noisy if image_latents is None else torch.cat([noisy, image_latents], dim=2)
    model_output = transformer(
        hidden_states=hidden_states.to(weight_dtype),
        encoder_hidden_states=prompt_embeds.to(weight_dtype),
        timestep=timesteps,
        return_dict=False,
        **inputs,
    )[0]
    return v_prediction_loss(model_output, noisy, latents, alphas_cumprod[timesteps])
