"""LoRA adapters on the transformer blocks' layers (the attention projections unless told otherwise), and saving
them in diffusers format (and in core ComfyUI's beside it)."""

import contextlib
import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch
from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from . import comfyui, disk
from .settings import DEFAULT_LORA_TARGETS

TARGET_MODULES = list(DEFAULT_LORA_TARGETS)
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
# The preset of --lora_target_modules for every Linear layer of a block (attention q/k/v/out, the feed-forward's two and
# the adaptive norms' projections from the time embedding), whatever the model's blocks hold.
ALL_LINEAR = "all-linear"
# The safetensors metadata entry holding TrainedOn as JSON, beside diffusers' own lora_adapter_metadata.
TRAINED_ON_KEY = "cogvideox_lora_trained_on"


@dataclasses.dataclass(frozen=True)
class TrainedOn:
    """What a LoRA was trained on, kept in its file so that generation can refuse a model it does not fit.

    family: models.Family.name (e.g. "CogVideoX1.5 I2V"); generate_type: t2v or i2v; version: 1.0 or 1.5;
    height, width, frames: --height, --width, --max_num_frames.
    """

    family: str
    generate_type: str
    version: str
    base_model: str
    height: int
    width: int
    frames: int
    ignore_learned_positional_embeddings: bool = False

    @classmethod
    def read(cls, path) -> "TrainedOn | None":
        """The record in a LoRA file; None for a file without one (another trainer's, or an older one)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(TRAINED_ON_KEY)
        if not raw:
            return None
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in json.loads(raw).items() if k in names})

def block_linear_layers(block) -> dict[str, tuple[int, int]]:
    """Each Linear layer of a transformer block (its path in the block): (in_features, out_features)."""
    return {name: (m.in_features, m.out_features) for name, m in block.named_modules()
            if isinstance(m, torch.nn.Linear)}


def config_linear_layers(config: dict) -> dict[str, tuple[int, int]]:
    """block_linear_layers() of a transformer config's blocks, without weights (on the meta device)."""
    with torch.device("meta"):
        transformer = CogVideoXTransformer3DModel.from_config({**config, "num_layers": 1})
    return block_linear_layers(transformer.transformer_blocks[0])


def _matches(path: str, name: str) -> bool:
    # peft's rule for a list of target names: the module's path is the name or ends with "." + name.
    return path == name or path.endswith("." + name)


def resolve_targets(targets, layers: dict) -> list[str]:
    """peft's target_modules for --lora_target_modules (names or a preset), given block_linear_layers()."""
    return sorted(layers) if tuple(targets) == (ALL_LINEAR,) else list(targets)


def target_problems(targets, config: dict) -> list[str]:
    """The names of --lora_target_modules that match no Linear layer of the model's blocks."""
    layers = config_linear_layers(config)
    if tuple(targets) == (ALL_LINEAR,):
        return []
    missing = [t for t in targets if not any(_matches(path, t) for path in layers)]
    return [f"--lora_target_modules: {', '.join(missing)} match(es) no Linear layer of the transformer blocks, which "
            f"are {', '.join(layers)}; name some of them, or give {ALL_LINEAR}."] if missing else []


def adapter_features(targets, config: dict) -> int:
    """A block's adapter parameters per unit of rank: in + out features of every targeted layer."""
    layers = config_linear_layers(config)
    names = resolve_targets(targets, layers)
    return sum(i + o for path, (i, o) in layers.items() if any(_matches(path, n) for n in names))


def add_lora(transformer, rank: int, alpha: float, targets=DEFAULT_LORA_TARGETS) -> LoraConfig:
    """Adds a fresh adapter on the targeted layers of every block (--lora_target_modules' names or preset) and keeps
    its weights in fp32, whatever dtype the frozen model has.

    The adapter's updates are small against the base weights: in bf16 many optimizer steps would
    round away, so the trainable weights and hence the optimizer states stay fp32 while the forward
    pass runs under autocast.
    """
    target_modules = resolve_targets(targets, block_linear_layers(transformer.transformer_blocks[0]))
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=target_modules)
    transformer.add_adapter(config)
    for param in transformer.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.float32)
    # peft created the adapter in the base layer's dtype, which may be float8: draw it again in fp32.
    for module in transformer.modules():
        if isinstance(module, LoraLayer):
            module.reset_lora_parameters("default", init_lora_weights=True)
    return config


def uncast_adapter_inputs(transformer, weight_dtype: torch.dtype) -> None:
    """Stops peft from copying each adapter's input to the adapter's fp32, in a half-precision run (for good).

    Under autocast the adapter's matrix products run in the half dtype anyway, but peft's cast makes a
    full-size fp32 copy of the activations for every adapted projection, which autocast then copies
    back to half precision and keeps for the backward pass: several GiB at 49x480x720. Set once rather than
    through peft's context manager for it, which walks all modules on entering and leaving (14 ms on a 2-core
    CPU for 2B's 1,967 modules; the H200's trace showed a 4 ms GPU idle at each forward pass's start).
    """
    for module in transformer.modules():
        if isinstance(module, LoraLayer):
            module.cast_input_dtype_enabled = weight_dtype == torch.float32


@contextlib.contextmanager
def adapter_disabled(transformer):
    """The base model meanwhile: peft's layers skip the adapter, whose weights stay as they are."""
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


def trainable_parameters(transformer) -> list[torch.nn.Parameter]:
    return [p for p in transformer.parameters() if p.requires_grad]


def lora_state_dict(transformer) -> dict[str, torch.Tensor]:
    return get_peft_model_state_dict(transformer)


def load_lora_state_dict(transformer, state_dict: dict[str, torch.Tensor]) -> None:
    result = set_peft_model_state_dict(transformer, state_dict)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"LoRA weights do not fit this transformer; unexpected keys such as {unexpected[:3]}")


def save_lora(transformer, directory, config: LoraConfig, trained_on: TrainedOn | None = None,
              comfyui_copy: bool = True) -> Path:
    """Writes pytorch_lora_weights.safetensors that CogVideoXPipeline.load_lora_weights takes as is, and
    (comfyui_copy) the same LoRA in core ComfyUI's format beside it, pytorch_lora_weights_comfyui.safetensors.

    The adapter's rank and alpha go into the file's metadata, so loaders apply alpha/rank, the strength
    it was trained at, without a hand-set scale; trained_on goes there too, beside them. ComfyUI reads a
    per-layer alpha instead, which its copy has.
    """
    state_dict = lora_state_dict(transformer)
    path = Path(directory) / LORA_WEIGHTS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)  # as diffusers' save_lora_weights makes it

    def write(tmp):
        # diffusers names the file itself: it is written into a folder of its own beside the final one.
        with tempfile.TemporaryDirectory(dir=directory, prefix=".lora-") as folder:
            CogVideoXPipeline.save_lora_weights(folder, transformer_lora_layers=state_dict,
                                                transformer_lora_adapter_metadata=config.to_dict())
            written = Path(folder) / LORA_WEIGHTS_NAME
            if trained_on is not None:
                _add_metadata(written, TRAINED_ON_KEY, json.dumps(dataclasses.asdict(trained_on)))
            os.replace(written, tmp)

    disk.replace_atomically(path, write, f"the LoRA weights ({LORA_WEIGHTS_NAME})")
    if comfyui_copy:
        comfyui.save_beside(state_dict, config.to_dict(), directory)
    return path


def _add_metadata(path: Path, key: str, value: str) -> None:
    """Adds an entry to a safetensors file's metadata; diffusers' save_lora_weights writes only its own."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    partial = path.with_name(path.name + ".partial")  # the tensors may still map the file being replaced
    save_file(tensors, str(partial), metadata={**metadata, key: value})
    os.replace(partial, path)
