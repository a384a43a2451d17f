"""FlashAttention-4 against cuDNN, and offloading against none, on the GPU: same numbers, and how fast.

    python benchmarks/check_attention.py [--out results.json]

1. One layer of CogVideoX attention at each model's native size (head size 64, bf16): forward + backward
   time (CUDA events, median) and the largest difference of output and gradients between the kernels.
2. One training step of a random-init real-size CogVideoX-2B (compiled blocks, bf16, LoRA rank 128) from the
   same weights and batch: with cuDNN and with FlashAttention-4 (loss, largest LoRA-gradient difference);
   then, FlashAttention-4 with gradient checkpointing, keep_attention, activation offloading and 10 swapped
   blocks, each against plain checkpointing.
3. Pinned host <-> GPU copy bandwidth, which bounds what offloading can hide.
"""

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch
from diffusers import CogVideoXTransformer3DModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cogvideox_lora import attention, synthetic  # noqa: E402
from cogvideox_lora.lora import trainable_parameters  # noqa: E402
from cogvideox_lora.loss import compute_loss, draw_batch, transformer_inputs  # noqa: E402
from cogvideox_lora.memory import Plan  # noqa: E402
from cogvideox_lora.placement import Placement  # noqa: E402
from cogvideox_lora.transformer import TransformerSpec, prepare  # noqa: E402

SHAPES = {"2b 49x480x720": (30, 17776), "5b 49x480x720": (48, 17776), "1.5-5b 81x768x1360": (48, 45106)}


def timed(fn, repeats=10) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def layer(heads: int, tokens: int) -> dict:
    q, k, v = (torch.randn(1, tokens, heads, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grad = torch.randn(1, tokens, heads, 64, device="cuda", dtype=torch.bfloat16)
    results, outputs = {}, {}
    for name, kernel in (("cudnn", None), ("flash4", "flash4")):
        processor = attention.CogVideoXAttnProcessor(kernel)

        def step():
            q.grad = k.grad = v.grad = None
            out = processor.attend(q, k, v)
            out.backward(grad)
            return out

        with attention.preferred_sdpa("cudnn"):
            results[f"{name}_ms"] = timed(step)
            out = step()
        outputs[name] = [out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()]
    results["max_abs_diff_out_dq_dk_dv"] = [(a.float() - b.float()).abs().max().item()
                                            for a, b in zip(outputs["cudnn"], outputs["flash4"])]
    return results


def training_step(transformer, batch, inputs, alphas):
    params = trainable_parameters(transformer)
    for p in params:
        p.grad = None
    with attention.preferred_sdpa("cudnn"):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compute_loss(transformer, batch, alphas, torch.bfloat16, inputs)
        loss.backward()
    torch.cuda.synchronize()
    return loss.item(), {n: p.grad.float().clone() for n, p in transformer.named_parameters() if p.requires_grad}


def compare(reference, other) -> dict:
    (loss_a, grads_a), (loss_b, grads_b) = reference, other
    diff = max((grads_a[n] - grads_b[n]).abs().max().item() for n in grads_a)
    scale = max(grads_a[n].abs().max().item() for n in grads_a)
    return {"loss": [loss_a, loss_b], "max_abs_diff_lora_grad": diff, "max_abs_lora_grad": scale}


def steps() -> dict:
    config = synthetic.SPECS["2b"]["transformer"]
    torch.manual_seed(0)
    with torch.device("cuda"):
        base = CogVideoXTransformer3DModel(**config).to(torch.bfloat16).requires_grad_(False)
    video = {"latent_params": torch.randn(32, 13, 60, 90, dtype=torch.bfloat16)}
    prompt = {"prompt_embeds": torch.randn(226, 4096, dtype=torch.bfloat16)}
    batch = draw_batch([video], [prompt], [3], 1.0, 0.0, 1000, "cuda")
    inputs = transformer_inputs(base.config, 13, 60, 90, "cuda")
    alphas = torch.linspace(0.999, 0.01, 1000, device="cuda")

    def variant(kernel, policy=None, offload_activations=False, blocks=0, compiled=True):
        model = copy.deepcopy(base)
        prepare(model, TransformerSpec(torch.bfloat16, 128, 128, kernel=kernel, compile=compiled),
                Placement(Plan(policy, offload_activations, blocks), "cuda"))
        # B is zero at init: the same random adapter in every variant gives every matrix a gradient to compare.
        generator = torch.Generator("cuda").manual_seed(1)
        for p in trainable_parameters(model):
            p.data.normal_(0, 0.01, generator=generator)
        torch.cuda.reset_peak_memory_stats()
        training_step(model, batch, inputs, alphas)  # compiles; the second step is the one compared
        result = training_step(model, batch, inputs, alphas)
        peak = torch.cuda.max_memory_allocated() / 2**30
        del model
        torch.cuda.empty_cache()
        return result, peak

    cudnn, _ = variant(None)
    flash4, _ = variant("flash4")
    full, full_peak = variant("flash4", "full")
    out = {"2b step, cudnn vs flash4": compare(cudnn, flash4)}
    for name, kwargs in (("keep_attention", dict(policy="keep_attention")),
                         ("activation offload", dict(policy="full", offload_activations=True)),
                         ("activation offload + 10 blocks swapped", dict(policy="full", offload_activations=True,
                                                                          blocks=10))):
        result, peak = variant("flash4", **kwargs)
        out[f"2b step, full checkpointing vs {name}"] = {**compare(full, result), "peak_gib": [full_peak, peak]}
    return out


def bandwidth() -> dict:
    host = torch.empty(2**30, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    to_gpu = timed(lambda: device.copy_(host, non_blocking=True))
    to_host = timed(lambda: host.copy_(device, non_blocking=True))
    return {"pinned_to_gpu_gib_per_s": 1000 / to_gpu, "gpu_to_pinned_gib_per_s": 1000 / to_host}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    problem = attention.flash4_problem(64, torch.bfloat16)
    if problem:
        raise SystemExit(problem)
    results = {"bandwidth": bandwidth()}
    results.update({f"layer {name}": layer(*shape) for name, shape in SHAPES.items()})
    results.update(steps())
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
