"""The frame counts a CogVideoX model trains on and the ones it generates: one rule for the trainer's checks,
its validation videos and cli_demo.py.

The VAE compresses time 4x and keeps the first frame alone, so 4k+1 frames are k+1 latent frames: those counts
train. Generating, the VAE decodes the latent frames two at a time, and only an odd count gives a first group that
keeps a lone first frame; an even count decodes to 4 frames per latent frame (13 frames asked for come out 16, and
10 frames, 3 latent frames, come out 9). So the pipelines make exactly the counts of an odd number of latent frames:
8k+1 (9, 17, 25, 49, 81). 1.5's pipeline pads its latents to a multiple of patch_size_t and drops the padding before
decoding: the same counts.
"""


def latent_frames(frames: int, temporal_compression: int = 4) -> int:
    """What the pipelines and the trainer make of `frames` video frames."""
    return (frames - 1) // temporal_compression + 1


def generated_frames(frames: int, temporal_compression: int = 4) -> int:
    """How many frames a pipeline asked for `frames` returns (CogVideoX's VAE decode)."""
    latent = latent_frames(frames, temporal_compression)
    return temporal_compression * (latent - 1) + 1 if latent % 2 else temporal_compression * latent


def _around(frames: int, step: int) -> str:
    lower = max(1, (frames - 1) // step * step + 1)
    return f"{lower} or {lower + step}"


def training_problem(flag: str, frames: int, temporal_compression: int = 4) -> str | None:
    if frames >= 1 and (frames - 1) % temporal_compression == 0:
        return None
    return f"{flag} {frames} is not {temporal_compression}k+1: use {_around(frames, temporal_compression)}."


def generated_at_most(frames: int, temporal_compression: int = 4) -> int:
    """The most frames, up to `frames`, that the pipelines generate exactly (8k+1)."""
    step = 2 * temporal_compression
    return max(1, (frames - 1) // step * step + 1)


def generation_problem(flag: str, frames: int, temporal_compression: int = 4) -> str | None:
    """None where the pipelines generate exactly `frames` frames; else what they would make and what to use."""
    step = 2 * temporal_compression
    if frames >= 1 and (frames - 1) % step == 0:
        return None
    made = f" ({frames} would come out {generated_frames(frames, temporal_compression)})" if frames >= 1 else ""
    return (f"{flag} {frames}: CogVideoX generates {step}k+1 frames{made}, an odd number of latent frames: "
            f"use {_around(frames, step)}.")
