"""The attention kernel of the transformer's blocks: FlashAttention-4 where it runs, else PyTorch's SDPA.

A CogVideoX step spends three quarters of its time in attention at head size 64. FlashAttention-4's
CuTe kernels (`pip install flash-attn-4`, Hopper and Blackwell) do a forward and backward of it about
20 % faster than cuDNN's (BENCHMARKS.md). The kernel is wrapped as a pair of torch.library custom ops
with an autograd formula, so a compiled block traces it as one node of its graph (no graph break) and a
checkpointing policy can name its outputs to keep (recompute.py).
"""

import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("auto", "flash4", "cudnn", "flash", "efficient", "math")
SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
HALF = (torch.bfloat16, torch.float16)
# FlashAttention-4 compiles its kernels at their first call (seconds each); its disk cache keeps them for later runs.
os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")


class AttentionError(Exception):
    """The attention kernel asked for cannot run here."""


@dataclass(frozen=True)
class Kernel:
    """forward(q, k, v, scale) -> (out, lse) and backward(grad_out, q, k, v, out, lse, scale) -> (dq, dk, dv), on
    [batch, tokens, heads, head_dim] tensors of one of `dtypes`; lse is [batch, heads, tokens] in fp32."""

    forward: object
    backward: object
    dtypes: tuple[torch.dtype, ...] = HALF


KERNELS: dict[str, Kernel] = {}


def register_kernel(name: str, forward, backward, dtypes: tuple[torch.dtype, ...] = HALF) -> None:
    KERNELS[name] = Kernel(forward, backward, dtypes)


@torch.library.custom_op("cogvideox_lora::attention_forward", mutates_args=())
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    return KERNELS[kernel].forward(q, k, v, scale)


@attention_forward.register_fake
def _(q, k, v, scale, kernel):
    batch, tokens, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, tokens), dtype=torch.float32)


@torch.library.custom_op("cogvideox_lora::attention_backward", mutates_args=())
def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, scale: float, kernel: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return KERNELS[kernel].backward(grad_out, q, k, v, out, lse, scale)


@attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, scale, kernel):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, ctx.scale, ctx.kernel = inputs
    ctx.save_for_backward(q, k, v, *output)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    return (*attention_backward(grad_out.contiguous(), q, k, v, out, lse, ctx.scale, ctx.kernel), None, None)


attention_forward.register_autograd(_backward, setup_context=_setup_context)


def _flash4_forward(q, k, v, scale):
    from flash_attn.cute.interface import _flash_attn_fwd

    out, lse, *_ = _flash_attn_fwd(q, k, v, softmax_scale=scale, causal=False, return_lse=True)
    return out, lse


def _flash4_backward(grad_out, q, k, v, out, lse, scale):
    from flash_attn.cute.interface import _flash_attn_bwd

    dq, dk, dv = _flash_attn_bwd(q, k, v, out, grad_out, lse, softmax_scale=scale, causal=False)
    return dq, dk, dv


register_kernel("flash4", _flash4_forward, _flash4_backward)


def flash4_problem(head_dim: int, dtype: torch.dtype) -> str | None:
    """Why FlashAttention-4 cannot train this model here, or None if it can."""
    if importlib.util.find_spec("flash_attn") is None:
        return "FlashAttention-4 is not installed (pip install flash-attn-4)"
    try:
        import flash_attn.cute.interface  # noqa: F401
    except Exception as e:  # a broken install fails in its own ways (CUDA libraries, the CuTe DSL)
        return f"FlashAttention-4 does not import ({type(e).__name__}: {e})"
    if not torch.cuda.is_available():
        return "FlashAttention-4 needs a CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    # Its backward runs on Hopper (sm90) and the Blackwell families (sm100, sm110, sm120); the others
    # would fail at the first step.
    if major not in (9, 10, 11, 12):
        return f"FlashAttention-4 trains on Hopper and Blackwell GPUs, not on this sm{major}{minor} one"
    largest = 256 if major == 9 else 128
    if not (8 <= head_dim <= largest and head_dim % 8 == 0):
        return f"FlashAttention-4 on sm{major}{minor} takes head sizes 8 to {largest} in steps of 8, not {head_dim}"
    if dtype not in HALF:
        return f"FlashAttention-4 computes in bf16 or fp16, not {dtype}: use --mixed_precision bf16"
    return None


@dataclass(frozen=True)
class Choice:
    kernel: str | None  # a KERNELS entry, or None for PyTorch's SDPA
    description: str


def choose(backend: str, head_dim: int, dtype: torch.dtype) -> Choice:
    """The kernel that --attention_backend gives for this model; raises AttentionError for an explicit flash4 that
    cannot run, so the run stops before any model is loaded."""
    if backend in SDPA_BACKENDS:
        return Choice(None, f"PyTorch SDPA, {backend} first")
    problem = flash4_problem(head_dim, dtype)
    if problem is None:
        try:
            version = importlib.metadata.version("flash-attn-4")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown version"
        return Choice("flash4", f"FlashAttention-4 ({version}) on {torch.cuda.get_device_name()}")
    if backend == "flash4":
        raise AttentionError(f"--attention_backend flash4: {problem}. Use --attention_backend auto or cudnn.")
    return Choice(None, f"PyTorch SDPA, cudnn first ({problem})")


def preferred_sdpa(backend: str):
    """Context in which scaled_dot_product_attention tries --attention_backend's SDPA kernel first (cuDNN for auto
    and flash4, where SDPA runs instead of FlashAttention-4), then the other kernels.

    PyTorch's default order puts flash first; at head size 64 on an H100 cuDNN's kernel does a
    forward+backward of CogVideoX-2B attention in 20 ms against flash's 30 (measured per layer).
    """
    first = SDPA_BACKENDS.get(backend, SDPBackend.CUDNN_ATTENTION)
    return sdpa_kernel([first] + [b for b in SDPA_BACKENDS.values() if b != first], set_priority=True)


class CogVideoXAttnProcessor:
    """The attention of a CogVideoX block (text and video tokens together, q/k norms, rotary embeddings on the
    video tokens), in the [batch, tokens, heads, head_dim] layout that FlashAttention takes without transposes.

    kernel: a KERNELS entry; None, or a dtype it does not take, runs PyTorch's SDPA instead.
    """

    def __init__(self, kernel: str | None = None):
        self.kernel = kernel

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        text = encoder_hidden_states.size(1)
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        q, k, v = (proj(x).unflatten(-1, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if image_rotary_emb is not None:
            q = torch.cat([q[:, :text], apply_rotary_emb(q[:, text:], image_rotary_emb, sequence_dim=1)], dim=1)
            if not attn.is_cross_attention:
                k = torch.cat([k[:, :text], apply_rotary_emb(k[:, text:], image_rotary_emb, sequence_dim=1)], dim=1)
        if attention_mask is not None:
            raise ValueError("CogVideoX attends over all tokens: its attention takes no mask.")
        out = attn.to_out[1](attn.to_out[0](self.attend(q, k, v).flatten(2)))
        return out[:, text:], out[:, :text]

    def attend(self, q, k, v):
        # Under autocast the q/k norms give fp32 and the adapters' sums may too: cast as SDPA does under autocast.
        device = q.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else q.dtype
        if self.kernel is not None and dtype in KERNELS[self.kernel].dtypes:
            q, k, v = (t.to(dtype).contiguous() for t in (q, k, v))
            return attention_forward(q, k, v, q.shape[-1] ** -0.5, self.kernel)[0]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def use(transformer, choice: Choice) -> None:
    """Routes every block's attention through the processor of this choice."""
    transformer.set_attn_processor(CogVideoXAttnProcessor(choice.kernel))
