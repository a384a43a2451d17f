"""What several processes need beyond accelerate (distributed.py): a wait with no deadline, and DeepSpeed's engine
set by the trainer's flags."""

import threading
import time
from types import SimpleNamespace

import torch
from accelerate.utils import DistributedType

from cogvideox_lora.distributed import configure_deepspeed, wait_for_everyone_without_deadline


def test_the_wait_ends_when_every_process_has_counted_itself_in():
    # Two processes as two threads of one, sharing the process group's store.
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        events = []

        def process(name, delay):
            time.sleep(delay)
            events.append(f"{name} arrives")
            wait_for_everyone_without_deadline(SimpleNamespace(num_processes=2), "encoded", poll_seconds=0.01)
            events.append(f"{name} goes on")

        threads = [threading.Thread(target=process, args=args, daemon=True) for args in (("early", 0), ("late", 0.2))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert events[:2] == ["early arrives", "late arrives"]
        assert sorted(events[2:]) == ["early goes on", "late goes on"]
    finally:
        torch.distributed.destroy_process_group()


def test_deepspeed_takes_batch_accumulation_clipping_and_fp32_adapter_from_the_flags():
    def accelerator(distributed_type, precision):
        plugin = SimpleNamespace(deepspeed_config={"bf16": {"enabled": True}, "gradient_clipping": 0.0})
        return SimpleNamespace(distributed_type=distributed_type, mixed_precision=precision, num_processes=4,
                               state=SimpleNamespace(deepspeed_plugin=plugin))

    deepspeed = accelerator(DistributedType.DEEPSPEED, "bf16")
    configure_deepspeed(deepspeed, batch_size=2, accumulation=3, max_grad_norm=1.5)
    config = deepspeed.state.deepspeed_plugin.deepspeed_config
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"], config["gradient_clipping"]) == (2, 3, 2 * 3 * 4, 1.5)
    assert config["bf16"] == config["fp16"] == {"enabled": False}
    assert config["torch_autocast"] == {"enabled": True, "dtype": "bf16", "lower_precision_safe_modules": []}
    plain = accelerator(DistributedType.MULTI_GPU, "bf16")
    configure_deepspeed(plain, batch_size=2, accumulation=3, max_grad_norm=1.5)
    assert plain.state.deepspeed_plugin.deepspeed_config == {"bf16": {"enabled": True}, "gradient_clipping": 0.0}
