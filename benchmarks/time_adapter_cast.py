"""Host time a training step spends turning off peft's fp32 cast of adapter inputs, on the real 2B module tree.

    python benchmarks/time_adapter_cast.py

Builds CogVideoX-2B with its rank-128 LoRA on the meta device (no weights, no GPU) and times peft's
disable_input_dtype_casting context, entered and left once a step as the trainer did until it set the flag
once (lora.uncast_adapter_inputs), against that one-time setting.
"""

import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import CogVideoXTransformer3DModel
from peft.helpers import disable_input_dtype_casting

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cogvideox_lora import synthetic  # noqa: E402
from cogvideox_lora.lora import add_lora, uncast_adapter_inputs  # noqa: E402


def median_ms(fn, repeats: int = 21) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main():
    with torch.device("meta"):
        transformer = CogVideoXTransformer3DModel(**synthetic.SPECS["2b"]["transformer"]).requires_grad_(False)
    add_lora(transformer, 128, 128)

    def per_step():
        with disable_input_dtype_casting(transformer):
            pass

    print(f"2B, {sum(1 for _ in transformer.modules())} modules: peft's context, entered and left: "
          f"{median_ms(per_step):.2f} ms a step; uncast_adapter_inputs, once a run: "
          f"{median_ms(lambda: uncast_adapter_inputs(transformer, torch.bfloat16)):.2f} ms")


if __name__ == "__main__":
    main()
