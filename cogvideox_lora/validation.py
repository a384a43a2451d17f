"""Validation videos during training: generated with the LoRA being trained, saved and logged.

The (prompt, video) pairs are spread over the processes; each writes its videos into the shared
--output_dir, and the main process logs them all to the trackers once every process is done.
"""

import io
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import CogVideoXDPMScheduler, CogVideoXPipeline
from diffusers.utils import export_to_video

from .data import resize_and_crop
from .images import open_image
from .distributed import wait_for_everyone_without_deadline
from .video import open_video
from .lora import adapter_disabled
from .placement import Placement
from .settings import ValidationSettings

logger = logging.getLogger(__name__)


def _slug(text: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length] or "prompt"


def load_validation_image(path, height: int, width: int) -> torch.Tensor:
    """[1, 3, height, width] in [0, 1], resized and centre-cropped as training clips are (the pipeline would
    stretch it)."""
    image = open_image(path)[None].float()
    return resize_and_crop(image, height, width, "center", random.Random(0)) / 255.0


def validation_pipeline(transformer, vae, scheduler_config, pipeline_class=CogVideoXPipeline):
    """The model's stock pipeline around the transformer being trained. Prompts arrive as cached T5
    embeddings, so it has no T5."""
    pipe = pipeline_class(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                          scheduler=CogVideoXDPMScheduler.from_config(scheduler_config, timestep_spacing="trailing"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate_validation_video(pipe, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor,
                              settings: ValidationSettings, seed: int, device, dtype,
                              image: torch.Tensor | None = None) -> np.ndarray:
    """One video, [F, H, W, 3] floats in [0, 1]; an image-to-video pipeline takes the image too."""
    return pipe(
        prompt_embeds=prompt_embeds[None].to(device, dtype),
        negative_prompt_embeds=negative_embeds[None].to(device, dtype),
        num_frames=settings.num_frames,
        height=settings.height,
        width=settings.width,
        guidance_scale=settings.guidance_scale,
        use_dynamic_cfg=settings.use_dynamic_cfg,
        num_inference_steps=settings.num_inference_steps,
        generator=torch.Generator(device=device).manual_seed(seed),
        output_type="np",
        **({} if image is None else {"image": image.to(device, dtype)}),
    ).frames[0]


def _tensorboard_video(writer, tag: str, path: Path, step: int, fps: int) -> None:
    # TensorBoard shows videos as animated GIFs in its image tab (what SummaryWriter.add_video does
    # through moviepy); Pillow writes the GIF without that extra dependency. The frames are read back
    # from the file, as another process may have made it.
    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    video = open_video(path)  # decord pads some widths' rows: open_video's frames are [H, W, 3] whatever the width
    frames = np.stack(list(video.frames(list(range(len(video.starts))))))
    images = [Image.fromarray(frame) for frame in frames]
    gif = io.BytesIO()
    images[0].save(gif, format="GIF", save_all=True, append_images=images[1:], duration=1000 / fps, loop=0)
    height, width = frames.shape[1:3]
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=gif.getvalue())
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


def log_videos(accelerator, videos: list[tuple[str, str, Path]], step: int, fps: int) -> None:
    """videos: (tag, prompt, path) of each video."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for tag, _, path in videos:
                _tensorboard_video(tracker.writer, tag, path, step, fps)
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Video(str(path), caption=prompt, fps=fps) for _, prompt, path in videos]},
                        step=step)


@dataclass(frozen=True)
class PipelineParts:
    """What the validation pipeline is made of besides the transformer being trained: the model's pipeline class,
    its scheduler's config, the VAE (loaded at the first use) and the precision."""

    pipeline_class: type
    scheduler_config: dict
    load_vae: Callable
    dtype: torch.dtype


class Validator:
    """Validation in every process, each making its share of the videos.

    The VAE is loaded at the first use and waits on the CPU between uses. prompt_embeds: one per prompt of the
    settings, negative_embeds: the empty prompt's. For an image-to-video model the settings give one image per
    prompt. The placement makes room for the videos (placement.py); optimizer: one whose state may wait on the host
    meanwhile. The first validation also makes the base model's videos (the adapter disabled), once, to show beside
    the LoRA's.
    """

    def __init__(self, settings: ValidationSettings, prompt_embeds, negative_embeds, parts: PipelineParts,
                 placement: Placement, optimizer=None):
        self.settings, self.parts, self.placement, self.optimizer = settings, parts, placement, optimizer
        self.prompt_embeds, self.negative_embeds = prompt_embeds, negative_embeds
        self.images = [load_validation_image(p, settings.height, settings.width) for p in settings.images] or None
        self.vae = None
        self.base_videos: list[Path] | None = None

    def run(self, accelerator, transformer, step: int) -> list[Path]:
        """Every process must call this; each returns the paths of all the videos of this step."""
        if self.base_videos is None and self.settings.prompts:
            with adapter_disabled(accelerator.unwrap_model(transformer)):
                self.base_videos = self._run(accelerator, transformer, step, "base", "validation_base")
        return self._run(accelerator, transformer, step, f"step-{step:06d}", "validation")

    def _run(self, accelerator, transformer, step: int, name: str, tag: str) -> list[Path]:
        """The videos of this step, files named name_pP_vV_…, logged under tag/pP_vV."""
        settings = self.settings
        directory = Path(settings.output_dir) / "validation"
        jobs = [(p, v) for p in range(len(settings.prompts)) for v in range(settings.num_videos)]
        paths = [directory / f"{name}_p{p}_v{v}_{_slug(settings.prompts[p])}.mp4" for p, v in jobs]
        mine = range(accelerator.process_index, len(jobs), accelerator.num_processes)
        if mine:
            directory.mkdir(parents=True, exist_ok=True)
            with self.placement.validating(self.optimizer):
                self._make_videos(accelerator, transformer, [(jobs[i], paths[i]) for i in mine])
        wait_for_everyone_without_deadline(accelerator, f"{tag}-{step}")
        if accelerator.is_main_process:
            log_videos(accelerator, [(f"{tag}/p{p}_v{v}", settings.prompts[p], path)
                                     for (p, v), path in zip(jobs, paths)], step, settings.fps)
        return paths

    def _make_videos(self, accelerator, transformer, jobs) -> None:
        parts, settings = self.parts, self.settings
        self.vae = (self.vae or parts.load_vae()).to(accelerator.device)
        pipe = validation_pipeline(accelerator.unwrap_model(transformer), self.vae, parts.scheduler_config,
                                   parts.pipeline_class)
        # Compiled blocks would compile again for inference (no gradients, another batch size):
        # minutes for a few videos, so they run eagerly here.
        with torch.compiler.set_stance("force_eager"), self.placement.generating(pipe):
            for (p, v), path in jobs:
                # Video v of a prompt starts from seed + v, whichever process makes it.
                frames = generate_validation_video(pipe, self.prompt_embeds[p], self.negative_embeds, settings,
                                                   settings.seed + v, accelerator.device, parts.dtype,
                                                   None if self.images is None else self.images[p])
                export_to_video(list(frames), str(path), fps=settings.fps)
                logger.info("Process %d wrote %s", accelerator.process_index, path)
        self.vae.to("cpu")
