"""The optimizer and learning-rate schedule named on the command line, over the LoRA weights."""

import torch
from diffusers.optimization import get_scheduler

from .settings import OptimizerSettings


def make_optimizer(params: list[torch.nn.Parameter], settings: OptimizerSettings) -> torch.optim.Optimizer:
    kwargs = {"lr": settings.learning_rate, "betas": settings.betas, "eps": settings.epsilon,
              "weight_decay": settings.weight_decay}
    if settings.name == "prodigy":
        import prodigyopt

        return prodigyopt.Prodigy(params, beta3=settings.prodigy_beta3, decouple=settings.prodigy_decouple,
                                  use_bias_correction=settings.prodigy_use_bias_correction,
                                  safeguard_warmup=settings.prodigy_safeguard_warmup, **kwargs)
    adamw = settings.name == "adamw"
    if settings.use_8bit:
        import bitsandbytes as bnb

        return (bnb.optim.AdamW8bit if adamw else bnb.optim.Adam8bit)(params, **kwargs)
    # The fused CUDA kernel updates every adapter matrix in a few launches instead of several per matrix.
    fused = all(p.is_cuda for p in params)
    return (torch.optim.AdamW if adamw else torch.optim.Adam)(params, fused=fused or None, **kwargs)


def make_schedule(optimizer: torch.optim.Optimizer, settings: OptimizerSettings, total_steps: int):
    return get_scheduler(settings.scheduler, optimizer, num_warmup_steps=settings.warmup_steps,
                         num_training_steps=total_steps, num_cycles=settings.num_cycles, power=settings.power)
