"""The optimizer named on the command line, over the LoRA weights."""

import torch


def make_optimizer(params: list[torch.nn.Parameter], args) -> torch.optim.Optimizer:
    kwargs = {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon,
              "weight_decay": args.adam_weight_decay}
    if args.optimizer == "prodigy":
        import prodigyopt

        return prodigyopt.Prodigy(params, beta3=args.prodigy_beta3, decouple=args.prodigy_decouple,
                                  use_bias_correction=args.prodigy_use_bias_correction,
                                  safeguard_warmup=args.prodigy_safeguard_warmup, **kwargs)
    adamw = args.optimizer == "adamw"
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        return (bnb.optim.AdamW8bit if adamw else bnb.optim.Adam8bit)(params, **kwargs)
    # The fused CUDA kernel updates every adapter matrix in a few launches instead of several per matrix.
    fused = all(p.is_cuda for p in params)
    return (torch.optim.AdamW if adamw else torch.optim.Adam)(params, fused=fused or None, **kwargs)
