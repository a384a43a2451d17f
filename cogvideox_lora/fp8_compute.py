"""FP8 matrix products for the frozen base weights (--fp8_compute linear).

The attention and feed-forward weights are already stored as float8 with a scale per output row
(models.Float8Linear). Here their products run in float8 too, at twice the bf16 rate of Hopper's tensor
cores: the activations are quantized with a scale per token, so one outlier token costs precision only to
itself, and the product applies both scales on the way out (torch._scaled_mm with row-wise scales). The
adapter's products, the norms and the modulation stay in bf16/fp32.

The weights are frozen, so the backward needs only the input's gradient, grad_out @ W. W's scales are per
output row, which is the sum's index there, so they go into grad_out's columns before it is quantized per
token; W itself is fed transposed (a per-layer copy made in the backward, not kept).
"""

import torch

from .models import Float8Linear

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
# cuBLASLt's float8 products need both of the weight's dimensions to be multiples of 16.
ALIGNMENT = 16


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (rows, columns) as float8 with one fp32 scale a row: (values, scales of shape (rows, 1))."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).to(FP8), scale


class _ScaledLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, weight_scale):
        ctx.save_for_backward(weight, weight_scale)
        ctx.in_dtype = x.dtype
        rows = x.reshape(-1, x.shape[-1])
        values, scale = _quantize_rows(rows)
        # cuBLASLt's row-wise scaled products write bf16 only.
        out = torch._scaled_mm(values, weight.t(), scale_a=scale, scale_b=weight_scale.float().t(),
                               out_dtype=torch.bfloat16)
        return out.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        weight, weight_scale = ctx.saved_tensors
        rows = grad_out.reshape(-1, grad_out.shape[-1]) * weight_scale.t()
        values, scale = _quantize_rows(rows)
        ones = torch.ones(1, weight.shape[1], device=weight.device, dtype=torch.float32)
        grad_in = torch._scaled_mm(values, weight.t().contiguous().t(), scale_a=scale, scale_b=ones,
                                   out_dtype=torch.bfloat16)
        return grad_in.reshape(*grad_out.shape[:-1], weight.shape[1]).to(ctx.in_dtype), None, None


class Float8ComputeLinear(Float8Linear):
    """A Float8Linear whose product runs in float8 (the frozen weight gets no gradient)."""

    def forward(self, x):
        out = _ScaledLinear.apply(x, self.weight, self.weight_scale)
        return out if self.bias is None else out + self.bias


def use_for_linears(transformer) -> int:
    """Switches the transformer's float8-stored Linears to float8 products; returns how many were switched.

    Layers whose shape cuBLASLt cannot take keep the dequantized product.
    """
    switched = 0
    for module in transformer.modules():
        if type(module) is Float8Linear and all(n % ALIGNMENT == 0 for n in module.weight.shape):
            module.__class__ = Float8ComputeLinear
            switched += 1
    return switched


def problem(device: torch.device, mixed_precision: str) -> str | None:
    """Why this machine or precision cannot run --fp8_compute linear, or None where they can."""
    if mixed_precision != "bf16":
        return (f"--fp8_compute writes bf16 results (cuBLASLt's scaled products), and this run's precision is "
                f"{mixed_precision}: use --mixed_precision bf16.")
    if device.type == "cpu":
        return None  # PyTorch's CPU float8 products: slow, but the same numbers, for tests and dry runs
    if device.type != "cuda":
        return f"--fp8_compute runs on NVIDIA GPUs (Ada, Hopper, Blackwell), not on {device.type}."
    major, minor = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if (major, minor) < (8, 9):
        return (f"--fp8_compute needs float8 tensor cores (Ada, Hopper, Blackwell); the {name} has compute "
                f"capability {major}.{minor}. Leave it out: the bf16 step runs there.")
    return None
