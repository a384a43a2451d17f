"""Running the trainer from tests: through its command line in a subprocess or in this process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_cogvideox_lora.py"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Tiny sizes every training test uses: 9 frames of 48x64 give 3x6x8 latents on the tiny models.
TINY_FLAGS = ["--height", "48", "--width", "64", "--max_num_frames", "9", "--rank", "4", "--lora_alpha", "4",
              "--validation_num_inference_steps", "2", "--seed", "7"]


def train_argv(model_dir, data_dir, output_dir, cache_dir, *extra, report_to="none") -> list[str]:
    return ["--pretrained_model_name_or_path", str(model_dir), "--instance_data_root", str(data_dir),
            "--output_dir", str(output_dir), "--latent_cache_dir", str(cache_dir), "--report_to", report_to,
            *TINY_FLAGS, *map(str, extra)]


def subprocess_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def run_script(argv, launcher: bool = False, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    """`python train_cogvideox_lora.py ARGS`, or the same through `accelerate launch`; env: variables to add."""
    if launcher:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT), *argv]
    else:
        command = [sys.executable, str(SCRIPT), *argv]
    return subprocess.run(command, cwd=REPO, env={**subprocess_env(), **env}, capture_output=True, text=True,
                          timeout=timeout)


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout[-4000:]}\n" \
                                   f"stderr:\n{result.stderr[-8000:]}"
    return result


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_main(argv) -> None:
    """train_cogvideox_lora.main(argv) in this process (no import cost); accelerate's singletons are reset
    afterwards so that the next run may choose another precision. A refusal raises SystemExit."""
    import train_cogvideox_lora

    _reset_accelerate()
    try:
        train_cogvideox_lora.main([str(a) for a in argv])
    finally:
        _reset_accelerate()


def summary(output_dir) -> dict:
    return json.loads((Path(output_dir) / "train_summary.json").read_text())


def lora(path) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file, or of the pytorch_lora_weights.safetensors in a folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "pytorch_lora_weights.safetensors"
    return load_file(str(path))


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def tree_state(root) -> dict:
    """Every path under root with its size, modification time and bytes, to show that nothing changed."""
    root = Path(root)
    state = {}
    for path in sorted(root.rglob("*")):
        st = path.stat()
        state[str(path.relative_to(root))] = (path.is_dir(), st.st_size, st.st_mtime_ns,
                                              None if path.is_dir() else path.read_bytes())
    return state


def load_lora_and_collect_warnings(pipe, lora_path) -> list[str]:
    """pipe.load_lora_weights(lora_path), returning what diffusers, peft and transformers warned about it
    (diffusers logs unexpected or missing keys as warnings)."""
    import logging
    import re
    import warnings

    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                records.append(f"{record.name}: {record.getMessage()}")

    handler = Collect()
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft", "transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(lora_path)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    return records + [str(w.message) for w in caught
                      if re.search(r"unexpected|missing|no lora keys|not found|incompatible", str(w.message), re.I)]


def load_clips(root, caption_column: str, video_column: str, dataset_file: str | None = None,
               id_token: str | None = None, image_column: str | None = None) -> list:
    """The dataset's index as the trainer reads it; raises DatasetError listing every entry that is wrong."""
    from cogvideox_lora.data import DatasetError, read_index

    clips, problems = read_index(root, caption_column, video_column, dataset_file, id_token, image_column)
    if problems:
        raise DatasetError(problems)
    return clips


def hub_dataset(cache, repo_id: str, files: dict, commit: str = "0" * 39 + "1", ref: str = "main") -> Path:
    """A dataset as huggingface_hub keeps it in its cache (HF_HUB_CACHE or --cache_dir): refs/REF holding the
    commit, snapshots/COMMIT/ with the files. files: path in the repo -> text, or a file or folder to copy.
    Returns the snapshot folder."""
    import shutil

    repo = Path(cache) / f"datasets--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    snapshot = repo / "snapshots" / commit
    for name, content in files.items():
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            target.write_text(content)
        elif Path(content).is_dir():
            shutil.copytree(content, target)
        else:
            shutil.copy(content, target)
    return snapshot
