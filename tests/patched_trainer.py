"""train_cogvideox_lora.py with test-only patches, for what several processes on a CPU cannot show otherwise.

    accelerate launch ... tests/patched_trainer.py TRAINER_FLAGS...

COGVIDEOX_TEST_SLOW_VALIDATION=S   the main process starts each validation S seconds after the others.
COGVIDEOX_TEST_DEEPSPEED_ON_GLOO=1 accelerate starts DeepSpeed only for GPUs (it picks no backend for CPU
                                   processes); here it gets gloo, and DeepSpeed its CPU accelerator.
"""

import os
import runpy
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

if os.environ.get("COGVIDEOX_TEST_SLOW_VALIDATION"):
    from cogvideox_lora.validation import Validator

    run = Validator.run

    def slow_run(self, accelerator, transformer, step):
        if accelerator.is_main_process:
            time.sleep(float(os.environ["COGVIDEOX_TEST_SLOW_VALIDATION"]))
        return run(self, accelerator, transformer, step)

    Validator.run = slow_run

if os.environ.get("COGVIDEOX_TEST_DEEPSPEED_ON_GLOO"):
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    # DistributedType.NO with a backend: accelerate then lets DeepSpeed set up the process group with
    # gloo and takes the world size from it, as it does for GPUs.
    PartialState._prepare_backend = lambda self, cpu=False, sagemaker_dp=False, backend=None: (
        "gloo", DistributedType.NO)

sys.argv = [str(REPO / "train_cogvideox_lora.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
