"""Encode once: VAE latents of clips (and of their I2V images) and T5 embeddings of prompts, kept on disk
between runs.

Entries are named by a hash of everything that decides their content (the clip's bytes, the frame
settings, the encoder's identity and dtype), so a later run on the same clips and settings reuses
them whatever its --output_dir, and a changed clip or setting simply misses and is encoded again.
"""

import functools
import hashlib
import json
import logging
import math
import os
import random
import tempfile
from pathlib import Path

import safetensors.torch
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .data import Clip, ClipFrames, DatasetError, FrameSettings
from .distributed import wait_for_everyone_without_deadline

logger = logging.getLogger(__name__)


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def entry_key(kind: str, **identity) -> str:
    text = json.dumps({"kind": kind, **identity}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class LatentCache:
    """A folder of safetensors files, one per entry, each carrying a checksum of its tensors.

    Files are written under a temporary name and renamed, so a reader (another process, a later run
    after a kill) sees a whole file or none; a file that is damaged anyway fails its checksum and is
    treated as missing, so it is encoded again rather than trained on.
    """

    def __init__(self, root):
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self.path(key)
        if not path.exists():
            return None
        try:
            # One read of the whole file: opening it by name twice (header, then tensors) could mix two
            # versions that writers renamed into place in between.
            data = path.read_bytes()
            header_size = int.from_bytes(data[:8], "little")
            expected = json.loads(data[8:8 + header_size]).get("__metadata__", {}).get("sha256")
            tensors = safetensors.torch.load(data)
        except Exception as e:  # a truncated or overwritten file fails in many ways inside safetensors
            logger.warning(f"Latent cache file {path} is unreadable ({e}); it will be encoded again.")
            return None
        if expected != _checksum(tensors):
            logger.warning(f"Latent cache file {path} fails its checksum; it will be encoded again.")
            return None
        return tensors

    def save(self, key: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Writes the entry; returns its tensors as load() gives them (on the host, contiguous)."""
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{key}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"sha256": _checksum(tensors)})
            os.replace(tmp, self.path(key))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return tensors


def _fill(cache, keys, accelerator, encode_mine, name: str):
    """Loads every entry; this process encodes the missing ones of its share, then reads the others'.

    A process may have nothing to encode while another loads an encoder and works for minutes, so the
    wait between the two has no deadline.
    """
    entries = [cache.load(k) for k in keys]
    mine = [i for i, e in enumerate(entries)
            if e is None and i % accelerator.num_processes == accelerator.process_index]
    if mine:
        for i, tensors in encode_mine(mine):
            # The host's copy, as a run with the cache warm loads it: the encoder's output left on the GPU would
            # stay there through training (a cold 1.5-5B run peaked 0.09 GiB above a warm one, BENCHMARKS.md).
            entries[i] = cache.save(keys[i], tensors)
    wait_for_everyone_without_deadline(accelerator, f"encoded-{name}")
    for i, e in enumerate(entries):
        if e is None:
            entries[i] = cache.load(keys[i])
            if entries[i] is None:
                raise RuntimeError(f"Latent cache entry {cache.path(keys[i])} was not written by the process that "
                                   f"encodes it; is --latent_cache_dir on a disk that all processes share?")
    return entries, len(mine)


# The I2V image is noised in pixel space before encoding, as CogVideoX I2V was trained: the noise's standard
# deviation is exp(N(mean, std)) of these, drawn once per clip (as the clip is encoded once).
IMAGE_NOISE = {"log_sigma_mean": -3.0, "log_sigma_std": 0.5}


@torch.no_grad()
def encode_videos(accelerator, cache: LatentCache, clips: list[Clip], settings: list[FrameSettings],
                  encoder_id: dict, with_flipped: bool, with_images: bool, load_vae, num_workers: int = 0):
    """Latent distribution parameters [2C, F, H, W] of each clip (and of its mirror image if with_flipped),
    with the same of its I2V image ([2C, 1, H, W], "image_latent_params…") if with_images; settings are per clip.

    Returns (entries, clips and images this process encoded). load_vae is only called if something is missing.
    """
    load_vae = functools.cache(load_vae)
    keys = [entry_key("video", clip=file_digest(c.video), frames=s, encoder=encoder_id, flipped=with_flipped)
            for c, s in zip(clips, settings)]
    # A per-clip seed keeps the random crop the same for a clip however the work is shared out, and the
    # image's crop the clip's.
    crop_seeds = [int(k[:8], 16) for k in keys]

    def encoder(images: bool, prefix: str, desc: str):
        def encode_mine(indices):
            vae = load_vae()
            loader = torch.utils.data.DataLoader(
                ClipFrames([clips[i] for i in indices], [settings[i] for i in indices],
                           [crop_seeds[i] for i in indices], images=images),
                batch_size=None, num_workers=num_workers)
            for j, frames in tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process):
                if isinstance(frames, str):  # the clip changed or went bad since the check
                    raise DatasetError([f"{frames} The clips encoded before it are whole in the cache, and nothing "
                                        f"of this one was written: run again once it is fixed."])
                video = frames.to(accelerator.device, vae.dtype).permute(1, 0, 2, 3).unsqueeze(0)  # [1, 3, F, H, W]
                if images:
                    video = add_pixel_noise(video, keys[indices[j]])
                tensors = {f"{prefix}latent_params": vae.encode(video).latent_dist.parameters[0]}
                if with_flipped:
                    tensors[f"{prefix}latent_params_flipped"] = vae.encode(video.flip(-1)).latent_dist.parameters[0]
                yield indices[j], tensors

        return encode_mine

    entries, encoded = _fill(cache, keys, accelerator, encoder(False, "", "Encoding clips"), "videos")
    if not with_images:
        return entries, encoded, 0
    image_keys = [entry_key("image", video_key=k, image=c.image and file_digest(c.image), noise=IMAGE_NOISE)
                  for k, c in zip(keys, clips)]
    images, encoded_images = _fill(cache, image_keys, accelerator, encoder(True, "image_", "Encoding images"),
                                   "images")
    return [{**e, **i} for e, i in zip(entries, images)], encoded, encoded_images


def add_pixel_noise(image: torch.Tensor, key: str) -> torch.Tensor:
    """The image with Gaussian noise of a drawn strength, both drawn from the clip's key (the same every run)."""
    rng = random.Random(key)
    sigma = math.exp(rng.gauss(IMAGE_NOISE["log_sigma_mean"], IMAGE_NOISE["log_sigma_std"]))
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(rng.getrandbits(63)))
    return image + sigma * noise.to(image.device, image.dtype)


@torch.no_grad()
def encode_prompts(accelerator, cache: LatentCache, prompts: list[str], max_sequence_length: int, encoder_id: dict,
                   load_text_encoder):
    """T5 embeddings [max_sequence_length, D] of each prompt, padded as the pipeline pads them."""
    keys = [entry_key("prompt", prompt=p, length=max_sequence_length, encoder=encoder_id) for p in prompts]

    def encode_mine(indices):
        tokenizer, text_encoder = load_text_encoder()
        for i in tqdm(indices, desc="Encoding prompts", disable=not accelerator.is_local_main_process):
            ids = tokenizer(prompts[i], padding="max_length", max_length=max_sequence_length, truncation=True,
                            add_special_tokens=True, return_tensors="pt").input_ids
            yield i, {"prompt_embeds": text_encoder(ids.to(text_encoder.device))[0][0]}

    return _fill(cache, keys, accelerator, encode_mine, "prompts")
