"""LoRAs in core ComfyUI's CogVideoX format, and conversion both ways with diffusers' layout.

Core ComfyUI runs CogVideoX with its own model code (comfy/ldm/cogvideo/model.py), whose parameters are
named differently from diffusers' (`blocks.N.q` for `transformer_blocks.N.attn1.to_q`), and it resolves a
LoRA key `diffusion_model.<its parameter path without .weight>`; a diffusers-layout file loads there with
"lora key not loaded" for every key. ComfyUI also scales each update by that layer's `.alpha` tensor over
the rank (1.0 where there is none), never by the alpha in the file's metadata, which is where diffusers and
peft keep it. So the ComfyUI file written here names every layer as ComfyUI's model does and carries a
per-layer `.alpha` that makes strength 1.0 there the strength the LoRA was trained at.

    python -m cogvideox_lora.comfyui to-comfyui IN OUT [--alpha A] [--model MODEL]
    python -m cogvideox_lora.comfyui to-diffusers IN OUT [--model MODEL]

IN is a .safetensors file (or, for to-comfyui, a folder holding pytorch_lora_weights.safetensors); OUT is a
new .safetensors file: an existing one is never replaced. --model (a model folder or hub id) checks that
the LoRA fits that model's layers before anything is written.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

COMFYUI_LORA_NAME = "pytorch_lora_weights_comfyui.safetensors"
DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"

# ComfyUI's generic LoRA key for a CogVideoX model is its state dict key minus ".weight", and its model sits
# under "diffusion_model." (comfy/lora.py, model_lora_keys_unet); kohya-style trainers write the same path
# with "lora_unet_" and underscores, which ComfyUI also resolves.
_COMFYUI_PREFIX = "diffusion_model."
_KOHYA_PREFIX = "lora_unet_"
_DIFFUSERS_PREFIX = "transformer."

# The linear layers of a block, diffusers' name in transformer_blocks.N -> ComfyUI's in blocks.N. ComfyUI's
# CogVideoXBlock computes what diffusers' does with the same weights: q, k, v and attn_out are attn1's
# to_q, to_k, to_v and to_out[0]; ff_proj and ff_out the tanh-GELU feed-forward's net[0].proj and net[2];
# norm1/norm2 keep the name and the shift, scale, gate order of their 6-way split.
_BLOCK_LAYERS = {
    "attn1.to_q": "q",
    "attn1.to_k": "k",
    "attn1.to_v": "v",
    "attn1.to_out.0": "attn_out",
    "ff.net.0.proj": "ff_proj",
    "ff.net.2": "ff_out",
    "norm1.linear": "norm1.linear",
    "norm2.linear": "norm2.linear",
}
# The layers outside the blocks that a LoRA may also adapt (patch_embed.proj is a convolution in 1.0).
_OTHER_LAYERS = {
    "patch_embed.proj": "patch_embed.proj",
    "patch_embed.text_proj": "patch_embed.text_proj",
    "time_embedding.linear_1": "time_embedding_linear_1",
    "time_embedding.linear_2": "time_embedding_linear_2",
    "ofs_embedding.linear_1": "ofs_embedding_linear_1",
    "ofs_embedding.linear_2": "ofs_embedding_linear_2",
    "norm_out.linear": "norm_out.linear",
    "proj_out": "proj_out",
}
_DIFFUSERS_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.(.+)")
_COMFYUI_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_KOHYA_BLOCK = re.compile(r"blocks_(\d+)_(.+)")
_LAYOUT_NAMES = {"comfyui": "core ComfyUI's", "diffusers": "diffusers'"}


class LoraFormatError(ValueError):
    """A file that is not a CogVideoX LoRA in the expected layout, or one for a model of another size."""


@dataclass
class LayerLora:
    """One layer's update, scaled as ComfyUI does: alpha / rank * up @ down."""

    down: torch.Tensor  # peft's lora_A: [rank, in_features] (or a convolution's [rank, in, kh, kw])
    up: torch.Tensor  # peft's lora_B: [out_features, rank]
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def comfyui_layer(diffusers_layer: str) -> str:
    """ComfyUI's name of a CogVideoX layer from its diffusers name (transformer_blocks.0.attn1.to_q -> blocks.0.q)."""
    block = _DIFFUSERS_BLOCK.fullmatch(diffusers_layer)
    name = _BLOCK_LAYERS.get(block.group(2)) if block else _OTHER_LAYERS.get(diffusers_layer)
    if name is None:
        raise LoraFormatError(f"{diffusers_layer} is not a layer of a CogVideoX transformer that a LoRA adapts")
    return f"blocks.{block.group(1)}.{name}" if block else name


def diffusers_layer(comfyui_name: str) -> str:
    """diffusers' name of a CogVideoX layer from ComfyUI's (blocks.0.ff_out -> transformer_blocks.0.ff.net.2)."""
    block = _COMFYUI_BLOCK.fullmatch(comfyui_name)
    name = (_inverse(_BLOCK_LAYERS).get(block.group(2)) if block else _inverse(_OTHER_LAYERS).get(comfyui_name))
    if name is None:
        raise LoraFormatError(f"{comfyui_name} is not a layer of ComfyUI's CogVideoX model that a LoRA adapts")
    return f"transformer_blocks.{block.group(1)}.{name}" if block else name


def _inverse(names: dict[str, str]) -> dict[str, str]:
    return {comfy: diffusers for diffusers, comfy in names.items()}


def _kohya_layer(underscored: str) -> str:
    """ComfyUI's dotted layer name from the underscored one (blocks_3_attn_out -> blocks.3.attn_out)."""
    dotted = {name.replace(".", "_"): name for name in [*_BLOCK_LAYERS.values(), *_OTHER_LAYERS.values()]}
    block = _KOHYA_BLOCK.fullmatch(underscored)
    name = dotted.get(block.group(2) if block else underscored)
    if name is None:
        raise LoraFormatError(f"lora_unet_{underscored} is not a layer of ComfyUI's CogVideoX model")
    return f"blocks.{block.group(1)}.{name}" if block else name


# ---------------------------------------------------------------------------------------------------------------
# From and to state dicts


def from_peft(state_dict: dict[str, torch.Tensor], metadata: dict | None,
              alpha: float | None = None) -> dict[str, LayerLora]:
    """The layers of a peft/diffusers LoRA (keys `LAYER.lora_A.weight` without the `transformer.` prefix).

    Each layer's alpha is the one peft applies: `alpha` where given, else the metadata's alpha_pattern or
    lora_alpha (rsLoRA's alpha/sqrt(rank) turned into the alpha of plain alpha/rank); without either,
    alpha = rank, the scale 1 diffusers loads a file without metadata at.
    """
    from peft.utils.other import get_pattern_key

    pairs = _pairs(state_dict, {"lora_A.weight": "down", "lora_B.weight": "up"}, "diffusers")
    metadata = metadata or {}
    patterns = metadata.get("alpha_pattern") or {}
    layers = {}
    for name, (down, up) in pairs.items():
        comfyui_layer(name)  # refuses what is not a CogVideoX layer
        rank = down.shape[0]
        if alpha is not None:
            layer_alpha = alpha
        elif "lora_alpha" in metadata:
            layer_alpha = patterns.get(get_pattern_key(patterns.keys(), name), metadata["lora_alpha"])
            if metadata.get("use_rslora"):
                layer_alpha = layer_alpha * math.sqrt(rank)
        else:
            layer_alpha = rank
        layers[name] = LayerLora(down, up, float(layer_alpha))
    return layers


def from_comfyui(state_dict: dict[str, torch.Tensor]) -> dict[str, LayerLora]:
    """The layers of a LoRA in ComfyUI's format, by diffusers name; a layer without .alpha gets alpha = rank."""
    renamed = {}
    for key, tensor in state_dict.items():
        if key.startswith(_COMFYUI_PREFIX):
            renamed[key.removeprefix(_COMFYUI_PREFIX)] = tensor
        elif key.startswith(_KOHYA_PREFIX):
            underscored, _, suffix = key.removeprefix(_KOHYA_PREFIX).partition(".")
            renamed[f"{_kohya_layer(underscored)}.{suffix}"] = tensor
        else:
            raise LoraFormatError(f"the key {key} is not one of ComfyUI's CogVideoX LoRA keys "
                                  f"({_COMFYUI_PREFIX}blocks.N.q.lora_down.weight and the like)")
    alphas = {key.removesuffix(".alpha"): tensor for key, tensor in renamed.items() if key.endswith(".alpha")}
    matrices = {key: tensor for key, tensor in renamed.items() if not key.endswith(".alpha")}
    suffixes = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_A.weight": "down", "lora_B.weight": "up"}
    pairs = _pairs(matrices, suffixes, "ComfyUI")
    if stray := sorted(set(alphas) - set(pairs)):
        raise LoraFormatError(f"{_COMFYUI_PREFIX}{stray[0]}.alpha belongs to no LoRA matrices in the file")
    return {diffusers_layer(name): LayerLora(down, up, float(alphas[name].item()) if name in alphas else down.shape[0])
            for name, (down, up) in pairs.items()}


def _pairs(matrices: dict[str, torch.Tensor], suffixes: dict[str, str], layout: str) -> dict[str, tuple]:
    """{layer: (down, up)} from keys LAYER.SUFFIX, refusing any other key and any half pair."""
    found = collections.defaultdict(dict)
    for key, tensor in matrices.items():
        suffix = next((s for s in suffixes if key.endswith("." + s)), None)
        if suffix is None:
            raise LoraFormatError(f"the key {key} is not a LoRA matrix of the {layout} layout (its keys end in "
                                  f"{' or '.join(sorted(suffixes))}); DoRA, LoKr and other adapters are not converted")
        found[key.removesuffix("." + suffix)][suffixes[suffix]] = tensor
    for layer, halves in found.items():
        if len(halves) != 2:
            raise LoraFormatError(f"{layer} has its {next(iter(halves))} matrix but not the other one")
        if halves["down"].shape[0] != halves["up"].shape[1]:
            raise LoraFormatError(f"{layer}'s matrices do not fit each other: ranks {halves['down'].shape[0]} "
                                  f"and {halves['up'].shape[1]}")
    return {layer: (halves["down"], halves["up"]) for layer, halves in found.items()}


def comfyui_state_dict(layers: dict[str, LayerLora]) -> dict[str, torch.Tensor]:
    """ComfyUI's keys: diffusion_model.LAYER.lora_down.weight, .lora_up.weight and .alpha for every layer."""
    out = {}
    for name, layer in layers.items():
        key = _COMFYUI_PREFIX + comfyui_layer(name)
        out[f"{key}.lora_down.weight"] = layer.down.contiguous()
        out[f"{key}.lora_up.weight"] = layer.up.contiguous()
        out[f"{key}.alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
    return out


def peft_state_dict(layers: dict[str, LayerLora]) -> tuple[dict[str, torch.Tensor], dict]:
    """The peft state dict (no `transformer.` prefix) and the LoraConfig fields diffusers reads from metadata.

    The most common rank and alpha are r and lora_alpha, the others go into rank_pattern and alpha_pattern
    by full layer name, as diffusers itself infers them for a file without metadata.
    """
    state_dict = {}
    for name, layer in layers.items():
        state_dict[f"{name}.lora_A.weight"] = layer.down.contiguous()
        state_dict[f"{name}.lora_B.weight"] = layer.up.contiguous()
    ranks = {name: layer.rank for name, layer in layers.items()}
    alphas = {name: layer.alpha for name, layer in layers.items()}
    r, lora_alpha = (collections.Counter(values.values()).most_common(1)[0][0] for values in (ranks, alphas))
    config = {"r": r, "lora_alpha": lora_alpha, "target_modules": sorted(layers),
              "rank_pattern": {name: rank for name, rank in ranks.items() if rank != r},
              "alpha_pattern": {name: alpha for name, alpha in alphas.items() if alpha != lora_alpha}}
    return state_dict, config


def check_fits(layers: dict[str, LayerLora], transformer_config: dict, model: str) -> None:
    """Raises LoraFormatError unless every layer of the LoRA is a layer of this transformer, of its shape."""
    from accelerate import init_empty_weights
    from diffusers import CogVideoXTransformer3DModel

    with init_empty_weights():
        transformer = CogVideoXTransformer3DModel.from_config(transformer_config)
    for name, layer in sorted(layers.items()):
        try:
            weight = transformer.get_submodule(name).weight
        except AttributeError:
            raise LoraFormatError(
                f"the LoRA adapts {name}, which the model {model} does not have ({len(transformer.transformer_blocks)}"
                f" blocks): it was made for a model of another size or kind; use it with that one.") from None
        lora_shape = (layer.up.shape[0], layer.down[0].numel())
        model_shape = (weight.shape[0], weight[0].numel())
        if lora_shape != model_shape:
            raise LoraFormatError(
                f"the LoRA's update of {name} is {lora_shape[0]}x{lora_shape[1]} but the model {model} needs "
                f"{model_shape[0]}x{model_shape[1]}: the LoRA was trained on a model of another size (e.g. "
                f"CogVideoX-5b against 2b); use it with the model it was trained on.")


# ---------------------------------------------------------------------------------------------------------------
# Files


def save_comfyui(layers: dict[str, LayerLora], path) -> Path:
    from safetensors.torch import save_file

    save_file(comfyui_state_dict(layers), str(path), metadata={"format": "pt"})
    return Path(path)


def save_diffusers(layers: dict[str, LayerLora], path) -> Path:
    """A file CogVideoXPipeline.load_lora_weights loads at the LoRA's strength (rank and alpha in its metadata)."""
    from diffusers import CogVideoXPipeline

    path = Path(path)
    state_dict, config = peft_state_dict(layers)
    CogVideoXPipeline.save_lora_weights(path.parent, transformer_lora_layers=state_dict, weight_name=path.name,
                                        transformer_lora_adapter_metadata=config)
    return path


def save_beside(peft_layers: dict[str, torch.Tensor], lora_config: dict, directory) -> Path:
    """Writes DIRECTORY/pytorch_lora_weights_comfyui.safetensors from the trainer's adapter and its config."""
    return save_comfyui(from_peft(peft_layers, lora_config), Path(directory) / COMFYUI_LORA_NAME)


def read(path) -> tuple[str, dict[str, torch.Tensor], dict | None]:
    """("diffusers" or "comfyui", the tensors, the diffusers adapter metadata if any) of a LoRA file."""
    with _opened(path) as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    if _layout(path, tensors) == "comfyui":
        return "comfyui", tensors, None
    metadata = json.loads(raw) if raw else None
    if metadata and all(key.startswith(_DIFFUSERS_PREFIX) for key in metadata):
        metadata = {key.removeprefix(_DIFFUSERS_PREFIX): value for key, value in metadata.items()}
    return "diffusers", {key.removeprefix(_DIFFUSERS_PREFIX): value for key, value in tensors.items()}, metadata


def is_comfyui_lora(path) -> bool:
    """Whether a .safetensors file is a LoRA in ComfyUI's layout, from its keys alone (no tensor is read)."""
    with _opened(path) as f:
        keys = list(f.keys())
    try:
        return _layout(path, keys) == "comfyui"
    except LoraFormatError:
        return False


@contextlib.contextmanager
def _opened(path):
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except (SafetensorError, OSError) as e:
        raise LoraFormatError(f"{path} is not a readable .safetensors file ({e})") from None


def _layout(path, keys) -> str:
    if not keys:
        raise LoraFormatError(f"{path} holds no tensors: it is not a LoRA")
    if all(key.startswith((_COMFYUI_PREFIX, _KOHYA_PREFIX)) for key in keys):
        return "comfyui"
    if not any(".lora_A." in key or ".lora_B." in key for key in keys):
        raise LoraFormatError(f"{path} is not a CogVideoX LoRA: its keys (such as {next(iter(keys))}) are neither "
                              f"diffusers' (transformer.transformer_blocks.N.attn1.to_q.lora_A.weight) nor ComfyUI's "
                              f"({_COMFYUI_PREFIX}blocks.N.q.lora_down.weight)")
    return "diffusers"


def convert(source, target, to: str, alpha: float | None = None, model: str | None = None) -> str:
    """Writes the LoRA at `source` in the other layout at `target` (to: "comfyui" or "diffusers"); returns a
    line saying what was written. Raises LoraFormatError (and FileExistsError) before writing anything."""
    source, target = Path(source), Path(target)
    if source.is_dir():
        source = source / (DIFFUSERS_LORA_NAME if to == "comfyui" else COMFYUI_LORA_NAME)
    if not source.is_file():
        raise FileNotFoundError(f"LoRA not found: {source} is not a file")
    if target.suffix != ".safetensors":
        raise LoraFormatError(f"{target}: name the output file *.safetensors")
    if target.exists():
        raise FileExistsError(f"{target} exists already, and is left as it is: name a new output file")
    layout, tensors, metadata = read(source)
    if layout == to:
        raise LoraFormatError(f"{source} is a LoRA in {_LAYOUT_NAMES[to]} layout already: nothing to convert")
    if alpha is not None and layout != "diffusers":
        raise LoraFormatError("--alpha is for a diffusers LoRA: a ComfyUI LoRA's alpha is in the file, per layer")
    try:
        layers = from_peft(tensors, metadata, alpha) if layout == "diffusers" else from_comfyui(tensors)
    except LoraFormatError as e:
        raise LoraFormatError(f"{source} is not a CogVideoX LoRA: {e}") from None
    if model is not None:
        config = _transformer_config(model)
        try:
            check_fits(layers, config, model)
        except LoraFormatError as e:
            raise LoraFormatError(f"{source}: {e}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    (save_comfyui if to == "comfyui" else save_diffusers)(layers, target)
    return f"{target}: {_describe(layers)}"


def _transformer_config(model: str) -> dict:
    from diffusers import CogVideoXTransformer3DModel

    try:
        return CogVideoXTransformer3DModel.load_config(model, subfolder="transformer")
    except (OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [""])[0]
        raise LoraFormatError(f"--model {model}: no CogVideoX transformer config there ({reason}); give a model "
                              f"folder holding transformer/config.json, or a hub id") from None


def _describe(layers: dict[str, LayerLora]) -> str:
    ranks = "/".join(sorted({str(layer.rank) for layer in layers.values()}))
    scales = "/".join(sorted({f"{layer.alpha / layer.rank:g}" for layer in layers.values()}))
    blocks = {m.group(1) for name in layers if (m := _DIFFUSERS_BLOCK.fullmatch(name))}
    return f"{len(layers)} layers in {len(blocks)} blocks, rank {ranks}, applied at alpha/rank = {scales} at strength 1"


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m cogvideox_lora.comfyui", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    to_comfyui = commands.add_parser("to-comfyui", help="a diffusers-layout LoRA (this trainer's) to core ComfyUI's")
    to_diffusers = commands.add_parser("to-diffusers",
                                       help="a LoRA in core ComfyUI's layout to diffusers' (for cli_demo.py)")
    for command in (to_comfyui, to_diffusers):
        command.add_argument("input", help="the LoRA .safetensors file, or a trainer's output or checkpoint folder")
        command.add_argument("output", help="the .safetensors file to write (must not exist)")
        command.add_argument("--model", default=None,
                             help="a CogVideoX model folder or hub id: check first that the LoRA fits its layers")
    to_comfyui.add_argument("--alpha", type=float, default=None,
                            help="the lora_alpha it was trained with, for every layer (default: the file's "
                                 "metadata; without any, alpha = rank, the scale diffusers loads such a file at)")
    args = parser.parse_args(argv)
    to = "comfyui" if args.command == "to-comfyui" else "diffusers"
    try:
        print(convert(args.input, args.output, to, getattr(args, "alpha", None), args.model))
    except (LoraFormatError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"error: {e}")
    return Path(args.output)


if __name__ == "__main__":
    main()
