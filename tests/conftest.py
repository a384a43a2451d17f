"""Shared fixtures: tiny random-init CogVideoX model folders and a small clip dataset."""

import os

# Set before transformers/diffusers are imported anywhere: the tests must never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from cogvideox_lora import models
from cogvideox_lora.synthetic import build_model_folder, write_clips

# The CI and dev machines have 2 cores; more threads only oversubscribe them.
torch.set_num_threads(2)

DATASET_PROMPTS = [
    "a red square drifting across a grey background",
    "mickey mouse dances on a wooden stage",
    "a brown bear walks through the forest",
    "a red car drives along a coastal road at sunset",
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_model_folder(tmp_path_factory.mktemp("models") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_5b_model_dir(tmp_path_factory):
    return build_model_folder(tmp_path_factory.mktemp("models") / "tiny-5b", size="tiny-5b", seed=0)


@pytest.fixture(scope="session")
def tiny_dataset_dir(tmp_path_factory):
    """4 clips of 25 frames, 48x64 (decord's minimum) at 8 fps, one prompt each."""
    root = tmp_path_factory.mktemp("dataset")
    write_clips(root, num_clips=4, height=48, width=64, num_frames=25, fps=8, prompts=DATASET_PROMPTS)
    return root


@pytest.fixture
def no_models(monkeypatch):
    """Makes loading any model fail the test: what it guards must be decided from configs and files alone."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    for name in ("load_transformer", "load_vae", "load_text_encoder"):
        monkeypatch.setattr(models, name, refuse)
