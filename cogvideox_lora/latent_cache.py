"""Encode once: VAE latents of clips (and of their I2V images) and T5 embeddings of prompts, kept on disk
between runs, and read from there when their batch comes.

Entries are named by a hash of everything that decides their content (the clip's bytes, the frame
settings, the encoder's identity and dtype), so a later run on the same clips and settings reuses
them whatever its --output_dir, and a changed clip or setting simply misses and is encoded again.
Runs sharing the folder share the encoding: an entry is encoded under a claim (a lock that dies with its
process), so what one run is encoding another waits for, and what a killed run left it takes over.
"""

import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import random
from pathlib import Path

import safetensors.torch
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import disk
from .clip_index import file_digest, identity
from .data import Clip, ClipFrames, DatasetError, FrameSettings
from .distributed import wait_for_everyone_without_deadline

logger = logging.getLogger(__name__)

VERIFIED_FILE = "verified.json"
# Entries encoded between two looks for other runs' claims: a DataLoader is started for each such batch.
CLAIM_BATCH = 32


def entry_keys(kind: str, items: list[dict], **shared) -> list[str]:
    """The key of each item: sha256 of json.dumps({"kind": kind, **shared, **item}, sort_keys=True, default=str).

    The text is put together from each member's own JSON (what json.dumps writes between a dict's braces), so that
    what all items share (the encoder's config, a few kB) is serialised once, not once per clip.
    """
    encode = json.JSONEncoder(sort_keys=True, default=str).encode  # json.dumps makes one at each call
    members = {name: f"{encode(name)}: {encode(value)}" for name, value in {"kind": kind, **shared}.items()}
    keys = []
    for item in items:
        own = {**members, **{name: f"{encode(name)}: {encode(value)}" for name, value in item.items()}}
        text = "{" + ", ".join(own[name] for name in sorted(own)) + "}"
        keys.append(hashlib.sha256(text.encode()).hexdigest())
    return keys


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
    treated as missing, so it is encoded again rather than trained on. Which files passed their checksum is
    kept (verified.json, by size, modification time and inode), so a warm start reads no entry whole.
    """

    def __init__(self, root):
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._verified = json.loads((self.root / VERIFIED_FILE).read_text())
        except (OSError, ValueError):
            self._verified = {}
        self._verified_changed = False

    def path(self, key: str) -> Path:
        return Path(self._file(key))

    def _file(self, key: str) -> str:
        # A string: is_whole stats every entry of a warm start, and a Path object each cost more than the stat.
        return f"{self.root}/{key}.safetensors"

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

    def is_whole(self, key: str) -> bool:
        """Whether the entry is there and passes its checksum: read whole only if the file changed since it last
        passed."""
        try:
            found = identity(os.stat(self._file(key)))
        except OSError:
            return False
        if self._verified.get(key) == found:
            return True
        if self.load(key) is None:
            return False
        self._verify(key)
        return True

    def _verify(self, key: str) -> None:
        self._verified[key] = identity(os.stat(self._file(key)))
        self._verified_changed = True

    def save_verified(self) -> None:
        if self._verified_changed:
            disk.write_text(self.root / VERIFIED_FILE, json.dumps(self._verified), "the latent cache's index")
            self._verified_changed = False

    def shapes(self, key: str) -> dict[str, tuple]:
        """The entry's tensor shapes, from its header alone (safetensors: 8 bytes of length, then JSON)."""
        with open(self.path(key), "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        return {name: tuple(info["shape"]) for name, info in header.items() if name != "__metadata__"}

    def save(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        disk.replace_atomically(self.path(key), lambda tmp: save_file(tensors, tmp,
                                                                      metadata={"sha256": _checksum(tensors)}),
                                "a latent cache entry", size)
        self._verify(key)

    def claim(self, key: str, wait: bool) -> int | None:
        """A claim on the entry (a file descriptor to close when done), waiting for it if wait; None if another
        process holds it. The lock is released on closing, and by the system if the process dies, so a killed
        run's claims are free to take."""
        folder = self.root / "claims"
        folder.mkdir(exist_ok=True)
        fd = os.open(folder / key, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        return fd


class Entries:
    """The cache entries of some items, read from disk each time one is asked for, so that host memory holds
    keys and not tensors (4.5 MB a clip for 2B at 49x480x720). An item may have several entries (a clip and
    its I2V image): their tensors are merged. names: the items' names, to ask for an item by name."""

    def __init__(self, cache: LatentCache, keys: list[tuple[str, ...]], names: list | None = None):
        self.cache, self.keys = cache, keys
        self._index = {name: i for i, name in enumerate(names)} if names is not None else None

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, item) -> "dict[str, torch.Tensor] | Entries":
        if isinstance(item, slice):
            return Entries(self.cache, self.keys[item])
        i = self._index[item] if self._index is not None else item
        merged = {}
        for key in self.keys[i]:
            tensors = self.cache.load(key)
            if tensors is None:
                raise DatasetError([f"Latent cache entry {self.cache.path(key)} went missing or was damaged during "
                                    f"the run: run the same command again with --resume_from_checkpoint latest; "
                                    f"it is encoded again."])
            merged.update(tensors)
        return merged

    def shape(self, i: int, name: str = "latent_params") -> tuple:
        return self.cache.shapes(self.keys[i][0])[name]

    def shapes_by(self, groups: list) -> list[tuple]:
        """Each entry's shape, where the entries of one group (the clips of one frame setting) share theirs: one
        header is read a group, not one a clip (20,000 files opened were a tenth of a warm start)."""
        first = {}
        for i, group in enumerate(groups):
            first.setdefault(group, i)
        shape = {group: self.shape(i) for group, i in first.items()}
        return [shape[group] for group in groups]

    def joined(self, other: "Entries") -> "Entries":
        return Entries(self.cache, [a + b for a, b in zip(self.keys, other.keys)])


def _encode_claimed(cache, keys, indices, encode_mine, stop) -> int:
    """Encodes the entries at indices that are not whole, each under its claim; returns how many it encoded.

    What another run holds is left for later; once nothing else can be claimed, this waits for a held claim,
    then encodes the entry only if its holder died without writing it.
    """
    encoded, waiting, wait = 0, list(indices), False
    while waiting:
        held, left = {}, []
        try:
            for i in waiting:
                fd = cache.claim(keys[i], wait) if len(held) < CLAIM_BATCH else None
                if fd is None:
                    left.append(i)
                elif cache.is_whole(keys[i]):  # written meanwhile by the claim's holder
                    os.close(fd)
                else:
                    held[i], wait = fd, False
            claimed = bool(held)
            for i, tensors in (encode_mine(list(held)) if held else ()):
                cache.save(keys[i], tensors)
                os.close(held.pop(i))
                encoded += 1
                if stop is not None:
                    stop()
        finally:
            for fd in held.values():
                os.close(fd)
        wait, waiting = not claimed, left
    return encoded


def fill(cache, keys, accelerator, encode_mine, name: str, stop=None, mine_known=None) -> tuple[Entries, int]:
    """Every entry made whole in the cache; this process encodes the missing ones of its share, then checks the
    others'. Returns the entries (read when asked for) and how many this process encoded. mine_known(indices) is
    told this process's share before anything is encoded.

    A process may have nothing to encode while another loads an encoder and works for minutes, so the
    wait between the two has no deadline.
    """
    missing = [i for i, k in enumerate(keys) if not cache.is_whole(k)]
    mine = [i for i in missing if i % accelerator.num_processes == accelerator.process_index]
    if mine_known is not None:
        mine_known(mine)
    try:
        encoded = _encode_claimed(cache, keys, mine, encode_mine, stop)
    finally:
        cache.save_verified()
    wait_for_everyone_without_deadline(accelerator, f"encoded-{name}")
    for i in missing:
        if not cache.is_whole(keys[i]):
            raise RuntimeError(f"Latent cache entry {cache.path(keys[i])} was not written by the process that "
                               f"encodes it; is --latent_cache_dir on a disk that all processes share?")
    cache.save_verified()
    return Entries(cache, [(k,) for k in keys]), encoded


# The I2V image is noised in pixel space before encoding, as CogVideoX I2V was trained: the noise's standard
# deviation is exp(N(mean, std)) of these, drawn once per clip (as the clip is encoded once).
IMAGE_NOISE = {"log_sigma_mean": -3.0, "log_sigma_std": 0.5}


@torch.no_grad()
def encode_videos(accelerator, cache: LatentCache, clips: list[Clip], settings: list[FrameSettings],
                  encoder_id: dict, with_flipped: bool, with_images: bool, load_vae, num_workers: int = 0,
                  digest=file_digest, stop=None, decoded=None):
    """Latent distribution parameters [2C, F, H, W] of each clip (and of its mirror image if with_flipped),
    with the same of its I2V image ([2C, 1, H, W], "image_latent_params…") if with_images; settings are per clip.

    Returns (Entries, read from the cache when asked for; clips and images this process encoded). load_vae is
    only called if something is missing. digest(path): a file's content hash (a ClipIndex's, which hashes only
    what changed); stop(): raises to stop the run between two entries. decoded (a DecodedFrames): the frames the
    check kept, taken instead of decoding a clip again; emptied once the clips are encoded.
    """
    load_vae = functools.cache(load_vae)
    keys = entry_keys("video", [{"clip": digest(c.video), "frames": s} for c, s in zip(clips, settings)],
                      encoder=encoder_id, flipped=with_flipped)
    # A per-clip seed keeps the random crop the same for a clip however the work is shared out, and the
    # image's crop the clip's.
    crop_seeds = [int(k[:8], 16) for k in keys]

    def encoder(images: bool, prefix: str, desc: str):
        def encode_mine(indices):
            vae = load_vae()
            # Taken out of the store here, in this process, so that a loader worker reading them does not leave
            # the store's copies behind; they go with the loader, a claim batch at most.
            taken = {j: decoded.take(clips[i].video) for j, i in enumerate(indices)} \
                if decoded is not None and not images else {}
            loader = torch.utils.data.DataLoader(
                ClipFrames([clips[i] for i in indices], [settings[i] for i in indices],
                           [crop_seeds[i] for i in indices], images=images,
                           decoded={j: d for j, d in taken.items() if d is not None}),
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

    # What the cache holds and what other processes encode is dropped from the store before the VAE loads.
    keep_mine = None if decoded is None else lambda mine: decoded.keep_only([clips[i].video for i in mine])
    try:
        entries, encoded = fill(cache, keys, accelerator, encoder(False, "", "Encoding clips"), "videos", stop,
                                keep_mine)
    finally:
        if decoded is not None:  # what is left (written by another run meanwhile) is not needed any more
            decoded.clear()
    if not with_images:
        return entries, encoded, 0
    image_keys = entry_keys("image", [{"video_key": k, "image": c.image and digest(c.image)}
                                      for k, c in zip(keys, clips)], noise=IMAGE_NOISE)
    images, encoded_images = fill(cache, image_keys, accelerator, encoder(True, "image_", "Encoding images"),
                                   "images", stop)
    return entries.joined(images), encoded, encoded_images


def add_pixel_noise(image: torch.Tensor, key: str) -> torch.Tensor:
    """The image with Gaussian noise of a drawn strength, both drawn from the clip's key (the same every run)."""
    rng = random.Random(key)
    sigma = math.exp(rng.gauss(IMAGE_NOISE["log_sigma_mean"], IMAGE_NOISE["log_sigma_std"]))
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(rng.getrandbits(63)))
    return image + sigma * noise.to(image.device, image.dtype)


@torch.no_grad()
def encode_prompts(accelerator, cache: LatentCache, prompts: list[str], max_sequence_length: int, encoder_id: dict,
                   load_text_encoder, stop=None):
    """T5 embeddings [max_sequence_length, D] of each prompt, padded as the pipeline pads them."""
    keys = entry_keys("prompt", [{"prompt": p} for p in prompts], length=max_sequence_length, encoder=encoder_id)

    def encode_mine(indices):
        tokenizer, text_encoder = load_text_encoder()
        for i in tqdm(indices, desc="Encoding prompts", disable=not accelerator.is_local_main_process):
            ids = tokenizer(prompts[i], padding="max_length", max_length=max_sequence_length, truncation=True,
                            add_special_tokens=True, return_tensors="pt").input_ids
            yield i, {"prompt_embeds": text_encoder(ids.to(text_encoder.device))[0][0]}

    entries, encoded = fill(cache, keys, accelerator, encode_mine, "prompts", stop)
    return Entries(cache, entries.keys, names=prompts), encoded
