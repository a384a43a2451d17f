"""Loading the parts of a CogVideoX model folder or hub id, each only when it is needed."""

from dataclasses import dataclass

import torch
from diffusers import (AutoencoderKLCogVideoX, CogVideoXDPMScheduler, CogVideoXImageToVideoPipeline,
                       CogVideoXPipeline, CogVideoXTransformer3DModel)
from transformers import AutoConfig, AutoTokenizer, T5EncoderModel

from .settings import ModelSource

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelError(Exception):
    """The model folder contradicts itself."""


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


def read_configs(source: ModelSource) -> tuple[dict, dict, dict, Family]:
    """The transformer's, VAE's and text encoder's configs and the model's family: all that differs between
    models is read from them."""
    transformer = CogVideoXTransformer3DModel.load_config(source.path, subfolder="transformer",
                                                          **source.hub_kwargs())
    vae = AutoencoderKLCogVideoX.load_config(source.path, subfolder="vae", **source.hub_kwargs())
    text_encoder = AutoConfig.from_pretrained(source.path, subfolder="text_encoder", **source.hub_kwargs()).to_dict()
    pipeline_class = CogVideoXPipeline.load_config(source.path, **source.hub_kwargs())["_class_name"]
    family = Family.from_configs(transformer, vae, pipeline_class, source.path)
    return transformer, vae, text_encoder, family


def load_transformer(source: ModelSource, dtype: torch.dtype):
    return CogVideoXTransformer3DModel.from_pretrained(source.path, subfolder="transformer", variant=source.variant,
                                                       torch_dtype=dtype, **source.hub_kwargs())


def drop_learned_positional_embeddings(transformer) -> None:
    """1.0 I2V without its learned positional table, so it runs at any size on its rotary embeddings alone.

    A LoRA trained so must be used so: pass the same flag to cli_demo.py.
    """
    del transformer.patch_embed.pos_embedding
    transformer.patch_embed.use_learned_positional_embeddings = False
    transformer.register_to_config(use_learned_positional_embeddings=False)


def load_vae(source: ModelSource, dtype: torch.dtype, device, tiling: bool = False, slicing: bool = False):
    vae = AutoencoderKLCogVideoX.from_pretrained(source.path, subfolder="vae", variant=source.variant,
                                                 torch_dtype=dtype, **source.hub_kwargs())
    if tiling:
        vae.enable_tiling()
    if slicing:
        vae.enable_slicing()
    return vae.requires_grad_(False).eval().to(device)


def load_tokenizer(source: ModelSource):
    return AutoTokenizer.from_pretrained(source.path, subfolder="tokenizer", **source.hub_kwargs())


def load_text_encoder(source: ModelSource, dtype: torch.dtype, device):
    text_encoder = T5EncoderModel.from_pretrained(source.path, subfolder="text_encoder", variant=source.variant,
                                                  dtype=dtype, **source.hub_kwargs())
    return text_encoder.requires_grad_(False).eval().to(device)


def load_scheduler(source: ModelSource):
    return CogVideoXDPMScheduler.from_pretrained(source.path, subfolder="scheduler", **source.hub_kwargs())


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
