"""Gradient checkpointing: what each transformer block keeps for its backward pass, and where it keeps it.

Policies (--checkpointing_policy):
- full: a block keeps its input alone and recomputes everything in the backward pass, attention included:
  the least memory.
- keep_attention: a block also keeps its attention output and log-sum-exp (one [tokens, width] tensor and a
  small one), so the recompute skips attention, the most expensive part, and redoes only the cheap
  projections, norms and feed-forward. PyTorch's selective checkpointing names the attention ops to save.

The checkpoint sits inside each block's forward, so a compiled block traces it into its graph: the recompute
becomes part of the compiled backward instead of a separate forward graph: 2-6 % faster steps (BENCHMARKS.md).
Offloading (offload.py) plugs in around the block instead, where its hooks run outside the compiled graph:
the checkpoint's saved inputs go to the host, and swapped blocks load their weights before their forward and
before their recompute.
"""

import contextlib

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .attention import attention_forward

POLICIES = ("full", "keep_attention")


def _attention_ops():
    aten = torch.ops.aten
    return {attention_forward._opoverload, aten._scaled_dot_product_cudnn_attention.default,
            aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_efficient_attention.default,
            aten._scaled_dot_product_flash_attention_for_cpu.default}


def _keep_attention_context():
    kept = _attention_ops()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in kept else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def _options(policy: str) -> dict:
    """torch.utils.checkpoint's keyword arguments for this policy."""
    return {"use_reentrant": False, **({"context_fn": _keep_attention_context} if policy == "keep_attention" else {})}


def enable(transformer, policy: str, activations=None, swap=None) -> None:
    """Turns on gradient checkpointing of every block with this policy; activations: an
    offload.ActivationOffload, swap: an offload.BlockSwap, or None. Compile the blocks after this."""
    if activations is None and swap is None:
        inside(transformer, policy)
    else:
        around(transformer, policy, activations, swap)


def inside(transformer, policy: str) -> None:
    """The checkpoint inside each block's forward, where a compiled block traces it into its graph."""
    options = _options(policy)

    # A function of this file rather than a functools.partial: Dynamo starts tracing at the first frame outside
    # torch (Module._call_impl and checkpoint are in its skip list), and it must start here to see the checkpoint.
    def checkpointed(forward):
        def run(*args, **kwargs):
            # Validation calls the blocks without gradients: their plain forward, as diffusers calls a block
            # without checkpointing then, so its compiled graph for that holds no checkpoint.
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            return checkpoint(forward, *args, **options, **kwargs)

        return run

    for block in transformer.transformer_blocks:
        block.forward = checkpointed(block.forward)


def around(transformer, policy: str, activations=None, swap=None) -> None:
    """The checkpoint around each (compiled) block, with the hooks of activation offloading and block swap, which
    run outside the compiled graph: the recompute runs the block's compiled forward again, apart from its backward."""
    options = _options(policy)
    index = {block: i for i, block in enumerate(transformer.transformer_blocks)}

    def checkpointed(block, hidden_states, encoder_hidden_states, *rest):
        run = block.__call__ if swap is None else _loading(swap, index[block], block)
        offloading = activations.offloading(hidden_states, encoder_hidden_states) if activations is not None \
            else contextlib.nullcontext()
        with offloading:
            return checkpoint(run, hidden_states, encoder_hidden_states, *rest, **options)

    transformer.enable_gradient_checkpointing(checkpointed)


def _loading(swap, i: int, block):
    """The block, loading its swapped weights first; the checkpoint calls it in the forward pass, then again
    to recompute it in the backward pass."""
    directions = iter((+1, -1))

    def run(*args):
        swap.load(i, next(directions))
        return block(*args)

    return run
