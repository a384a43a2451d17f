"""Compiled kernels kept between runs, under the user's cache folder: torch.compile's and FlashAttention-4's.

The first step of a run compiles each block's graph (Inductor and Triton) and FlashAttention-4's kernels (its
CuTe DSL JIT): tens of seconds that every short experiment pays again. Both can be found on disk by the next run
of the same setting, but Inductor keeps them under /tmp by default (gone at a reboot or a container's end) and
FlashAttention-4 keeps none. As the field's tools do, they go under ~/.cache (XDG_CACHE_HOME), unless the user
has pointed them elsewhere through the libraries' own variables.
"""

import os
from pathlib import Path

VARIABLES = {"TORCHINDUCTOR_CACHE_DIR": "torchinductor", "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR": "flash_attention_cute"}


def folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "cogvideox_lora" / "kernels"


def keep_on_disk() -> None:
    """Points the kernel caches into folder(); before anything compiles (both libraries read these lazily)."""
    for variable, name in VARIABLES.items():
        os.environ.setdefault(variable, str(folder() / name))
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")


def describe(compiled_blocks: bool, flash4: bool) -> str | None:
    """The plan's line on kernel compilation: when it happens and whether earlier runs' kernels are there."""
    compiled = [what for what, used in (("the blocks (torch.compile)", compiled_blocks),
                                        ("FlashAttention-4", flash4)) if used]
    if not compiled:
        return None
    folders = [Path(os.environ[v]) for v in VARIABLES if os.environ.get(v)]
    places = sorted({str(folder.parent) for folder in folders})
    found = any(folder.is_dir() and any(folder.iterdir()) for folder in folders)
    return (f"Kernels of {' and '.join(compiled)} compile in the first step, kept in {', '.join(places)}: "
            + ("kernels of earlier runs are there and those of the same setting are reused (seconds)."
               if found else "none there yet, so this first step compiles them all (about half a minute)."))
