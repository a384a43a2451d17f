"""Reading a still image as viewers and diffusers' load_image show it, for training, validation and cli_demo.py alike.

Upright: a phone stores a photo sideways with an EXIF orientation tag, which viewers apply. In 8 bits a channel:
Pillow reads a 16-bit greyscale PNG or TIFF as integers up to 65535, and its own conversion to RGB clips them at
255, which turns a mid-grey image almost white.
"""

from pathlib import Path

import numpy as np
import torch


def read_image(path):
    """The image at path as an upright 8-bit RGB PIL image."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I"):  # "I;16", "I;16B"...; older Pillow opens 16-bit PNGs as "I"
        # 65535 / 257 = 255: the scaling that maps 16-bit white to 8-bit white.
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    return image.convert("RGB")


def open_image(path) -> torch.Tensor:
    """[3, H, W] uint8 of an image file, read as read_image reads it."""
    return torch.from_numpy(np.asarray(read_image(path)).copy()).permute(2, 0, 1)


def image_problem(path: Path) -> str | None:
    """Why the image at path cannot be used (a few words), or None: it is opened and decoded whole."""
    path = Path(path)
    if path.is_dir():
        return "it is a folder, not an image"
    if not path.is_file():
        return "it does not exist"
    try:
        read_image(path)
    except Exception as e:  # Pillow raises many error types for bad files
        return f"it cannot be read as an image ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return None
