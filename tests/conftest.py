"""Shared fixtures (tiny random-init CogVideoX model folders, a small clip dataset, a tiny transformer and a batch
for one step), and the `slow` marker: `pytest -m "not slow"` (make test-fast) leaves out what trains or launches
processes."""

import os

# Set before transformers/diffusers are imported anywhere: the tests must never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import inspect

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel

from cogvideox_lora import memory, models
from cogvideox_lora.synthetic import build_model_folder, write_clips
from helpers import load_tiny

# The CI and dev machines have 2 cores; more threads only oversubscribe them.
torch.set_num_threads(2)

# The end-to-end files: most of their tests train or launch the trainer, and each file's fixtures train once for
# many tests, so the whole file is slow.
END_TO_END = {"test_train.py", "test_robustness.py", "test_families.py", "test_multi_process.py",
              "test_diffusers_example.py", "test_cli_demo.py", "test_scale.py"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains, compiles blocks or launches processes; make test-fast "
                                       "leaves it out")


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in END_TO_END:
            item.add_marker(pytest.mark.slow)


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


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    """The plain path's transformer, with a non-zero adapter so that every LoRA weight gets a gradient."""
    torch.manual_seed(0)
    transformer = load_tiny(tiny_model_dir)
    for name, param in transformer.named_parameters():
        if param.requires_grad:
            param.data = torch.randn_like(param) * 0.05
    return transformer


@pytest.fixture(scope="module")
def batch(plain):
    config = plain.config
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 3, config.in_channels, config.sample_height, config.sample_width, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    prompt_embeds = torch.randn(2, config.max_text_seq_length, config.text_embed_dim, generator=generator)
    alphas_cumprod = torch.linspace(0.999, 0.01, 1000)
    return (latents, noise, torch.tensor([100, 700]), prompt_embeds), alphas_cumprod


@pytest.fixture
def val_2b():
    """CogVideoX-2B (the class defaults) at 49x480x720, compiled blocks, bf16, rank 128, AdamW, a validation video
    at the training size."""
    config = {name: p.default for name, p in inspect.signature(CogVideoXTransformer3DModel.__init__).parameters.items()
              if p.default is not inspect.Parameter.empty}
    return memory.Workload(config, (13, 60, 90), batch_size=1, rank=128, compiled=True, weight_bytes=2,
                           optimizer_state_bytes=8, validation_latent=(13, 60, 90))
