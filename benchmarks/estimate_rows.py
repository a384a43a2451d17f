"""The trainer's memory estimate for each bench_train.py row, from the real configs alone (no GPU, no weights).

    python benchmarks/estimate_rows.py [ROW ...]      # default: every row of bench_train.ROWS

Each row's flags go through the trainer's own parser, settings and memory.plan_for, as train_cogvideox_lora.py does
before loading anything; the compiled blocks and bf16 of the GPU runs are assumed. The estimate is the device-level
peak (as nvidia-smi counts it): PyTorch's allocated tensors (training or validation, whichever is more) and the
CUDA context, kernels and allocator slack planned for beside them (memory.CONTEXT_AND_KERNELS_GIB,
memory.ALLOCATOR_SLACK_GIB); a row's --max_gpu_memory is taken as the card's size, all of it free.
"""

import inspect
import sys
from pathlib import Path

from diffusers import CogVideoXTransformer3DModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_train import ROWS, latent_size, native_shape, parse_row  # noqa: E402
from cogvideox_lora import memory, settings, synthetic  # noqa: E402
from cogvideox_lora.args import parse_args  # noqa: E402

DEFAULTS = {name: p.default for name, p in inspect.signature(CogVideoXTransformer3DModel.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def estimate(row: str) -> tuple[memory.Plan, memory.MemoryEstimate]:
    base, *_ = parse_row(row)
    size, flags = ROWS[base]
    frames, height, width = native_shape(size)
    run = settings.from_args(parse_args([
        "--pretrained_model_name_or_path", size, "--instance_data_root", ".", "--mixed_precision", "bf16", "--rank",
        "128", "--height", str(height), "--width", str(width), "--max_num_frames", str(frames), *flags]))
    latent = latent_size(frames, height, width)
    config = {**DEFAULTS, **synthetic.SPECS[size]["transformer"]}
    _, plan, needed = memory.plan_for(run.memory, config, latent, latent if run.validation.prompts else None,
                                      run.training.batch_size, run.lora.rank, compiled=True, weight_bytes=2,
                                      budget_gib=run.memory.max_gpu_memory)
    return plan, needed


def main():
    print("| row | plan | estimate on the card (GiB) | allocated: training | validation | context, kernels, slack |"
          "\n| --- | --- | --- | --- | --- | --- |")
    for row in sys.argv[1:] or ROWS:
        plan, needed = estimate(row)
        print(f"| {row} | {plan.flags()} | {needed.total_gib:.2f} | {needed.training_gib:.2f} "
              f"| {'—' if needed.validation_gib is None else format(needed.validation_gib, '.2f')} "
              f"| {needed.overhead_gib:.2f} |")


if __name__ == "__main__":
    main()
