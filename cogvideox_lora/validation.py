"""Validation videos during training: generated with the LoRA being trained, saved and logged.

The (prompt, video) pairs are spread over the processes; each writes its videos into the shared
--output_dir, and the main process logs them all to the trackers once every process is done.
"""

import contextlib
import io
import logging
import random
import re
from pathlib import Path

import numpy as np
import torch
from diffusers import CogVideoXDPMScheduler, CogVideoXPipeline
from diffusers.utils import export_to_video

from .data import resize_and_crop
from .images import open_image
from .distributed import wait_for_everyone_without_deadline
from .memory import GIB, VAE_TILE, Peaks, decode_plan, untiled_scale
from .offload import frozen_tensors, on_host

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
def generate_validation_video(pipe, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor, args, seed: int,
                              device, dtype, image: torch.Tensor | None = None) -> np.ndarray:
    """One video, [F, H, W, 3] floats in [0, 1]; an image-to-video pipeline takes the image too."""
    return pipe(
        prompt_embeds=prompt_embeds[None].to(device, dtype),
        negative_prompt_embeds=negative_embeds[None].to(device, dtype),
        num_frames=args.max_num_frames,
        height=args.height,
        width=args.width,
        guidance_scale=args.guidance_scale,
        use_dynamic_cfg=args.use_dynamic_cfg,
        num_inference_steps=args.validation_num_inference_steps,
        generator=torch.Generator(device=device).manual_seed(seed),
        output_type="np",
        **({} if image is None else {"image": image.to(device, dtype)}),
    ).frames[0]


def _tensorboard_video(writer, tag: str, path: Path, step: int, fps: int) -> None:
    # TensorBoard shows videos as animated GIFs in its image tab (what SummaryWriter.add_video does
    # through moviepy); Pillow writes the GIF without that extra dependency. The frames are read back
    # from the file, as another process may have made it.
    import decord
    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    reader = decord.VideoReader(str(path), num_threads=1)
    frames = reader.get_batch(list(range(len(reader)))).asnumpy()
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


@contextlib.contextmanager
def optimizer_state_on_host(optimizer):
    """The optimizer's GPU state waits in CPU memory meanwhile: making videos does not need it, and its room keeps
    validation's peak under training's."""
    moved = [] if optimizer is None else [
        (state, key, value.device) for state in optimizer.state.values() for key, value in state.items()
        if isinstance(value, torch.Tensor) and value.device.type == "cuda"]
    for state, key, _ in moved:
        state[key] = state[key].to("cpu")
    try:
        yield
    finally:
        for state, key, device in moved:
            state[key] = state[key].to(device)


@contextlib.contextmanager
def one_sample_at_a_time(transformer):
    """The pipelines' classifier-free guidance runs the transformer on a batch of two (without the prompt and with
    it); one sample at a time gives the same video with half the activations at once, which are what raises an
    offloaded run's validation above its training (BENCHMARKS.md)."""
    batched = transformer.forward

    def forward(hidden_states, encoder_hidden_states, timestep, **kwargs):
        outputs = [batched(hidden_states=hidden_states[i:i + 1], encoder_hidden_states=encoder_hidden_states[i:i + 1],
                           timestep=timestep[i:i + 1], **kwargs)[0] for i in range(hidden_states.shape[0])]
        return (torch.cat(outputs),)

    own = "forward" in transformer.__dict__  # accelerate may have wrapped the method in autocast
    transformer.forward = forward
    try:
        yield
    finally:
        if own:
            transformer.forward = batched
        else:
            del transformer.forward


class Validator:
    """Validation in every process, each making its share of the videos.

    The VAE is loaded at the first use and waits on the CPU between uses. image_paths: for an
    image-to-video pipeline_class, one image per prompt. swap: the offload.BlockSwap training uses, whose blocks
    then load as the pipeline calls them; optimizer: one whose state may wait on the host while videos are made.
    peaks: the run's memory.Peaks, which validation and its decoding are measured into and whose training peak
    the decode keeps under (memory.decode_plan): the transformer's frozen weights wait on the host meanwhile, and
    the tiles shrink, where that is needed.
    """

    def __init__(self, args, prompts: list[str], prompt_embeds, negative_embeds, scheduler_config, load_vae, dtype,
                 pipeline_class=CogVideoXPipeline, image_paths: list[Path] | None = None, swap=None, optimizer=None,
                 peaks: Peaks | None = None):
        self.args, self.prompts = args, prompts
        self.prompt_embeds, self.negative_embeds = prompt_embeds, negative_embeds
        self.scheduler_config, self.load_vae, self.dtype = scheduler_config, load_vae, dtype
        self.pipeline_class = pipeline_class
        self.images = None if image_paths is None else [load_validation_image(p, args.height, args.width)
                                                        for p in image_paths]
        self.vae = None
        self.swap, self.optimizer = swap, optimizer
        self.peaks = peaks or Peaks()
        self.decoding = None  # the last decode plan, to say when it changes

    def run(self, accelerator, transformer, step: int) -> list[Path]:
        """Every process must call this; each returns the paths of all the videos of this step."""
        directory = Path(self.args.output_dir) / "validation"
        jobs = [(p, v) for p in range(len(self.prompts)) for v in range(self.args.num_validation_videos)]
        paths = [directory / f"step-{step:06d}_p{p}_v{v}_{_slug(self.prompts[p])}.mp4" for p, v in jobs]
        mine = range(accelerator.process_index, len(jobs), accelerator.num_processes)
        if mine:
            directory.mkdir(parents=True, exist_ok=True)
            with self.peaks.part("validation"), optimizer_state_on_host(self.optimizer):
                self._make_videos(accelerator, transformer, [(jobs[i], paths[i]) for i in mine])
        wait_for_everyone_without_deadline(accelerator, f"validation-{step}")
        if accelerator.is_main_process:
            log_videos(accelerator, [(f"validation/p{p}_v{v}", self.prompts[p], path)
                                     for (p, v), path in zip(jobs, paths)], step, self.args.fps)
        return paths

    def _make_videos(self, accelerator, transformer, jobs) -> None:
        self.vae = (self.vae or self.load_vae()).to(accelerator.device)
        pipe = validation_pipeline(accelerator.unwrap_model(transformer), self.vae, self.scheduler_config,
                                   self.pipeline_class)
        self._decode_with_room(pipe)
        swapping = contextlib.nullcontext() if self.swap is None else \
            self.swap.inference(pipe.transformer.transformer_blocks)
        # Compiled blocks would compile again for inference (no gradients, another batch size):
        # minutes for a few videos, so they run eagerly here.
        with torch.compiler.set_stance("force_eager"), swapping, one_sample_at_a_time(pipe.transformer):
            for (p, v), path in jobs:
                # Video v of a prompt starts from seed + v, whichever process makes it.
                frames = generate_validation_video(pipe, self.prompt_embeds[p], self.negative_embeds, self.args,
                                                   self.args.seed + v, accelerator.device, self.dtype,
                                                   None if self.images is None else self.images[p])
                export_to_video(list(frames), str(path), fps=self.args.fps)
                logger.info("Process %d wrote %s", accelerator.process_index, path)
        self.vae.to("cpu")

    def _decode_with_room(self, pipe) -> None:
        """The pipeline's decode, measured apart, kept under training's peak as memory.decode_plan says."""
        decode, transformer, vae = pipe.decode_latents, pipe.transformer, pipe.vae
        keep = [] if self.swap is None else [transformer.transformer_blocks[i] for i in self.swap.order]
        weights = frozen_tensors(transformer, keep)
        weights_gib = sum(t.nbytes for _, _, t in weights) / GIB

        def decode_latents(latents):
            with self.peaks.part("decoding"):
                room, scale = contextlib.nullcontext(), None  # as it is, where there is no GPU to make room on
                held = self._gpu_held_gib()
                if held is not None:
                    latent = (latents.shape[1], *latents.shape[3:])
                    configured = 1.0 if vae.use_tiling else untiled_scale(latent)
                    plan = decode_plan(held, held - weights_gib, latent,
                                       self.peaks.gib["training"][0], configured)
                    if plan.weights_on_host:
                        room = on_host(weights)
                        if plan != self.decoding:
                            logger.info("Validation videos decode with the transformer's frozen weights on the "
                                        "host%s, to stay under training's peak of %.1f GiB (about %.1f GiB).",
                                        f" and tiles of {plan.tile_scale:g} times the VAE's"
                                        if plan.tile_scale < 1 else "", self.peaks.gib["training"][0], plan.peak_gib)
                    if plan.tile_scale != configured:
                        scale = plan.tile_scale
                    self.decoding = plan
                with room, tiles(vae, scale):
                    return decode(latents)

        pipe.decode_latents = decode_latents

    @staticmethod
    def _gpu_held_gib() -> float | None:
        """What the GPU holds now, or None without one (no room to make)."""
        return torch.cuda.memory_allocated() / GIB if torch.cuda.is_available() else None


@contextlib.contextmanager
def tiles(vae, scale: float | None):
    """The VAE's decode tiled with tiles of `scale` times memory.VAE_TILE's sides (overlaps and blending scale
    with them), or as it is set if None."""
    if scale is None:
        yield
        return
    before = vae.use_tiling, vae.tile_sample_min_height, vae.tile_sample_min_width
    vae.enable_tiling(tile_sample_min_height=int(VAE_TILE[0] * scale), tile_sample_min_width=int(VAE_TILE[1] * scale))
    try:
        yield
    finally:
        vae.enable_tiling(tile_sample_min_height=before[1], tile_sample_min_width=before[2])
        vae.use_tiling = before[0]
