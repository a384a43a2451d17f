"""Resumable checkpoints: written whole or not at all, pruned oldest first, holding only the LoRA.

A checkpoint is accelerate's state (optimizer, lr scheduler, RNG) plus the LoRA in diffusers format,
so any checkpoint folder also loads in a stock pipeline. It is written as `.checkpoint-N.partial` and
renamed to `checkpoint-N` once complete: a kill at any moment leaves no folder that `latest` picks.
"""

import logging
import os
import re
import shutil
import signal
from pathlib import Path

from diffusers import CogVideoXPipeline

from .lora import LORA_WEIGHTS_NAME, load_lora_state_dict, save_lora

_NAME = re.compile(r"^checkpoint-(\d+)$")
logger = logging.getLogger(__name__)


class StopSignal:
    """Turns the first SIGTERM or SIGINT (preemption, Ctrl-C) into a request to checkpoint and stop.

    The training loop finishes its step, saves and exits; a second signal ends the process at once.
    """

    def __enter__(self):
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested:
            os._exit(128 + signum)
        self.requested = True
        logger.warning("%s: saving a checkpoint after this step, then stopping. Signal again to stop at once.",
                       signal.Signals(signum).name)


def complete_checkpoints(output_dir) -> list[Path]:
    """checkpoint-N folders, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=step_of)


def step_of(checkpoint: Path) -> int:
    return int(_NAME.match(Path(checkpoint).name).group(1))


def checkpoint_to_resume(output_dir, resume_from: str | None) -> Path | None:
    if not resume_from:
        return None
    if resume_from == "latest":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    return Path(resume_from)


def register_lora_hooks(accelerator, transformer, lora_config) -> None:
    """Makes accelerate save and load the adapter alone, not the multi-GB frozen transformer."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            save_lora(accelerator.unwrap_model(models[0]), output_dir, lora_config)
        weights.clear()  # accelerate would otherwise write the whole transformer too

    def load_hook(models, input_dir):
        model = models.pop()
        state_dict = CogVideoXPipeline.lora_state_dict(str(Path(input_dir) / LORA_WEIGHTS_NAME))
        prefix = "transformer."
        load_lora_state_dict(accelerator.unwrap_model(model),
                             {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)})

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, output_dir, step: int, total_limit: int | None) -> Path:
    """Every process must call this: each writes its own RNG state into the folder."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    partial = output_dir / f".checkpoint-{step}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)  # left by a run killed while saving
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        partial.rename(final)
        if total_limit is not None:
            older = [p for p in complete_checkpoints(output_dir) if step_of(p) < step]
            for old in older[: max(0, len(older) - (total_limit - 1))]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final
