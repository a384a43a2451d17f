"""OUTPUT_DIR/README.md: the LoRA's model card, in the Hub's format, so the folder can be pushed as it is."""

import logging
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from . import disk
from .comfyui import COMFYUI_LORA_NAME
from .frame_counts import generated_at_most
from .hub import CARD_FILE
from .lora import LORA_WEIGHTS_NAME
from .settings import Settings

logger = logging.getLogger(__name__)

# Marks a card this trainer wrote, which a later run (a resume) may replace; any other README.md is the user's.
MARKER_TAG = "cogvideox-lora-trainer"


@dataclass(frozen=True)
class Results:
    """What the run measured, for the card: the base model's validation videos (one per validation video), the loss
    chart, the final, base and best held-out losses and the best checkpoint (None where not measured)."""

    base_videos: tuple[Path, ...] = ()
    loss_chart: Path | None = None
    heldout_loss: float | None = None
    base_heldout_loss: float | None = None
    best_checkpoint: str | None = None
    best_heldout_loss: float | None = None


def _relative(path: Path, output_dir: Path) -> str:
    return Path(path).relative_to(output_dir).as_posix()


def results_text(run: Settings, steps: int, videos: list[Path], results: Results) -> str:
    """The card's pictures and measures: the loss chart, the held-out losses, each validation video beside the base
    model's."""
    output_dir, parts = Path(run.output.output_dir), []
    if results.heldout_loss is not None:
        parts.append(f"""## Held-out loss

The denoising loss on clips the LoRA was not trained on, at fixed timesteps and noise (lower is better):

| model | held-out loss |
| --- | --- |
| base model (without the LoRA) | {results.base_heldout_loss:.6f} |
| this LoRA (step {steps}) | {results.heldout_loss:.6f} |
""" + (f"| best checkpoint: `{results.best_checkpoint}` | {results.best_heldout_loss:.6f} |\n"
       if results.best_checkpoint else ""))
    if results.loss_chart is not None:
        parts.append(f"![Training and held-out loss]({_relative(results.loss_chart, output_dir)})\n")
    if videos and len(results.base_videos) == len(videos):
        rows = [f"| {run.validation.prompts[i // run.validation.num_videos]} | "
                f"<video src=\"{_relative(base, output_dir)}\" controls loop></video> | "
                f"<video src=\"{_relative(video, output_dir)}\" controls loop></video> |"
                for i, (base, video) in enumerate(zip(results.base_videos, videos))]
        parts.append("## Validation videos\n\n| prompt | base model | with this LoRA |\n| --- | --- | --- |\n"
                     + "\n".join(rows) + "\n")
    return "\n".join(parts)


def card_text(run: Settings, family, steps: int, videos: list[Path], results: Results = Results(),
              processes: int = 1) -> str:
    """The card: YAML front matter the Hub reads (base model, tags, widget), how it was trained, what it measured,
    how to load it. processes: how many the run had, whose batches add up to the global batch."""
    i2v = family.image_to_video
    prompts = run.validation.prompts
    output_dir = Path(run.output.output_dir)
    # Validation video v of prompt p is the job p * num_validation_videos + v (validation.Validator.run).
    widget = [{"text": prompts[i // run.validation.num_videos],
               "output": {"url": video.relative_to(output_dir).as_posix()}}
              for i, video in enumerate(videos)]
    data = ModelCardData(
        base_model=run.model.path, library_name="diffusers",
        tags=["lora", "image-to-video" if i2v else "text-to-video", "diffusers", "cogvideox", MARKER_TAG],
        instance_prompt=run.data.id_token, widget=widget or None)
    pipeline = family.pipeline_class.__name__
    repo = run.output.repo_id() if run.output.push.enabled else str(output_dir)
    prompt = prompts[0] if prompts else f"{run.data.id_token + ' ' if run.data.id_token else ''}your prompt"
    base = run.model.path
    if not Path(base).exists():  # a hub id: link it
        base = f"[{base}](https://huggingface.co/{base})"
    image_arg = 'image=load_image("first_frame.png"), ' if i2v else ""
    code = "\n".join([
        "import torch",
        f"from diffusers import {pipeline}" + ("\nfrom diffusers.utils import load_image" if i2v else ""),
        *_pipeline_code(pipeline, run.model.path,
                        run.ignore_learned_positional_embeddings and family.learned_positions),
        f'pipe.load_lora_weights({repo!r}, adapter_name="lora")',
        # Trained at a count the pipelines do not make exactly (no validation asked for it): the nearest they do.
        f'video = pipe({image_arg}prompt={prompt!r}, num_frames={generated_at_most(run.frames.max_num_frames)}, '
        f'height={run.frames.height}, '
        f'width={run.frames.width}).frames[0]',
    ])
    global_batch = run.training.batch_size * processes * run.training.gradient_accumulation_steps
    return f"""---
{data.to_yaml()}
---

# CogVideoX LoRA for {run.model.path}

A LoRA for {base} ({family.name}, {'image' if i2v else 'text'}-to-video), trained with the CogVideoX LoRA trainer\
{f', with the identifier token `{run.data.id_token}` in front of every prompt' if run.data.id_token else ''}.

## Training

| setting | value |
| --- | --- |
| optimizer steps | {steps} |
| rank, lora_alpha | {run.lora.rank}, {run.lora.alpha:g} (updates scaled by {run.lora.alpha / run.lora.rank:g}) |
| resolution | {run.frames.width}x{run.frames.height} |
| frames | {run.frames.max_num_frames} at {run.frames.fps} fps |
| batch | {global_batch} a step: {run.training.batch_size} per process x {processes} process(es) x \
{run.training.gradient_accumulation_steps} accumulated |
| learning rate | {run.optimizer.learning_rate:g} ({run.optimizer.name}, {run.optimizer.scheduler}) |
| mixed precision | {run.mixed_precision or 'from the accelerate config'} |
| LoRA targets | {', '.join(run.lora.target_modules)} |

{results_text(run, steps, videos, results)}
## Use it

The file `{LORA_WEIGHTS_NAME}` carries its rank and alpha, so it loads at the strength it was trained at:

```python
{code}
```

`pipe.set_adapters(["lora"], [0.8])` weakens it, `pipe.fuse_lora()` merges it into the weights for speed.

{where_each_file_goes(run.output.comfyui_lora)}
"""


def where_each_file_goes(comfyui_written: bool) -> str:
    """The card's table of which file each tool loads, at strength 1.0 the trained strength in every one."""
    where = "into `ComfyUI/models/loras/`, then a **Load LoRA** node (`LoraLoaderModelOnly`) on the CogVideoX model"
    comfyui = (f"`{COMFYUI_LORA_NAME}` | {where}, `strength_model` 1.0" if comfyui_written else
               f"`{COMFYUI_LORA_NAME}`, not written here (`--no_comfyui_lora`) | make it with `python -m "
               f"cogvideox_lora.comfyui to-comfyui {LORA_WEIGHTS_NAME} {COMFYUI_LORA_NAME}`, then {where}")
    wrapper = "into `ComfyUI/models/CogVideo/loras/`, then the **CogVideo LoraSelect** node, strength 1.0"
    diffusers = "the code above, or `python cli_demo.py --lora_path ...`"
    return f"""## Which file goes where

| to generate with | file | how |
| --- | --- | --- |
| core ComfyUI (its built-in CogVideoX) | {comfyui} |
| kijai's ComfyUI-CogVideoXWrapper | `{LORA_WEIGHTS_NAME}` | {wrapper} |
| diffusers, the trainer's `cli_demo.py` | `{LORA_WEIGHTS_NAME}` or this folder | {diffusers} |

Both hold the same LoRA, at strength 1.0 the strength it was trained at. Core ComfyUI names the layers its own way \
and reads each layer's scale from the `.alpha` tensors of its file: it loads nothing of the diffusers file. diffusers \
and the wrapper read rank and alpha from the diffusers file's metadata."""


def _pipeline_code(pipeline: str, base: str, without_learned_positions: bool) -> list[str]:
    """The lines that load the base model as the LoRA was trained on it: a LoRA trained with
    --ignore_learned_positional_embeddings needs the transformer without them, as diffusers refuses other sizes
    than the table's."""
    if not without_learned_positions:
        return [f'pipe = {pipeline}.from_pretrained({base!r}, dtype=torch.bfloat16).to("cuda")']
    return ["from diffusers import CogVideoXTransformer3DModel",
            "# Trained with --ignore_learned_positional_embeddings: the transformer without its learned table.",
            f"transformer = CogVideoXTransformer3DModel.from_pretrained({base!r}, subfolder=\"transformer\", "
            f"use_learned_positional_embeddings=False, torch_dtype=torch.bfloat16)",
            f'pipe = {pipeline}.from_pretrained({base!r}, transformer=transformer, dtype=torch.bfloat16).to("cuda")']


def write_model_card(run: Settings, family, steps: int, videos: list[Path], results: Results = Results(),
                     processes: int = 1) -> Path | None:
    """Writes OUTPUT_DIR/README.md, unless a README.md there is not one of this trainer's."""
    path = Path(run.output.output_dir) / CARD_FILE
    if path.exists() and MARKER_TAG not in (ModelCard.load(path).data.tags or []):
        logger.warning("%s is not a model card of this trainer: left as it is, no card written.", path)
        return None
    card = ModelCard(card_text(run, family, steps, videos, results, processes))
    disk.replace_atomically(path, card.save, "the model card (README.md)")
    logger.info("Model card written to %s", path)
    return path
