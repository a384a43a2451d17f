"""--fp8_compute against the bf16 step on the GPU: the same loss and LoRA gradients, and how fast.

    python benchmarks/check_fp8.py [--rows 2b,2b-ckpt,5b-ckpt,1.5-5b-ckpt] [--kernel flash4] [--out results.json]

For each row, a random-init real-size transformer (compiled blocks, LoRA rank 128 with a random B so that
every adapter matrix has a gradient; -ckpt: full gradient checkpointing) and one batch of latents of the model's
native size (1.0: 49x480x720, 1.5: 81x768x1360);
the trainer's step (check_attention.training_step; the attention kernel of --kernel, default cuDNN) with bf16
weights and with float8 products (transformer.prepare's spec, so what runs is what the trainer runs). Against bf16: the
loss's relative difference and the cosine similarity of each LoRA gradient (median and least over the
tensors); the step's time (median of --timed_steps after 2) and its peak memory as PyTorch and as the card count it.
The issue's gates: loss within 0.5 %, median cosine >= 0.99, none below 0.95.
"""

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import CogVideoXTransformer3DModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_train import latent_size, native_shape  # noqa: E402
from check_attention import training_step  # noqa: E402
from cogvideox_lora import synthetic  # noqa: E402
from cogvideox_lora.lora import trainable_parameters  # noqa: E402
from cogvideox_lora.loss import draw_batch, transformer_inputs  # noqa: E402
from cogvideox_lora.memory import Plan  # noqa: E402
from cogvideox_lora.placement import Placement  # noqa: E402
from cogvideox_lora.transformer import TransformerSpec, prepare  # noqa: E402

GIB = 2**30
VARIANTS = {"bf16": {}, "fp8 products": {"fp8_base_weights": True, "fp8_linear": True}}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def run(base, options: dict, checkpointing: str | None, kernel: str | None, batch, inputs, alphas,
        timed: int) -> dict:
    model = copy.deepcopy(base)
    prepare(model, TransformerSpec(torch.bfloat16, 128, 128, compile=True, kernel=kernel, **options),
            Placement(Plan(checkpointing), "cuda"))
    generator = torch.Generator("cuda").manual_seed(1)
    for p in trainable_parameters(model):
        p.data.normal_(0, 0.01, generator=generator)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    card_before = torch.cuda.device_memory_used()
    loss, grads = training_step(model, batch, inputs, alphas)  # compiles
    times = []
    for _ in range(timed + 1):
        start = time.perf_counter()
        again, _ = training_step(model, batch, inputs, alphas)
        times.append(time.perf_counter() - start)
    result = {"loss": loss, "loss_again": again, "grads": grads, "step_s": statistics.median(times[1:]),
              "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
              "card_used_gib": torch.cuda.device_memory_used() / GIB, "card_before_gib": card_before / GIB}
    del model
    torch.cuda.empty_cache()
    return result


def compare(size: str, checkpointing: str | None, kernel: str | None, timed: int) -> dict:
    config = synthetic.SPECS[size]["transformer"]
    torch.manual_seed(0)
    with torch.device("cuda"):
        base = CogVideoXTransformer3DModel(**config).to(torch.bfloat16).requires_grad_(False)
    frames, height, width = latent_size(*native_shape(size))
    # the VAE's mean and log-variance
    video = {"latent_params": torch.randn(32, frames, height, width, dtype=torch.bfloat16)}
    prompt = {"prompt_embeds": torch.randn(config["max_text_seq_length"], config["text_embed_dim"],
                                           dtype=torch.bfloat16)}
    batch = draw_batch([video], [prompt], [3], 1.0, 0.0, 1000, "cuda", config.get("patch_size_t"))
    inputs = transformer_inputs(base.config, *(batch[0].shape[i] for i in (1, 3, 4)), "cuda")
    alphas = torch.linspace(0.999, 0.01, 1000, device="cuda")
    runs = {name: run(base, options, checkpointing, kernel, batch, inputs, alphas, timed)
            for name, options in VARIANTS.items()}
    reference = runs["bf16"]
    out = {}
    for name, r in runs.items():
        cosines = [cosine(reference["grads"][n], g) for n, g in r["grads"].items()]
        out[name] = {"loss": r["loss"], "loss_relative_difference": abs(r["loss"] / reference["loss"] - 1),
                     "grad_cosine_median": statistics.median(cosines), "grad_cosine_min": min(cosines),
                     "tensors": len(cosines), "step_s": r["step_s"], "peak_allocated_gib": r["peak_allocated_gib"],
                     "card_used_gib": r["card_used_gib"], "card_before_gib": r["card_before_gib"]}
        print(f"{size} {checkpointing or 'no checkpointing'}, {name}: loss {r['loss']:.6f} "
              f"({out[name]['loss_relative_difference']:.2%} from bf16), LoRA gradient cosine median "
              f"{out[name]['grad_cosine_median']:.5f}, least {out[name]['grad_cosine_min']:.5f}; step "
              f"{r['step_s']:.3f} s, peak {r['peak_allocated_gib']:.2f} GiB allocated", flush=True)
    del base
    torch.cuda.empty_cache()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="2b,2b-ckpt,5b-ckpt")
    parser.add_argument("--kernel", choices=["flash4"], default=None, help="default: PyTorch's cuDNN attention")
    parser.add_argument("--timed_steps", type=int, default=5, help="steps timed after two untimed ones")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "kernel": args.kernel or "cudnn"}
    for row in args.rows.split(","):
        size = row.removesuffix("-ckpt")
        results[row] = compare(size, "full" if size != row else None, args.kernel, args.timed_steps)
        if args.out:  # after each row, so that a call cut short keeps the rows it ran
            Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
