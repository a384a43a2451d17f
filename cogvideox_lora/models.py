"""Loading the parts of a CogVideoX model folder or hub id, each only when it is needed."""

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
from diffusers import (AutoencoderKLCogVideoX, CogVideoXDPMScheduler, CogVideoXImageToVideoPipeline,
                       CogVideoXPipeline, CogVideoXTransformer3DModel)
from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from transformers import AutoConfig, AutoTokenizer, T5EncoderModel

from .settings import ModelSource

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelError(Exception):
    """The model cannot be found or read, or its folder contradicts itself: a message, or a list of problems."""

    def __init__(self, problems: str | list[str]):
        super().__init__(problems if isinstance(problems, str) else "\n  ".join(problems))


@dataclass(frozen=True)
class Family:
    """What kind of CogVideoX a model folder holds, read from its configs (never from its name).

    image_to_video: the transformer takes the first frame's latent beside the video latents (twice the
    input channels); patch_size_t: 1.5 models patch two latent frames together; ofs: 1.5 I2V's extra
    embedding; learned_positions: 1.0 I2V's positional table, made for one size only.
    """

    image_to_video: bool
    patch_size_t: int | None
    ofs: bool
    trained_in_bf16: bool  # gives NaN losses in fp16
    learned_positions: bool
    native_frames: int
    native_height: int
    native_width: int
    image_latent_scale: float  # what the I2V pipeline multiplies the image latent by

    @classmethod
    def from_configs(cls, transformer: dict, vae: dict, pipeline_class: str, where: str) -> "Family":
        out_channels = transformer.get("out_channels") or transformer["in_channels"]
        image_to_video = transformer["in_channels"] == 2 * out_channels
        expected = "CogVideoXImageToVideoPipeline" if image_to_video else "CogVideoXPipeline"
        if pipeline_class != expected:
            raise ModelError(
                f"{where}: model_index.json names {pipeline_class}, but the transformer takes "
                f"{transformer['in_channels']} input channels for {transformer.get('out_channels')} output channels, "
                f"which is a {expected} model. Fix _class_name in model_index.json or the transformer config.")
        spatial = 2 ** (len(vae["block_out_channels"]) - 1)
        return cls(image_to_video=image_to_video, patch_size_t=transformer.get("patch_size_t"),
                   ofs=transformer.get("ofs_embed_dim") is not None,
                   # CogVideoX-2B was trained in fp16 and the 5B models in bf16, whose range their activations
                   # use. The config does not record the training dtype, and a name or a size says little (a
                   # local folder, a pruned or merged model), but rotary position embeddings mark the family:
                   # the 5B, 5B-I2V and 1.5-5B transformers use them, 2B uses sin-cos position embeddings.
                   trained_in_bf16=bool(transformer.get("use_rotary_positional_embeddings")),
                   learned_positions=bool(transformer.get("use_learned_positional_embeddings")),
                   native_frames=transformer["sample_frames"], native_height=transformer["sample_height"] * spatial,
                   native_width=transformer["sample_width"] * spatial,
                   # 1.5's VAE is flagged invert_scale_latents: its I2V model was trained on image latents
                   # divided by the scaling factor, and the pipeline feeds them so.
                   image_latent_scale=1 / vae["scaling_factor"] if vae.get("invert_scale_latents")
                   else vae["scaling_factor"])

    @property
    def name(self) -> str:
        return f"CogVideoX{'1.5' if self.patch_size_t else ''} {'I2V' if self.image_to_video else 'T2V'}"

    @property
    def version(self) -> str:
        return "1.5" if self.patch_size_t else "1.0"

    @property
    def generate_type(self) -> str:
        return "i2v" if self.image_to_video else "t2v"

    @property
    def pipeline_class(self):
        return CogVideoXImageToVideoPipeline if self.image_to_video else CogVideoXPipeline

    def problems(self, model: str, validation_prompts, validation_images, ignore_learned_positions: bool, sizes,
                 temporal_compression: int) -> list[str]:
        """What in the command line does not fit this model; sizes are the (frames, height, width) to train at."""
        problems = []
        if self.image_to_video and validation_prompts and not validation_images:
            problems.append(f"{model} is an image-to-video model ({self.name}): give "
                            f"--validation_images, one image per --validation_prompt, for its validation videos.")
        if not self.image_to_video and validation_images:
            problems.append(f"{model} is a text-to-video model ({self.name}): drop "
                            f"--validation_images, or train an image-to-video model.")
        if self.learned_positions and not ignore_learned_positions:
            f0, h0, w0 = self.native_frames, self.native_height, self.native_width
            # Any frame count of the same latent length uses the table; another length silently replaces it
            # by a sin-cos table in diffusers, and another height or width fails there.
            problems += [
                f"{self.name} has learned positional embeddings made for {f0}x{h0}x{w0} (frames x height x width) "
                f"only, but would train at {f}x{h}x{w}. Train at that size (--max_num_frames {f0} --height {h0} "
                f"--width {w0}), or pass --ignore_learned_positional_embeddings to train (and then generate) "
                f"without them."
                for f, h, w in sorted(set(sizes))
                if ((f - 1) // temporal_compression, h, w) != ((f0 - 1) // temporal_compression, h0, w0)]
        return problems


# What may name a model repo on the Hugging Face Hub rather than a local folder.
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
# The files of a diffusers CogVideoX folder that the configs are read from, and the parts training loads.
CONFIG_FILES = ("model_index.json", "transformer/config.json", "vae/config.json", "text_encoder/config.json",
                "scheduler/scheduler_config.json")
LOADED_PARTS = ("transformer", "vae", "text_encoder", "tokenizer")
_EXAMPLE_ID = "THUDM/CogVideoX-2b"
TRAINER_FLAG = "--pretrained_model_name_or_path"


def locate(source: ModelSource, loading: bool, flag: str = TRAINER_FLAG) -> ModelSource:
    """The source with `files`, the folder its files are read from: a local folder, or a snapshot in a hub cache,
    --cache_dir's first and then huggingface_hub's own (HF_HUB_CACHE), so a model fetched before (`hf download`,
    cli_demo.py, another run) is never fetched again. Without `files` (in no cache, or a cached snapshot that
    lacks parts) loading downloads what is missing into that cache, or --cache_dir.

    Raises one ModelError saying what was looked for and how to get it: `loading` asks for the parts that
    training loads, else only the configs are needed. flag: the command line's name of the model.
    """
    given = f"{flag} {source.path}"
    local = Path(source.path).expanduser()
    if local.exists() or not HUB_ID.fullmatch(source.path):
        problems = _folder_problems(local, given, flag) or _missing_files(source, local, loading, given)
        if problems:
            raise ModelError(problems)
        return replace(source, files=str(local))
    cached = [(cache, Path(snapshot)) for cache in dict.fromkeys([source.cache_dir, None])
              if (snapshot := _snapshot(source, cache))]
    for cache, snapshot in cached:
        if not _missing_files(source, snapshot, loading, given):
            return replace(source, cache_dir=cache, files=str(snapshot))
    if not constants.HF_HUB_OFFLINE:
        return replace(source, cache_dir=cached[0][0]) if cached else source
    if cached:
        raise ModelError(_missing_files(replace(source, cache_dir=cached[0][0]), cached[0][1], loading, given))
    caches = " and ".join(dict.fromkeys(str(c) for c in (source.cache_dir, constants.HF_HUB_CACHE) if c))
    raise ModelError(f"{given}: no such folder here, and not in the hub cache ({caches}) while HF_HUB_OFFLINE is "
                     f"set. Download it where there is a network: {download_command(source)}; or give the folder "
                     f"that holds it.")


def _snapshot(source: ModelSource, cache: str | None) -> str | None:
    try:
        return snapshot_download(source.path, revision=source.revision, cache_dir=cache, local_files_only=True)
    except LocalEntryNotFoundError:
        return None


def download_command(source: ModelSource, parts=(), folder: Path | None = None) -> str:
    """The `hf download` command that fetches the model (only `parts` of it) where the trainer looks for it."""
    include = "".join(f" --include '{part}/*'" for part in parts)
    if folder is not None:
        return f"hf download {_EXAMPLE_ID}{include} --local-dir '{folder}' (with the hub id it came from)"
    revision = f" --revision {source.revision}" if source.revision else ""
    cache = f" --cache-dir '{source.cache_dir}'" if source.cache_dir else ""
    return f"hf download {source.path}{include}{revision}{cache}"


def _folder_problems(folder: Path, given: str, flag: str) -> list[str]:
    """Why a local path is no diffusers model folder."""
    if not folder.exists():
        return [f"{given}: no such folder ({folder.absolute()}). Give the folder that holds model_index.json, or "
                f"a hub id such as {_EXAMPLE_ID}; to keep a model in a folder: hf download {_EXAMPLE_ID} "
                f"--local-dir '{folder}'."]
    if not folder.is_dir():
        return [f"{given} is a file: give the model's folder, the one that holds model_index.json."]
    if not (folder / "model_index.json").is_file() and (folder.parent / "model_index.json").is_file():
        return [f"{given} is the {folder.name}/ part of the model in {folder.parent}: give the model's folder, "
                f"{flag} {folder.parent}"]
    if not (folder / "model_index.json").is_file():
        return [f"{given}: {folder} holds no model_index.json, so it is no diffusers model folder: give the folder "
                f"that holds model_index.json with transformer/, vae/, text_encoder/, tokenizer/ and scheduler/ "
                f"(hf download {_EXAMPLE_ID} --local-dir FOLDER fetches one)."]
    return []


def _missing_files(source: ModelSource, folder: Path, loading: bool, given: str) -> list[str]:
    """The configs a folder lacks, and with `loading` the parts training loads, with the command to fetch them."""
    missing = [name for name in CONFIG_FILES if not (folder / name).is_file()]
    if loading:
        missing += [f"{part}/" for part in LOADED_PARTS if not _holds_part(folder / part)]
    if not missing:
        return []
    local = folder == Path(source.path).expanduser()
    parts = sorted({name.split("/")[0] for name in missing if "/" in name})
    return [f"{given}: {folder} lacks {', '.join(missing)}. Fetch {'them' if len(missing) > 1 else 'it'} with "
            f"{download_command(source, parts, folder if local else None)}"
            + ("" if local else " (HF_HUB_OFFLINE is set, so nothing is downloaded here)") + "."]


def _holds_part(folder: Path) -> bool:
    """A tokenizer's files, or a model part's weights (a sharded checkpoint's index counts: its shards are
    checked where they load)."""
    if folder.name == "tokenizer":
        return folder.is_dir() and any(p.is_file() for p in folder.iterdir())
    return any(p.is_file() for pattern in ("*.safetensors", "*.bin", "*.index.json") for p in folder.glob(pattern))


class Configs(NamedTuple):
    """A model's configs and its family, and where its files are."""

    source: ModelSource
    transformer: dict
    vae: dict
    text_encoder: dict
    family: Family

    @property
    def has_tokenizer(self) -> bool:
        return self.source.files is not None and _holds_part(Path(self.source.files) / "tokenizer")


def check_model(source: ModelSource, loading: bool, flag: str = TRAINER_FLAG) -> Configs:
    """The model found (see locate) and its configs read, or one ModelError."""
    source = locate(source, loading, flag)
    return Configs(source, *read_configs(source, flag))


def read_configs(source: ModelSource, flag: str = TRAINER_FLAG) -> tuple[dict, dict, dict, Family]:
    """The transformer's, VAE's and text encoder's configs and the model's family: all that differs between
    models is read from them."""
    try:
        transformer = CogVideoXTransformer3DModel.load_config(source.location, subfolder="transformer",
                                                              **source.hub_kwargs())
        vae = AutoencoderKLCogVideoX.load_config(source.location, subfolder="vae", **source.hub_kwargs())
        text_encoder = AutoConfig.from_pretrained(source.location, subfolder="text_encoder",
                                                  **source.hub_kwargs()).to_dict()
        pipeline_class = CogVideoXPipeline.load_config(source.location, **source.hub_kwargs())["_class_name"]
    except Exception as e:  # diffusers, transformers and huggingface_hub each fail their own way (network, files)
        reason = f"{type(e).__name__}: {_first_line(e)}"
        if source.files:
            raise ModelError(f"{flag} {source.path}: its configs in {source.files} cannot be read ({reason}).") from e
        raise ModelError(f"{flag} {source.path}: not in the hub cache ({source.cache_dir or constants.HF_HUB_CACHE}), "
                         f"and its configs cannot be downloaded ({reason}). Without a network, download it where "
                         f"there is one: {download_command(source)}; else check the id, or log in (hf auth login) "
                         f"for a gated or private repo.") from e
    family = Family.from_configs(transformer, vae, pipeline_class, source.path)
    return transformer, vae, text_encoder, family


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def load_transformer(source: ModelSource, dtype: torch.dtype):
    return CogVideoXTransformer3DModel.from_pretrained(source.location, subfolder="transformer",
                                                       variant=source.variant, torch_dtype=dtype,
                                                       **source.hub_kwargs())


def drop_learned_positional_embeddings(transformer) -> None:
    """1.0 I2V without its learned positional table, so it runs at any size on its rotary embeddings alone.

    A LoRA trained so must be used so: pass the same flag to cli_demo.py.
    """
    del transformer.patch_embed.pos_embedding
    transformer.patch_embed.use_learned_positional_embeddings = False
    transformer.register_to_config(use_learned_positional_embeddings=False)


def load_vae(source: ModelSource, dtype: torch.dtype, device, tiling: bool = False, slicing: bool = False):
    vae = AutoencoderKLCogVideoX.from_pretrained(source.location, subfolder="vae", variant=source.variant,
                                                 torch_dtype=dtype, **source.hub_kwargs())
    if tiling:
        vae.enable_tiling()
    if slicing:
        vae.enable_slicing()
    return vae.requires_grad_(False).eval().to(device)


def load_tokenizer(source: ModelSource):
    try:
        return AutoTokenizer.from_pretrained(source.location, subfolder="tokenizer", **source.hub_kwargs())
    except Exception as e:  # as read_configs: a missing, partial or unreachable tokenizer/
        raise ModelError(f"--pretrained_model_name_or_path {source.path}: its tokenizer cannot be loaded "
                         f"({type(e).__name__}: {_first_line(e)}). Fetch it with "
                         f"{download_command(source, ['tokenizer'])}") from e


def load_text_encoder(source: ModelSource, dtype: torch.dtype, device):
    text_encoder = T5EncoderModel.from_pretrained(source.location, subfolder="text_encoder", variant=source.variant,
                                                  dtype=dtype, **source.hub_kwargs())
    return text_encoder.requires_grad_(False).eval().to(device)


def load_scheduler(source: ModelSource):
    return CogVideoXDPMScheduler.from_pretrained(source.location, subfolder="scheduler", **source.hub_kwargs())


class Float8Linear(torch.nn.Linear):
    """A frozen Linear whose weight is stored as float8 with one scale per output row.

    The weight is dequantized in the forward pass, inside the compiled block, so the cast fuses with
    what surrounds it and the backward keeps only the dequantized weights of the block being recomputed.
    Scaling each row to float8's range keeps small weights out of its coarse subnormals.
    """

    def forward(self, x):
        weight = self.weight.to(self.compute_dtype) * self.weight_scale
        return torch.nn.functional.linear(x, weight, self.bias)

    @classmethod
    def convert(cls, linear: torch.nn.Linear, compute_dtype: torch.dtype, device) -> None:
        weight = linear.weight.detach().to(device, torch.float32)
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
        linear.__class__ = cls
        linear.compute_dtype = compute_dtype
        linear.weight = torch.nn.Parameter((weight / scale).to(torch.float8_e4m3fn), requires_grad=False)
        linear.register_buffer("weight_scale", scale.to(compute_dtype))


def store_base_weights_in_fp8(transformer, compute_dtype: torch.dtype, device) -> None:
    """Stores the Linear weights of the attention and feed-forward layers as scaled float8.

    Those hold nearly all of the weights (5B: 10.4 GiB in bf16, about 5.6 in float8); the embeddings,
    norms and their modulation layers stay in compute_dtype, as diffusers' layerwise casting also leaves
    them. Call it before adding the adapter, whose weights must stay fp32. The scales are computed on
    `device` (a minute on the CPU for 5B, a second on a GPU), where the converted weights then stay.
    """
    for block in transformer.transformer_blocks:
        for name, module in block.named_modules():
            if type(module) is torch.nn.Linear and not name.startswith("norm"):
                Float8Linear.convert(module, compute_dtype, device)


def compile_blocks(transformer) -> None:
    """torch.compile each transformer block (they are alike, so one compilation serves all).

    Fuses the norms, modulation, GELU and residual adds around the matrix products and attention:
    measured on an H100 at 49x480x720, 2B steps take 0.85 s instead of 1.06 and 32 GiB instead of 44.
    """
    for block in transformer.transformer_blocks:
        block.compile()
