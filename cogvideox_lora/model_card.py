"""OUTPUT_DIR/README.md: the LoRA's model card, in the Hub's format, so the folder can be pushed as it is."""

import logging
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

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


def card_text(run: Settings, family, steps: int, videos: list[Path], results: Results = Results()) -> str:
    """The card: YAML front matter the Hub reads (base model, tags, widget), how it was trained, what it measured,
    how to load it."""
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
        f'pipe = {pipeline}.from_pretrained({run.model.path!r}, '
        f'dtype=torch.bfloat16).to("cuda")',
        f'pipe.load_lora_weights({repo!r}, adapter_name="lora")',
        f'video = pipe({image_arg}prompt={prompt!r}, num_frames={run.frames.max_num_frames}, height={run.frames.height}, '
        f'width={run.frames.width}).frames[0]',
    ])
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
| batch | {run.training.batch_size} per process x {run.training.gradient_accumulation_steps} accumulated |
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
"""


def write_model_card(run: Settings, family, steps: int, videos: list[Path],
                     results: Results = Results()) -> Path | None:
    """Writes OUTPUT_DIR/README.md, unless a README.md there is not one of this trainer's."""
    path = Path(run.output.output_dir) / CARD_FILE
    if path.exists() and MARKER_TAG not in (ModelCard.load(path).data.tags or []):
        logger.warning("%s is not a model card of this trainer: left as it is, no card written.", path)
        return None
    ModelCard(card_text(run, family, steps, videos, results)).save(path)
    logger.info("Model card written to %s", path)
    return path
