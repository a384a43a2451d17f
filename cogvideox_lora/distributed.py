"""What several processes need beyond accelerate: a wait with no deadline, and DeepSpeed set by the flags."""

import time

import torch
from accelerate.utils import DistributedType


def wait_for_everyone_without_deadline(accelerator, name: str, poll_seconds: float = 0.5) -> None:
    """A barrier for waits of unknown length: some processes encoding or validating while others are done.

    accelerator.wait_for_everyone() is a collective, which NCCL's watchdog (and gloo) abort once it has
    waited the process group's timeout: a few minutes of one process generating videos would end the
    run. Here each process counts itself in the process group's key-value store and polls the count,
    which has no deadline. `name` must be unique within the run and the same on every process.
    """
    if accelerator.num_processes == 1:
        return
    store = torch.distributed.distributed_c10d._get_default_store()
    key = f"cogvideox-lora/{name}"
    store.add(key, 1)
    while store.add(key, 0) < accelerator.num_processes:
        time.sleep(poll_seconds)


def configure_deepspeed(accelerator, batch_size: int, accumulation: int, max_grad_norm: float) -> None:
    """Under DeepSpeed, the engine settings that the trainer's flags decide, whatever the config file says.

    Call it before accelerator.prepare. There is no DataLoader for accelerate to read the batch size
    from, and the trainer's own flags for clipping and accumulation must win over the file's.
    """
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    precision = accelerator.mixed_precision  # read from the config, so before it changes below
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = batch_size
    config["gradient_accumulation_steps"] = accumulation
    config["train_batch_size"] = batch_size * accumulation * accelerator.num_processes
    config["gradient_clipping"] = max_grad_norm
    # DeepSpeed's bf16/fp16 modes cast every parameter, the adapter's too, to half precision. Its
    # torch_autocast mode keeps the parameters as the trainer made them (the frozen model in
    # --mixed_precision, the adapter and hence its optimizer state in fp32), as without DeepSpeed. An
    # empty list of "lower precision safe" modules keeps the adapter's gradients fp32 in the all-reduce.
    config["bf16"] = {"enabled": False}
    config["fp16"] = {"enabled": False}
    config["torch_autocast"] = {"enabled": False} if precision == "no" else {
        "enabled": True, "dtype": precision, "lower_precision_safe_modules": []}
