"""Where the time of one training step goes, and what each speed option buys.

    python benchmarks/profile_step.py --size 2b [--checkpointing full|keep_attention] [--variants flash4+compile,cudnn+compile]
    python benchmarks/profile_step.py --size 2b --variants flash4+compile --ahead 6 --trace /tmp/out

Runs the trainer's own step (draw_batch, compute_loss, backward, fused AdamW) on a random-init
transformer built on the GPU from the real config, with random latents of 49x480x720, so no model
folder or data is needed. For each variant it prints the median step time (the host waiting for each
step, as the trainer does), peak memory and the kernels that take the most time. --ahead N also times N
steps queued without waiting between them; --trace profiles two steps with the host's calls too and says
how long the GPU sat idle in each part of them (and writes the trace, gzipped, to that folder).
"""

import argparse
import gc
import gzip
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import CogVideoXTransformer3DModel
from torch.profiler import record_function

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_train import latent_size  # noqa: E402
from cogvideox_lora import attention, recompute, synthetic  # noqa: E402
from cogvideox_lora.lora import trainable_parameters  # noqa: E402
from cogvideox_lora.loss import compute_loss, draw_batch, transformer_inputs  # noqa: E402
from cogvideox_lora.memory import Plan  # noqa: E402
from cogvideox_lora.placement import Placement  # noqa: E402
from cogvideox_lora.profiling import gpu_idle, saved_bytes  # noqa: E402
from cogvideox_lora.transformer import TransformerSpec, prepare  # noqa: E402

GIB = 2**30


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run of this script, with --size tiny


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def build(size: str, checkpointing: str | None, options: set, rank: int, kernel: str | None):
    """The transformer with LoRA as the trainer builds it (transformer.prepare), from the real config with random
    weights, on this device."""
    config = synthetic.SPECS[size]["transformer"]
    with torch.device(DEVICE):
        model = CogVideoXTransformer3DModel(**config).to(torch.bfloat16).requires_grad_(False)
    spec = TransformerSpec(torch.bfloat16, rank, rank, fp8_base_weights=bool({"fp8", "fp8c"} & options),
                           fp8_linear="fp8c" in options, kernel=kernel,
                           compile="compile" in options)
    prepare(model, spec, Placement(Plan(checkpointing), DEVICE))
    return model


def run_variant(name: str, args) -> dict:
    options = set(name.split("+"))
    backend = next(o for o in options if o in attention.BACKENDS)
    transformer = build(args.size, args.checkpointing, options, args.rank, "flash4" if backend == "flash4" else None)
    config = transformer.config
    params = trainable_parameters(transformer)
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4, fused=DEVICE == "cuda")
    latent_frames, h, w = latent_size(args.frames, args.height, args.width)
    video = {"latent_params": torch.randn(2 * config.in_channels, latent_frames, h, w, dtype=torch.bfloat16)}
    prompt = {"prompt_embeds": torch.randn(config.max_text_seq_length, config.text_embed_dim, dtype=torch.bfloat16)}
    alphas = torch.linspace(0.999, 0.001, 1000, device=DEVICE)
    inputs = transformer_inputs(config, latent_frames, h, w, DEVICE)
    def step(i):
        with record_function("batch"):
            batch = draw_batch([video], [prompt], [i], 1.0, 0.0, 1000, DEVICE)
        with record_function("forward"), torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = compute_loss(transformer, batch, alphas, torch.bfloat16, inputs)
        with record_function("backward"):
            loss.backward()
        with record_function("clip"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        with record_function("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    with attention.preferred_sdpa(backend):
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for i in range(args.warmup):
            step(i)
        sync()
        warmup_s = time.perf_counter() - started
        times = []
        for i in range(args.steps):
            started = time.perf_counter()
            step(100 + i)
            sync()
            times.append(time.perf_counter() - started)
        ahead = None
        if args.ahead:
            started = time.perf_counter()
            for i in range(args.ahead):
                step(200 + i)
            sync()
            ahead = (time.perf_counter() - started) / args.ahead
        peak = torch.cuda.max_memory_allocated() / GIB if DEVICE == "cuda" else 0.0
        table, idle = "", None
        if args.profile:
            activity = torch.profiler.ProfilerActivity.CUDA if DEVICE == "cuda" else torch.profiler.ProfilerActivity.CPU
            with torch.profiler.profile(activities=[activity]) as prof:
                step(1000)
                sync()
            table = prof.key_averages().table(sort_by=f"{'cuda' if DEVICE == 'cuda' else 'cpu'}_time_total",
                                              row_limit=args.profile)
        if args.trace:
            activities = [torch.profiler.ProfilerActivity.CPU] + \
                ([torch.profiler.ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
            # Two steps, the host waiting for each as the trainer does, so that the gap between them is seen.
            with torch.profiler.profile(activities=activities) as prof:
                for i in range(2):
                    step(2000 + i)
                    sync()
            path = Path(args.trace, f"trace_{args.size}_{args.checkpointing or 'none'}_{name.replace('+', '-')}.json")
            path.parent.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(path))
            events = json.loads(path.read_text())["traceEvents"]
            with gzip.open(f"{path}.gz", "wt") as f:
                json.dump(events, f)
            path.unlink()
            idle = gpu_idle(events)
    del transformer, optimizer, params
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return {"variant": name, "median_step_s": statistics.median(times), "ahead_step_s": ahead, "peak_alloc_gib": peak,
            "warmup_s": warmup_s, "table": table, "idle": idle}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="2b", choices=["2b", "5b", "tiny"])
    parser.add_argument("--variants", default="cudnn,flash",
                        help="comma-separated; each joins with '+' an attention backend (flash4, cudnn, flash, "
                             "efficient, math) and optionally 'compile' (torch.compile each block) and 'fp8' (float8 "
                             "base weights) or 'fp8c' (and float8 products: --fp8_compute linear)")
    parser.add_argument("--checkpointing", choices=recompute.POLICIES, default=None,
                        help="gradient checkpointing with this policy (default: none)")
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=720)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--profile", type=int, default=15, help="kernels to list per variant (0: no profile)")
    parser.add_argument("--ahead", type=int, default=0,
                        help="also time this many steps queued back to back, the host never waiting for the GPU")
    parser.add_argument("--trace", default=None,
                        help="folder: profile one more step with the host's calls, print the GPU's idle time by "
                             "phase of the step and write the trace there")
    args = parser.parse_args()

    results = [run_variant(v, args) for v in args.variants.split(",")]
    for r in results:
        print(f"\n=== {args.size} {args.checkpointing or ''} {r['variant']}\n{r['table']}")
        if r["idle"]:
            idle = r["idle"]
            print(f"Two steps: GPU busy {idle['busy_ms']:.1f} ms of {idle['span_ms']:.1f} ms; idle by the phase that launched "
                  f"the work after each gap:\n| phase | idle (ms) | gaps | largest (us) | before |\n| --- | --- | --- | --- | --- |")
            for phase, v in idle.items():
                if isinstance(v, dict):
                    print(f"| {phase} | {v['idle_ms']:.2f} | {v['gaps']} | {v['largest_us']:.0f} | {v['largest_before']} |")
    print(f"\n| {args.size}{' ckpt' if args.checkpointing else ''} variant | median step (s) "
          f"| step, host ahead (s) | peak alloc (GiB) | warm-up (s) |\n| --- | --- | --- | --- | --- |")
    for r in results:
        ahead = "—" if r["ahead_step_s"] is None else f"{r['ahead_step_s']:.3f}"
        print(f"| {r['variant']} | {r['median_step_s']:.3f} | {ahead} | {r['peak_alloc_gib']:.1f} | {r['warmup_s']:.1f} |")


if __name__ == "__main__":
    main()
