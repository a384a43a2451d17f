"""OUTPUT_DIR/README.md: the LoRA's model card, in the Hub's format, so the folder can be pushed as it is."""

import logging
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from . import disk
from .args import validation_prompts
from .hub import CARD_FILE, repo_id
from .lora import LORA_WEIGHTS_NAME

logger = logging.getLogger(__name__)

# Marks a card this trainer wrote, which a later run (a resume) may replace; any other README.md is the user's.
MARKER_TAG = "cogvideox-lora-trainer"


def card_text(args, family, steps: int, videos: list[Path]) -> str:
    """The card: YAML front matter the Hub reads (base model, tags, widget), how it was trained, how to load it."""
    i2v = family.image_to_video
    prompts = validation_prompts(args)
    output_dir = Path(args.output_dir)
    # Validation video v of prompt p is the job p * num_validation_videos + v (validation.Validator.run).
    widget = [{"text": prompts[i // args.num_validation_videos],
               "output": {"url": video.relative_to(output_dir).as_posix()}}
              for i, video in enumerate(videos)]
    data = ModelCardData(
        base_model=args.pretrained_model_name_or_path, library_name="diffusers",
        tags=["lora", "image-to-video" if i2v else "text-to-video", "diffusers", "cogvideox", MARKER_TAG],
        instance_prompt=args.id_token, widget=widget or None)
    pipeline = family.pipeline_class.__name__
    repo = repo_id(args) if args.push_to_hub else str(output_dir)
    prompt = prompts[0] if prompts else f"{args.id_token + ' ' if args.id_token else ''}your prompt"
    base = args.pretrained_model_name_or_path
    if not Path(base).exists():  # a hub id: link it
        base = f"[{base}](https://huggingface.co/{base})"
    image_arg = 'image=load_image("first_frame.png"), ' if i2v else ""
    code = "\n".join([
        "import torch",
        f"from diffusers import {pipeline}" + ("\nfrom diffusers.utils import load_image" if i2v else ""),
        f'pipe = {pipeline}.from_pretrained({args.pretrained_model_name_or_path!r}, '
        f'dtype=torch.bfloat16).to("cuda")',
        f'pipe.load_lora_weights({repo!r}, adapter_name="lora")',
        f'video = pipe({image_arg}prompt={prompt!r}, num_frames={args.max_num_frames}, height={args.height}, '
        f'width={args.width}).frames[0]',
    ])
    return f"""---
{data.to_yaml()}
---

# CogVideoX LoRA for {args.pretrained_model_name_or_path}

A LoRA for {base} ({family.name}, {'image' if i2v else 'text'}-to-video), trained with the CogVideoX LoRA trainer\
{f', with the identifier token `{args.id_token}` in front of every prompt' if args.id_token else ''}.

## Training

| setting | value |
| --- | --- |
| optimizer steps | {steps} |
| rank, lora_alpha | {args.rank}, {args.lora_alpha:g} (updates scaled by {args.lora_alpha / args.rank:g}) |
| resolution | {args.width}x{args.height} |
| frames | {args.max_num_frames} at {args.fps} fps |
| batch | {args.train_batch_size} per process x {args.gradient_accumulation_steps} accumulated |
| learning rate | {args.learning_rate:g} ({args.optimizer}, {args.lr_scheduler}) |
| mixed precision | {args.mixed_precision or 'from the accelerate config'} |

## Use it

The file `{LORA_WEIGHTS_NAME}` carries its rank and alpha, so it loads at the strength it was trained at:

```python
{code}
```

`pipe.set_adapters(["lora"], [0.8])` weakens it, `pipe.fuse_lora()` merges it into the weights for speed.
"""


def write_model_card(args, family, steps: int, videos: list[Path]) -> Path | None:
    """Writes OUTPUT_DIR/README.md, unless a README.md there is not one of this trainer's."""
    path = Path(args.output_dir) / CARD_FILE
    if path.exists() and MARKER_TAG not in (ModelCard.load(path).data.tags or []):
        logger.warning("%s is not a model card of this trainer: left as it is, no card written.", path)
        return None
    card = ModelCard(card_text(args, family, steps, videos))
    disk.replace_atomically(path, card.save, "the model card (README.md)")
    logger.info("Model card written to %s", path)
    return path
