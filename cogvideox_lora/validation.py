"""Validation videos during training: generated with the LoRA being trained, saved and logged."""

import io
import random
import re
from pathlib import Path

import numpy as np
import torch
from diffusers import CogVideoXDPMScheduler, CogVideoXPipeline
from diffusers.utils import export_to_video

from .data import open_image, resize_and_crop


def _slug(text: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length] or "prompt"


def load_validation_image(path, height: int, width: int) -> torch.Tensor:
    """[1, 3, height, width] in [0, 1], resized and centre-cropped as training clips are (the pipeline would
    stretch it)."""
    image = open_image(path)[None].float()
    return resize_and_crop(image, height, width, "center", random.Random(0)) / 255.0


@torch.no_grad()
def generate_validation_videos(transformer, vae, scheduler_config, prompt_embeds: list[torch.Tensor],
                               negative_embeds: torch.Tensor, args, device, dtype, pipeline_class=CogVideoXPipeline,
                               images: list[torch.Tensor] | None = None):
    """num_validation_videos [F, H, W, 3] float arrays per prompt, each prompt from the same seed every time.

    The prompts arrive as cached T5 embeddings, so the text encoder is never loaded for validation.
    pipeline_class is the model's stock pipeline; an image-to-video one takes images, one per prompt.
    """
    pipe = pipeline_class(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                          scheduler=CogVideoXDPMScheduler.from_config(scheduler_config, timestep_spacing="trailing"))
    pipe.set_progress_bar_config(disable=True)
    videos = []
    for p, embeds in enumerate(prompt_embeds):
        extra = {} if images is None else {"image": images[p].to(device, dtype)}
        generator = torch.Generator(device=device).manual_seed(args.seed if args.seed is not None else 0)
        frames = pipe(
            prompt_embeds=embeds[None].to(device, dtype),
            negative_prompt_embeds=negative_embeds[None].to(device, dtype),
            num_videos_per_prompt=args.num_validation_videos,
            num_frames=args.max_num_frames,
            height=args.height,
            width=args.width,
            guidance_scale=args.guidance_scale,
            use_dynamic_cfg=args.use_dynamic_cfg,
            num_inference_steps=args.validation_num_inference_steps,
            generator=generator,
            output_type="np",
            **extra,
        ).frames
        videos.append(list(frames))
    return videos


def save_videos(videos, prompts: list[str], directory, step: int, fps: int) -> list[tuple[str, Path]]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    saved = []
    for p, (prompt, per_prompt) in enumerate(zip(prompts, videos)):
        for v, frames in enumerate(per_prompt):
            path = directory / f"step-{step:06d}_p{p}_v{v}_{_slug(prompt)}.mp4"
            export_to_video(list(frames), str(path), fps=fps)
            saved.append((prompt, path))
    return saved


def _tensorboard_video(writer, tag: str, frames: np.ndarray, step: int, fps: int) -> None:
    # TensorBoard shows videos as animated GIFs in its image tab (what SummaryWriter.add_video does
    # through moviepy); Pillow writes the GIF without that extra dependency.
    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    images = [Image.fromarray(frame) for frame in (frames * 255).round().astype(np.uint8)]
    gif = io.BytesIO()
    images[0].save(gif, format="GIF", save_all=True, append_images=images[1:], duration=1000 / fps, loop=0)
    height, width = frames.shape[1:3]
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=gif.getvalue())
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


def log_videos(accelerator, videos, prompts: list[str], saved: list[tuple[str, Path]], step: int, fps: int) -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for p, per_prompt in enumerate(videos):
                for v, frames in enumerate(per_prompt):
                    _tensorboard_video(tracker.writer, f"validation/p{p}_v{v}", frames, step, fps)
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Video(str(path), caption=prompt, fps=fps) for prompt, path in saved]},
                        step=step)


class Validator:
    """Runs validation on the main process; the VAE is loaded at the first use and waits on the CPU between uses.

    image_paths: for an image-to-video pipeline_class, one image per prompt.
    """

    def __init__(self, args, prompts: list[str], prompt_embeds, negative_embeds, scheduler_config, load_vae, dtype,
                 pipeline_class=CogVideoXPipeline, image_paths: list[Path] | None = None):
        self.args, self.prompts, self.prompt_embeds, self.negative_embeds = args, prompts, prompt_embeds, negative_embeds
        self.scheduler_config, self.load_vae, self.dtype = scheduler_config, load_vae, dtype
        self.pipeline_class = pipeline_class
        self.images = None if image_paths is None else [load_validation_image(p, args.height, args.width)
                                                        for p in image_paths]
        self.vae = None

    def run(self, accelerator, transformer, step: int) -> list[Path]:
        saved = []
        if self.prompts and accelerator.is_main_process:
            self.vae = (self.vae or self.load_vae()).to(accelerator.device)
            # Compiled blocks would compile again for inference (no grad, a batch of two for guidance):
            # minutes for a few videos, so they run eagerly here.
            with torch.compiler.set_stance("force_eager"):
                videos = generate_validation_videos(accelerator.unwrap_model(transformer), self.vae, self.scheduler_config,
                                                    self.prompt_embeds, self.negative_embeds, self.args,
                                                    accelerator.device, self.dtype, self.pipeline_class, self.images)
            self.vae.to("cpu")
            saved = save_videos(videos, self.prompts, Path(self.args.output_dir) / "validation", step, self.args.fps)
            log_videos(accelerator, videos, self.prompts, saved, step, self.args.fps)
        accelerator.wait_for_everyone()
        return [path for _, path in saved]
