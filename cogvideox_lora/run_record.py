"""What a run trains with, written into each checkpoint, so that a resume is checked against it before any model
loads.

A LoRA of one CogVideoX loads into another of the same width (T2V into I2V, 1.5 into 1.0: their attention has
the same shapes), and an optimizer state into a run of another batch, without an error: only this record
tells. The model, the frame sizes, the LoRA's rank and alpha and the global batch must be the same for the
resumed run to continue the checkpoint's; another process count is fine where the batch each step takes is
the same (the batches and each sample's noise depend on the global batch alone). Clips added or removed since
are said, as the resumed epochs then differ from the stopped run's.
"""

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors import safe_open

from .lora import LORA_WEIGHTS_NAME

RECORD_NAME = "training_run.json"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunRecord:
    model: str  # the family and the transformer's size, e.g. "CogVideoX1.5 I2V, 42 blocks of 3072"
    size: str  # frames x height x width, and the buckets where there are
    rank: int
    lora_alpha: float
    processes: int
    batch_size: int  # per process
    gradient_accumulation_steps: int
    clips: dict  # each clip's video (relative to the dataset's root) -> a digest of its prompt and image

    @property
    def micro_batch(self) -> int:
        """The samples of one forward pass over all processes: what the order of batches depends on."""
        return self.processes * self.batch_size

    @property
    def global_batch(self) -> str:
        return (f"{self.micro_batch * self.gradient_accumulation_steps} ({self.processes} process(es) x "
                f"--train_batch_size {self.batch_size} x --gradient_accumulation_steps "
                f"{self.gradient_accumulation_steps})")


def describe_model(family_name: str, transformer_config: dict) -> str:
    width = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
    return f"{family_name}, {transformer_config['num_layers']} blocks of {width}"


def describe_size(frames: int, height: int, width: int, buckets) -> str:
    """--max_num_frames x --height x --width, and the data.Buckets where there are."""
    if buckets is None:
        return f"{frames}x{height}x{width}"
    sizes = f"about {buckets.auto_area} pixels" if buckets.auto_area else \
        f"heights {_listed(buckets.heights)}, widths {_listed(buckets.widths)}"
    return f"{frames}x{height}x{width} with buckets of frames {_listed(buckets.frames)}, {sizes}"


def _listed(values) -> str:
    return ",".join(map(str, values))


def clip_digests(clips, root) -> dict:
    """Each clip's video (relative to the dataset root where it lies under it) -> a digest of its prompt and
    conditioning image, so that a changed caption shows as well as an added clip."""
    found = {}
    # Paths compared as strings, as Path.relative_to compares their parts: no Path objects made for every clip.
    under = os.path.join(Path(root), "") if root else None
    for clip in clips:
        video = str(clip.video)
        name = video[len(under):] if under and video.startswith(under) else video
        found[name] = hashlib.sha256(f"{clip.prompt}\0{clip.image or ''}".encode()).hexdigest()[:16]
    return found


def write(record: RunRecord, checkpoint) -> None:
    Path(checkpoint, RECORD_NAME).write_text(json.dumps(asdict(record), indent=1))


class Unreadable(Exception):
    """A checkpoint's record or LoRA file that is damaged."""


def read(checkpoint) -> RunRecord | None:
    """The checkpoint's record; None for one written before records were."""
    path = Path(checkpoint, RECORD_NAME)
    if not path.is_file():
        return None
    try:
        return RunRecord(**json.loads(path.read_text()))
    except (ValueError, TypeError) as e:  # not UTF-8, not JSON, or other fields
        raise Unreadable(f"{path} cannot be read ({type(e).__name__}: {e})") from e


def lora_shape(checkpoint) -> tuple[int, float] | None:
    """(rank, lora_alpha) from the metadata of the checkpoint's LoRA file, which older checkpoints have too."""
    path = Path(checkpoint, LORA_WEIGHTS_NAME)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            metadata = json.loads((f.metadata() or {}).get("lora_adapter_metadata") or "{}")
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise Unreadable(f"{path} cannot be read ({type(e).__name__}: {e})") from e
    if "transformer.r" not in metadata:
        return None
    return metadata["transformer.r"], metadata["transformer.lora_alpha"]


def resume_problems(checkpoint, current: RunRecord) -> list[str]:
    """Why `current` cannot continue the checkpoint, each with both values; logs what may differ (the process
    count where the batches are the same, the clips)."""
    try:
        return _compare(checkpoint, current)
    except Unreadable as e:
        return [f"{e}: the checkpoint is damaged. Resume from an earlier checkpoint-N of this run, or start again in "
                f"a new --output_dir."]


def _compare(checkpoint, current: RunRecord) -> list[str]:
    problems, name = [], Path(checkpoint).name
    shape = lora_shape(checkpoint)
    if shape is not None and shape != (current.rank, current.lora_alpha):
        problems.append(f"{checkpoint} holds a LoRA of --rank {shape[0]} --lora_alpha {shape[1]:g}, and this run "
                        f"has --rank {current.rank} --lora_alpha {current.lora_alpha:g}: resume with the "
                        f"checkpoint's, or start a new run in another --output_dir.")
    saved = read(checkpoint)
    if saved is None:
        logger.warning("%s records no model, size or batch (written by an older trainer): they are not checked.",
                       checkpoint)
        return problems
    for what, before, now in (("model", saved.model, current.model),
                              ("frame size (--max_num_frames x --height x --width)", saved.size, current.size)):
        if before != now:
            problems.append(f"{name} was trained on {what} {before}, and this run is {now}: resume with the "
                            f"checkpoint's, or start a new run in another --output_dir.")
    if (saved.micro_batch, saved.gradient_accumulation_steps) != (current.micro_batch,
                                                                   current.gradient_accumulation_steps):
        problems.append(f"{name} was trained with a global batch of {saved.global_batch}, and this run has "
                        f"{current.global_batch}: keep the checkpoint's processes x --train_batch_size and its "
                        f"--gradient_accumulation_steps, or start a new run in another --output_dir.")
    elif saved.processes != current.processes:
        logger.warning("%s was trained on %d process(es), this run has %d: the global batch is the same, %s, so "
                       "the run continues as it would have.", name, saved.processes, current.processes,
                       current.global_batch)
    _log_clip_changes(name, saved.clips, current.clips)
    return problems


def _log_clip_changes(name: str, before: dict, now: dict) -> None:
    added = [c for c in now if c not in before]
    removed = [c for c in before if c not in now]
    changed = [c for c in now if c in before and before[c] != now[c]]
    if not (added or removed or changed):
        return
    parts = [f"{len(found)} {what} ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''})"
             for what, found in (("added", added), ("removed", removed), ("with another prompt or image", changed))
             if found]
    logger.warning("The dataset changed since %s (%d clips then, %d now): %s. The resumed run trains on the clips "
                   "of now, so its epochs differ from those the stopped run would have had.", name, len(before),
                   len(now), "; ".join(parts))
