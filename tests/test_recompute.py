"""Gradient checkpointing (recompute.py): where the checkpoint goes, and what each block keeps for its backward
pass inside compiled blocks."""

import copy

import pytest
from torch._dynamo.utils import counters

from cogvideox_lora import attention, offload, profiling, recompute
from helpers import STAND_IN_CALLS, assert_same_step, register_stand_in, step, tiny_transformer


@pytest.mark.slow
def test_checkpointed_compiled_blocks_give_the_plain_step(plain, batch):
    """recompute.enable puts each block's checkpoint inside its compiled graph: the same step as the plain path,
    keeping a small part of what the plain path keeps; keep_attention also keeps the attention output (the
    stand-in kernel's custom op, which the compiler leaves whole as it does FlashAttention-4's)."""
    base = copy.deepcopy(plain)
    attention.use(base, attention.Choice(register_stand_in(), ""))
    kept_plain, reference = profiling.saved_bytes(base, lambda: step(base, batch))
    kept = {}
    for policy in recompute.POLICIES:
        checkpointed = copy.deepcopy(base)
        recompute.enable(checkpointed, policy)
        # Inductor's partition of forward and backward without its code generation, which would take a minute here.
        for block in checkpointed.transformer_blocks:
            block.compile(backend="aot_eager_decomp_partition")
        graphs = counters["stats"]["unique_graphs"]
        STAND_IN_CALLS.update(forward=0, backward=0)
        kept[policy], result = profiling.saved_bytes(checkpointed, lambda: step(checkpointed, batch, uncast=True))
        assert counters["stats"]["unique_graphs"] > graphs, "the checkpointed blocks should have been compiled"
        layers = len(base.transformer_blocks)
        forwards = {"full": 2, "keep_attention": 1}[policy]
        assert STAND_IN_CALLS == {"forward": layers * forwards, "backward": layers}, policy
        assert_same_step(reference, result, tolerance=1e-2)
    assert kept["full"] < kept["keep_attention"] < kept_plain / 3, (kept, kept_plain)



def test_the_checkpoint_goes_inside_the_blocks_unless_offloading_hooks_must_run_around_them():
    inside = tiny_transformer(2)
    recompute.enable(inside, "full")
    # Inside: each block's own forward is checkpointed, where a compiled block traces it into its graph.
    assert all("forward" in vars(block) for block in inside.transformer_blocks)
    assert not inside.is_gradient_checkpointing
    around = tiny_transformer(2)
    recompute.enable(around, "full", offload.ActivationOffload("cpu"))
    assert not any("forward" in vars(block) for block in around.transformer_blocks)
    assert around.is_gradient_checkpointing
