"""Loading the parts of a CogVideoX model folder or hub id, each only when it is needed."""

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler, CogVideoXTransformer3DModel
from transformers import AutoConfig, AutoTokenizer, T5EncoderModel

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ATTENTION_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                      "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def preferred_attention(name: str):
    """Context in which scaled_dot_product_attention tries `name` first, then the other kernels.

    PyTorch's default order puts flash first; at head size 64 on an H100 cuDNN's kernel does a
    forward+backward of CogVideoX-2B attention in 20 ms against flash's 30 (measured per layer).
    """
    first = ATTENTION_BACKENDS[name]
    return sdpa_kernel([first] + [b for b in ATTENTION_BACKENDS.values() if b != first], set_priority=True)


def _hub_kwargs(args) -> dict:
    return {"revision": args.revision, "cache_dir": args.cache_dir}


def read_configs(args) -> tuple[dict, dict, dict]:
    """The transformer's, VAE's and text encoder's configs: all that differs between models is read from them."""
    transformer = CogVideoXTransformer3DModel.load_config(args.pretrained_model_name_or_path,
                                                          subfolder="transformer", **_hub_kwargs(args))
    vae = AutoencoderKLCogVideoX.load_config(args.pretrained_model_name_or_path, subfolder="vae",
                                             **_hub_kwargs(args))
    text_encoder = AutoConfig.from_pretrained(args.pretrained_model_name_or_path, subfolder="text_encoder",
                                              **_hub_kwargs(args)).to_dict()
    return transformer, vae, text_encoder


def trained_in_bf16(transformer_config: dict) -> bool:
    """Whether the transformer is of the CogVideoX family trained in bf16, which gives NaN losses in fp16.

    CogVideoX-2B was trained in fp16 and the 5B models in bf16, whose range their activations use. The
    config does not record the training dtype, and a name or a size says little (a local folder, a
    pruned or merged model), but rotary position embeddings mark the family: the 5B, 5B-I2V and 1.5-5B
    transformers use them, 2B uses sin-cos position embeddings.
    """
    return bool(transformer_config.get("use_rotary_positional_embeddings"))


def load_transformer(args, dtype: torch.dtype):
    return CogVideoXTransformer3DModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="transformer",
                                                       variant=args.variant, torch_dtype=dtype, **_hub_kwargs(args))


def load_vae(args, dtype: torch.dtype, device):
    vae = AutoencoderKLCogVideoX.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae",
                                                 variant=args.variant, torch_dtype=dtype, **_hub_kwargs(args))
    if args.enable_tiling:
        vae.enable_tiling()
    if args.enable_slicing:
        vae.enable_slicing()
    return vae.requires_grad_(False).eval().to(device)


def load_text_encoder(args, dtype: torch.dtype, device):
    tokenizer = AutoTokenizer.from_pretrained(args.pretrained_model_name_or_path, subfolder="tokenizer",
                                              **_hub_kwargs(args))
    text_encoder = T5EncoderModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="text_encoder",
                                                  variant=args.variant, dtype=dtype, **_hub_kwargs(args))
    return tokenizer, text_encoder.requires_grad_(False).eval().to(device)


def load_scheduler(args):
    return CogVideoXDPMScheduler.from_pretrained(args.pretrained_model_name_or_path, subfolder="scheduler",
                                                 **_hub_kwargs(args))


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
