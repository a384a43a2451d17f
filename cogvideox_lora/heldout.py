"""The held-out loss: the denoising loss on clips the LoRA never trains on, comparable from step to step and run
to run, and the record of the losses that names the best checkpoint.

A flat, noisy training loss says little about whether a LoRA learns. The held-out loss is evaluated on the same
clips, at the same timesteps spread over the schedule and with the same noise each time: only the weights change
between two evaluations, so its values compare. The noise comes from generators of its own (seeded by the run's
seed, the clip and the timestep), never from the training's random state, so turning it on changes nothing of
the training. The base model's value (the adapter disabled) is measured once at the start: a LoRA below it predicts
the held-out clips better than the model it started from.
"""

import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoints
from .data import DatasetError, check_dataset
from .lora import adapter_disabled
from .loss import compute_loss, draw_batch, draw_image_latents, sample_seed, transformer_inputs
from .placement import Placement
from .settings import DataSource, HeldOutSettings

logger = logging.getLogger(__name__)

_NOISE_STREAM = 1 << 60  # the held-out noise's seeds, apart from every training sample's (loss.py's streams)


def split_clips(clips: list, fraction: float, seed: int) -> tuple[list, list]:
    """(training clips, held-out clips): a `fraction` of the clips (at least one) chosen by seed, in dataset order."""
    count = max(1, round(fraction * len(clips)))
    if count >= len(clips):
        raise DatasetError([f"--validation_split {fraction} holds out {count} of the {len(clips)} clip(s), leaving "
                            f"none to train on: lower it, or give --validation_dataset instead."])
    chosen = set(random.Random(seed).sample(range(len(clips)), count))
    return [c for i, c in enumerate(clips) if i not in chosen], [c for i, c in enumerate(clips) if i in chosen]


def choose_clips(settings: HeldOutSettings, data: DataSource, frames, buckets, clips: list) -> tuple[list, list]:
    """(training clips, held-out clips), these checked as the training clips are; none without the held-out loss."""
    if not settings.enabled:
        return clips, []
    if settings.split is not None:
        clips, held_out = split_clips(clips, settings.split, settings.seed)
    else:
        held_out, bad = check_dataset(settings.dataset, data.caption_column, data.video_column, data.dataset_file,
                                      data.id_token, data.image_column, frames, skip_bad=data.skip_bad,
                                      buckets=buckets)
        if bad:
            logger.warning("Leaving out %d held-out clip(s) (--skip_bad_videos):\n  %s", len(bad), "\n  ".join(bad))
        trained = {c.video.resolve(): c for c in clips}
        both = [f"{c.where}: {c.video} is also a training clip ({trained[c.video.resolve()].where}): a held-out loss "
                f"needs clips the LoRA does not train on; remove it from one of the two lists."
                for c in held_out if c.video.resolve() in trained]
        if both:
            raise DatasetError(both)
    logger.info("Held-out loss on %d clip(s), not trained on:\n  %s", len(held_out),
                "\n  ".join(f"{c.video} ({c.where})" for c in held_out))
    return clips, held_out


def fixed_timesteps(count: int, num_timesteps: int) -> list[int]:
    """`count` timesteps spread evenly over the schedule, each in the middle of its share of it."""
    return [int((k + 0.5) * num_timesteps / count) for k in range(count)]


def noise_seed(seed: int, clip: int, k: int) -> int:
    """The seed of held-out clip `clip`'s latent and noise at its k-th timestep: the same at every evaluation, in any
    process, and none of the training samples'."""
    return sample_seed(seed, k, clip) + _NOISE_STREAM


@dataclass
class HeldOutLoss:
    """Evaluates the held-out loss of a transformer: each process its share of the clips (clip i goes to process
    i mod processes), each clip at every fixed timestep, in batches of up to batch_size, the mean over all in fp32
    (summed in fp64 across processes)."""

    settings: HeldOutSettings
    videos: list[dict]  # the latent cache's entries of the held-out clips
    prompts: list[dict]  # their prompts' entries
    family: object  # models.Family
    scaling_factor: float
    alphas_cumprod: torch.Tensor
    weight_dtype: torch.dtype
    batch_size: int
    placement: Placement
    inputs: dict = field(default_factory=dict)  # the transformer's inputs of each latent size
    seconds: list[float] = field(default_factory=list)  # each evaluation's of the LoRA, for its cost

    def evaluate(self, accelerator, transformer, base: bool = False) -> float:
        """Every process must call this. base: with the adapter disabled (the model the LoRA started from)."""
        started = time.perf_counter()
        model = accelerator.unwrap_model(transformer)
        total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # loss sum, samples
        timesteps = fixed_timesteps(self.settings.timesteps, len(self.alphas_cumprod))
        # The base model runs once: eagerly, rather than compiling the blocks again for the adapter switched off.
        disabled = adapter_disabled(model) if base else contextlib.nullcontext()
        eager = torch.compiler.set_stance("force_eager") if base else contextlib.nullcontext()
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), self.placement.evaluating(model), disabled, eager:
                for clip in range(accelerator.process_index, len(self.videos), accelerator.num_processes):
                    for start in range(0, len(timesteps), self.batch_size):
                        ks = range(start, min(start + self.batch_size, len(timesteps)))
                        loss = self._loss(model, clip, ks, [timesteps[k] for k in ks], accelerator.device)
                        total[0] += loss.double() * len(ks)
                        total[1] += len(ks)
        finally:
            model.train(was_training)
        total = accelerator.reduce(total, reduction="sum")
        loss = (total[0] / total[1]).item()
        if not base:
            self.seconds.append(time.perf_counter() - started)
        return loss

    def _loss(self, model, clip: int, ks, timesteps: list[int], device) -> torch.Tensor:
        """The mean loss of one clip at these of its timesteps, the same draws as in training but for the timesteps
        (fixed), the mirror image (never) and the I2V image (always kept)."""
        seeds = [noise_seed(self.settings.seed, clip, k) for k in ks]
        entries, num_timesteps = [self.videos[clip]] * len(seeds), len(self.alphas_cumprod)
        latents, noise, _, prompt_embeds = draw_batch(entries, [self.prompts[clip]] * len(seeds), seeds,
                                                      self.scaling_factor, 0.0, num_timesteps, device,
                                                      self.family.patch_size_t)
        size = (latents.shape[1], latents.shape[3], latents.shape[4])
        if size not in self.inputs:
            self.inputs[size] = transformer_inputs(model.config, *size, device)
        image_latents = draw_image_latents(entries, seeds, self.family.image_latent_scale, 0.0, num_timesteps, 0.0,
                                           size[0], device) if self.family.image_to_video else None
        batch = (latents, noise, torch.tensor(timesteps, dtype=torch.long, device=device), prompt_embeds)
        return compute_loss(model, batch, self.alphas_cumprod, self.weight_dtype, self.inputs[size],
                            image_latents).float()


@dataclass
class LossHistory:
    """The run's losses: training loss and held-out loss by step, the base model's held-out loss, and the best
    checkpoint (the lowest held-out loss among the checkpoints saved with one)."""

    train: list[tuple[int, float]] = field(default_factory=list)
    heldout: list[tuple[int, float]] = field(default_factory=list)
    base: float | None = None
    best: tuple[int, float] | None = None  # (step, held-out loss)

    @classmethod
    def resumed(cls, output_dir, checkpoint: Path | None) -> "LossHistory":
        """The history up to the checkpoint resumed from, and the best among the checkpoints of output_dir, read
        back from their records."""
        if checkpoint is None:
            return cls()
        record = checkpoints.read_losses(checkpoint) or {}
        best = None
        for found in checkpoints.complete_checkpoints(output_dir):
            loss = (checkpoints.read_losses(found) or {}).get("heldout_loss")
            if loss is not None and (best is None or loss < best[1]):
                best = (checkpoints.step_of(found), loss)
        return cls([tuple(p) for p in record.get("train", [])], [tuple(p) for p in record.get("heldout", [])],
                   record.get("base_heldout_loss"), best)

    def checkpointed(self, step: int) -> dict:
        """The record of checkpoint-`step` (checkpoints.LOSSES_NAME); it becomes the best if its loss is lowest."""
        loss = self.heldout[-1][1] if self.heldout and self.heldout[-1][0] == step else None
        if loss is not None and (self.best is None or loss < self.best[1]):
            self.best = (step, loss)
        return {"step": step, "heldout_loss": loss, "base_heldout_loss": self.base, "train": self.train,
                "heldout": self.heldout}

    @property
    def best_checkpoint(self) -> str | None:
        return None if self.best is None else f"checkpoint-{self.best[0]}"

    def summary(self) -> dict:
        """train_summary.json's part."""
        return {"heldout_loss": self.heldout[-1][1] if self.heldout else None, "base_heldout_loss": self.base,
                "best_checkpoint": self.best_checkpoint, "best_heldout_loss": self.best and self.best[1],
                "heldout_losses": self.heldout, "train_losses": self.train}
