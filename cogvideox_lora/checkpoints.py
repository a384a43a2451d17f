"""Resumable checkpoints: written whole or not at all, pruned oldest first (the best by held-out loss kept),
holding only the LoRA.

A checkpoint is accelerate's state (optimizer, lr scheduler, RNG) plus the LoRA in diffusers format,
so any checkpoint folder also loads in a stock pipeline (and, by default, in core ComfyUI's format beside it);
beside them LOSSES_NAME holds the checkpoint's losses (its held-out loss and the curves up to its step), which a
resumed run reads back, and run_record's file what the run trains with, which a resume is checked against. It is
written as `.checkpoint-N.partial` and renamed to `checkpoint-N` once complete: a kill at any moment leaves no
folder that `latest` picks. Under DeepSpeed the engine writes its own model and optimizer state (pytorch_model/)
beside these.
"""

import json
import logging
import os
import re
import shutil
import signal
import time
from pathlib import Path

from accelerate.utils import DistributedType
from diffusers import CogVideoXPipeline

from . import disk, run_record
from .comfyui import COMFYUI_LORA_NAME
from .lora import LORA_WEIGHTS_NAME, load_lora_state_dict, save_lora

_NAME = re.compile(r"^checkpoint-(\d+)$")
LOSSES_NAME = "losses.json"  # a checkpoint's losses: its held-out loss and the curves up to its step
logger = logging.getLogger(__name__)


class Stopped(Exception):
    """A stop asked for before training: nothing is trained; what was checked and encoded is kept."""


class StopSignal:
    """Turns the first SIGTERM or SIGINT (preemption, Ctrl-C) into a request to stop.

    In training the loop finishes its step, saves a checkpoint and exits. Before it, check() raises Stopped
    at the next point where stopping loses nothing (between clips checked, between entries encoded), so a run
    stops within seconds with no model loaded. Signals arriving within TOGETHER seconds of the first are the
    same request: a terminal's Ctrl-C reaches the launcher and the trainer alike, and torch's elastic agent
    sends each worker SIGTERM again within milliseconds. A later signal, the user asking again, ends the
    process at once.
    """

    TOGETHER = 1.0

    def __enter__(self):
        self.requested, self.training, self._first = False, False, None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.requested:
            if now - self._first < self.TOGETHER:
                return
            os._exit(128 + signum)
        self.requested, self._first = True, now
        name = signal.Signals(signum).name
        if self.training:
            logger.warning("%s: saving a checkpoint after this step, then stopping. Signal again to stop at once.",
                           name)
        else:
            logger.warning("%s: stopping before training; what is checked and encoded so far is kept.", name)

    def check(self) -> None:
        """Raises Stopped if a stop was asked for before training."""
        if self.requested and not self.training:
            raise Stopped()


def complete_checkpoints(output_dir) -> list[Path]:
    """checkpoint-N folders, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=step_of)


def step_of(checkpoint: Path) -> int:
    return int(_NAME.match(Path(checkpoint).name).group(1))


class CheckpointError(Exception):
    """A checkpoint that cannot be resumed from, or a resume that would overwrite another run."""


def checkpoint_to_resume(output_dir, resume_from: str | None) -> Path | None:
    """The checkpoint to continue from (None: a new run), refusing whatever would overwrite an earlier run.

    An --output_dir holds one run: a new run, or one continued from elsewhere, may only start in a folder
    without checkpoints or LoRA, and a run continued from its own checkpoint-N only if none is newer.
    """
    output_dir = Path(output_dir)
    found = complete_checkpoints(output_dir)
    earlier = sorted(p.name for p in output_dir.glob("*")
                     if "checkpoint-" in p.name or p.name in (LORA_WEIGHTS_NAME, COMFYUI_LORA_NAME))
    if resume_from == "latest":
        checkpoint = found[-1] if found else None
        # With nothing to resume, what a run killed in its first checkpoint left is all it may replace.
        earlier = [name for name in earlier if not name.endswith(".partial")]
    else:
        checkpoint = Path(resume_from) if resume_from else None
    if checkpoint is None and earlier:
        raise CheckpointError(
            f"{output_dir} holds an earlier run ({', '.join(earlier)}), which this one would overwrite. "
            + ("Continue it with --resume_from_checkpoint latest, or choose another --output_dir." if not resume_from
               else "It has no checkpoint-N to continue from: choose another --output_dir."))
    if checkpoint is not None and checkpoint.parent.resolve() == output_dir.resolve():
        newer = [p.name for p in found if step_of(p) > step_of(checkpoint)]
        if newer:
            raise CheckpointError(
                f"{output_dir} holds checkpoints newer than {checkpoint.name} ({', '.join(newer)}), which this run "
                f"would overwrite. Resume from the newest with --resume_from_checkpoint latest, or continue "
                f"{checkpoint.name} in a new --output_dir.")
    elif checkpoint is not None and earlier:
        raise CheckpointError(
            f"{output_dir} holds another run ({', '.join(earlier)}), which continuing {checkpoint} there would "
            f"overwrite: choose an empty --output_dir.")
    return checkpoint


def load_checkpoint(accelerator, checkpoint: Path) -> int:
    """Restores the LoRA, optimizer, lr schedule and RNG of a checkpoint; returns its step.

    The LoRA is read with safetensors and accelerate reads the rest with torch.load(weights_only=True),
    so a checkpoint from elsewhere cannot run code; except under DeepSpeed, whose engine unpickles its own
    files in pytorch_model/.
    """
    try:
        # A DeepSpeed checkpoint's module state holds the adapter alone (see save_checkpoint).
        accelerator.load_state(str(checkpoint), **({"load_module_strict": False} if _deepspeed(accelerator) else {}))
    except Exception as e:  # torch, safetensors, peft and accelerate each fail their own way on a bad folder
        reason = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{checkpoint} cannot be resumed from ({type(e).__name__}: {reason}). It is damaged, "
                              f"or was written by another trainer or with other settings (--rank, model). Resume "
                              f"from an earlier checkpoint-N of this run, or start again in a new --output_dir.") from e
    return step_of(checkpoint)


def register_lora_hooks(accelerator, transformer, lora_config, trained_on=None, comfyui_copy: bool = True) -> None:
    """Makes accelerate save and load the adapter alone, not the multi-GB frozen transformer. trained_on: the
    lora.TrainedOn each checkpoint's LoRA records, so that cli_demo.py can use it as it uses the final one; each
    checkpoint also holds the LoRA in core ComfyUI's format unless comfyui_copy is off."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            save_lora(accelerator.unwrap_model(models[0]), output_dir, lora_config, trained_on, comfyui_copy)
        weights.clear()  # accelerate would otherwise write the whole transformer too

    def load_hook(models, input_dir):
        if not models:
            return  # DeepSpeed: the engine has already loaded the adapter with its optimizer state
        model = models.pop()
        state_dict = CogVideoXPipeline.lora_state_dict(str(Path(input_dir) / LORA_WEIGHTS_NAME))
        prefix = "transformer."
        load_lora_state_dict(accelerator.unwrap_model(model),
                             {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)})

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, output_dir, step: int, total_limit: int | None,
                    record: run_record.RunRecord | None = None, losses: dict | None = None,
                    keep: int | None = None, next_step: int | None = None) -> Path:
    """Every process must call this: each writes its own RNG state into the folder. record: what the run trains
    with, which a resume is checked against; losses: written into it as LOSSES_NAME; keep: the step of a
    checkpoint that pruning leaves (the best one).

    A full disk raises DiskFull (nothing is left under the checkpoint's name); with next_step, so does a disk
    without room for that checkpoint as large as this one, before the steps up to it are trained and lost.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    partial = output_dir / f".checkpoint-{step}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)  # left by a run killed while saving
    accelerator.wait_for_everyone()
    needed = checkpoint_size(output_dir)
    try:
        # torch's zip writer loses the errno of a full disk ('unexpected pos'): a failure with less free than
        # the last checkpoint took (or 1 MB before the first) is taken for one.
        with disk.writing(output_dir, final.name, needed, nearly_full=needed or 1_000_000):
            # The DeepSpeed engine would otherwise write the frozen transformer too (twice under ZeRO-2).
            accelerator.save_state(str(partial),
                                   **({"exclude_frozen_parameters": True} if _deepspeed(accelerator) else {}))
    except disk.DiskFull:
        shutil.rmtree(partial, ignore_errors=True)  # its space, for whatever the user saves next
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if record is not None:
            run_record.write(record, partial)
        if losses is not None:
            (partial / LOSSES_NAME).write_text(json.dumps(losses))
        partial.rename(final)
        if total_limit is not None:
            older = [p for p in complete_checkpoints(output_dir) if step_of(p) < step and step_of(p) != keep]
            for old in older[: max(0, len(older) - (total_limit - 1))]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    if next_step is not None:
        check_room(output_dir, next_step)
    return final


def read_losses(checkpoint: Path) -> dict | None:
    """The losses a checkpoint holds (LOSSES_NAME), or None (one written before they were kept, or damaged)."""
    try:
        return json.loads((Path(checkpoint) / LOSSES_NAME).read_text())
    except (OSError, ValueError):
        return None


class CheckpointClock:
    """Whether --checkpointing_minutes have passed since the last checkpoint (or the start); never without them."""

    def __init__(self, minutes: float | None):
        self.minutes = minutes
        self.restart()

    def restart(self) -> None:
        self.since = now()

    def due(self) -> bool:
        return self.minutes is not None and now() - self.since >= 60 * self.minutes


def now() -> float:
    return time.monotonic()
def checkpoint_size(output_dir) -> int | None:
    """The bytes of the newest checkpoint in output_dir (None before the first): what the next one will take."""
    found = complete_checkpoints(output_dir)
    return disk.folder_size(found[-1]) if found else None


def check_room(output_dir, step: int) -> None:
    """Raises DiskFull if checkpoint-{step} would not fit beside what output_dir holds (once one is known)."""
    needed = checkpoint_size(output_dir)
    free = disk.free_bytes(output_dir)
    if needed is not None and free is not None and free < needed:
        raise disk.DiskFull(output_dir, f"checkpoint-{step}", needed, ahead=True)


def _deepspeed(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED
